//! Who a certificate speaks for: the `dormant://` URI in its subject alternative names, and the
//! one place that reads it from a DER certificate.

use std::fmt;

use x509_parser::extensions::GeneralName;

use crate::NodeName;

/// The prefix of every identity URI.
pub const SCHEME: &str = "dormant://";

/// A peer's identity, as its certificate's URI SAN names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A scheduler replica (`dormant://replica/<id>`): Raft RPCs, and requests it forwards.
    Replica(u64),
    /// An agent host (`dormant://node/<node-id>`): the agent API, as that node only.
    Node(NodeName),
    /// An operator (`dormant://operator/<name>`): the operator API.
    Operator(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate: not a DER X.509 certificate: {0}")]
    NotACertificate(String),
    #[error("certificate: no subject alternative name of the form {SCHEME}replica/<id>, {SCHEME}node/<node-id> or {SCHEME}operator/<name>")]
    Missing,
    #[error("certificate: more than one {SCHEME} identity ({0} and {1})")]
    Several(String, String),
    #[error("identity {uri:?}: {why}")]
    Bad { uri: String, why: String },
}

/// Operator names follow the node-name rule: lowercase letters, digits and '-', at most 63.
fn valid_operator(name: &str) -> bool {
    NodeName::parse(name).is_ok()
}

impl PeerIdentity {
    /// The URI a certificate carries for this identity.
    pub fn uri(&self) -> String {
        match self {
            Self::Replica(id) => format!("{SCHEME}replica/{id}"),
            Self::Node(n) => format!("{SCHEME}node/{n}"),
            Self::Operator(n) => format!("{SCHEME}operator/{n}"),
        }
    }

    /// Parses a `dormant://kind/name` URI.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = |why: &str| IdentityError::Bad {
            uri: uri.to_string(),
            why: why.to_string(),
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("does not start with dormant://"))?;
        let (kind, name) = rest.split_once('/').ok_or_else(|| {
            bad("must be dormant://replica/<id>, node/<node-id> or operator/<name>")
        })?;
        match kind {
            "replica" => match name.parse::<u64>() {
                Ok(id) if id > 0 => Ok(Self::Replica(id)),
                _ => Err(bad("a replica id is a number greater than 0")),
            },
            "node" => NodeName::parse(name)
                .map(Self::Node)
                .map_err(|e| bad(&e.to_string())),
            "operator" if valid_operator(name) => Ok(Self::Operator(name.to_string())),
            "operator" => Err(bad(
                "an operator name has lowercase letters, digits and '-' only, at most 63",
            )),
            _ => Err(bad("the kind must be replica, node or operator")),
        }
    }

    /// The identity of a certificate: its one `dormant://` URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::NotACertificate(e.to_string()))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::NotACertificate(e.to_string()))?;
        let mut found: Option<&str> = None;
        for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with(SCHEME) {
                    if let Some(first) = found {
                        return Err(IdentityError::Several(first.into(), (*uri).into()));
                    }
                    found = Some(uri);
                }
            }
        }
        Self::parse_uri(found.ok_or(IdentityError::Missing)?)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_round_trip_and_bad_ones_name_the_rule() {
        for id in [
            PeerIdentity::Replica(3),
            PeerIdentity::Node(NodeName::parse("host-a").unwrap()),
            PeerIdentity::Operator("admin".into()),
        ] {
            assert_eq!(PeerIdentity::parse_uri(&id.uri()).unwrap(), id);
        }
        for bad in [
            "https://x",
            "dormant://replica/0",
            "dormant://replica/x",
            "dormant://node/../a",
            "dormant://operator/Admin",
            "dormant://tenant/a",
            "dormant://node",
        ] {
            let err = PeerIdentity::parse_uri(bad).unwrap_err();
            assert!(err.to_string().starts_with("identity "), "{bad}: {err}");
        }
    }
}

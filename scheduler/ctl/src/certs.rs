//! `dormantctl certs init`: a development CA and the certificates of a cluster's replicas, nodes
//! and operators in one directory (see `dormant_common::tls::dev_ca`), reusing the CA already
//! there, so certificates can be added later.

use std::path::Path;

use dormant_common::tls::dev_ca::{self, Request};
use dormant_common::tls::PeerIdentity;
use dormant_common::NodeName;

use super::CtlError;

/// Writes the certificates asked for into `dir`; returns the files written.
pub fn init(
    dir: &Path,
    replicas: &[u64],
    nodes: &[String],
    operators: &[String],
    hosts: &[String],
) -> Result<Vec<std::path::PathBuf>, CtlError> {
    let mut identities = Vec::new();
    for id in replicas {
        identities.push(PeerIdentity::parse_uri(&PeerIdentity::Replica(*id).uri())?);
    }
    for n in nodes {
        let node = NodeName::parse(n).map_err(|e| CtlError::Other(format!("--node: {e}")))?;
        identities.push(PeerIdentity::Node(node));
    }
    for o in operators {
        identities.push(PeerIdentity::parse_uri(
            &PeerIdentity::Operator(o.clone()).uri(),
        )?);
    }
    // Nodes and operators are clients only; replicas are servers too, reached at `hosts`.
    if !replicas.is_empty() && hosts.is_empty() {
        return Err(CtlError::Other(
            "--host: required with --replica (the DNS names or IP addresses clients dial the \
             replicas at, e.g. --host 127.0.0.1 --host localhost)"
                .into(),
        ));
    }
    let (_, written) = dev_ca::init_dir(
        dir,
        &Request {
            identities,
            hosts: hosts.to_vec(),
        },
    )?;
    Ok(written)
}

impl From<dormant_common::tls::IdentityError> for CtlError {
    fn from(e: dormant_common::tls::IdentityError) -> Self {
        CtlError::Other(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_need_hosts_and_names_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let err = init(tmp.path(), &[1], &[], &[], &[]).unwrap_err();
        assert!(err.to_string().starts_with("--host: required"), "{err}");
        let err = init(tmp.path(), &[], &["../a".into()], &[], &[]).unwrap_err();
        assert!(err.to_string().starts_with("--node: "), "{err}");
        let err = init(tmp.path(), &[0], &[], &[], &["h".into()]).unwrap_err();
        assert!(err.to_string().contains("greater than 0"), "{err}");
        let written = init(
            tmp.path(),
            &[1],
            &["a".into()],
            &["admin".into()],
            &["127.0.0.1".into()],
        )
        .unwrap();
        assert_eq!(written.len(), 8);
    }
}

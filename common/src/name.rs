//! Tenant and node names: DNS-label-like, so they are safe in paths, cgroup names and host names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name accepted: a DNS label's limit.
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("{field}: {len} characters, at most {MAX_NAME_LEN} allowed")]
    TooLong { field: &'static str, len: usize },
    #[error("{field}: {value:?} may contain only lowercase letters, digits and '-', and must start with a letter and end with a letter or digit")]
    BadCharacters { field: &'static str, value: String },
}

fn validate(field: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { field });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            field,
            len: value.len(),
        });
    }
    let bytes = value.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let starts_ok = bytes[0].is_ascii_lowercase();
    let ends_ok = bytes[bytes.len() - 1] != b'-';
    if !(bytes.iter().all(allowed) && starts_ok && ends_ok) {
        return Err(NameError::BadCharacters {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

macro_rules! dns_name {
    ($(#[$doc:meta])* $ty:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `value`; the error names the field and the rule.
            pub fn parse(value: &str) -> Result<Self, NameError> {
                validate($field, value)?;
                Ok(Self(value.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                validate($field, &value)?;
                Ok(Self(value))
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

dns_name!(
    /// A tenant's name, unique in the cluster.
    TenantName,
    "name"
);
dns_name!(
    /// A host's node id, chosen by the operator (`--node-id`).
    NodeName,
    "node_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "acme", "acme-2", "a1", &"a".repeat(63)] {
            assert!(TenantName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_paths_spaces_and_uppercase_naming_the_field() {
        for bad in ["../x", "A B", "Acme", "-a", "a-", "1abc", "a_b", "a.b", ""] {
            let err = TenantName::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("name:"), "{bad}: {err}");
        }
        let err = TenantName::parse(&"a".repeat(64)).unwrap_err();
        assert_eq!(err.to_string(), "name: 64 characters, at most 63 allowed");
    }

    #[test]
    fn node_names_name_their_field() {
        let err = NodeName::parse("Host 1").unwrap_err().to_string();
        assert!(err.starts_with("node_id:"), "{err}");
    }

    #[test]
    fn deserialising_validates() {
        let bad: Result<TenantName, _> = serde_json::from_str("\"../etc\"");
        assert!(bad.is_err());
    }
}

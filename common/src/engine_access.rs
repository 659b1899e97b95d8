//! How clients reach an engine's tenants: the admin user its data is initialised with and the
//! URI they connect with. The agent knows it (its engine templates and config) and reports it at
//! registration; the scheduler checks it with the same rules and builds credentials from it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineAccess {
    /// The admin user a tenant's credentials name.
    pub user: String,
    /// The URI scheme (`postgresql`, `redis`).
    pub uri_scheme: String,
    /// Empty, or `/` and what follows the port (PostgreSQL's `/postgres`).
    pub uri_path: String,
}

/// A field of [`EngineAccess`] that breaks its rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct EngineAccessError {
    pub field: &'static str,
    pub rule: &'static str,
}

/// The longest user, scheme or path accepted (credentials are printed and put in URIs).
pub const MAX_LEN: usize = 63;

impl EngineAccess {
    /// Checks each field, naming the first that breaks its rule. The user and path go into a
    /// URI unescaped, so they hold only characters that need no escaping there.
    pub fn new(user: &str, uri_scheme: &str, uri_path: &str) -> Result<Self, EngineAccessError> {
        let err = |field, rule| EngineAccessError { field, rule };
        let unreserved = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
        if user.is_empty() || user.len() > MAX_LEN || !user.chars().all(unreserved) {
            return Err(err(
                "user",
                "1 to 63 characters of letters, digits, '-', '.', '_' and '~'",
            ));
        }
        // RFC 3986: a letter, then letters, digits, '+', '-' or '.'.
        let mut chars = uri_scheme.chars();
        let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !scheme_ok || uri_scheme.len() > MAX_LEN {
            return Err(err(
                "uri_scheme",
                "a letter, then letters, digits, '+', '-' or '.', at most 63",
            ));
        }
        let path_ok = uri_path.is_empty()
            || (uri_path.starts_with('/')
                && uri_path.len() <= MAX_LEN
                && uri_path.chars().all(|c| unreserved(c) || c == '/'));
        if !path_ok {
            return Err(err(
                "uri_path",
                "empty, or '/' then letters, digits, '-', '.', '_', '~' and '/', at most 63",
            ));
        }
        Ok(Self {
            user: user.to_string(),
            uri_scheme: uri_scheme.to_string(),
            uri_path: uri_path.to_string(),
        })
    }

    /// An engine's access where nothing says otherwise: the built-in engines' own, and `admin`
    /// with the engine's name as the scheme for any other. What an agent of a version before
    /// the report served, and what a custom engine's config leaves unset falls back to (so a
    /// table that overrides a built-in engine keeps its credentials).
    pub fn defaults_for(engine: &str) -> Self {
        let (user, scheme, path) = match engine {
            "postgres" => ("postgres", "postgresql", "/postgres"),
            "redis" => ("default", "redis", ""),
            other => ("admin", other, ""),
        };
        Self {
            user: user.into(),
            uri_scheme: scheme.into(),
            uri_path: path.into(),
        }
    }

    /// The URI a client connects with to `endpoint` (`host:port`).
    pub fn uri(&self, password: &str, endpoint: &str) -> String {
        format!(
            "{}://{}:{password}@{endpoint}{}",
            self.uri_scheme, self.user, self.uri_path
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_access_builds_the_uri() {
        let a = EngineAccess::new("postgres", "postgresql", "/postgres").unwrap();
        assert_eq!(
            a.uri("pw", "10.0.0.1:5432"),
            "postgresql://postgres:pw@10.0.0.1:5432/postgres"
        );
        let a = EngineAccess::new("default", "redis", "").unwrap();
        assert_eq!(a.uri("pw", "h:1"), "redis://default:pw@h:1");
        let a = EngineAccess::new("app_admin", "my-db+tls", "/v1/db").unwrap();
        assert_eq!(a.uri("pw", "h:1"), "my-db+tls://app_admin:pw@h:1/v1/db");
    }

    #[test]
    fn bad_fields_are_named_with_their_rule() {
        let long = "a".repeat(64);
        for (user, scheme, path, field) in [
            ("", "redis", "", "user"),
            ("a:b", "redis", "", "user"),
            ("a@b", "redis", "", "user"),
            ("a b", "redis", "", "user"),
            (long.as_str(), "redis", "", "user"),
            ("u", "", "", "uri_scheme"),
            ("u", "1db", "", "uri_scheme"),
            ("u", "my_db", "", "uri_scheme"),
            ("u", "db://", "", "uri_scheme"),
            ("u", "db", "postgres", "uri_path"),
            ("u", "db", "/a?b", "uri_path"),
            ("u", "db", "/a b", "uri_path"),
        ] {
            let err = EngineAccess::new(user, scheme, path).unwrap_err();
            assert_eq!(err.field, field, "{user:?} {scheme:?} {path:?}");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
    }

    #[test]
    fn the_defaults_are_the_built_in_engines_own_and_admin_for_others() {
        let pg = EngineAccess::defaults_for("postgres");
        assert_eq!(pg.uri("pw", "h:1"), "postgresql://postgres:pw@h:1/postgres");
        let other = EngineAccess::defaults_for("mydb");
        assert_eq!(other.uri("pw", "h:1"), "mydb://admin:pw@h:1");
        // They pass the rules the scheduler checks a report with.
        for engine in ["postgres", "redis", "mydb"] {
            let d = EngineAccess::defaults_for(engine);
            assert_eq!(
                EngineAccess::new(&d.user, &d.uri_scheme, &d.uri_path),
                Ok(d)
            );
        }
    }
}

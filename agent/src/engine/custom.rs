//! Engines defined in the agent's config file (`[engines.NAME]`), checked at start so a mistake
//! stops the agent with the field and the rule instead of failing each tenant later. A custom
//! engine with the name of a built-in one replaces it.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;

use super::{EngineTemplate, Readiness};

/// One `[engines.NAME]` table.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Commands run once on an empty data directory (`{data}`), each an argv list.
    #[serde(default)]
    pub init: Vec<Vec<String>>,
    /// Files written (mode 0600, as the tenant) before `init` runs and removed after.
    #[serde(default)]
    pub init_files: BTreeMap<String, String>,
    /// Files written (mode 0600, as the tenant) before every start.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// The engine's argv; it must stay in the foreground.
    pub start: Vec<String>,
    /// Signal for a graceful stop (default SIGTERM).
    pub stop_signal: Option<String>,
    /// How long a graceful stop may take before SIGKILL (default 30000).
    pub stop_timeout_ms: Option<u64>,
    /// The Unix socket clients are proxied to; must be under `{run}`.
    pub socket: String,
    /// Ready when this PostgreSQL-style pid file says so; otherwise when the socket accepts.
    pub ready_pid_file: Option<String>,
    /// Whether clients send the first byte (default false: the engine is connected to as soon
    /// as a client is accepted, as a server that greets first needs).
    #[serde(default)]
    pub client_speaks_first: bool,
    /// Open client connections one tenant may hold (default 1024).
    pub max_clients: Option<u64>,
    /// Calls of the tenant seccomp filter's deny list this engine needs back, by name (e.g.
    /// `["ptrace"]`); `clone` lifts the check on namespace flags.
    #[serde(default)]
    pub seccomp_allow: Vec<String>,
    /// Whether the proxy terminates TLS for this engine's clients (default true); false serves
    /// them in the clear, for a protocol that cannot start with TLS.
    pub tls: Option<bool>,
    /// The admin user tenants' credentials name: the one `init` or `files` give the
    /// `{password}`. Unset: `EngineAccess::defaults_for` (a built-in engine's own, else `admin`).
    pub user: Option<String>,
    /// The scheme of tenants' connection URIs (unset: the built-in's, else the engine's name).
    pub uri_scheme: Option<String>,
    /// What follows the port in tenants' connection URIs (unset: the built-in's, else empty).
    pub uri_path: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("engines.{engine}.{field}: {rule}")]
pub struct EngineConfigError {
    pub engine: String,
    pub field: &'static str,
    pub rule: String,
}

impl EngineConfig {
    pub fn into_template(self, name: &str) -> Result<EngineTemplate, EngineConfigError> {
        let err = |field: &'static str, rule: String| EngineConfigError {
            engine: name.to_string(),
            field,
            rule,
        };
        if dormant_common::TenantName::parse(name).is_err() {
            return Err(err(
                "name",
                "an engine name is lowercase letters, digits and '-', at most 63".into(),
            ));
        }
        let Some(program) = self.start.first() else {
            return Err(err("start", "must name a program".into()));
        };
        if !program.contains('{') {
            let path = Path::new(program);
            if !path.is_absolute() {
                return Err(err(
                    "start",
                    format!("{program:?} must be an absolute path"),
                ));
            }
            if !path.exists() {
                return Err(err("start", format!("{program} does not exist")));
            }
            if !visible_in_tenants(path) {
                return Err(err(
                    "start",
                    format!(
                        "{program} is not inside a tenant's root: programs run from /usr (or /bin, /sbin, /lib*)"
                    ),
                ));
            }
        }
        if self.init.iter().any(Vec::is_empty) {
            return Err(err("init", "every command must name a program".into()));
        }
        if !self.socket.starts_with("{run}/") {
            return Err(err(
                "socket",
                format!(
                    "{:?} must be under {{run}}/, the tenant's own socket directory",
                    self.socket
                ),
            ));
        }
        let stop_signal = match &self.stop_signal {
            None => Signal::SIGTERM,
            Some(s) => Signal::from_str(s).map_err(|_| {
                err(
                    "stop_signal",
                    format!("{s:?} is not a signal name like SIGTERM"),
                )
            })?,
        };
        crate::spawn::seccomp::check_allowed(&self.seccomp_allow)
            .map_err(|e| err("seccomp_allow", e.to_string()))?;
        let defaults = dormant_common::EngineAccess::defaults_for(name);
        let access = dormant_common::EngineAccess::new(
            self.user.as_deref().unwrap_or(&defaults.user),
            self.uri_scheme.as_deref().unwrap_or(&defaults.uri_scheme),
            self.uri_path.as_deref().unwrap_or(&defaults.uri_path),
        )
        .map_err(|e| err(e.field, e.rule.to_string()))?;
        let stop_timeout = Duration::from_millis(self.stop_timeout_ms.unwrap_or(30_000));
        if stop_timeout.is_zero() {
            return Err(err("stop_timeout_ms", "must be greater than 0".into()));
        }
        Ok(EngineTemplate {
            name: name.to_string(),
            init_files: self.init_files.into_iter().collect(),
            init: self.init,
            files: self.files.into_iter().collect(),
            start: self.start,
            stop_signal,
            stop_timeout,
            socket: self.socket,
            readiness: match self.ready_pid_file {
                Some(path) => Readiness::PidFileStatus(path),
                None => Readiness::SocketAccepts,
            },
            client_speaks_first: self.client_speaks_first,
            max_clients: Some(self.max_clients.unwrap_or(1024)),
            seccomp_allow: self.seccomp_allow,
            plaintext_refusal: Vec::new(),
            tls: self.tls.unwrap_or(true),
            alpn: Vec::new(),
            access,
        })
    }
}

/// Whether a tenant's root (`spawn::root`) shows `path`: it holds `/usr` and the top-level
/// program directories only.
fn visible_in_tenants(path: &Path) -> bool {
    [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    ]
    .iter()
    .any(|top| path.starts_with(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> EngineConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_custom_engine_from_toml_becomes_a_template() {
        let t = parse(
            r#"
            start = ["/bin/sh", "-c", "exec my-db --socket {run}/db.sock"]
            socket = "{run}/db.sock"
            stop_signal = "SIGINT"
            stop_timeout_ms = 5000
            files = { "{data}/db.conf" = "password {password}\n" }
            "#,
        )
        .into_template("mydb")
        .unwrap();
        assert_eq!(t.name, "mydb");
        assert_eq!(t.stop_signal, Signal::SIGINT);
        assert_eq!(t.stop_timeout, Duration::from_secs(5));
        assert_eq!(t.readiness, Readiness::SocketAccepts);
        assert_eq!(t.files.len(), 1);
        // Unset, the credentials name `admin` and the engine's name as the scheme.
        assert_eq!(t.access.uri("pw", "h:1"), "mydb://admin:pw@h:1");
        let t = parse(
            r#"
            start = ["/bin/sh"]
            socket = "{run}/db.sock"
            user = "owner"
            uri_scheme = "mydb+tls"
            uri_path = "/main"
            "#,
        )
        .into_template("mydb")
        .unwrap();
        assert_eq!(t.access.uri("pw", "h:1"), "mydb+tls://owner:pw@h:1/main");
        // A table that replaces a built-in engine keeps that engine's credentials unless told.
        let t = parse(
            r#"
            start = ["/bin/sh"]
            socket = "{run}/.s.PGSQL.5432"
            "#,
        )
        .into_template("postgres")
        .unwrap();
        assert_eq!(
            t.access.uri("pw", "h:1"),
            "postgresql://postgres:pw@h:1/postgres"
        );
    }

    #[test]
    fn mistakes_name_the_field_and_the_rule() {
        let base = || EngineConfig {
            start: vec!["/bin/sh".into()],
            socket: "{run}/s.sock".into(),
            ..Default::default()
        };
        let cases = [
            ("Bad Name", base(), "engines.Bad Name.name"),
            (
                "x",
                EngineConfig {
                    start: vec![],
                    ..base()
                },
                "engines.x.start: must name a program",
            ),
            (
                "x",
                EngineConfig {
                    start: vec!["sh".into()],
                    ..base()
                },
                "must be an absolute path",
            ),
            (
                "x",
                EngineConfig {
                    start: vec!["/nonexistent/db".into()],
                    ..base()
                },
                "/nonexistent/db does not exist",
            ),
            (
                "x",
                EngineConfig {
                    socket: "/tmp/s.sock".into(),
                    ..base()
                },
                "engines.x.socket",
            ),
            (
                "x",
                EngineConfig {
                    stop_signal: Some("SIGNOPE".into()),
                    ..base()
                },
                "engines.x.stop_signal",
            ),
            (
                "x",
                EngineConfig {
                    user: Some("root@db".into()),
                    ..base()
                },
                "engines.x.user: 1 to 63 characters",
            ),
            (
                "x",
                EngineConfig {
                    uri_scheme: Some("my_db".into()),
                    ..base()
                },
                "engines.x.uri_scheme: a letter, then",
            ),
            (
                "x",
                EngineConfig {
                    uri_path: Some("app".into()),
                    ..base()
                },
                "engines.x.uri_path: empty, or '/'",
            ),
            (
                "x",
                EngineConfig {
                    stop_timeout_ms: Some(0),
                    ..base()
                },
                "engines.x.stop_timeout_ms",
            ),
            (
                "x",
                EngineConfig {
                    // Exists, but a tenant's root holds /usr and the program directories only.
                    start: vec!["/etc/hostname".into()],
                    ..base()
                },
                "engines.x.start: /etc/hostname is not inside a tenant's root",
            ),
            (
                "x",
                EngineConfig {
                    seccomp_allow: vec!["ptrace".into(), "execve".into()],
                    ..base()
                },
                "engines.x.seccomp_allow: \"execve\" is not a call",
            ),
        ];
        for (name, config, expected) in cases {
            let err = config.into_template(name).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<EngineConfig>(
            "start = [\"/bin/sh\"]\nsocket = \"{run}/s\"\nport = 5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `port`"), "{err}");
    }
}

//! The agent's settings: a TOML file (`--config`), with command-line flags taking precedence.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use dormant_common::tls::{TlsError, TlsFiles};
use dormant_common::{Bytes, NodeName};
use serde::Deserialize;

/// The TOML file; every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub scheduler: Option<String>,
    pub node_id: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub advertise: Option<String>,
    pub listen_host: Option<IpAddr>,
    /// Tenant ports, `START-END`.
    pub ports: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
    pub cgroup_driver: Option<crate::cgroup::select::DriverChoice>,
    pub cgroup_root: Option<PathBuf>,
    pub cgroup_parent: Option<PathBuf>,
    /// Uids (and gids) tenants get one each from, START-END.
    pub tenant_uids: Option<String>,
    pub postgres_bin_dir: Option<PathBuf>,
    pub redis_server: Option<PathBuf>,
    /// Custom engines, `[engines.NAME]` tables (see `engine::custom`).
    pub engines: Option<BTreeMap<String, crate::engine::custom::EngineConfig>>,
    pub reserve_memory: Option<String>,
    pub reserve_storage: Option<String>,
    pub pids_max: Option<u64>,
    /// Open client connections one tenant may hold through the proxy (default: from the
    /// engine's max_connections, see `proxy::Budget`).
    pub max_clients_per_tenant: Option<u64>,
    pub labels: Option<BTreeMap<String, String>>,
    /// Each tenant's engine output kept on the host, `engine.log` and `engine.log.1` together
    /// (default 8MiB, at least 128KiB).
    pub engine_log_max: Option<String>,
    /// Engine output written to the log at most, per second and tenant (default 1MiB); beyond it
    /// output is dropped and counted.
    pub engine_log_rate: Option<String>,
    pub stop_tenants_on_exit: Option<bool>,
    /// The certificate chain (PEM) tenants' clients get, whose names cover the endpoints
    /// (default: the node's `cert` and `key`).
    pub tenant_tls_cert: Option<PathBuf>,
    pub tenant_tls_key: Option<PathBuf>,
    /// Serve plaintext clients too (default: only when there is no certificate: `--insecure`
    /// without tenant_tls_cert).
    pub tenant_plaintext: Option<bool>,
    pub log_format: Option<dormant_common::telemetry::LogFormat>,
    /// The cluster's CA, this node's certificate (`dormant://node/<node-id>`) and its key, PEM.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Plaintext gRPC to the scheduler, no certificate: for trying things out only.
    pub insecure: Option<bool>,
    /// Where to serve Prometheus metrics over plain HTTP (`GET /metrics`); none by default.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub scheduler: String,
    pub node_id: NodeName,
    pub state_dir: PathBuf,
    pub advertise: String,
    pub listen_host: IpAddr,
    pub ports: (u16, u16),
    pub heartbeat_interval: Duration,
    pub cgroup_driver: crate::cgroup::select::DriverChoice,
    pub cgroup_root: PathBuf,
    pub cgroup_parent: PathBuf,
    pub tenant_uids: (u32, u32),
    pub postgres_bin_dir: Option<PathBuf>,
    pub redis_server: Option<PathBuf>,
    pub engines: BTreeMap<String, crate::engine::custom::EngineConfig>,
    pub reserve_memory: Bytes,
    pub reserve_storage: Bytes,
    pub pids_max: u64,
    pub max_clients_per_tenant: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub engine_log: crate::engine_log::LogLimits,
    pub stop_tenants_on_exit: bool,
    /// `GET /metrics` over plain HTTP here, if set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS on tenant endpoints: certificate chain and key.
    pub tenant_tls: Option<(PathBuf, PathBuf)>,
    pub tenant_plaintext: bool,
    /// Mutual TLS files; `None` only with `insecure = true`.
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{field}: required (flag --{flag} or key {field} in the config file)")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Parses `START-END` (inclusive) into a port range.
/// `START-END` for `tenant_uids`: unprivileged (at least 1000), START <= END.
pub fn parse_uids(value: &str) -> Result<(u32, u32), SettingsError> {
    let bad = || {
        SettingsError::Invalid(format!(
            "tenant_uids: {value:?} must be START-END with 1000 <= START <= END < 4294967295"
        ))
    };
    let (a, b) = value.split_once('-').ok_or_else(bad)?;
    let start: u32 = a.trim().parse().map_err(|_| bad())?;
    let end: u32 = b.trim().parse().map_err(|_| bad())?;
    if start < 1000 || start > end || end == u32::MAX {
        return Err(bad());
    }
    Ok((start, end))
}

pub fn parse_ports(value: &str) -> Result<(u16, u16), SettingsError> {
    let bad = || {
        SettingsError::Invalid(format!(
            "ports: {value:?} is not a range START-END of TCP ports (1-65535, START <= END)"
        ))
    };
    let (a, b) = value.split_once('-').ok_or_else(bad)?;
    let start: u16 = a.trim().parse().map_err(|_| bad())?;
    let end: u16 = b.trim().parse().map_err(|_| bad())?;
    if start == 0 || start > end {
        return Err(bad());
    }
    Ok((start, end))
}

impl Settings {
    pub fn merge(cli: FileConfig, file: FileConfig) -> Result<Self, SettingsError> {
        macro_rules! pick {
            ($f:ident) => {
                cli.$f.clone().or(file.$f.clone())
            };
        }
        let node_id = pick!(node_id).ok_or(SettingsError::Missing {
            field: "node_id",
            flag: "node-id",
        })?;
        let node_id =
            NodeName::parse(&node_id).map_err(|e| SettingsError::Invalid(e.to_string()))?;
        let bytes = |field: &'static str, v: Option<String>, default: u64| match v {
            None => Ok(Bytes(default)),
            Some(s) => Bytes::parse(field, &s).map_err(|e| SettingsError::Invalid(e.to_string())),
        };
        let ports = match pick!(ports) {
            Some(p) => parse_ports(&p)?,
            None => (20000, 20999),
        };
        let heartbeat_ms = pick!(heartbeat_interval_ms).unwrap_or(2000);
        if heartbeat_ms == 0 {
            return Err(SettingsError::Invalid(
                "heartbeat_interval_ms: must be greater than 0".into(),
            ));
        }
        let pids_max = pick!(pids_max).unwrap_or(512);
        if pids_max < 16 {
            return Err(SettingsError::Invalid(format!(
                "pids_max: {pids_max} is too small for any engine (at least 16)"
            )));
        }
        let max_clients_per_tenant = pick!(max_clients_per_tenant);
        if max_clients_per_tenant == Some(0) {
            return Err(SettingsError::Invalid(
                "max_clients_per_tenant: must be greater than 0".into(),
            ));
        }
        let tls = TlsFiles::resolve(
            pick!(insecure).unwrap_or(false),
            pick!(ca),
            pick!(cert),
            pick!(key),
        )?;
        let tenant_tls = match (pick!(tenant_tls_cert), pick!(tenant_tls_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            // The node's own certificate (its names cover the endpoints when issued for them).
            (None, None) => tls.as_ref().map(|t| (t.cert.clone(), t.key.clone())),
            (Some(_), None) => {
                return Err(SettingsError::Invalid(
                    "tenant_tls_key: required with tenant_tls_cert".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::Invalid(
                    "tenant_tls_cert: required with tenant_tls_key".into(),
                ))
            }
        };
        let tenant_plaintext = match (pick!(tenant_plaintext), &tenant_tls) {
            (Some(false), None) => {
                return Err(SettingsError::Invalid(
                    "tenant_plaintext: false needs a certificate (tenant_tls_cert and tenant_tls_key, or the node's cert and key)".into(),
                ))
            }
            (Some(allowed), _) => allowed,
            (None, tls) => tls.is_none(),
        };
        let log_default = crate::engine_log::LogLimits::default();
        let engine_log = crate::engine_log::LogLimits {
            max_bytes: bytes(
                "engine_log_max",
                pick!(engine_log_max),
                log_default.max_bytes,
            )?
            .0,
            rate: bytes("engine_log_rate", pick!(engine_log_rate), log_default.rate)?.0,
        };
        if engine_log.max_bytes < crate::engine_log::MIN_MAX_BYTES {
            return Err(SettingsError::Invalid(format!(
                "engine_log_max: {} is too small (at least 128KiB)",
                Bytes(engine_log.max_bytes)
            )));
        }
        if engine_log.rate == 0 {
            return Err(SettingsError::Invalid(
                "engine_log_rate: must be greater than 0".into(),
            ));
        }
        Ok(Settings {
            tls,
            scheduler: pick!(scheduler).unwrap_or_else(|| "127.0.0.1:7400".into()),
            node_id,
            state_dir: pick!(state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/dormant")),
            advertise: pick!(advertise).ok_or(SettingsError::Missing {
                field: "advertise",
                flag: "advertise",
            })?,
            listen_host: pick!(listen_host).unwrap_or(IpAddr::from([0, 0, 0, 0])),
            ports,
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            cgroup_driver: pick!(cgroup_driver).unwrap_or_default(),
            cgroup_root: pick!(cgroup_root).unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            cgroup_parent: pick!(cgroup_parent).unwrap_or_else(|| PathBuf::from("dormant/tenants")),
            tenant_uids: match pick!(tenant_uids) {
                Some(range) => parse_uids(&range)?,
                None => (200_000, 299_999),
            },
            postgres_bin_dir: pick!(postgres_bin_dir),
            redis_server: pick!(redis_server),
            engines: pick!(engines).unwrap_or_default(),
            reserve_memory: bytes("reserve_memory", pick!(reserve_memory), 512 << 20)?,
            reserve_storage: bytes("reserve_storage", pick!(reserve_storage), 1 << 30)?,
            pids_max,
            max_clients_per_tenant,
            labels: pick!(labels).unwrap_or_default(),
            engine_log,
            stop_tenants_on_exit: pick!(stop_tenants_on_exit).unwrap_or(false),
            metrics_listen: pick!(metrics_listen),
            tenant_tls,
            tenant_plaintext,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn base() -> FileConfig {
        FileConfig {
            node_id: Some("n1".into()),
            advertise: Some("127.0.0.1".into()),
            insecure: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml");
        let file: FileConfig = dormant_common::config::load(&path).unwrap();
        let settings = Settings::merge(FileConfig::default(), file).unwrap();
        assert_eq!(settings.node_id.as_str(), "host-a");
        assert_eq!(settings.ports, (20000, 20999));
        assert!(!settings.stop_tenants_on_exit);
    }

    #[test]
    fn ports_parse_and_bad_ranges_are_named() {
        assert_eq!(parse_ports("20000-20099").unwrap(), (20000, 20099));
        for bad in ["20000", "b-c", "0-10", "10-5", "1-70000"] {
            let err = parse_ports(bad).unwrap_err().to_string();
            assert!(err.starts_with("ports:"), "{bad}: {err}");
        }
    }

    #[test]
    fn tenant_uids_must_be_an_unprivileged_range() {
        assert_eq!(parse_uids("200000-299999").unwrap(), (200000, 299999));
        for bad in ["0-10", "999-2000", "5000-4000", "x-y", "5000"] {
            let err = parse_uids(bad).unwrap_err().to_string();
            assert!(err.starts_with("tenant_uids:"), "{bad}: {err}");
        }
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig =
            toml::from_str("node_id = \"file\"\nadvertise = \"h\"\nports = \"100-200\"\n").unwrap();
        let cli = FileConfig {
            node_id: Some("flag".into()),
            insecure: Some(true),
            ..Default::default()
        };
        let s = Settings::merge(cli, file).unwrap();
        assert_eq!(s.node_id.as_str(), "flag");
        assert_eq!(s.ports, (100, 200));
    }

    #[test]
    fn tls_files_are_required_unless_insecure() {
        let cli = FileConfig {
            insecure: None,
            ..base()
        };
        let err = Settings::merge(cli.clone(), FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("ca: required for TLS"), "{err}");
        let file: FileConfig =
            toml::from_str("ca = \"/c\"\ncert = \"/n.pem\"\nkey = \"/n.key\"\n").unwrap();
        let s = Settings::merge(cli, file).unwrap();
        assert_eq!(s.tls.unwrap().key, PathBuf::from("/n.key"));
    }

    #[test]
    fn bad_node_id_and_reserve_are_named() {
        let mut cli = base();
        cli.node_id = Some("Bad Name".into());
        let err = Settings::merge(cli, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("node_id:"), "{err}");
        let mut cli = base();
        cli.reserve_memory = Some("lots".into());
        let err = Settings::merge(cli, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("reserve_memory:"), "{err}");
    }

    #[test]
    fn engine_log_limits_default_parse_and_refuse_nonsense() {
        let s = Settings::merge(base(), FileConfig::default()).unwrap();
        assert_eq!(s.engine_log, crate::engine_log::LogLimits::default());
        let mut cli = base();
        cli.engine_log_max = Some("2MiB".into());
        cli.engine_log_rate = Some("64KiB".into());
        let s = Settings::merge(cli, FileConfig::default()).unwrap();
        assert_eq!(s.engine_log.max_bytes, 2 << 20);
        assert_eq!(s.engine_log.rate, 64 << 10);
        for (max, rate, field) in [
            ("1KiB", "1MiB", "engine_log_max:"),
            ("lots", "1MiB", "engine_log_max:"),
            ("8MiB", "0", "engine_log_rate:"),
        ] {
            let mut cli = base();
            cli.engine_log_max = Some(max.into());
            cli.engine_log_rate = Some(rate.into());
            let err = Settings::merge(cli, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }
}

//! The scheduler's settings: a TOML file (`--config`), with command-line flags taking precedence.

use std::net::SocketAddr;
use std::path::PathBuf;

use dormant_common::tls::{TlsError, TlsFiles};
use serde::Deserialize;

use crate::placement::Policy;

/// The TOML file; every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub id: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub bootstrap: Option<bool>,
    pub overcommit_ratio: Option<f64>,
    pub placement: Option<Policy>,
    /// A node silent this long is marked down (its tenants lost).
    pub node_grace_period_ms: Option<u64>,
    /// Build a snapshot (and compact the log) every this many applied entries.
    pub snapshot_every: Option<u64>,
    pub log_format: Option<dormant_common::telemetry::LogFormat>,
    /// The cluster's CA, this replica's certificate (`dormant://replica/<id>`, with the DNS
    /// names or addresses it is reached at) and its key, PEM.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Plaintext gRPC, no certificates, no identities: for trying things out only.
    pub insecure: Option<bool>,
    /// Free space the data disk keeps: writes are refused below it ("256MiB", the default).
    pub disk_reserve: Option<String>,
    /// Where to serve Prometheus metrics over plain HTTP (`GET /metrics`); none by default.
    pub metrics_listen: Option<SocketAddr>,
}

/// 256 MiB: room for about a hundred thousand log entries past the point writes stop.
pub const DEFAULT_DISK_RESERVE: u64 = 256 << 20;

/// The settings the scheduler runs with, after merging and validation.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's Raft node id; never reused for another replica.
    pub id: u64,
    pub listen: SocketAddr,
    /// Address peers, agents and forwarded clients use to reach this replica.
    pub advertise: String,
    pub data_dir: PathBuf,
    /// Initialise a new single-member cluster if the store is empty.
    pub bootstrap: bool,
    pub overcommit_ratio: f64,
    pub placement: Policy,
    pub node_grace_period: std::time::Duration,
    pub snapshot_every: u64,
    /// Mutual TLS files; `None` only with `insecure = true`.
    pub tls: Option<TlsFiles>,
    /// Writes are refused while the data disk has less free space than this.
    pub disk_reserve: dormant_common::Bytes,
    /// `GET /metrics` over plain HTTP here, if set.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{field}: required (flag --{flag} or key {field} in the config file)")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
    #[error("id: must be greater than 0")]
    ZeroId,
    #[error("overcommit_ratio: {0} must be a number of at least 1.0")]
    Overcommit(f64),
    #[error(
        "node_grace_period_ms: {0} must be at least 1000 (heartbeats come every second or two)"
    )]
    GracePeriod(u64),
    #[error("snapshot_every: {0} must be at least 10 entries")]
    SnapshotEvery(u64),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    DiskReserve(#[from] dormant_common::QuantityError),
}

impl Settings {
    /// Merges flags (`cli`) over the file (`file`) and checks the result.
    pub fn merge(cli: FileConfig, file: FileConfig) -> Result<Self, SettingsError> {
        let id = cli.id.or(file.id).ok_or(SettingsError::Missing {
            field: "id",
            flag: "id",
        })?;
        if id == 0 {
            return Err(SettingsError::ZeroId);
        }
        let listen = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7400)));
        let data_dir = cli
            .data_dir
            .or(file.data_dir)
            .ok_or(SettingsError::Missing {
                field: "data_dir",
                flag: "data-dir",
            })?;
        let overcommit_ratio = cli
            .overcommit_ratio
            .or(file.overcommit_ratio)
            .unwrap_or(1.0);
        if !(overcommit_ratio.is_finite() && overcommit_ratio >= 1.0) {
            return Err(SettingsError::Overcommit(overcommit_ratio));
        }
        let grace_ms = cli
            .node_grace_period_ms
            .or(file.node_grace_period_ms)
            .unwrap_or(10_000);
        if grace_ms < 1000 {
            return Err(SettingsError::GracePeriod(grace_ms));
        }
        let snapshot_every = cli.snapshot_every.or(file.snapshot_every).unwrap_or(5000);
        if snapshot_every < 10 {
            return Err(SettingsError::SnapshotEvery(snapshot_every));
        }
        let tls = TlsFiles::resolve(
            cli.insecure.or(file.insecure).unwrap_or(false),
            cli.ca.or(file.ca),
            cli.cert.or(file.cert),
            cli.key.or(file.key),
        )?;
        let disk_reserve = match cli.disk_reserve.or(file.disk_reserve) {
            Some(text) => dormant_common::Bytes::parse("disk_reserve", &text)?,
            None => dormant_common::Bytes(DEFAULT_DISK_RESERVE),
        };
        Ok(Settings {
            tls,
            disk_reserve,
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            node_grace_period: std::time::Duration::from_millis(grace_ms),
            snapshot_every,
            id,
            listen,
            advertise: cli
                .advertise
                .or(file.advertise)
                .unwrap_or_else(|| listen.to_string()),
            data_dir,
            bootstrap: cli.bootstrap.or(file.bootstrap).unwrap_or(false),
            overcommit_ratio,
            placement: cli.placement.or(file.placement).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/scheduler.toml");
        let file: FileConfig = dormant_common::config::load(&path).unwrap();
        let settings = Settings::merge(FileConfig::default(), file).unwrap();
        assert_eq!(settings.id, 1);
        assert_eq!(settings.placement, crate::placement::Policy::BinPack);
    }

    #[test]
    fn flags_override_file_and_missing_fields_are_named() {
        let file: FileConfig =
            toml::from_str("id = 3\ndata_dir = \"/var/lib/x\"\nplacement = \"spread\"\n").unwrap();
        let cli = FileConfig {
            id: Some(7),
            insecure: Some(true),
            ..Default::default()
        };
        let s = Settings::merge(cli, file).unwrap();
        assert_eq!(s.id, 7);
        assert_eq!(s.placement, Policy::Spread);
        assert_eq!(s.advertise, "127.0.0.1:7400");
        let err = Settings::merge(FileConfig::default(), FileConfig::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "id: required (flag --id or key id in the config file)"
        );
    }

    #[test]
    fn overcommit_below_one_is_refused() {
        let cli = FileConfig {
            id: Some(1),
            data_dir: Some("/x".into()),
            overcommit_ratio: Some(0.5),
            insecure: Some(true),
            ..Default::default()
        };
        let err = Settings::merge(cli, FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("overcommit_ratio:"), "{err}");
    }

    #[test]
    fn tls_files_are_required_unless_insecure() {
        let cli = FileConfig {
            id: Some(1),
            data_dir: Some("/x".into()),
            ..Default::default()
        };
        let err = Settings::merge(cli.clone(), FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("ca: required for TLS"), "{err}");
        let file: FileConfig =
            toml::from_str("ca = \"/c\"\ncert = \"/r.pem\"\nkey = \"/r.key\"\n").unwrap();
        let s = Settings::merge(cli.clone(), file).unwrap();
        assert_eq!(s.tls.unwrap().cert, PathBuf::from("/r.pem"));
        let insecure = FileConfig {
            insecure: Some(true),
            ..cli
        };
        assert_eq!(
            Settings::merge(insecure, FileConfig::default())
                .unwrap()
                .tls,
            None
        );
    }

    #[test]
    fn disk_reserve_is_a_size_named_in_its_refusal() {
        let cli = |reserve: Option<&str>| FileConfig {
            id: Some(1),
            data_dir: Some("/x".into()),
            insecure: Some(true),
            disk_reserve: reserve.map(str::to_string),
            ..Default::default()
        };
        let s = Settings::merge(cli(None), FileConfig::default()).unwrap();
        assert_eq!(s.disk_reserve.0, DEFAULT_DISK_RESERVE);
        let s = Settings::merge(cli(Some("4MiB")), FileConfig::default()).unwrap();
        assert_eq!(s.disk_reserve.0, 4 << 20);
        let err = Settings::merge(cli(Some("lots")), FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("disk_reserve:"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = toml::from_str::<FileConfig>("idd = 1\n").unwrap_err();
        assert!(err.to_string().contains("idd"), "{err}");
    }
}

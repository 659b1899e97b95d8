//! The tenant's record on disk (`tenants/<name>/tenant.json`, root-only: it holds the password):
//! what the scheduler asked for, plus the intent of an operation under way. Every step that
//! changes the host writes its intent here first, so an agent started after a crash at any point
//! knows what to finish: a record says "this tenant exists with these resources" before anything
//! of it is created, and "this tenant is being deleted" before anything of it is removed.
//!
//! Records written by agents before the intent existed read with `deleting = false` and restart
//! generation 0; the format only ever gains fields with defaults.

use std::path::Path;

use dormant_common::{Resources, TenantName};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::host::{Host, TenantPaths};
use crate::tenant_fs;

/// What the scheduler wants this host to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSpec {
    pub name: TenantName,
    pub uid: u64,
    pub engine: String,
    pub resources: Resources,
    pub port: u16,
    pub password: String,
    /// Raised by `dormantctl tenant restart`; the engine restarts once for each new value.
    #[serde(default)]
    pub restart_generation: u64,
}

/// The record: the spec as last applied, and the operation under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    #[serde(flatten)]
    pub spec: TenantSpec,
    /// A delete has begun: whatever the agent finds at start, it finishes removing the tenant
    /// and never starts its engine again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

impl TenantRecord {
    pub fn new(spec: TenantSpec) -> Self {
        Self {
            spec,
            deleting: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("tenant record {path}: {source}")]
pub struct RecordError {
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

/// Writes the record durably (temp file, fsync, rename, fsync the directory).
pub fn write(paths: &TenantPaths, record: &TenantRecord) -> Result<(), RecordError> {
    let path = paths.record();
    let bytes = serde_json::to_vec(record).map_err(|e| RecordError {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    tenant_fs::write_atomic(&path, &bytes).map_err(|source| RecordError { path, source })
}

/// Reads one tenant directory's record; `None` when there is none (a directory left by a crash
/// before its record was written) or it cannot be read (logged).
pub fn read(dir: &Path) -> Option<TenantRecord> {
    let path = dir.join("tenant.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable tenant record");
            return None;
        }
    };
    match serde_json::from_slice::<TenantRecord>(&bytes) {
        Ok(record) if dir.file_name() == Some(record.spec.name.as_str().as_ref()) => Some(record),
        Ok(record) => {
            warn!(path = %path.display(), name = %record.spec.name, "tenant record names another tenant; ignored");
            None
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable tenant record");
            None
        }
    }
}

/// The tenant records on this host, as an earlier agent run left them.
pub fn load_all(host: &Host) -> Vec<TenantRecord> {
    let Ok(entries) = std::fs::read_dir(host.tenants_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        // `.trash` and temporary names are the agent's own, never a tenant (names start with a
        // letter).
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| read(&e.path()))
        .collect()
}

/// A tenant spec for unit tests: half a core, 512 MiB, 1 GiB, PostgreSQL.
#[cfg(test)]
pub(crate) fn sample_spec(name: &str, uid: u64) -> TenantSpec {
    use dormant_common::{Bytes, MilliCpu};
    TenantSpec {
        name: TenantName::parse(name).expect("a valid test name"),
        uid,
        engine: "postgres".into(),
        resources: Resources {
            cpu: MilliCpu(500),
            memory: Bytes(1 << 29),
            storage: Bytes(1 << 30),
        },
        port: 20000,
        password: "pw".into(),
        restart_generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TenantSpec {
        sample_spec("acme", 7)
    }

    /// A record as the agent before intents wrote it (a bare spec) still reads.
    #[test]
    fn a_record_of_the_previous_format_reads_with_no_intent() {
        let old = r#"{"name":"acme","uid":7,"engine":"postgres","resources":{"cpu":500,"memory":536870912,"storage":1073741824},"port":20000,"password":"pw"}"#;
        let dir = tempfile::tempdir().unwrap();
        let tenant = dir.path().join("acme");
        std::fs::create_dir(&tenant).unwrap();
        std::fs::write(tenant.join("tenant.json"), old).unwrap();
        let record = read(&tenant).expect("old record");
        assert_eq!(record, TenantRecord::new(spec()));
    }

    #[test]
    fn the_delete_intent_round_trips_and_a_foreign_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = dir.path().join("acme");
        std::fs::create_dir(&tenant).unwrap();
        let mut record = TenantRecord::new(spec());
        record.deleting = true;
        std::fs::write(
            tenant.join("tenant.json"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        assert_eq!(read(&tenant), Some(record.clone()));
        // The same record in another tenant's directory is not that tenant's.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(
            other.join("tenant.json"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        assert_eq!(read(&other), None);
    }
}

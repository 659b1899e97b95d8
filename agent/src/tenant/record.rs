//! The tenant's record on disk (`tenants/<name>/tenant.json`, root-only: it holds the password):
//! what the scheduler asked for, plus the intent of an operation under way. Every step that
//! changes the host writes its intent here first, so an agent started after a crash at any point
//! knows what to finish: a record says "this tenant exists with these resources" before anything
//! of it is created, and "this tenant is being deleted" before anything of it is removed.
//!
//! Records written by agents before the intent existed read with `deleting = false` and restart
//! generation 0; the format only ever gains fields with defaults.

use std::path::Path;

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{Resources, TenantName, TenantUid};
use serde::{Deserialize, Serialize};

use crate::host::{Host, TenantPaths};
use crate::tenant_fs;

/// A tenant as the scheduler assigned it to this host: what to run, with the port, password
/// and generations placement gave it. (The scheduler's own `TenantSpec` is what an operator
/// asks for, before placement.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantAssignment {
    pub name: TenantName,
    pub uid: TenantUid,
    pub engine: String,
    pub resources: Resources,
    pub port: u16,
    pub password: String,
    /// Raised by `dormantctl tenant restart`; the engine restarts once for each new value.
    #[serde(default)]
    pub restart_generation: u64,
    /// Hibernate after this long without an open connection.
    #[serde(default)]
    pub idle_after: IdleAfter,
    #[serde(default)]
    pub hibernate: HibernateMode,
    /// Raised by `dormantctl tenant hibernate` / `tenant wake`: acted on once for each new value.
    #[serde(default)]
    pub hibernate_generation: u64,
    #[serde(default)]
    pub wake_generation: u64,
}

/// The record: the spec as last applied, and the operation under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    #[serde(flatten)]
    pub spec: TenantAssignment,
    /// A delete has begun: whatever the agent finds at start, it finishes removing the tenant
    /// and never starts its engine again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// A restart has begun (`spec.restart_generation` is the one asked for): the engine with this
    /// pid is being replaced. An agent started after a crash that still finds that engine
    /// finishes the restart; one that finds another knows it is done. Never two restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting_from: Option<i32>,
    /// The tenant hibernates (written before its engine stops or freezes): an agent started
    /// later keeps it hibernated instead of starting its engine, and keeps a frozen engine frozen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hibernated: bool,
}

impl TenantRecord {
    pub fn new(spec: TenantAssignment) -> Self {
        Self {
            spec,
            deleting: false,
            restarting_from: None,
            hibernated: false,
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
    tenant_fs::write_atomic_if_changed(&path, &bytes).map_err(|source| RecordError { path, source })
}

/// What one tenant directory holds.
#[derive(Debug)]
pub enum Found {
    Record(TenantRecord),
    /// No record: a directory left by a crash before its record was written (or by an agent of
    /// an older version, which wrote it later).
    Missing,
    /// A record that cannot be read or is not this directory's: the tenant is kept as it is and
    /// left alone (never resumed, never swept) until an operator looks.
    Unreadable(String),
}

/// Reads one tenant directory's record.
pub fn read(dir: &Path) -> Found {
    let path = dir.join("tenant.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Missing,
        Err(e) => return Found::Unreadable(format!("{}: {e}", path.display())),
    };
    match serde_json::from_slice::<TenantRecord>(&bytes) {
        Ok(record) if dir.file_name() == Some(record.spec.name.as_str().as_ref()) => {
            Found::Record(record)
        }
        Ok(record) => Found::Unreadable(format!(
            "{}: names tenant {}, not this directory's",
            path.display(),
            record.spec.name
        )),
        Err(e) => Found::Unreadable(format!("{}: {e}", path.display())),
    }
}

/// The tenant directories an earlier agent run left, by what they hold.
#[derive(Debug, Default)]
pub struct OnDisk {
    pub records: Vec<TenantRecord>,
    /// Directory names whose record cannot be read: kept, not resumed (logged).
    pub quarantined: Vec<String>,
    /// Directory names without a record.
    pub unrecorded: Vec<String>,
}

/// Reads every tenant directory. A `tenants` directory that cannot be listed stops the agent:
/// going on would treat every tenant as unknown.
pub fn load_all(host: &Host) -> Result<OnDisk, RecordError> {
    let dir = host.tenants_dir();
    let fail = |source| RecordError {
        path: dir.clone(),
        source,
    };
    let mut found = OnDisk::default();
    for entry in std::fs::read_dir(&dir).map_err(fail)? {
        let entry = entry.map_err(fail)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // `.trash` and temporary names are the agent's own, never a tenant (names start with a
        // letter).
        if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match read(&entry.path()) {
            Found::Record(record) => found.records.push(record),
            Found::Missing => found.unrecorded.push(name),
            Found::Unreadable(why) => {
                tracing::error!(tenant_dir = %entry.path().display(), why, "tenant record unreadable: the tenant is left as it is (not resumed, nothing removed) until an operator repairs or removes its directory");
                found.quarantined.push(name);
            }
        }
    }
    Ok(found)
}

/// A tenant spec for unit tests: half a core, 512 MiB, 1 GiB, PostgreSQL.
#[cfg(test)]
pub(crate) fn sample_spec(name: &str, uid: TenantUid) -> TenantAssignment {
    use dormant_common::{Bytes, MilliCpu};
    TenantAssignment {
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
        idle_after: Default::default(),
        hibernate: Default::default(),
        hibernate_generation: 0,
        wake_generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TenantAssignment {
        sample_spec("acme", TenantUid::new(7))
    }

    /// A record as the agent before intents wrote it (a bare spec) still reads.
    #[test]
    fn a_record_of_the_previous_format_reads_with_no_intent() {
        let old = r#"{"name":"acme","uid":7,"engine":"postgres","resources":{"cpu":500,"memory":536870912,"storage":1073741824},"port":20000,"password":"pw"}"#;
        let dir = tempfile::tempdir().unwrap();
        let tenant = dir.path().join("acme");
        std::fs::create_dir(&tenant).unwrap();
        std::fs::write(tenant.join("tenant.json"), old).unwrap();
        let Found::Record(record) = read(&tenant) else {
            panic!("old record unreadable");
        };
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
        assert!(matches!(read(&tenant), Found::Record(r) if r == record));
        // The same record in another tenant's directory is not that tenant's.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(
            other.join("tenant.json"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        assert!(matches!(read(&other), Found::Unreadable(_)));
        // Damage is not absence: an unreadable record is never taken for a missing one.
        std::fs::write(other.join("tenant.json"), b"{not json").unwrap();
        assert!(matches!(read(&other), Found::Unreadable(_)));
        std::fs::remove_file(other.join("tenant.json")).unwrap();
        assert!(matches!(read(&other), Found::Missing));
    }
}

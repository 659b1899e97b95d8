//! The scheduler's durable storage on sled: the Raft log and vote (`log`), the state machine and its
//! snapshots (`state_machine`, `snapshot`). Everything openraft is told is durable has been flushed.

mod keys;
mod log;
mod snapshot;
mod state_machine;

use std::path::Path;

pub use log::LogStore;
pub use state_machine::{SharedState, StateMachineStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store tree {tree}: {source}")]
    Tree {
        tree: &'static str,
        source: sled::Error,
    },
    #[error("read snapshot: {0}")]
    Snapshot(String),
}

/// Opens (or creates) the store under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let db = sled::Config::new()
        .path(dir)
        .open()
        .map_err(|source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        })?;
    let tree = |name: &'static str| {
        db.open_tree(name)
            .map_err(|source| StoreError::Tree { tree: name, source })
    };
    let log = LogStore::new(tree(keys::LOGS_TREE)?, tree(keys::META_TREE)?);
    let sm = StateMachineStore::open(tree(keys::SNAPSHOT_TREE)?)?;
    Ok((log, sm))
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::*;
    use crate::TypeConfig;

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
            let dir = tempfile::tempdir().expect("tempdir");
            let (log, sm) = open(dir.path()).expect("open store");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage conformance suite against our sled store.
    #[test]
    fn openraft_storage_suite_passes() {
        Suite::test_all(SledBuilder).expect("storage suite");
    }
}

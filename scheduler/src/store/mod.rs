//! The scheduler's durable storage on sled: the Raft log and vote (`log`), the state machine and its
//! snapshots (`state_machine`, `snapshot`). Everything openraft is told is durable has been flushed.

mod keys;
mod log;
mod snapshot;
mod state_machine;

use std::path::Path;

pub use log::LogStore;
pub use state_machine::{SharedState, StateMachineData, StateMachineStore};

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

    /// A store as an older version left it, every value in JSON (the snapshot's state an array
    /// of numbers), opens: the snapshot's state, the vote and the log entries read back, and
    /// what is written from then on is in the current format.
    #[tokio::test]
    async fn a_store_written_in_json_by_an_older_version_opens() {
        use openraft::storage::{RaftLogStorage, RaftStateMachine};
        use openraft::{
            CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, SnapshotMeta,
            StoredMembership, Vote,
        };

        use crate::state::test_utils::{node, res};
        use crate::state::Command;

        let dir = tempfile::tempdir().unwrap();
        let log_id = |index| LogId::new(CommittedLeaderId::new(3, 1), index);
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let mut data = state_machine::StateMachineData {
                last_applied: Some(log_id(5)),
                ..Default::default()
            };
            data.cluster
                .apply(4, Command::RegisterNode(node("a", res(1000, 1024, 10))))
                .unwrap();
            let snapshot = snapshot::StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: Some(log_id(5)),
                    last_membership: StoredMembership::new(None, Membership::new(vec![], None)),
                    snapshot_id: "old".into(),
                },
                data: serde_json::to_vec(&data).unwrap(),
            };
            let json = serde_json::to_vec(&snapshot).unwrap();
            assert!(json.starts_with(br#"{"meta""#) && json.windows(8).any(|w| w == b"\"data\":["));
            db.open_tree(keys::SNAPSHOT_TREE)
                .unwrap()
                .insert(<keys::CurrentSnapshotKey as keys::MetaKey>::KEY, json)
                .unwrap();
            let meta = db.open_tree(keys::META_TREE).unwrap();
            let vote = Vote::new_committed(3, 1);
            meta.insert(
                <keys::VoteKey as keys::MetaKey>::KEY,
                serde_json::to_vec(&vote).unwrap(),
            )
            .unwrap();
            let entry = Entry::<TypeConfig> {
                log_id: log_id(6),
                payload: EntryPayload::Normal(Command::RegisterNode(node(
                    "b",
                    res(2000, 2048, 20),
                ))),
            };
            db.open_tree(keys::LOGS_TREE)
                .unwrap()
                .insert(keys::log_key(6), serde_json::to_vec(&entry).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        // sled's flusher thread may hold the directory's lock a moment after the handle above
        // is dropped (a restarted process never meets this): retry the open briefly.
        let mut reopened = open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            reopened = open(dir.path());
        }
        let (mut log, mut sm) = reopened.expect("open the older store");
        let applied = sm.applied_state().await.unwrap().0;
        assert_eq!(applied, Some(log_id(5)));
        assert!(sm
            .shared()
            .read()
            .cluster
            .nodes
            .contains_key(&dormant_common::NodeName::parse("a").unwrap()));
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 1))
        );
        let entries = log.try_get_log_entries(6..7).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert!(matches!(
            &entries[0].payload,
            EntryPayload::Normal(Command::RegisterNode(n)) if n.id.as_str() == "b"
        ));
        // Written from now on: the current format, read back alike.
        log.save_vote(&Vote::new_committed(4, 1)).await.unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(4, 1))
        );
        let snap = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("the old snapshot");
        assert_eq!(snap.meta.snapshot_id, "old");
    }

    /// openraft's own storage conformance suite against our sled store.
    #[test]
    fn openraft_storage_suite_passes() {
        Suite::test_all(SledBuilder).expect("storage suite");
    }
}

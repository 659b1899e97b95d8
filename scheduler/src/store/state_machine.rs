//! The state machine: the cluster state in memory, rebuilt at start from the last snapshot plus
//! the committed log (openraft re-applies it). Snapshots are written to sled and flushed before
//! openraft is told about them. A snapshot never replaces a newer one: openraft 0.9 builds
//! snapshots in a task of its own, so one built from older state can finish after a newer one
//! from the leader was installed.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::keys::{CurrentSnapshotKey, MetaKey};
use super::snapshot::StoredSnapshot;
use super::StoreError;
use crate::state::{ApplyResult, ClusterState, Command, Outcome};
use crate::{codec, TypeConfig};

type StoreResult<T> = Result<T, StorageError<u64>>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateMachineData {
    pub last_applied: Option<LogId<u64>>,
    pub last_membership: StoredMembership<u64, BasicNode>,
    /// Every replica id that was ever in a membership: ids are never reused, even after removal.
    #[serde(default)]
    pub member_ids_ever: BTreeSet<u64>,
    pub cluster: ClusterState,
}

impl StateMachineData {
    /// Counts the members of the last membership as ever used (a snapshot written before ids
    /// were tracked has none).
    fn remember_members(&mut self) {
        let ids: Vec<u64> = self
            .last_membership
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        self.member_ids_ever.extend(ids);
    }
}

/// The applied state, shared with the gRPC services for reads.
#[derive(Debug, Clone, Default)]
pub struct SharedState(Arc<RwLock<StateMachineData>>);

impl SharedState {
    pub fn read(&self) -> RwLockReadGuard<'_, StateMachineData> {
        // A panic while holding the lock leaves consistent data (apply mutates through one call).
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, StateMachineData> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone)]
pub struct StateMachineStore {
    data: SharedState,
    snapshots: sled::Tree,
    snapshot_seq: Arc<AtomicU64>,
    /// What the stored snapshot covers; held while a snapshot is compared and stored.
    stored_covers: Arc<Mutex<Option<LogId<u64>>>>,
    /// The stored snapshot's size, for `/metrics`.
    stored_bytes: Arc<AtomicU64>,
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn snap_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, AnyError::new(&e)).into()
}

impl StateMachineStore {
    pub(super) fn open(snapshots: sled::Tree) -> Result<Self, StoreError> {
        let store = Self {
            data: SharedState::default(),
            snapshots,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            stored_covers: Arc::new(Mutex::new(None)),
            stored_bytes: Arc::new(AtomicU64::new(0)),
        };
        let current = store
            .load_snapshot()
            .map_err(|e| StoreError::Snapshot(e.to_string()))?;
        if let Some(snap) = current {
            *store.covers() = snap.meta.last_log_id;
            let mut data: StateMachineData =
                codec::decode(&snap.data).map_err(|e| StoreError::Snapshot(e.to_string()))?;
            data.remember_members();
            *store.data.write() = data;
        }
        Ok(store)
    }

    pub fn shared(&self) -> SharedState {
        self.data.clone()
    }

    /// The stored snapshot's size in bytes, kept up to date as snapshots are stored.
    pub fn snapshot_size(&self) -> Arc<AtomicU64> {
        self.stored_bytes.clone()
    }

    fn load_snapshot(&self) -> StoreResult<Option<StoredSnapshot>> {
        let Some(bytes) = self
            .snapshots
            .get(CurrentSnapshotKey::KEY)
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        self.stored_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        codec::decode(&bytes)
            .map(Some)
            .map_err(|e| snap_err(ErrorVerb::Read, e))
    }

    fn covers(&self) -> std::sync::MutexGuard<'_, Option<LogId<u64>>> {
        self.stored_covers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `snap` unless the stored snapshot covers more of the log; true if stored.
    async fn save_snapshot(&self, snap: &StoredSnapshot) -> StoreResult<bool> {
        let bytes = codec::encode(snap).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        {
            let mut covers = self.covers();
            if *covers > snap.meta.last_log_id {
                tracing::info!(
                    kept = ?covers.map(|l| l.index),
                    dropped = ?snap.meta.last_log_id.map(|l| l.index),
                    "a snapshot built from older state finished after a newer one: kept the newer"
                );
                return Ok(false);
            }
            let size = bytes.len() as u64;
            self.snapshots
                .insert(CurrentSnapshotKey::KEY, bytes)
                .map_err(|e| snap_err(ErrorVerb::Write, e))?;
            *covers = snap.meta.last_log_id;
            self.stored_bytes.store(size, Ordering::Relaxed);
        }
        self.snapshots
            .flush_async()
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(true)
    }

    /// The applied state, serialized, with the metadata of a snapshot of it.
    fn capture(&self) -> StoreResult<StoredSnapshot> {
        let (data, last_applied, membership) = {
            let sm = self.data.read();
            let bytes = codec::encode(&*sm).map_err(|e| sm_err(ErrorVerb::Read, e))?;
            (bytes, sm.last_applied, sm.last_membership.clone())
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("--{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        Ok(StoredSnapshot { meta, data })
    }
}

/// Applies one command of the entry `log_id`; a batch command by command, each as if alone.
fn apply_command(sm: &mut StateMachineData, log_id: LogId<u64>, command: Command) -> ApplyResult {
    match command {
        Command::Batch(commands) => Ok(Outcome::Batch(
            commands
                .into_iter()
                .map(|command| apply_command(sm, log_id, command))
                .collect(),
        )),
        Command::SetNodeStatus {
            node,
            decided_in_term: Some(term),
            ..
        } if term != log_id.leader_id.term => {
            tracing::info!(
                node_id = %node,
                decided_in_term = term,
                entry_term = log_id.leader_id.term,
                "dropped a node status decided under an earlier term"
            );
            Ok(Outcome::Nothing)
        }
        command => {
            let before = crate::transitions::Before::note(&sm.cluster, &command);
            let applied = sm.cluster.apply(log_id.index, command);
            before.log_changes(&sm.cluster, log_id.index);
            applied
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let built = self.capture()?;
        self.save_snapshot(&built).await?;
        Ok(Snapshot {
            meta: built.meta,
            snapshot: Box::new(Cursor::new(built.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let sm = self.data.read();
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut sm = self.data.write();
        let mut results = Vec::new();
        for entry in entries {
            sm.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Nothing),
                EntryPayload::Normal(command) => apply_command(&mut sm, entry.log_id, command),
                EntryPayload::Membership(m) => {
                    let ids: Vec<u64> = m.nodes().map(|(id, _)| *id).collect();
                    sm.member_ids_ever.extend(ids);
                    sm.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Outcome::Nothing)
                }
            };
            results.push(result);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let bytes = snapshot.into_inner();
        let mut data: StateMachineData =
            codec::decode(&bytes).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        data.last_membership = meta.last_membership.clone();
        data.remember_members();
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        })
        .await?;
        let mut sm = self.data.write();
        *sm = data;
        // The snapshot's metadata is authoritative for what it covers.
        sm.last_applied = meta.last_log_id;
        sm.last_membership = meta.last_membership.clone();
        tracing::info!(snapshot = %meta.snapshot_id, last_log = ?meta.last_log_id.map(|l| l.index), "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.load_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;

    fn log_id(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// A store on `dir` that has applied entries 1..=`applied` (blank ones).
    async fn store_applied_to(dir: &std::path::Path, applied: u64) -> StateMachineStore {
        let (_log, mut sm) = super::super::open(dir).expect("open store");
        let entries = (1..=applied).map(|i| Entry::<TypeConfig> {
            log_id: log_id(i),
            payload: EntryPayload::Blank,
        });
        sm.apply(entries).await.expect("apply");
        sm
    }

    /// A snapshot of another replica's state that covers the log up to `index`.
    fn leader_snapshot(index: u64) -> (SnapshotMeta<u64, BasicNode>, Box<Cursor<Vec<u8>>>) {
        let data = StateMachineData {
            last_applied: Some(log_id(index)),
            ..Default::default()
        };
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(index)),
            last_membership: StoredMembership::new(None, Membership::new(vec![], None)),
            snapshot_id: format!("leader-{index}"),
        };
        let bytes = codec::encode(&data).unwrap();
        (meta, Box::new(Cursor::new(bytes)))
    }

    /// What a store reopened on `dir` (a restart) has applied.
    async fn applied_after_restart(dir: &std::path::Path) -> Option<u64> {
        // The closed store's tasks (the log's flusher) may hold sled's lock a moment longer: a
        // restarted process never meets this, a test reopening at once can.
        let mut reopened = super::super::open(dir);
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            reopened = super::super::open(dir);
        }
        let (_log, mut sm) = reopened.expect("reopen store");
        let stored = sm.get_current_snapshot().await.unwrap().map(|s| s.meta);
        assert_eq!(
            stored.as_ref().and_then(|m| m.last_log_id),
            sm.applied_state().await.unwrap().0,
            "the state loaded is the stored snapshot's"
        );
        stored.and_then(|m| m.last_log_id).map(|l| l.index)
    }

    #[tokio::test]
    async fn a_node_status_decided_under_another_term_is_dropped_at_apply() {
        use crate::state::test_utils::{node, res};
        use dormant_common::{NodeName, NodeStatus};
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = super::super::open(dir.path()).unwrap();
        let entry = |term: u64, index: u64, command: Command| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(command),
        };
        let a = NodeName::parse("a").unwrap();
        let down = |decided_in_term| Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Down,
            decided_in_term,
        };
        let status = |sm: &StateMachineStore| sm.shared().read().cluster.nodes[&a].status;
        sm.apply([
            entry(2, 1, Command::RegisterNode(node("a", res(1000, 1024, 10)))),
            // Decided in term 1, proposed after a re-election: dropped.
            entry(2, 2, down(Some(1))),
        ])
        .await
        .unwrap();
        assert_eq!(status(&sm), NodeStatus::Ready);
        // Decided in the entry's own term, or written before terms were carried: applied.
        sm.apply([entry(2, 3, down(Some(2)))]).await.unwrap();
        assert_eq!(status(&sm), NodeStatus::Down);
        sm.apply([entry(
            2,
            4,
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Ready,
                decided_in_term: None,
            },
        )])
        .await
        .unwrap();
        assert_eq!(status(&sm), NodeStatus::Ready);
    }

    #[tokio::test]
    async fn a_batch_applies_each_command_as_if_alone_with_its_own_result_and_uid() {
        use crate::state::test_utils::{node, res, spec};
        use dormant_common::{NodeName, NodeStatus};
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = super::super::open(dir.path()).unwrap();
        let a = NodeName::parse("a").unwrap();
        let entry = |term: u64, index: u64, command: Command| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(command),
        };
        let create = |name: &str| Command::CreateTenant {
            spec: spec(name, res(100, 64, 1)),
            password: "pw".into(),
            node: Some(NodeName::parse("a").unwrap()),
            pending_reason: None,
            overcommit: 1.0,
        };
        let results = sm
            .apply([
                entry(2, 1, Command::RegisterNode(node("a", res(1000, 1024, 10)))),
                entry(
                    2,
                    2,
                    Command::Batch(vec![
                        create("x"),
                        create("y"),
                        create("x"),
                        // Decided under an earlier term: dropped, in a batch as alone.
                        Command::SetNodeStatus {
                            node: a.clone(),
                            status: NodeStatus::Down,
                            decided_in_term: Some(1),
                        },
                        create("z"),
                    ]),
                ),
                entry(2, 3, create("w")),
            ])
            .await
            .unwrap();
        let Ok(Outcome::Batch(batch)) = &results[1] else {
            panic!("{:?}", results[1])
        };
        let uid = |r: &ApplyResult| match r {
            Ok(Outcome::Tenant(t)) => t.uid.get(),
            other => panic!("{other:?}"),
        };
        assert_eq!(batch.len(), 5);
        assert_eq!((uid(&batch[0]), uid(&batch[1])), (2, 3));
        assert!(matches!(&batch[2], Err(crate::state::ApplyError::TenantExists(n)) if n == "x"));
        assert_eq!(batch[3], Ok(Outcome::Nothing));
        assert_eq!(uid(&batch[4]), 4);
        // The next entry's index (3) was given in the batch: its tenant gets the next uid.
        assert_eq!(uid(&results[2]), 5);
        let state = sm.shared();
        let state = state.read();
        assert_eq!(state.cluster.nodes[&a].status, NodeStatus::Ready);
        let ports: std::collections::BTreeSet<_> =
            state.cluster.tenants.values().map(|t| t.port).collect();
        assert_eq!(
            ports.len(),
            4,
            "x, y, z and w each have a port of their own"
        );
        // Snapshots keep where uids go on.
        let restored: crate::state::ClusterState =
            codec::decode(&codec::encode(&state.cluster).unwrap()).unwrap();
        assert_eq!(restored, state.cluster);
    }

    #[tokio::test]
    async fn a_snapshot_built_from_older_state_never_replaces_a_newer_installed_one() {
        // Built (from state at 5), then a newer one (10) installed: the newer is kept.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = store_applied_to(dir.path(), 5).await;
            sm.build_snapshot().await.unwrap();
            let (meta, bytes) = leader_snapshot(10);
            sm.install_snapshot(&meta, bytes).await.unwrap();
        }
        assert_eq!(applied_after_restart(dir.path()).await, Some(10));

        // The other order: the build captured state at 5, the newer snapshot was installed
        // while it ran, and the build finished last. It must not replace the newer one.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = store_applied_to(dir.path(), 5).await;
            let captured = sm.capture().unwrap();
            let (meta, bytes) = leader_snapshot(10);
            sm.install_snapshot(&meta, bytes).await.unwrap();
            assert!(!sm.save_snapshot(&captured).await.unwrap());
        }
        assert_eq!(applied_after_restart(dir.path()).await, Some(10));

        // A newer build still replaces an older stored snapshot.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = store_applied_to(dir.path(), 5).await;
            sm.build_snapshot().await.unwrap();
            let more = (6..=8).map(|i| Entry::<TypeConfig> {
                log_id: log_id(i),
                payload: EntryPayload::Blank,
            });
            sm.apply(more).await.unwrap();
            sm.build_snapshot().await.unwrap();
        }
        assert_eq!(applied_after_restart(dir.path()).await, Some(8));
    }
}

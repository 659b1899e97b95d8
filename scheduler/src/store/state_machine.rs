//! The state machine: the cluster state in memory, rebuilt at start from the last snapshot plus
//! the committed log (openraft re-applies it). Snapshots are written to sled and flushed before
//! openraft is told about them.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::keys::{CurrentSnapshotKey, MetaKey};
use super::snapshot::StoredSnapshot;
use super::StoreError;
use crate::state::{ApplyResult, ClusterState, Outcome};
use crate::TypeConfig;

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
        };
        let current = store
            .load_snapshot()
            .map_err(|e| StoreError::Snapshot(e.to_string()))?;
        if let Some(snap) = current {
            let mut data: StateMachineData = serde_json::from_slice(&snap.data)
                .map_err(|e| StoreError::Snapshot(e.to_string()))?;
            data.remember_members();
            *store.data.write() = data;
        }
        Ok(store)
    }

    pub fn shared(&self) -> SharedState {
        self.data.clone()
    }

    fn load_snapshot(&self) -> StoreResult<Option<StoredSnapshot>> {
        let Some(bytes) = self
            .snapshots
            .get(CurrentSnapshotKey::KEY)
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| snap_err(ErrorVerb::Read, e))
    }

    async fn save_snapshot(&self, snap: &StoredSnapshot) -> StoreResult<()> {
        let bytes = serde_json::to_vec(snap).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.snapshots
            .insert(CurrentSnapshotKey::KEY, bytes)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.snapshots
            .flush_async()
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = {
            let sm = self.data.read();
            let bytes = serde_json::to_vec(&*sm).map_err(|e| sm_err(ErrorVerb::Read, e))?;
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
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
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
                EntryPayload::Normal(command) => sm.cluster.apply(entry.log_id.index, command),
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
            serde_json::from_slice(&bytes).map_err(|e| snap_err(ErrorVerb::Read, e))?;
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

//! What one replica's services and background tasks share: its settings, Raft handle, applied
//! state, the leader's memory of heartbeats, and the counters `/metrics` shows. Data only; the
//! wiring is in `app`, consensus in `consensus`.

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use crate::config::Settings;
use crate::disk::DiskReserve;
use crate::fence::Fence;
use crate::liveness::Liveness;
use crate::network::PeerNetwork;
use crate::proposer::Proposer;
use crate::read_index::ReadIndex;
use crate::store::SharedState;
use crate::Raft;

/// Everything the services share.
pub struct App {
    pub settings: Settings,
    pub raft: Raft,
    pub state: SharedState,
    pub liveness: Mutex<Liveness>,
    /// Wakes the placer (a node registered or a tenant went pending).
    pub placer: Notify,
    /// Channels to peers, shared with openraft; also used to forward requests to the leader.
    pub network: PeerNetwork,
    /// Held for the whole of a membership change: one at a time.
    pub membership: tokio::sync::Mutex<()>,
    /// Writes, batched with concurrent ones into shared entries.
    pub proposer: Proposer,
    /// Batched leadership confirmations for linearizable reads and checked writes.
    pub read_index: ReadIndex,
    /// Which term this replica has fenced (see `fence`).
    pub fence: Fence,
    /// The data disk's free space, checked before every proposal.
    pub disk: DiskReserve,
    /// Events counted for `/metrics`.
    pub counters: Counters,
    /// The stored snapshot's size, for `/metrics`.
    pub snapshot_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The commit index as last sampled (each second), for `/metrics`.
    pub commit_index: std::sync::atomic::AtomicU64,
}

impl App {
    pub fn liveness(&self) -> MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.settings.id)
    }

    /// The leader's id and address as this replica knows them.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.addr.clone()))
    }
}

/// Events counted on this replica since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Heartbeats this replica answered as leader.
    pub heartbeats: Counter,
    /// Heartbeats dropped because they arrived after their sender stopped waiting.
    pub heartbeats_late: Counter,
    /// Tenants placed on a node (at create or later by the placer).
    pub placements: Counter,
    /// Creates and placements that found no node with room.
    pub placement_refusals: Counter,
    /// Nodes this replica marked down as leader, silent past their grace period.
    pub nodes_marked_down: Counter,
}

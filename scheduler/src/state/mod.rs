//! The replicated state (nodes and tenants) and the commands that change it. `apply` is pure and
//! deterministic: every replica applying the same log reaches the same state. It re-checks what the
//! leader decided (room on the node, the tenant's identity), so a stale decision is refused.
//!
//! By concern: the records (`records`), the commands and their results (`commands`), the
//! per-node index derived from the tenants, with the port allocator (`index`), and `apply`
//! (`apply`). This module holds the state itself and how it is stored in snapshots.

use std::collections::BTreeMap;

use dormant_common::{NodeName, TenantName, TenantUid};
use serde::{Deserialize, Serialize};

mod apply;
mod commands;
mod index;
mod records;

pub use commands::{ApplyError, ApplyResult, Command, Outcome};
pub use records::*;

use index::NodeLoad;

/// The replicated state. Only `apply` changes it (the fields are public for reading), which keeps
/// the per-node index in step with the tenants.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "StoredClusterState")]
pub struct ClusterState {
    /// Chosen once by the first leader (`SetClusterId`); `None` only until then, or in a state
    /// written before identities existed (its leader then chooses one).
    pub cluster_id: Option<String>,
    pub nodes: BTreeMap<NodeName, NodeRecord>,
    pub tenants: BTreeMap<TenantName, TenantRecord>,
    /// Tenants deleted with `--force` while their node was down or gone, by node: if that node
    /// comes back, its agent is told to delete them instead of running them again. Each holds
    /// its port on that node until the agent confirms.
    pub tombstones: BTreeMap<NodeName, BTreeMap<TenantName, Tombstone>>,
    /// The least uid the next tenant created may get (see `next_uid`).
    next_uid: u64,
    /// Derived from `tenants`, never stored: what each node holds. Placement asks it on every
    /// create; scanning every tenant for every node instead dominated the leader's CPU.
    by_node: BTreeMap<NodeName, NodeLoad>,
}

/// `ClusterState` as it is read from snapshots: without the derived index, which is rebuilt.
#[derive(Deserialize)]
struct StoredClusterState {
    #[serde(default)]
    cluster_id: Option<String>,
    nodes: BTreeMap<NodeName, NodeRecord>,
    tenants: BTreeMap<TenantName, TenantRecord>,
    #[serde(default)]
    tombstones: BTreeMap<NodeName, BTreeMap<TenantName, Tombstone>>,
    /// Absent from states written before batches: 0, and the next uid is the log index.
    #[serde(default)]
    next_uid: u64,
}

impl From<StoredClusterState> for ClusterState {
    fn from(stored: StoredClusterState) -> Self {
        let mut state = ClusterState {
            cluster_id: stored.cluster_id,
            nodes: stored.nodes,
            tenants: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            next_uid: stored.next_uid,
            by_node: BTreeMap::new(),
        };
        for (name, t) in stored.tenants {
            state.insert_tenant(name, t);
        }
        for (node, stones) in stored.tombstones {
            for (name, stone) in stones {
                state.insert_tombstone(&node, name, stone);
            }
        }
        state
    }
}

/// Serializes the stored fields in place: a snapshot is taken under the state's read lock, and
/// copying the whole state first would hold that lock (and the applies waiting on it) longer.
impl Serialize for ClusterState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Stored<'a> {
            cluster_id: &'a Option<String>,
            nodes: &'a BTreeMap<NodeName, NodeRecord>,
            tenants: &'a BTreeMap<TenantName, TenantRecord>,
            tombstones: &'a BTreeMap<NodeName, BTreeMap<TenantName, Tombstone>>,
            next_uid: u64,
        }
        Stored {
            cluster_id: &self.cluster_id,
            nodes: &self.nodes,
            tenants: &self.tenants,
            tombstones: &self.tombstones,
            next_uid: self.next_uid,
        }
        .serialize(serializer)
    }
}

impl ClusterState {
    /// The uid of a tenant created at log `index`: the index itself, unless an earlier entry
    /// (a batch of creates) used it already. So uids grow with every tenant created, never
    /// repeat, and equal the log index wherever batches are not involved, as versions before
    /// batches gave them (which keeps older replicas' states and this one's alike).
    fn next_uid(&mut self, index: u64) -> TenantUid {
        let uid = index.max(self.next_uid);
        self.next_uid = uid + 1;
        TenantUid::new(uid)
    }

    /// Whether a tenant created after the entry at `index` would get a uid other than its own
    /// log index (batches used uids past it): a version before batches would number it
    /// differently.
    pub fn next_uid_after_batches(&self, index: u64) -> bool {
        self.next_uid > index + 1
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use dormant_common::hibernation::{HibernateMode, IdleAfter};
    use dormant_common::{Bytes, MilliCpu, NodeStatus, Resources};

    use super::*;

    pub fn res(milli_cpu: u64, memory_mib: u64, storage_gib: u64) -> Resources {
        Resources {
            cpu: MilliCpu(milli_cpu),
            memory: Bytes(memory_mib << 20),
            storage: Bytes(storage_gib << 30),
        }
    }

    pub fn node(id: &str, capacity: Resources) -> NodeRecord {
        NodeRecord {
            id: NodeName::parse(id).unwrap(),
            address: "127.0.0.1".into(),
            capacity,
            engines: ["postgres".to_string()].into(),
            labels: BTreeMap::new(),
            cgroup_driver: "v1".into(),
            port_range: (20000, 20009),
            status: NodeStatus::Ready,
            cordoned: false,
            engine_access: BTreeMap::new(),
        }
    }

    pub fn spec(name: &str, resources: Resources) -> TenantSpec {
        TenantSpec {
            name: TenantName::parse(name).unwrap(),
            engine: "postgres".into(),
            resources,
            constraints: BTreeMap::new(),
            idle_after: IdleAfter::default(),
            hibernate: HibernateMode::default(),
        }
    }
}

#[cfg(test)]
mod tests;

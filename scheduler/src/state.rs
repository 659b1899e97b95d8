//! The replicated state (nodes and tenants) and the commands that change it. `apply` is pure and
//! deterministic: every replica applying the same log reaches the same state. It re-checks what the
//! leader decided (room on the node, the tenant's identity), so a stale decision is refused.

use std::collections::{BTreeMap, BTreeSet};

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{NodeName, NodeStatus, Resources, TenantName, TenantState};
use serde::{Deserialize, Serialize};

use crate::placement;

/// A host running `dormant-agent`, as it registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeName,
    /// Host name or address that clients use to reach this node's tenant ports.
    pub address: String,
    pub capacity: Resources,
    pub engines: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
    pub cgroup_driver: String,
    /// Inclusive range of TCP ports the agent may give tenants.
    pub port_range: (u16, u16),
    /// Ready, or down when the leader stopped hearing from it for the grace period.
    pub status: NodeStatus,
    /// An operator stopped new placements here; the node's tenants keep running.
    #[serde(default)]
    pub cordoned: bool,
}

impl NodeRecord {
    /// The node as placement sees it, with what its tenants reserve.
    pub fn view(&self, allocated: Resources, has_free_port: bool) -> placement::NodeView<'_> {
        placement::NodeView {
            id: &self.id,
            status: self.status,
            cordoned: self.cordoned,
            engines: &self.engines,
            labels: &self.labels,
            capacity: self.capacity,
            allocated,
            has_free_port,
        }
    }
}

/// What the scheduler wants for a tenant (in `common`: agents read it too).
pub use dormant_common::DesiredState;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Unique for the life of the cluster and growing with each create: the log index of the
    /// create, or past it for creates that shared an entry (`ClusterState::next_uid`). A tenant
    /// deleted and created again under the same name is a different tenant.
    pub uid: u64,
    pub name: TenantName,
    pub engine: String,
    pub resources: Resources,
    /// The admin password the engine is initialised with. Lives in the Raft log and snapshots.
    pub password: String,
    pub state: TenantState,
    pub desired: DesiredState,
    pub node: Option<NodeName>,
    pub port: Option<u16>,
    /// Why the tenant is pending or failed.
    pub reason: Option<String>,
    /// Log index of the delete request, so a heartbeat can prove the agent saw it.
    pub deleted_at: Option<u64>,
    /// Labels the tenant's node must carry.
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    /// While `Lost`: the state it had when its node went down, restored when the node returns.
    #[serde(default)]
    pub lost_from: Option<TenantState>,
    /// Raised by each `tenant restart`; the agent restarts the engine once for every new value.
    /// Records written before restarts existed read as 0.
    #[serde(default)]
    pub restart_generation: u64,
    /// How long without a connection before the agent hibernates the tenant. Records written
    /// before hibernation existed read as the default (10m), like a tenant created without one.
    #[serde(default)]
    pub idle_after: IdleAfter,
    /// How the agent hibernates it (stop, the default, or freeze).
    #[serde(default)]
    pub hibernate: HibernateMode,
    /// Raised by each `tenant hibernate` and `tenant wake`; the agent acts once for every new
    /// value, as for `restart_generation`.
    #[serde(default)]
    pub hibernate_generation: u64,
    #[serde(default)]
    pub wake_generation: u64,
}

impl TenantRecord {
    pub fn ask(&self) -> placement::Ask<'_> {
        placement::Ask {
            engine: &self.engine,
            resources: &self.resources,
            constraints: &self.constraints,
        }
    }
}

/// A tenant as the operator asked for it, already validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSpec {
    pub name: TenantName,
    pub engine: String,
    pub resources: Resources,
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    /// Log entries written before hibernation existed read as the defaults.
    #[serde(default)]
    pub idle_after: IdleAfter,
    #[serde(default)]
    pub hibernate: HibernateMode,
}

impl TenantSpec {
    pub fn ask(&self) -> placement::Ask<'_> {
        placement::Ask {
            engine: &self.engine,
            resources: &self.resources,
            constraints: &self.constraints,
        }
    }
}

/// The tenant states an agent may report: what it sees of an engine it runs (hibernation is the
/// agent's decision too: it hibernates an idle tenant and wakes it for a client). The others are
/// the scheduler's to decide (`pending`, `lost`, `deleting` through a delete); a report of one of
/// them changes nothing.
pub const AGENT_REPORTED_STATES: [TenantState; 5] = [
    TenantState::Starting,
    TenantState::Running,
    TenantState::Hibernated,
    TenantState::Waking,
    TenantState::Failed,
];

/// The states of [`AGENT_REPORTED_STATES`] as a sentence's list: "starting, running, ... or
/// failed", for the messages that refuse the others.
pub fn agent_reported_states_list() -> String {
    let names: Vec<&str> = AGENT_REPORTED_STATES.iter().map(|s| s.as_str()).collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// What an operator asks a placed tenant's engine to do once, by raising a generation the agent
/// acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineAction {
    Restart,
    Hibernate,
    Wake,
}

impl EngineAction {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineAction::Restart => "restart",
            EngineAction::Hibernate => "hibernate",
            EngineAction::Wake => "wake",
        }
    }
}

impl std::fmt::Display for EngineAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// The cluster's identity, proposed by the leader while the state has none. Only the first
    /// one applied counts: agents record it and refuse any other, so it never changes.
    SetClusterId(String),
    RegisterNode(NodeRecord),
    /// Create a tenant; `node` is the leader's placement, or `None` with `pending_reason`.
    CreateTenant {
        spec: TenantSpec,
        password: String,
        node: Option<NodeName>,
        pending_reason: Option<String>,
        overcommit: f64,
    },
    /// Place a pending tenant on a node.
    AssignTenant {
        name: TenantName,
        uid: u64,
        node: NodeName,
        overcommit: f64,
    },
    /// Record why a pending tenant still fits nowhere. No longer proposed (`pending` works the
    /// reason out on read); applied from logs that older schedulers wrote.
    SetPendingReason {
        name: TenantName,
        uid: u64,
        reason: String,
    },
    /// Change a tenant's resources (on its node they must still fit; storage only grows) and its
    /// hibernation policy (`None`: unchanged; entries written before it existed have none).
    UpdateTenant {
        name: TenantName,
        uid: u64,
        resources: Resources,
        overcommit: f64,
        #[serde(default)]
        idle_after: Option<IdleAfter>,
        #[serde(default)]
        hibernate: Option<HibernateMode>,
    },
    /// Mark a tenant for deletion; a pending one goes at once.
    DeleteTenant {
        name: TenantName,
    },
    /// Restart a placed tenant's engine once: raises its restart generation.
    RestartTenant {
        name: TenantName,
        uid: u64,
    },
    /// Hibernate a placed tenant now, as if it were idle: raises its hibernate generation.
    HibernateTenant {
        name: TenantName,
        uid: u64,
    },
    /// Wake a placed tenant now, as if a client connected: raises its wake generation.
    WakeTenant {
        name: TenantName,
        uid: u64,
    },
    /// An agent reported a tenant's state changed.
    ObserveTenant {
        node: NodeName,
        name: TenantName,
        uid: u64,
        state: TenantState,
        reason: Option<String>,
    },
    /// The tenant's node confirmed it is gone.
    RemoveTenant {
        name: TenantName,
        uid: u64,
    },
    /// The leader stopped hearing from a node (`Down`: its tenants become lost) or heard from it
    /// again (`Ready`: its tenants return to the state they had).
    ///
    /// `decided_in_term`: the leader's term when it decided (`None` in entries written before it
    /// existed). Applied only from an entry of that same term: a leader re-elected between deciding
    /// and proposing decided on what it had heard before, which may no longer hold. Checked where
    /// the entry's term is known (`store::state_machine`).
    SetNodeStatus {
        node: NodeName,
        status: NodeStatus,
        #[serde(default)]
        decided_in_term: Option<u64>,
    },
    /// An operator stops or resumes new placements on a node.
    SetNodeCordon {
        node: NodeName,
        cordoned: bool,
    },
    /// Delete a tenant whose node is down or gone, now: its name, port and reservation are free
    /// at once, and a tombstone tells its node, if it returns, to remove it.
    ForceDeleteTenant {
        name: TenantName,
        uid: u64,
    },
    /// Forget a node. Refused while it is ready or holds tenants, unless `force`: then its
    /// tenants are deleted as by `ForceDeleteTenant`.
    RemoveNode {
        node: NodeName,
        force: bool,
    },
    /// The node of a tombstone confirmed the tenant gone.
    ForgetTombstone {
        node: NodeName,
        name: TenantName,
        uid: u64,
    },
    /// Several commands in one entry, applied in order, each with its own result
    /// (`Outcome::Batch`): concurrent writes share one entry (`proposer`). Never nested.
    Batch(Vec<Command>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Node(NodeRecord),
    Tenant(TenantRecord),
    Removed,
    /// A node forgotten, with the tenants deleted with it.
    NodeRemoved(Vec<TenantName>),
    /// Entries that are not commands (blank, membership) and commands that changed nothing.
    Nothing,
    /// The result of each command of a `Command::Batch`, in order.
    Batch(Vec<ApplyResult>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("name: tenant {0:?} already exists")]
    TenantExists(String),
    #[error("tenant {0:?} not found")]
    TenantNotFound(String),
    #[error("node {0:?} not found")]
    NodeNotFound(String),
    #[error("tenant {0:?} is being deleted")]
    Deleting(String),
    #[error(
        "name: tenant {tenant:?} is pending: it runs on no node yet, so there is no engine to {action}"
    )]
    NotPlaced {
        tenant: String,
        action: EngineAction,
    },
    #[error(
        "state: tenant {tenant:?} reported {state}; an agent reports only {}",
        agent_reported_states_list()
    )]
    NotReportable { tenant: String, state: TenantState },
    #[error("storage: {asked} asked, less than the {has} the tenant has; volumes only grow")]
    Shrink { asked: String, has: String },
    #[error("tenant {tenant} does not fit its node at the new size: {why}")]
    DoesNotFit { tenant: String, why: String },
    #[error(
        "force: tenant {tenant:?} is on node {node}, which is ready: a plain delete removes it \
         there; --force is for a tenant whose node is down or gone"
    )]
    ForceOnReadyNode { tenant: String, node: String },
    #[error(
        "node {0}: ready (its agent heartbeats): stop its agent first, or --force (the agent \
         registers it again at its next heartbeat)"
    )]
    NodeReady(String),
    #[error(
        "node {node}: holds tenants ({tenants}): delete them first, or --force to delete them \
         with the node (their data stays on the host until its agent returns)"
    )]
    NodeHasTenants { node: String, tenants: String },
    #[error("placement of {tenant} on {node} is stale: {why}")]
    StalePlacement {
        tenant: String,
        node: String,
        why: String,
    },
    #[error(
        "a batch of writes was applied with an unexpected result ({0}); whether this write \
         took effect is unknown: check with a read"
    )]
    UnexpectedBatchResult(String),
}

pub type ApplyResult = Result<Outcome, ApplyError>;

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

/// What the tenants placed on one node reserve and use.
#[derive(Debug, Clone, Default, PartialEq)]
struct NodeLoad {
    allocated: Resources,
    ports: BTreeSet<u16>,
    tenants: BTreeSet<TenantName>,
}

/// A tenant deleted with `--force` while its node was down or gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub uid: u64,
    pub port: Option<u16>,
    /// The log index of the forced delete: an agent that saw a desired set this recent and no
    /// longer reports the tenant has removed it.
    pub deleted_at: u64,
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
    fn next_uid(&mut self, index: u64) -> u64 {
        let uid = index.max(self.next_uid);
        self.next_uid = uid + 1;
        uid
    }

    /// Whether a tenant created after the entry at `index` would get a uid other than its own
    /// log index (batches used uids past it): a version before batches would number it
    /// differently.
    pub fn next_uid_after_batches(&self, index: u64) -> bool {
        self.next_uid > index + 1
    }

    /// Resources reserved on `node` by the tenants placed there (deleting ones too, until gone).
    pub fn allocated(&self, node: &NodeName) -> Resources {
        self.by_node
            .get(node)
            .map(|l| l.allocated)
            .unwrap_or_default()
    }

    pub fn tenants_on<'a>(
        &'a self,
        node: &'a NodeName,
    ) -> impl Iterator<Item = &'a TenantRecord> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flat_map(|l| l.tenants.iter())
            .filter_map(|name| self.tenants.get(name))
    }

    /// The view of every node that placement needs.
    pub fn node_views(&self) -> Vec<placement::NodeView<'_>> {
        // Both maps are ordered by node name: walked together, not looked up node by node
        // (this runs for every create, over every node).
        let mut loads = self.by_node.iter().peekable();
        self.nodes
            .values()
            .map(|n| {
                while loads.next_if(|(id, _)| *id < &n.id).is_some() {}
                let load = loads.next_if(|(id, _)| *id == &n.id).map(|(_, load)| load);
                let allocated = load.map(|l| l.allocated).unwrap_or_default();
                n.view(allocated, Self::has_free_port(n, load))
            })
            .collect()
    }

    /// Whether `node` (holding `load`) has a port left, without searching for it (placement
    /// asks for every node).
    fn has_free_port(node: &NodeRecord, load: Option<&NodeLoad>) -> bool {
        let (first, last) = node.port_range;
        let Some(load) = load else {
            return true;
        };
        let size = usize::from(last - first) + 1;
        let all_in_range = load.ports.first().is_some_and(|p| *p >= first)
            && load.ports.last().is_some_and(|p| *p <= last);
        if all_in_range {
            // Ports in a set are distinct: fewer of them than the range holds leaves a gap.
            load.ports.len() < size
        } else {
            // The range changed since they were given (the agent registered again).
            load.ports.range(first..=last).count() < size
        }
    }

    fn free_port(&self, node: &NodeRecord) -> Option<u16> {
        let (first, last) = node.port_range;
        let Some(load) = self.by_node.get(&node.id) else {
            return Some(first);
        };
        // Ports are given lowest first, so they are usually first..first+len: then the next one
        // is free, without walking them all.
        let len = u16::try_from(load.ports.len()).unwrap_or(u16::MAX);
        let packed = load.ports.first() == Some(&first)
            && first
                .checked_add(len - 1)
                .is_some_and(|end| load.ports.last() == Some(&end));
        if packed {
            return first.checked_add(len).filter(|p| *p <= last);
        }
        // Otherwise the first gap in the range is the lowest free port.
        let mut candidate = first;
        for &used in load.ports.range(first..=last) {
            if used != candidate {
                return Some(candidate);
            }
            candidate = candidate.checked_add(1)?;
        }
        (candidate <= last).then_some(candidate)
    }

    /// Adds a tenant, counting it on its node.
    fn insert_tenant(&mut self, name: TenantName, t: TenantRecord) {
        if let Some(node) = &t.node {
            let load = self.by_node.entry(node.clone()).or_default();
            load.allocated = load.allocated.saturating_add(t.resources);
            load.ports.extend(t.port);
            load.tenants.insert(name.clone());
        }
        self.tenants.insert(name, t);
    }

    /// Removes a tenant and what it held on its node.
    fn remove_tenant(&mut self, name: &TenantName) {
        let Some(t) = self.tenants.remove(name) else {
            return;
        };
        if let Some(node) = &t.node {
            if let Some(load) = self.by_node.get_mut(node) {
                load.allocated = load.allocated.saturating_sub(t.resources);
                if let Some(port) = t.port {
                    load.ports.remove(&port);
                }
                load.tenants.remove(name);
                if load.tenants.is_empty() && load.ports.is_empty() {
                    self.by_node.remove(node);
                }
            }
        }
    }

    /// Records a forced delete's tombstone on `node`; its port stays taken there.
    fn insert_tombstone(&mut self, node: &NodeName, name: TenantName, stone: Tombstone) {
        if let Some(port) = stone.port {
            self.by_node
                .entry(node.clone())
                .or_default()
                .ports
                .insert(port);
        }
        self.tombstones
            .entry(node.clone())
            .or_default()
            .insert(name, stone);
    }

    /// Drops a tombstone (its node confirmed the tenant gone) and frees its port.
    fn remove_tombstone(&mut self, node: &NodeName, name: &TenantName) {
        let Some(stones) = self.tombstones.get_mut(node) else {
            return;
        };
        let Some(stone) = stones.remove(name) else {
            return;
        };
        if stones.is_empty() {
            self.tombstones.remove(node);
        }
        if let (Some(port), Some(load)) = (stone.port, self.by_node.get_mut(node)) {
            load.ports.remove(&port);
            if load.tenants.is_empty() && load.ports.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// Removes a placed tenant whose node is down or gone, leaving a tombstone on that node.
    fn force_remove(&mut self, name: &TenantName, index: u64) {
        let Some(t) = self.tenants.get(name) else {
            return;
        };
        let node = t.node.clone();
        let stone = Tombstone {
            uid: t.uid,
            port: t.port,
            deleted_at: index,
        };
        self.remove_tenant(name);
        if let Some(node) = node {
            self.insert_tombstone(&node, name.clone(), stone);
        }
    }

    /// The index rebuilt from the tenants: what `by_node` must always equal.
    #[cfg(test)]
    fn recomputed_index(&self) -> BTreeMap<NodeName, NodeLoad> {
        let mut fresh = ClusterState::default();
        for (name, t) in &self.tenants {
            fresh.insert_tenant(name.clone(), t.clone());
        }
        for (node, stones) in &self.tombstones {
            for (name, stone) in stones {
                fresh.insert_tombstone(node, name.clone(), stone.clone());
            }
        }
        fresh.by_node
    }

    /// Checks that `ask` still fits on `node` and returns the port it gets there.
    fn recheck(
        &self,
        name: &TenantName,
        node: &NodeName,
        ask: &placement::Ask<'_>,
        overcommit: f64,
    ) -> Result<u16, String> {
        let Some(record) = self.nodes.get(node) else {
            return Err("node is not registered".into());
        };
        // One tombstone per name and node: the node removes the earlier tenant first.
        if self
            .tombstones
            .get(node)
            .is_some_and(|stones| stones.contains_key(name))
        {
            return Err(format!(
                "{node}: still removing an earlier tenant of this name (deleted with --force)"
            ));
        }
        let view = record.view(self.allocated(node), true);
        placement::check(&view, ask, overcommit)?;
        self.free_port(record)
            .ok_or_else(|| format!("{node}: no free port in its range"))
    }

    /// Applies one command at log index `index`.
    pub fn apply(&mut self, index: u64, command: Command) -> ApplyResult {
        let result = self.apply_inner(index, command);
        #[cfg(test)]
        assert_eq!(
            self.by_node,
            self.recomputed_index(),
            "per-node index drifted"
        );
        result
    }

    fn apply_inner(&mut self, index: u64, command: Command) -> ApplyResult {
        match command {
            Command::SetClusterId(id) => {
                // A leader that had not applied an earlier choice yet may propose a second one:
                // the first in the log wins on every replica.
                if self.cluster_id.is_some() {
                    return Ok(Outcome::Nothing);
                }
                self.cluster_id = Some(id);
                Ok(Outcome::Nothing)
            }
            Command::RegisterNode(mut node) => {
                // Cordoning is the operator's, not the agent's: a re-registration keeps it.
                node.cordoned = self.nodes.get(&node.id).is_some_and(|n| n.cordoned);
                node.status = NodeStatus::Ready;
                self.nodes.insert(node.id.clone(), node.clone());
                self.set_tenants_lost(&node.id, false);
                Ok(Outcome::Node(node))
            }
            Command::SetNodeStatus { node, status, .. } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                if record.status == status {
                    return Ok(Outcome::Nothing);
                }
                record.status = status;
                let record = record.clone();
                self.set_tenants_lost(&node, status == NodeStatus::Down);
                Ok(Outcome::Node(record))
            }
            Command::SetNodeCordon { node, cordoned } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                record.cordoned = cordoned;
                Ok(Outcome::Node(record.clone()))
            }
            Command::CreateTenant {
                spec,
                password,
                node,
                pending_reason,
                overcommit,
            } => {
                if self.tenants.contains_key(&spec.name) {
                    return Err(ApplyError::TenantExists(spec.name.to_string()));
                }
                let mut record = TenantRecord {
                    uid: self.next_uid(index),
                    name: spec.name.clone(),
                    engine: spec.engine,
                    resources: spec.resources,
                    password,
                    state: TenantState::Pending,
                    desired: DesiredState::Running,
                    node: None,
                    port: None,
                    reason: pending_reason,
                    deleted_at: None,
                    constraints: spec.constraints,
                    lost_from: None,
                    restart_generation: 0,
                    idle_after: spec.idle_after,
                    hibernate: spec.hibernate,
                    hibernate_generation: 0,
                    wake_generation: 0,
                };
                if let Some(node) = node {
                    // A placement that went stale leaves the tenant pending: the placer tries again.
                    match self.recheck(&record.name, &node, &record.ask(), overcommit) {
                        Ok(port) => {
                            record.state = TenantState::Starting;
                            record.node = Some(node);
                            record.port = Some(port);
                            record.reason = None;
                        }
                        Err(why) => record.reason = Some(why),
                    }
                }
                self.insert_tenant(spec.name, record.clone());
                Ok(Outcome::Tenant(record))
            }
            Command::AssignTenant {
                name,
                uid,
                node,
                overcommit,
            } => {
                let tenant = self.tenant_with_uid(&name, uid)?;
                if tenant.state != TenantState::Pending || tenant.desired != DesiredState::Running {
                    return Ok(Outcome::Nothing);
                }
                let port = self
                    .recheck(&name, &node, &tenant.ask(), overcommit)
                    .map_err(|why| ApplyError::StalePlacement {
                        tenant: name.to_string(),
                        node: node.to_string(),
                        why,
                    })?;
                let mut tenant = self.tenant_with_uid(&name, uid)?.clone();
                tenant.state = TenantState::Starting;
                tenant.node = Some(node);
                tenant.port = Some(port);
                tenant.reason = None;
                // Out and in again, so its node counts it.
                self.remove_tenant(&name);
                self.insert_tenant(name, tenant.clone());
                Ok(Outcome::Tenant(tenant))
            }
            Command::SetPendingReason { name, uid, reason } => {
                let tenant = self.tenant_with_uid_mut(&name, uid)?;
                if tenant.state != TenantState::Pending {
                    return Ok(Outcome::Nothing);
                }
                tenant.reason = Some(reason);
                Ok(Outcome::Tenant(tenant.clone()))
            }
            Command::UpdateTenant {
                name,
                uid,
                resources,
                overcommit,
                idle_after,
                hibernate,
            } => {
                let tenant = self.tenant_with_uid(&name, uid)?;
                if tenant.desired == DesiredState::Deleted {
                    return Err(ApplyError::Deleting(name.to_string()));
                }
                if resources.storage < tenant.resources.storage {
                    return Err(ApplyError::Shrink {
                        asked: resources.storage.human(),
                        has: tenant.resources.storage.human(),
                    });
                }
                // Unchanged resources need no room: a policy change must not be refused because
                // the node shrank under the tenant since it was placed.
                let resized = resources != tenant.resources;
                if let Some(node) = tenant.node.as_ref().filter(|_| resized) {
                    let record = self
                        .nodes
                        .get(node)
                        .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                    // Room as if the tenant's current reservation were already released.
                    let view =
                        record.view(self.allocated(node).saturating_sub(tenant.resources), true);
                    placement::check_room(&view, &resources, overcommit).map_err(|why| {
                        ApplyError::DoesNotFit {
                            tenant: name.to_string(),
                            why,
                        }
                    })?;
                }
                let mut tenant = self.tenant_with_uid(&name, uid)?.clone();
                tenant.resources = resources;
                if let Some(idle_after) = idle_after {
                    tenant.idle_after = idle_after;
                }
                if let Some(hibernate) = hibernate {
                    tenant.hibernate = hibernate;
                }
                self.remove_tenant(&name);
                self.insert_tenant(name, tenant.clone());
                Ok(Outcome::Tenant(tenant))
            }
            Command::DeleteTenant { name } => {
                let tenant = self
                    .tenants
                    .get_mut(&name)
                    .ok_or_else(|| ApplyError::TenantNotFound(name.to_string()))?;
                if tenant.node.is_none() {
                    self.remove_tenant(&name);
                    return Ok(Outcome::Removed);
                }
                if tenant.desired != DesiredState::Deleted {
                    tenant.desired = DesiredState::Deleted;
                    tenant.state = TenantState::Deleting;
                    tenant.deleted_at = Some(index);
                    tenant.reason = None;
                }
                Ok(Outcome::Tenant(tenant.clone()))
            }
            Command::RestartTenant { name, uid } => {
                self.raise_generation(&name, uid, EngineAction::Restart)
            }
            Command::HibernateTenant { name, uid } => {
                self.raise_generation(&name, uid, EngineAction::Hibernate)
            }
            Command::WakeTenant { name, uid } => {
                self.raise_generation(&name, uid, EngineAction::Wake)
            }
            Command::ObserveTenant {
                node,
                name,
                uid,
                state,
                reason,
            } => {
                let tenant = self.tenant_with_uid_mut(&name, uid)?;
                // Reports from a node the tenant is not on, or about a tenant being deleted, change nothing.
                if tenant.node.as_ref() != Some(&node) || tenant.desired == DesiredState::Deleted {
                    return Ok(Outcome::Nothing);
                }
                // The heartbeat handler never proposes these; a log that holds one anyway (another
                // version, a bug) must not make an agent the author of a scheduler's state.
                if !AGENT_REPORTED_STATES.contains(&state) {
                    return Err(ApplyError::NotReportable {
                        tenant: name.to_string(),
                        state,
                    });
                }
                tenant.state = state;
                tenant.reason = reason;
                tenant.lost_from = None;
                Ok(Outcome::Tenant(tenant.clone()))
            }
            Command::RemoveTenant { name, uid } => {
                self.tenant_with_uid(&name, uid)?;
                self.remove_tenant(&name);
                Ok(Outcome::Removed)
            }
            Command::ForceDeleteTenant { name, uid } => {
                let tenant = self.tenant_with_uid(&name, uid)?;
                if let Some(node) = tenant.node.as_ref().and_then(|n| self.nodes.get(n)) {
                    if node.status == NodeStatus::Ready {
                        return Err(ApplyError::ForceOnReadyNode {
                            tenant: name.to_string(),
                            node: node.id.to_string(),
                        });
                    }
                }
                self.force_remove(&name, index);
                Ok(Outcome::Removed)
            }
            Command::RemoveNode { node, force } => {
                let record = self
                    .nodes
                    .get(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                let on_it: Vec<TenantName> =
                    self.tenants_on(&node).map(|t| t.name.clone()).collect();
                if !force {
                    if record.status == NodeStatus::Ready {
                        return Err(ApplyError::NodeReady(node.to_string()));
                    }
                    if !on_it.is_empty() {
                        const SHOWN: usize = 10;
                        let mut tenants: Vec<&str> =
                            on_it.iter().take(SHOWN).map(TenantName::as_str).collect();
                        let more = format!("and {} more", on_it.len().saturating_sub(SHOWN));
                        if on_it.len() > SHOWN {
                            tenants.push(&more);
                        }
                        return Err(ApplyError::NodeHasTenants {
                            node: node.to_string(),
                            tenants: tenants.join(", "),
                        });
                    }
                }
                for name in &on_it {
                    self.force_remove(name, index);
                }
                self.nodes.remove(&node);
                Ok(Outcome::NodeRemoved(on_it))
            }
            Command::ForgetTombstone { node, name, uid } => {
                let matches = self
                    .tombstones
                    .get(&node)
                    .and_then(|stones| stones.get(&name))
                    .is_some_and(|stone| stone.uid == uid);
                if matches {
                    self.remove_tombstone(&node, &name);
                    Ok(Outcome::Removed)
                } else {
                    Ok(Outcome::Nothing)
                }
            }
            // The state machine unpacks batches itself (it checks each command's term and logs
            // its transitions); this is the same order for callers that hold a state only.
            Command::Batch(commands) => Ok(Outcome::Batch(
                commands
                    .into_iter()
                    .map(|command| self.apply_inner(index, command))
                    .collect(),
            )),
        }
    }

    /// Raises the generation of `action` for a placed tenant that is not being deleted: its agent
    /// acts once for the new value.
    fn raise_generation(
        &mut self,
        name: &TenantName,
        uid: u64,
        action: EngineAction,
    ) -> ApplyResult {
        let tenant = self.tenant_with_uid_mut(name, uid)?;
        if tenant.desired == DesiredState::Deleted {
            return Err(ApplyError::Deleting(name.to_string()));
        }
        if tenant.node.is_none() {
            return Err(ApplyError::NotPlaced {
                tenant: name.to_string(),
                action,
            });
        }
        let generation = match action {
            EngineAction::Restart => &mut tenant.restart_generation,
            EngineAction::Hibernate => &mut tenant.hibernate_generation,
            EngineAction::Wake => &mut tenant.wake_generation,
        };
        *generation += 1;
        Ok(Outcome::Tenant(tenant.clone()))
    }

    /// Marks the tenants of `node` that are meant to run lost (remembering their state, whichever
    /// it was: a hibernated tenant comes back hibernated, its reservation kept meanwhile), or
    /// restores them.
    fn set_tenants_lost(&mut self, node: &NodeName, lost: bool) {
        let names: Vec<TenantName> = self.tenants_on(node).map(|t| t.name.clone()).collect();
        for name in &names {
            let Some(t) = self.tenants.get_mut(name) else {
                continue;
            };
            if t.desired != DesiredState::Running {
                continue;
            }
            if lost && t.state != TenantState::Lost {
                t.lost_from = Some(t.state);
                t.state = TenantState::Lost;
            } else if !lost {
                if let Some(previous) = t.lost_from.take() {
                    t.state = previous;
                }
            }
        }
    }

    fn tenant_with_uid(&self, name: &TenantName, uid: u64) -> Result<&TenantRecord, ApplyError> {
        self.tenants
            .get(name)
            .filter(|t| t.uid == uid)
            .ok_or_else(|| ApplyError::TenantNotFound(name.to_string()))
    }

    fn tenant_with_uid_mut(
        &mut self,
        name: &TenantName,
        uid: u64,
    ) -> Result<&mut TenantRecord, ApplyError> {
        self.tenants
            .get_mut(name)
            .filter(|t| t.uid == uid)
            .ok_or_else(|| ApplyError::TenantNotFound(name.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use dormant_common::{Bytes, MilliCpu};

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
mod tests {
    use super::test_utils::*;
    use super::*;

    /// Node `a` (2 CPU, 4 GiB, 100 GiB) with tenant `t` (uid 2) placed on it.
    fn node_a_with_tenant_t() -> ClusterState {
        let mut st = ClusterState::default();
        st.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        create(&mut st, 2, "t", Some("a")).unwrap();
        st
    }

    fn create(state: &mut ClusterState, index: u64, name: &str, node: Option<&str>) -> ApplyResult {
        state.apply(
            index,
            Command::CreateTenant {
                spec: spec(name, res(500, 512, 1)),
                password: "pw".into(),
                node: node.map(|n| NodeName::parse(n).unwrap()),
                pending_reason: node.is_none().then(|| "no ready node".to_string()),
                overcommit: 1.0,
            },
        )
    }

    #[test]
    fn create_on_node_gets_lowest_free_port_and_starting_state() {
        let mut st = ClusterState::default();
        st.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        let Outcome::Tenant(t1) = create(&mut st, 2, "t1", Some("a")).unwrap() else {
            panic!()
        };
        let Outcome::Tenant(t2) = create(&mut st, 3, "t2", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!((t1.port, t2.port), (Some(20000), Some(20001)));
        assert_eq!(t1.state, TenantState::Starting);
        assert_eq!(t1.uid, 2);
        assert_eq!(st.allocated(&t1.node.unwrap()), res(1000, 1024, 2));
    }

    #[test]
    fn duplicate_name_is_refused_and_changes_nothing() {
        let mut st = ClusterState::default();
        create(&mut st, 1, "t1", None).unwrap();
        let before = st.clone();
        assert_eq!(
            create(&mut st, 2, "t1", None),
            Err(ApplyError::TenantExists("t1".into()))
        );
        assert_eq!(st, before);
    }

    #[test]
    fn stale_create_placement_leaves_tenant_pending_with_reason() {
        let mut st = ClusterState::default();
        st.apply(1, Command::RegisterNode(node("a", res(500, 4096, 100))))
            .unwrap();
        create(&mut st, 2, "t1", Some("a")).unwrap();
        let Outcome::Tenant(t2) = create(&mut st, 3, "t2", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!(t2.state, TenantState::Pending);
        assert!(t2.reason.unwrap().contains("CPU"));
    }

    #[test]
    fn stale_assignment_is_refused_never_applied() {
        let mut st = ClusterState::default();
        create(&mut st, 1, "t1", None).unwrap();
        st.apply(2, Command::RegisterNode(node("a", res(100, 4096, 100))))
            .unwrap();
        let before = st.clone();
        let err = st
            .apply(
                3,
                Command::AssignTenant {
                    name: TenantName::parse("t1").unwrap(),
                    uid: 1,
                    node: NodeName::parse("a").unwrap(),
                    overcommit: 1.0,
                },
            )
            .unwrap_err();
        assert!(matches!(err, ApplyError::StalePlacement { .. }), "{err}");
        assert_eq!(st, before);
    }

    #[test]
    fn delete_of_pending_removes_at_once_and_of_placed_waits_for_the_node() {
        let mut st = ClusterState::default();
        create(&mut st, 1, "p", None).unwrap();
        let name = |n: &str| TenantName::parse(n).unwrap();
        assert_eq!(
            st.apply(2, Command::DeleteTenant { name: name("p") }),
            Ok(Outcome::Removed)
        );
        st.apply(3, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        create(&mut st, 4, "t", Some("a")).unwrap();
        let Outcome::Tenant(t) = st
            .apply(5, Command::DeleteTenant { name: name("t") })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!((t.state, t.deleted_at), (TenantState::Deleting, Some(5)));
        // A late "running" report does not undo the delete.
        st.apply(
            6,
            Command::ObserveTenant {
                node: NodeName::parse("a").unwrap(),
                name: name("t"),
                uid: 4,
                state: TenantState::Running,
                reason: None,
            },
        )
        .unwrap();
        assert_eq!(st.tenants[&name("t")].state, TenantState::Deleting);
        assert_eq!(
            st.apply(
                7,
                Command::RemoveTenant {
                    name: name("t"),
                    uid: 4
                }
            ),
            Ok(Outcome::Removed)
        );
        assert!(st.tenants.is_empty());
    }

    #[test]
    fn reports_about_an_older_tenant_of_the_same_name_are_refused() {
        let mut st = ClusterState::default();
        create(&mut st, 1, "t", None).unwrap();
        let err = st
            .apply(
                2,
                Command::RemoveTenant {
                    name: TenantName::parse("t").unwrap(),
                    uid: 99,
                },
            )
            .unwrap_err();
        assert_eq!(err, ApplyError::TenantNotFound("t".into()));
        assert_eq!(st.tenants.len(), 1);
    }

    #[test]
    fn a_down_node_loses_its_tenants_and_its_return_restores_them() {
        let mut st = node_a_with_tenant_t();
        let name = TenantName::parse("t").unwrap();
        let a = NodeName::parse("a").unwrap();
        st.apply(
            3,
            Command::ObserveTenant {
                node: a.clone(),
                name: name.clone(),
                uid: 2,
                state: TenantState::Running,
                reason: None,
            },
        )
        .unwrap();
        let down = Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Down,
            decided_in_term: None,
        };
        st.apply(4, down.clone()).unwrap();
        assert_eq!(st.nodes[&a].status, NodeStatus::Down);
        assert_eq!(st.tenants[&name].state, TenantState::Lost);
        // Down twice changes nothing, and does not forget the state to restore.
        assert_eq!(st.apply(5, down), Ok(Outcome::Nothing));
        // Nothing new lands on a down node, but the tenant keeps its place.
        assert_eq!(st.tenants[&name].node.as_ref(), Some(&a));
        st.apply(
            6,
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Ready,
                decided_in_term: None,
            },
        )
        .unwrap();
        assert_eq!(st.tenants[&name].state, TenantState::Running);
        assert_eq!(st.tenants[&name].lost_from, None);
    }

    #[test]
    fn re_registration_keeps_the_cordon_and_brings_lost_tenants_back() {
        let mut st = node_a_with_tenant_t();
        let a = NodeName::parse("a").unwrap();
        st.apply(
            3,
            Command::SetNodeCordon {
                node: a.clone(),
                cordoned: true,
            },
        )
        .unwrap();
        st.apply(
            4,
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Down,
                decided_in_term: None,
            },
        )
        .unwrap();
        st.apply(5, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        assert!(st.nodes[&a].cordoned);
        assert_eq!(st.nodes[&a].status, NodeStatus::Ready);
        let t = &st.tenants[&TenantName::parse("t").unwrap()];
        assert_eq!(t.state, TenantState::Starting);
        let err = create(&mut st, 6, "u", Some("a")).unwrap();
        let Outcome::Tenant(u) = err else { panic!() };
        assert_eq!(u.state, TenantState::Pending);
        assert_eq!(u.reason.as_deref(), Some("a: cordoned"));
    }

    #[test]
    fn node_views_agree_with_per_node_accounting() {
        let mut st = ClusterState::default();
        let mut small = node("a", res(8000, 8192, 100));
        small.port_range = (20000, 20001);
        st.apply(1, Command::RegisterNode(small)).unwrap();
        st.apply(2, Command::RegisterNode(node("b", res(8000, 8192, 100))))
            .unwrap();
        create(&mut st, 3, "t1", Some("a")).unwrap();
        create(&mut st, 4, "t2", Some("b")).unwrap();
        let views = st.node_views();
        assert_eq!(
            views[0].allocated,
            st.allocated(&NodeName::parse("a").unwrap())
        );
        assert!(views[0].has_free_port);
        create(&mut st, 5, "t3", Some("a")).unwrap();
        let views = st.node_views();
        assert_eq!(views[0].allocated, res(1000, 1024, 2));
        assert!(!views[0].has_free_port, "both ports of a are taken");
        assert!(views[1].has_free_port);
        assert_eq!(views[1].allocated, res(500, 512, 1));
    }

    #[test]
    fn the_index_survives_a_snapshot_round_trip() {
        let mut st = ClusterState::default();
        st.apply(1, Command::RegisterNode(node("a", res(8000, 8192, 100))))
            .unwrap();
        create(&mut st, 2, "t1", Some("a")).unwrap();
        create(&mut st, 3, "t2", Some("a")).unwrap();
        let json = serde_json::to_string(&st).unwrap();
        assert!(
            !json.contains("by_node"),
            "the index is derived, never stored"
        );
        // Read back from what this version writes, and from JSON as older versions wrote it.
        for bytes in [crate::codec::encode(&st).unwrap(), json.into_bytes()] {
            let back: ClusterState = crate::codec::decode(&bytes).unwrap();
            assert_eq!(back, st);
            assert_eq!(
                back.allocated(&NodeName::parse("a").unwrap()),
                res(1000, 1024, 2)
            );
        }
    }

    #[test]
    fn commands_round_trip_through_the_stored_format_optional_fields_included() {
        let a = NodeName::parse("a").unwrap();
        let commands = [
            Command::RegisterNode(node("a", res(8000, 8192, 100))),
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Down,
                decided_in_term: None,
            },
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Ready,
                decided_in_term: Some(4),
            },
            Command::ForgetTombstone {
                node: a,
                name: tname("t"),
                uid: 2,
            },
        ];
        for command in commands {
            let bytes = crate::codec::encode(&command).unwrap();
            let back: Command = crate::codec::decode(&bytes).unwrap();
            assert_eq!(format!("{back:?}"), format!("{command:?}"));
        }
    }

    #[test]
    fn freed_ports_are_given_again_lowest_first() {
        let mut st = ClusterState::default();
        st.apply(1, Command::RegisterNode(node("a", res(8000, 8192, 100))))
            .unwrap();
        for (i, name) in ["t1", "t2", "t3"].iter().enumerate() {
            create(&mut st, 2 + i as u64, name, Some("a")).unwrap();
        }
        let t2 = TenantName::parse("t2").unwrap();
        st.apply(10, Command::RemoveTenant { name: t2, uid: 3 })
            .unwrap();
        let Outcome::Tenant(t4) = create(&mut st, 11, "t4", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!(t4.port, Some(20001));
        let Outcome::Tenant(t5) = create(&mut st, 12, "t5", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!(t5.port, Some(20003));
    }

    #[test]
    fn a_node_with_every_port_taken_is_full_even_after_its_range_moved() {
        let mut st = ClusterState::default();
        let mut a = node("a", res(8000, 8192, 100));
        a.port_range = (20000, 20001);
        st.apply(1, Command::RegisterNode(a.clone())).unwrap();
        create(&mut st, 2, "t1", Some("a")).unwrap();
        assert!(st.node_views()[0].has_free_port);
        create(&mut st, 3, "t2", Some("a")).unwrap();
        assert!(!st.node_views()[0].has_free_port);
        // The agent came back with a range that keeps one of the used ports.
        a.port_range = (20001, 20002);
        st.apply(4, Command::RegisterNode(a)).unwrap();
        assert!(st.node_views()[0].has_free_port);
        let Outcome::Tenant(t3) = create(&mut st, 5, "t3", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!(t3.port, Some(20002));
        assert!(!st.node_views()[0].has_free_port);
    }

    #[test]
    fn the_first_cluster_id_applied_is_kept_and_survives_a_snapshot() {
        let mut st = ClusterState::default();
        assert_eq!(st.cluster_id, None);
        st.apply(1, Command::SetClusterId("3a".into())).unwrap();
        // A second leader's proposal (it had not applied the first yet) changes nothing.
        assert_eq!(
            st.apply(2, Command::SetClusterId("9f".into())),
            Ok(Outcome::Nothing)
        );
        assert_eq!(st.cluster_id.as_deref(), Some("3a"));
        let back: ClusterState =
            serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back.cluster_id.as_deref(), Some("3a"));
    }

    #[test]
    fn a_snapshot_written_before_identities_and_restarts_loads() {
        let st = node_a_with_tenant_t();
        let mut json = serde_json::to_value(&st).unwrap();
        json.as_object_mut().unwrap().remove("cluster_id");
        json["tenants"]["t"]
            .as_object_mut()
            .unwrap()
            .remove("restart_generation");
        let back: ClusterState = serde_json::from_value(json).unwrap();
        assert_eq!(back.cluster_id, None);
        assert_eq!(back, st);
    }

    #[test]
    fn a_snapshot_written_before_hibernation_loads_with_the_default_policy() {
        let st = node_a_with_tenant_t();
        let mut json = serde_json::to_value(&st).unwrap();
        let tenant = json["tenants"]["t"].as_object_mut().unwrap();
        for field in [
            "idle_after",
            "hibernate",
            "hibernate_generation",
            "wake_generation",
        ] {
            assert!(tenant.remove(field).is_some(), "{field} is stored");
        }
        let back: ClusterState = serde_json::from_value(json).unwrap();
        assert_eq!(back, st);
        let t = &back.tenants[&TenantName::parse("t").unwrap()];
        assert_eq!(t.idle_after.to_string(), "10m");
        assert_eq!(t.hibernate, HibernateMode::Stop);
        assert_eq!((t.hibernate_generation, t.wake_generation), (0, 0));
        // And a create logged then, without the spec's policy, gives the defaults too.
        let json = r#"{"name":"u","engine":"postgres","resources":{"cpu":500,"memory":536870912,"storage":1073741824}}"#;
        let old: TenantSpec = serde_json::from_str(json).unwrap();
        assert_eq!(old, spec("u", res(500, 512, 1)));
    }

    #[test]
    fn restart_raises_the_generation_of_a_placed_tenant_and_refuses_the_others() {
        let mut st = node_a_with_tenant_t();
        let name = |n: &str| TenantName::parse(n).unwrap();
        let restart = |n: &str, uid| Command::RestartTenant { name: name(n), uid };
        for (index, want) in [(3, 1), (4, 2)] {
            let Outcome::Tenant(t) = st.apply(index, restart("t", 2)).unwrap() else {
                panic!()
            };
            assert_eq!(t.restart_generation, want);
        }
        // Another tenant of the same name (an older uid) is not this one.
        assert_eq!(
            st.apply(5, restart("t", 99)),
            Err(ApplyError::TenantNotFound("t".into()))
        );
        create(&mut st, 6, "p", None).unwrap();
        let before = st.clone();
        let err = st.apply(7, restart("p", 6)).unwrap_err();
        assert_eq!(
            err,
            ApplyError::NotPlaced {
                tenant: "p".into(),
                action: EngineAction::Restart
            }
        );
        assert_eq!(
            err.to_string(),
            "name: tenant \"p\" is pending: it runs on no node yet, so there is no engine to restart"
        );
        assert!(
            err.to_string().starts_with("name: tenant \"p\" is pending"),
            "{err}"
        );
        assert_eq!(st, before);
        st.apply(8, Command::DeleteTenant { name: name("t") })
            .unwrap();
        let before = st.clone();
        assert_eq!(
            st.apply(9, restart("t", 2)),
            Err(ApplyError::Deleting("t".into()))
        );
        assert_eq!(st, before);
    }

    #[test]
    fn hibernate_and_wake_raise_their_own_generations_like_restart_and_refuse_the_same_tenants() {
        let mut st = node_a_with_tenant_t();
        let name = |n: &str| TenantName::parse(n).unwrap();
        let hibernate = |n: &str, uid| Command::HibernateTenant { name: name(n), uid };
        let wake = |n: &str, uid| Command::WakeTenant { name: name(n), uid };
        let generations = |t: &TenantRecord| {
            (
                t.restart_generation,
                t.hibernate_generation,
                t.wake_generation,
            )
        };
        let Outcome::Tenant(t) = st.apply(3, hibernate("t", 2)).unwrap() else {
            panic!()
        };
        assert_eq!(generations(&t), (0, 1, 0));
        for (index, want) in [(4, 1), (5, 2)] {
            let Outcome::Tenant(t) = st.apply(index, wake("t", 2)).unwrap() else {
                panic!()
            };
            assert_eq!(generations(&t), (0, 1, want));
        }
        // The state is the agent's to report: asking changes only the generation.
        assert_eq!(st.tenants[&name("t")].state, TenantState::Starting);
        // Another tenant of the same name (an older uid) is not this one.
        for command in [hibernate("t", 99), wake("t", 99)] {
            assert_eq!(
                st.apply(6, command),
                Err(ApplyError::TenantNotFound("t".into()))
            );
        }
        create(&mut st, 7, "p", None).unwrap();
        let before = st.clone();
        for (command, action) in [
            (hibernate("p", 7), EngineAction::Hibernate),
            (wake("p", 7), EngineAction::Wake),
        ] {
            let err = st.apply(8, command).unwrap_err();
            assert_eq!(
                err,
                ApplyError::NotPlaced {
                    tenant: "p".into(),
                    action
                }
            );
            assert!(
                err.to_string()
                    .ends_with(&format!("so there is no engine to {action}")),
                "{err}"
            );
        }
        assert_eq!(st, before);
        st.apply(9, Command::DeleteTenant { name: name("t") })
            .unwrap();
        let before = st.clone();
        for command in [hibernate("t", 2), wake("t", 2)] {
            assert_eq!(st.apply(10, command), Err(ApplyError::Deleting("t".into())));
        }
        assert_eq!(st, before);
    }

    #[test]
    fn a_tenant_is_created_and_updated_with_its_hibernation_policy() {
        let mut st = node_a_with_tenant_t();
        let t = TenantName::parse("t").unwrap();
        assert_eq!(st.tenants[&t].idle_after, IdleAfter::default());
        assert_eq!(st.tenants[&t].hibernate, HibernateMode::Stop);
        let mut sleepy = spec("sleepy", res(500, 512, 1));
        sleepy.idle_after = IdleAfter::After(std::time::Duration::from_secs(30));
        sleepy.hibernate = HibernateMode::Freeze;
        let Outcome::Tenant(created) = st
            .apply(
                3,
                Command::CreateTenant {
                    spec: sleepy,
                    password: "pw".into(),
                    node: Some(NodeName::parse("a").unwrap()),
                    pending_reason: None,
                    overcommit: 1.0,
                },
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(created.idle_after.to_string(), "30s");
        assert_eq!(created.hibernate, HibernateMode::Freeze);
        let update = |idle_after, hibernate| Command::UpdateTenant {
            name: t.clone(),
            uid: 2,
            resources: res(500, 512, 1),
            overcommit: 1.0,
            idle_after,
            hibernate,
        };
        let Outcome::Tenant(u) = st.apply(4, update(Some(IdleAfter::Never), None)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (u.idle_after, u.hibernate),
            (IdleAfter::Never, HibernateMode::Stop)
        );
        let Outcome::Tenant(u) = st
            .apply(5, update(None, Some(HibernateMode::Freeze)))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (u.idle_after, u.hibernate),
            (IdleAfter::Never, HibernateMode::Freeze),
            "None leaves a field unchanged"
        );
        assert_eq!(u.resources, res(500, 512, 1));
    }

    #[test]
    fn a_policy_update_needs_no_room_on_a_node_that_shrank() {
        let mut st = node_a_with_tenant_t();
        // The agent came back smaller than what its tenant reserves.
        st.apply(3, Command::RegisterNode(node("a", res(100, 4096, 100))))
            .unwrap();
        let Outcome::Tenant(t) = st
            .apply(
                4,
                Command::UpdateTenant {
                    name: TenantName::parse("t").unwrap(),
                    uid: 2,
                    resources: res(500, 512, 1),
                    overcommit: 1.0,
                    idle_after: Some(IdleAfter::Never),
                    hibernate: None,
                },
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(t.idle_after, IdleAfter::Never);
    }

    #[test]
    fn an_update_logged_before_hibernation_existed_leaves_the_policy_alone() {
        let json = r#"{"UpdateTenant":{"name":"t","uid":2,"resources":{"cpu":500,"memory":536870912,"storage":1073741824},"overcommit":1.0}}"#;
        let command: Command = serde_json::from_str(json).unwrap();
        let Command::UpdateTenant {
            idle_after,
            hibernate,
            ..
        } = command
        else {
            panic!("{command:?}")
        };
        assert_eq!((idle_after, hibernate), (None, None));
    }

    #[test]
    fn a_tenant_hibernates_wakes_and_fails_and_a_lost_one_comes_back_as_it_was() {
        let mut st = node_a_with_tenant_t();
        let name = TenantName::parse("t").unwrap();
        let a = NodeName::parse("a").unwrap();
        let allocated = st.allocated(&a);
        let mut index = 2;
        let mut observe = |st: &mut ClusterState, state| {
            index += 1;
            st.apply(
                index,
                Command::ObserveTenant {
                    node: a.clone(),
                    name: name.clone(),
                    uid: 2,
                    state,
                    reason: None,
                },
            )
            .unwrap()
        };
        for state in [
            TenantState::Running,
            TenantState::Hibernated,
            TenantState::Waking,
            TenantState::Running,
            TenantState::Hibernated,
            TenantState::Failed,
            TenantState::Hibernated,
            TenantState::Waking,
            TenantState::Failed,
            TenantState::Starting,
            TenantState::Running,
            TenantState::Hibernated,
        ] {
            let Outcome::Tenant(t) = observe(&mut st, state) else {
                panic!()
            };
            assert_eq!(t.state, state);
            // Hibernated, the tenant keeps its reservation and its port.
            assert_eq!(st.allocated(&a), allocated, "{state}");
            assert_eq!(t.port, Some(20000));
        }
        st.apply(
            100,
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Down,
                decided_in_term: None,
            },
        )
        .unwrap();
        assert_eq!(st.tenants[&name].state, TenantState::Lost);
        assert_eq!(st.tenants[&name].lost_from, Some(TenantState::Hibernated));
        st.apply(
            101,
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Ready,
                decided_in_term: None,
            },
        )
        .unwrap();
        assert_eq!(st.tenants[&name].state, TenantState::Hibernated);
        assert_eq!(st.allocated(&a), allocated);
    }

    #[test]
    fn the_reportable_states_are_listed_in_the_refusal() {
        assert_eq!(
            agent_reported_states_list(),
            "starting, running, hibernated, waking or failed"
        );
        let err = ApplyError::NotReportable {
            tenant: "t".into(),
            state: TenantState::Lost,
        };
        assert_eq!(
            err.to_string(),
            "state: tenant \"t\" reported lost; an agent reports only starting, running, \
             hibernated, waking or failed"
        );
    }

    #[test]
    fn an_agent_reports_only_its_states_and_only_for_its_own_tenants() {
        let mut st = node_a_with_tenant_t();
        st.apply(3, Command::RegisterNode(node("b", res(2000, 4096, 100))))
            .unwrap();
        let observe = |node: &str, uid, state| Command::ObserveTenant {
            node: NodeName::parse(node).unwrap(),
            name: TenantName::parse("t").unwrap(),
            uid,
            state,
            reason: None,
        };
        st.apply(4, observe("a", 2, TenantState::Running)).unwrap();
        let before = st.clone();
        for state in [
            TenantState::Pending,
            TenantState::Lost,
            // Deleting is the agent's own word only for a tenant it was told to delete.
            TenantState::Deleting,
        ] {
            let err = st.apply(5, observe("a", 2, state)).unwrap_err();
            assert_eq!(
                err,
                ApplyError::NotReportable {
                    tenant: "t".into(),
                    state
                }
            );
            assert!(err.to_string().starts_with("state: "), "{err}");
            assert_eq!(st, before, "{state} changed the state");
        }
        // Node b speaking for a's tenant, or a for another tenant of the name, changes nothing.
        assert_eq!(
            st.apply(6, observe("b", 2, TenantState::Failed)),
            Ok(Outcome::Nothing)
        );
        assert!(st.apply(7, observe("a", 99, TenantState::Failed)).is_err());
        assert_eq!(st, before);
        for state in AGENT_REPORTED_STATES {
            let Outcome::Tenant(t) = st.apply(8, observe("a", 2, state)).unwrap() else {
                panic!()
            };
            assert_eq!(t.state, state);
        }
    }

    #[test]
    fn a_tenant_on_a_cordoned_node_can_still_grow_where_there_is_room() {
        let mut st = node_a_with_tenant_t();
        let a = NodeName::parse("a").unwrap();
        st.apply(
            3,
            Command::SetNodeCordon {
                node: a,
                cordoned: true,
            },
        )
        .unwrap();
        let name = TenantName::parse("t").unwrap();
        let grow = |cpu| Command::UpdateTenant {
            name: name.clone(),
            uid: 2,
            resources: res(cpu, 512, 1),
            overcommit: 1.0,
            idle_after: None,
            hibernate: None,
        };
        let Outcome::Tenant(t) = st.apply(4, grow(1500)).unwrap() else {
            panic!()
        };
        assert_eq!(t.resources.cpu.0, 1500);
        let err = st.apply(5, grow(2500)).unwrap_err();
        assert!(matches!(err, ApplyError::DoesNotFit { .. }), "{err}");
        assert!(
            err.to_string().contains("a: 2 CPU free, 2.5 asked"),
            "{err}"
        );
    }

    fn tname(n: &str) -> TenantName {
        TenantName::parse(n).unwrap()
    }

    fn down(st: &mut ClusterState, index: u64, node: &str) {
        st.apply(
            index,
            Command::SetNodeStatus {
                node: NodeName::parse(node).unwrap(),
                status: NodeStatus::Down,
                decided_in_term: None,
            },
        )
        .unwrap();
    }

    #[test]
    fn a_forced_delete_frees_the_name_and_reservation_and_leaves_a_tombstone_holding_the_port() {
        let mut st = node_a_with_tenant_t();
        let a = NodeName::parse("a").unwrap();
        let port = st.tenants[&tname("t")].port.unwrap();
        // Refused while the node is ready: a plain delete does it there.
        let err = st
            .apply(
                3,
                Command::ForceDeleteTenant {
                    name: tname("t"),
                    uid: 2,
                },
            )
            .unwrap_err();
        assert!(matches!(err, ApplyError::ForceOnReadyNode { .. }), "{err}");
        down(&mut st, 4, "a");
        // Another uid under the name is not this tenant.
        assert!(matches!(
            st.apply(
                5,
                Command::ForceDeleteTenant {
                    name: tname("t"),
                    uid: 9
                }
            ),
            Err(ApplyError::TenantNotFound(_))
        ));
        st.apply(
            6,
            Command::ForceDeleteTenant {
                name: tname("t"),
                uid: 2,
            },
        )
        .unwrap();
        assert!(!st.tenants.contains_key(&tname("t")));
        assert_eq!(st.allocated(&a), Resources::default());
        assert_eq!(
            st.tombstones[&a][&tname("t")],
            Tombstone {
                uid: 2,
                port: Some(port),
                deleted_at: 6
            }
        );
        // The name is free at once; the port stays taken on `a` until its agent confirms.
        st.apply(
            7,
            Command::SetNodeStatus {
                node: a.clone(),
                status: NodeStatus::Ready,
                decided_in_term: None,
            },
        )
        .unwrap();
        // The name is free: a tenant of it may be created, but not placed on `a` while `a` has
        // the earlier one to remove (one tombstone per name and node).
        let Outcome::Tenant(again) = create(&mut st, 8, "t", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!(again.state, TenantState::Pending);
        assert!(
            again
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("still removing an earlier tenant"),
            "{again:?}"
        );
        let Outcome::Tenant(other) = create(&mut st, 9, "u", Some("a")).unwrap() else {
            panic!()
        };
        assert_ne!(other.port, Some(port));
        // A snapshot keeps the tombstone, and the index rebuilt from it holds the port.
        let restored: ClusterState =
            crate::codec::decode(&crate::codec::encode(&st).unwrap()).unwrap();
        assert_eq!(restored, st);
        st.apply(
            10,
            Command::ForgetTombstone {
                node: a.clone(),
                name: tname("t"),
                uid: 2,
            },
        )
        .unwrap();
        assert!(st.tombstones.is_empty());
        assert!(!st.by_node[&a].ports.contains(&port));
        // Now the waiting `t` may go to `a`.
        st.apply(
            11,
            Command::AssignTenant {
                name: tname("t"),
                uid: 8,
                node: a.clone(),
                overcommit: 1.0,
            },
        )
        .unwrap();
        assert_eq!(st.tenants[&tname("t")].node.as_ref(), Some(&a));
    }

    #[test]
    fn a_node_is_removed_only_when_down_and_empty_unless_forced() {
        let mut st = node_a_with_tenant_t();
        let a = NodeName::parse("a").unwrap();
        let remove = |force| Command::RemoveNode {
            node: a.clone(),
            force,
        };
        assert!(matches!(
            st.apply(3, remove(false)),
            Err(ApplyError::NodeReady(_))
        ));
        down(&mut st, 4, "a");
        let err = st.apply(5, remove(false)).unwrap_err();
        assert!(err.to_string().contains("holds tenants (t)"), "{err}");
        assert_eq!(
            st.apply(6, remove(true)),
            Ok(Outcome::NodeRemoved(vec![tname("t")]))
        );
        assert!(st.nodes.is_empty() && st.tenants.is_empty());
        assert!(st.tombstones[&a].contains_key(&tname("t")));
        // The node registering again finds its port taken by the tombstone.
        st.apply(7, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        let Outcome::Tenant(next) = create(&mut st, 8, "u", Some("a")).unwrap() else {
            panic!()
        };
        assert_eq!(next.port, Some(20001));
        // Removing an empty node that is down needs no force.
        let mut st = ClusterState::default();
        st.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        down(&mut st, 2, "a");
        assert_eq!(st.apply(3, remove(false)), Ok(Outcome::NodeRemoved(vec![])));
    }
}

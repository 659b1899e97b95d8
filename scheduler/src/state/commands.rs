//! The commands a log entry carries, and what applying one produces.

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{NodeName, NodeStatus, Resources, TenantName, TenantState, TenantUid};
use serde::{Deserialize, Serialize};

use super::records::*;

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
        uid: TenantUid,
        node: NodeName,
        overcommit: f64,
    },
    /// Record why a pending tenant still fits nowhere. No longer proposed (`pending` works the
    /// reason out on read); applied from logs that older schedulers wrote.
    SetPendingReason {
        name: TenantName,
        uid: TenantUid,
        reason: String,
    },
    /// Change a tenant's resources (on its node they must still fit; storage only grows) and its
    /// hibernation policy (`None`: unchanged; entries written before it existed have none).
    UpdateTenant {
        name: TenantName,
        uid: TenantUid,
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
        uid: TenantUid,
    },
    /// Hibernate a placed tenant now, as if it were idle: raises its hibernate generation.
    HibernateTenant {
        name: TenantName,
        uid: TenantUid,
    },
    /// Wake a placed tenant now, as if a client connected: raises its wake generation.
    WakeTenant {
        name: TenantName,
        uid: TenantUid,
    },
    /// An agent reported a tenant's state changed.
    ObserveTenant {
        node: NodeName,
        name: TenantName,
        uid: TenantUid,
        state: TenantState,
        reason: Option<String>,
    },
    /// The tenant's node confirmed it is gone.
    RemoveTenant {
        name: TenantName,
        uid: TenantUid,
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
        uid: TenantUid,
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
        uid: TenantUid,
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

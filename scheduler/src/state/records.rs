//! The records the state holds: nodes as they registered, tenants as asked for and placed, and
//! tombstones of tenants deleted with `--force`.

use std::collections::{BTreeMap, BTreeSet};

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{
    EngineAccess, NodeName, NodeStatus, Resources, TenantName, TenantState, TenantUid,
};
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
    /// How clients reach each engine's tenants, as the agent reported at registration; empty
    /// for a node whose agent predates the report (see `EngineAccess::defaults_for`).
    #[serde(default)]
    pub engine_access: BTreeMap<String, EngineAccess>,
}

impl NodeRecord {
    /// The admin user and URI form of `engine`'s tenants on this node.
    pub fn access(&self, engine: &str) -> EngineAccess {
        self.engine_access
            .get(engine)
            .cloned()
            .unwrap_or_else(|| EngineAccess::defaults_for(engine))
    }

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
    pub uid: TenantUid,
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

/// A tenant deleted with `--force` while its node was down or gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub uid: TenantUid,
    pub port: Option<u16>,
    /// The log index of the forced delete: an agent that saw a desired set this recent and no
    /// longer reports the tenant has removed it.
    pub deleted_at: u64,
}

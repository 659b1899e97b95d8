//! One log event per change of a tenant's state or a node's status, with its name: what an
//! operator greps the journal for (`tenant_id=acme`), or a log shipper reads with
//! `log_format = "json"`. Taken from the applied state before and after each command, so every
//! path that changes one (an operator's call, a heartbeat, the liveness watch, a forced delete)
//! is covered, on every replica, with the log index that made the change.

use dormant_common::{NodeName, NodeStatus, TenantName, TenantState};
use tracing::info;

use crate::state::{ClusterState, Command};

/// What one command may change, as it was before it applied.
#[derive(Debug)]
pub struct Before {
    tenants: Vec<(TenantName, Option<TenantLook>)>,
    nodes: Vec<(NodeName, Option<NodeLook>)>,
}

#[derive(Debug, Clone, PartialEq)]
struct TenantLook {
    state: TenantState,
    node: Option<NodeName>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct NodeLook {
    status: NodeStatus,
    cordoned: bool,
}

fn tenant(cluster: &ClusterState, name: &TenantName) -> Option<TenantLook> {
    cluster.tenants.get(name).map(|t| TenantLook {
        state: t.state,
        node: t.node.clone(),
    })
}

fn node(cluster: &ClusterState, name: &NodeName) -> Option<NodeLook> {
    cluster.nodes.get(name).map(|n| NodeLook {
        status: n.status,
        cordoned: n.cordoned,
    })
}

impl Before {
    /// Notes what `command` may change in `cluster`, before it applies.
    pub fn note(cluster: &ClusterState, command: &Command) -> Self {
        let mut tenants = Vec::new();
        let mut nodes = Vec::new();
        match command {
            // A batch is noted command by command, by the state machine.
            Command::SetClusterId(_) | Command::SetPendingReason { .. } | Command::Batch(_) => {}
            // Registering again brings a node's lost tenants back.
            Command::RegisterNode(record) => {
                nodes.push(record.id.clone());
                tenants.extend(cluster.tenants_on(&record.id).map(|t| t.name.clone()));
            }
            Command::CreateTenant { spec, .. } => tenants.push(spec.name.clone()),
            Command::AssignTenant { name, .. }
            | Command::UpdateTenant { name, .. }
            | Command::DeleteTenant { name }
            | Command::RestartTenant { name, .. }
            | Command::HibernateTenant { name, .. }
            | Command::WakeTenant { name, .. }
            | Command::ObserveTenant { name, .. }
            | Command::RemoveTenant { name, .. }
            | Command::ForceDeleteTenant { name, .. }
            | Command::ForgetTombstone { name, .. } => tenants.push(name.clone()),
            // These change the node and every tenant on it (lost, back, deleted with it).
            Command::SetNodeStatus { node, .. }
            | Command::SetNodeCordon { node, .. }
            | Command::RemoveNode { node, .. } => {
                nodes.push(node.clone());
                tenants.extend(cluster.tenants_on(node).map(|t| t.name.clone()));
            }
        }
        Self {
            tenants: tenants
                .into_iter()
                .map(|name| {
                    let look = tenant(cluster, &name);
                    (name, look)
                })
                .collect(),
            nodes: nodes
                .into_iter()
                .map(|name| {
                    let look = node(cluster, &name);
                    (name, look)
                })
                .collect(),
        }
    }

    /// Logs what changed, comparing with `cluster` after the command applied at `index`.
    pub fn log_changes(self, cluster: &ClusterState, index: u64) {
        for (name, before) in self.nodes {
            match (before, node(cluster, &name)) {
                (None, Some(now)) => {
                    info!(node_id = %name, status = %now.status, index, "node registered");
                }
                (Some(_), None) => info!(node_id = %name, index, "node removed"),
                (Some(was), Some(now)) if was != now => {
                    info!(node_id = %name, from = %was.status, to = %now.status, cordoned = now.cordoned, index, "node status changed");
                }
                _ => {}
            }
        }
        for (name, before) in self.tenants {
            let now = tenant(cluster, &name);
            let node_of = |look: &TenantLook| {
                look.node
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            };
            match (before, now) {
                (None, Some(now)) => {
                    info!(tenant_id = %name, state = %now.state, node_id = %node_of(&now), index, "tenant created");
                }
                (Some(was), None) => {
                    info!(tenant_id = %name, from = %was.state, node_id = %node_of(&was), index, "tenant removed");
                }
                (Some(was), Some(now)) if was != now => {
                    info!(tenant_id = %name, from = %was.state, to = %now.state, node_id = %node_of(&now), index, "tenant state changed");
                }
                _ => {}
            }
        }
    }
}

//! What a node's heartbeat changes, decided from the applied state alone: no clock, no I/O, no
//! Raft. The agent API's handler proposes the commands this returns, in order, and records the
//! usage of the reports it accepted.
//!
//! The rules: a node heard from while down is back first (so its tenants' lost states return
//! before new reports land); an agent speaks only for tenants placed on its node, as the uid it
//! was given; it may report only the states it decides (`AGENT_REPORTED_STATES`); a tenant
//! being deleted is gone once a node that saw the delete no longer reports it, and so is a
//! tombstone's tenant.

use std::collections::HashSet;

use dormant_common::{NodeName, NodeStatus, TenantName, TenantState, TenantUid};
use tracing::{debug, warn};

use crate::state::{
    agent_reported_states_list, ClusterState, Command, DesiredState, AGENT_REPORTED_STATES,
};

/// One tenant as a heartbeat reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub name: TenantName,
    pub uid: TenantUid,
    pub state: TenantState,
    pub reason: Option<String>,
}

/// What one heartbeat changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The node is not registered (forgotten, or removed): it must register again.
    RegisterAgain,
    Changes {
        /// To propose, in this order.
        commands: Vec<Command>,
        /// The reports (by position) about this node's own tenants: their usage is kept.
        accepted: Vec<usize>,
    },
}

/// The decision for a heartbeat from `node` with `reports`, from an agent that has seen the
/// desired set of version `seen_version`, answered by a leader of `term`.
pub fn decide(
    cluster: &ClusterState,
    node: &NodeName,
    reports: &[Report],
    seen_version: u64,
    term: u64,
) -> Decision {
    let Some(record) = cluster.nodes.get(node) else {
        return Decision::RegisterAgain;
    };
    let mut commands = Vec::new();
    if record.status == NodeStatus::Down {
        commands.push(Command::SetNodeStatus {
            node: node.clone(),
            status: NodeStatus::Ready,
            decided_in_term: Some(term),
        });
    }
    let mut accepted = Vec::with_capacity(reports.len());
    for (i, o) in reports.iter().enumerate() {
        // A tenant moved or deleted and created again, a confused agent: someone else's.
        let Some(rec) = cluster
            .tenants
            .get(&o.name)
            .filter(|r| r.uid == o.uid && r.node.as_ref() == Some(node))
        else {
            debug!(node_id = %node, tenant_id = %o.name, uid = o.uid.get(), state = %o.state, "ignoring a report about a tenant not placed on this node as this uid");
            continue;
        };
        accepted.push(i);
        if rec.desired != DesiredState::Running {
            // Being deleted: the agent's acknowledgement is the tenant's absence, below.
            continue;
        }
        if !AGENT_REPORTED_STATES.contains(&o.state) {
            warn!(node_id = %node, tenant_id = %o.name, state = %o.state, "ignoring a state an agent may not report (only {})", agent_reported_states_list());
            continue;
        }
        if rec.state != o.state || rec.reason != o.reason {
            commands.push(Command::ObserveTenant {
                node: node.clone(),
                name: o.name.clone(),
                uid: o.uid,
                state: o.state,
                reason: o.reason.clone(),
            });
        }
    }
    let reported: HashSet<(&TenantName, TenantUid)> =
        reports.iter().map(|o| (&o.name, o.uid)).collect();
    for (name, stone) in cluster.tombstones.get(node).into_iter().flatten() {
        if seen_version >= stone.deleted_at && !reported.contains(&(name, stone.uid)) {
            commands.push(Command::ForgetTombstone {
                node: node.clone(),
                name: name.clone(),
                uid: stone.uid,
            });
        }
    }
    for rec in cluster.tenants_on(node) {
        let seen_delete = rec.deleted_at.is_some_and(|at| seen_version >= at);
        if rec.desired == DesiredState::Deleted
            && seen_delete
            && !reported.contains(&(&rec.name, rec.uid))
        {
            commands.push(Command::RemoveTenant {
                name: rec.name.clone(),
                uid: rec.uid,
            });
        }
    }
    Decision::Changes { commands, accepted }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_utils::{node, res, spec};

    fn n(name: &str) -> NodeName {
        NodeName::parse(name).unwrap()
    }

    fn t(name: &str) -> TenantName {
        TenantName::parse(name).unwrap()
    }

    /// Node `a` with tenant `t` (uid 2) placed on it.
    fn cluster() -> ClusterState {
        let mut c = ClusterState::default();
        c.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        c.apply(
            2,
            Command::CreateTenant {
                spec: spec("t", res(100, 64, 1)),
                password: "pw".into(),
                node: Some(n("a")),
                pending_reason: None,
                overcommit: 1.0,
            },
        )
        .unwrap();
        c
    }

    fn report(name: &str, uid: TenantUid, state: TenantState) -> Report {
        Report {
            name: t(name),
            uid,
            state,
            reason: None,
        }
    }

    fn changes(d: Decision) -> (Vec<Command>, Vec<usize>) {
        match d {
            Decision::Changes { commands, accepted } => (commands, accepted),
            Decision::RegisterAgain => panic!("register again"),
        }
    }

    #[test]
    fn an_unknown_node_must_register_again() {
        assert_eq!(
            decide(&cluster(), &n("b"), &[], 0, 1),
            Decision::RegisterAgain
        );
    }

    #[test]
    fn a_changed_state_is_observed_and_others_reports_are_ignored() {
        let c = cluster();
        let reports = [
            report("t", TenantUid::new(2), TenantState::Running),
            // Another uid under the name, and a tenant not placed here.
            report("t", TenantUid::new(9), TenantState::Failed),
            report("other", TenantUid::new(3), TenantState::Running),
            // A state only the scheduler decides.
            report("t", TenantUid::new(2), TenantState::Lost),
        ];
        let (commands, accepted) = changes(decide(&c, &n("a"), &reports, 2, 1));
        assert_eq!(accepted, [0, 3]);
        assert_eq!(
            commands,
            [Command::ObserveTenant {
                node: n("a"),
                name: t("t"),
                uid: TenantUid::new(2),
                state: TenantState::Running,
                reason: None,
            }]
        );
        // Nothing new: nothing to propose.
        let (commands, _) = changes(decide(
            &c,
            &n("a"),
            &[report("t", TenantUid::new(2), TenantState::Starting)],
            2,
            1,
        ));
        assert!(commands.is_empty(), "{commands:?}");
    }

    #[test]
    fn a_down_node_comes_back_first_in_the_term_that_heard_it() {
        let mut c = cluster();
        c.apply(
            3,
            Command::SetNodeStatus {
                node: n("a"),
                status: NodeStatus::Down,
                decided_in_term: None,
            },
        )
        .unwrap();
        let (commands, _) = changes(decide(
            &c,
            &n("a"),
            &[report("t", TenantUid::new(2), TenantState::Running)],
            3,
            7,
        ));
        assert_eq!(
            commands[0],
            Command::SetNodeStatus {
                node: n("a"),
                status: NodeStatus::Ready,
                decided_in_term: Some(7),
            }
        );
    }

    #[test]
    fn a_deleted_tenant_goes_once_a_node_that_saw_the_delete_stops_reporting_it() {
        let mut c = cluster();
        c.apply(3, Command::DeleteTenant { name: t("t") }).unwrap();
        // Still reported (deleting), or absent from a heartbeat older than the delete: kept.
        let deleting = [report("t", TenantUid::new(2), TenantState::Deleting)];
        assert!(changes(decide(&c, &n("a"), &deleting, 3, 1)).0.is_empty());
        assert!(changes(decide(&c, &n("a"), &[], 2, 1)).0.is_empty());
        let (commands, _) = changes(decide(&c, &n("a"), &[], 3, 1));
        assert_eq!(
            commands,
            [Command::RemoveTenant {
                name: t("t"),
                uid: TenantUid::new(2)
            }]
        );
    }

    #[test]
    fn a_tombstone_is_forgotten_once_a_node_that_saw_it_no_longer_reports_its_tenant() {
        let mut c = cluster();
        c.apply(
            3,
            Command::SetNodeStatus {
                node: n("a"),
                status: NodeStatus::Down,
                decided_in_term: None,
            },
        )
        .unwrap();
        c.apply(
            4,
            Command::ForceDeleteTenant {
                name: t("t"),
                uid: TenantUid::new(2),
            },
        )
        .unwrap();
        let forget = Command::ForgetTombstone {
            node: n("a"),
            name: t("t"),
            uid: TenantUid::new(2),
        };
        // Still reported (being removed), or absent from a heartbeat that predates it: kept.
        let removing = [report("t", TenantUid::new(2), TenantState::Deleting)];
        assert!(!changes(decide(&c, &n("a"), &removing, 4, 1))
            .0
            .contains(&forget));
        assert!(!changes(decide(&c, &n("a"), &[], 3, 1)).0.contains(&forget));
        // Another tenant of that name reported (another uid) does not keep it.
        let other = [report("t", TenantUid::new(9), TenantState::Running)];
        assert!(changes(decide(&c, &n("a"), &other, 4, 1))
            .0
            .contains(&forget));
    }
}

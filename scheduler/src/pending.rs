//! Pending tenants: which one the leader places next, and why the others wait. Both are pure
//! functions of the applied state.
//!
//! Why a tenant waits is worked out when it is read, on the replica that answers, and never
//! written to the log: a reason names the free amounts of every node, so each placement or removal
//! would change the reason of every waiting tenant, one Raft entry each (O(pending) entries per
//! placement, each O(nodes) long). Read this way it is also never stale. The reason a create
//! carries and `SetPendingReason` entries in old logs are still applied, and shown only for a
//! tenant that no longer waits for room (a failed one keeps its own).

use crate::placement::{self, NodeView, Policy};
use crate::state::{ClusterState, Command, DesiredState, TenantRecord};
use dormant_common::TenantState;

/// The command that places the first pending tenant some node has room for, if any. One at a
/// time: the next choice must see this one's reservation.
pub fn next_placement(cluster: &ClusterState, policy: Policy, overcommit: f64) -> Option<Command> {
    let views = cluster.node_views();
    cluster
        .tenants
        .values()
        .filter(|t| waits_for_room(t))
        .find_map(|t| {
            let node = placement::place(&t.ask(), &views, policy, overcommit).ok()?;
            Some(Command::AssignTenant {
                name: t.name.clone(),
                uid: t.uid,
                node,
                overcommit,
            })
        })
}

/// Whether the tenant waits for a node with room: pending and meant to run.
pub fn waits_for_room(t: &TenantRecord) -> bool {
    t.state == TenantState::Pending && t.desired == DesiredState::Running
}

/// Why `t` is in its state, as of `views`: for a tenant waiting for room, what each node lacks
/// now; otherwise the reason recorded with its state, if any.
pub fn reason(t: &TenantRecord, views: &[NodeView<'_>], overcommit: f64) -> Option<String> {
    if !waits_for_room(t) {
        return t.reason.clone();
    }
    // The policy only orders nodes that fit; any will do to learn whether one does.
    Some(
        match placement::place(&t.ask(), views, Policy::BinPack, overcommit) {
            Err(why) => why.to_string(),
            Ok(node) => format!("{node} has room: the leader places it next"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_utils::{node, res, spec};
    use dormant_common::TenantName;

    fn tn(n: &str) -> TenantName {
        TenantName::parse(n).unwrap()
    }

    fn create(cluster: &mut ClusterState, index: u64, name: &str, milli_cpu: u64) {
        cluster
            .apply(
                index,
                Command::CreateTenant {
                    spec: spec(name, res(milli_cpu, 64, 1)),
                    password: "pw".into(),
                    node: None,
                    pending_reason: Some("recorded at create".into()),
                    overcommit: 1.0,
                },
            )
            .unwrap();
    }

    #[test]
    fn the_first_tenant_that_fits_is_placed_and_the_others_wait_with_live_reasons() {
        let mut cluster = ClusterState::default();
        cluster
            .apply(1, Command::RegisterNode(node("a", res(1000, 4096, 100))))
            .unwrap();
        create(&mut cluster, 2, "big", 2000);
        create(&mut cluster, 3, "small", 400);
        create(&mut cluster, 4, "other", 400);
        let Some(Command::AssignTenant { name, node, .. }) =
            next_placement(&cluster, Policy::BinPack, 1.0)
        else {
            panic!("a tenant fits");
        };
        // `big` comes first by name but fits nowhere; `other` is next and fits.
        assert_eq!((name.as_str(), node.as_str()), ("other", "a"));
        let assign = next_placement(&cluster, Policy::BinPack, 1.0).unwrap();
        cluster.apply(5, assign).unwrap();

        let views = cluster.node_views();
        let big = &cluster.tenants[&tn("big")];
        assert_eq!(
            reason(big, &views, 1.0).as_deref(),
            Some("no node has room: a: 0.6 CPU free, 2 asked")
        );
        let small = &cluster.tenants[&tn("small")];
        assert_eq!(
            reason(small, &views, 1.0).as_deref(),
            Some("a has room: the leader places it next")
        );
        // Placing `small` changes what `big` is told, with no entry written for it.
        let assign = next_placement(&cluster, Policy::BinPack, 1.0).unwrap();
        cluster.apply(6, assign).unwrap();
        let views = cluster.node_views();
        let big = &cluster.tenants[&tn("big")];
        assert_eq!(
            reason(big, &views, 1.0).as_deref(),
            Some("no node has room: a: 0.2 CPU free, 2 asked")
        );
        assert!(next_placement(&cluster, Policy::BinPack, 1.0).is_none());
    }

    #[test]
    fn a_waiting_tenant_is_told_what_is_now_and_one_that_does_not_wait_its_recorded_reason() {
        let mut cluster = ClusterState::default();
        create(&mut cluster, 1, "t", 100);
        let views = cluster.node_views();
        let t = &cluster.tenants[&tn("t")];
        // Worked out now, not the reason recorded at create.
        assert_eq!(
            reason(t, &views, 1.0).as_deref(),
            Some("no node is registered")
        );
        let mut failed = t.clone();
        failed.state = TenantState::Failed;
        failed.reason = Some("engine exited 3 times".into());
        assert_eq!(
            reason(&failed, &views, 1.0).as_deref(),
            Some("engine exited 3 times")
        );
    }
}

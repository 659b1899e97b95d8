//! Conversions between the replicated records and their protobuf messages.

use dormant_common::{EngineAccess, NodeStatus, Resources};
use dormant_proto::v1 as pb;

use crate::liveness::Liveness;
use crate::pending;
use crate::state::{ClusterState, NodeRecord, TenantRecord};

pub fn resources_to_pb(r: &Resources) -> pb::Resources {
    r.into()
}

pub fn resources_from_pb(r: &pb::Resources) -> Resources {
    r.into()
}

/// `host:port` where clients reach the tenant, once it is placed.
pub fn endpoint(t: &TenantRecord, cluster: &ClusterState) -> Option<String> {
    let node = cluster.nodes.get(t.node.as_ref()?)?;
    Some(format!("{}:{}", node.address, t.port?))
}

/// The tenant as operators see it; `overcommit` is this replica's ratio, with which it works out
/// why a pending tenant waits (see `pending`).
pub fn tenant_to_pb(
    t: &TenantRecord,
    cluster: &ClusterState,
    live: &Liveness,
    overcommit: f64,
) -> pb::Tenant {
    tenants_to_pb([t], cluster, live, overcommit)
        .pop()
        .unwrap_or_default()
}

/// Every tenant in `tenants` as operators see it, the nodes' views built once for all that wait.
pub fn tenants_to_pb<'a>(
    tenants: impl IntoIterator<Item = &'a TenantRecord>,
    cluster: &ClusterState,
    live: &Liveness,
    overcommit: f64,
) -> Vec<pb::Tenant> {
    let views = std::cell::OnceCell::new();
    tenants
        .into_iter()
        .map(|t| {
            let reason = if pending::waits_for_room(t) {
                pending::reason(t, views.get_or_init(|| cluster.node_views()), overcommit)
            } else {
                t.reason.clone()
            };
            tenant_to_pb_with_reason(t, cluster, live, reason)
        })
        .collect()
}

fn tenant_to_pb_with_reason(
    t: &TenantRecord,
    cluster: &ClusterState,
    live: &Liveness,
    reason: Option<String>,
) -> pb::Tenant {
    pb::Tenant {
        name: t.name.to_string(),
        engine: t.engine.clone(),
        state: t.state.to_string(),
        node: t.node.as_ref().map(|n| n.to_string()).unwrap_or_default(),
        endpoint: endpoint(t, cluster).unwrap_or_default(),
        resources: Some(resources_to_pb(&t.resources)),
        reason: reason.unwrap_or_default(),
        uid: t.uid.get(),
        usage: live.tenant_usage(&t.name).cloned(),
        constraints: t
            .constraints
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        resize_pending: live
            .resize_pending(&t.name)
            .map(str::to_string)
            .unwrap_or_default(),
        restart_generation: t.restart_generation,
        idle_after: t.idle_after.to_string(),
        hibernate: t.hibernate.as_str().to_string(),
        hibernate_generation: t.hibernate_generation,
        wake_generation: t.wake_generation,
        connections: live.connections(&t.name).to_vec(),
        removed: false,
    }
}

pub fn node_to_pb(n: &NodeRecord, cluster: &ClusterState, live: &Liveness) -> pb::Node {
    pb::Node {
        used: live.node(&n.id).and_then(|seen| seen.usage),
        id: n.id.to_string(),
        address: n.address.clone(),
        // Down says more than cordoned; `cordoned` is shown for a ready node only.
        status: if n.cordoned && n.status == NodeStatus::Ready {
            "cordoned".to_string()
        } else {
            n.status.to_string()
        },
        capacity: Some(resources_to_pb(&n.capacity)),
        allocated: Some(resources_to_pb(&cluster.allocated(&n.id))),
        engines: n.engines.iter().cloned().collect(),
        engine_access: n
            .engine_access
            .iter()
            .map(|(engine, a)| pb::EngineAccess::new(engine, a))
            .collect(),
        cgroup_driver: n.cgroup_driver.clone(),
        tenants: u32::try_from(cluster.tenants_on(&n.id).count()).unwrap_or(u32::MAX),
        labels: n.labels.clone().into_iter().collect(),
        cordoned: n.cordoned,
        removing: cluster
            .tombstones
            .get(&n.id)
            .into_iter()
            .flat_map(|stones| stones.keys().map(ToString::to_string))
            .collect(),
    }
}

/// How clients reach `t`: as its node's agent reported for its engine; for a tenant not placed,
/// as any node that reported that engine does (the agents of a cluster share their engine
/// configs), or what older agents served.
fn engine_access(t: &TenantRecord, cluster: &ClusterState) -> EngineAccess {
    match t.node.as_ref().and_then(|n| cluster.nodes.get(n)) {
        Some(node) => node.access(&t.engine),
        None => cluster
            .nodes
            .values()
            .find_map(|n| n.engine_access.get(&t.engine).cloned())
            .unwrap_or_else(|| EngineAccess::defaults_for(&t.engine)),
    }
}

pub fn credentials(t: &TenantRecord, cluster: &ClusterState) -> pb::Credentials {
    let access = engine_access(t, cluster);
    pb::Credentials {
        uri: endpoint(t, cluster)
            .map(|ep| access.uri(&t.password, &ep))
            .unwrap_or_default(),
        user: access.user,
        password: t.password.clone(),
    }
}

#[cfg(test)]
mod tests {
    use dormant_common::NodeName;

    use super::*;
    use crate::state::test_utils::{node, res, spec};
    use crate::state::{Command, Outcome};

    fn create(st: &mut ClusterState, index: u64, name: &str, on: Option<&str>) -> TenantRecord {
        let command = Command::CreateTenant {
            spec: spec(name, res(500, 512, 1)),
            password: "pw".into(),
            node: on.map(|n| NodeName::parse(n).unwrap()),
            pending_reason: on.is_none().then(|| "no ready node".to_string()),
            overcommit: 1.0,
        };
        match st.apply(index, command) {
            Ok(Outcome::Tenant(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn credentials_use_what_the_tenants_node_reported_or_the_older_agents_defaults() {
        let mut st = ClusterState::default();
        let mut reporting = node("a", res(2000, 4096, 100));
        reporting.engine_access.insert(
            "postgres".into(),
            EngineAccess::new("owner", "postgres", "/app").unwrap(),
        );
        st.apply(1, Command::RegisterNode(reporting)).unwrap();
        // `b` registered by an older agent: no report.
        st.apply(2, Command::RegisterNode(node("b", res(2000, 4096, 100))))
            .unwrap();

        let on_a = credentials(&create(&mut st, 3, "ta", Some("a")), &st);
        assert_eq!(on_a.user, "owner");
        assert_eq!(on_a.uri, "postgres://owner:pw@127.0.0.1:20000/app");
        let on_b = credentials(&create(&mut st, 4, "tb", Some("b")), &st);
        assert_eq!(
            on_b.uri,
            "postgresql://postgres:pw@127.0.0.1:20000/postgres"
        );
        // Not placed: no URI yet, and the user any node that reported the engine names.
        let pending = credentials(&create(&mut st, 5, "tp", None), &st);
        assert_eq!((pending.user.as_str(), pending.uri.as_str()), ("owner", ""));
    }
}

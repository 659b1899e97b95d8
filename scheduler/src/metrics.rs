//! The scheduler's Prometheus metrics (`prometheus-client`), served on `metrics_listen`.
//!
//! Gauges are read at each scrape from what the replica already holds: the applied state
//! (every replica: nodes, their capacity and allocation, tenants by state), openraft's metrics
//! (term, leader, indexes) and, on the leader, what heartbeats said (nodes' usage). Counters
//! ([`Counters`]) count events as they happen on this replica. Series are per node, never per
//! tenant (the agents export those), so their number is bounded by the fleet; label values are
//! escaped by the encoder.

use std::sync::atomic::AtomicU64;

use dormant_common::{NodeStatus, TenantState};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::replica::App;

type Value = Gauge<f64, AtomicU64>;
type Labels = Vec<(&'static str, String)>;

/// Samples the commit index each second (openraft's metrics do not carry it, and reading it
/// takes a call into the Raft core, which a scrape should not wait for).
pub async fn sample_commit_index(app: std::sync::Arc<App>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(committed) = app
            .raft
            .with_raft_state(|st| st.committed.map_or(0, |l| l.index))
            .await
        else {
            // Raft stopped: the replica is on its way out.
            return;
        };
        app.commit_index
            .store(committed, std::sync::atomic::Ordering::Relaxed);
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Value::default();
    g.set(value);
    registry.register(name, help, g);
}

fn family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Value> {
    let f = Family::<Labels, Value>::default();
    registry.register(name, help, f.clone());
    f
}

/// The replica's metrics now, in the OpenMetrics text format.
pub fn render(app: &App) -> String {
    let mut registry = Registry::default();
    raft(app, &mut registry);
    cluster(app, &mut registry);
    let c = &app.counters;
    registry.register(
        "dormant_heartbeats_received",
        "Heartbeats this replica answered as leader",
        c.heartbeats.clone(),
    );
    registry.register(
        "dormant_heartbeats_late",
        "Heartbeats dropped for arriving after their sender stopped waiting",
        c.heartbeats_late.clone(),
    );
    registry.register(
        "dormant_placements",
        "Tenants this replica placed on a node as leader",
        c.placements.clone(),
    );
    registry.register(
        "dormant_placement_refusals",
        "Placements this replica found no room for as leader",
        c.placement_refusals.clone(),
    );
    registry.register(
        "dormant_nodes_marked_down",
        "Nodes this replica marked down as leader: their heartbeats stopped for the grace period",
        c.nodes_marked_down.clone(),
    );
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

fn raft(app: &App, registry: &mut Registry) {
    let (term, leader, last_log, applied, snapshot) = {
        let m = app.raft.metrics();
        let m = m.borrow();
        (
            m.current_term,
            m.current_leader,
            m.last_log_index,
            m.last_applied.map(|l| l.index),
            m.snapshot.map(|l| l.index),
        )
    };
    let as_f64 = |v: Option<u64>| v.unwrap_or(0) as f64;
    gauge(registry, "dormant_raft_term", "Raft term", term as f64);
    gauge(
        registry,
        "dormant_raft_leader_id",
        "The leader's replica id as this replica knows it (0: none)",
        as_f64(leader),
    );
    gauge(
        registry,
        "dormant_raft_is_leader",
        "1 on the leader",
        f64::from(u8::from(leader == Some(app.settings.id))),
    );
    gauge(
        registry,
        "dormant_raft_last_log_index",
        "Index of the last entry in this replica's log",
        as_f64(last_log),
    );
    gauge(
        registry,
        "dormant_raft_applied_index",
        "Index of the last entry applied to this replica's state",
        as_f64(applied),
    );
    gauge(
        registry,
        "dormant_raft_snapshot_index",
        "Index of the last entry this replica's snapshot covers",
        as_f64(snapshot),
    );
    gauge(
        registry,
        "dormant_raft_commit_index",
        "Index of the last entry this replica knows committed (sampled each second)",
        app.commit_index.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    gauge(
        registry,
        "dormant_raft_snapshot_bytes",
        "Size of this replica's stored snapshot",
        app.snapshot_bytes
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
}

fn cluster(app: &App, registry: &mut Registry) {
    let capacity_cpu = family(
        registry,
        "dormant_node_capacity_cpu_cores",
        "Node CPU capacity",
    );
    let capacity_memory = family(
        registry,
        "dormant_node_capacity_memory_bytes",
        "Node memory capacity",
    );
    let capacity_storage = family(
        registry,
        "dormant_node_capacity_storage_bytes",
        "Node storage capacity",
    );
    let allocated_cpu = family(
        registry,
        "dormant_node_allocated_cpu_cores",
        "CPU reserved by the tenants placed on the node",
    );
    let allocated_memory = family(
        registry,
        "dormant_node_allocated_memory_bytes",
        "Memory reserved by the tenants placed on the node",
    );
    let allocated_storage = family(
        registry,
        "dormant_node_allocated_storage_bytes",
        "Storage reserved by the tenants placed on the node",
    );
    let used_cpu = family(
        registry,
        "dormant_node_used_cpu_cores",
        "CPU the node's tenants used, as its last heartbeat said (leader only)",
    );
    let used_memory = family(
        registry,
        "dormant_node_used_memory_bytes",
        "Memory the node's tenants used, as its last heartbeat said (leader only)",
    );
    let used_storage = family(
        registry,
        "dormant_node_used_storage_bytes",
        "Storage used on the node, as its last heartbeat said (leader only)",
    );
    let node_up = family(registry, "dormant_node_ready", "1 while the node is ready");
    let node_tenants = family(
        registry,
        "dormant_node_tenants",
        "Tenants placed on the node",
    );
    let node_awake = family(
        registry,
        "dormant_node_tenants_awake",
        "Tenants on the node whose engine runs (not hibernated)",
    );
    let nodes = family(registry, "dormant_nodes", "Nodes by status");
    let tenants = family(registry, "dormant_tenants", "Tenants by state");

    let sm = app.state.read();
    let cluster = &sm.cluster;
    let live = app.liveness();
    let leading = app.is_leader();
    for status in [NodeStatus::Ready, NodeStatus::Down] {
        let n = cluster
            .nodes
            .values()
            .filter(|n| n.status == status)
            .count();
        nodes
            .get_or_create(&vec![("status", status.as_str().to_string())])
            .set(n as f64);
    }
    for n in cluster.nodes.values() {
        let labels = vec![("node", n.id.to_string())];
        let allocated = cluster.allocated(&n.id);
        capacity_cpu
            .get_or_create(&labels)
            .set(n.capacity.cpu.0 as f64 / 1000.0);
        capacity_memory
            .get_or_create(&labels)
            .set(n.capacity.memory.0 as f64);
        capacity_storage
            .get_or_create(&labels)
            .set(n.capacity.storage.0 as f64);
        allocated_cpu
            .get_or_create(&labels)
            .set(allocated.cpu.0 as f64 / 1000.0);
        allocated_memory
            .get_or_create(&labels)
            .set(allocated.memory.0 as f64);
        allocated_storage
            .get_or_create(&labels)
            .set(allocated.storage.0 as f64);
        node_up
            .get_or_create(&labels)
            .set(f64::from(u8::from(n.status == NodeStatus::Ready)));
        node_tenants
            .get_or_create(&labels)
            .set(cluster.tenants_on(&n.id).count() as f64);
        let awake = cluster
            .tenants_on(&n.id)
            .filter(|t| {
                matches!(
                    t.state,
                    TenantState::Starting | TenantState::Running | TenantState::Waking
                )
            })
            .count();
        node_awake.get_or_create(&labels).set(awake as f64);
        if let Some(usage) = live.node(&n.id).and_then(|s| s.usage).filter(|_| leading) {
            used_cpu
                .get_or_create(&labels)
                .set(usage.cpu_usage_milli as f64 / 1000.0);
            used_memory
                .get_or_create(&labels)
                .set(usage.memory_used_bytes as f64);
            used_storage
                .get_or_create(&labels)
                .set(usage.storage_used_bytes as f64);
        }
    }
    for state in TenantState::ALL {
        let n = cluster
            .tenants
            .values()
            .filter(|t| t.state == state)
            .count();
        tenants
            .get_or_create(&vec![("state", state.to_string())])
            .set(n as f64);
    }
}

//! The agent's Prometheus metrics (`prometheus-client`), served on `metrics_listen`: per tenant
//! on this node, from the latest heartbeat the agent built (refreshed every heartbeat interval).
//! A tenant's series exist while the agent reports it, so a deleted tenant's go with it, and
//! the number of series is bounded by the tenants on the node. Label values are escaped by the
//! encoder.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use dormant_proto::v1 as pb;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type Value = Gauge<f64, AtomicU64>;
type Total = Counter<f64, AtomicU64>;

/// The latest heartbeat the reporter built, shared with the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct LatestReport(Arc<Mutex<Option<pb::HeartbeatRequest>>>);

impl LatestReport {
    pub fn set(&self, report: &pb::HeartbeatRequest) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    }

    fn get(&self) -> Option<pb::HeartbeatRequest> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn gauges(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Value> {
    let f = Family::<Labels, Value>::default();
    registry.register(name, help, f.clone());
    f
}

fn totals(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Total> {
    let f = Family::<Labels, Total>::default();
    registry.register(name, help, f.clone());
    f
}

/// This node's metrics now, in the OpenMetrics text format.
pub fn render(latest: &LatestReport) -> String {
    let mut registry = Registry::default();
    let cpu = totals(
        &mut registry,
        "dormant_tenant_cpu_seconds",
        "CPU time the tenant's cgroup used",
    );
    let throttled = totals(
        &mut registry,
        "dormant_tenant_cpu_throttled_seconds",
        "Time the tenant's CPU quota held it back",
    );
    let memory = gauges(
        &mut registry,
        "dormant_tenant_memory_bytes",
        "Memory the tenant's cgroup uses",
    );
    let volume = gauges(
        &mut registry,
        "dormant_tenant_volume_used_bytes",
        "Bytes used on the tenant's volume",
    );
    let open = gauges(
        &mut registry,
        "dormant_tenant_open_connections",
        "Client connections open through the tenant's proxy",
    );
    let connections = totals(
        &mut registry,
        "dormant_tenant_connections",
        "Client connections the tenant's proxy accepted",
    );
    let bytes_in = totals(
        &mut registry,
        "dormant_tenant_proxy_received_bytes",
        "Bytes the tenant's proxy received from clients",
    );
    let bytes_out = totals(
        &mut registry,
        "dormant_tenant_proxy_sent_bytes",
        "Bytes the tenant's proxy sent to clients",
    );
    let wakes = totals(
        &mut registry,
        "dormant_tenant_wakes",
        "Times the tenant woke",
    );
    let hibernations = totals(
        &mut registry,
        "dormant_tenant_hibernations",
        "Times the tenant hibernated",
    );
    let last_wake = gauges(
        &mut registry,
        "dormant_tenant_last_wake_seconds",
        "How long the tenant's last wake took, first client's connect to engine answering",
    );
    let restarts = totals(
        &mut registry,
        "dormant_tenant_restarts",
        "Times the tenant's engine was restarted",
    );
    let ooms = totals(
        &mut registry,
        "dormant_tenant_oom_kills",
        "Processes of the tenant the kernel killed for memory",
    );
    let state = gauges(
        &mut registry,
        "dormant_tenant_state",
        "1 for the tenant's state as this agent reports it",
    );
    let tenants = gauges(
        &mut registry,
        "dormant_agent_tenants",
        "Tenants on this node",
    );
    if let Some(report) = latest.get() {
        let node = vec![("node", report.node_id.clone())];
        tenants
            .get_or_create(&node)
            .set(report.tenants.len() as f64);
        for t in &report.tenants {
            let l = vec![("tenant", t.name.clone())];
            let u = t.usage.unwrap_or_default();
            cpu.get_or_create(&l).inc_by(u.cpu_usage_usec as f64 / 1e6);
            throttled
                .get_or_create(&l)
                .inc_by(u.cpu_throttled_usec as f64 / 1e6);
            memory.get_or_create(&l).set(u.memory_bytes as f64);
            volume.get_or_create(&l).set(u.storage_used_bytes as f64);
            open.get_or_create(&l).set(u.open_connections as f64);
            connections
                .get_or_create(&l)
                .inc_by(u.connections_total as f64);
            bytes_in.get_or_create(&l).inc_by(u.bytes_in as f64);
            bytes_out.get_or_create(&l).inc_by(u.bytes_out as f64);
            wakes.get_or_create(&l).inc_by(u.wakes as f64);
            hibernations.get_or_create(&l).inc_by(u.hibernations as f64);
            last_wake
                .get_or_create(&l)
                .set(u.last_wake_usec as f64 / 1e6);
            restarts.get_or_create(&l).inc_by(u.restarts as f64);
            ooms.get_or_create(&l).inc_by(u.oom_kills as f64);
            state
                .get_or_create(&vec![
                    ("tenant", t.name.clone()),
                    ("state", t.state.clone()),
                ])
                .set(1.0);
        }
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_has_series_while_reported_and_none_after() {
        let latest = LatestReport::default();
        let tenant = |name: &str| pb::ObservedTenant {
            name: name.into(),
            state: "running".into(),
            usage: Some(pb::TenantUsage {
                cpu_usage_usec: 2_500_000,
                memory_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        latest.set(&pb::HeartbeatRequest {
            node_id: "n1".into(),
            tenants: vec![tenant("a\"b"), tenant("c")],
            ..Default::default()
        });
        let text = render(&latest);
        assert!(
            text.contains("dormant_tenant_cpu_seconds_total{tenant=\"c\"} 2.5"),
            "{text}"
        );
        assert!(
            text.contains("dormant_tenant_memory_bytes{tenant=\"c\"} 1048576"),
            "{text}"
        );
        // Label values are escaped.
        assert!(text.contains("tenant=\"a\\\"b\""), "{text}");
        latest.set(&pb::HeartbeatRequest {
            node_id: "n1".into(),
            tenants: vec![tenant("a\"b")],
            ..Default::default()
        });
        assert!(!render(&latest).contains("tenant=\"c\""));
    }
}

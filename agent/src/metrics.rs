//! The agent's Prometheus metrics (`prometheus-client`), served on `metrics_listen`: per tenant
//! on this node, from the latest heartbeat the agent built (refreshed every heartbeat interval),
//! with the figures only this host keeps beside it (usage for billing, wake durations).
//! A tenant's series exist while the agent reports it, so a deleted tenant's go with it, and
//! the number of series is bounded by the tenants on the node. Label values are escaped by the
//! encoder.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormant_proto::v1 as pb;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type Value = Gauge<f64, AtomicU64>;
type Total = Counter<f64, AtomicU64>;

/// Upper bounds of the wake-duration buckets, in seconds: a frozen tenant thaws in
/// milliseconds, a stopped PostgreSQL starts in a fraction of a second to a few seconds.
pub const WAKE_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How long a tenant's wakes took, as a histogram kept by its supervisor (since this agent
/// started, like Prometheus histograms of any process).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WakeDurations {
    /// Wakes per bucket of [`WAKE_BUCKETS`], and past the last one.
    buckets: [u64; WAKE_BUCKETS.len() + 1],
    sum_seconds: f64,
    count: u64,
}

impl WakeDurations {
    pub fn observe(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        let i = WAKE_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(WAKE_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

impl TypedMetric for WakeDurations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for WakeDurations {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = WAKE_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds, self.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One wake histogram per tenant, as a family: `Family` makes its members from a constructor,
/// and these are copies of what each supervisor counted.
#[derive(Debug, Clone, Default)]
struct TenantWakes(Arc<Mutex<Vec<(Labels, WakeDurations)>>>);

impl TenantWakes {
    fn push(&self, labels: Labels, wakes: WakeDurations) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((labels, wakes));
    }
}

impl EncodeMetric for TenantWakes {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (labels, wakes) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            wakes.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// What only this host knows of one tenant, beside its heartbeat.
#[derive(Debug, Clone, Default)]
pub struct LocalFigures {
    pub usage: crate::billing::Meter,
    pub wakes: WakeDurations,
}

#[derive(Debug, Clone)]
struct Figures {
    heartbeat: pb::HeartbeatRequest,
    local: BTreeMap<String, LocalFigures>,
}

/// The latest heartbeat the reporter built and this host's own figures, shared with the metrics
/// endpoint; and the reporter's counters.
#[derive(Debug, Clone, Default)]
pub struct LatestReport {
    figures: Arc<Mutex<Option<Figures>>>,
    /// Heartbeats the scheduler answered.
    pub heartbeats_sent: Counter,
    /// Heartbeats that got no answer (no replica reached, or refused): the node goes down
    /// when they last the scheduler's grace period.
    pub heartbeats_failed: Counter,
}

impl LatestReport {
    pub fn set(&self, heartbeat: &pb::HeartbeatRequest, local: BTreeMap<String, LocalFigures>) {
        *self.figures.lock().unwrap_or_else(|p| p.into_inner()) = Some(Figures {
            heartbeat: heartbeat.clone(),
            local,
        });
    }

    fn get(&self) -> Option<Figures> {
        self.figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        "CPU time the tenant used on this host, kept across agent and engine restarts (billing)",
    );
    let memory_seconds = totals(
        &mut registry,
        "dormant_tenant_memory_byte_seconds",
        "Memory the tenant used, integrated over time, kept across restarts (billing)",
    );
    let storage_seconds = totals(
        &mut registry,
        "dormant_tenant_storage_byte_seconds",
        "Bytes used on the tenant's volume, integrated over time, kept across restarts (billing)",
    );
    let awake_seconds = totals(
        &mut registry,
        "dormant_tenant_awake_seconds",
        "Time the tenant's engine ran (not hibernated), kept across restarts (billing)",
    );
    let wake_durations = TenantWakes::default();
    registry.register(
        "dormant_tenant_wake_duration_seconds",
        "How long the tenant's wakes took, first client's connect to engine answering",
        wake_durations.clone(),
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
    registry.register(
        "dormant_agent_heartbeats_sent",
        "Heartbeats the scheduler answered",
        latest.heartbeats_sent.clone(),
    );
    registry.register(
        "dormant_agent_heartbeats_failed",
        "Heartbeats that got no answer from any scheduler replica, or were refused",
        latest.heartbeats_failed.clone(),
    );
    if let Some(Figures {
        heartbeat: report,
        local,
    }) = latest.get()
    {
        let node = vec![("node", report.node_id.clone())];
        tenants
            .get_or_create(&node)
            .set(report.tenants.len() as f64);
        for t in &report.tenants {
            let l = vec![("tenant", t.name.clone())];
            let u = t.usage.unwrap_or_default();
            if let Some(mine) = local.get(&t.name) {
                let m = &mine.usage;
                cpu.get_or_create(&l).inc_by(m.cpu_seconds);
                memory_seconds
                    .get_or_create(&l)
                    .inc_by(m.memory_byte_seconds);
                storage_seconds
                    .get_or_create(&l)
                    .inc_by(m.storage_byte_seconds);
                awake_seconds.get_or_create(&l).inc_by(m.awake_seconds);
                wake_durations.push(l.clone(), mine.wakes.clone());
            }
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

    fn local(names: &[&str]) -> BTreeMap<String, LocalFigures> {
        names
            .iter()
            .map(|n| {
                let mut wakes = WakeDurations::default();
                wakes.observe(Duration::from_millis(30));
                wakes.observe(Duration::from_millis(700));
                wakes.observe(Duration::from_secs(60));
                let usage = crate::billing::Meter {
                    cpu_seconds: 2.5,
                    memory_byte_seconds: 1e9,
                    awake_seconds: 30.0,
                    ..Default::default()
                };
                (n.to_string(), LocalFigures { usage, wakes })
            })
            .collect()
    }

    #[test]
    fn a_tenant_has_series_while_reported_and_none_after() {
        let latest = LatestReport::default();
        let tenant = |name: &str| pb::ObservedTenant {
            name: name.into(),
            state: "running".into(),
            usage: Some(pb::TenantUsage {
                cpu_usage_usec: 2_000_000,
                memory_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        latest.set(
            &pb::HeartbeatRequest {
                node_id: "n1".into(),
                tenants: vec![tenant("a\"b"), tenant("c")],
                ..Default::default()
            },
            local(&["a\"b", "c"]),
        );
        let text = render(&latest);
        // CPU seconds are the usage book's, not the cgroup's counter of the moment.
        assert!(
            text.contains("dormant_tenant_cpu_seconds_total{tenant=\"c\"} 2.5"),
            "{text}"
        );
        assert!(
            text.contains("dormant_tenant_memory_byte_seconds_total{tenant=\"c\"} 1000000000"),
            "{text}"
        );
        assert!(
            text.contains("dormant_tenant_awake_seconds_total{tenant=\"c\"} 30"),
            "{text}"
        );
        assert!(
            text.contains("dormant_tenant_memory_bytes{tenant=\"c\"} 1048576"),
            "{text}"
        );
        // The histogram's buckets are cumulative, the slowest wake only in +Inf.
        for line in [
            "dormant_tenant_wake_duration_seconds_bucket{le=\"0.05\",tenant=\"c\"} 1",
            "dormant_tenant_wake_duration_seconds_bucket{le=\"1.0\",tenant=\"c\"} 2",
            "dormant_tenant_wake_duration_seconds_bucket{le=\"10.0\",tenant=\"c\"} 2",
            "dormant_tenant_wake_duration_seconds_bucket{le=\"+Inf\",tenant=\"c\"} 3",
            "dormant_tenant_wake_duration_seconds_count{tenant=\"c\"} 3",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // Label values are escaped.
        assert!(text.contains("tenant=\"a\\\"b\""), "{text}");
        latest.set(
            &pb::HeartbeatRequest {
                node_id: "n1".into(),
                tenants: vec![tenant("a\"b")],
                ..Default::default()
            },
            local(&["a\"b"]),
        );
        assert!(!render(&latest).contains("tenant=\"c\""));
    }
}

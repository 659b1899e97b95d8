//! Simulated agents: nodes that register through the agent API and then heartbeat on a fixed
//! interval, as `dormant-agent` does, but with no host behind them and no tenants to report.
//! Many nodes share a few channels, so thousands of them need no thousands of connections.

use std::sync::Arc;
use std::time::Duration;

use dormant_proto::v1 as pb;
use dormant_proto::v1::agent_api_client::AgentApiClient;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Channel;

use crate::stats::Recorder;

const GIB: u64 = 1 << 30;

/// `sim-0001`, `sim-0002`, … (1-based, like the brief's node names).
pub fn node_name(i: usize) -> String {
    format!("sim-{i:04}")
}

/// A node large enough that capacity never limits a benchmark: 64 cores, 256 GiB of memory,
/// 4 TiB of storage and 10,000 ports.
pub fn registration(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        cluster_id: String::new(),
        node_id: name.to_string(),
        address: "127.0.0.1".into(),
        capacity: Some(pb::Resources {
            milli_cpu: 64_000,
            memory_bytes: 256 * GIB,
            storage_bytes: 4096 * GIB,
        }),
        engines: vec!["postgres".into()],
        cgroup_driver: "v1".into(),
        labels: Default::default(),
        port_range_start: 20_000,
        port_range_end: 29_999,
        engine_access: vec![pb::EngineAccess::new(
            "postgres",
            &dormant_common::EngineAccess::defaults_for("postgres"),
        )],
    }
}

/// Registers nodes `sim-0001`..`sim-<n>`, at most `concurrency` calls at a time, spread over
/// `channels`. Fails on the first node the scheduler refuses.
pub async fn register_all(
    channels: &[Channel],
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = (1..=n).map(node_name).collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let mut client = AgentApiClient::new(channels[i % channels.len()].clone());
        let name = name.clone();
        set.spawn(async move {
            let r = client.register(registration(&name)).await;
            drop(permit);
            r.map(|_| ())
                .map_err(|s| anyhow::anyhow!("register {name}: {:?}: {}", s.code(), s.message()))
        });
        // Surface a refusal early instead of after queueing thousands more.
        while let Some(done) = set.try_join_next() {
            done??;
        }
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(names)
}

/// Starts one heartbeat loop per node; node `i` of `n` starts at `i/n` of the interval, so the
/// load is spread evenly. The loops run until the returned set is dropped.
pub fn heartbeat_all(
    channels: &[Channel],
    names: &[String],
    interval: Duration,
    rec: Arc<Recorder>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let n = names.len().max(1) as f64;
    let start = Instant::now();
    for (i, name) in names.iter().enumerate() {
        let phase = interval.mul_f64(i as f64 / n);
        let client = AgentApiClient::new(channels[i % channels.len()].clone());
        set.spawn(heartbeat_loop(
            client,
            name.clone(),
            start + phase,
            interval,
            rec.clone(),
        ));
    }
    set
}

async fn heartbeat_loop(
    mut client: AgentApiClient<Channel>,
    node: String,
    first: Instant,
    interval: Duration,
    rec: Arc<Recorder>,
) {
    let mut tick = tokio::time::interval_at(first, interval);
    // A late heartbeat is not followed by a burst of catch-up ones: an agent does not do that,
    // and it would hide that the scheduler fell behind.
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut seen_version = 0;
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let r = client
            .heartbeat(pb::HeartbeatRequest {
                cluster_id: String::new(),
                node_id: node.clone(),
                seen_version,
                tenants: Vec::new(),
                usage: None,
                // As an agent sends them: the leader judges each one's transit time.
                sent_unix_ms: dormant_tests::sim_node::unix_ms_now(),
                timeout_ms: dormant_tests::sim_node::HEARTBEAT_TIMEOUT_MS,
                reports_engine_access: true,
            })
            .await;
        rec.record(t0.elapsed(), r.as_ref().map(|_| ()));
        if let Ok(resp) = r {
            let resp = resp.into_inner();
            seen_version = resp.version;
            if resp.register_again {
                // What an agent does when the scheduler forgot it; should not happen in a run.
                let _ = client.register(registration(&node)).await;
            }
        }
    }
}

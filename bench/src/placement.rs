//! `dormant-bench placement`: how many tenant creates per second the scheduler places (each one
//! a Raft write, fsynced on a quorum), next to how many plain puts per second a single etcd
//! member takes under the same client pattern.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use serde_json::json;

use crate::cluster::{self, Cluster};
use crate::etcd;
use crate::procs::Guard;
use crate::report::Report;
use crate::sim;
use crate::stats::{self, Latency, LoadResult, Outcome, Recorder};
use crate::Common;

/// Tenant size: tiny, so capacity never runs out and every create can be placed.
const CPU: &str = "10m";
// The smallest a postgres tenant may ask for (`scheduler/src/minimums.rs`).
const MEMORY: &str = "64MiB";
const STORAGE: &str = "64MiB";

/// How many registrations run at once.
const REGISTER_CONCURRENCY: usize = 64;

/// The etcd value's size, about that of a tenant record.
const VALUE_BYTES: usize = 400;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Simulated nodes to register (each heartbeats once a second throughout).
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Concurrent clients, each sending its next create when the last one returned.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Total creates (and, for etcd, total puts).
    #[arg(long, default_value_t = 5000)]
    pub tenants: usize,
    /// Skip the etcd baseline.
    #[arg(long)]
    pub skip_etcd: bool,
    /// The etcd binary (Debian's etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let bin_dir = args.common.bin_dir()?;
    let mut report = Report::new("placement");
    args.common.echo(&mut report, &bin_dir);
    report.param("nodes", args.nodes);
    report.param("clients", args.clients);
    report.param("tenants", args.tenants);
    report.param(
        "tenant_size",
        format!("cpu {CPU}, memory {MEMORY}, storage {STORAGE}"),
    );
    report.param("skip_etcd", args.skip_etcd);
    report.param("etcd_bin", args.etcd_bin.display().to_string());

    let mut guard = Guard::new(args.common.work_dir.clone(), args.common.keep)?;
    report.param("work_dir", guard.dir().display().to_string());
    let cluster = Cluster::start(&mut guard, &bin_dir, args.common.replicas).await?;
    let (leader_id, leader_url) = cluster.leader().await?;
    let membership = cluster.status(leader_id).await?;
    let channels = cluster::channels(
        &cluster.client_transport(),
        &leader_url,
        args.common.connections,
    )
    .await?;

    eprintln!("registering {} nodes with leader {leader_id}", args.nodes);
    let names = sim::register_all(&channels, args.nodes, REGISTER_CONCURRENCY).await?;
    let hb = Arc::new(Recorder::new(true));
    let heartbeats = sim::heartbeat_all(&channels, &names, Duration::from_secs(1), hb.clone());

    let pids = cluster.pids(&guard);
    let leader_pid = pids.get(&leader_id).copied().context("leader has no pid")?;
    let before = cluster::grpc_status(&channels[0]).await?;
    let cpu_before = stats::cpu_time(leader_pid)?;
    let ops: Vec<OperatorClient<_>> = channels.iter().cloned().map(OperatorClient::new).collect();
    eprintln!(
        "creating {} tenants with {} clients",
        args.tenants, args.clients
    );
    let dormant = stats::drive(args.clients, args.tenants, &ops, |mut c, n| async move {
        let reply = c
            .create_tenant(pb::CreateTenantRequest {
                name: format!("b-{}", n + 1),
                engine: "postgres".into(),
                cpu: CPU.into(),
                memory: MEMORY.into(),
                storage: STORAGE.into(),
                // No label constraints: any node will do.
                ..Default::default()
            })
            .await?
            .into_inner();
        let placed = reply.tenant.is_some_and(|t| !t.node.is_empty());
        Ok(if placed {
            Outcome::Done
        } else {
            Outcome::OkOnly
        })
    })
    .await;
    let leader_cores = stats::cores(cpu_before, stats::cpu_time(leader_pid)?, dormant.elapsed);
    let after = cluster::grpc_status(&channels[0]).await?;
    guard.check_running()?;
    let hb = hb.stop();
    // The scheduler's part is over: stop its load and its processes so etcd gets the machine to
    // itself, as the cluster had.
    drop(heartbeats);
    drop(ops);
    drop(channels);
    guard.stop_all();

    report.section("dormant", "dormant (create_tenant on the leader)");
    report.row(
        "cluster",
        "cluster",
        format!(
            "{} replica(s), leader {leader_id}, term {}",
            args.common.replicas, after.term
        ),
        json!({"replicas": args.common.replicas, "leader_id": leader_id, "term": after.term}),
    );
    report.row(
        "members",
        "members",
        membership.members_text(),
        json!(membership.members_text()),
    );
    load_rows(&mut report, &dormant, "placements/s", "placements_per_s");
    report.row(
        "ok but pending",
        "ok_pending",
        dormant.ok_only.to_string(),
        dormant.ok_only,
    );
    report.row(
        "leader CPU",
        "leader_cores",
        // /proc counts CPU in 10 ms ticks, so a window of a fraction of a second is coarse.
        format!(
            "{leader_cores:.2} cores over {:.3} s",
            dormant.elapsed.as_secs_f64()
        ),
        leader_cores,
    );
    let entries = after.applied_index.saturating_sub(before.applied_index);
    report.row(
        "raft entries applied",
        "raft_entries",
        entries.to_string(),
        entries,
    );
    report.row(
        "heartbeat errors",
        "heartbeat_errors",
        format!("{} ({})", hb.errors_total(), hb.errors_text()),
        json!(hb.errors),
    );

    if args.skip_etcd {
        return Ok(report);
    }
    // Plaintext, as earlier runs measured it, and with mutual TLS, as Dormant ran above.
    let etcd_clusters = [
        (1, false, "etcd (KV/Put, single member, fsync on)", "etcd"),
        (3, false, "etcd (KV/Put, 3 members, fsync on)", "etcd3"),
        (
            1,
            true,
            "etcd (KV/Put, single member, mutual TLS)",
            "etcd_tls",
        ),
        (3, true, "etcd (KV/Put, 3 members, mutual TLS)", "etcd3_tls"),
    ];
    let mut rates = Vec::new();
    for (members, tls, title, key) in etcd_clusters {
        let run = etcd_run(&mut guard, &args, members, tls).await?;
        // Its part is over: the next cluster gets the machine to itself.
        guard.stop_all();
        report.section(key, title);
        report.row(
            "value size",
            "value_bytes",
            format!("{} bytes", tenant_like_value("b-1", 0).len()),
            tenant_like_value("b-1", 0).len(),
        );
        load_rows(&mut report, &run, "puts/s", "puts_per_s");
        rates.push((key, members, tls, run.rate()));
    }
    report.section("comparison", "comparison");
    for (key, members, tls, rate) in rates {
        let ratio = if rate > 0.0 {
            dormant.rate() / rate
        } else {
            0.0
        };
        report.row(
            &format!(
                "placements/s ÷ etcd puts/s ({members} member{}, {})",
                if members == 1 { "" } else { "s" },
                if tls { "TLS" } else { "plaintext" }
            ),
            &format!("placements_per_{key}_put"),
            format!("{ratio:.3}"),
            ratio,
        );
    }
    Ok(report)
}

/// `args.tenants` puts from `args.clients` clients into a fresh etcd cluster of `members`,
/// spread over every member (as etcd's own client balances): a follower forwards to its leader.
async fn etcd_run(
    guard: &mut Guard,
    args: &Args,
    members: usize,
    tls: bool,
) -> anyhow::Result<LoadResult> {
    let started = etcd::start(guard, &args.etcd_bin, members, tls).await?;
    let mut kvs = Vec::new();
    for url in &started.urls {
        let per_member = args.common.connections.div_ceil(started.urls.len()).max(1);
        let channels = cluster::channels(&started.transport, url, per_member).await?;
        kvs.extend(channels.into_iter().map(etcd::pb::kv_client::KvClient::new));
    }
    eprintln!(
        "putting {} keys into etcd ({members} member(s), TLS {tls}) with {} clients",
        args.tenants, args.clients
    );
    let run = stats::drive(args.clients, args.tenants, &kvs, |mut c, n| async move {
        let name = format!("b-{}", n + 1);
        etcd::put(
            &mut c,
            format!("/bench/{name}"),
            tenant_like_value(&name, n),
        )
        .await?;
        Ok(Outcome::Done)
    })
    .await;
    guard.check_running()?;
    Ok(run)
}

fn load_rows(report: &mut Report, r: &LoadResult, rate_name: &str, rate_key: &str) {
    let lat = Latency::of(&r.samples.ok);
    report.row(
        rate_name,
        rate_key,
        format!(
            "{:.1} ({} in {:.2} s)",
            r.rate(),
            r.done,
            r.elapsed.as_secs_f64()
        ),
        r.rate(),
    );
    report.row("done", "done", r.done.to_string(), r.done);
    report.row(
        "wall",
        "wall_s",
        format!("{:.3} s", r.elapsed.as_secs_f64()),
        r.elapsed.as_secs_f64(),
    );
    report.row("latency p50 / p99 / max", "latency", lat.text(), lat.json());
    report.row(
        "errors",
        "errors",
        format!("{} ({})", r.samples.errors_total(), r.samples.errors_text()),
        json!(r.samples.errors),
    );
}

/// A JSON blob shaped and sized like a tenant record (name, engine, resources, placement,
/// credentials), padded to [`VALUE_BYTES`].
fn tenant_like_value(name: &str, n: usize) -> Vec<u8> {
    let mut v = json!({
        "name": name,
        "uid": n + 1,
        "engine": "postgres",
        "resources": {"milli_cpu": 10, "memory_bytes": 16u64 << 20, "storage_bytes": 64u64 << 20},
        "node": format!("sim-{:04}", n % 100 + 1),
        "port": 20_000 + n % 10_000,
        "password": "x3KQ9vTzLw2mYb7RcN5hJd8F",
        "state": "pending",
        "desired": "running",
        "reason": null,
        "generation": 1,
        "pad": "",
    });
    let len = v.to_string().len();
    v["pad"] = json!("p".repeat(VALUE_BYTES.saturating_sub(len)));
    v.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_value_is_tenant_sized() {
        assert_eq!(tenant_like_value("b-1", 0).len(), VALUE_BYTES);
        assert_eq!(tenant_like_value("b-4999", 4998).len(), VALUE_BYTES);
    }
}

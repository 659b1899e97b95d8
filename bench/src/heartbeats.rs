//! `dormant-bench heartbeats`: what thousands of idle agents heartbeating cost the scheduler. The
//! design says heartbeats stay in the leader's memory and never become Raft entries, so the
//! number to watch is entries per minute while nothing changes: it should be 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::{self, Cluster};
use crate::procs::Guard;
use crate::report::Report;
use crate::sim;
use crate::stats::{self, Latency, Recorder};
use crate::Common;

/// How many registrations run at once.
const REGISTER_CONCURRENCY: usize = 64;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Simulated agents (nodes) to register and keep heartbeating.
    #[arg(long, default_value_t = 5000)]
    pub agents: usize,
    /// Each agent's heartbeat interval, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Length of the measured window: 60s, 5m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time between the last registration and the window, for the load to settle.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let bin_dir = args.common.bin_dir()?;
    let interval = Duration::from_millis(args.interval_ms.max(1));
    let mut report = Report::new("heartbeats");
    args.common.echo(&mut report, &bin_dir);
    report.param("agents", args.agents);
    report.param("interval_ms", args.interval_ms);
    report.param(
        "duration",
        humantime::format_duration(args.duration).to_string(),
    );
    report.param(
        "warmup",
        humantime::format_duration(args.warmup).to_string(),
    );

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

    eprintln!("registering {} agents with leader {leader_id}", args.agents);
    let t_reg = Instant::now();
    let names = sim::register_all(&channels, args.agents, REGISTER_CONCURRENCY).await?;
    let registration = t_reg.elapsed();
    let rec = Arc::new(Recorder::new(false));
    let heartbeats = sim::heartbeat_all(&channels, &names, interval, rec.clone());

    eprintln!("warming up for {:?}", args.warmup);
    sleep_watching(&mut guard, args.warmup).await?;

    let pids = cluster.pids(&guard);
    let self_pid = std::process::id();
    eprintln!("measuring for {:?}", args.duration);
    let before = cluster::grpc_status(&channels[0]).await?;
    let cpu_before = cpu_times(&pids, self_pid)?;
    rec.start();
    let t0 = Instant::now();
    sleep_watching(&mut guard, args.duration).await?;
    let samples = rec.stop();
    let wall = t0.elapsed();
    let cpu_after = cpu_times(&pids, self_pid)?;
    let after = cluster::grpc_status(&channels[0]).await?;
    drop(heartbeats);

    report.section("cluster", "cluster");
    report.row(
        "leader",
        "leader",
        format!(
            "replica {leader_id}, term {} → {}{}",
            before.term,
            after.term,
            if before.leader_id == after.leader_id && before.term == after.term {
                ""
            } else {
                " (LEADER CHANGED during the window: numbers are suspect)"
            }
        ),
        json!({"id": leader_id, "term_before": before.term, "term_after": after.term,
               "leader_before": before.leader_id, "leader_after": after.leader_id}),
    );
    report.row(
        "members",
        "members",
        format!("{} (term {})", membership.members_text(), membership.term),
        json!(membership.members_text()),
    );
    report.row(
        "registration",
        "registration_s",
        format!(
            "{} agents in {:.2} s",
            names.len(),
            registration.as_secs_f64()
        ),
        registration.as_secs_f64(),
    );
    report.row(
        "window",
        "window_s",
        format!("{:.3} s", wall.as_secs_f64()),
        wall.as_secs_f64(),
    );

    report.section("raft", "raft");
    let entries = after.applied_index.saturating_sub(before.applied_index);
    let per_min = entries as f64 / wall.as_secs_f64().max(1e-9) * 60.0;
    report.row(
        "entries in window",
        "raft_entries",
        format!(
            "{entries} (applied_index {} → {})",
            before.applied_index, after.applied_index
        ),
        entries,
    );
    report.row(
        "entries/min",
        "raft_entries_per_min",
        format!("{per_min:.2} (goal: 0 while nothing changes)"),
        per_min,
    );

    report.section("heartbeats", "heartbeats");
    let lat = Latency::of(&samples.ok);
    let offered = args.agents as f64 / interval.as_secs_f64();
    let achieved = stats::per_sec(samples.ok.len() as u64, wall);
    report.row(
        "heartbeats/s",
        "heartbeats_per_s",
        format!("{achieved:.1} ok (offered {offered:.1})"),
        json!({"achieved": achieved, "offered": offered}),
    );
    report.row("latency p50 / p99 / max", "latency", lat.text(), lat.json());
    report.row(
        "errors",
        "errors",
        format!("{} ({})", samples.errors_total(), samples.errors_text()),
        json!(samples.errors),
    );

    report.section("cpu", "CPU (cores = CPU seconds / wall seconds)");
    for (id, pid) in &pids {
        let c = stats::cores(cpu_before[&Some(*id)], cpu_after[&Some(*id)], wall);
        let role = if *id == leader_id {
            "leader"
        } else {
            "follower"
        };
        report.row(
            &format!("replica {id} ({role})"),
            &format!("replica_{id}_cores"),
            format!("{c:.3} cores (pid {pid})"),
            c,
        );
    }
    let c = stats::cores(cpu_before[&None], cpu_after[&None], wall);
    report.row(
        "dormant-bench itself",
        "bench_cores",
        format!("{c:.3} cores (shares the machine)"),
        c,
    );
    Ok(report)
}

/// CPU time of each replica (by id) and of this process (`None`).
fn cpu_times(
    pids: &BTreeMap<u64, u32>,
    self_pid: u32,
) -> anyhow::Result<BTreeMap<Option<u64>, Duration>> {
    let mut out = BTreeMap::new();
    for (id, pid) in pids {
        out.insert(
            Some(*id),
            stats::cpu_time(*pid).with_context(|| format!("replica {id}"))?,
        );
    }
    out.insert(None, stats::cpu_time(self_pid)?);
    Ok(out)
}

/// Sleeps for `d`, failing as soon as a child dies: a window with a dead replica measures
/// nothing worth printing.
async fn sleep_watching(guard: &mut Guard, d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        guard.check_running()?;
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_secs(1))).await;
    }
    guard.check_running()
}

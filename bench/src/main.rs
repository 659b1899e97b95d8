//! `dormant-bench`: benchmarks of a real scheduler cluster, run by hand (never from the tests).
//! `placement` measures tenant creates per second against an etcd baseline; `failover` the time
//! from a leader's kill to the next acknowledged write, next to etcd's; `heartbeats` measures
//! what thousands of idle agents cost the leader; `wake` and `proxy` run a real agent and measure
//! what hibernation and the TCP proxy cost a tenant's clients. Each prints a table, or JSON with
//! `--json`.

mod cluster;
mod engines;
mod etcd;
mod failover;
mod heartbeats;
mod host;
mod placement;
mod procs;
mod proxy;
mod report;
mod sim;
mod stats;
mod wake;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::report::Report;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Benchmarks of a Dormant scheduler cluster on this host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tenant creates per second on the leader, next to etcd puts per second.
    Placement(placement::Args),
    /// Leader kill -> first acknowledged create, idle and under load, next to a 3-member etcd.
    Failover(failover::Args),
    /// Leader CPU, latency and Raft entries while many idle agents heartbeat.
    Heartbeats(heartbeats::Args),
    /// Wake latency of hibernated PostgreSQL and Redis tenants, next to bare engine starts
    /// (root: runs a real agent).
    Wake(wake::Args),
    /// pgbench through the agent's proxy, next to the Unix socket, haproxy and pgbouncer (root:
    /// runs a real agent).
    Proxy(proxy::Args),
}

/// Flags both scheduler benchmarks take.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Where dormant-scheduler and dormantctl are (default: this executable's directory).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Scheduler replicas; more than 1 needs `dormantctl cluster add-learner`/`promote`.
    #[arg(long, default_value_t = 3)]
    pub replicas: u64,
    /// State and logs of the run (default: /var/lib/dormant-bench/run-<random>). Must not exist or
    /// be empty; removed at the end unless --keep.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the work dir (data and logs) after the run.
    #[arg(long)]
    pub keep: bool,
    /// gRPC connections (HTTP/2) to share among the clients or agents.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Common {
    pub fn bin_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.bin_dir {
            Some(d) => Ok(d.clone()),
            None => {
                let exe = std::env::current_exe().context("current exe")?;
                exe.parent()
                    .map(PathBuf::from)
                    .context("current exe has no directory")
            }
        }
    }

    /// Puts the flags shared by both benchmarks into the report.
    pub fn echo(&self, report: &mut Report, bin_dir: &std::path::Path) {
        report.param("replicas", self.replicas);
        report.param("bin_dir", bin_dir.display().to_string());
        report.param("connections", self.connections);
        report.param("keep", self.keep);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = match &cli.command {
        Command::Placement(a) => a.common.json,
        Command::Failover(a) => a.common.json,
        Command::Heartbeats(a) => a.common.json,
        Command::Wake(a) => a.host.json,
        Command::Proxy(a) => a.host.json,
    };
    let result = runtime.block_on(async {
        let run = async {
            match cli.command {
                Command::Placement(a) => placement::run(a).await,
                Command::Failover(a) => failover::run(a).await,
                Command::Heartbeats(a) => heartbeats::run(a).await,
                Command::Wake(a) => wake::run(a).await,
                Command::Proxy(a) => proxy::run(a).await,
            }
        };
        // On a signal the run's future is dropped, and with it the guard that kills the children
        // and removes the work dir.
        tokio::select! {
            r = run => r.map(Some),
            s = interrupted() => {
                eprintln!("{s}: stopping and cleaning up");
                Ok(None)
            }
        }
    });
    match result {
        Ok(Some(report)) => {
            if json {
                println!("{:#}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, naming which.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

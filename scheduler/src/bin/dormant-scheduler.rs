//! `dormant-scheduler`: one replica of Dormant's Raft-replicated scheduler.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dormant_common::sd_notify::Notifier;
use dormant_common::telemetry::{self, LogFormat};
use dormant_scheduler::config::{FileConfig, Settings};
use dormant_scheduler::placement::Policy;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Dormant's scheduler: one replica of the Raft cluster"
)]
struct Args {
    /// TOML config file; flags override its keys.
    #[arg(long, env = "DORMANT_SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// This replica's Raft node id (>0, never reused).
    #[arg(long)]
    id: Option<u64>,
    /// Address to serve gRPC on (operators, agents and peers).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address others reach this replica at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for the Raft log, vote and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start a new single-replica cluster if the data dir is empty.
    #[arg(long)]
    bootstrap: bool,
    /// Reservations on a node may reach capacity times this ratio (default 1.0).
    #[arg(long)]
    overcommit_ratio: Option<f64>,
    /// binpack (default) or spread.
    #[arg(long, value_parser = parse_policy)]
    placement: Option<Policy>,
    /// A node silent this long is marked down and its tenants lost (default 10000).
    #[arg(long)]
    node_grace_period_ms: Option<u64>,
    /// Snapshot and compact the Raft log every this many entries (default 5000).
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// The cluster's CA certificate (PEM): every peer's certificate must chain to it.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This replica's certificate (PEM), URI SAN dormant://replica/<id>.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This replica's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Serve and call plaintext gRPC, with no certificates and no identities (trying things out
    /// only; logs a warning).
    #[arg(long, env = "DORMANT_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    insecure: bool,
    /// Refuse writes while the data disk has less free space than this (default 256MiB).
    #[arg(long)]
    disk_reserve: Option<String>,
    /// Serve Prometheus metrics over plain HTTP at this address (GET /metrics); off by default.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log as JSON lines instead of plain text.
    #[arg(long)]
    log_json: bool,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    match s {
        "binpack" => Ok(Policy::BinPack),
        "spread" => Ok(Policy::Spread),
        other => Err(format!("{other:?} is not binpack or spread")),
    }
}

/// The replica's last words, if it stops on an error: one line (the causes joined), no
/// backtrace, whatever RUST_BACKTRACE says; journald shows it as the unit's last line.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dormant-scheduler: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = match &args.config {
        Some(path) => dormant_common::config::load::<FileConfig>(path)?,
        None => FileConfig::default(),
    };
    let format = if args.log_json {
        LogFormat::Json
    } else {
        file.log_format.unwrap_or_default()
    };
    telemetry::init(format);
    let cli = FileConfig {
        id: args.id,
        listen: args.listen,
        advertise: args.advertise,
        data_dir: args.data_dir,
        bootstrap: args.bootstrap.then_some(true),
        overcommit_ratio: args.overcommit_ratio,
        placement: args.placement,
        node_grace_period_ms: args.node_grace_period_ms,
        snapshot_every: args.snapshot_every,
        log_format: None,
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        insecure: args.insecure.then_some(true),
        disk_reserve: args.disk_reserve,
        metrics_listen: args.metrics_listen,
    };
    let settings = Settings::merge(cli, file)?;
    // Only under a Type=notify unit (NOTIFY_SOCKET set); otherwise it sends nothing.
    let notifier = Notifier::from_env();
    let run = dormant_scheduler::app::run(settings, &notifier, shutdown_signal()).await;
    if let Err(e) = &run {
        notifier.status(&format!("scheduler stopped: {e}"));
    }
    run.context("scheduler stopped")?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}

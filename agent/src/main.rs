//! `dormant-agent`: runs on every host, as a systemd unit.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dormant_agent::config::{FileConfig, Settings};
use dormant_common::sd_notify::Notifier;
use dormant_common::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Dormant's host agent: runs and supervises this host's tenants"
)]
struct Args {
    /// TOML config file; flags override its keys.
    #[arg(long, env = "DORMANT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Scheduler replicas, comma-separated (any replica answers; the agent moves to the next
    /// when one stops answering), e.g. https://10.0.0.1:7400,https://10.0.0.2:7400.
    #[arg(long)]
    scheduler: Option<String>,
    /// This host's node id (lowercase letters, digits, '-').
    #[arg(long)]
    node_id: Option<String>,
    /// Where tenants' data and the agent's records live.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Host name or address clients use to reach tenant ports.
    #[arg(long)]
    advertise: Option<String>,
    /// Address tenant ports listen on (default 0.0.0.0).
    #[arg(long)]
    listen_host: Option<IpAddr>,
    /// Tenant ports, START-END (default 20000-20999).
    #[arg(long)]
    ports: Option<String>,
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// cgroup driver: auto (from how the cgroup root is mounted), v1 or v2.
    #[arg(long, value_enum)]
    cgroup_driver: Option<dormant_agent::cgroup::select::DriverChoice>,
    /// Where cgroup hierarchies are mounted (default /sys/fs/cgroup).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Path below the cgroup root that the agent owns, in each v1 hierarchy or in the v2 tree
    /// (default dormant/tenants).
    #[arg(long)]
    cgroup_parent: Option<PathBuf>,
    /// Uids tenants get one each from, START-END (default 200000-299999).
    #[arg(long)]
    tenant_uids: Option<String>,
    #[arg(long)]
    postgres_bin_dir: Option<PathBuf>,
    /// Stop tenants' engines when the agent exits (for `dormantctl dev`; never in production).
    #[arg(long)]
    stop_tenants_on_exit: bool,
    /// Certificate chain (PEM) tenants' clients get over TLS; its names must cover --advertise.
    #[arg(long)]
    tenant_tls_cert: Option<PathBuf>,
    #[arg(long)]
    tenant_tls_key: Option<PathBuf>,
    /// Serve plaintext tenant clients too (the default only without a tenant certificate).
    #[arg(long)]
    tenant_plaintext: bool,
    #[arg(long)]
    log_json: bool,
    /// Serve Prometheus metrics over plain HTTP at this address (GET /metrics); off by default.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The cluster's CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This node's certificate (PEM), URI SAN dormant://node/<node-id>.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Plaintext gRPC to the scheduler, without a certificate (trying things out only; logs a
    /// warning).
    #[arg(long, env = "DORMANT_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    insecure: bool,
    /// Run as the host's listener keeper on this socket (the agent starts it; see the agent's
    /// `keeper` module).
    #[arg(long, hide = true)]
    keep_listeners: Option<PathBuf>,
}

/// The agent's last words, if it stops on an error: one line (the causes joined), no backtrace,
/// whatever RUST_BACKTRACE says; journald shows it as the unit's last line.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dormant-agent: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(socket) = &args.keep_listeners {
        // No runtime, no threads: the keeper only holds sockets.
        return dormant_agent::keeper::run(socket).context("listener keeper");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(agent(args))
}

async fn agent(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => dormant_common::config::load::<FileConfig>(path)?,
        None => FileConfig::default(),
    };
    telemetry::init(if args.log_json {
        LogFormat::Json
    } else {
        file.log_format.unwrap_or_default()
    });
    let cli = FileConfig {
        scheduler: args.scheduler,
        node_id: args.node_id,
        state_dir: args.state_dir,
        advertise: args.advertise,
        listen_host: args.listen_host,
        ports: args.ports,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        cgroup_driver: args.cgroup_driver,
        cgroup_root: args.cgroup_root,
        cgroup_parent: args.cgroup_parent,
        tenant_uids: args.tenant_uids,
        postgres_bin_dir: args.postgres_bin_dir,
        stop_tenants_on_exit: args.stop_tenants_on_exit.then_some(true),
        tenant_tls_cert: args.tenant_tls_cert,
        tenant_tls_key: args.tenant_tls_key,
        tenant_plaintext: args.tenant_plaintext.then_some(true),
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        insecure: args.insecure.then_some(true),
        metrics_listen: args.metrics_listen,
        ..Default::default()
    };
    let settings = Settings::merge(cli, file)?;
    // Crash points exist only in debug builds made for the crash tests.
    let _crash_points = dormant_agent::crash::setup();
    // Only under a Type=notify unit (NOTIFY_SOCKET set); otherwise it sends nothing.
    let notifier = Notifier::from_env();
    let run = dormant_agent::run(settings, &notifier, shutdown_signal()).await;
    if let Err(e) = &run {
        notifier.status(&format!("agent stopped: {e}"));
    }
    run.context("agent stopped")?;
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

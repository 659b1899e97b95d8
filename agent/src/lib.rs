//! Dormant's per-host agent: runs each tenant's database engine in its own cgroup as an
//! unprivileged user, proxies its TCP endpoint to the engine's Unix socket, supervises it, and
//! reports to the scheduler, reconciling toward the desired set it receives.

#![deny(unsafe_code)]

pub mod billing;
pub mod cgroup;
pub mod config;
pub mod crash;
pub mod endpoints;
pub mod engine;
pub mod engine_log;
pub mod host;
pub mod keeper;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod reconcile;
pub mod report;
pub mod socket_dir;
pub mod spawn;
pub mod sweep;
pub mod tenant;
pub mod tenant_fs;
pub mod tenant_tls;
pub mod volume;

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::Settings;
use crate::host::Host;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
    #[error("postgres_bin_dir: {0} has no postgres and initdb")]
    NoPostgres(String),
    #[error("redis_server: {0} does not exist")]
    NoRedis(String),
    #[error(transparent)]
    Engine(#[from] engine::custom::EngineConfigError),
    #[error(transparent)]
    Records(tenant::record::RecordError),
    #[error("sweeping the host at start: {0}")]
    Sweep(String),
    #[error(transparent)]
    Metrics(dormant_common::metrics_http::MetricsHttpError),
    #[error(transparent)]
    Usage(billing::BillingError),
    #[error(transparent)]
    TenantTls(#[from] tenant_tls::TenantTlsError),
    #[error("engines: no engine is available: install postgresql or redis-server, or define [engines.NAME] in the config")]
    NoEngines,
}

/// The engines this host offers: the built-in ones whose programs are installed (an explicitly
/// configured path must exist), then the config's own, which may replace a built-in one.
pub fn engines(
    settings: &Settings,
) -> Result<BTreeMap<String, engine::EngineTemplate>, AgentError> {
    let mut engines = BTreeMap::new();
    let pg_bin = match &settings.postgres_bin_dir {
        Some(dir) if dir.join("postgres").exists() && dir.join("initdb").exists() => {
            Some(dir.clone())
        }
        Some(dir) => return Err(AgentError::NoPostgres(dir.display().to_string())),
        None => engine::postgres::find_bin_dir(std::path::Path::new("/usr/lib/postgresql")),
    };
    if let Some(bin) = pg_bin {
        engines.insert("postgres".to_string(), engine::postgres::template(&bin));
    }
    let redis = match &settings.redis_server {
        Some(path) if path.exists() => Some(path.clone()),
        Some(path) => return Err(AgentError::NoRedis(path.display().to_string())),
        None => engine::redis::find_server(),
    };
    if let Some(server) = redis {
        engines.insert("redis".to_string(), engine::redis::template(&server));
    }
    for (name, config) in &settings.engines {
        engines.insert(name.clone(), config.clone().into_template(name)?);
    }
    if engines.is_empty() {
        return Err(AgentError::NoEngines);
    }
    Ok(engines)
}

/// Builds the host context from settings: state dir, tenant user, cgroup driver, engines.
pub fn prepare_host(settings: &Settings) -> Result<Host, AgentError> {
    // Checks that change nothing come first: a bad engine stops the agent before it touches
    // the host.
    let engines = engines(settings)?;
    // Root's files are root's alone whatever the caller's umask (the unit sets `UMask=0077`
    // too): records, logs, the keeper's socket. What tenants read is opened to them explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let (state_dir, state_lock) = host::prepare_state_dir(&settings.state_dir)?;
    // Before the driver prepares the (new) parent: a refused start changes nothing there.
    host::check_cgroup_parent(
        &state_dir,
        &settings.cgroup_parent,
        host::any_tenant_recorded(&state_dir),
    )?;
    let (cgroups, reason) = cgroup::select::open(
        settings.cgroup_driver,
        &settings.cgroup_root,
        &settings.cgroup_parent,
    )?;
    info!(
        driver = cgroups.name(),
        reason,
        root = %settings.cgroup_root.display(),
        parent = %settings.cgroup_parent.display(),
        "cgroup driver"
    );
    info!(engines = ?engines.keys().collect::<Vec<_>>(), "engines offered");
    raise_fd_limit();
    let tenant_tls = match &settings.tenant_tls {
        Some((cert, key)) => Some(tenant_tls::TenantTls::load(
            cert,
            key,
            settings.tenant_plaintext,
        )?),
        None => {
            warn!("tenant endpoints are plaintext: set tenant_tls_cert and tenant_tls_key to serve them over TLS");
            None
        }
    };
    // After the lock: only the agent that holds the state directory takes its kept ports.
    let endpoints = endpoints::Endpoints::open(&state_dir, std::env::current_exe().ok());
    Ok(Host {
        state_dir,
        state_lock,
        cgroups,
        engines,
        tenant_uids: settings.tenant_uids,
        uid_lock: std::sync::Mutex::new(()),
        listen_host: settings.listen_host,
        pids_max: settings.pids_max,
        max_clients_per_tenant: settings.max_clients_per_tenant,
        tenant_tls,
        engine_log: settings.engine_log,
        changed: Arc::new(tokio::sync::Notify::new()),
        endpoints,
    })
}

/// Every client connection costs the agent a descriptor or two: the soft limit is raised to the
/// hard one (systemd's unit sets `LimitNOFILE`), and each tenant's clients are capped well below
/// it (`proxy::Budget`), so one tenant cannot use up what the others need.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, soft, hard, "raising the open-files limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "reading the open-files limit"),
    }
}

/// Runs the agent until `shutdown` resolves. Tenants keep running afterwards unless
/// `stop_tenants_on_exit` is set: restarting the agent never restarts a tenant. Under systemd,
/// `notifier` says when the agent is ready (see `report::Reporter::run`) and when it stops.
pub async fn run(
    settings: Settings,
    notifier: &dormant_common::sd_notify::Notifier,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    notifier.status("preparing the host");
    let host = Arc::new(prepare_host(&settings)?);
    // Bound first, so a taken or bad address stops the start.
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            dormant_common::metrics_http::MetricsListener::bind(addr)
                .await
                .map_err(AgentError::Metrics)?,
        ),
        None => None,
    };
    let latest = metrics::LatestReport::default();
    let metrics_server = metrics_listener.map(|listener| {
        info!(listen = %listener.local_addr(), "serving /metrics");
        let latest = latest.clone();
        let render: dormant_common::metrics_http::Render =
            Arc::new(move || metrics::render(&latest));
        tokio::spawn(async move {
            if let Err(e) = listener.serve(render, std::future::pending()).await {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        })
    });
    // Engines start as grandchildren (PID 1 of their pid namespace); as the subreaper we become
    // their parent and can read how they exit.
    spawn::become_subreaper().map_err(host::HostError::Subreaper)?;
    // What an earlier run left: records are resumed, everything else the agent owns is swept.
    let found = tenant::load_records(&host).map_err(AgentError::Records)?;
    let swept_host = host.clone();
    let (found, swept) = tokio::task::spawn_blocking(move || {
        let swept = sweep::sweep(&swept_host, &found);
        (found, swept)
    })
    .await
    .map_err(|e| AgentError::Sweep(e.to_string()))?;
    let records = found.records;
    info!(
        tenants = records.len(),
        quarantined = found.quarantined.len(),
        mounts = swept.mounts.len(),
        loop_devices = swept.loop_devices.len(),
        directories = swept.directories.len(),
        cgroups = swept.cgroups.len(),
        "swept the host at start"
    );
    let others = host::storage_not_for_tenants(&host.state_dir, &host.tenants_dir());
    if others > settings.reserve_storage.0 {
        tracing::warn!(
            other_data = %dormant_common::Bytes(others),
            reserve_storage = %settings.reserve_storage,
            "the state directory's filesystem holds more than reserve_storage of other data: capacity is the filesystem's size less the reserve, so tenants may get less than promised; raise reserve_storage or give the state directory a filesystem of its own"
        );
    }
    let names = records.iter().map(|r| r.spec.name.to_string()).collect();
    host.endpoints.forget_all_but(&names);
    let mut tenants = reconcile::Tenants::new(host.clone());
    tenants.resume(records, found.quarantined);
    let host_for_exit = host.clone();
    let book = billing::UsageBook::open(&settings.state_dir).map_err(AgentError::Usage)?;
    let reporter = report::Reporter::new(settings.clone(), host, latest, book)?;
    notifier.status("registering with the scheduler");
    reporter.run(&mut tenants, notifier, shutdown).await;
    notifier.stopping(if settings.stop_tenants_on_exit {
        "stopping, and stopping its tenants (stop_tenants_on_exit)"
    } else {
        "stopping; tenants keep running"
    });
    if let Some(server) = metrics_server {
        server.abort();
    }
    info!(
        stop_tenants = settings.stop_tenants_on_exit,
        "agent stopping"
    );
    let endpoints_host = host_for_exit;
    tenants.shutdown(settings.stop_tenants_on_exit).await;
    if settings.stop_tenants_on_exit {
        // Nothing is left to keep a port for.
        endpoints_host.endpoints.close_keeper();
    }
    Ok(())
}

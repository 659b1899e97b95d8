//! Wires one scheduler replica together: the store, openraft, the gRPC services, and the leader's
//! background tasks (the fence, which commits an entry of each term this replica leads before it
//! answers from its state, and chooses the cluster's identity once; the placer, which finds room
//! for pending tenants; the liveness watch, which marks silent nodes down), then serves until told
//! to stop, or until Raft stops on its own (a storage error): then the process exits non-zero.
//! Under systemd it says `READY=1` once Raft runs and the gRPC port listens, pings the watchdog
//! after each round trip to its Raft core, and says `STOPPING=1` when it stops.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormant_common::metrics_http::{MetricsHttpError, MetricsListener, Render};
use dormant_common::sd_notify::Notifier;
use dormant_common::tls::{PeerIdentity, Transport};
use dormant_common::NodeStatus;
use openraft::BasicNode;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::config::Settings;
use crate::consensus;
use crate::disk::DiskReserve;
use crate::fence::Fence;
use crate::grpc;
use crate::grpc::authz::{Api, Gate};
use crate::liveness::{Liveness, Verdict, Watch};
use crate::metrics;
use crate::network::PeerNetwork;
use crate::pending;
use crate::proposer::Proposer;
use crate::read_index::ReadIndex;
use crate::replica::{App, Counters};
use crate::state::Command;
use crate::store;
use crate::Raft;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("raft config: {0}")]
    RaftConfig(String),
    #[error("start raft: {0}")]
    Raft(String),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error(transparent)]
    Tls(#[from] dormant_common::tls::TlsError),
    #[error(transparent)]
    ServerTls(#[from] grpc::tls::ServerTlsError),
    #[error(
        "cert: {path} is the certificate of {found}, not of this replica (dormant://replica/{id})"
    )]
    NotThisReplica {
        path: String,
        found: String,
        id: u64,
    },
    #[error(
        "raft stopped: {0}; nothing was acknowledged that is not on disk: free the disk (or fix \
         the error) and start the replica again"
    )]
    RaftStopped(String),
    #[error(transparent)]
    Metrics(#[from] MetricsHttpError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("serve gRPC on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        source: tonic::transport::Error,
    },
}

/// How often the leader heartbeats its followers, in ms. openraft 0.9 also uses it as the timeout
/// of every append-entries call: a follower slower than that (its fsync) is sent the entries again.
pub const HEARTBEAT_MS: u64 = 100;
/// The election timeout's range, in ms; openraft draws one per process. A follower campaigns
/// after hearing nothing for the leader lease (openraft: the maximum) plus its own timeout, so
/// 0.9-1.2 s after the leader's last heartbeat (etcd: 1 s). A candidate that saw a longer log
/// during a contested election waits twice the maximum more (openraft's `smaller_log_timeout`,
/// armed until its next campaign): 2.1-2.4 s, still inside the 3 s a failover may take. The
/// maximum is also how long a follower refuses to vote for anyone after a heartbeat, which bounds
/// the heartbeat lease (`consensus::LEASE`).
pub const ELECTION_TIMEOUT_MS: std::ops::Range<u64> = 300..600;

fn raft_config(settings: &Settings) -> Result<openraft::Config, AppError> {
    let config = openraft::Config {
        cluster_name: "dormant".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MS.start,
        election_timeout_max: ELECTION_TIMEOUT_MS.end,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
        // Keep some entries past the snapshot so a follower a little behind needs no snapshot.
        max_in_snapshot_log_to_keep: (settings.snapshot_every / 5).min(1000),
        // Entries per append-entries message (openraft: 300). An entry may be a batch of up to
        // `proposer::MAX_BATCH` writes, each up to about 10 KB at the validation limits (64
        // labels, a pending reason naming 10 nodes): 16 of them stay near 20 MB, inside the
        // 64 MiB RPC limit. Commits send a few entries at a time anyway.
        max_payload_entries: 16,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| AppError::RaftConfig(e.to_string()))
}

/// Directories under `dir` (itself included) 0700, files 0600; symlinks are left alone.
fn make_private(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            make_private(&entry?.path())?;
        }
    } else if meta.is_file() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Runs a replica until `shutdown` resolves; `notifier` tells systemd how it goes (nothing when
/// it is off).
pub async fn run(
    settings: Settings,
    notifier: &Notifier,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    notifier.status("opening the store and starting raft");
    // The store holds every tenant's password: files this process creates are its own (the
    // unit sets `UMask=0077` too), and what an older version left readable is closed.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(&settings.data_dir)
        .and_then(|()| make_private(&settings.data_dir))
        .map_err(|source| AppError::DataDir {
            path: settings.data_dir.display().to_string(),
            source,
        })?;
    let transport = Transport::new(settings.tls.as_ref())?;
    match transport.identity() {
        None => warn!(
            "--insecure: plaintext gRPC, no certificates, no identities; anyone who reaches {} \
             can act as a replica, a node or an operator",
            settings.listen
        ),
        Some(PeerIdentity::Replica(id)) if *id == settings.id => {}
        Some(other) => {
            return Err(AppError::NotThisReplica {
                path: settings
                    .tls
                    .as_ref()
                    .map(|t| t.cert.display().to_string())
                    .unwrap_or_default(),
                found: other.uri(),
                id: settings.id,
            })
        }
    }
    let (log_store, sm_store) = store::open(&settings.data_dir.join("raft"))?;
    let state = sm_store.shared();
    let snapshot_bytes = sm_store.snapshot_size();
    let network = PeerNetwork::new(transport.clone());
    let raft = Raft::new(
        settings.id,
        Arc::new(raft_config(&settings)?),
        network.clone(),
        log_store,
        sm_store,
    )
    .await
    .map_err(|e| AppError::Raft(e.to_string()))?;

    if settings.bootstrap {
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| AppError::Bootstrap(e.to_string()))?;
        if !initialized {
            let members = BTreeMap::from([(
                settings.id,
                BasicNode {
                    addr: settings.advertise.clone(),
                },
            )]);
            raft.initialize(members)
                .await
                .map_err(|e| AppError::Bootstrap(e.to_string()))?;
            info!(node_id = settings.id, "bootstrapped a new cluster");
        }
    }

    let fence = Fence::spawn(settings.id, raft.clone(), state.clone());
    let app = Arc::new(App {
        settings: settings.clone(),
        raft: raft.clone(),
        state,
        liveness: Mutex::new(Liveness::default()),
        placer: Notify::new(),
        proposer: Proposer::spawn(settings.id, raft.clone(), network.clone()),
        network,
        membership: tokio::sync::Mutex::new(()),
        read_index: ReadIndex::spawn(settings.id, raft.clone(), fence.clone()),
        fence,
        disk: DiskReserve::new(&settings.data_dir, settings.disk_reserve),
        counters: Counters::default(),
        snapshot_bytes,
        commit_index: std::sync::atomic::AtomicU64::new(0),
    });

    // Bound before anything is served, so a taken or bad address stops the start.
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr).await?),
        None => None,
    };
    let metrics_server = metrics_listener.map(|listener| {
        info!(listen = %listener.local_addr(), "serving /metrics");
        let app = app.clone();
        let sampled = app.clone();
        let render: Render = Arc::new(move || metrics::render(&app));
        tokio::spawn(async move {
            let sample = metrics::sample_commit_index(sampled);
            let serve = listener.serve(render, std::future::pending());
            tokio::select! {
                () = sample => {}
                served = serve => if let Err(e) = served {
                    warn!(error = %e, "metrics endpoint stopped");
                },
            }
        })
    });
    let placer = tokio::spawn(place_pending_loop(app.clone()));
    let liveness = tokio::spawn(watch_liveness_loop(app.clone()));
    let alive = notifier
        .is_enabled()
        .then(|| tokio::spawn(show_alive(app.clone(), notifier.clone())));
    let stop_alive = alive.as_ref().map(tokio::task::JoinHandle::abort_handle);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<dormant_proto::v1::operator_server::OperatorServer<grpc::api::OperatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dormant_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .ok();

    let enforce = matches!(transport, Transport::Tls(_));
    let gate = |api| Gate::new(api, enforce);
    let router = Server::builder()
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(InterceptedService::new(
            grpc::api::server(app.clone()),
            gate(Api::Operator),
        ))
        .add_service(InterceptedService::new(
            grpc::agent::server(app.clone()),
            gate(Api::Agent),
        ))
        .add_service(InterceptedService::new(
            grpc::raft::server(raft.clone()),
            gate(Api::Raft),
        ));
    // Raft stopping on its own (a storage error, say ENOSPC) ends serving too: a replica that
    // answers every call with an error helps no one, while a process that exits non-zero is
    // restarted by systemd and recovers once the disk does.
    let failure = Arc::new(Mutex::new(None));
    let shutdown = {
        let failure = failure.clone();
        let raft = raft.clone();
        let notifier = notifier.clone();
        async move {
            tokio::select! {
                () = shutdown => {
                    // No pings while stopping: systemd's stop timeout is what applies now.
                    if let Some(alive) = &stop_alive {
                        alive.abort();
                    }
                    notifier.stopping("stopping");
                }
                why = raft_failure(raft) => {
                    if let Some(alive) = &stop_alive {
                        alive.abort();
                    }
                    notifier.stopping(&format!("raft stopped: {why}; exiting"));
                    tracing::error!(error = %why, "raft stopped on its own: stopping this replica");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    // Connections that do not close must not keep a dead replica up.
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        tracing::error!("connections still open 10s after raft stopped: exiting");
                        std::process::exit(1);
                    });
                }
            }
        }
    };
    let served = match &transport {
        Transport::Tls(material) => {
            let config = grpc::tls::server_config(material)?;
            let listener = tokio::net::TcpListener::bind(settings.listen)
                .await
                .map_err(|source| AppError::Bind {
                    addr: settings.listen,
                    source,
                })?;
            info!(listen = %settings.listen, node_id = settings.id, identity = %material.identity, "scheduler serving (mutual TLS)");
            // Listening, so calls wait in the backlog until the server takes them, at once.
            notifier.ready(&serving_status(&settings));
            router
                .serve_with_incoming_shutdown(grpc::tls::incoming(listener, config), shutdown)
                .await
        }
        Transport::Insecure => {
            // Bound here rather than by tonic, so that READY=1 follows the bind; with tonic's
            // own defaults (TCP_NODELAY, no keepalive).
            let incoming = tonic::transport::server::TcpIncoming::bind(settings.listen)
                .map_err(|source| AppError::Bind {
                    addr: settings.listen,
                    source,
                })?
                .with_nodelay(Some(true));
            info!(listen = %settings.listen, node_id = settings.id, "scheduler serving (plaintext, --insecure)");
            notifier.ready(&serving_status(&settings));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    placer.abort();
    liveness.abort();
    if let Some(alive) = alive {
        alive.abort();
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    if let Some(why) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(AppError::RaftStopped(why));
    }
    if let Err(e) = raft.shutdown().await {
        warn!(error = %e, "raft shutdown");
    }
    served.map_err(|source| AppError::Serve {
        addr: settings.listen,
        source,
    })
}

fn serving_status(settings: &Settings) -> String {
    format!("replica {} serving on {}", settings.id, settings.listen)
}

/// Under systemd: at every tick of the notifier's pace, one round trip to the Raft core; when it
/// answers in time, a watchdog ping and the replica's role as its status. A stuck runtime or Raft
/// core answers nothing, the pings stop, and systemd restarts the replica.
async fn show_alive(app: Arc<App>, notifier: Notifier) {
    let mut ticker = notifier.ticker();
    // Half a pace: an answer that comes later would leave too little of the watchdog's time.
    let patience = notifier.alive_every().unwrap_or(Duration::from_secs(10)) / 2;
    loop {
        ticker.tick().await;
        match tokio::time::timeout(patience, app.raft.is_initialized()).await {
            Ok(Ok(_)) => {
                notifier.alive(false);
                notifier.status(&role_status(&app));
            }
            // `raft_failure` stops the replica.
            Ok(Err(fatal)) => notifier.status(&format!("raft stopped: {fatal}")),
            Err(_) => warn!(
                waited = ?patience,
                "the raft core did not answer: no watchdog ping this time"
            ),
        }
    }
}

/// `systemctl status`'s line: this replica's Raft role, term and leader.
fn role_status(app: &App) -> String {
    let m = app.raft.metrics();
    let m = m.borrow();
    let leader = m
        .current_leader
        .map_or_else(|| "none known".to_string(), |id| id.to_string());
    format!(
        "replica {} at {}: {:?}, term {}, leader {leader}",
        app.settings.id, app.settings.listen, m.state, m.current_term
    )
}

/// Resolves with the reason once Raft stops without being told to.
async fn raft_failure(raft: Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "raft's core ended".to_string();
        }
    }
}

/// On the leader: tries to place every pending tenant whenever woken, and every few seconds.
/// Each pass places at most one tenant (the next must see its reservation), so passes repeat at
/// once while they place something: a burst of creates that went stale drains in milliseconds.
/// Why the others wait is not written: `pending::reason` works it out on read.
async fn place_pending_loop(app: Arc<App>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(3), app.placer.notified()).await;
        while app.is_leader() {
            let assign = pending::next_placement(
                &app.state.read().cluster,
                app.settings.placement,
                app.settings.overcommit_ratio,
            );
            let Some(assign) = assign else {
                break;
            };
            if let Err(status) = consensus::propose(&app, assign).await {
                warn!(error = %status, "placing a pending tenant");
                break;
            }
            app.counters.placements.inc();
        }
    }
}

/// On the leader: marks nodes silent for the grace period down, as `liveness::Watch` decides.
/// Heartbeats live only in the leader's memory: a replica that starts answering them (a new
/// term, or its quorum back) first gives every node a fresh grace period.
async fn watch_liveness_loop(app: Arc<App>) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let answering = consensus::current_enough(&app).ok();
        let verdict = {
            let sm = app.state.read();
            let nodes = sm.cluster.nodes.values().map(|n| (&n.id, n.status));
            watch.tick(
                answering,
                nodes,
                &mut app.liveness(),
                app.settings.node_grace_period,
                std::time::Instant::now(),
            )
        };
        let Some(decided_in) = answering else {
            continue;
        };
        let silent = match verdict {
            Verdict::Paused => continue,
            Verdict::GraceGranted => {
                info!(term = ?answering, "answering heartbeats: every node gets a fresh grace period");
                continue;
            }
            Verdict::Down(silent) => silent,
        };
        for node in silent {
            // Heard from while the previous nodes were being marked? Then it is not silent.
            if app.liveness().silent_for(&node, std::time::Instant::now())
                < app.settings.node_grace_period
            {
                continue;
            }
            // A proposal may have waited out a quorum loss (and heartbeats refused meanwhile):
            // go on only while heartbeats have been answerable in the term of the verdict.
            let Ok(term) = consensus::current_enough(&app) else {
                break;
            };
            if term != decided_in {
                break;
            }
            warn!(node_id = %node, grace = ?app.settings.node_grace_period, "node silent past its grace period: marking it down, its tenants lost");
            let down = Command::SetNodeStatus {
                node,
                status: NodeStatus::Down,
                decided_in_term: Some(term),
            };
            let proposed_at = std::time::Instant::now();
            let proposed = consensus::propose(&app, down).await;
            // A proposal that failed or waited longer than the lease may have waited out a
            // quorum loss, heartbeats refused meanwhile: start over with a fresh grace.
            if let Err(status) = &proposed {
                warn!(error = %status, "marking a node down");
            }
            if proposed.is_ok() {
                app.counters.nodes_marked_down.inc();
            }
            if proposed.is_err() || proposed_at.elapsed() >= consensus::LEASE {
                watch = Watch::default();
                break;
            }
        }
    }
}

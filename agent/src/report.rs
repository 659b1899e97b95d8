//! The agent's conversation with the scheduler: register with the host's capacity, then
//! heartbeat on an interval with usage and observed tenant states; each answer carries the
//! desired set, which goes to reconciliation. Any replica will do (followers forward to the
//! leader); when the one in use stops answering, the agent moves to the next in its list.
//!
//! Every answer names the scheduler cluster. The agent records the first it registers with in
//! `<state_dir>/cluster-id` and from then on acts on no answer from another: a scheduler
//! bootstrapped afresh at the same address (an empty data dir) knows none of the node's tenants,
//! and reconciling against its desired set would delete them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dormant_common::hibernation::IdleAfter;
use dormant_common::sd_notify::Notifier;
use dormant_common::tls::{PeerIdentity, TlsError, Transport};
use dormant_common::{TenantName, TenantUid};
use dormant_proto::v1 as pb;
use dormant_proto::v1::agent_api_client::AgentApiClient;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::host::{self, Host, NodeUsageProbe};
use crate::proxy::unix_ms;
use crate::reconcile::{Desired, Tenants, Want};
use crate::tenant::TenantAssignment;
use crate::tenant_fs;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "cert: {path} is the certificate of {found}, not of this node (dormant://node/{node})"
    )]
    NotThisNode {
        path: String,
        found: String,
        node: String,
    },
    #[error("scheduler: no address given")]
    NoScheduler,
    #[error("cluster identity {path}: {why}")]
    ClusterId { path: String, why: String },
}

/// The file in the state directory that holds the scheduler cluster this node belongs to.
pub const CLUSTER_ID_FILE: &str = "cluster-id";

/// Why an answer from the scheduler is not acted on.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("refusing scheduler cluster {theirs}: this node belongs to cluster {ours} (recorded in {path}); tenants keep running")]
    OtherCluster {
        theirs: String,
        ours: String,
        path: String,
    },
    #[error("refusing a scheduler answer that names no cluster ({theirs:?}; a scheduler older than this agent?); tenants keep running")]
    NoCluster { theirs: String },
    #[error("cannot record scheduler cluster {theirs} in {path}: {source}; acting on none of its answers until it is recorded")]
    Record {
        theirs: String,
        path: String,
        source: std::io::Error,
    },
}

/// The scheduler cluster this node belongs to: none until its first registration, then the one
/// that answered it, kept across restarts.
#[derive(Debug)]
pub struct ClusterIdentity {
    path: PathBuf,
    recorded: Option<String>,
}

/// What a scheduler's cluster identity looks like: its leader writes 32 hex digits.
fn plausible_cluster_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl ClusterIdentity {
    /// Reads what `<state_dir>/cluster-id` recorded, if anything.
    pub fn load(state_dir: &Path) -> Result<Self, ReportError> {
        let path = state_dir.join(CLUSTER_ID_FILE);
        let fail = |why: String| ReportError::ClusterId {
            path: path.display().to_string(),
            why,
        };
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim();
                // Written atomically, so anything else is damage: stop rather than guess.
                if !plausible_cluster_id(id) {
                    return Err(fail(format!(
                        "{id:?} is not a cluster identity; remove the file to let this node \
                         join the scheduler cluster it next registers with"
                    )));
                }
                Some(id.to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(fail(e.to_string())),
        };
        Ok(Self { path, recorded })
    }

    pub fn recorded(&self) -> Option<&str> {
        self.recorded.as_deref()
    }

    /// Accepts an answer from cluster `theirs`: this node's own, or the first one heard (which is
    /// recorded before it is acted on).
    pub fn accept(&mut self, theirs: &str) -> Result<(), Refusal> {
        match &self.recorded {
            Some(ours) if ours == theirs => Ok(()),
            Some(ours) => Err(Refusal::OtherCluster {
                theirs: if theirs.is_empty() {
                    "(none named)".to_string()
                } else {
                    theirs.to_string()
                },
                ours: ours.clone(),
                path: self.path.display().to_string(),
            }),
            None if !plausible_cluster_id(theirs) => Err(Refusal::NoCluster {
                theirs: theirs.to_string(),
            }),
            None => {
                // Temp file, fsync, rename: a crash leaves the old content (none) or the whole id.
                tenant_fs::write_atomic(&self.path, format!("{theirs}\n").as_bytes()).map_err(
                    |source| Refusal::Record {
                        theirs: theirs.to_string(),
                        path: self.path.display().to_string(),
                        source,
                    },
                )?;
                info!(cluster_id = theirs, path = %self.path.display(), "this node now belongs to the scheduler cluster that answered its registration");
                self.recorded = Some(theirs.to_string());
                Ok(())
            }
        }
    }
}

/// How long one heartbeat may take before the agent tries the next replica.
const HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Reporter {
    settings: Settings,
    host: Arc<Host>,
    /// One client per scheduler replica in `settings.scheduler`, in order.
    clients: Vec<(String, AgentApiClient<Channel>)>,
    /// The replica in use.
    current: usize,
    probe: NodeUsageProbe,
    seen_version: u64,
    cluster: ClusterIdentity,
    /// Answers refused in a row, to log the first and then every 30th.
    refusals: u32,
    /// The latest heartbeat built, for `/metrics`.
    latest: crate::metrics::LatestReport,
    /// Usage for billing, sampled with each heartbeat.
    book: crate::billing::UsageBook,
}

impl Reporter {
    pub fn new(
        settings: Settings,
        host: Arc<Host>,
        latest: crate::metrics::LatestReport,
        book: crate::billing::UsageBook,
    ) -> Result<Self, ReportError> {
        let transport = Transport::new(settings.tls.as_ref())?;
        match transport.identity() {
            None => warn!(
                "--insecure: plaintext gRPC to the scheduler, no certificates; tenants' passwords \
                 travel in the clear and anyone can speak for this node"
            ),
            Some(PeerIdentity::Node(n)) if n == &settings.node_id => {}
            Some(other) => {
                return Err(ReportError::NotThisNode {
                    path: settings
                        .tls
                        .as_ref()
                        .map(|t| t.cert.display().to_string())
                        .unwrap_or_default(),
                    found: other.uri(),
                    node: settings.node_id.to_string(),
                })
            }
        }
        let mut clients = Vec::new();
        for url in settings
            .scheduler
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let endpoint = transport.endpoint(url)?;
            let url = endpoint.uri().to_string();
            let channel = endpoint
                .connect_timeout(std::time::Duration::from_secs(3))
                .timeout(std::time::Duration::from_secs(10))
                .connect_lazy();
            clients.push((url, AgentApiClient::new(channel)));
        }
        if clients.is_empty() {
            return Err(ReportError::NoScheduler);
        }
        let cluster = ClusterIdentity::load(&host.state_dir)?;
        if let Some(id) = cluster.recorded() {
            info!(cluster_id = id, "this node belongs to scheduler cluster");
        }
        Ok(Self {
            settings,
            host,
            clients,
            current: 0,
            probe: NodeUsageProbe::default(),
            seen_version: 0,
            cluster,
            refusals: 0,
            latest,
            book,
        })
    }

    fn client(&self) -> AgentApiClient<Channel> {
        self.clients[self.current % self.clients.len()].1.clone()
    }

    /// Moves to the next replica when the one in use did not answer (or has no leader to
    /// forward to); an answer that refuses the request is not the replica's fault.
    fn next_replica_if_unreachable(&mut self, e: &tonic::Status) {
        let unreachable = matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        );
        if unreachable && self.clients.len() > 1 {
            self.current = (self.current + 1) % self.clients.len();
            info!(scheduler = %self.clients[self.current].0, "trying the next scheduler replica");
        }
    }

    /// Logs a refused answer (the first, then every 30th in a row) and moves to the next replica:
    /// another in the list may belong to this node's cluster. Nothing is reconciled, so the
    /// tenants keep running as they are.
    fn refuse(&mut self, refusal: &Refusal) {
        self.refusals += 1;
        if self.refusals == 1 || self.refusals.is_multiple_of(30) {
            error!(scheduler = %self.clients[self.current].0, refused = self.refusals, "{refusal}");
        }
        if self.clients.len() > 1 {
            self.current = (self.current + 1) % self.clients.len();
            info!(scheduler = %self.clients[self.current].0, "trying the next scheduler replica");
        }
    }

    /// Registers; the inner result is whether the answer came from this node's cluster.
    async fn register(&mut self) -> Result<Result<(), Refusal>, tonic::Status> {
        let s = &self.settings;
        let capacity = host::capacity(&s.state_dir, s.reserve_memory, s.reserve_storage);
        let req = pb::RegisterRequest {
            node_id: s.node_id.to_string(),
            address: s.advertise.clone(),
            capacity: Some((&capacity).into()),
            engines: self.host.engines.keys().cloned().collect(),
            cgroup_driver: self.host.cgroups.name().to_string(),
            labels: s.labels.clone().into_iter().collect(),
            port_range_start: u32::from(s.ports.0),
            port_range_end: u32::from(s.ports.1),
            cluster_id: self.cluster.recorded().unwrap_or_default().to_string(),
            engine_access: self
                .host
                .engines
                .iter()
                .map(|(name, t)| pb::EngineAccess::new(name, &t.access))
                .collect(),
        };
        let reply = self.client().register(req).await?.into_inner();
        if let Err(refusal) = self.cluster.accept(&reply.cluster_id) {
            return Ok(Err(refusal));
        }
        info!(node_id = %s.node_id, cpu = %capacity.cpu, memory = %capacity.memory, storage = %capacity.storage, "registered with the scheduler");
        Ok(Ok(()))
    }

    fn heartbeat_request(&mut self, tenants: &Tenants) -> pb::HeartbeatRequest {
        let observed = tenants
            .handles
            .iter()
            .filter(|(_, h)| !h.is_finished())
            // A resumed tenant is reported once its supervisor knows whether the engine is still
            // there: until then the scheduler keeps what it last heard (a delete under way is
            // always reported, so the scheduler never takes its absence for "gone").
            .filter(|(_, h)| h.is_deleting() || h.status.borrow().announced)
            .map(|(name, h)| {
                let o = h.observed();
                let state = if h.is_deleting() {
                    dormant_common::TenantState::Deleting
                } else {
                    o.state
                };
                let usage = h.usage().unwrap_or_default();
                let pressure = usage.pressure.unwrap_or_default();
                let traffic = h.traffic();
                pb::ObservedTenant {
                    name: name.to_string(),
                    uid: h.spec.uid.get(),
                    state: state.to_string(),
                    reason: o.reason.unwrap_or_default(),
                    resize_pending: o.resize_pending.unwrap_or_default(),
                    restart_generation: o.restart_generation,
                    hibernate_generation: o.hibernate_generation,
                    wake_generation: o.wake_generation,
                    connections: traffic
                        .connections
                        .iter()
                        .map(|c| pb::Connection {
                            peer: c.peer.to_string(),
                            opened_unix_ms: unix_ms(c.opened),
                        })
                        .collect(),
                    usage: Some(pb::TenantUsage {
                        cpu_usage_usec: usage.cpu_usage_usec,
                        memory_bytes: usage.memory_bytes,
                        storage_used_bytes: h.volume_used_bytes().unwrap_or(0),
                        pids: usage.pids,
                        restarts: o.restarts,
                        oom_kills: usage.oom_kills,
                        cpu_throttled_usec: usage.cpu_throttled_usec,
                        cpu_nr_throttled: usage.cpu_nr_throttled,
                        pressure_reported: usage.pressure.is_some(),
                        cpu_pressure_some_usec: pressure.cpu_some_usec,
                        memory_pressure_some_usec: pressure.memory_some_usec,
                        memory_pressure_full_usec: pressure.memory_full_usec,
                        io_pressure_some_usec: pressure.io_some_usec,
                        io_pressure_full_usec: pressure.io_full_usec,
                        open_connections: traffic.open,
                        connections_total: traffic.total,
                        bytes_in: traffic.bytes_in,
                        bytes_out: traffic.bytes_out,
                        last_activity_unix_ms: traffic.last_activity_unix_ms,
                        hibernations: o.hibernations,
                        wakes: o.wakes,
                        last_wake_usec: o
                            .last_wake
                            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    }),
                }
            })
            .collect();
        pb::HeartbeatRequest {
            node_id: self.settings.node_id.to_string(),
            seen_version: self.seen_version,
            tenants: observed,
            usage: Some(self.probe.sample(&self.settings.state_dir)),
            cluster_id: self.cluster.recorded().unwrap_or_default().to_string(),
            // The scheduler drops a heartbeat that arrives after this agent stopped waiting.
            sent_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
            timeout_ms: u64::try_from(HEARTBEAT_TIMEOUT.as_millis()).unwrap_or(0),
            reports_engine_access: true,
        }
    }

    /// Adds this heartbeat's samples to the usage book and saves it before anyone sees the
    /// figures (see `billing`); returns the figures only this host keeps, for `/metrics`.
    fn meter(
        &mut self,
        heartbeat: &pb::HeartbeatRequest,
        tenants: &Tenants,
    ) -> BTreeMap<String, crate::metrics::LocalFigures> {
        use dormant_common::TenantState;
        let at_unix_ms = heartbeat.sent_unix_ms;
        let mut local = BTreeMap::new();
        for t in &heartbeat.tenants {
            let Some(handle) = TenantName::parse(&t.name)
                .ok()
                .and_then(|name| tenants.handles.get(&name))
            else {
                continue;
            };
            let observed = handle.observed();
            let awake = !handle.is_deleting()
                && matches!(
                    observed.state,
                    TenantState::Starting | TenantState::Running | TenantState::Waking
                );
            let usage = t.usage.unwrap_or_default();
            let sample = crate::billing::Sample {
                at_unix_ms,
                cpu_usage_usec: usage.cpu_usage_usec,
                memory_bytes: usage.memory_bytes,
                storage_bytes: usage.storage_used_bytes,
                awake,
            };
            self.book.observe(&t.name, handle.spec.uid, sample);
            local.insert(t.name.clone(), observed.wake_durations);
        }
        self.book
            .retain(|name| tenants.handles.keys().any(|n| n.as_str() == name));
        if let Err(e) = self.book.save() {
            warn!(error = %e, "saving the usage book; /metrics keeps showing the last saved figures");
        }
        local
            .into_iter()
            .filter_map(|(name, wakes)| {
                let usage = self.book.meter(&name)?.clone();
                Some((name, crate::metrics::LocalFigures { usage, wakes }))
            })
            .collect()
    }

    /// Registers, then heartbeats until `shutdown` resolves; reconciles after every answer.
    ///
    /// Under systemd (`notifier` on) this loop is also what tells it how the agent is: `READY=1`
    /// once registered and every resumed tenant's port is open, `STATUS=` lines, and the
    /// watchdog pings, which come from this loop's turns so that an agent stuck in it is
    /// restarted (a call in flight delays a ping by at most its timeout, well inside the
    /// watchdog's).
    pub async fn run(
        mut self,
        tenants: &mut Tenants,
        notifier: &Notifier,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut registered = false;
        let mut ready = false;
        let mut alive = notifier.ticker();
        let mut interval = tokio::time::interval(self.settings.heartbeat_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            // A tenant changing state reports at once instead of waiting for the next tick.
            tokio::select! {
                _ = &mut shutdown => return,
                () = alive.tick() => {
                    // Until ready, the ping also extends systemd's start timeout: waiting for
                    // the scheduler is no reason to fail the start (tenants keep running).
                    notifier.alive(!ready);
                    continue;
                }
                _ = interval.tick() => {}
                _ = self.host.changed.notified() => {}
            }
            if !registered {
                match self.register().await {
                    Ok(Ok(())) => {
                        registered = true;
                        self.refusals = 0;
                    }
                    Ok(Err(refusal)) => {
                        notifier.status(&format!("not registered: {refusal}"));
                        self.refuse(&refusal);
                        continue;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(30) {
                            warn!(error = %e.message(), "cannot register with the scheduler; retrying");
                        }
                        notifier.status(&format!(
                            "registering with the scheduler ({}): {}; retrying, tenants keep running",
                            self.clients[self.current].0,
                            e.message()
                        ));
                        self.next_replica_if_unreachable(&e);
                        continue;
                    }
                }
            }
            if !ready {
                match tenants.ports_pending() {
                    0 => {
                        ready = true;
                        info!("ready: registered, every tenant port open");
                        notifier.ready(&self.serving_status(tenants));
                    }
                    pending => notifier.status(&format!(
                        "registered; waiting for {pending} resumed tenants' ports to open"
                    )),
                }
            }
            let heartbeat = self.heartbeat_request(tenants);
            let local = self.meter(&heartbeat, tenants);
            self.latest.set(&heartbeat, local);
            let mut req = tonic::Request::new(heartbeat);
            // Well inside the scheduler's grace period, so a replica that hangs is left for the
            // next before the node is judged silent.
            req.set_timeout(HEARTBEAT_TIMEOUT);
            match self.client().heartbeat(req).await {
                Ok(reply) => {
                    self.latest.heartbeats_sent.inc();
                    failures = 0;
                    let reply = reply.into_inner();
                    // Nothing in another cluster's answer is acted on, "register again" included:
                    // registering would make this node one of its nodes.
                    if let Err(refusal) = self.cluster.accept(&reply.cluster_id) {
                        notifier.status(&refusal.to_string());
                        self.refuse(&refusal);
                        continue;
                    }
                    self.refusals = 0;
                    if reply.register_again {
                        registered = false;
                        continue;
                    }
                    if reply.version < self.seen_version {
                        // An answer older than one already acted on: acting on it could remove
                        // tenants created since. The next heartbeat brings a current one.
                        warn!(
                            version = reply.version,
                            seen = self.seen_version,
                            "ignoring an out-of-date desired set"
                        );
                        continue;
                    }
                    self.seen_version = reply.version;
                    tenants.reconcile(&desired_from(reply));
                    if ready {
                        notifier.status(&self.serving_status(tenants));
                    }
                }
                Err(e) => {
                    self.latest.heartbeats_failed.inc();
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(error = %e.message(), "heartbeat failed; tenants keep running");
                    }
                    notifier.status(&format!(
                        "heartbeat to {} failed: {}; tenants keep running",
                        self.clients[self.current].0,
                        e.message()
                    ));
                    self.next_replica_if_unreachable(&e);
                }
            }
        }
    }

    /// `systemctl status`'s line for an agent that reports normally.
    fn serving_status(&self, tenants: &Tenants) -> String {
        format!(
            "node {} reporting to {}; {} tenants",
            self.settings.node_id,
            self.clients[self.current].0,
            tenants.handles.len()
        )
    }
}

fn desired_from(reply: pb::HeartbeatResponse) -> Desired {
    let mut desired = Desired {
        version: reply.version,
        ..Default::default()
    };
    for t in reply.tenants {
        let Ok(name) = TenantName::parse(&t.name) else {
            warn!(name = %t.name, "scheduler sent an invalid tenant name; ignored");
            continue;
        };
        let desired_state = match t.typed_desired_state() {
            Ok(d) => d,
            Err(e) => {
                // A newer scheduler's word this agent does not know: neither start nor delete.
                warn!(tenant_id = %name, error = %e, "scheduler sent a desired state this agent does not know; ignored");
                continue;
            }
        };
        let want = if desired_state == dormant_common::DesiredState::Deleted {
            Want::Deleted {
                uid: TenantUid::new(t.uid),
            }
        } else {
            let r = t.resources.unwrap_or_default();
            let Ok(port) = u16::try_from(t.port) else {
                warn!(tenant_id = %name, port = t.port, "scheduler sent an invalid port; ignored");
                continue;
            };
            Want::Running(TenantAssignment {
                name: name.clone(),
                uid: TenantUid::new(t.uid),
                engine: t.engine,
                resources: (&r).into(),
                port,
                password: t.password,
                restart_generation: t.restart_generation,
                idle_after: IdleAfter::from_millis(t.idle_after_ms),
                // An unknown mode (a newer scheduler) falls back to the default: stop.
                hibernate: t.hibernate.parse().unwrap_or_default(),
                hibernate_generation: t.hibernate_generation,
                wake_generation: t.wake_generation,
            })
        };
        desired.tenants.insert(name, want);
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "3a6c0d2e9b1f47a88c5e2d7f01b9e4c3";
    const THEIRS: &str = "9f1e2d3c4b5a69788796a5b4c3d2e1f0";

    #[test]
    fn the_first_cluster_is_recorded_and_every_other_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let mut identity = ClusterIdentity::load(dir.path()).unwrap();
        assert_eq!(identity.recorded(), None);
        identity.accept(OURS).unwrap();
        let file = dir.path().join(CLUSTER_ID_FILE);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{OURS}\n"));
        identity.accept(OURS).unwrap();

        // After a restart of the agent, the record still decides.
        let mut identity = ClusterIdentity::load(dir.path()).unwrap();
        assert_eq!(identity.recorded(), Some(OURS));
        let refusal = identity.accept(THEIRS).unwrap_err().to_string();
        assert_eq!(
            refusal,
            format!(
                "refusing scheduler cluster {THEIRS}: this node belongs to cluster {OURS} \
                 (recorded in {}); tenants keep running",
                file.display()
            )
        );
        let refusal = identity.accept("").unwrap_err().to_string();
        assert!(
            refusal.starts_with(
                "refusing scheduler cluster (none named): this node belongs to cluster 3a6c"
            ),
            "{refusal}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{OURS}\n"));
    }

    #[test]
    fn an_answer_without_a_cluster_is_not_joined() {
        let dir = tempfile::tempdir().unwrap();
        let mut identity = ClusterIdentity::load(dir.path()).unwrap();
        for bad in ["", "a/b", "x\ny"] {
            assert!(
                matches!(identity.accept(bad), Err(Refusal::NoCluster { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(identity.recorded(), None);
        assert!(!dir.path().join(CLUSTER_ID_FILE).exists());
    }

    #[test]
    fn a_damaged_record_stops_the_agent_with_the_path_and_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CLUSTER_ID_FILE), "").unwrap();
        let err = ClusterIdentity::load(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("cluster identity "), "{err}");
        assert!(err.contains("remove the file"), "{err}");
    }
}

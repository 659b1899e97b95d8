//! The agent's conversation with the scheduler: register with the host's capacity, then
//! heartbeat on an interval with usage and observed tenant states; each answer carries the
//! desired set, which goes to reconciliation. Any replica will do (followers forward to the
//! leader); when the one in use stops answering, the agent moves to the next in its list.

use std::sync::Arc;

use dormant_common::TenantName;
use dormant_proto::v1 as pb;
use dormant_proto::v1::agent_api_client::AgentApiClient;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::config::Settings;
use crate::host::{self, Host, NodeUsageProbe};
use crate::reconcile::{Desired, Tenants, Want};
use crate::tenant::TenantSpec;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("scheduler URL {url:?}: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("scheduler: no address given")]
    NoScheduler,
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
}

fn to_pb(r: &dormant_common::Resources) -> pb::Resources {
    pb::Resources {
        milli_cpu: r.cpu.0,
        memory_bytes: r.memory.0,
        storage_bytes: r.storage.0,
    }
}

impl Reporter {
    pub fn new(settings: Settings, host: Arc<Host>) -> Result<Self, ReportError> {
        let mut clients = Vec::new();
        for url in settings
            .scheduler
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let url = if url.contains("://") {
                url.to_string()
            } else {
                format!("http://{url}")
            };
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|source| ReportError::Url {
                    url: url.clone(),
                    source,
                })?
                .connect_timeout(std::time::Duration::from_secs(3))
                .timeout(std::time::Duration::from_secs(10))
                .connect_lazy();
            clients.push((url, AgentApiClient::new(channel)));
        }
        if clients.is_empty() {
            return Err(ReportError::NoScheduler);
        }
        Ok(Self {
            settings,
            host,
            clients,
            current: 0,
            probe: NodeUsageProbe::default(),
            seen_version: 0,
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

    async fn register(&mut self) -> Result<(), tonic::Status> {
        let s = &self.settings;
        let capacity = host::capacity(&s.state_dir, s.reserve_memory, s.reserve_storage);
        let req = pb::RegisterRequest {
            node_id: s.node_id.to_string(),
            address: s.advertise.clone(),
            capacity: Some(to_pb(&capacity)),
            engines: self.host.engines.keys().cloned().collect(),
            cgroup_driver: self.host.cgroups.name().to_string(),
            labels: s.labels.clone().into_iter().collect(),
            port_range_start: u32::from(s.ports.0),
            port_range_end: u32::from(s.ports.1),
        };
        self.client().register(req).await?;
        info!(node_id = %s.node_id, cpu = %capacity.cpu, memory = %capacity.memory, storage = %capacity.storage, "registered with the scheduler");
        Ok(())
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
                pb::ObservedTenant {
                    name: name.to_string(),
                    uid: h.spec.uid,
                    state: state.to_string(),
                    reason: o.reason.unwrap_or_default(),
                    resize_pending: o.resize_pending.unwrap_or_default(),
                    restart_generation: o.restart_generation,
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
                    }),
                }
            })
            .collect();
        pb::HeartbeatRequest {
            node_id: self.settings.node_id.to_string(),
            seen_version: self.seen_version,
            tenants: observed,
            usage: Some(self.probe.sample(&self.settings.state_dir)),
        }
    }

    /// Registers, then heartbeats until `shutdown` resolves; reconciles after every answer.
    pub async fn run(
        mut self,
        tenants: &mut Tenants,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut registered = false;
        let mut interval = tokio::time::interval(self.settings.heartbeat_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            // A tenant changing state reports at once instead of waiting for the next tick.
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => {}
                _ = self.host.changed.notified() => {}
            }
            if !registered {
                match self.register().await {
                    Ok(()) => registered = true,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(30) {
                            warn!(error = %e.message(), "cannot register with the scheduler; retrying");
                        }
                        self.next_replica_if_unreachable(&e);
                        continue;
                    }
                }
            }
            let mut req = tonic::Request::new(self.heartbeat_request(tenants));
            // Well inside the scheduler's grace period, so a replica that hangs is left for the
            // next before the node is judged silent.
            req.set_timeout(HEARTBEAT_TIMEOUT);
            match self.client().heartbeat(req).await {
                Ok(reply) => {
                    failures = 0;
                    let reply = reply.into_inner();
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
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(error = %e.message(), "heartbeat failed; tenants keep running");
                    }
                    self.next_replica_if_unreachable(&e);
                }
            }
        }
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
        let want = if t.desired_state == "deleted" {
            Want::Deleted { uid: t.uid }
        } else {
            let r = t.resources.unwrap_or_default();
            let Ok(port) = u16::try_from(t.port) else {
                warn!(tenant_id = %name, port = t.port, "scheduler sent an invalid port; ignored");
                continue;
            };
            Want::Running(TenantSpec {
                name: name.clone(),
                uid: t.uid,
                engine: t.engine,
                resources: dormant_common::Resources {
                    cpu: dormant_common::MilliCpu(r.milli_cpu),
                    memory: dormant_common::Bytes(r.memory_bytes),
                    storage: dormant_common::Bytes(r.storage_bytes),
                },
                port,
                password: t.password,
                restart_generation: t.restart_generation,
            })
        };
        desired.tenants.insert(name, want);
    }
    desired
}

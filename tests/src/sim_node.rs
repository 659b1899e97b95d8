//! Simulated nodes: a thread that registers a node through the agent API and heartbeats for it,
//! with no agent, cgroups or engines behind it. For tests of the scheduler alone (placement,
//! liveness at scale), where what a node runs does not matter. Named as the fake it is.
//! One-shot calls ([`register_once`], [`heartbeat_with`]) let a test say what a node would:
//! arbitrary observed tenant states, and read the answers (desired set, cluster identity).
//! Each speaks with the node certificate of its own id from the cluster's CA (`Security`); the
//! `_via` calls take any transport, to show what another identity, or none, is refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use dormant_common::tls::Transport;
use dormant_proto::v1 as pb;
use dormant_proto::v1::agent_api_client::AgentApiClient;

use crate::tls::Security;

#[derive(Debug, Clone)]
pub struct SimNodeSpec {
    pub id: String,
    pub milli_cpu: u64,
    pub memory_mib: u64,
    pub storage_gib: u64,
    pub engines: Vec<String>,
    pub labels: Vec<(String, String)>,
    pub heartbeat: Duration,
}

impl SimNodeSpec {
    pub fn new(id: &str, milli_cpu: u64, memory_mib: u64, storage_gib: u64) -> Self {
        Self {
            id: id.into(),
            milli_cpu,
            memory_mib,
            storage_gib,
            engines: vec!["postgres".into(), "redis".into()],
            labels: Vec::new(),
            heartbeat: Duration::from_millis(500),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }
}

/// Heartbeats until dropped (or [`SimNode::silence`]d).
pub struct SimNode {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    cluster_id: String,
}

impl SimNode {
    /// Registers the node with the first of the comma-separated `urls` that answers (waiting up
    /// to 30 s), then heartbeats in the background.
    pub fn start(security: &Security, urls: &str, spec: SimNodeSpec) -> Self {
        let transport = security.node_transport(&spec.id);
        let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (registered, wait) = mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run(transport, urls, spec, flag, registered));
        });
        let cluster_id = match wait.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => panic!("simulated node could not register: {e}"),
            Err(_) => panic!("simulated node could not register within 30 s"),
        };
        Self {
            stop,
            thread: Some(thread),
            cluster_id,
        }
    }

    /// The cluster identity its registration was answered with.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Stops heartbeating, as a host that died would.
    pub fn silence(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn client(
    transport: &Transport,
    url: &str,
) -> Option<AgentApiClient<tonic::transport::Channel>> {
    let endpoint = transport
        .endpoint(url)
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    Some(AgentApiClient::new(endpoint.connect_lazy()))
}

async fn run(
    transport: Transport,
    urls: Vec<String>,
    spec: SimNodeSpec,
    stop: Arc<AtomicBool>,
    registered: mpsc::Sender<Result<String, String>>,
) {
    let mut clients = Vec::new();
    for u in &urls {
        match client(&transport, u).await {
            Some(c) => clients.push(c),
            None => {
                let _ = registered.send(Err(format!("bad URL {u}")));
                return;
            }
        }
    }
    let register = registration(&spec);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut current = 0;
    // Refused while the cluster has no leader or no identity yet: try again, like an agent.
    let answer = loop {
        match clients[current].register(register.clone()).await {
            Ok(answer) => break answer.into_inner(),
            Err(s) if tokio::time::Instant::now() > deadline => {
                let _ = registered.send(Err(s.message().to_string()));
                return;
            }
            Err(_) => {}
        }
        current = (current + 1) % clients.len();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = registered.send(Ok(answer.cluster_id));
    let mut seen_version = 0;
    while !stop.load(Ordering::Relaxed) {
        let req = pb::HeartbeatRequest {
            cluster_id: String::new(),
            node_id: spec.id.clone(),
            seen_version,
            tenants: Vec::new(),
            usage: Some(pb::NodeUsage::default()),
            sent_unix_ms: unix_ms_now(),
            timeout_ms: HEARTBEAT_TIMEOUT_MS,
            reports_engine_access: true,
        };
        match clients[current].heartbeat(req).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                if reply.register_again {
                    let _ = clients[current].register(register.clone()).await;
                }
                seen_version = reply.version;
            }
            Err(_) => current = (current + 1) % clients.len(),
        }
        tokio::time::sleep(spec.heartbeat).await;
    }
}

/// What a simulated node registers with: `spec`'s capacity, engines and labels, ports
/// 20000-29999.
pub fn registration(spec: &SimNodeSpec) -> pb::RegisterRequest {
    pb::RegisterRequest {
        cluster_id: String::new(),
        node_id: spec.id.clone(),
        address: "127.0.0.1".into(),
        capacity: Some(pb::Resources {
            milli_cpu: spec.milli_cpu,
            memory_bytes: spec.memory_mib << 20,
            storage_bytes: spec.storage_gib << 30,
        }),
        engines: spec.engines.clone(),
        cgroup_driver: "simulated".into(),
        labels: spec.labels.iter().cloned().collect(),
        port_range_start: 20000,
        port_range_end: 29999,
        // What an agent with these engines' defaults reports.
        engine_access: spec
            .engines
            .iter()
            .map(|engine| {
                pb::EngineAccess::new(engine, &dormant_common::EngineAccess::defaults_for(engine))
            })
            .collect(),
    }
}

/// A tenant as a heartbeat reports it, in any `state` (the scheduler decides what it accepts).
pub fn observed(name: &str, uid: u64, state: &str) -> pb::ObservedTenant {
    pb::ObservedTenant {
        name: name.into(),
        uid,
        state: state.into(),
        usage: Some(pb::TenantUsage::default()),
        ..Default::default()
    }
}

fn one_shot<T>(
    transport: &Transport,
    url: &str,
    call: impl AsyncFnOnce(
        AgentApiClient<tonic::transport::Channel>,
    ) -> Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let Some(c) = client(transport, url).await else {
            return Err(tonic::Status::invalid_argument(format!("bad URL {url}")));
        };
        call(c).await.map(tonic::Response::into_inner)
    })
}

/// Registers `spec` once at `url`, as node `spec.id`, and returns the answer, or the refusal.
pub fn register_once(
    security: &Security,
    url: &str,
    spec: &SimNodeSpec,
) -> Result<pb::RegisterResponse, tonic::Status> {
    register_via(&security.node_transport(&spec.id), url, spec)
}

/// [`register_once`] over `transport`, whatever identity it shows.
pub fn register_via(
    transport: &Transport,
    url: &str,
    spec: &SimNodeSpec,
) -> Result<pb::RegisterResponse, tonic::Status> {
    let req = registration(spec);
    one_shot(transport, url, async move |mut c| c.register(req).await)
}

/// Sends one heartbeat for `node_id` to `url` reporting `tenants`, and returns the answer (the
/// desired set, the cluster identity), or the refusal.
pub fn heartbeat_with(
    security: &Security,
    url: &str,
    node_id: &str,
    tenants: Vec<pb::ObservedTenant>,
) -> Result<pb::HeartbeatResponse, tonic::Status> {
    heartbeat_via(&security.node_transport(node_id), url, node_id, tenants)
}

/// [`heartbeat_with`] over `transport`, whatever identity it shows.
pub fn heartbeat_via(
    transport: &Transport,
    url: &str,
    node_id: &str,
    tenants: Vec<pb::ObservedTenant>,
) -> Result<pb::HeartbeatResponse, tonic::Status> {
    heartbeat_sent_at(transport, url, node_id, tenants, unix_ms_now())
}

/// A heartbeat that says it was sent at `sent_unix_ms` (the node's clock), waiting as an agent
/// does ([`HEARTBEAT_TIMEOUT_MS`]): one sent long ago arrives as if held up in the network.
pub fn heartbeat_sent_at(
    transport: &Transport,
    url: &str,
    node_id: &str,
    tenants: Vec<pb::ObservedTenant>,
    sent_unix_ms: u64,
) -> Result<pb::HeartbeatResponse, tonic::Status> {
    let req = pb::HeartbeatRequest {
        cluster_id: String::new(),
        node_id: node_id.into(),
        seen_version: 0,
        tenants,
        usage: Some(pb::NodeUsage::default()),
        sent_unix_ms,
        timeout_ms: HEARTBEAT_TIMEOUT_MS,
        reports_engine_access: true,
    };
    one_shot(transport, url, async move |mut c| c.heartbeat(req).await)
}

/// How long a simulated node says it waits for a heartbeat's answer, as the agent does.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 3000;

/// This host's wall clock, Unix ms.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Sends one heartbeat for `node_id` to `url` and returns the desired-set version, or the refusal.
pub fn heartbeat_once(security: &Security, url: &str, node_id: &str) -> Result<u64, tonic::Status> {
    heartbeat_with(security, url, node_id, Vec::new()).map(|r| r.version)
}

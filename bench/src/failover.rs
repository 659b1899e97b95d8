//! Failover: the leader killed (-9), then the time until a create is acknowledged through a
//! surviving replica, over many kills, idle and under creating clients; next to a 3-member etcd
//! cluster, its leader killed the same way, until a put is acknowledged. Each killed member is
//! restarted on its data and has caught up before the next kill.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::etcd;
use crate::procs::{free_port, Guard, ProcId};
use crate::report::Report;
use crate::stats::Latency;
use crate::Common;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Leader kills per load level.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Creating clients while the leader is killed; one series per value.
    #[arg(long, value_delimiter = ',', default_value = "0,64")]
    pub clients: Vec<usize>,
    /// Skip the etcd cluster.
    #[arg(long)]
    pub skip_etcd: bool,
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
}

/// A probe is retried this often until one is acknowledged.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// One probe attempt may take this long before the next replica is tried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// A failover that takes longer than this is a failure of the run.
const GIVE_UP: Duration = Duration::from_secs(30);

pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.common.replicas < 3 {
        bail!("--replicas must be at least 3: a failover needs a majority left");
    }
    let bin_dir = args.common.bin_dir()?;
    let mut report = Report::new("failover");
    args.common.echo(&mut report, &bin_dir);
    report.param("kills", args.kills);
    report.param("clients", json!(args.clients));
    let mut guard = Guard::new(args.common.work_dir.clone(), args.common.keep)?;
    report.param("work_dir", guard.dir().display().to_string());

    let dormant = Cluster::start(&mut guard, &bin_dir, args.common.replicas).await?;
    report.section(
        "dormant",
        "Dormant: leader kill -> first acknowledged create (p50 / p99 / max)",
    );
    for &clients in &args.clients {
        let times = dormant_failovers(&mut guard, &dormant, args.kills, clients).await?;
        let l = Latency::of(&times);
        report.row(
            &format!("{clients} clients"),
            &format!("clients_{clients}"),
            l.text(),
            l.json(),
        );
    }
    if !args.skip_etcd {
        let members = EtcdCluster::start(&mut guard, &args.etcd_bin).await?;
        report.section(
            "etcd",
            "etcd, 3 members: leader kill -> first acknowledged put (p50 / p99 / max)",
        );
        for &clients in &args.clients {
            let times = etcd_failovers(&mut guard, &members, args.kills, clients).await?;
            let l = Latency::of(&times);
            report.row(
                &format!("{clients} clients"),
                &format!("clients_{clients}"),
                l.text(),
                l.json(),
            );
        }
    }
    Ok(report)
}

fn create(name: String) -> pb::CreateTenantRequest {
    pb::CreateTenantRequest {
        name,
        engine: "postgres".into(),
        cpu: "0.1".into(),
        memory: "64MiB".into(),
        storage: "1GiB".into(),
        ..Default::default()
    }
}

/// Background clients creating and deleting tenants (the state stays small) through every
/// replica, moving on after each error, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(channels: Vec<Channel>, clients: usize, label: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, done, channels) = (stop.clone(), done.clone(), channels.clone());
                tokio::spawn(async move {
                    let mut at = c % channels.len();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let ok = match label {
                            "dormant" => {
                                let mut client = OperatorClient::new(channels[at].clone());
                                let name = format!("load-{c}-{n}");
                                client.create_tenant(create(name.clone())).await.is_ok()
                                    && client
                                        .delete_tenant(pb::DeleteTenantRequest {
                                            name,
                                            force: false,
                                        })
                                        .await
                                        .is_ok()
                            }
                            _ => {
                                let mut kv =
                                    etcd::pb::kv_client::KvClient::new(channels[at].clone());
                                etcd::put(&mut kv, format!("/load/{c}"), vec![0; 64])
                                    .await
                                    .is_ok()
                            }
                        };
                        if ok {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            at = (at + 1) % channels.len();
                            tokio::time::sleep(PROBE_EVERY).await;
                        }
                    }
                })
            })
            .collect();
        Self { stop, done, tasks }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.done.load(Ordering::Relaxed)
    }
}

/// The leader's id among the replicas that are up, as one of them reports it.
async fn dormant_leader(cluster: &Cluster, up: &[u64]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + GIVE_UP;
    loop {
        for id in up {
            if let Ok(s) = cluster.status(*id).await {
                if let Some(leader) = s.leader_id.filter(|l| up.contains(l)) {
                    if s.members.iter().all(|m| m.lag == 0) {
                        return Ok(leader);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no leader with every member caught up within {GIVE_UP:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dormant_failovers(
    guard: &mut Guard,
    cluster: &Cluster,
    kills: usize,
    clients: usize,
) -> anyhow::Result<Vec<Duration>> {
    let transport = cluster.client_transport();
    let mut channels = Vec::new();
    for r in &cluster.replicas {
        // Lazy: the replica killed last may still be starting.
        let endpoint = transport
            .endpoint(&r.url)
            .with_context(|| format!("bad URL {}", r.url))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30));
        channels.push(endpoint.connect_lazy());
    }
    let ids: Vec<u64> = cluster.replicas.iter().map(|r| r.id).collect();
    let load = Load::start(channels.clone(), clients, "dormant");
    let mut times = Vec::with_capacity(kills);
    for k in 0..kills {
        guard.check_running()?;
        let leader = dormant_leader(cluster, &ids).await?;
        // Let the load run against a settled cluster first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let proc = cluster.replica(leader)?.proc;
        let survivors: Vec<Channel> = cluster
            .replicas
            .iter()
            .zip(&channels)
            .filter(|(r, _)| r.id != leader)
            .map(|(_, c)| c.clone())
            .collect();
        let killed_at = Instant::now();
        guard.kill(proc);
        let mut at = 0;
        let took = loop {
            let mut client = OperatorClient::new(survivors[at].clone());
            let name = format!("probe-{clients}-{k}");
            let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, client.create_tenant(create(name)));
            match attempt.await {
                Ok(Ok(_)) => break killed_at.elapsed(),
                Ok(Err(_)) | Err(_) => at = (at + 1) % survivors.len(),
            }
            if killed_at.elapsed() > GIVE_UP {
                bail!("kill {k}: no create acknowledged within {GIVE_UP:?}");
            }
            tokio::time::sleep(PROBE_EVERY).await;
        };
        eprintln!("dormant, {clients} clients, kill {k}: leader {leader}, {took:?}");
        times.push(took);
        let mut client = OperatorClient::new(survivors[at].clone());
        let _ = client
            .delete_tenant(pb::DeleteTenantRequest {
                name: format!("probe-{clients}-{k}"),
                force: false,
            })
            .await;
        guard.respawn(proc)?;
    }
    let done = load.finish().await;
    eprintln!("dormant, {clients} clients: {done} create+delete pairs meanwhile");
    Ok(times)
}

/// A 3-member etcd cluster on loopback, fsync on (etcd's defaults: 100 ms heartbeats, 1 s
/// election timeout).
struct EtcdCluster {
    members: Vec<(ProcId, String)>,
}

impl EtcdCluster {
    async fn start(guard: &mut Guard, etcd_bin: &std::path::Path) -> anyhow::Result<Self> {
        if !etcd_bin.is_file() {
            bail!(
                "{} missing: install etcd (apt-get install etcd-server), pass --etcd-bin, or \
                 --skip-etcd",
                etcd_bin.display()
            );
        }
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push((free_port()?, free_port()?));
        }
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args = vec![
                "--name".to_string(),
                format!("e{i}"),
                "--data-dir".into(),
                guard.dir().join(format!("etcd-{i}")).display().to_string(),
                "--listen-client-urls".into(),
                client_url.clone(),
                "--advertise-client-urls".into(),
                client_url.clone(),
                "--listen-peer-urls".into(),
                peer_url.clone(),
                "--initial-advertise-peer-urls".into(),
                peer_url,
                "--initial-cluster".into(),
                initial.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
            ];
            let proc = guard.spawn(&format!("etcd-{i}"), etcd_bin, &args)?;
            members.push((proc, client_url));
        }
        let cluster = Self { members };
        cluster.leader(guard, &[0, 1, 2]).await?;
        Ok(cluster)
    }

    /// The index of the member that reports itself leader (`etcd_server_is_leader 1`).
    async fn leader(&self, guard: &mut Guard, up: &[usize]) -> anyhow::Result<usize> {
        let deadline = Instant::now() + GIVE_UP;
        loop {
            guard.check_running()?;
            for &i in up {
                if is_leader(&self.members[i].1).await.unwrap_or(false) {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd elected no leader within {GIVE_UP:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reads the member's `/metrics` over plain HTTP/1.0.
async fn is_leader(url: &str) -> anyhow::Result<bool> {
    let addr = url.trim_start_matches("http://");
    let mut stream =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut body))
        .await
        .context("metrics timed out")??;
    Ok(body.lines().any(|l| l.trim() == "etcd_server_is_leader 1"))
}

async fn etcd_failovers(
    guard: &mut Guard,
    cluster: &EtcdCluster,
    kills: usize,
    clients: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut channels = Vec::new();
    for (_, url) in &cluster.members {
        let ch = Channel::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        channels.push(ch);
    }
    let load = Load::start(channels.clone(), clients, "etcd");
    let mut times = Vec::with_capacity(kills);
    for k in 0..kills {
        let leader = cluster.leader(guard, &[0, 1, 2]).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let survivors: Vec<Channel> = (0..3)
            .filter(|i| *i != leader)
            .map(|i| channels[i].clone())
            .collect();
        let proc = cluster.members[leader].0;
        let killed_at = Instant::now();
        guard.kill(proc);
        let mut at = 0;
        let took = loop {
            let mut kv = etcd::pb::kv_client::KvClient::new(survivors[at].clone());
            let attempt = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                etcd::put(&mut kv, format!("/probe/{k}"), b"x".to_vec()),
            );
            match attempt.await {
                Ok(Ok(())) => break killed_at.elapsed(),
                Ok(Err(_)) | Err(_) => at = (at + 1) % survivors.len(),
            }
            if killed_at.elapsed() > GIVE_UP {
                bail!("etcd kill {k}: no put acknowledged within {GIVE_UP:?}");
            }
            tokio::time::sleep(PROBE_EVERY).await;
        };
        eprintln!("etcd, {clients} clients, kill {k}: member {leader}, {took:?}");
        times.push(took);
        guard.respawn(proc)?;
        // Back in the cluster (it serves a put) before the next kill.
        let deadline = Instant::now() + GIVE_UP;
        loop {
            let mut kv = etcd::pb::kv_client::KvClient::new(channels[leader].clone());
            if etcd::put(&mut kv, "/probe/back".into(), b"x".to_vec())
                .await
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd member {leader} did not come back within {GIVE_UP:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let done = load.finish().await;
    eprintln!("etcd, {clients} clients: {done} puts meanwhile");
    Ok(times)
}

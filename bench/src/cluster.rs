//! A scheduler cluster of real `dormant-scheduler` processes on loopback, formed the way an
//! operator forms one: replica 1 bootstraps, the others start empty and are added with
//! `dormantctl cluster add-learner` and `cluster promote`. Also the gRPC channels to its leader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use dormant_common::tls::{PeerIdentity, Transport};
use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use dormant_tests::Security;
use serde::Deserialize;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::procs::{free_port, Guard, ProcId};

/// How long forming the cluster may take before we give up; elections take about a second.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// The part of `dormantctl cluster status -o json` we use (it also has `commit_index`,
/// `applied_index` and `this_id`; the window's indexes come over gRPC instead).
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// `null` while no leader is known.
    pub leader_id: Option<u64>,
    /// `null` until the first leader has chosen it; agents are not answered before.
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub term: u64,
    pub members: Vec<Member>,
}

impl Status {
    /// `1 voter 127.0.0.1:4000 lag 0, 2 voter …`, for the report.
    pub fn members_text(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{} {} {} lag {}", m.id, m.role, m.address, m.lag))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Member {
    pub id: u64,
    pub address: String,
    pub role: String,
    pub lag: u64,
}

#[derive(Debug, Clone)]
pub struct Replica {
    pub id: u64,
    pub url: String,
    pub proc: ProcId,
}

#[derive(Debug)]
pub struct Cluster {
    pub replicas: Vec<Replica>,
    /// The cluster's own CA (`dormant_tests::tls`): replicas, dormantctl, the agent and the
    /// bench's in-process clients use mutual TLS, as in production.
    pub security: Security,
    ctl: PathBuf,
}

/// The identity of the bench's in-process gRPC clients: a replica's (never a member), the one
/// identity that may speak for many nodes at once (as a follower forwarding does) and read the
/// operator API on the same connections.
const BENCH_CLIENT: PeerIdentity = PeerIdentity::Replica(u64::MAX);

/// Where `dormant-scheduler` and `dormantctl` are.
pub fn check_bins(bin_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let sched = bin_dir.join("dormant-scheduler");
    let ctl = bin_dir.join("dormantctl");
    for b in [&sched, &ctl] {
        if !b.is_file() {
            bail!(
                "{} missing: build them first (cargo build --release --bins) or pass --bin-dir",
                b.display()
            );
        }
    }
    Ok((sched, ctl))
}

impl Cluster {
    /// Starts `replicas` replicas and forms one cluster of voters led by replica 1.
    pub async fn start(guard: &mut Guard, bin_dir: &Path, replicas: u64) -> anyhow::Result<Self> {
        if replicas == 0 {
            bail!("--replicas must be at least 1");
        }
        let (sched, ctl) = check_bins(bin_dir)?;
        let mut cluster = Self {
            replicas: Vec::new(),
            security: Security::tls_in(&guard.dir().join("tls")),
            ctl,
        };
        if replicas > 1 {
            cluster.check_membership_commands().await?;
        }
        for id in 1..=replicas {
            let port = free_port()?;
            let data = guard.dir().join(format!("replica-{id}"));
            let mut args = vec![
                "--id".to_string(),
                id.to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                data.display().to_string(),
            ];
            if id == 1 {
                args.push("--bootstrap".into());
            }
            args.extend(cluster.security.replica_args(id));
            let proc = guard.spawn(&format!("replica-{id}"), &sched, &args)?;
            cluster.replicas.push(Replica {
                id,
                url: cluster.security.url(&format!("127.0.0.1:{port}")),
                proc,
            });
        }

        let deadline = Instant::now() + FORM_TIMEOUT;
        eprintln!("waiting for replica 1 to lead");
        loop {
            guard.check_running()?;
            if let Ok(s) = cluster.status(1).await {
                if s.leader_id == Some(1) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("replica 1 did not become leader within {FORM_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let others: Vec<Replica> = cluster.replicas[1..].to_vec();
        for r in &others {
            let addr = r
                .url
                .split_once("://")
                .map_or(r.url.as_str(), |(_, a)| a)
                .to_string();
            eprintln!("adding replica {} at {addr}", r.id);
            // The learner must be serving before the leader can replicate to it.
            wait_listening(&addr, deadline).await?;
            guard.check_running()?;
            cluster
                .ctl_ok(&["cluster", "add-learner", &r.id.to_string(), &addr])
                .await?;
            cluster
                .ctl_ok(&["cluster", "promote", &r.id.to_string()])
                .await?;
        }
        if replicas > 1 {
            loop {
                guard.check_running()?;
                let s = cluster.status(1).await?;
                let voters = s.members.iter().filter(|m| m.role == "voter").count();
                if s.leader_id.is_some() && u64::try_from(voters).ok() == Some(replicas) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the cluster did not reach {replicas} voters: {s:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // The agent API answers only once the cluster has an identity, chosen by the leader
        // moments after it first leads: simulated agents registering earlier would be refused.
        loop {
            guard.check_running()?;
            if cluster.status(1).await?.cluster_id.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the cluster chose no identity within {FORM_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(cluster)
    }

    /// Fails early, and says why, when the `dormantctl` in use predates the membership commands.
    async fn check_membership_commands(&self) -> anyhow::Result<()> {
        let help = self.ctl_raw(None, &["cluster", "--help"]).await?;
        if !help.0.contains("add-learner") || !help.0.contains("promote") {
            bail!(
                "{} has no `cluster add-learner`/`cluster promote`: use --replicas 1, or build a \
                 dormantctl that has them",
                self.ctl.display()
            );
        }
        Ok(())
    }

    pub fn replica(&self, id: u64) -> anyhow::Result<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| anyhow!("no replica {id}"))
    }

    /// `dormantctl cluster status -o json` against replica `id`.
    pub async fn status(&self, id: u64) -> anyhow::Result<Status> {
        let url = self.replica(id)?.url.clone();
        let (out, err, ok) = self
            .ctl_raw(Some(&url), &["cluster", "status", "-o", "json"])
            .await?;
        if !ok {
            bail!("dormantctl cluster status: {}", err.trim());
        }
        serde_json::from_str(&out).with_context(|| format!("cluster status JSON: {out}"))
    }

    /// The leader's id and URL, as replica 1 sees it (member address → URL).
    pub async fn leader(&self) -> anyhow::Result<(u64, String)> {
        let s = self.status(1).await?;
        let id = s.leader_id.ok_or_else(|| anyhow!("no leader elected"))?;
        let m = s
            .members
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| anyhow!("leader {id} is not among the members {:?}", s.members))?;
        let url = if m.address.contains("://") {
            m.address.clone()
        } else {
            self.security.url(&m.address)
        };
        Ok((id, url))
    }

    /// PIDs of the replicas by id, for CPU accounting.
    pub fn pids(&self, guard: &Guard) -> BTreeMap<u64, u32> {
        self.replicas
            .iter()
            .map(|r| (r.id, guard.pid(r.proc)))
            .collect()
    }

    async fn ctl_ok(&self, args: &[&str]) -> anyhow::Result<()> {
        let url = self.replica(1)?.url.clone();
        let (out, err, ok) = self.ctl_raw(Some(&url), args).await?;
        if !ok {
            bail!(
                "dormantctl {}: {}{}",
                args.join(" "),
                err.trim(),
                out.trim()
            );
        }
        Ok(())
    }

    /// Runs dormantctl; returns stdout, stderr and whether it succeeded.
    pub async fn ctl_raw(
        &self,
        url: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<(String, String, bool)> {
        let mut cmd = tokio::process::Command::new(&self.ctl);
        if let Some(url) = url {
            cmd.arg("--scheduler").arg(url);
        }
        cmd.args(self.security.operator_args());
        // kill_on_drop: an interrupted run must not leave a dormantctl behind either.
        let out = cmd
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run {}", self.ctl.display()))?;
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        ))
    }
}

async fn wait_listening(addr: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens at {addr}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    /// How the bench's in-process clients connect to the replicas.
    pub fn client_transport(&self) -> Transport {
        self.security.transport(&BENCH_CLIENT)
    }
}

/// `n` separate HTTP/2 connections to `url`: requests spread over them instead of queueing on one.
pub async fn channels(transport: &Transport, url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = transport
            .endpoint(url)
            .with_context(|| format!("bad URL {url}"))?
            .connect_timeout(Duration::from_secs(5))
            // A stuck request shows up as an error instead of hanging the run.
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("connect to {url}"))?;
        out.push(ch);
    }
    Ok(out)
}

/// The leader's Raft indexes over gRPC (`Operator/ClusterStatus`, not a stale read).
pub async fn grpc_status(ch: &Channel) -> anyhow::Result<pb::ClusterStatusResponse> {
    let mut c = OperatorClient::new(ch.clone());
    Ok(c.cluster_status(pb::ClusterStatusRequest::default())
        .await
        .context("ClusterStatus")?
        .into_inner())
}

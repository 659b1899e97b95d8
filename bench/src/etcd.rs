//! The etcd baseline: an etcd cluster of one or more members started as our children (fsync on,
//! as by default), and its `KV/Put` over gRPC through the subset of etcd's protos that
//! `build.rs` compiles.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::procs::{free_port, Guard};

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;

/// Starts an etcd cluster of `members` (data in `<work dir>/etcd-<n>`) and returns each
/// member's client URL once the cluster accepts puts.
pub async fn start(guard: &mut Guard, etcd: &Path, members: usize) -> anyhow::Result<Vec<String>> {
    if !etcd.is_file() {
        bail!(
            "{} missing: install etcd (apt-get install etcd-server), pass --etcd-bin, or --skip-etcd",
            etcd.display()
        );
    }
    let mut urls = Vec::new();
    for n in 1..=members.max(1) {
        let client = format!("http://127.0.0.1:{}", free_port()?);
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        urls.push((format!("m{n}"), client, peer));
    }
    let initial_cluster = urls
        .iter()
        .map(|(name, _, peer)| format!("{name}={peer}"))
        .collect::<Vec<_>>()
        .join(",");
    for (name, client, peer) in &urls {
        let data = guard.dir().join(format!("etcd-{name}"));
        let args = vec![
            "--name".to_string(),
            name.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client.clone(),
            "--listen-peer-urls".into(),
            peer.clone(),
            // Without these etcd expects its peer at the default localhost:2380 and refuses to start.
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            initial_cluster.clone(),
        ];
        guard.spawn(&format!("etcd-{name}"), etcd, &args)?;
    }
    let clients: Vec<String> = urls.into_iter().map(|(_, client, _)| client).collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    for client in &clients {
        loop {
            guard.check_running()?;
            if probe(client).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let why = match probe(client).await {
                    Ok(()) => break,
                    Err(e) => format!("{e:#}"),
                };
                bail!("etcd at {client} did not accept a put within 30s: {why}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(clients)
}

/// One put outside the measured keys: etcd has a leader and serves writes.
async fn probe(url: &str) -> anyhow::Result<()> {
    let ch = Channel::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connect")?;
    KvClient::new(ch)
        .put(pb::PutRequest {
            key: b"/bench-probe".to_vec(),
            value: b"ok".to_vec(),
        })
        .await
        .context("put")?;
    Ok(())
}

pub async fn put(
    client: &mut KvClient<Channel>,
    key: String,
    value: Vec<u8>,
) -> Result<(), tonic::Status> {
    client
        .put(pb::PutRequest {
            key: key.into_bytes(),
            value,
        })
        .await
        .map(|_| ())
}

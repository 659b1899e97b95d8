//! The etcd baseline: a single-member etcd started as our child (fsync on, as by default), and
//! its `KV/Put` over gRPC through the subset of etcd's protos that `build.rs` compiles.

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

/// Starts etcd with its data in `<work dir>/etcd` and returns its client URL once it accepts puts.
pub async fn start(guard: &mut Guard, etcd: &Path) -> anyhow::Result<String> {
    if !etcd.is_file() {
        bail!(
            "{} missing: install etcd (apt-get install etcd-server), pass --etcd-bin, or --skip-etcd",
            etcd.display()
        );
    }
    let client = format!("http://127.0.0.1:{}", free_port()?);
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let data = guard.dir().join("etcd");
    let args = vec![
        "--name".to_string(),
        "bench".into(),
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
        format!("bench={peer}"),
    ];
    guard.spawn("etcd", etcd, &args)?;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        guard.check_running()?;
        if probe(&client).await.is_ok() {
            return Ok(client);
        }
        if Instant::now() > deadline {
            let why = match probe(&client).await {
                Ok(()) => return Ok(client),
                Err(e) => format!("{e:#}"),
            };
            bail!("etcd at {client} did not accept a put within 30s: {why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

//! The etcd baseline: an etcd cluster of one or more members started as our children (fsync on,
//! as by default), in plaintext or with mutual TLS between clients and members and among members
//! (certificates from a CA of the run's own, as Dormant's), and its `KV/Put` over gRPC through
//! the subset of etcd's protos that `build.rs` compiles.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use dormant_common::tls::{PeerIdentity, Transport};
use dormant_tests::tls::Security;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::procs::{free_port, Guard};

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;

/// How the bench's clients reach an etcd cluster started by [`start`].
pub struct Started {
    pub urls: Vec<String>,
    pub transport: Transport,
}

/// Starts an etcd cluster of `members` (data in `<work dir>/etcd-<n>`), with mutual TLS if
/// `tls`, and returns each member's client URL once the cluster accepts puts.
pub async fn start(
    guard: &mut Guard,
    etcd: &Path,
    members: usize,
    tls: bool,
) -> anyhow::Result<Started> {
    if !etcd.is_file() {
        bail!(
            "{} missing: install etcd (apt-get install etcd-server), pass --etcd-bin, or --skip-etcd",
            etcd.display()
        );
    }
    // A CA of this cluster's own: each member presents a certificate for 127.0.0.1 and asks
    // one of its clients and peers, as Dormant's replicas do.
    let security = if tls {
        let dir = guard.dir().join(format!("etcd-tls-{members}"));
        Security::tls_in(&dir)
    } else {
        Security::Insecure
    };
    let scheme = if tls { "https" } else { "http" };
    let mut urls = Vec::new();
    for n in 1..=members.max(1) {
        let client = format!("{scheme}://127.0.0.1:{}", free_port()?);
        let peer = format!("{scheme}://127.0.0.1:{}", free_port()?);
        urls.push((format!("m{n}"), client, peer));
    }
    let initial_cluster = urls
        .iter()
        .map(|(name, _, peer)| format!("{name}={peer}"))
        .collect::<Vec<_>>()
        .join(",");
    for (n, (name, client, peer)) in urls.iter().enumerate() {
        // Each run a directory of its own: etcd ignores --initial-cluster for one it has used.
        let run = format!("etcd-{members}{}-{name}", if tls { "-tls" } else { "" });
        let data = guard.dir().join(&run);
        let mut args = vec![
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
        if let Security::Tls(pki) = &security {
            let files = pki.files(&PeerIdentity::Replica(1000 + n as u64));
            let (ca, cert, key) = (
                files.ca.display().to_string(),
                files.cert.display().to_string(),
                files.key.display().to_string(),
            );
            for (flag, value) in [
                ("--cert-file", &cert),
                ("--key-file", &key),
                ("--trusted-ca-file", &ca),
                ("--peer-cert-file", &cert),
                ("--peer-key-file", &key),
                ("--peer-trusted-ca-file", &ca),
            ] {
                args.extend([flag.to_string(), value.clone()]);
            }
            args.extend([
                "--client-cert-auth".into(),
                "--peer-client-cert-auth".into(),
            ]);
        }
        guard.spawn(&run, etcd, &args)?;
    }
    let transport = security.transport(&PeerIdentity::Operator("bench".into()));
    let clients: Vec<String> = urls.into_iter().map(|(_, client, _)| client).collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    for client in &clients {
        loop {
            guard.check_running()?;
            if probe(&transport, client).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let why = match probe(&transport, client).await {
                    Ok(()) => break,
                    Err(e) => format!("{e:#}"),
                };
                bail!("etcd at {client} did not accept a put within 30s: {why}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(Started {
        urls: clients,
        transport,
    })
}

/// One put outside the measured keys: etcd has a leader and serves writes.
async fn probe(transport: &Transport, url: &str) -> anyhow::Result<()> {
    let ch = transport
        .endpoint(url)?
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

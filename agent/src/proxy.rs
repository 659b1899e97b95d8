//! The tenant's TCP endpoint: accepts on the tenant's port and copies bytes both ways to the
//! engine's Unix socket. A connection that arrives while the engine is starting waits for it to be
//! ready instead of being refused. (Hibernation will hook its wake-up in here.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

/// How long a client waits for a starting engine before its connection is closed.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long a refused connect waits for the supervisor to see the engine gone.
const ENGINE_GONE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("listen on {addr}: {source}")]
pub struct ProxyError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// What the proxy does with a client, as the tenant's supervisor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// The engine is starting (or restarting): clients wait for it.
    Waiting,
    /// The engine answers: clients are forwarded.
    Ready,
    /// The tenant is `failed` (or going away): clients are closed at once instead of waiting
    /// for an engine that is not coming.
    Down,
}

/// Connection counters, read by the reporter.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub open_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A running proxy. Dropping it closes the port and every connection through it.
#[derive(Debug)]
pub struct ProxyHandle {
    task: JoinHandle<()>,
    pub stats: Arc<ProxyStats>,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds the tenant's port; done before the engine starts so a port clash is reported early.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError { addr, source })
}

/// Serves `listener`, forwarding to `socket` whenever `ready` says the engine answers.
/// The socket must be owned by `owner` (the tenant's uid) and is never reached through a symlink.
pub fn serve(
    listener: TcpListener,
    socket: PathBuf,
    owner: nix::unistd::Uid,
    ready: watch::Receiver<Upstream>,
) -> ProxyHandle {
    let stats = Arc::new(ProxyStats::default());
    let task = tokio::spawn(accept_loop(listener, socket, owner, ready, stats.clone()));
    ProxyHandle { task, stats }
}

async fn accept_loop(
    listener: TcpListener,
    socket: PathBuf,
    owner: nix::unistd::Uid,
    ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
) {
    // Connection tasks live in this set: aborting the accept loop drops it and ends them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let _ = client.set_nodelay(true);
                    connections.spawn(forward(client, peer, socket.clone(), owner, ready.clone(), stats.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddr,
    socket: PathBuf,
    owner: nix::unistd::Uid,
    mut ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
) {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    let mut engine = loop {
        match tokio::time::timeout_at(deadline, ready.wait_for(|u| *u != Upstream::Waiting)).await {
            Ok(Ok(u)) if *u == Upstream::Ready => {}
            // Not ready in time, the tenant failed, or its task is gone (deleted, agent exiting).
            _ => {
                debug!(%peer, "engine not available; closing client connection");
                return;
            }
        }
        match crate::tenant_fs::connect_socket(&socket, owner).await {
            Ok(s) => break s,
            Err(e) => {
                // Refused while the engine is said to be ready: a full backlog (EAGAIN) passes
                // in moments, and a crashed engine is seen by the supervisor in moments. Either
                // way the client waits a little, retrying, and then follows the engine's next
                // state; if nothing changes within a second the socket itself is the problem (a
                // tenant removed it) and the client is dropped. Nothing spins.
                let give_up = tokio::time::Instant::now() + ENGINE_GONE_WAIT;
                let mut last = e;
                let retried = loop {
                    let left_ready = tokio::time::timeout(
                        Duration::from_millis(50),
                        ready.wait_for(|u| *u != Upstream::Ready),
                    )
                    .await
                    .is_ok();
                    if left_ready {
                        break None;
                    }
                    match crate::tenant_fs::connect_socket(&socket, owner).await {
                        Ok(s) => break Some(s),
                        Err(e) if tokio::time::Instant::now() < give_up => last = e,
                        Err(e) => {
                            warn!(%peer, socket = %socket.display(), error = %e, "connect to engine socket");
                            return;
                        }
                    }
                };
                match retried {
                    Some(s) => break s,
                    None => {
                        debug!(%peer, error = %last, "engine went away; waiting for the next one")
                    }
                }
            }
        }
    };
    stats.open_connections.fetch_add(1, Ordering::Relaxed);
    stats.total_connections.fetch_add(1, Ordering::Relaxed);
    if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut engine).await {
        stats.bytes_in.fetch_add(up, Ordering::Relaxed);
        stats.bytes_out.fetch_add(down, Ordering::Relaxed);
    }
    stats.open_connections.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    /// Bytes flow both ways, and a client that connects before the engine is ready waits.
    #[tokio::test]
    async fn proxies_after_ready() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let engine = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = engine.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"pong").await.unwrap();
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Upstream::Waiting);
        let handle = serve(listener, sock, nix::unistd::Uid::current(), rx);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(Upstream::Ready).unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        drop(handle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "port closed after drop"
        );
    }
}

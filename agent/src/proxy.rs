//! The tenant's TCP endpoint: accepts on the tenant's port for the tenant's whole life (hibernated
//! included) and copies bytes both ways to the engine's Unix socket. A client that arrives while
//! the engine is starting, hibernated or waking waits for it instead of being refused; its arrival
//! is what wakes a hibernated tenant (the supervisor watches `Clients`). Counts per tenant: open
//! connections with their peers, connections in total, bytes in and out, last activity.
//!
//! The data path: a connection holds no buffer while it is quiet. When a side becomes readable a
//! 64 KiB buffer is taken (never zeroed), drained into the other side, and dropped when the side
//! has nothing more, so 5,000 idle clients cost sockets, not 640 MB of buffers. Counters are
//! updated per chunk, never per byte.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn, Instrument};

/// How long a client waits for a starting or waking engine before its connection is closed.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long a refused connect waits for the supervisor to see the engine gone.
const ENGINE_GONE_WAIT: Duration = Duration::from_secs(1);
/// The buffer a side borrows while it has bytes to move.
const CHUNK: usize = 64 * 1024;
/// Open connections listed in a report (all are counted).
pub const LISTED_CONNECTIONS: usize = 100;

#[derive(Debug, thiserror::Error)]
#[error("listen on {addr}: {source}")]
pub struct ProxyError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// What the proxy does with a client, as the tenant's supervisor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// The engine is starting, restarting or waking: clients wait for it.
    Waiting,
    /// The engine answers: clients are forwarded.
    Ready,
    /// The tenant hibernates: clients wait, and their arrival (counted in `Clients::accepted`)
    /// wakes it.
    Hibernated,
    /// The tenant is `failed` (or going away): clients are closed at once instead of waiting
    /// for an engine that is not coming.
    Down,
}

/// The clients of a tenant, as its supervisor watches them: it hibernates after a while with
/// none open, and wakes when one more was accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clients {
    pub open: u64,
    pub accepted: u64,
}

/// One open client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenConnection {
    pub peer: SocketAddr,
    pub opened: SystemTime,
}

/// The proxy's counters at one moment, for the reporter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub open: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The last connect, disconnect or chunk of bytes, in ms since the epoch (0 = never).
    pub last_activity_unix_ms: u64,
    /// The oldest open connections, at most `LISTED_CONNECTIONS`.
    pub connections: Vec<OpenConnection>,
}

/// A tenant's proxy counters. They outlive any one proxy task: the tenant's handle owns them.
#[derive(Debug)]
pub struct ProxyStats {
    clients: watch::Sender<Clients>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    last_activity_unix_ms: AtomicU64,
    /// Open connections by their accept number.
    open: Mutex<BTreeMap<u64, OpenConnection>>,
}

impl Default for ProxyStats {
    fn default() -> Self {
        Self {
            clients: watch::channel(Clients::default()).0,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            last_activity_unix_ms: AtomicU64::new(0),
            open: Mutex::default(),
        }
    }
}

/// Milliseconds since the epoch (0 for a time before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ProxyStats {
    /// The open and accepted counts, for the supervisor's idle and wake decisions.
    pub fn clients(&self) -> watch::Receiver<Clients> {
        self.clients.subscribe()
    }

    pub fn traffic(&self) -> Traffic {
        let clients = *self.clients.borrow();
        let connections = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .take(LISTED_CONNECTIONS)
            .cloned()
            .collect();
        Traffic {
            open: clients.open,
            total: clients.accepted,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            last_activity_unix_ms: self.last_activity_unix_ms.load(Ordering::Relaxed),
            connections,
        }
    }

    fn touch(&self) {
        self.last_activity_unix_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Counts a client in; the returned guard counts it out when dropped.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Admitted {
        let mut id = 0;
        self.clients.send_modify(|c| {
            c.open += 1;
            c.accepted += 1;
            id = c.accepted;
        });
        let opened = SystemTime::now();
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, OpenConnection { peer, opened });
        self.last_activity_unix_ms
            .store(unix_ms(opened), Ordering::Relaxed);
        Admitted {
            stats: self.clone(),
            id,
        }
    }
}

/// A client counted as open until this is dropped.
struct Admitted {
    stats: Arc<ProxyStats>,
    id: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.stats
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.stats.clients.send_modify(|c| c.open -= 1);
        self.stats.touch();
    }
}

/// A running proxy. Dropping it closes the port and every connection through it.
#[derive(Debug)]
pub struct ProxyHandle {
    task: JoinHandle<()>,
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

/// Serves `listener`, forwarding to `socket` whenever `ready` says the engine answers, counting
/// in `stats`. The socket must be owned by `owner` (the tenant's uid) and is never reached
/// through a symlink. Log lines carry the current span (the tenant's).
pub fn serve(
    listener: TcpListener,
    socket: PathBuf,
    owner: nix::unistd::Uid,
    ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
) -> ProxyHandle {
    let upstream = Target { socket, owner };
    let task = tokio::spawn(
        accept_loop(listener, upstream, ready, stats).instrument(tracing::Span::current()),
    );
    ProxyHandle { task }
}

/// Where clients are forwarded.
#[derive(Debug, Clone)]
struct Target {
    socket: PathBuf,
    owner: nix::unistd::Uid,
}

async fn accept_loop(
    listener: TcpListener,
    target: Target,
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
                    // Counted before anything else: a hibernated tenant wakes on this.
                    let admitted = stats.admit(peer);
                    info!(%peer, "client connected");
                    let conn = forward(client, peer, target.clone(), ready.clone(), stats.clone(), admitted);
                    connections.spawn(conn.instrument(tracing::Span::current()));
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

/// Waits until the engine answers and connects to it; `None` when the client is to be closed.
async fn connect_engine(
    peer: SocketAddr,
    target: &Target,
    ready: &mut watch::Receiver<Upstream>,
) -> Option<tokio::net::UnixStream> {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        let waiting = |u: &Upstream| matches!(u, Upstream::Waiting | Upstream::Hibernated);
        match tokio::time::timeout_at(deadline, ready.wait_for(|u| !waiting(u))).await {
            Ok(Ok(u)) if *u == Upstream::Ready => {}
            // Not ready in time, the tenant failed, or its task is gone (deleted, agent exiting).
            _ => {
                info!(%peer, "engine not available; closing the client's connection");
                return None;
            }
        }
        let e = match crate::tenant_fs::connect_socket(&target.socket, target.owner).await {
            Ok(s) => return Some(s),
            Err(e) => e,
        };
        // Refused while the engine is said to be ready: a full backlog (EAGAIN) passes in
        // moments, and a crashed or stopping engine is seen by the supervisor in moments. Either
        // way the client waits a little, retrying, and then follows the engine's next state; if
        // nothing changes within a second the socket itself is the problem (a tenant removed
        // it) and the client is dropped. Nothing spins.
        let give_up = tokio::time::Instant::now() + ENGINE_GONE_WAIT;
        let mut last = e;
        loop {
            let left_ready = tokio::time::timeout(
                Duration::from_millis(50),
                ready.wait_for(|u| *u != Upstream::Ready),
            )
            .await
            .is_ok();
            if left_ready {
                debug!(%peer, error = %last, "engine went away; waiting for the next one");
                break;
            }
            match crate::tenant_fs::connect_socket(&target.socket, target.owner).await {
                Ok(s) => return Some(s),
                Err(e) if tokio::time::Instant::now() < give_up => last = e,
                Err(e) => {
                    warn!(%peer, socket = %target.socket.display(), error = %e, "connect to engine socket");
                    return None;
                }
            }
        }
    }
}

async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    target: Target,
    mut ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
    admitted: Admitted,
) {
    let Some(engine) = connect_engine(peer, &target, &mut ready).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (engine_read, engine_write) = engine.into_split();
    let up = pump(client_read, engine_write, &stats.bytes_in, &stats);
    let down = pump(engine_read, client_write, &stats.bytes_out, &stats);
    let outcome = tokio::try_join!(up, down);
    debug!(%peer, result = ?outcome.map(|_| ()), "client disconnected");
    drop(admitted);
}

/// The read side of a socket half: waits for data without holding a buffer.
trait ReadHalf {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize>;
}

impl ReadHalf for tokio::net::tcp::OwnedReadHalf {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedReadHalf::readable(self)
    }
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        tokio::net::tcp::OwnedReadHalf::try_read_buf(self, buf)
    }
}

impl ReadHalf for tokio::net::unix::OwnedReadHalf {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::unix::OwnedReadHalf::readable(self)
    }
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        tokio::net::unix::OwnedReadHalf::try_read_buf(self, buf)
    }
}

/// Moves bytes from `from` to `to` until `from` ends (then shuts `to`'s write side, so the
/// other direction can still finish) or either side fails.
async fn pump(
    from: impl ReadHalf,
    mut to: impl AsyncWrite + Unpin,
    counter: &AtomicU64,
    stats: &ProxyStats,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(CHUNK);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // The peer closed its side; a socket already gone needs no shutdown.
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Ok(n) => {
                    to.write_all(&buf).await?;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    stats.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    struct Served {
        addr: SocketAddr,
        upstream: watch::Sender<Upstream>,
        stats: Arc<ProxyStats>,
        handle: ProxyHandle,
        _dir: tempfile::TempDir,
    }

    /// A proxy in front of an echo engine that answers `ping` with `pong` and echoes the rest.
    async fn echo_engine(state: Upstream) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let engine = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = engine.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (upstream, rx) = watch::channel(state);
        let stats = Arc::new(ProxyStats::default());
        let handle = serve(
            listener,
            sock,
            nix::unistd::Uid::current(),
            rx,
            stats.clone(),
        );
        Served {
            addr,
            upstream,
            stats,
            handle,
            _dir: dir,
        }
    }

    /// Bytes flow both ways, and a client that connects before the engine is ready waits.
    #[tokio::test]
    async fn proxies_after_ready() {
        let s = echo_engine(Upstream::Waiting).await;
        let mut client = TcpStream::connect(s.addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.upstream.send(Upstream::Ready).unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        drop(s.handle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(s.addr).await.is_err(),
            "port closed after drop"
        );
    }

    /// A client of a hibernated tenant is counted at once (that is the wake signal), waits, and
    /// is served when the engine is back; open connections list their peers.
    #[tokio::test]
    async fn a_client_of_a_hibernated_tenant_is_counted_waits_and_is_served() {
        let s = echo_engine(Upstream::Hibernated).await;
        let mut clients = s.stats.clients();
        let mut client = TcpStream::connect(s.addr).await.unwrap();
        let mine = client.local_addr().unwrap();
        clients.wait_for(|c| c.accepted == 1).await.unwrap();
        let t = s.stats.traffic();
        assert_eq!((t.open, t.total), (1, 1));
        assert_eq!(t.connections[0].peer, mine);
        client.write_all(b"hello").await.unwrap();
        s.upstream.send(Upstream::Ready).unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        drop(client);
        clients.wait_for(|c| c.open == 0).await.unwrap();
        let t = s.stats.traffic();
        assert_eq!((t.bytes_in, t.bytes_out), (5, 5));
        assert!(t.connections.is_empty());
        assert!(t.last_activity_unix_ms > 0);
    }

    /// Large transfers cross intact both ways, and a half-close still gets the rest back.
    #[tokio::test]
    async fn a_large_transfer_round_trips_byte_for_byte() {
        let s = echo_engine(Upstream::Ready).await;
        let client = TcpStream::connect(s.addr).await.unwrap();
        let (mut r, mut w) = client.into_split();
        let data: Vec<u8> = (0..8 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert!(back == data, "echoed bytes differ");
        let t = s.stats.traffic();
        assert_eq!(
            (t.bytes_in, t.bytes_out),
            (data.len() as u64, data.len() as u64)
        );
    }

    /// A failed tenant's clients are closed at once, not held.
    #[tokio::test]
    async fn a_down_tenant_closes_clients() {
        let s = echo_engine(Upstream::Down).await;
        let mut client = TcpStream::connect(s.addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut buf))
            .await
            .expect("closed, not held")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}

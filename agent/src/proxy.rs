//! The tenant's TCP endpoint: accepts on the tenant's port for the tenant's whole life (hibernated
//! included) and copies bytes both ways to the engine's Unix socket. A client that arrives while
//! the engine is starting, hibernated or waking waits for it instead of being refused; its first
//! byte is what wakes a hibernated tenant (the supervisor watches `Clients`). Counts per tenant:
//! open connections with their peers, connections in total, bytes in and out, last activity.
//! Each tenant's clients are held to a budget (`Budget`).
//!
//! A graceful stop hands every connection over instead of cutting it: the pumps stop between
//! chunks (no byte is held in the agent then: what is in flight waits in the kernel's socket
//! buffers), and the client and engine sockets go to the listener keeper for the next agent,
//! which resumes them (`Parked`, `serve`'s `resumed`).
//!
//! The data path: a side gets its 32 KiB buffer (never zeroed) the first time it has bytes to
//! move and keeps it (taking one per burst cost an allocation of pages and a trim of the heap
//! per query); a connection that never spoke holds none, so 5,000 silent clients cost sockets,
//! not buffers. Counters are updated per chunk, never per byte.
//!
//! TLS (`tenant_tls`) is terminated here, once the client has spoken: a TLS session lives in this
//! process, so a hand-over closes TLS connections (their clients reconnect); plaintext ones carry
//! on.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn, Instrument};

/// How long a client waits for a starting or waking engine before its connection is closed.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long a client may stay connected without sending a byte (to an engine whose clients
/// speak first).
const SILENT_WAIT: Duration = Duration::from_secs(30);
/// TCP keepalive on client connections: a client that vanished (a host powered off, a NAT that
/// dropped the flow) is found out in about 2 minutes instead of holding its slot for hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;
/// How long a refused connect waits for the supervisor to see the engine gone.
const ENGINE_GONE_WAIT: Duration = Duration::from_secs(1);
/// The buffer of one side of a connection.
const CHUNK: usize = 32 * 1024;
/// How long a client has to complete its TLS handshake.
const TLS_HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
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
    /// The tenant hibernates: clients wait, and the first byte one sends (counted in
    /// `Clients::spoke`) wakes it.
    Hibernated,
    /// The tenant is `failed` (or going away): clients are closed at once instead of waiting
    /// for an engine that is not coming.
    Down,
}

/// The clients of a tenant, as its supervisor watches them: it hibernates after a while with
/// no client that has spoken still connected, and wakes when one more has spoken. (PostgreSQL
/// and Redis clients speak first: a TCP health check that connects and closes neither wakes a
/// tenant nor keeps it awake. For an engine whose server speaks first, a connection counts as
/// spoken when it is accepted.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clients {
    pub open: u64,
    pub accepted: u64,
    /// Connections that sent their first byte, in total.
    pub spoke: u64,
    /// Open connections that have spoken.
    pub speaking: u64,
}

/// What one tenant's clients may hold of the agent: open connections (beyond them a new one is
/// closed at once), and of those, connections that have not sent a byte yet (they cost a socket
/// each and no engine connection: the engine is only reached once the client speaks; beyond the
/// bound the oldest silent one is closed, so a flood of them never locks out a client that
/// speaks, and none stays silent longer than `SILENT_WAIT`). One tenant's clients cannot use up
/// the descriptors every other tenant needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_open: u64,
    pub max_silent: u64,
    /// How long a client may stay connected without sending a byte.
    pub silent_wait: Duration,
}

impl Budget {
    /// From the engine's own connection limit: twice it (clients beyond the engine's limit get
    /// the engine's own refusal, not the proxy's), at least 64.
    pub fn for_engine(max_connections: u64) -> Self {
        Self::with_max_open((2 * max_connections + 16).max(64))
    }

    /// Silent connections may take half of the open ones: a flood of them leaves room for
    /// clients that speak.
    pub fn with_max_open(max_open: u64) -> Self {
        Self {
            max_open,
            max_silent: (max_open / 2).max(1),
            silent_wait: SILENT_WAIT,
        }
    }
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
    /// Closed at once, over the tenant's budget.
    pub refused: u64,
    /// Closed without a byte sent, to make room for newer clients.
    pub evicted: u64,
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
    /// Open connections that have not sent a byte yet, by accept number, each with the way to
    /// close it (the oldest go first when there are too many).
    silent: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
    /// Connections closed at once for being over the budget.
    refused: AtomicU64,
    /// Silent connections closed to make room for newer ones.
    evicted: AtomicU64,
    /// Of those, the ones told to close whose tasks have not counted them out yet: room that
    /// is already being made (a flood's evictions lag behind its accepts under load).
    leaving: AtomicU64,
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
            silent: Mutex::default(),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            leaving: AtomicU64::new(0),
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
    /// The client counts (open, accepted, spoken, speaking), for the supervisor's idle and wake
    /// decisions.
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
            refused: self.refused.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            last_activity_unix_ms: self.last_activity_unix_ms.load(Ordering::Relaxed),
            connections,
        }
    }

    /// Whether one more client fits the budget; counts it refused if not.
    fn admits(&self, budget: &Budget) -> bool {
        let open = self.clients.borrow().open;
        let fits = open.saturating_sub(self.leaving.load(Ordering::Relaxed)) < budget.max_open;
        if !fits {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        fits
    }

    fn touch(&self) {
        self.last_activity_unix_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Counts a client in; the returned guard counts it out when dropped. A client that has
    /// `spoken` (handed over with its engine connection, or of a server-speaks-first engine) is
    /// never silent.
    fn admit(self: &Arc<Self>, peer: SocketAddr, budget: &Budget, spoken: bool) -> Admitted {
        let mut id = 0;
        self.clients.send_modify(|c| {
            c.open += 1;
            c.accepted += 1;
            if spoken {
                c.spoke += 1;
                c.speaking += 1;
            }
            id = c.accepted;
        });
        let opened = SystemTime::now();
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, OpenConnection { peer, opened });
        self.last_activity_unix_ms
            .store(unix_ms(opened), Ordering::Relaxed);
        let (evict, evicted) = oneshot::channel();
        if !spoken {
            let oldest = {
                let mut silent = self.silent.lock().unwrap_or_else(PoisonError::into_inner);
                silent.insert(id, evict);
                if silent.len() as u64 > budget.max_silent {
                    silent.pop_first()
                } else {
                    None
                }
            };
            // Closes that one only (dropping its sender ends its wait).
            if let Some((_, oldest)) = oldest {
                self.leaving.fetch_add(1, Ordering::Relaxed);
                drop(oldest);
                let n = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(%peer, max_silent = budget.max_silent, evicted = n, "the oldest silent client closed: the tenant holds its bound of connections that have not sent a byte");
                }
            }
        }
        Admitted {
            stats: self.clone(),
            id,
            silent: !spoken,
            evicted,
        }
    }
}

impl ProxyStats {
    /// Takes a silent client off the list; one no longer there was told to leave (evicted),
    /// and is now counted out of `leaving`.
    fn forget_silent(&self, id: u64) {
        let listed = self
            .silent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
            .is_some();
        if !listed {
            self.leaving.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A client counted as open until this is dropped.
struct Admitted {
    stats: Arc<ProxyStats>,
    id: u64,
    silent: bool,
    /// Resolves when this silent client is closed to make room for newer ones.
    evicted: oneshot::Receiver<()>,
}

impl Admitted {
    /// The client sent its first byte: a hibernated tenant wakes on this.
    fn spoke(&mut self) {
        if std::mem::take(&mut self.silent) {
            self.stats.forget_silent(self.id);
            self.stats.clients.send_modify(|c| {
                c.spoke += 1;
                c.speaking += 1;
            });
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.silent {
            self.stats.forget_silent(self.id);
        }
        self.stats
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        let spoken = !self.silent;
        self.stats.clients.send_modify(|c| {
            c.open -= 1;
            if spoken {
                c.speaking -= 1;
            }
        });
        self.stats.touch();
    }
}

/// A connection stopped between chunks for the next agent: the client, and its engine
/// connection once it had one.
#[derive(Debug)]
pub struct Parked {
    pub client: std::net::TcpStream,
    pub engine: Option<std::os::unix::net::UnixStream>,
}

/// How long a graceful stop waits for connections to reach a point between chunks (a client
/// that does not read what it is sent holds one mid-write); the rest are cut.
const PARK_WAIT: Duration = Duration::from_secs(5);

/// A running proxy. Dropping it closes the port and every connection through it; `hand_over`
/// stops it keeping the connections.
#[derive(Debug)]
pub struct ProxyHandle {
    task: JoinHandle<()>,
    park: Option<oneshot::Sender<oneshot::Sender<Vec<Parked>>>>,
}

impl ProxyHandle {
    /// Stops accepting, and stops every connection between two chunks; returns them.
    pub async fn hand_over(mut self) -> Vec<Parked> {
        let (tx, rx) = oneshot::channel();
        let Some(park) = self.park.take() else {
            return Vec::new();
        };
        if park.send(tx).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `listener`, forwarding to `target` whenever `ready` says the engine answers, counting
/// in `stats`. Log lines carry the current span (the tenant's). `resumed` are the connections a
/// previous agent handed over: they carry on first.
pub fn serve(
    listener: TcpListener,
    target: Target,
    ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
    resumed: Vec<Parked>,
) -> ProxyHandle {
    let (park, park_rx) = oneshot::channel();
    let task = tokio::spawn(
        accept_loop(listener, target, ready, stats, resumed, park_rx)
            .instrument(tracing::Span::current()),
    );
    ProxyHandle {
        task,
        park: Some(park),
    }
}

/// Where a tenant's clients are forwarded, and on what terms.
#[derive(Debug, Clone)]
pub struct Target {
    /// The engine's Unix socket: owned by `owner` (the tenant's uid), never reached through a
    /// symlink.
    pub socket: PathBuf,
    pub owner: nix::unistd::Uid,
    pub budget: Budget,
    /// The engine's clients send the first byte (PostgreSQL, Redis): the engine is reached, and
    /// a hibernated tenant woken, only once one does.
    pub client_speaks_first: bool,
    /// TLS offered to clients; `None`: plaintext only.
    pub tls: Option<crate::tenant_tls::TenantTls>,
    /// Sent to a plaintext client refused when TLS is required, in the engine's protocol (a
    /// PostgreSQL `ErrorResponse`, a Redis error), so its user reads why; may be empty.
    pub plaintext_refusal: Vec<u8>,
}

/// A client after the TLS negotiation.
enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Terminates TLS if the client opens with it (or must); `None` when the client is to be closed.
/// One deadline covers the whole negotiation: a client that stalls in it frees its slot.
async fn negotiate(client: TcpStream, peer: SocketAddr, target: &Target) -> Option<Client> {
    let Some(tls) = &target.tls else {
        return Some(Client::Plain(client));
    };
    match tokio::time::timeout(
        TLS_HANDSHAKE_WAIT,
        negotiate_with(client, peer, target, tls),
    )
    .await
    {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS negotiation failed");
            None
        }
        Err(_) => {
            info!(%peer, wait = ?TLS_HANDSHAKE_WAIT, "TLS negotiation not completed in time");
            None
        }
    }
}

async fn negotiate_with(
    mut client: TcpStream,
    peer: SocketAddr,
    target: &Target,
    tls: &crate::tenant_tls::TenantTls,
) -> io::Result<Option<Client>> {
    use crate::tenant_tls::{accept_ssl_request, opening, refuse_gssenc_request, Opening};
    let opened = loop {
        if !target.client_speaks_first {
            if tls.plaintext {
                // A server that speaks first: the client's first bytes cannot be waited for.
                return Ok(Some(Client::Plain(client)));
            }
            break Opening::ClientHello;
        }
        match opening(&client).await? {
            None => return Ok(None),
            Some(Opening::PostgresGssEncRequest) => refuse_gssenc_request(&mut client).await?,
            Some(o) => break o,
        }
    };
    match opened {
        Opening::PostgresCancelRequest => Ok(Some(Client::Plain(client))),
        Opening::Plaintext if tls.plaintext => Ok(Some(Client::Plain(client))),
        Opening::Plaintext => {
            info!(%peer, "plaintext client refused: this node serves tenants over TLS only");
            if !target.plaintext_refusal.is_empty() {
                let _ = client.write_all(&target.plaintext_refusal).await;
            }
            Ok(None)
        }
        Opening::PostgresSslRequest | Opening::PostgresGssEncRequest | Opening::ClientHello => {
            if opened == Opening::PostgresSslRequest {
                accept_ssl_request(&mut client).await?;
            }
            let stream = tls.acceptor.accept(client).await?;
            Ok(Some(Client::Tls(Box::new(stream))))
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: Target,
    ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
    resumed: Vec<Parked>,
    mut park_rx: oneshot::Receiver<oneshot::Sender<Vec<Parked>>>,
) {
    // Connection tasks live in this set: aborting the accept loop drops it and ends them all.
    let mut connections = JoinSet::new();
    let (parking, park) = watch::channel(false);
    let conn = |client: TcpStream, peer, engine: Option<tokio::net::UnixStream>| {
        keep_alive(&client);
        // Counted before anything else.
        let spoken = engine.is_some() || !target.client_speaks_first;
        let admitted = stats.admit(peer, &target.budget, spoken);
        forward(
            client,
            peer,
            engine,
            target.clone(),
            ready.clone(),
            stats.clone(),
            admitted,
            park.clone(),
        )
        .instrument(tracing::Span::current())
    };
    for parked in resumed {
        match resume(parked) {
            Ok((client, peer, engine)) => {
                info!(%peer, with_engine = engine.is_some(), "client connection taken over from the previous agent");
                connections.spawn(conn(client, peer, engine));
            }
            Err(e) => warn!(error = %e, "resuming a handed-over connection"),
        }
    }
    let reply = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) if stats.admits(&target.budget) => {
                    let _ = client.set_nodelay(true);
                    info!(%peer, "client connected");
                    connections.spawn(conn(client, peer, None));
                }
                Ok((_, peer)) => {
                    // Closed at once: the tenant's clients hold all the budget allows.
                    let refused = stats.refused.load(Ordering::Relaxed);
                    if refused.is_power_of_two() {
                        let c = *stats.clients.borrow();
                        warn!(%peer, open = c.open, max_open = target.budget.max_open, max_silent = target.budget.max_silent, refused, "client closed: over the tenant's connection budget");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            reply = &mut park_rx => match reply {
                Ok(reply) => break reply,
                // The handle is gone without a hand-over: keep serving until aborted.
                Err(_) => std::future::pending().await,
            },
        }
    };
    // Hand over: no more accepts (the port stays open in the keeper), every connection stops
    // between chunks.
    drop(listener);
    parking.send_replace(true);
    let mut parked = Vec::new();
    let deadline = tokio::time::Instant::now() + PARK_WAIT;
    while !connections.is_empty() {
        match tokio::time::timeout_at(deadline, connections.join_next()).await {
            Ok(Some(Ok(Some(p)))) => parked.push(p),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                warn!(
                    cut = connections.len(),
                    "connections still mid-write after the hand-over wait; cut"
                );
                break;
            }
        }
    }
    let _ = reply.send(parked);
}

/// A handed-over connection as tokio streams.
fn resume(parked: Parked) -> io::Result<(TcpStream, SocketAddr, Option<tokio::net::UnixStream>)> {
    parked.client.set_nonblocking(true)?;
    let peer = parked.client.peer_addr()?;
    let client = TcpStream::from_std(parked.client)?;
    let engine = match parked.engine {
        Some(e) => {
            e.set_nonblocking(true)?;
            Some(tokio::net::UnixStream::from_std(e)?)
        }
        None => None,
    };
    Ok((client, peer, engine))
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

/// Serves one client until it or the engine hangs up; with a hand-over under way, returns the
/// connection stopped between chunks.
#[allow(clippy::too_many_arguments)]
async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    engine: Option<tokio::net::UnixStream>,
    target: Target,
    mut ready: watch::Receiver<Upstream>,
    stats: Arc<ProxyStats>,
    mut admitted: Admitted,
    mut park: watch::Receiver<bool>,
) -> Option<Parked> {
    let (client, engine) = match engine {
        Some(engine) => (client, engine),
        None => {
            if admitted.silent {
                // Nothing is asked of the engine (no wake, no backend) until the client speaks.
                let spoke = tokio::select! {
                    spoke = first_byte(&client) => spoke,
                    _ = park.wait_for(|p| *p) => {
                        return client.into_std().ok().map(|client| Parked { client, engine: None });
                    }
                    // A failed tenant closes its clients at once, silent ones too.
                    _ = ready.wait_for(|u| *u == Upstream::Down) => false,
                    // Too many silent ones: the oldest go.
                    _ = &mut admitted.evicted => {
                        debug!(%peer, "silent client closed: newer clients need the room");
                        false
                    }
                    () = tokio::time::sleep(target.budget.silent_wait) => {
                        debug!(%peer, wait = ?target.budget.silent_wait, "client closed: not a byte in time");
                        false
                    }
                };
                if !spoke {
                    return None;
                }
                admitted.spoke();
            }
            let client = match negotiate(client, peer, &target).await? {
                Client::Plain(client) => client,
                Client::Tls(client) => {
                    let engine = tokio::select! {
                        connected = connect_engine(peer, &target, &mut ready) => connected?,
                        // A TLS session cannot be handed over: the client reconnects.
                        _ = park.wait_for(|p| *p) => return None,
                    };
                    forward_tls(*client, engine, peer, &stats, admitted, park).await;
                    return None;
                }
            };
            let connected = tokio::select! {
                connected = connect_engine(peer, &target, &mut ready) => connected,
                _ = park.wait_for(|p| *p) => {
                    return client.into_std().ok().map(|client| Parked { client, engine: None });
                }
            };
            (client, connected?)
        }
    };
    let (client_read, client_write) = client.into_split();
    let (engine_read, engine_write) = engine.into_split();
    let up = pump(
        client_read,
        engine_write,
        &stats.bytes_in,
        &stats,
        park.clone(),
    );
    let down = pump(engine_read, client_write, &stats.bytes_out, &stats, park);
    // The engine closing its side ends the session (a database does not half-close): the
    // client's slot is not held until it notices. The client closing its side lets the engine
    // finish answering.
    tokio::pin!(up, down);
    let outcome = tokio::select! {
        d = &mut down => match d {
            Ok((er, cw, true)) => Ok((None, (er, cw, true))),
            Ok(parked) => (&mut up).await.map(|u| (Some(u), parked)),
            Err(e) => Err(e),
        },
        u = &mut up => match u {
            Ok(u) => (&mut down).await.map(|d| (Some(u), d)),
            Err(e) => Err(e),
        },
    };
    drop(admitted);
    match outcome {
        Ok((None, _)) | Ok((Some((_, _, true)), (_, _, true))) => {
            debug!(%peer, "client disconnected");
            None
        }
        Ok((Some((client_read, engine_write, _)), (engine_read, client_write, _))) => {
            let client = client_read.reunite(client_write).ok()?.into_std().ok()?;
            let engine = engine_read.reunite(engine_write).ok()?.into_std().ok()?;
            Some(Parked {
                client,
                engine: Some(engine),
            })
        }
        Err(e) => {
            debug!(%peer, error = %e, "client connection ended");
            None
        }
    }
}

/// Serves one TLS client until it or the engine hangs up, or a hand-over begins (then the
/// connection is closed: its TLS session cannot leave this process).
async fn forward_tls(
    client: tokio_rustls::server::TlsStream<TcpStream>,
    engine: tokio::net::UnixStream,
    peer: SocketAddr,
    stats: &ProxyStats,
    admitted: Admitted,
    park: watch::Receiver<bool>,
) {
    let (client_read, client_write) = tokio::io::split(client);
    let (engine_read, engine_write) = engine.into_split();
    let up = pump_stream(
        client_read,
        engine_write,
        &stats.bytes_in,
        stats,
        park.clone(),
    );
    let down = pump_stream(engine_read, client_write, &stats.bytes_out, stats, park);
    tokio::pin!(up, down);
    // As in `forward`: the engine closing ends the session; the client closing its side lets
    // the engine finish answering.
    let outcome = tokio::select! {
        d = &mut down => d,
        u = &mut up => match u {
            Ok(true) => (&mut down).await,
            other => other,
        },
    };
    drop(admitted);
    match outcome {
        Ok(true) => debug!(%peer, "TLS client disconnected"),
        Ok(false) => info!(%peer, "TLS client closed for the hand-over to the next agent"),
        Err(e) => debug!(%peer, error = %e, "TLS client connection ended"),
    }
}

/// `pump` for streams without a split readiness (a TLS session): `true` when `from` ended,
/// `false` when a hand-over stopped it.
async fn pump_stream<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
    counter: &AtomicU64,
    stats: &ProxyStats,
    mut park: watch::Receiver<bool>,
) -> io::Result<bool> {
    // No buffer until the first bytes come (an idle client holds none); then a chunk's worth.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        buf.clear();
        // `read_buf` is cancel-safe: a hand-over between reads loses nothing.
        let n = tokio::select! {
            n = from.read_buf(&mut buf) => n?,
            _ = park.wait_for(|p| *p) => return Ok(false),
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(true);
        }
        if buf.capacity() < CHUNK {
            buf.reserve_exact(CHUNK - buf.len());
        }
        to.write_all(&buf[..n]).await?;
        // TLS records leave only on a flush.
        to.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        stats.touch();
    }
}

/// TCP keepalive on a client socket (see `KEEPALIVE_IDLE`); best effort.
fn keep_alive(client: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket2::SockRef::from(client).set_tcp_keepalive(&keepalive);
}

/// Resolves once the client has sent a byte (true) or hung up without one (false).
async fn first_byte(client: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(client.peek(&mut probe).await, Ok(n) if n > 0)
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
/// other direction can still finish; `true`), or until a hand-over stops it between chunks
/// (`false`), or either side fails. Gives both halves back.
async fn pump<R: ReadHalf, W: AsyncWrite + Unpin>(
    from: R,
    mut to: W,
    counter: &AtomicU64,
    stats: &ProxyStats,
    mut park: watch::Receiver<bool>,
) -> io::Result<(R, W, bool)> {
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            readable = from.readable() => readable?,
            _ = park.wait_for(|p| *p) => return Ok((from, to, false)),
        }
        if buf.capacity() == 0 {
            buf.reserve_exact(CHUNK);
        }
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // The peer closed its side; a socket already gone needs no shutdown.
                    let _ = to.shutdown().await;
                    return Ok((from, to, true));
                }
                Ok(n) => {
                    to.write_all(&buf).await?;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    stats.touch();
                    // A stream that never pauses still stops between two chunks.
                    if *park.borrow() {
                        return Ok((from, to, false));
                    }
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

    async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError { addr, source })
    }

    struct Served {
        addr: SocketAddr,
        upstream: watch::Sender<Upstream>,
        stats: Arc<ProxyStats>,
        handle: ProxyHandle,
        sock: PathBuf,
        listener_copy: std::os::fd::OwnedFd,
        _dir: tempfile::TempDir,
    }

    /// A proxy in front of an echo engine.
    async fn echo_engine(state: Upstream) -> Served {
        echo_engine_with(state, Budget::for_engine(8)).await
    }

    async fn echo_engine_with(state: Upstream, budget: Budget) -> Served {
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
        // What the keeper would hold: a copy of the listener.
        let listener_copy = std::os::fd::AsFd::as_fd(&listener)
            .try_clone_to_owned()
            .unwrap();
        let (upstream, rx) = watch::channel(state);
        let stats = Arc::new(ProxyStats::default());
        let handle = serve(
            listener,
            Target {
                socket: sock.clone(),
                owner: nix::unistd::Uid::current(),
                budget,
                client_speaks_first: true,
                tls: None,
                plaintext_refusal: Vec::new(),
            },
            rx,
            stats.clone(),
            Vec::new(),
        );
        Served {
            addr,
            upstream,
            stats,
            handle,
            sock,
            listener_copy,
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
        drop(s.listener_copy);
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
        // Connected but silent: no wake yet.
        assert_eq!(clients.borrow().spoke, 0);
        client.write_all(b"hello").await.unwrap();
        clients.wait_for(|c| c.spoke == 1).await.unwrap();
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

    /// A graceful hand-over stops connections between chunks and a new proxy carries them on:
    /// the forwarded one keeps its engine connection, the waiting one still waits, nothing is
    /// lost either way, and the port accepted clients meanwhile.
    #[tokio::test]
    async fn handed_over_connections_carry_on_in_the_next_proxy() {
        let s = echo_engine(Upstream::Ready).await;
        let mut forwarded = TcpStream::connect(s.addr).await.unwrap();
        forwarded.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        forwarded.read_exact(&mut buf).await.unwrap();
        s.upstream.send(Upstream::Hibernated).unwrap();
        let mut waiting = TcpStream::connect(s.addr).await.unwrap();
        waiting.write_all(b"wait").await.unwrap();
        s.stats.clients().wait_for(|c| c.spoke == 2).await.unwrap();
        let parked = s.handle.hand_over().await;
        assert_eq!(parked.len(), 2);
        assert_eq!(parked.iter().filter(|p| p.engine.is_some()).count(), 1);
        // Between the two agents: sent now, answered by the next one.
        forwarded.write_all(b"two").await.unwrap();
        let mut late = TcpStream::connect(s.addr).await.unwrap();
        late.write_all(b"late").await.unwrap();
        let listener = std::net::TcpListener::from(s.listener_copy);
        listener.set_nonblocking(true).unwrap();
        let (upstream, rx) = watch::channel(Upstream::Ready);
        let stats = Arc::new(ProxyStats::default());
        let _next = serve(
            TcpListener::from_std(listener).unwrap(),
            Target {
                socket: s.sock.clone(),
                owner: nix::unistd::Uid::current(),
                budget: Budget::for_engine(8),
                client_speaks_first: true,
                tls: None,
                plaintext_refusal: Vec::new(),
            },
            rx,
            stats.clone(),
            parked,
        );
        forwarded.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"two");
        let mut four = [0u8; 4];
        waiting.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"wait");
        late.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"late");
        assert_eq!(stats.traffic().open, 3);
        drop(upstream);
    }

    /// Over the budget, a new client is closed at once and counted; clients within it are
    /// untouched.
    #[tokio::test]
    async fn clients_over_the_budget_are_closed_and_counted() {
        let budget = Budget {
            max_open: 3,
            max_silent: 2,
            silent_wait: Duration::from_secs(60),
        };
        let s = echo_engine_with(Upstream::Ready, budget).await;
        let mut clients = s.stats.clients();
        let mut silent: Vec<_> = futures_connect(s.addr, 2).await;
        clients.wait_for(|c| c.accepted == 2).await.unwrap();
        // A third silent one closes the oldest silent one, not itself.
        let third = TcpStream::connect(s.addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), silent[0].read_to_end(&mut buf))
            .await
            .expect("the oldest silent one is closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        clients.wait_for(|c| c.open == 2).await.unwrap();
        // A client that speaks is served beside the silent ones.
        let mut talker = TcpStream::connect(s.addr).await.unwrap();
        talker.write_all(b"hi").await.unwrap();
        let mut two = [0u8; 2];
        talker.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"hi");
        // It arrived silent too, so the next oldest silent one went.
        let n = tokio::time::timeout(Duration::from_secs(5), silent[1].read_to_end(&mut buf))
            .await
            .expect("the next oldest silent one is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        clients.wait_for(|c| c.open == 2).await.unwrap();
        // Third (silent) and the talker are open; one more fits, the one after is closed at once
        // and counted.
        let _fourth = TcpStream::connect(s.addr).await.unwrap();
        clients.wait_for(|c| c.open == 3).await.unwrap();
        let mut fifth = TcpStream::connect(s.addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), fifth.read_to_end(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(s.stats.traffic().refused, 1);
        drop((silent, third));
    }

    async fn futures_connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(TcpStream::connect(addr).await.unwrap());
        }
        out
    }

    /// A proxy in front of `engine`'s listener, for the tests below.
    async fn in_front_of(
        sock: PathBuf,
        budget: Budget,
        client_speaks_first: bool,
    ) -> (
        SocketAddr,
        Arc<ProxyStats>,
        ProxyHandle,
        watch::Sender<Upstream>,
    ) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (upstream, rx) = watch::channel(Upstream::Ready);
        let stats = Arc::new(ProxyStats::default());
        let handle = serve(
            listener,
            Target {
                socket: sock,
                owner: nix::unistd::Uid::current(),
                budget,
                client_speaks_first,
                tls: None,
                plaintext_refusal: Vec::new(),
            },
            rx,
            stats.clone(),
            Vec::new(),
        );
        (addr, stats, handle, upstream)
    }

    /// The engine closing a session (an authentication timeout) frees the client's slot at
    /// once, though the client itself never closes; and a client that never speaks is closed
    /// after the silent wait. Neither can hold the tenant's budget forever.
    #[tokio::test]
    async fn slots_are_freed_when_the_engine_closes_or_the_client_stays_silent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let engine = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = engine.accept().await.unwrap();
                // Reads one byte, then hangs up, as an engine ending a session does.
                let mut one = [0u8; 1];
                let _ = s.read_exact(&mut one).await;
            }
        });
        let budget = Budget {
            silent_wait: Duration::from_millis(200),
            ..Budget::with_max_open(8)
        };
        let (addr, stats, _handle, _up) = in_front_of(sock, budget, true).await;
        let mut clients = stats.clients();
        let mut spoke_and_stays = TcpStream::connect(addr).await.unwrap();
        spoke_and_stays.write_all(b"x").await.unwrap();
        let _silent_and_stays = TcpStream::connect(addr).await.unwrap();
        clients.wait_for(|c| c.accepted == 2).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), clients.wait_for(|c| c.open == 0))
            .await
            .expect("both slots freed")
            .unwrap();
        assert_eq!(clients.borrow().speaking, 0);
    }

    /// An engine whose server speaks first (a greeting) is connected to as soon as a client is
    /// accepted, and that client counts as spoken.
    #[tokio::test]
    async fn a_server_that_speaks_first_greets_a_silent_client() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let engine = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = engine.accept().await.unwrap();
            s.write_all(b"hello").await.unwrap();
            std::future::pending::<()>().await;
        });
        let (addr, stats, _handle, _up) = in_front_of(sock, Budget::with_max_open(8), false).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut greeting))
            .await
            .expect("greeted")
            .unwrap();
        assert_eq!(&greeting, b"hello");
        assert_eq!(stats.clients().borrow().speaking, 1);
    }
}

//! Tenant ports that outlive the agent process: every listener the agent opens is also handed to
//! the host's listener keeper (`keeper`), and an agent that starts takes back the listeners (and
//! the connections a gracefully stopping agent handed over) instead of binding afresh. Without a
//! keeper (it could not be started) ports still work, they just close with the agent; that is
//! logged, and tried again later; a port held by the keeper but not taken back at start is asked
//! for when binding finds it in use.
//!
//! The keeper also holds each tenant's engine-output pipe (`log/<tenant>`: its read and write
//! ends, see `engine_log`), so an engine that outlives the agent keeps its output going to the
//! next agent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::keeper::{KeeperClient, KeeperError};

const LISTEN: &str = "listen/";
const CONN: &str = "conn/";
const LOG: &str = "log/";
/// Connections waiting to be accepted while the agent is away (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;
/// After the keeper could not be reached, how long before it is tried again (meanwhile ports
/// work, they just close with the agent).
const KEEPER_RETRY: Duration = Duration::from_secs(30);

/// A connection the previous agent handed over: the client, and the engine connection when it
/// had one (else the client was still waiting for its engine).
#[derive(Debug)]
pub struct HandedOver {
    pub client: OwnedFd,
    pub engine: Option<OwnedFd>,
}

#[derive(Debug)]
pub struct Endpoints {
    keeper_path: PathBuf,
    program: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keeper: Option<KeeperClient>,
    /// Listeners the keeper held when this agent started, by tenant, until the tenant takes its.
    inherited: BTreeMap<String, OwnedFd>,
    handed_over: BTreeMap<String, Vec<HandedOver>>,
    /// Engine-output pipes (read end, write end) the keeper held when this agent started.
    inherited_logs: BTreeMap<String, (OwnedFd, OwnedFd)>,
    /// A copy of every listener registered, to give a restarted keeper.
    registered: BTreeMap<String, OwnedFd>,
    /// A copy of every engine-output pipe registered, likewise.
    registered_logs: BTreeMap<String, (OwnedFd, OwnedFd)>,
    next_handover: u64,
    /// The keeper failed: not tried again before this.
    retry_at: Option<Instant>,
}

impl Endpoints {
    /// Connects to the host's keeper at `<state_dir>/keeper/keeper.sock` (starting it from
    /// `program` if none runs) and takes back what it holds.
    pub fn open(state_dir: &Path, program: Option<PathBuf>) -> Self {
        let dir = state_dir.join("keeper");
        let keeper_path = dir.join("keeper.sock");
        let endpoints = Self {
            keeper_path,
            program,
            inner: Mutex::default(),
        };
        if let Err(e) = prepare_dir(&dir) {
            warn!(error = %e, dir = %dir.display(), "no listener keeper: tenant ports will close while the agent restarts");
            return endpoints;
        }
        let mut inner = endpoints.lock();
        let (listeners, connections, logs) = match endpoints.keeper(&mut inner) {
            // Each read on its own: a failed one leaves the other's result usable (and a
            // listener not taken back here is asked for again when its bind finds the port
            // held, see `listener`). The pipes are read only after both succeeded (a late
            // answer would be taken for theirs; a pipe not read here is asked for again by
            // `take_log_pipe`).
            Ok(keeper) => {
                let listeners = keeper.get(LISTEN, false);
                let connections = keeper.get(CONN, true);
                let logs = match (&listeners, &connections) {
                    (Ok(_), Ok(_)) => keeper.get(LOG, false),
                    _ => Ok(Vec::new()),
                };
                (listeners, connections, logs)
            }
            Err(e) => {
                warn!(error = %e, "no listener keeper: tenant ports will close while the agent restarts");
                (Ok(Vec::new()), Ok(Vec::new()), Ok(Vec::new()))
            }
        };
        if listeners.is_err() || connections.is_err() || logs.is_err() {
            // A late answer would be read as the next one's: reconnect before the next request.
            inner.keeper = None;
        }
        let listeners = listeners.unwrap_or_else(|e| {
            warn!(error = %e, "reading the kept listeners");
            Vec::new()
        });
        let connections = connections.unwrap_or_else(|e| {
            warn!(error = %e, "reading the handed-over connections");
            Vec::new()
        });
        let logs = logs.unwrap_or_else(|e| {
            warn!(error = %e, "reading the kept engine-output pipes");
            Vec::new()
        });
        let (l, c, o) = (listeners.len(), connections.len(), logs.len());
        for (key, fds) in logs {
            if let (Some(name), Some(pipe)) = (key.strip_prefix(LOG), log_pipe(fds)) {
                inner.inherited_logs.insert(name.to_string(), pipe);
            }
        }
        for (key, mut fds) in listeners {
            if let (Some(name), Some(fd)) = (key.strip_prefix(LISTEN), fds.pop()) {
                inner.inherited.insert(name.to_string(), fd);
            }
        }
        for (key, mut fds) in connections {
            let Some(name) = key
                .strip_prefix(CONN)
                .and_then(|rest| rest.split('/').next())
            else {
                continue;
            };
            if fds.is_empty() {
                continue;
            }
            let client = fds.remove(0);
            inner
                .handed_over
                .entry(name.to_string())
                .or_default()
                .push(HandedOver {
                    client,
                    engine: fds.pop(),
                });
        }
        if l + c + o > 0 {
            info!(
                listeners = l,
                connections = c,
                engine_output_pipes = o,
                "took back the tenant ports (and handed-over connections, engine-output pipes) the listener keeper held"
            );
        }
        drop(inner);
        endpoints
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The keeper connection, (re)connecting or starting it; a restarted keeper gets every
    /// registered listener again.
    fn keeper<'a>(&self, inner: &'a mut Inner) -> Result<&'a mut KeeperClient, KeeperError> {
        if inner.keeper.is_none() {
            let mut client = match &self.program {
                Some(program) => KeeperClient::connect_or_start(&self.keeper_path, program)?,
                None => KeeperClient::connect(&self.keeper_path)?,
            };
            for (name, fd) in &inner.registered {
                client.put(&format!("{LISTEN}{name}"), &[fd.as_raw_fd()])?;
            }
            for (name, (read, write)) in &inner.registered_logs {
                client.put(
                    &format!("{LOG}{name}"),
                    &[read.as_raw_fd(), write.as_raw_fd()],
                )?;
            }
            if let Ok(pid) = client.pid() {
                info!(pid, socket = %self.keeper_path.display(), "listener keeper");
            }
            inner.keeper = Some(client);
        }
        inner.keeper.as_mut().ok_or_else(|| KeeperError::Protocol {
            path: self.keeper_path.clone(),
            answer: "(not connected)".into(),
        })
    }

    /// Runs `f` against the keeper, reconnecting once if it went away; false if it failed.
    fn with_keeper(
        &self,
        inner: &mut Inner,
        what: &str,
        mut f: impl FnMut(&mut KeeperClient) -> Result<(), KeeperError>,
    ) -> bool {
        if self.keeper_path.as_os_str().is_empty()
            || inner.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return false;
        }
        for attempt in 0..2 {
            match self.keeper(inner).and_then(&mut f) {
                Ok(()) => {
                    inner.retry_at = None;
                    return true;
                }
                Err(e) => {
                    inner.keeper = None;
                    if attempt == 0 {
                        warn!(error = %e, what, "listener keeper; reconnecting");
                    } else {
                        warn!(error = %e, what, retry_in = ?KEEPER_RETRY, "listener keeper unavailable: ports close while the agent restarts");
                    }
                }
            }
        }
        inner.retry_at = Some(Instant::now() + KEEPER_RETRY);
        false
    }

    /// The tenant's listener on `addr`: the one kept from before if it is there (the port never
    /// closed), else a new one, which the keeper gets a copy of. Blocking (it may talk to the
    /// keeper): call it off the async workers.
    pub fn listener(
        &self,
        tenant: &str,
        addr: SocketAddr,
    ) -> std::io::Result<std::net::TcpListener> {
        let mut inner = self.lock();
        if let Some(fd) = inner.inherited.remove(tenant) {
            let listener = std::net::TcpListener::from(fd);
            if listener.local_addr().ok() == Some(addr) {
                listener.set_nonblocking(true)?;
                let copy = listener.as_fd().try_clone_to_owned()?;
                inner.registered.insert(tenant.to_string(), copy);
                return Ok(listener);
            }
            // The tenant's port changed while the agent was away: the old one closes.
        }
        let listener = match bind(addr) {
            Ok(listener) => listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                // Perhaps the keeper holds it and could not say so at start: ask for it.
                let key = format!("{LISTEN}{tenant}");
                let mut kept = None;
                self.with_keeper(&mut inner, "asking for a kept listener", |k| {
                    kept = k.get(&key, false)?.into_iter().find(|(k, _)| *k == key);
                    Ok(())
                });
                let Some(fd) = kept.and_then(|(_, mut fds)| fds.pop()) else {
                    return Err(e);
                };
                let listener = std::net::TcpListener::from(fd);
                if listener.local_addr().ok() != Some(addr) {
                    return Err(e);
                }
                listener.set_nonblocking(true)?;
                let copy = listener.as_fd().try_clone_to_owned()?;
                inner.registered.insert(tenant.to_string(), copy);
                return Ok(listener);
            }
            Err(e) => return Err(e),
        };
        let copy = listener.as_fd().try_clone_to_owned()?;
        let raw = copy.as_raw_fd();
        let key = format!("{LISTEN}{tenant}");
        self.with_keeper(&mut inner, "keeping a listener", |k| k.put(&key, &[raw]));
        inner.registered.insert(tenant.to_string(), copy);
        Ok(listener)
    }

    /// Whether `tenant`'s port is open in this agent (taken back from the keeper, or bound).
    pub fn is_listening(&self, tenant: &str) -> bool {
        self.lock().registered.contains_key(tenant)
    }

    /// The connections the previous agent handed over for `tenant`.
    pub fn take_handed_over(&self, tenant: &str) -> Vec<HandedOver> {
        self.lock().handed_over.remove(tenant).unwrap_or_default()
    }

    /// Hands a connection to the keeper for the next agent (a graceful stop).
    pub fn hand_over(&self, tenant: &str, fds: &[RawFd]) -> bool {
        let mut inner = self.lock();
        inner.next_handover += 1;
        let key = format!("{CONN}{tenant}/{}", inner.next_handover);
        self.with_keeper(&mut inner, "handing over a connection", |k| {
            k.put(&key, fds)
        })
    }

    /// The tenant's engine-output pipe (read end, write end) kept from before, if the keeper
    /// holds it. Blocking (it may talk to the keeper).
    pub fn take_log_pipe(&self, tenant: &str) -> Option<(OwnedFd, OwnedFd)> {
        let mut inner = self.lock();
        if let Some(pipe) = inner.inherited_logs.remove(tenant) {
            return Some(pipe);
        }
        // The keeper may hold it though it could not say so at start.
        let key = format!("{LOG}{tenant}");
        let mut kept = None;
        self.with_keeper(&mut inner, "asking for a kept engine-output pipe", |k| {
            kept = k.get(&key, false)?.into_iter().find(|(k, _)| *k == key);
            Ok(())
        });
        kept.and_then(|(_, fds)| log_pipe(fds))
    }

    /// Gives the keeper a copy of the tenant's engine-output pipe, so the next agent can read
    /// what the engine writes after this one is gone. False if the keeper could not take it.
    pub fn keep_log_pipe(&self, tenant: &str, read: &OwnedFd, write: &OwnedFd) -> bool {
        let (Ok(r), Ok(w)) = (read.try_clone(), write.try_clone()) else {
            return false;
        };
        let mut inner = self.lock();
        let key = format!("{LOG}{tenant}");
        let fds = [r.as_raw_fd(), w.as_raw_fd()];
        let kept = self.with_keeper(&mut inner, "keeping an engine-output pipe", |k| {
            k.put(&key, &fds)
        });
        inner.registered_logs.insert(tenant.to_string(), (r, w));
        kept
    }

    /// The tenant is gone from this host: its port closes for good, and the keeper forgets its
    /// engine-output pipe.
    pub fn forget(&self, tenant: &str) {
        let mut inner = self.lock();
        inner.inherited.remove(tenant);
        inner.handed_over.remove(tenant);
        inner.registered.remove(tenant);
        inner.inherited_logs.remove(tenant);
        inner.registered_logs.remove(tenant);
        let key = format!("{LISTEN}{tenant}");
        let log = format!("{LOG}{tenant}");
        self.with_keeper(&mut inner, "closing a listener", |k| {
            k.delete(&key)?;
            k.delete(&log)
        });
    }

    /// Closes the kept ports (and handed-over connections) of tenants this host no longer has
    /// (after reading the records).
    pub fn forget_all_but(&self, tenants: &BTreeSet<String>) {
        let stale: BTreeSet<String> = {
            let inner = self.lock();
            inner
                .inherited
                .keys()
                .chain(inner.handed_over.keys())
                .chain(inner.inherited_logs.keys())
                .filter(|name| !tenants.contains(*name))
                .cloned()
                .collect()
        };
        for name in stale {
            info!(tenant_id = %name, "closing a kept port of a tenant this host no longer has");
            self.forget(&name);
        }
    }

    /// Ends the keeper (the agent stops its tenants for good: `stop_tenants_on_exit`).
    pub fn close_keeper(&self) {
        let mut inner = self.lock();
        if let Some(keeper) = inner.keeper.take() {
            if let Err(e) = keeper.exit() {
                warn!(error = %e, "ending the listener keeper");
            }
        }
    }
}

/// A kept engine-output pipe's two ends, as `keep_log_pipe` put them.
fn log_pipe(mut fds: Vec<OwnedFd>) -> Option<(OwnedFd, OwnedFd)> {
    if fds.len() != 2 {
        return None;
    }
    let write = fds.pop()?;
    let read = fds.pop()?;
    Some((read, write))
}

/// A listening socket on `addr` with a backlog deep enough to hold clients while the agent is
/// away, non-blocking for tokio.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The keeper's directory: root's only (the socket gives out tenant ports).
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

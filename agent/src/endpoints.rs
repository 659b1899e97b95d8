//! Tenant ports that outlive the agent process: every listener the agent opens is also handed to
//! the host's listener keeper (`keeper`), and an agent that starts takes back the listeners (and
//! the connections a gracefully stopping agent handed over) instead of binding afresh. Without a
//! keeper (it could not be started) ports still work, they just close with the agent; that is
//! logged, and tried again later; a port held by the keeper but not taken back at start is asked
//! for when binding finds it in use.

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
    /// A copy of every listener registered, to give a restarted keeper.
    registered: BTreeMap<String, OwnedFd>,
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
        let (listeners, connections) = match endpoints.keeper(&mut inner) {
            // Each read on its own: a failed one leaves the other's result usable (and a
            // listener not taken back here is asked for again when its bind finds the port
            // held, see `listener`).
            Ok(keeper) => (keeper.get(LISTEN, false), keeper.get(CONN, true)),
            Err(e) => {
                warn!(error = %e, "no listener keeper: tenant ports will close while the agent restarts");
                (Ok(Vec::new()), Ok(Vec::new()))
            }
        };
        if listeners.is_err() || connections.is_err() {
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
        let (l, c) = (listeners.len(), connections.len());
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
        if l + c > 0 {
            info!(
                listeners = l,
                connections = c,
                "took back the tenant ports (and handed-over connections) the listener keeper held"
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

    /// The tenant is gone from this host: its port closes for good.
    pub fn forget(&self, tenant: &str) {
        let mut inner = self.lock();
        inner.inherited.remove(tenant);
        inner.handed_over.remove(tenant);
        inner.registered.remove(tenant);
        let key = format!("{LISTEN}{tenant}");
        self.with_keeper(&mut inner, "closing a listener", |k| k.delete(&key));
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

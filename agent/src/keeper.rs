//! The listener keeper: one small process per host that holds a copy of every tenant's listening
//! socket (and, during a graceful restart, the connections being handed over), so that tenant
//! ports outlive the agent process. While the agent is down, connections complete in the kernel
//! and wait in the listen backlog; the next agent takes the sockets back and serves them.
//!
//! It is the agent's own binary started with `--keep-listeners SOCKET` (so an upgrade installs one
//! file), detached in a session of its own, and it does nothing but hold file descriptors: no
//! tokio, no threads, no accept on the tenant ports. It talks over a `SOCK_SEQPACKET` Unix socket
//! in a root-only directory and answers root only. The protocol is one text line per message,
//! with descriptors as `SCM_RIGHTS`:
//!
//! ```text
//! PUT <key>      + fds   store (replacing)         -> OK
//! DEL <key>              forget                    -> OK
//! GET <prefix>           copies of matching keys   -> one "K <key>" + fds each, then END
//! TAKE <prefix>          as GET, and forget them
//! PING                                             -> OK <pid>
//! EXIT                   close everything and end  -> OK
//! ```
//!
//! Handed-over connections that no agent takes within `HANDOVER_TTL` (a `systemctl stop` hands
//! them over too) are closed; listeners are kept until the agent says otherwise.
//!
//! Under systemd the unit's `KillMode=process` leaves it running across `systemctl restart`.
//! One process per state directory (so per host: one agent per host), never one per tenant; a
//! lock next to the socket refuses a second one. Departure from systemd's own file-descriptor
//! store: the store needs `Type=notify` and systemd; the keeper works the same with or without it.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

/// How long handed-over connections wait for the next agent (a `systemctl stop` hands them over
/// too, and no agent may come): then they are closed. Listeners are kept for ever.
pub const HANDOVER_TTL: Duration = Duration::from_secs(120);

/// Descriptors one message may carry. We send at most two (a client and its engine
/// connection); room for more means a message is never truncated, which would leave the
/// descriptors the kernel did pass open and unowned.
const MAX_FDS: usize = 16;
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("listener keeper {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("listener keeper {path}: unexpected answer {answer:?}")]
    Protocol { path: PathBuf, answer: String },
    #[error("listener keeper {path}: did not start within {waited:?}")]
    NotStarted { path: PathBuf, waited: Duration },
    #[error("listener keeper {path}: another keeper holds {lock}")]
    AlreadyRunning { path: PathBuf, lock: PathBuf },
}

fn errno<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(nix::errno::Errno) -> KeeperError + 'a {
    move |e| KeeperError::Io {
        path: path.to_path_buf(),
        what,
        source: e.into(),
    }
}

/// Takes ownership of a descriptor the kernel just gave us.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by accept(2), socket(2) or recvmsg(2)'s SCM_RIGHTS, so it is
    // open and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn send(fd: &OwnedFd, text: &str, fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// One message; `None` at end of stream.
fn recv(fd: &OwnedFd) -> nix::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(owned));
        }
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds)))
}

/// What the keeper holds: descriptors by key, with when they came.
type Held = BTreeMap<String, (std::time::Instant, Vec<OwnedFd>)>;

/// The keeper process: serves `socket` until told to exit. Returns only on `EXIT` or an error
/// that leaves it unable to serve.
pub fn run(socket_path: &Path) -> Result<(), KeeperError> {
    run_with(socket_path, HANDOVER_TTL)
}

/// `run`, closing handed-over connections no agent took within `handover_ttl`.
pub fn run_with(socket_path: &Path, handover_ttl: Duration) -> Result<(), KeeperError> {
    // One keeper per socket: a second one would take the socket's name and orphan the first,
    // with every port it holds. The lock is held for the process's life.
    let lock_path = socket_path.with_extension("lock");
    let lock_file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| KeeperError::Io {
            path: lock_path.clone(),
            what: "open the lock",
            source,
        })?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| KeeperError::AlreadyRunning {
            path: socket_path.to_path_buf(),
            lock: lock_path.clone(),
        })?;
    let listener = seqpacket().map_err(errno(socket_path, "socket"))?;
    match std::fs::remove_file(socket_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KeeperError::Io {
                path: socket_path.to_path_buf(),
                what: "remove the stale socket",
                source,
            })
        }
    }
    let addr = UnixAddr::new(socket_path).map_err(errno(socket_path, "address"))?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(errno(socket_path, "bind"))?;
    socket::listen(&listener, Backlog::new(8).unwrap_or(Backlog::MAXCONN))
        .map_err(errno(socket_path, "listen"))?;
    let mut held = Held::new();
    let me = nix::unistd::getuid();
    // Wakes up now and then without an agent, to close stale handed-over connections.
    let tick = u16::try_from((handover_ttl / 2).as_millis().clamp(10, 10_000)).unwrap_or(10_000);
    loop {
        let mut ready = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&listener),
            nix::poll::PollFlags::POLLIN,
        )];
        let readable = nix::poll::poll(&mut ready, tick).is_ok_and(|n| n > 0);
        held.retain(|key, (since, _)| !key.starts_with("conn/") || since.elapsed() < handover_ttl);
        if !readable {
            continue;
        }
        let conn = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => owned(fd),
            // Whatever it is (EMFILE, ECONNABORTED, ENOMEM), giving up would close every port
            // it holds: it waits and tries again.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Only our own uid (root) may take tenant sockets.
        match socket::getsockopt(&conn, socket::sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == me.as_raw() => {}
            _ => continue,
        }
        if serve(&conn, &mut held) {
            return Ok(());
        }
    }
}

/// Serves one agent until it hangs up; true when it asked the keeper to exit.
fn serve(conn: &OwnedFd, held: &mut Held) -> bool {
    loop {
        let Ok(Some((text, fds))) = recv(conn) else {
            return false;
        };
        let (verb, arg) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let ok = match verb {
            "PUT" if !arg.is_empty() => {
                held.insert(arg.to_string(), (std::time::Instant::now(), fds));
                send(conn, "OK", &[])
            }
            "DEL" => {
                held.remove(arg);
                send(conn, "OK", &[])
            }
            "GET" | "TAKE" => {
                let keys: Vec<String> = held
                    .keys()
                    .filter(|k| k.starts_with(arg))
                    .cloned()
                    .collect();
                let mut result = Ok(());
                for key in keys {
                    let raw: Vec<RawFd> = held[&key].1.iter().map(AsRawFd::as_raw_fd).collect();
                    result = send(conn, &format!("K {key}"), &raw);
                    if result.is_err() {
                        break;
                    }
                    // Taken only once sent: a failed send keeps it for the next agent.
                    if verb == "TAKE" {
                        held.remove(&key);
                    }
                }
                result.and_then(|()| send(conn, "END", &[]))
            }
            "PING" => send(conn, &format!("OK {}", std::process::id()), &[]),
            "EXIT" => {
                held.clear();
                let _ = send(conn, "OK", &[]);
                return true;
            }
            _ => send(conn, "ERR unknown request", &[]),
        };
        if ok.is_err() {
            return false;
        }
    }
}

/// The agent's connection to the keeper.
#[derive(Debug)]
pub struct KeeperClient {
    path: PathBuf,
    conn: OwnedFd,
}

impl KeeperClient {
    /// Connects to the keeper at `path`, starting it (as `program --keep-listeners PATH`) when
    /// none answers.
    pub fn connect_or_start(path: &Path, program: &Path) -> Result<Self, KeeperError> {
        match Self::connect(path) {
            Ok(client) => return Ok(client),
            // Only when none listens is one started (a busy or slow keeper is not replaced;
            // its lock would refuse a second one anyway).
            Err(KeeperError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(nix::libc::ENOENT) | Some(nix::libc::ECONNREFUSED)
                ) => {}
            Err(e) => return Err(e),
        }
        let mut cmd = std::process::Command::new(program);
        cmd.arg("--keep-listeners")
            .arg(path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
            }
        }
        let mut child = cmd.spawn().map_err(|source| KeeperError::Io {
            path: path.to_path_buf(),
            what: "start",
            source,
        })?;
        // The keeper outlives us; reap it in the background if it ever ends while we run.
        std::thread::spawn(move || child.wait());
        let waited = Duration::from_secs(5);
        let until = std::time::Instant::now() + waited;
        loop {
            match Self::connect(path) {
                Ok(client) => return Ok(client),
                Err(_) if std::time::Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    return Err(KeeperError::NotStarted {
                        path: path.to_path_buf(),
                        waited,
                    })
                }
            }
        }
    }

    pub fn connect(path: &Path) -> Result<Self, KeeperError> {
        let conn = seqpacket().map_err(errno(path, "socket"))?;
        let addr = UnixAddr::new(path).map_err(errno(path, "address"))?;
        socket::connect(conn.as_raw_fd(), &addr).map_err(errno(path, "connect"))?;
        // The keeper serves one agent at a time: never wait on it forever.
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(errno(path, "set a timeout"))?;
        let mut client = Self {
            path: path.to_path_buf(),
            conn,
        };
        client.request("PING", &[])?;
        Ok(client)
    }

    fn request(&mut self, text: &str, fds: &[RawFd]) -> Result<String, KeeperError> {
        send(&self.conn, text, fds).map_err(errno(&self.path, "send"))?;
        match recv(&self.conn).map_err(errno(&self.path, "receive"))? {
            Some((answer, _)) if answer.starts_with("OK") => Ok(answer),
            Some((answer, _)) => Err(KeeperError::Protocol {
                path: self.path.clone(),
                answer,
            }),
            None => Err(KeeperError::Protocol {
                path: self.path.clone(),
                answer: "(hung up)".into(),
            }),
        }
    }

    pub fn put(&mut self, key: &str, fds: &[RawFd]) -> Result<(), KeeperError> {
        self.request(&format!("PUT {key}"), fds).map(drop)
    }

    pub fn delete(&mut self, key: &str) -> Result<(), KeeperError> {
        self.request(&format!("DEL {key}"), &[]).map(drop)
    }

    /// Copies of what the keeper holds under `prefix`; with `take`, it forgets them.
    pub fn get(
        &mut self,
        prefix: &str,
        take: bool,
    ) -> Result<Vec<(String, Vec<OwnedFd>)>, KeeperError> {
        let verb = if take { "TAKE" } else { "GET" };
        send(&self.conn, &format!("{verb} {prefix}"), &[]).map_err(errno(&self.path, "send"))?;
        let mut out = Vec::new();
        loop {
            match recv(&self.conn).map_err(errno(&self.path, "receive"))? {
                Some((text, fds)) if text.starts_with("K ") => {
                    out.push((text[2..].to_string(), fds));
                }
                Some((text, _)) if text == "END" => return Ok(out),
                other => {
                    return Err(KeeperError::Protocol {
                        path: self.path.clone(),
                        answer: other.map(|(t, _)| t).unwrap_or_else(|| "(hung up)".into()),
                    })
                }
            }
        }
    }

    /// The keeper's pid.
    pub fn pid(&mut self) -> Result<i32, KeeperError> {
        let answer = self.request("PING", &[])?;
        answer[2..]
            .trim()
            .parse()
            .map_err(|_| KeeperError::Protocol {
                path: self.path.clone(),
                answer,
            })
    }

    /// Ends the keeper, closing every socket it holds.
    pub fn exit(mut self) -> Result<(), KeeperError> {
        self.request("EXIT", &[]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A keeper in a thread of this test process (the real one is a process of its own).
    fn keeper() -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.sock");
        let p = path.clone();
        let thread = std::thread::spawn(move || run(&p).unwrap());
        for _ in 0..500 {
            if KeeperClient::connect(&path).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (dir, path, thread)
    }

    /// A listener handed to the keeper keeps its port after the agent's copy is closed:
    /// a client connects meanwhile and is accepted from the copy taken back.
    #[test]
    fn a_kept_listener_outlives_the_agents_copy_and_queues_clients() {
        let (_dir, path, thread) = keeper();
        let mut client = KeeperClient::connect(&path).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        client.put("listen/acme", &[listener.as_raw_fd()]).unwrap();
        drop(listener);
        drop(client);
        // The agent is "down": the connection completes in the backlog.
        let _waiting = TcpStream::connect(addr).expect("connect while the agent is down");
        let mut next = KeeperClient::connect(&path).unwrap();
        let mut got = next.get("listen/", false).unwrap();
        assert_eq!(got.len(), 1);
        let (key, mut fds) = got.remove(0);
        assert_eq!(key, "listen/acme");
        let back = TcpListener::from(fds.remove(0));
        assert_eq!(back.local_addr().unwrap(), addr);
        back.accept().expect("the queued client is there");
        // GET copies, TAKE forgets, DEL forgets.
        assert_eq!(next.get("listen/", true).unwrap().len(), 1);
        assert!(next.get("listen/", false).unwrap().is_empty());
        next.put("conn/acme/1", &[back.as_raw_fd(), back.as_raw_fd()])
            .unwrap();
        assert_eq!(next.get("conn/", false).unwrap()[0].1.len(), 2);
        next.delete("conn/acme/1").unwrap();
        assert!(next.get("conn/", false).unwrap().is_empty());
        next.exit().unwrap();
        thread.join().unwrap();
    }

    /// Handed-over connections no agent takes are closed after the TTL; listeners stay.
    #[test]
    fn handed_over_connections_expire_listeners_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.sock");
        let p = path.clone();
        let thread = std::thread::spawn(move || run_with(&p, Duration::from_millis(200)).unwrap());
        let mut client = loop {
            if let Ok(c) = KeeperClient::connect(&path) {
                break c;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        client.put("listen/a", &[listener.as_raw_fd()]).unwrap();
        client.put("conn/a/1", &[listener.as_raw_fd()]).unwrap();
        drop(client);
        std::thread::sleep(Duration::from_millis(600));
        let mut next = KeeperClient::connect(&path).unwrap();
        assert!(next.get("conn/", false).unwrap().is_empty());
        assert_eq!(next.get("listen/", false).unwrap().len(), 1);
        next.exit().unwrap();
        thread.join().unwrap();
    }
}

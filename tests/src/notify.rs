//! A stand-in for systemd's notify socket: the datagram socket a `Type=notify` service sends
//! `READY=1`, `STATUS=...`, `WATCHDOG=1` and `STOPPING=1` to (named by `NOTIFY_SOCKET`), with
//! each message's sender as the kernel vouches for it (`SO_PASSCRED`), which is what systemd
//! checks for `NotifyAccess=main`.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};

/// One datagram: who sent it and its lines (`KEY=value` each).
#[derive(Debug, Clone)]
pub struct Notification {
    /// The sending process, from its credentials (0 if the kernel gave none).
    pub pid: i32,
    pub text: String,
}

impl Notification {
    /// Whether one of its lines is exactly `assignment` (`READY=1`).
    pub fn has(&self, assignment: &str) -> bool {
        self.text.lines().any(|l| l == assignment)
    }

    /// The value of `key` (`STATUS`), if it is set in this message.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The socket, in a temporary directory of its own (removed on drop).
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("notify-")
            .tempdir()
            .expect("tempdir for the notify socket");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The environment systemd gives a `Type=notify` service: `NOTIFY_SOCKET`, and with a
    /// watchdog `WATCHDOG_USEC`.
    pub fn env(&self, watchdog: Option<Duration>) -> Vec<(String, String)> {
        let mut env = vec![("NOTIFY_SOCKET".into(), self.path.display().to_string())];
        if let Some(w) = watchdog {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
        }
        env
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Notification> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("set the notify socket's timeout");
        let mut buf = vec![0u8; 4096];
        let (len, pid) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!(UnixCredentials);
            let msg = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .ok()?;
            let pid = msg
                .cmsgs()
                .ok()
                .into_iter()
                .flatten()
                .find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid()),
                    _ => None,
                })
                .unwrap_or(0);
            (msg.bytes, pid)
        };
        buf.truncate(len);
        Some(Notification {
            pid,
            text: String::from_utf8_lossy(&buf).into_owned(),
        })
    }

    /// Every message up to and including the first that `done` accepts; panics after `timeout`
    /// (times the time scale) with `what` and what did arrive.
    pub fn until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Notification) -> bool,
    ) -> Vec<Notification> {
        let timeout = timeout * crate::wait::time_scale();
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("timed out after {timeout:?} waiting for {what}; received: {seen:#?}");
            }
            if let Some(n) = self.recv(left) {
                let last = done(&n);
                seen.push(n);
                if last {
                    return seen;
                }
            }
        }
    }
}

//! Watching an engine process through a pidfd, whether this agent started it (it is then our
//! child, through the subreaper, and its exit status is ours) or adopted it after a restart.
//! Starting one is `crate::spawn`.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

#[derive(Debug, thiserror::Error)]
#[error("pidfd_open({pid}): {source}")]
pub struct WatchError {
    pid: i32,
    source: std::io::Error,
}

/// How a watched process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
    /// A process adopted after an agent restart: not our child, so its status is not ours.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "killed by {s}"),
            Exit::Unknown => f.write_str("exited"),
        }
    }
}

/// A process watched through a pidfd: readable once it has exited, and immune to pid reuse.
#[derive(Debug)]
pub struct Watched {
    pid: Pid,
    fd: AsyncFd<OwnedFd>,
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, WatchError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(WatchError {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    let fd = RawFd::try_from(fd).map_err(|_| WatchError {
        pid,
        source: std::io::Error::other("fd out of range"),
    })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Watched {
    /// Watches `pid`: one we spawned, or one found running after an agent restart.
    pub fn new(pid: i32) -> Result<Self, WatchError> {
        let fd = pidfd_open(pid)?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which owns it until dropped, so the
        // registered descriptor stays open and unchanged for the AsyncFd's whole life.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| {
                WatchError {
                    pid,
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
        Ok(Self {
            pid: Pid::from_raw(pid),
            fd,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Waits until the process has exited (and reaps it if it is our child).
    pub async fn exited(&self) -> Exit {
        loop {
            match self.fd.readable().await {
                Ok(mut guard) => {
                    guard.retain_ready();
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        // Our child (spawned by this agent): reap it and read how it ended. A process adopted
        // after a restart is not ours to reap (ECHILD).
        match waitid(Id::PIDFd(self.fd.get_ref().as_fd()), WaitPidFlag::WEXITED) {
            Ok(WaitStatus::Exited(_, code)) => Exit::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => Exit::Signal(sig),
            _ => Exit::Unknown,
        }
    }

    /// Sends `signal` through the pidfd, so a recycled pid can never receive it.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: pidfd_send_signal takes our own open pidfd, a signal number, a null siginfo
        // (allowed: the kernel fills one in) and zero flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

//! Starting an engine process inside its tenant's cgroup as the tenant's user, and watching a
//! process through a pidfd, whether we spawned it or adopted it after an agent restart.
//!
//! The step order after fork is visible in one closure: new session, `no_new_privs`, join the
//! cgroup (while still root: `cgroup.procs` is root's), drop supplementary groups, set gid,
//! set uid, exec. std's own `uid()`/`gid()` would run before our closure, too early to join the
//! cgroup, so we do those steps ourselves.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command is empty")]
    EmptyCommand,
    #[error("open cgroup file {path}: {source}")]
    CgroupFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spawn {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("pidfd_open({pid}): {source}")]
    PidFd { pid: i32, source: std::io::Error },
}

/// What to start and how.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub argv: &'a [String],
    pub cwd: &'a Path,
    pub uid: Uid,
    pub gid: Gid,
    /// `cgroup.procs` files the child joins before exec.
    pub cgroup_procs: &'a [PathBuf],
    /// stdout and stderr are appended here.
    pub log: &'a Path,
}

/// Starts the process; it is in its cgroup before its first instruction of the new program.
pub fn spawn(req: &SpawnRequest<'_>) -> Result<std::process::Child, SpawnError> {
    let (program, args) = req.argv.split_first().ok_or(SpawnError::EmptyCommand)?;
    let cgroup_files: Vec<File> = req
        .cgroup_procs
        .iter()
        .map(|path| {
            File::options()
                .write(true)
                .open(path)
                .map_err(|source| SpawnError::CgroupFile {
                    path: path.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    let log = File::options()
        .create(true)
        .append(true)
        .open(req.log)
        .map_err(|source| SpawnError::Log {
            path: req.log.to_path_buf(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| SpawnError::Log {
        path: req.log.to_path_buf(),
        source,
    })?;
    let cgroup_fds: Vec<RawFd> = cgroup_files.iter().map(|f| f.as_raw_fd()).collect();
    let (uid, gid) = (req.uid, req.gid);

    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(req.cwd)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let after_fork = move || {
        nix::unistd::setsid()?;
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for fd in &cgroup_fds {
            // SAFETY: `fd` is open until spawn returns (the Files live in the parent's frame) and
            // the buffer is a static byte string.
            if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        nix::unistd::setgroups(&[])?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)?;
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (setsid, prctl, write, setgroups, setgid, setuid) on values prepared before
    // the fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(after_fork);
    }
    let child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        program: program.clone(),
        source,
    });
    drop(cgroup_files);
    child
}

/// How a watched process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
    /// An adopted process: not our child, so its status is not ours to read.
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
    is_child: bool,
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, SpawnError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(SpawnError::PidFd {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    let fd = RawFd::try_from(fd).map_err(|_| SpawnError::PidFd {
        pid,
        source: std::io::Error::other("fd out of range"),
    })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Watched {
    /// Watches a child we spawned; we reap it when it exits.
    pub fn child(child: std::process::Child) -> Result<Self, SpawnError> {
        let pid = i32::try_from(child.id()).map_err(|_| SpawnError::PidFd {
            pid: -1,
            source: std::io::Error::other("pid out of range"),
        })?;
        Self::new(pid, true)
    }

    /// Watches a process we did not spawn (found running after an agent restart).
    pub fn adopt(pid: i32) -> Result<Self, SpawnError> {
        Self::new(pid, false)
    }

    fn new(pid: i32, is_child: bool) -> Result<Self, SpawnError> {
        let fd = pidfd_open(pid)?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which owns it until dropped, so the
        // registered descriptor stays open and unchanged for the AsyncFd's whole life.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| {
                SpawnError::PidFd {
                    pid,
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
        Ok(Self {
            pid: Pid::from_raw(pid),
            fd,
            is_child,
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
        if !self.is_child {
            return Exit::Unknown;
        }
        match waitpid(self.pid, None) {
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

/// Writes `content` to `path` owned by `uid`/`gid` with mode 0600.
pub fn write_private_file(path: &Path, content: &str, uid: Uid, gid: Gid) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    nix::unistd::fchown(&f, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
    Ok(())
}

//! Starting an engine process isolated: in its tenant's cgroup from its first instruction, in its
//! own mount, pid, uts, ipc, net and cgroup namespaces, in a minimal root of its own (`root`), as
//! the tenant's own uid with `no_new_privs`, no capabilities, sensible rlimits and a seccomp
//! filter (`seccomp`). `plan` says what happens between fork and exec, `sys` does
//! it; this module wires them to `std::process::Command`.
//!
//! The engine is PID 1 of its pid namespace. To get there without a helper process that stays
//! around, the child unshares, forks once more and the intermediate exits at once; the agent is a
//! child subreaper (`become_subreaper`), so the engine becomes the agent's child and its exit
//! status stays readable. Orphans inside the tenant reparent to the engine, as in any container
//! without an init; PostgreSQL and Redis reap what they start.

pub mod plan;
pub mod root;
pub mod seccomp;
pub mod sys;

use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use plan::{Isolation, PlanError, Step, TENANT_DATA_PATH, TENANT_RUN_PATH};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command is empty")]
    EmptyCommand,
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("open cgroup file {path}: {source}")]
    CgroupFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine output pipe: {0}")]
    Output(std::io::Error),
    #[error("report pipe: {0}")]
    Pipe(std::io::Error),
    #[error("spawn {program}: step {step} failed: {source}")]
    Step {
        program: String,
        step: String,
        source: std::io::Error,
    },
    #[error("spawn {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("spawn {program}: the engine's pid was not reported")]
    NoPid { program: String },
}

/// What to start and how.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub argv: &'a [String],
    pub cwd: &'a Path,
    /// `cgroup.procs` files the child joins before anything else.
    pub cgroup_procs: &'a [PathBuf],
    /// stdout and stderr: the write end of the tenant's output pipe (`engine_log`), never a
    /// file the tenant could fill the host's disk through.
    pub output: BorrowedFd<'a>,
    pub isolation: Isolation<'a>,
}

/// Makes this process the reaper of its orphaned descendants, so an engine whose intermediate
/// parent exited becomes our child (and its exit status ours to read). Call once at start.
#[allow(unsafe_code)]
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Starts the process and returns the engine's PID (as this agent sees it).
#[allow(unsafe_code)]
pub fn spawn(req: &SpawnRequest<'_>) -> Result<i32, SpawnError> {
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
    let stdout = req
        .output
        .try_clone_to_owned()
        .map_err(SpawnError::Output)?;
    let stderr = stdout.try_clone().map_err(SpawnError::Output)?;
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Pipe(e.into()))?;
    let cgroup_fds: Vec<RawFd> = cgroup_files.iter().map(AsRawFd::as_raw_fd).collect();
    let report_fd = report_write.as_raw_fd();
    // Never above the agent's own hard limit: raising it needs a capability a confined agent
    // (a container, a hardened unit) may not have.
    let mut isolation = req.isolation.clone();
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        isolation.max_open_files = isolation.max_open_files.min(hard);
    }
    let steps = plan::isolated(&cgroup_fds, report_fd, &isolation)?;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(req.cwd)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("HOME", "/tmp")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let child_steps = steps.clone();
    // SAFETY: the closure runs in the forked child before exec; `execute` with `LinuxSys` makes
    // only async-signal-safe system calls on values prepared before the fork (the steps, the
    // fds, which stay open until spawn returns) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || sys::execute(&child_steps, &mut sys::LinuxSys, report_fd));
    }
    let spawned = cmd.spawn();
    // Our write end must close for the read below to see EOF; the children's copies closed at
    // exec or exit, and spawn returned only after that.
    drop(report_write);
    drop(cgroup_files);
    let mut report = Vec::new();
    let _ = File::from(report_read).read_to_end(&mut report);
    let mut engine_pid = None;
    let mut failed_step = None;
    for rec in report.chunks_exact(5) {
        let value = i32::from_ne_bytes([rec[1], rec[2], rec[3], rec[4]]);
        match rec[0] {
            sys::REPORT_PID => engine_pid = Some(value),
            sys::REPORT_FAILED_STEP => failed_step = usize::try_from(value).ok(),
            _ => {}
        }
    }
    let mut intermediate = match spawned {
        Ok(child) => child,
        Err(source) => {
            // A process that failed after the fork into the pid namespace is our zombie now.
            if let Some(pid) = engine_pid {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            }
            return Err(match failed_step.and_then(|i| steps.get(i)) {
                Some(step) => SpawnError::Step {
                    program: program.clone(),
                    step: format!("{step:?}"),
                    source,
                },
                None => SpawnError::Spawn {
                    program: program.clone(),
                    source,
                },
            });
        }
    };
    // The intermediate process exits as soon as it has forked; reap it.
    let _ = intermediate.wait();
    engine_pid.ok_or_else(|| SpawnError::NoPid {
        program: program.clone(),
    })
}

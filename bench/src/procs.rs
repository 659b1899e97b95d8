//! Everything a run starts on this host: the work directory and the child processes in it. One
//! [`Guard`] owns them and cleans up in `Drop`, so every way out of a run (an error, a panic, or
//! Ctrl-C dropping the run's future) kills the children by PID, reaps them, and removes the work
//! directory unless `--keep` was given.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where work directories go by default. Not /tmp: sled and etcd fsync, and /tmp is often tmpfs,
/// which would make the fsync numbers meaningless.
pub const DEFAULT_ROOT: &str = "/var/lib/dormant-bench";

/// Index of a child in its [`Guard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

#[derive(Debug)]
struct Proc {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    child: Child,
    log: PathBuf,
    /// Killed on purpose by `stop_all`: no longer expected to run.
    stopped: bool,
}

/// A clean-up step run after the children are killed and before the work directory goes.
pub type Cleanup = Box<dyn FnOnce() + Send>;

/// Owns the work directory and the children; see the module doc.
#[must_use = "dropping the guard kills the children and removes the work directory"]
pub struct Guard {
    procs: Vec<Proc>,
    /// What the children leave on the host beyond their processes (an agent's tenant cgroups,
    /// mounts, loop devices and listener keeper), undone in reverse order of registration.
    cleanups: Vec<Cleanup>,
    dir: PathBuf,
    /// The default root, when we made it and may remove it again once empty.
    default_root: Option<PathBuf>,
    keep: bool,
}

impl Guard {
    /// Creates the work directory: `dir` if given (it must not exist or be empty), else a fresh
    /// random one under [`DEFAULT_ROOT`].
    pub fn new(dir: Option<PathBuf>, keep: bool) -> anyhow::Result<Self> {
        let (dir, default_root) = match dir {
            Some(d) => {
                let non_empty = std::fs::read_dir(&d)
                    .map(|mut e| e.next().is_some())
                    .unwrap_or(false);
                if non_empty {
                    // We remove the work dir at the end, so never adopt one with someone's files.
                    bail!("--work-dir {}: exists and is not empty", d.display());
                }
                (d, None)
            }
            None => {
                let root = PathBuf::from(DEFAULT_ROOT);
                let name = format!("run-{:08x}", rand::random::<u32>());
                (root.join(name), Some(root))
            }
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create work dir {}", dir.display()))?;
        Ok(Self {
            procs: Vec::new(),
            cleanups: Vec::new(),
            dir,
            default_root,
            keep,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers a clean-up step for `Drop`; it also runs with `--keep` (it undoes host state,
    /// not data).
    pub fn on_cleanup(&mut self, step: Cleanup) {
        self.cleanups.push(step);
    }

    /// Starts `bin` with `args`, stdout and stderr going to `<work dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str, bin: &Path, args: &[String]) -> anyhow::Result<ProcId> {
        let log = self.dir.join(format!("{name}.log"));
        let child = log_to(Command::new(bin).args(args), &log)?
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        self.procs.push(Proc {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            args: args.to_vec(),
            child,
            log,
            stopped: false,
        });
        Ok(ProcId(self.procs.len() - 1))
    }

    pub fn pid(&self, id: ProcId) -> u32 {
        self.procs[id.0].child.id()
    }

    /// Fails naming the first child that has exited, with the end of its log: a child dying
    /// during a run makes every later number wrong.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for p in self.procs.iter_mut().filter(|p| !p.stopped) {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log, 20)
                );
            }
        }
        Ok(())
    }

    /// kill -9 one child, on purpose (reaped; no longer expected to run until `respawn`).
    pub fn kill(&mut self, id: ProcId) {
        let p = &mut self.procs[id.0];
        p.stopped = true;
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Starts a killed child again with its arguments, its log appended to.
    pub fn respawn(&mut self, id: ProcId) -> anyhow::Result<()> {
        let p = &mut self.procs[id.0];
        p.child = log_to(Command::new(&p.bin).args(&p.args), &p.log)?
            .spawn()
            .with_context(|| format!("restart {}", p.bin.display()))?;
        p.stopped = false;
        Ok(())
    }

    /// Kills and reaps every child started so far; later ones are still the guard's to clean up.
    pub fn stop_all(&mut self) {
        for p in self.procs.iter_mut().filter(|p| !p.stopped) {
            p.stopped = true;
            // Child::kill signals exactly this PID; wait reaps it, so it cannot linger as a
            // zombie while we remove its data dir.
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("procs", &self.procs)
            .field("cleanups", &self.cleanups.len())
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .finish()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_all();
        while let Some(step) = self.cleanups.pop() {
            step();
        }
        if self.keep {
            eprintln!("kept the work dir {}", self.dir.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
        if let Some(root) = &self.default_root {
            // Only succeeds when no other run's directory is left in it.
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// `cmd` with no stdin and its stdout and stderr appended to `log`.
pub fn log_to<'a>(cmd: &'a mut Command, log: &Path) -> anyhow::Result<&'a mut Command> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let err = out.try_clone().context("dup log file")?;
    Ok(cmd.stdin(Stdio::null()).stdout(out).stderr(err))
}

/// A child that lives shorter than the run (a bare engine for one measurement, a proxy for one
/// round): SIGKILLed and reaped when dropped, so an error or Ctrl-C in between leaves nothing.
#[derive(Debug)]
pub struct Transient {
    name: String,
    child: Option<Child>,
}

impl Transient {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails, naming the child, once it has exited: whatever was measured through it is void.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                bail!("{} exited ({status})", self.name);
            }
        }
        Ok(())
    }

    /// Sends `signal` and waits up to `timeout` for the exit, then SIGKILLs: a graceful stop, so
    /// the next start of the same data does not begin with crash recovery.
    pub async fn stop(mut self, signal: Signal, timeout: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        let _ = kill(pid, signal);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if child.try_wait().context("wait")?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within {timeout:?} of {signal}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Transient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `n` consecutive loopback ports all free right now, for an agent's tenants. Below the kernel's
/// ephemeral range (32768-60999 by default), so no client's outgoing connection takes one.
pub fn free_port_range(n: u16) -> anyhow::Result<(u16, u16)> {
    for _ in 0..200 {
        let start = 10_000 + rand::random::<u16>() % 22_000;
        let end = start + n - 1;
        if (start..=end).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok((start, end));
        }
    }
    bail!("no {n} consecutive free ports found below 32000")
}

/// A loopback port free right now (bind to 0, read it, release it). Another process could take
/// it before the child binds; the child then fails fast and `check_running` says so.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("local addr")?.port())
}

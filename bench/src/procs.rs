//! Everything a run starts on this host: the work directory and the child processes in it. One
//! [`Guard`] owns them and cleans up in `Drop`, so every way out of a run (an error, a panic, or
//! Ctrl-C dropping the run's future) kills the children by PID, reaps them, and removes the work
//! directory unless `--keep` was given.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// Where work directories go by default. Not /tmp: sled and etcd fsync, and /tmp is often tmpfs,
/// which would make the fsync numbers meaningless.
pub const DEFAULT_ROOT: &str = "/var/lib/dormant-bench";

/// Index of a child in its [`Guard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Killed on purpose by `stop_all`: no longer expected to run.
    stopped: bool,
}

/// Owns the work directory and the children; see the module doc.
#[must_use = "dropping the guard kills the children and removes the work directory"]
#[derive(Debug)]
pub struct Guard {
    procs: Vec<Proc>,
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
            dir,
            default_root,
            keep,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `bin` with `args`, stdout and stderr going to `<work dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str, bin: &Path, args: &[String]) -> anyhow::Result<ProcId> {
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("dup log file")?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        self.procs.push(Proc {
            name: name.to_string(),
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

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_all();
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

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A loopback port free right now (bind to 0, read it, release it). Another process could take
/// it before the child binds; the child then fails fast and `check_running` says so.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("local addr")?.port())
}

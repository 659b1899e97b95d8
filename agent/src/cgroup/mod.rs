//! Per-tenant cgroups behind a trait of ours. Each driver gets its mount root and the parent path
//! it owns as constructor arguments, never from a constant, so tests lay out a fake tree in a
//! `TempDir`. We write the cgroup files ourselves instead of using `cgroups-rs`: the handful of
//! files we touch are simpler to own than a library's API churn, and errors name the exact file.

pub mod select;
pub mod v1;
pub mod v2;

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use dormant_common::TenantName;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup file {path}: writing {value:?}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cgroup file {path}: cannot parse {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("cgroup controller {controller} is not available under {root} ({hint})")]
    MissingController {
        controller: &'static str,
        root: PathBuf,
        hint: &'static str,
    },
    #[error("cgroup {path} still has processes after killing them: {pids:?}")]
    NotEmpty { path: PathBuf, pids: Vec<i32> },
    #[error("cgroup {path}: {what} did not happen within {waited:?}")]
    Timeout {
        path: PathBuf,
        what: &'static str,
        waited: std::time::Duration,
    },
    #[error("cgroup driver: {0}")]
    Unavailable(String),
}

/// The limits a tenant's cgroup enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Thousandths of a core.
    pub milli_cpu: u64,
    pub memory_bytes: u64,
    pub pids_max: u64,
}

/// What a tenant's cgroup has used. Counters only grow; a dashboard takes their rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_usage_usec: u64,
    /// Time the tenant was held back by its CPU quota, and how many periods that happened in.
    pub cpu_throttled_usec: u64,
    pub cpu_nr_throttled: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub oom_kills: u64,
    /// Pressure stall time (v2 only; `None` on v1): time some or all of the tenant's tasks were
    /// stalled waiting for the resource. This, not usage, tells an operator a tenant is starved.
    pub pressure: Option<Pressure>,
}

/// Totals of the `some`/`full` lines of `cpu.pressure`, `memory.pressure`, `io.pressure`, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub cpu_some_usec: u64,
    pub memory_some_usec: u64,
    pub memory_full_usec: u64,
    pub io_some_usec: u64,
    pub io_full_usec: u64,
}

/// One tenant's cgroup.
pub trait TenantCgroup: Debug + Send + Sync {
    /// Creates the cgroup (and its parents) if missing.
    fn create(&self) -> Result<(), CgroupError>;
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError>;
    /// Files a child writes `0` into before exec to join the cgroup, so even its first fork is
    /// inside.
    fn procs_files(&self) -> Vec<PathBuf>;
    /// Every process in the cgroup.
    fn pids(&self) -> Result<Vec<i32>, CgroupError>;
    fn usage(&self) -> Result<Usage, CgroupError>;
    /// SIGKILLs every process until the cgroup is empty.
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Stops every process in the cgroup where it is (memory kept) and waits until the kernel
    /// says the whole cgroup is frozen.
    fn freeze(&self) -> Result<(), CgroupError>;
    /// Undoes `freeze` and waits until the cgroup runs again.
    fn thaw(&self) -> Result<(), CgroupError>;
    /// Gives back what an empty cgroup is still charged for (the page cache of its files), so
    /// a hibernated tenant costs no memory. Best effort: the kernel may keep some.
    fn reclaim_memory(&self) -> Result<(), CgroupError> {
        Ok(())
    }
    /// Removes the cgroup; it must be empty. Missing is fine.
    fn delete(&self) -> Result<(), CgroupError>;
    /// The path shown in logs and errors.
    fn display_path(&self) -> PathBuf;
}

/// Opens tenants' cgroups on one host.
pub trait CgroupDriver: Debug + Send + Sync {
    /// `v1` or `v2`, as `node list` shows it.
    fn name(&self) -> &'static str;
    fn tenant(&self, name: &TenantName) -> Box<dyn TenantCgroup>;
    /// The names of the tenant cgroups that exist under the parent the agent owns (in any
    /// hierarchy, on v1), for the sweep at start.
    fn tenant_names(&self) -> Result<Vec<String>, CgroupError>;
}

/// The names of the directories in `dir` (a cgroup parent); missing is empty.
pub(crate) fn child_dirs(dir: &Path) -> Result<Vec<String>, CgroupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CgroupError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// How long freeze and thaw wait for the kernel to report the new state.
pub(crate) const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Polls `done` every few milliseconds until it is true or `timeout` passes.
pub(crate) fn wait_until(
    path: &Path,
    what: &'static str,
    timeout: std::time::Duration,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<(), CgroupError> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(CgroupError::Timeout {
                path: path.to_path_buf(),
                what,
                waited: timeout,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

/// The value of `key` in a flat keyed file (`cpu.stat`, `memory.events`, `cgroup.events`).
pub(crate) fn keyed_value(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

pub(crate) fn read_file(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

pub(crate) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let content = read_file(path)?;
    content.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        content,
    })
}

/// Parses a `cgroup.procs` file.
pub(crate) fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    let content = match std::fs::read_to_string(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    content
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse().map_err(|_| CgroupError::Parse {
                path: path.to_path_buf(),
                content: content.clone(),
            })
        })
        .collect()
}

/// Removes a cgroup directory; `rmdir` is the only way (its files cannot be unlinked).
pub(crate) fn remove_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

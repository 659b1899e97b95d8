//! One tenant on this host. The job is split four ways: `record` (what is kept on disk, with the
//! intent of the operation under way), `runtime` (the host-side steps behind the narrow `Runtime`
//! seam: directories, cgroup, volume, processes, endpoint), `supervisor` (the lifecycle state
//! machine that decides which step comes next, tested without root against a fake runtime) and
//! `handle` (what the reconciler holds: requests in, observed state out).

pub mod handle;
pub mod record;
pub mod runtime;
pub mod supervisor;

use dormant_common::TenantState;

pub use handle::TenantHandle;
pub use record::{load_all as load_records, TenantAssignment, TenantRecord};

use crate::cgroup::CgroupError;
use crate::process::{Exit, WatchError};
use crate::proxy::ProxyError;
use crate::spawn::SpawnError;

/// The tenant as the agent sees it, reported in heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub state: TenantState,
    pub reason: Option<String>,
    pub restarts: u64,
    pub pid: Option<i32>,
    /// Deleted: nothing of the tenant is left on this host.
    pub gone: bool,
    /// A resize not finished yet (the storage grow), with the reason.
    pub resize_pending: Option<String>,
    /// The restart generation the engine runs at.
    pub restart_generation: u64,
    /// The last hibernate and wake generations acted on.
    pub hibernate_generation: u64,
    pub wake_generation: u64,
    /// Times the tenant hibernated and woke (since this agent started), and how long the last
    /// wake took, from when the supervisor saw the first client's byte (or the wake request)
    /// until the engine answered.
    pub hibernations: u64,
    pub wakes: u64,
    pub last_wake: Option<std::time::Duration>,
    /// How long each of those wakes took.
    pub wake_durations: crate::metrics::WakeDurations,
    /// False for a tenant resumed after an agent restart until its supervisor knows whether the
    /// engine is still running: it is not reported until then, so an adopted engine never shows
    /// as `starting`.
    pub announced: bool,
}

impl Observed {
    /// What a tenant task reports before its supervisor has decided anything.
    pub fn initial(spec: &TenantAssignment, state: TenantState, announced: bool) -> Self {
        Self {
            state,
            reason: None,
            restarts: 0,
            pid: None,
            gone: false,
            resize_pending: None,
            restart_generation: spec.restart_generation,
            hibernate_generation: spec.hibernate_generation,
            wake_generation: spec.wake_generation,
            hibernations: 0,
            wakes: 0,
            last_wake: None,
            wake_durations: Default::default(),
            announced,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("engine {0:?} is not configured on this node")]
    UnknownEngine(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("initialising data: {program} {exit}; last log lines: {log_tail}")]
    Init {
        program: String,
        exit: Exit,
        log_tail: String,
    },
    #[error("engine {exit} before it was ready; last log lines: {log_tail}")]
    ExitedBeforeReady { exit: Exit, log_tail: String },
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> TenantError + 'a {
    move |source| TenantError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The last lines of the engine's log (from its last 4 KiB), for a failure's reason: the
/// tenant's own text, so control characters are escaped (it is stored and shown to operators).
pub(crate) fn log_tail(path: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut content = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        content = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = content.lines().rev().take(3).collect();
    dormant_common::text::escape_control(&lines.into_iter().rev().collect::<Vec<_>>().join(" | "))
}

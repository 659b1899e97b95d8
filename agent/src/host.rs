//! What every tenant on this host shares: the state directory layout, the cgroup driver, the
//! engine templates, the range of uids tenants get one each from, and the host's capacity and
//! usage.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dormant_common::{Bytes, MilliCpu, Resources, TenantName, TenantUid};
use nix::unistd::{Gid, Uid};

use crate::cgroup::CgroupDriver;
use crate::engine::EngineTemplate;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot become the child subreaper: {0}")]
    Subreaper(std::io::Error),
    #[error("tenant_uids {start}-{end}: every uid is taken by a tenant on this host")]
    UidsExhausted { start: u32, end: u32 },
    #[error("tenant {name}: uid file {path}: {why}")]
    UidFile {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("state_dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state_dir {path}: must be an absolute path outside /tmp, /var/tmp and /dev/shm (the host cleans those; tenants' records and volumes must last)")]
    StateDirPlace { path: PathBuf },
    #[error(
        "state_dir {path}: another agent (pid {holder}) is using it; one agent per state directory"
    )]
    StateDirInUse { path: PathBuf, holder: String },
    #[error("cgroup_parent: {now:?}, but the tenants recorded in {state_dir} run under {before:?}; set cgroup_parent back to {before:?} (moving tenants between parents is not supported)")]
    CgroupParentChanged {
        state_dir: PathBuf,
        before: String,
        now: String,
    },
    #[error("state_dir {path}: the socket paths under it would be too long ({len} bytes, at most 90); choose a shorter state_dir")]
    StateDirTooLong { path: PathBuf, len: usize },
}

#[derive(Debug)]
pub struct Host {
    pub state_dir: PathBuf,
    /// Held for the agent's life: one agent per state directory (a second one's sweep would
    /// take the first one's tenants for leftovers).
    pub state_lock: nix::fcntl::Flock<std::fs::File>,
    pub cgroups: Arc<dyn CgroupDriver>,
    pub engines: BTreeMap<String, EngineTemplate>,
    /// Each tenant gets a uid (and a gid of the same number) of its own from this range.
    pub tenant_uids: (u32, u32),
    /// Serialises uid assignment across tenant tasks.
    pub uid_lock: std::sync::Mutex<()>,
    pub listen_host: IpAddr,
    pub pids_max: u64,
    /// Overrides the open-connection cap derived from each engine's limit.
    pub max_clients_per_tenant: Option<u64>,
    /// TLS for tenants' clients (`None`: plaintext only).
    pub tenant_tls: Option<crate::tenant_tls::TenantTls>,
    /// How much of each engine's output is kept.
    pub engine_log: crate::engine_log::LogLimits,
    /// Signalled when any tenant changes state, so the reporter tells the scheduler at once.
    pub changed: Arc<tokio::sync::Notify>,
    /// Tenant ports kept open across agent restarts.
    pub endpoints: crate::endpoints::Endpoints,
}

/// Where one tenant's files live.
#[derive(Debug, Clone)]
pub struct TenantPaths {
    /// Root-owned: the record, the engine's pid file and log, the "initialised" marker.
    pub dir: PathBuf,
    /// The tenant user's: the engine's data, the mounted volume.
    pub data: PathBuf,
    /// The tenant user's: the engine's Unix socket. Kept short (by tenant uid) for the socket
    /// path limit.
    pub run: PathBuf,
}

impl TenantPaths {
    pub fn record(&self) -> PathBuf {
        self.dir.join("tenant.json")
    }
    pub fn initialized_marker(&self) -> PathBuf {
        self.dir.join("initialized")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("engine.pid")
    }
    /// The engine's output, as the agent's pump writes it (`engine_log`); the previous part
    /// is `engine.log.1`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("engine.log")
    }
    /// The uid this host gave the tenant.
    pub fn uid_file(&self) -> PathBuf {
        self.dir.join("uid")
    }
    /// Bound over /etc/passwd and /etc/group in the tenant's mount namespace.
    pub fn passwd(&self) -> PathBuf {
        self.dir.join("passwd")
    }
    pub fn group(&self) -> PathBuf {
        self.dir.join("group")
    }
    /// An empty root-only directory the engine's root is built on, in its mount namespace only.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// The tenant's volume: a root-owned image beside the record, mounted as `data`.
    pub fn volume(&self) -> crate::volume::Volume {
        crate::volume::Volume::new(self.dir.join("volume.img"), self.data.clone())
    }
}

impl Host {
    pub fn tenants_dir(&self) -> PathBuf {
        self.state_dir.join("tenants")
    }

    /// Where a deleted tenant's directory goes in one rename before it is removed (inside
    /// `tenants`, which is a mount of its own: a rename cannot leave it). Never a tenant's name.
    pub fn trash_dir(&self) -> PathBuf {
        self.tenants_dir().join(".trash")
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    pub fn paths(&self, name: &TenantName, uid: TenantUid) -> TenantPaths {
        let dir = self.tenants_dir().join(name.as_str());
        TenantPaths {
            data: dir.join("data"),
            dir,
            run: self.runs_dir().join(uid.to_string()),
        }
    }
}

impl Host {
    /// The tenant's own uid and gid: the one recorded in its directory, or the lowest number of
    /// the range that no other tenant on this host has, recorded before it is returned.
    pub fn tenant_identity(
        &self,
        name: &TenantName,
        paths: &TenantPaths,
    ) -> Result<(Uid, Gid), HostError> {
        let _guard = self
            .uid_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let file = paths.uid_file();
        let bad = |why: String| HostError::UidFile {
            name: name.to_string(),
            path: file.clone(),
            why,
        };
        let uid = match std::fs::read_to_string(&file) {
            Ok(text) => text
                .trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("{:?} is not a uid", text.trim())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let used: std::collections::BTreeSet<u32> = std::fs::read_dir(self.tenants_dir())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("uid")).ok())
                    .filter_map(|t| t.trim().parse().ok())
                    .collect();
                let (start, end) = self.tenant_uids;
                let uid = (start..=end)
                    .find(|u| !used.contains(u))
                    .ok_or(HostError::UidsExhausted { start, end })?;
                crate::tenant_fs::write_atomic(&file, uid.to_string().as_bytes())
                    .map_err(|e| bad(e.to_string()))?;
                uid
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        Ok((Uid::from_raw(uid), Gid::from_raw(uid)))
    }
}

/// Directories the host empties (at boot, or by age): no place for records and volumes.
const CLEANED_BY_THE_HOST: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// Creates the state directory, takes it for this agent alone (see `lock_state_dir`), checks its
/// socket paths will fit, and returns its canonical path with the lock
/// (mount points are compared as strings with /proc's, so no symlink may hide in it).
pub fn prepare_state_dir(
    dir: &Path,
) -> Result<(PathBuf, nix::fcntl::Flock<std::fs::File>), HostError> {
    let io = |source| HostError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.is_absolute() || CLEANED_BY_THE_HOST.iter().any(|p| dir.starts_with(p)) {
        return Err(HostError::StateDirPlace {
            path: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let dir = &std::fs::canonicalize(dir).map_err(io)?;
    if CLEANED_BY_THE_HOST.iter().any(|p| dir.starts_with(p)) {
        return Err(HostError::StateDirPlace {
            path: dir.to_path_buf(),
        });
    }
    // Before anything else is touched: another agent may be using the directory.
    let lock = lock_state_dir(dir)?;
    use std::os::unix::fs::PermissionsExt;
    // Root's alone, whatever the umask: tenants see none of it (their roots are built from it as
    // root), and it holds their passwords.
    for path in [dir.to_path_buf(), dir.join("tenants"), dir.join("run")] {
        std::fs::create_dir_all(&path).map_err(io)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    share_tenant_mounts(&dir.join("tenants"))?;
    // <state_dir>/run/<tenant uid>/.s.PGSQL.5432 must fit in sockaddr_un (108 bytes).
    let len = dir.as_os_str().len();
    if len > 90 - "/run/18446744073709551615".len() {
        return Err(HostError::StateDirTooLong {
            path: dir.to_path_buf(),
            len,
        });
    }
    Ok((dir.to_path_buf(), lock))
}

/// Whether any tenant directory under `state_dir` has a record (readable or not).
pub fn any_tenant_recorded(state_dir: &Path) -> bool {
    std::fs::read_dir(state_dir.join("tenants"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("tenant.json").exists())
}

/// Takes the state directory for this agent alone (`<state_dir>/agent.lock`, `flock`ed for the
/// life of the process; the kernel drops it when the process dies, however it dies).
pub fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, HostError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("agent.lock");
    let io = |source| HostError::StateDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(HostError::StateDirInUse {
                path: dir.to_path_buf(),
                holder: holder.trim().to_string(),
            });
        }
        Err((_, e)) => return Err(io(e.into())),
    };
    lock.set_len(0).map_err(io)?;
    lock.rewind().map_err(io)?;
    write!(lock, "{}", std::process::id()).map_err(io)?;
    Ok(lock)
}

/// The cgroup parent is recorded in `<state_dir>/cgroup-parent` and may change only while no
/// tenant is recorded: engines keep running in the parent they were started under, and an agent
/// looking under another would start a second engine on the same volume.
pub fn check_cgroup_parent(
    state_dir: &Path,
    parent: &Path,
    tenants_recorded: bool,
) -> Result<(), HostError> {
    let path = state_dir.join("cgroup-parent");
    let now = parent.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(before)
            if Path::new(before.trim())
                .components()
                .eq(parent.components()) =>
        {
            return Ok(())
        }
        Ok(before) if tenants_recorded => {
            return Err(HostError::CgroupParentChanged {
                state_dir: state_dir.to_path_buf(),
                before: before.trim().to_string(),
                now,
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(HostError::StateDir { path, source }),
    }
    crate::tenant_fs::write_atomic(&path, now.as_bytes())
        .map_err(|source| HostError::StateDir { path, source })
}

/// Makes `tenants` a shared mount (binding it onto itself first if it is not a mount point), so
/// that each tenant's mount namespace, a slave of it, sees other tenants' volumes go when they are
/// unmounted here instead of keeping them (and their disk space) alive until its engine restarts.
fn share_tenant_mounts(tenants: &Path) -> Result<(), HostError> {
    use nix::mount::{mount, MsFlags};
    let err = |source: nix::Error| HostError::StateDir {
        path: tenants.to_path_buf(),
        source: source.into(),
    };
    if !crate::volume::is_mount_point(tenants).map_err(|e| HostError::StateDir {
        path: tenants.to_path_buf(),
        source: e,
    })? {
        mount(
            Some(tenants),
            tenants,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err)?;
    }
    mount(
        None::<&str>,
        tenants,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(err)
}

/// The host's capacity as registered: cores, memory less a reserve, and the size of the state
/// directory's filesystem less a reserve. The size, not the free space: what tenants already
/// wrote is theirs (reserved by the scheduler) and must not be counted twice after a restart.
pub fn capacity(state_dir: &Path, reserve_memory: Bytes, reserve_storage: Bytes) -> Resources {
    let sys = sysinfo::System::new_with_specifics(
        sysinfo::RefreshKind::nothing().with_memory(sysinfo::MemoryRefreshKind::everything()),
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let total_storage = nix::sys::statvfs::statvfs(state_dir)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0);
    Resources {
        cpu: MilliCpu(cores * 1000),
        memory: Bytes(sys.total_memory().saturating_sub(reserve_memory.0)),
        storage: Bytes(total_storage.saturating_sub(reserve_storage.0)),
    }
}

/// Bytes on the state directory's filesystem that are not tenants' volumes (the OS, logs, other
/// data): capacity is the filesystem's size less `reserve_storage`, so this must fit in the
/// reserve or tenants may get less than they were promised.
pub fn storage_not_for_tenants(state_dir: &Path, tenants_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let used = nix::sys::statvfs::statvfs(state_dir)
        .map(|s| (s.blocks() - s.blocks_free()) * s.fragment_size())
        .unwrap_or(0);
    let volumes: u64 = std::fs::read_dir(tenants_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path().join("volume.img")).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    used.saturating_sub(volumes)
}

/// Node usage for heartbeats.
#[derive(Debug)]
pub struct NodeUsageProbe {
    sys: sysinfo::System,
}

impl Default for NodeUsageProbe {
    fn default() -> Self {
        Self {
            sys: sysinfo::System::new_with_specifics(
                sysinfo::RefreshKind::nothing()
                    .with_memory(sysinfo::MemoryRefreshKind::everything())
                    .with_cpu(sysinfo::CpuRefreshKind::nothing().with_cpu_usage()),
            ),
        }
    }
}

impl NodeUsageProbe {
    pub fn sample(&mut self, state_dir: &Path) -> dormant_proto::v1::NodeUsage {
        self.sys.refresh_memory();
        self.sys.refresh_cpu_usage();
        let cpus = self.sys.cpus().len() as f64;
        let used_storage = nix::sys::statvfs::statvfs(state_dir)
            .map(|s| (s.blocks() - s.blocks_free()) * s.fragment_size())
            .unwrap_or(0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a non-negative percentage of a few hundred cores fits u64"
        )]
        dormant_proto::v1::NodeUsage {
            cpu_usage_milli: (f64::from(self.sys.global_cpu_usage()) / 100.0 * cpus * 1000.0)
                as u64,
            memory_used_bytes: self.sys.used_memory(),
            storage_used_bytes: used_storage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parent is recorded; it may change only while no tenant is recorded.
    #[test]
    fn the_cgroup_parent_may_not_change_under_recorded_tenants() {
        let dir = tempfile::tempdir().unwrap();
        check_cgroup_parent(dir.path(), Path::new("dormant/tenants"), true).unwrap();
        check_cgroup_parent(dir.path(), Path::new("dormant/tenants"), true).unwrap();
        let err = check_cgroup_parent(dir.path(), Path::new("elsewhere"), true).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("cgroup_parent"), "{text}");
        assert!(
            text.contains("dormant/tenants") && text.contains("elsewhere"),
            "{text}"
        );
        // Unchanged by the refusal; with no tenant recorded the new one is taken.
        check_cgroup_parent(dir.path(), Path::new("dormant/tenants"), true).unwrap();
        check_cgroup_parent(dir.path(), Path::new("elsewhere"), false).unwrap();
        check_cgroup_parent(dir.path(), Path::new("elsewhere"), true).unwrap();
    }
}

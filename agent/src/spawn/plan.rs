//! The spawn plan: every step between fork and exec, in order, as data. Built by a pure function
//! from what the tenant needs, so the order that isolation depends on (join the cgroup while
//! still root, unshare before the fork into the pid namespace, mounts inside it, drop identity
//! last) is checked by unit tests without root. Everything a step needs is prepared here, before
//! the fork: the child allocates nothing.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;

/// Namespaces a tenant's engine gets: mount, pid, uts, ipc and net (only loopback).
pub const TENANT_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET;

/// Where a tenant sees its own volume, whatever the host's state directory: engine command lines
/// and configs say `{data}` and get this path. `/srv` is in every Debian base system and is
/// meant for a site's data.
pub const TENANT_DATA_PATH: &str = "/srv";

/// One step after fork. Paths and strings are NUL-terminated already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A session of its own: no controlling terminal, signals to the agent's group miss it.
    NewSession,
    /// Writes "0" to an open `cgroup.procs` (needs root: done before the identity drops).
    JoinCgroup(RawFd),
    Unshare(libc::c_int),
    /// Forks so the engine is PID 1 of the new pid namespace; the intermediate process writes the
    /// engine's PID (as the agent sees it) to `report_fd` and exits.
    ForkIntoPidNamespace {
        report_fd: RawFd,
    },
    /// Nothing mounted in the tenant's namespace propagates back to the host; unmounts on the host
    /// (another tenant's volume going) still reach it.
    MakeMountsSlave,
    /// A fresh /proc for the pid namespace: only the tenant's own processes are visible.
    MountProc,
    /// A private tmpfs (counted against the tenant's memory cgroup).
    MountTmpfs {
        target: CString,
        options: CString,
    },
    /// Binds `source` over `target`.
    Bind {
        source: CString,
        target: CString,
        /// Read-only (passwd, group), or writable (the volume); always `nosuid,nodev,noexec`.
        read_only: bool,
    },
    SetHostname(CString),
    LoopbackUp,
    SetRlimit {
        resource: libc::__rlimit_resource_t,
        soft: u64,
        hard: u64,
    },
    NoNewPrivs,
    DropSupplementaryGroups,
    SetGid(libc::gid_t),
    SetUid(libc::uid_t),
}

/// What one engine process gets.
#[derive(Debug, Clone)]
pub struct Isolation<'a> {
    pub hostname: &'a str,
    /// The tenant's mounted volume on the host, bound at `TENANT_DATA_PATH`.
    pub volume: &'a Path,
    pub uid: u32,
    pub gid: u32,
    /// Files bound over `/etc/passwd` and `/etc/group`: the tenant's own user, nobody else.
    pub passwd: &'a Path,
    pub group: &'a Path,
    /// Size of the private /tmp, in bytes.
    pub tmp_bytes: u64,
    pub max_open_files: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{what} {value:?} contains a NUL byte")]
    Nul { what: &'static str, value: String },
    #[error("uid 0 and gid 0 are not allowed for a tenant")]
    Root,
}

fn c(what: &'static str, value: &str) -> Result<CString, PlanError> {
    CString::new(value).map_err(|_| PlanError::Nul {
        what,
        value: value.to_string(),
    })
}

fn c_path(what: &'static str, path: &Path) -> Result<CString, PlanError> {
    c(what, &path.display().to_string())
}

/// The steps for an isolated engine: the order is the contract.
pub fn isolated(
    cgroup_fds: &[RawFd],
    report_fd: RawFd,
    iso: &Isolation<'_>,
) -> Result<Vec<Step>, PlanError> {
    if iso.uid == 0 || iso.gid == 0 {
        return Err(PlanError::Root);
    }
    let mut steps = vec![Step::NewSession];
    // Into the cgroup first, so every later fork (the pid namespace's init included) is inside.
    steps.extend(cgroup_fds.iter().map(|fd| Step::JoinCgroup(*fd)));
    steps.push(Step::Unshare(TENANT_NAMESPACES));
    steps.push(Step::ForkIntoPidNamespace { report_fd });
    steps.extend([
        Step::MakeMountsSlave,
        Step::MountProc,
        Step::Bind {
            source: c_path("volume", iso.volume)?,
            target: c("volume", TENANT_DATA_PATH)?,
            read_only: false,
        },
        Step::Bind {
            source: c_path("passwd", iso.passwd)?,
            target: c("passwd", "/etc/passwd")?,
            read_only: true,
        },
        Step::Bind {
            source: c_path("group", iso.group)?,
            target: c("group", "/etc/group")?,
            read_only: true,
        },
    ]);
    // After the binds: their sources must not be hidden under the new tmpfs. Each is the
    // tenant's own, in memory charged to its cgroup; nothing is shared between tenants.
    for dir in crate::host::PRIVATE_IN_TENANTS {
        steps.push(Step::MountTmpfs {
            target: c("tmp", dir)?,
            options: c("tmp", &format!("size={},mode=1777", iso.tmp_bytes))?,
        });
    }
    steps.extend([
        Step::SetHostname(c("hostname", iso.hostname)?),
        Step::LoopbackUp,
        Step::SetRlimit {
            resource: libc::RLIMIT_CORE,
            soft: 0,
            hard: 0,
        },
        Step::SetRlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: iso.max_open_files,
            hard: iso.max_open_files,
        },
        Step::NoNewPrivs,
        // Identity last: everything above needs root; after SetUid no capability is left.
        Step::DropSupplementaryGroups,
        Step::SetGid(iso.gid),
        Step::SetUid(iso.uid),
    ]);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso() -> Isolation<'static> {
        Isolation {
            hostname: "acme",
            volume: Path::new("/s/tenants/acme/data"),
            uid: 200_001,
            gid: 200_001,
            passwd: Path::new("/s/tenants/acme/passwd"),
            group: Path::new("/s/tenants/acme/group"),
            tmp_bytes: 64 << 20,
            max_open_files: 65536,
        }
    }

    fn position(steps: &[Step], pred: impl Fn(&Step) -> bool) -> usize {
        steps.iter().position(pred).expect("step present")
    }

    #[test]
    fn cgroup_before_namespaces_before_mounts_before_identity() {
        let steps = isolated(&[7, 8], 9, &iso()).unwrap();
        let join = position(&steps, |s| matches!(s, Step::JoinCgroup(_)));
        let unshare = position(&steps, |s| matches!(s, Step::Unshare(_)));
        let fork = position(&steps, |s| matches!(s, Step::ForkIntoPidNamespace { .. }));
        let private = position(&steps, |s| matches!(s, Step::MakeMountsSlave));
        let proc_ = position(&steps, |s| matches!(s, Step::MountProc));
        let nnp = position(&steps, |s| matches!(s, Step::NoNewPrivs));
        let setuid = position(&steps, |s| matches!(s, Step::SetUid(_)));
        assert!(join < unshare && unshare < fork && fork < private && private < proc_);
        assert!(proc_ < nnp && nnp < setuid);
        assert_eq!(setuid, steps.len() - 1, "the uid drops last");
        assert_eq!(
            steps
                .iter()
                .filter(|s| matches!(s, Step::JoinCgroup(_)))
                .count(),
            2
        );
    }

    #[test]
    fn every_namespace_is_asked_for() {
        let steps = isolated(&[], 9, &iso()).unwrap();
        let Some(Step::Unshare(flags)) = steps.iter().find(|s| matches!(s, Step::Unshare(_)))
        else {
            panic!("no unshare");
        };
        for ns in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWNET,
        ] {
            assert_ne!(flags & ns, 0, "namespace {ns:#x} missing");
        }
    }

    #[test]
    fn identity_and_files_are_the_tenants() {
        let steps = isolated(&[], 9, &iso()).unwrap();
        assert!(steps.contains(&Step::SetUid(200_001)));
        assert!(steps.contains(&Step::SetGid(200_001)));
        assert!(steps.contains(&Step::SetHostname(CString::new("acme").unwrap())));
        assert!(steps.contains(&Step::Bind {
            source: CString::new("/s/tenants/acme/data").unwrap(),
            target: CString::new("/srv").unwrap(),
            read_only: false,
        }));
        assert!(steps.contains(&Step::Bind {
            source: CString::new("/s/tenants/acme/passwd").unwrap(),
            target: CString::new("/etc/passwd").unwrap(),
            read_only: true,
        }));
        assert!(steps.contains(&Step::SetRlimit {
            resource: libc::RLIMIT_CORE,
            soft: 0,
            hard: 0
        }));
    }

    #[test]
    fn root_identity_and_nul_bytes_are_refused() {
        let mut root = iso();
        root.uid = 0;
        assert_eq!(isolated(&[], 9, &root).unwrap_err(), PlanError::Root);
        let mut bad = iso();
        bad.hostname = "a\0b";
        assert!(matches!(
            isolated(&[], 9, &bad).unwrap_err(),
            PlanError::Nul {
                what: "hostname",
                ..
            }
        ));
    }
}

//! The spawn plan: every step between fork and exec, in order, as data. Built by a pure function
//! from what the tenant needs, so the order that isolation depends on (join the cgroup while
//! still root, unshare before the fork into the pid namespace, build the minimal root and pivot
//! into it, drop identity, install the seccomp filter last) is checked by unit tests without
//! root. Everything a step needs is prepared here, before the fork: the child allocates nothing.
//!
//! The tenant's root is a small read-only tmpfs built in its own mount namespace (see `root`):
//! `/usr` and a few `/etc` files read-only, its volume at `/srv`, its socket directory at
//! `/run/engine`, private tmpfs at `/tmp`, `/var/tmp`, `/run` and `/dev/shm`, a `/dev` of five
//! devices, its own mqueue and `/proc`, no `/sys`. Every tmpfs is `nosuid,nodev,noexec`; programs
//! run only from `/usr`.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;

use super::root::{HostEntry, HostRoot};

/// Namespaces a tenant's engine gets: mount, pid, uts, ipc, net (only loopback) and cgroup (it
/// sees its own cgroup as the root of the hierarchy).
pub const TENANT_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

/// Where a tenant sees its own volume, whatever the host's state directory: engine command lines
/// and configs say `{data}` and get this path. `/srv` is in every Debian base system and is
/// meant for a site's data.
pub const TENANT_DATA_PATH: &str = "/srv";

/// Where a tenant sees its socket directory (`{run}`; on the host `<state_dir>/run/<tenant uid>`).
pub const TENANT_RUN_PATH: &str = "/run/engine";

/// Devices a tenant's `/dev` has, bound from the host's.
pub const TENANT_DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// How a bind mount may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write, no programs (the volume, the socket directory).
    ReadWrite,
    /// Read only, no programs (`/etc`, passwd).
    ReadOnly,
    /// Read only, programs run from it (`/usr`).
    ReadOnlyExec,
    /// A device node: read and write, device access kept.
    Device,
}

impl Access {
    /// The flags of the remount that applies the access (a bind takes only `MS_BIND` at first).
    pub fn remount_flags(self) -> libc::c_ulong {
        let base = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
        match self {
            Self::ReadWrite => base | libc::MS_NODEV | libc::MS_NOEXEC,
            Self::ReadOnly => base | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            Self::ReadOnlyExec => base | libc::MS_NODEV | libc::MS_RDONLY,
            Self::Device => base | libc::MS_NOEXEC,
        }
    }
}

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
    /// The mode of files and directories the steps create is the one they say (umask 0), and
    /// then the engine's: private files (0077).
    SetUmask(libc::mode_t),
    /// A tmpfs (counted against the tenant's memory cgroup), always `nosuid,nodev,noexec`.
    MountTmpfs {
        target: CString,
        options: CString,
    },
    /// A fresh /proc for the pid namespace: only the tenant's own processes are visible.
    MountProc {
        target: CString,
    },
    /// The ipc namespace's own POSIX message queues.
    MountMqueue {
        target: CString,
    },
    MakeDir {
        path: CString,
        mode: libc::mode_t,
    },
    /// An empty file to bind a file over.
    MakeFile {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// Binds `source` over `target` (not recursively), then applies `access`.
    Bind {
        source: CString,
        target: CString,
        access: Access,
    },
    /// Makes `new_root` the root and detaches the old one: no path leads back to the host's.
    PivotRoot {
        new_root: CString,
    },
    /// Makes a mount read-only once what it holds is in place.
    RemountReadOnly {
        target: CString,
    },
    Chdir(CString),
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
    /// Installs one compiled seccomp filter (needs `no_new_privs`, not root).
    Seccomp(Vec<seccompiler::sock_filter>),
}

/// What one engine process gets.
#[derive(Debug, Clone)]
pub struct Isolation<'a> {
    pub hostname: &'a str,
    /// An empty root-only directory on the host the new root is mounted on (in the tenant's
    /// mount namespace only).
    pub root: &'a Path,
    /// The host's programs, libraries and `/etc` files the tenant sees.
    pub host: &'a HostRoot,
    /// The tenant's mounted volume on the host, bound at `TENANT_DATA_PATH`.
    pub volume: &'a Path,
    /// The tenant's socket directory on the host, bound at `TENANT_RUN_PATH`.
    pub run: &'a Path,
    pub uid: u32,
    pub gid: u32,
    /// Files bound over `/etc/passwd` and `/etc/group`: the tenant's own user, nobody else.
    pub passwd: &'a Path,
    pub group: &'a Path,
    /// Size of each private tmpfs (/tmp, /var/tmp, /dev/shm), in bytes.
    pub tmp_bytes: u64,
    pub max_open_files: u64,
    /// Compiled seccomp filters (`seccomp::filters`), installed in order after the uid drops.
    pub seccomp: &'a [Vec<seccompiler::sock_filter>],
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

/// The steps that build the tenant's root under `iso.root` (still on the host's side).
fn root_steps(iso: &Isolation<'_>) -> Result<Vec<Step>, PlanError> {
    let root = iso.root;
    let at = |rel: &str| c_path("root", &root.join(rel));
    let dir = |rel: &str, mode| -> Result<Step, PlanError> {
        Ok(Step::MakeDir {
            path: at(rel)?,
            mode,
        })
    };
    let tmpfs = |rel: &str, size: u64, mode: &str| -> Result<Step, PlanError> {
        Ok(Step::MountTmpfs {
            target: at(rel)?,
            options: c("tmpfs", &format!("size={size},mode={mode}"))?,
        })
    };
    let bind = |source: &Path, rel: &str, access| -> Result<Step, PlanError> {
        Ok(Step::Bind {
            source: c_path("bind", source)?,
            target: at(rel)?,
            access,
        })
    };
    let mut steps = vec![tmpfs("", 1 << 20, "0755")?];
    for d in ["usr", "etc", "srv", "proc", "dev", "tmp", "var", "run"] {
        steps.push(dir(d, 0o755)?);
    }
    steps.push(bind(Path::new("/usr"), "usr", Access::ReadOnlyExec)?);
    for entry in &iso.host.top {
        steps.extend(host_entry(
            root,
            Path::new("/"),
            "",
            entry,
            Access::ReadOnlyExec,
        )?);
    }
    for entry in &iso.host.etc {
        steps.extend(host_entry(
            root,
            Path::new("/etc"),
            "etc",
            entry,
            Access::ReadOnly,
        )?);
    }
    for (source, rel) in [(iso.passwd, "etc/passwd"), (iso.group, "etc/group")] {
        steps.push(Step::MakeFile { path: at(rel)? });
        steps.push(bind(source, rel, Access::ReadOnly)?);
    }
    steps.push(bind(iso.volume, "srv", Access::ReadWrite)?);
    steps.push(Step::Symlink {
        target: c("link", "../run")?,
        link: at("var/run")?,
    });
    let tmp_mode = "1777";
    steps.push(tmpfs("tmp", iso.tmp_bytes, tmp_mode)?);
    steps.push(dir("var/tmp", 0o755)?);
    steps.push(tmpfs("var/tmp", iso.tmp_bytes, tmp_mode)?);
    // /run: root's, with /run/lock for anyone and the engine's socket directory.
    steps.push(tmpfs("run", 1 << 20, "0755")?);
    steps.push(dir("run/lock", 0o1777)?);
    steps.push(dir("run/engine", 0o755)?);
    steps.push(bind(iso.run, "run/engine", Access::ReadWrite)?);
    // /dev: five devices, the usual links, shared memory and message queues of its own.
    steps.push(tmpfs("dev", 1 << 20, "0755")?);
    for device in TENANT_DEVICES {
        let rel = format!("dev/{device}");
        steps.push(Step::MakeFile { path: at(&rel)? });
        steps.push(bind(&Path::new("/dev").join(device), &rel, Access::Device)?);
    }
    for (link, target) in [
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        steps.push(Step::Symlink {
            target: c("link", target)?,
            link: at(link)?,
        });
    }
    steps.push(dir("dev/shm", 0o755)?);
    steps.push(tmpfs("dev/shm", iso.tmp_bytes, tmp_mode)?);
    steps.push(dir("dev/mqueue", 0o755)?);
    steps.push(Step::MountMqueue {
        target: at("dev/mqueue")?,
    });
    steps.push(Step::RemountReadOnly { target: at("dev")? });
    steps.push(Step::MountProc {
        target: at("proc")?,
    });
    Ok(steps)
}

/// A host entry under `host_dir` made again at `root/rel_dir`: a link as a link, a directory or
/// file as a read-only bind.
fn host_entry(
    root: &Path,
    host_dir: &Path,
    rel_dir: &str,
    entry: &HostEntry,
    access: Access,
) -> Result<Vec<Step>, PlanError> {
    let at = |name: &str| c_path("root", &root.join(rel_dir).join(name));
    let source = |name: &str| c_path("bind", &host_dir.join(name));
    Ok(match entry {
        HostEntry::Link { name, target } => vec![Step::Symlink {
            target: c_path("link", target)?,
            link: at(name)?,
        }],
        HostEntry::Dir { name } => vec![
            Step::MakeDir {
                path: at(name)?,
                mode: 0o755,
            },
            Step::Bind {
                source: source(name)?,
                target: at(name)?,
                access,
            },
        ],
        HostEntry::File { name } => vec![
            Step::MakeFile { path: at(name)? },
            Step::Bind {
                source: source(name)?,
                target: at(name)?,
                access,
            },
        ],
    })
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
    // Into the cgroup first, so every later fork (the pid namespace's init included) is inside,
    // and the cgroup namespace (unshared next) has the tenant's cgroup as its root.
    steps.extend(cgroup_fds.iter().map(|fd| Step::JoinCgroup(*fd)));
    steps.push(Step::Unshare(TENANT_NAMESPACES));
    steps.push(Step::ForkIntoPidNamespace { report_fd });
    steps.push(Step::MakeMountsSlave);
    steps.push(Step::SetUmask(0));
    steps.extend(root_steps(iso)?);
    steps.extend([
        Step::PivotRoot {
            new_root: c_path("root", iso.root)?,
        },
        // Nothing of the root itself is writable: only the mounts on it that say so.
        Step::RemountReadOnly {
            target: c("root", "/")?,
        },
        Step::Chdir(c("cwd", TENANT_DATA_PATH)?),
        Step::SetUmask(0o077),
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
        // Identity after everything that needs root; after SetUid no capability is left.
        Step::DropSupplementaryGroups,
        Step::SetGid(iso.gid),
        Step::SetUid(iso.uid),
    ]);
    // Last: the filter denies what the steps above use (mount, unshare...).
    steps.extend(iso.seccomp.iter().cloned().map(Step::Seccomp));
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> &'static HostRoot {
        static HOST: std::sync::OnceLock<HostRoot> = std::sync::OnceLock::new();
        HOST.get_or_init(|| HostRoot {
            top: vec![HostEntry::Link {
                name: "bin".into(),
                target: "usr/bin".into(),
            }],
            etc: vec![HostEntry::File {
                name: "hosts".into(),
            }],
        })
    }

    fn iso() -> Isolation<'static> {
        Isolation {
            hostname: "acme",
            root: Path::new("/s/tenants/acme/root"),
            host: host(),
            volume: Path::new("/s/tenants/acme/data"),
            run: Path::new("/s/run/200001"),
            uid: 200_001,
            gid: 200_001,
            passwd: Path::new("/s/tenants/acme/passwd"),
            group: Path::new("/s/tenants/acme/group"),
            tmp_bytes: 64 << 20,
            max_open_files: 65536,
            seccomp: &[],
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
        let proc_ = position(&steps, |s| matches!(s, Step::MountProc { .. }));
        let pivot = position(&steps, |s| matches!(s, Step::PivotRoot { .. }));
        let nnp = position(&steps, |s| matches!(s, Step::NoNewPrivs));
        let setuid = position(&steps, |s| matches!(s, Step::SetUid(_)));
        assert!(join < unshare && unshare < fork && fork < private && private < proc_);
        assert!(proc_ < pivot && pivot < nnp && nnp < setuid);
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
    fn the_root_is_built_under_its_directory_then_pivoted_into_and_sealed() {
        let steps = isolated(&[], 9, &iso()).unwrap();
        let pivot = position(&steps, |s| matches!(s, Step::PivotRoot { .. }));
        let root = "/s/tenants/acme/root";
        // Before the pivot, everything made or mounted is under the new root.
        for step in &steps[..pivot] {
            let target = match step {
                Step::MountTmpfs { target, .. }
                | Step::MountProc { target }
                | Step::MountMqueue { target }
                | Step::Bind { target, .. }
                | Step::RemountReadOnly { target } => target,
                Step::MakeDir { path, .. } | Step::MakeFile { path } => path,
                Step::Symlink { link, .. } => link,
                _ => continue,
            };
            assert!(
                target.to_str().unwrap().starts_with(root),
                "{step:?} outside the new root"
            );
        }
        // The root itself is a fresh tmpfs, mounted first.
        assert!(
            matches!(&steps[position(&steps, |s| matches!(s, Step::MountTmpfs { .. }))],
            Step::MountTmpfs { target, .. } if target.to_str() == Ok("/s/tenants/acme/root/"))
        );
        // After the pivot: the root read-only, then the working directory is the volume.
        assert_eq!(
            steps[pivot + 1],
            Step::RemountReadOnly {
                target: CString::new("/").unwrap()
            }
        );
        assert_eq!(steps[pivot + 2], Step::Chdir(CString::new("/srv").unwrap()));
    }

    #[test]
    fn only_the_allowed_parts_of_the_host_are_bound_and_only_usr_runs_programs() {
        let steps = isolated(&[], 9, &iso()).unwrap();
        let binds: Vec<(&str, Access)> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind { source, access, .. } => Some((source.to_str().unwrap(), *access)),
                _ => None,
            })
            .collect();
        assert_eq!(
            binds,
            vec![
                ("/usr", Access::ReadOnlyExec),
                ("/etc/hosts", Access::ReadOnly),
                ("/s/tenants/acme/passwd", Access::ReadOnly),
                ("/s/tenants/acme/group", Access::ReadOnly),
                ("/s/tenants/acme/data", Access::ReadWrite),
                ("/s/run/200001", Access::ReadWrite),
                ("/dev/null", Access::Device),
                ("/dev/zero", Access::Device),
                ("/dev/full", Access::Device),
                ("/dev/random", Access::Device),
                ("/dev/urandom", Access::Device),
            ]
        );
        assert_eq!(
            Access::ReadWrite.remount_flags() & libc::MS_NOEXEC,
            libc::MS_NOEXEC
        );
        assert_eq!(Access::ReadOnlyExec.remount_flags() & libc::MS_NOEXEC, 0);
        assert_eq!(
            Access::Device.remount_flags() & libc::MS_NODEV,
            0,
            "devices need device access"
        );
        // Every tmpfs is sized.
        for s in &steps {
            if let Step::MountTmpfs { options, .. } = s {
                assert!(options.to_str().unwrap().contains("size="), "{s:?}");
            }
        }
    }

    #[test]
    fn the_seccomp_filters_come_last_after_the_identity_drops() {
        let filters = vec![
            vec![seccompiler::sock_filter {
                code: 6,
                jt: 0,
                jf: 0,
                k: 0,
            }];
            2
        ];
        let mut with_filters = iso();
        with_filters.seccomp = &filters;
        let steps = isolated(&[], 9, &with_filters).unwrap();
        let setuid = position(&steps, |s| matches!(s, Step::SetUid(_)));
        assert_eq!(steps.len(), setuid + 3);
        assert!(steps[setuid + 1..]
            .iter()
            .all(|s| matches!(s, Step::Seccomp(_))));
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
            libc::CLONE_NEWCGROUP,
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
            target: CString::new("/s/tenants/acme/root/srv").unwrap(),
            access: Access::ReadWrite,
        }));
        assert!(steps.contains(&Step::Bind {
            source: CString::new("/s/tenants/acme/passwd").unwrap(),
            target: CString::new("/s/tenants/acme/root/etc/passwd").unwrap(),
            access: Access::ReadOnly,
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

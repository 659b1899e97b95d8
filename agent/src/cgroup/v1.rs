//! The cgroup v1 driver: one directory per controller hierarchy (`cpu`, `cpuacct`, `memory`,
//! `pids`, `freezer`), each at `<root>/<controller>/<parent>/<tenant>`. Co-mounted hierarchies
//! (`cpu,cpuacct` with `cpu` a symlink) resolve to the same directory and are handled once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dormant_common::TenantName;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    keyed_value, read_file, read_pids, read_u64, remove_dir, wait_until, write_file, CgroupDriver,
    CgroupError, Limits, TenantCgroup, Usage, FREEZE_TIMEOUT,
};

/// The controllers a tenant's cgroup uses on v1.
const CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// CFS period; the quota is the tenant's share of it.
const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct V1Driver {
    root: PathBuf,
    parent: PathBuf,
}

impl V1Driver {
    /// `root` is where the hierarchies are mounted (`/sys/fs/cgroup`), `parent` the path inside
    /// each hierarchy that the agent owns (`dormant/tenants`).
    pub fn new(root: &Path, parent: &Path) -> Result<Self, CgroupError> {
        // The agent kills and removes cgroups below its parent: it must be a subtree of its own,
        // never a hierarchy's root (where other software's cgroups live).
        if parent.as_os_str().is_empty()
            || !parent
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(CgroupError::Unavailable(format!(
                "cgroup_parent {:?}: must be a relative path below the cgroup root, without '..'",
                parent.display().to_string()
            )));
        }
        for controller in CONTROLLERS {
            if !root.join(controller).join("cgroup.procs").exists() {
                return Err(CgroupError::MissingController {
                    controller,
                    root: root.to_path_buf(),
                    hint: "this host has no v1 hierarchy for it; on a unified (cgroup2) host use --cgroup-driver v2 or auto",
                });
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            parent: parent.to_path_buf(),
        })
    }
}

impl CgroupDriver for V1Driver {
    fn name(&self) -> &'static str {
        "v1"
    }

    fn tenant(&self, name: &TenantName) -> Box<dyn TenantCgroup> {
        let dir = |c: &str| self.root.join(c).join(&self.parent).join(name.as_str());
        Box::new(V1Cgroup {
            cpu: dir("cpu"),
            cpuacct: dir("cpuacct"),
            memory: dir("memory"),
            pids: dir("pids"),
            freezer: dir("freezer"),
        })
    }

    fn tenant_names(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = std::collections::BTreeSet::new();
        for controller in ["cpu", "cpuacct", "memory", "pids", "freezer"] {
            names.extend(super::child_dirs(
                &self.root.join(controller).join(&self.parent),
            )?);
        }
        Ok(names.into_iter().collect())
    }
}

#[derive(Debug, Clone)]
pub struct V1Cgroup {
    cpu: PathBuf,
    cpuacct: PathBuf,
    memory: PathBuf,
    pids: PathBuf,
    freezer: PathBuf,
}

impl V1Cgroup {
    /// Each distinct directory once (co-mounted controllers share one).
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        for d in [
            &self.cpu,
            &self.cpuacct,
            &self.memory,
            &self.pids,
            &self.freezer,
        ] {
            let canonical = std::fs::canonicalize(d).ok();
            let dup = dirs.iter().any(|seen| {
                *seen == d.as_path()
                    || (canonical.is_some() && std::fs::canonicalize(seen).ok() == canonical)
            });
            if !dup {
                dirs.push(d);
            }
        }
        dirs
    }
}

impl TenantCgroup for V1Cgroup {
    fn create(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            std::fs::create_dir_all(dir).map_err(|source| CgroupError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        write_file(
            &self.cpu.join("cpu.cfs_period_us"),
            &CFS_PERIOD_US.to_string(),
        )?;
        let quota = (limits.milli_cpu.saturating_mul(CFS_PERIOD_US) / 1000).max(1000);
        write_file(&self.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        // memory+swap must stay >= memory: when lowering, set memory first; when raising,
        // memory+swap first. Trying one order and then the other covers both.
        let mem = limits.memory_bytes.to_string();
        let limit = self.memory.join("memory.limit_in_bytes");
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            if write_file(&limit, &mem).is_err() {
                write_file(&memsw, &mem)?;
                write_file(&limit, &mem)?;
            } else {
                write_file(&memsw, &mem)?;
            }
        } else {
            write_file(&limit, &mem)?;
        }
        // Without swap accounting, at least make the kernel avoid swapping the tenant out.
        let swappiness = self.memory.join("memory.swappiness");
        if swappiness.exists() {
            let _ = write_file(&swappiness, "0");
        }
        write_file(&self.pids.join("pids.max"), &limits.pids_max.to_string())?;
        Ok(())
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.pids.join("cgroup.procs"))
    }

    fn usage(&self) -> Result<Usage, CgroupError> {
        let oom_control = read_file(&self.memory.join("memory.oom_control"))?;
        let oom_kills = oom_control
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // cpu.stat: nr_throttled, throttled_time (ns). Missing on old kernels: report zero.
        let cpu_stat = read_file(&self.cpu.join("cpu.stat")).unwrap_or_default();
        Ok(Usage {
            cpu_usage_usec: read_u64(&self.cpuacct.join("cpuacct.usage"))? / 1000,
            cpu_throttled_usec: keyed_value(&cpu_stat, "throttled_time").unwrap_or(0) / 1000,
            cpu_nr_throttled: keyed_value(&cpu_stat, "nr_throttled").unwrap_or(0),
            memory_bytes: read_u64(&self.memory.join("memory.usage_in_bytes"))?,
            pids: read_u64(&self.pids.join("pids.current"))?,
            oom_kills,
            pressure: None,
        })
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        // Freeze first so a fork bomb cannot outrun the kills, then kill, then thaw so the
        // SIGKILLs are delivered.
        let freezer_state = self.freezer.join("freezer.state");
        let frozen = freezer_state.exists() && write_file(&freezer_state, "FROZEN").is_ok();
        for _ in 0..100 {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if frozen {
                let _ = write_file(&freezer_state, "THAWED");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(CgroupError::NotEmpty {
            path: self.pids.clone(),
            pids: self.pids()?,
        })
    }

    fn freeze(&self) -> Result<(), CgroupError> {
        let state = self.freezer.join("freezer.state");
        write_file(&state, "FROZEN")?;
        // The kernel says FREEZING until every task has stopped.
        wait_until(&state, "freeze", FREEZE_TIMEOUT, || {
            Ok(read_file(&state)?.trim() == "FROZEN")
        })
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        let state = self.freezer.join("freezer.state");
        write_file(&state, "THAWED")?;
        wait_until(&state, "thaw", FREEZE_TIMEOUT, || {
            Ok(read_file(&state)?.trim() == "THAWED")
        })
    }

    fn reclaim_memory(&self) -> Result<(), CgroupError> {
        // Only allowed (and only meaningful) once no task is left in the cgroup.
        write_file(&self.memory.join("memory.force_empty"), "0")
    }

    fn delete(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            remove_dir(dir)?;
        }
        Ok(())
    }

    fn display_path(&self) -> PathBuf {
        self.memory.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake v1 tree in a TempDir: controller directories with the files the driver touches.
    struct FakeV1 {
        dir: tempfile::TempDir,
    }

    impl FakeV1 {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for c in CONTROLLERS {
                std::fs::create_dir_all(dir.path().join(c)).unwrap();
                std::fs::write(dir.path().join(c).join("cgroup.procs"), "").unwrap();
            }
            Self { dir }
        }

        fn tenant_dir(&self, controller: &str) -> PathBuf {
            self.dir
                .path()
                .join(controller)
                .join("dormant/tenants/acme")
        }
    }

    #[test]
    fn v1_limits_are_written_to_each_controller() {
        let fake = FakeV1::new();
        let driver = V1Driver::new(fake.dir.path(), Path::new("dormant/tenants")).unwrap();
        let cg = driver.tenant(&TenantName::parse("acme").unwrap());
        cg.create().unwrap();
        cg.apply(&Limits {
            milli_cpu: 500,
            memory_bytes: 512 << 20,
            pids_max: 128,
        })
        .unwrap();
        let read = |c: &str, f: &str| std::fs::read_to_string(fake.tenant_dir(c).join(f)).unwrap();
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (512u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "128");
        assert_eq!(cg.procs_files().len(), 5);
    }

    #[test]
    fn v1_missing_controller_is_named() {
        let fake = FakeV1::new();
        std::fs::remove_dir_all(fake.dir.path().join("pids")).unwrap();
        let err = V1Driver::new(fake.dir.path(), Path::new("dormant/tenants")).unwrap_err();
        assert!(err.to_string().contains("controller pids"), "{err}");
    }

    /// The hierarchies' roots hold other software's cgroups: never the agent's parent.
    #[test]
    fn v1_refuses_a_parent_that_is_a_root_or_climbs_out() {
        let fake = FakeV1::new();
        for bad in ["", "/abs", "a/../..", "."] {
            let err = V1Driver::new(fake.dir.path(), Path::new(bad)).unwrap_err();
            assert!(err.to_string().contains("cgroup_parent"), "{bad}: {err}");
        }
    }

    #[test]
    fn v1_usage_reads_counters() {
        let fake = FakeV1::new();
        let driver = V1Driver::new(fake.dir.path(), Path::new("dormant/tenants")).unwrap();
        let cg = driver.tenant(&TenantName::parse("acme").unwrap());
        cg.create().unwrap();
        std::fs::write(
            fake.tenant_dir("cpuacct").join("cpuacct.usage"),
            "2500000\n",
        )
        .unwrap();
        std::fs::write(
            fake.tenant_dir("memory").join("memory.usage_in_bytes"),
            "4096\n",
        )
        .unwrap();
        std::fs::write(
            fake.tenant_dir("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        std::fs::write(fake.tenant_dir("pids").join("pids.current"), "7\n").unwrap();
        let usage = cg.usage().unwrap();
        assert_eq!(
            usage,
            Usage {
                cpu_usage_usec: 2500,
                memory_bytes: 4096,
                pids: 7,
                oom_kills: 3,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn v1_cpu_quota_has_a_floor_of_one_percent() {
        let fake = FakeV1::new();
        let driver = V1Driver::new(fake.dir.path(), Path::new("p")).unwrap();
        let cg = driver.tenant(&TenantName::parse("acme").unwrap());
        cg.create().unwrap();
        cg.apply(&Limits {
            milli_cpu: 1,
            memory_bytes: 1 << 20,
            pids_max: 1,
        })
        .unwrap();
        let quota =
            std::fs::read_to_string(fake.dir.path().join("cpu/p/acme/cpu.cfs_quota_us")).unwrap();
        assert_eq!(quota, "1000");
    }
}

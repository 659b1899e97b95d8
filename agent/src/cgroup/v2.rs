//! The cgroup v2 (unified) driver, following the kernel's delegation rules: tenants live at
//! `<root>/<parent>/<tenant>` in a subtree the agent owns; `cpu`, `memory` and `pids` are enabled
//! in `cgroup.subtree_control` of every cgroup along the path; no process ever sits in an inner
//! cgroup (if the agent's own cgroup is on the path, as with a systemd unit whose delegated
//! subtree holds the tenants, the agent first moves itself into the leaf `<own>/agent`).

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use dormant_common::TenantName;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    keyed_value, read_file, read_pids, read_u64, remove_dir, wait_until, write_file, CgroupDriver,
    CgroupError, Limits, Pressure, TenantCgroup, Usage, FREEZE_TIMEOUT,
};

/// The controllers every tenant cgroup needs.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// CFS period; the quota in `cpu.max` is the tenant's share of it.
const CPU_PERIOD_US: u64 = 100_000;

/// The leaf the agent moves itself into when its own cgroup is an inner node of the tenants' path.
const AGENT_LEAF: &str = "agent";

#[derive(Debug, Clone)]
pub struct V2Driver {
    root: PathBuf,
    parent: PathBuf,
}

impl V2Driver {
    /// Prepares `<root>/<parent>` for tenants: checks the controllers, enables them along the
    /// path and, if needed, moves the agent out of an inner cgroup. Fails before changing anything
    /// when the host cannot provide what is needed.
    pub fn new(root: &Path, parent: &Path) -> Result<Self, CgroupError> {
        let own = own_cgroup()?;
        Self::prepare(root, parent, &own, std::process::id())
    }

    /// `new` with the agent's own cgroup (relative to `root`) and PID given, for tests on a
    /// directory tree laid out like cgroupfs v2.
    pub fn prepare(root: &Path, parent: &Path, own: &Path, pid: u32) -> Result<Self, CgroupError> {
        if !root.join("cgroup.controllers").exists() {
            return Err(CgroupError::Unavailable(format!(
                "{} is not a cgroup2 (unified) mount: it has no cgroup.controllers; on a cgroup v1 \
                 host use --cgroup-driver v1 (or auto)",
                root.display()
            )));
        }
        if parent.as_os_str().is_empty()
            || !parent
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(CgroupError::Unavailable(format!(
                "cgroup_parent {:?}: must be a relative path below the cgroup root, without '..'",
                parent.display().to_string()
            )));
        }
        let available = controllers(&root.join("cgroup.controllers"))?;
        for controller in CONTROLLERS {
            if !available.iter().any(|c| c == controller) {
                return Err(CgroupError::MissingController {
                    controller,
                    root: root.to_path_buf(),
                    hint: "it is not in cgroup.controllers; enable it in the kernel (cgroup_enable= on \
                           the kernel command line) or in the parent's cgroup.subtree_control",
                });
            }
        }

        if own.as_os_str() != "" && parent == own {
            return Err(CgroupError::Unavailable(format!(
                "cgroup_parent {:?} is the agent's own cgroup; use a child of it, such as {:?}",
                parent.display().to_string(),
                own.join("tenants").display().to_string()
            )));
        }
        // The agent may not stay in a cgroup that is about to delegate controllers to children.
        if own.as_os_str() != "" && parent.starts_with(own) {
            let leaf = root.join(own).join(AGENT_LEAF);
            std::fs::create_dir_all(&leaf).map_err(|source| CgroupError::Io {
                path: leaf.clone(),
                source,
            })?;
            write_file(&leaf.join("cgroup.procs"), &pid.to_string())?;
        }

        // Enable the controllers from the root down to the parent, creating each level.
        let mut dir = root.to_path_buf();
        let mut levels = vec![dir.clone()];
        for part in parent.components() {
            dir.push(part);
            levels.push(dir.clone());
        }
        for (i, level) in levels.iter().enumerate() {
            if i > 0 {
                std::fs::create_dir_all(level).map_err(|e| {
                    CgroupError::Unavailable(format!(
                        "cannot create {}: {e}; the agent needs write access to its subtree (run it \
                         as root, with Delegate=yes under systemd)",
                        level.display()
                    ))
                })?;
            }
            enable_controllers(level)?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            parent: parent.to_path_buf(),
        })
    }
}

/// The agent's own cgroup, relative to the v2 mount (`/proc/self/cgroup`'s `0::/path` line).
pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let content = read_file(path)?;
    content
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim().trim_start_matches('/')))
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_path_buf(),
            content,
        })
}

fn controllers(path: &Path) -> Result<Vec<String>, CgroupError> {
    Ok(read_file(path)?
        .split_whitespace()
        .map(|c| c.trim_start_matches('+').to_string())
        .collect())
}

/// Makes `cpu memory pids` available to the children of `dir`.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    // The kernel creates this file with every cgroup; if it is missing (a directory tree that is
    // not cgroupfs), the write below fails and says so.
    let enabled = match controllers(&control) {
        Ok(enabled) => enabled,
        Err(CgroupError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !enabled.iter().any(|e| e == c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&control, &value).map_err(|e| {
        let procs = read_pids(&dir.join("cgroup.procs")).unwrap_or_default();
        let why = if e.raw_os_error() == Some(nix::libc::EBUSY) {
            format!(
                "cgroup v2 lets only cgroups without processes delegate controllers, and it holds \
                 {procs:?}; choose a cgroup_parent outside any service's cgroup, or give the agent \
                 its own delegated subtree"
            )
        } else {
            "the agent needs write access to its subtree (root, or Delegate=yes under systemd) and \
             the controllers must be enabled in the parent's cgroup.subtree_control"
                .to_string()
        };
        CgroupError::Unavailable(format!(
            "cannot enable {value} in {}: {e}; {why}",
            control.display()
        ))
    })
}

impl CgroupDriver for V2Driver {
    fn name(&self) -> &'static str {
        "v2"
    }

    fn tenant(&self, name: &TenantName) -> Box<dyn TenantCgroup> {
        Box::new(V2Cgroup {
            dir: self.root.join(&self.parent).join(name.as_str()),
        })
    }

    fn tenant_names(&self) -> Result<Vec<String>, CgroupError> {
        super::child_dirs(&self.root.join(&self.parent))
    }
}

#[derive(Debug, Clone)]
pub struct V2Cgroup {
    dir: PathBuf,
}

impl V2Cgroup {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn events_say(&self, key: &str, value: u64) -> Result<bool, CgroupError> {
        Ok(keyed_value(&read_file(&self.file("cgroup.events"))?, key) == Some(value))
    }
}

/// The `total=` of the `some` or `full` line of a PSI file.
fn pressure_total(content: &str, kind: &str) -> u64 {
    content
        .lines()
        .find(|l| l.starts_with(kind))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl TenantCgroup for V2Cgroup {
    fn create(&self) -> Result<(), CgroupError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| CgroupError::Io {
            path: self.dir.clone(),
            source,
        })
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        let quota = (limits.milli_cpu.saturating_mul(CPU_PERIOD_US) / 1000).max(1000);
        write_file(&self.file("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        write_file(&self.file("memory.max"), &limits.memory_bytes.to_string())?;
        // Swap off: a tenant over its memory is OOM-killed, it does not slow the host by swapping.
        // The file exists only with swap accounting in the kernel.
        let swap = self.file("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
        write_file(&self.file("pids.max"), &limits.pids_max.to_string())?;
        Ok(())
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.file("cgroup.procs")]
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.file("cgroup.procs"))
    }

    fn usage(&self) -> Result<Usage, CgroupError> {
        let cpu_stat = read_file(&self.file("cpu.stat"))?;
        let memory_events = read_file(&self.file("memory.events"))?;
        // PSI can be compiled out or disabled (psi=0); then there is nothing to report.
        let psi = |name: &str| read_file(&self.file(name)).ok();
        let pressure = match (
            psi("cpu.pressure"),
            psi("memory.pressure"),
            psi("io.pressure"),
        ) {
            (Some(cpu), Some(memory), Some(io)) => Some(Pressure {
                cpu_some_usec: pressure_total(&cpu, "some"),
                memory_some_usec: pressure_total(&memory, "some"),
                memory_full_usec: pressure_total(&memory, "full"),
                io_some_usec: pressure_total(&io, "some"),
                io_full_usec: pressure_total(&io, "full"),
            }),
            _ => None,
        };
        Ok(Usage {
            cpu_usage_usec: keyed_value(&cpu_stat, "usage_usec").unwrap_or(0),
            cpu_throttled_usec: keyed_value(&cpu_stat, "throttled_usec").unwrap_or(0),
            cpu_nr_throttled: keyed_value(&cpu_stat, "nr_throttled").unwrap_or(0),
            memory_bytes: read_u64(&self.file("memory.current"))?,
            pids: read_u64(&self.file("pids.current"))?,
            oom_kills: keyed_value(&memory_events, "oom_kill").unwrap_or(0),
            pressure,
        })
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let kill_file = self.file("cgroup.kill");
        if kill_file.exists() {
            // Linux 5.14+: the kernel kills every process at once, forks in flight included.
            write_file(&kill_file, "1")?;
        } else {
            // Older kernels: freeze so a fork bomb cannot outrun the kills, kill, thaw to deliver.
            let _ = write_file(&self.file("cgroup.freeze"), "1");
            for pid in self.pids()? {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = write_file(&self.file("cgroup.freeze"), "0");
        }
        for _ in 0..250 {
            if self.pids()?.is_empty() {
                return Ok(());
            }
            if !kill_file.exists() {
                for pid in self.pids()? {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(CgroupError::NotEmpty {
            path: self.dir.clone(),
            pids: self.pids()?,
        })
    }

    fn freeze(&self) -> Result<(), CgroupError> {
        write_file(&self.file("cgroup.freeze"), "1")?;
        wait_until(&self.dir, "freeze", FREEZE_TIMEOUT, || {
            self.events_say("frozen", 1)
        })
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        write_file(&self.file("cgroup.freeze"), "0")?;
        wait_until(&self.dir, "thaw", FREEZE_TIMEOUT, || {
            self.events_say("frozen", 0)
        })
    }

    fn reclaim_memory(&self) -> Result<(), CgroupError> {
        // `memory.reclaim` (Linux 5.19) takes how much to reclaim: all of what is charged.
        let file = self.file("memory.reclaim");
        if !file.exists() {
            return Ok(());
        }
        let current = read_u64(&self.file("memory.current"))?;
        if current == 0 {
            return Ok(());
        }
        // It answers EAGAIN when it could not reclaim all of it; what it did reclaim stays so.
        match write_file(&file, &current.to_string()) {
            Ok(()) => Ok(()),
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(nix::libc::EAGAIN) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn delete(&self) -> Result<(), CgroupError> {
        remove_dir(&self.dir)
    }

    fn display_path(&self) -> PathBuf {
        self.dir.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake of cgroupfs v2 in a TempDir: the root's interface files, and the files the kernel
    /// would create in each new cgroup written by `add_cgroup_files`. Named as the fake it is; the
    /// real kernel is exercised by the e2e tests in the v2 VM.
    struct FakeCgroupfsV2 {
        dir: tempfile::TempDir,
    }

    impl FakeCgroupfsV2 {
        fn new(controllers: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self::add_cgroup_files(dir.path(), controllers);
            Self { dir }
        }

        fn add_cgroup_files(dir: &Path, controllers: &str) {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
            std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
            std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.root().join(rel)).unwrap()
        }
    }

    fn acme() -> TenantName {
        TenantName::parse("acme").unwrap()
    }

    #[test]
    fn v2_enables_controllers_along_the_path_and_writes_limits() {
        let fake = FakeCgroupfsV2::new("cpuset cpu io memory pids");
        let driver =
            V2Driver::prepare(fake.root(), Path::new("dormant/tenants"), Path::new(""), 1).unwrap();
        for level in ["", "dormant/", "dormant/tenants/"] {
            assert_eq!(
                fake.read(&format!("{level}cgroup.subtree_control")),
                "+cpu +memory +pids",
                "at {level:?}"
            );
        }
        let cg = driver.tenant(&acme());
        cg.create().unwrap();
        std::fs::write(
            fake.root().join("dormant/tenants/acme/memory.swap.max"),
            "max",
        )
        .unwrap();
        cg.apply(&Limits {
            milli_cpu: 250,
            memory_bytes: 256 << 20,
            pids_max: 64,
        })
        .unwrap();
        assert_eq!(fake.read("dormant/tenants/acme/cpu.max"), "25000 100000");
        assert_eq!(
            fake.read("dormant/tenants/acme/memory.max"),
            (256u64 << 20).to_string()
        );
        assert_eq!(fake.read("dormant/tenants/acme/memory.swap.max"), "0");
        assert_eq!(fake.read("dormant/tenants/acme/pids.max"), "64");
        assert_eq!(
            cg.procs_files(),
            vec![fake.root().join("dormant/tenants/acme/cgroup.procs")]
        );
    }

    #[test]
    fn v2_already_enabled_controllers_are_left_alone() {
        let fake = FakeCgroupfsV2::new("cpu memory pids");
        std::fs::write(
            fake.root().join("cgroup.subtree_control"),
            "cpu memory pids io",
        )
        .unwrap();
        V2Driver::prepare(fake.root(), Path::new("t"), Path::new(""), 1).unwrap();
        assert_eq!(fake.read("cgroup.subtree_control"), "cpu memory pids io");
    }

    #[test]
    fn v2_missing_controller_is_named_and_nothing_is_created() {
        let fake = FakeCgroupfsV2::new("cpu memory");
        let err = V2Driver::prepare(fake.root(), Path::new("dormant/tenants"), Path::new(""), 1)
            .unwrap_err();
        assert!(err.to_string().contains("controller pids"), "{err}");
        assert!(!fake.root().join("dormant").exists());
    }

    #[test]
    fn v2_refuses_a_v1_root_and_a_parent_that_climbs_out() {
        let not_v2 = tempfile::tempdir().unwrap();
        let err = V2Driver::prepare(not_v2.path(), Path::new("d"), Path::new(""), 1).unwrap_err();
        assert!(err.to_string().contains("not a cgroup2"), "{err}");
        assert!(err.to_string().contains("--cgroup-driver v1"), "{err}");

        let fake = FakeCgroupfsV2::new("cpu memory pids");
        for bad in ["../escape", "/abs", ""] {
            let err = V2Driver::prepare(fake.root(), Path::new(bad), Path::new(""), 1).unwrap_err();
            assert!(err.to_string().contains("cgroup_parent"), "{bad}: {err}");
        }
    }

    #[test]
    fn v2_agent_in_an_inner_cgroup_moves_itself_into_a_leaf_first() {
        let fake = FakeCgroupfsV2::new("cpu memory pids");
        let own = Path::new("system.slice/dormant-agent.service");
        FakeCgroupfsV2::add_cgroup_files(&fake.root().join(own), "cpu memory pids");
        V2Driver::prepare(fake.root(), &own.join("tenants"), own, 4242).unwrap();
        assert_eq!(
            fake.read("system.slice/dormant-agent.service/agent/cgroup.procs"),
            "4242"
        );
        assert_eq!(
            fake.read("system.slice/dormant-agent.service/cgroup.subtree_control"),
            "+cpu +memory +pids"
        );
    }

    #[test]
    fn v2_tenants_directly_in_the_agents_own_cgroup_are_refused() {
        let fake = FakeCgroupfsV2::new("cpu memory pids");
        let own = Path::new("system.slice/dormant-agent.service");
        FakeCgroupfsV2::add_cgroup_files(&fake.root().join(own), "cpu memory pids");
        let err = V2Driver::prepare(fake.root(), own, own, 4242).unwrap_err();
        assert!(
            err.to_string().contains("is the agent's own cgroup"),
            "{err}"
        );
        assert!(!fake.root().join(own).join("agent").exists());
    }

    #[test]
    fn v2_agent_outside_the_tenants_path_stays_where_it_is() {
        let fake = FakeCgroupfsV2::new("cpu memory pids");
        let own = Path::new("system.slice/dormant-agent.service");
        FakeCgroupfsV2::add_cgroup_files(&fake.root().join(own), "cpu memory pids");
        V2Driver::prepare(fake.root(), Path::new("dormant/tenants"), own, 4242).unwrap();
        assert!(!fake.root().join(own).join("agent").exists());
    }

    #[test]
    fn v2_usage_reads_cpu_memory_pids_oom_and_pressure() {
        let fake = FakeCgroupfsV2::new("cpu memory pids");
        let driver = V2Driver::prepare(fake.root(), Path::new("p"), Path::new(""), 1).unwrap();
        let cg = driver.tenant(&acme());
        cg.create().unwrap();
        let write =
            |f: &str, v: &str| std::fs::write(fake.root().join("p/acme").join(f), v).unwrap();
        write(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 900\n",
        );
        write("memory.current", "8192\n");
        write(
            "memory.events",
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
        );
        write("pids.current", "6\n");
        write(
            "cpu.pressure",
            "some avg10=1.00 avg60=0.50 avg300=0.10 total=777\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=5\n",
        );
        write(
            "memory.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=11\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
        );
        write(
            "io.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=3\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=2\n",
        );
        assert_eq!(
            cg.usage().unwrap(),
            Usage {
                cpu_usage_usec: 1500,
                cpu_throttled_usec: 900,
                cpu_nr_throttled: 4,
                memory_bytes: 8192,
                pids: 6,
                oom_kills: 2,
                pressure: Some(Pressure {
                    cpu_some_usec: 777,
                    memory_some_usec: 11,
                    memory_full_usec: 7,
                    io_some_usec: 3,
                    io_full_usec: 2,
                }),
            }
        );
    }

    #[test]
    fn v2_freeze_waits_for_the_kernel_to_report_frozen() {
        let fake = FakeCgroupfsV2::new("cpu memory pids");
        let driver = V2Driver::prepare(fake.root(), Path::new("p"), Path::new(""), 1).unwrap();
        let cg = driver.tenant(&acme());
        cg.create().unwrap();
        let events = fake.root().join("p/acme/cgroup.events");
        std::fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        // The "kernel" reports frozen a little later.
        let later = {
            let events = events.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                std::fs::write(events, "populated 1\nfrozen 1\n").unwrap();
            })
        };
        cg.freeze().unwrap();
        later.join().unwrap();
        assert_eq!(fake.read("p/acme/cgroup.freeze"), "1");
    }
}

//! Child processes and tenant cgroups owned by a test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ProcGuard {
    child: Option<Child>,
    pub log: PathBuf,
}

impl ProcGuard {
    pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Self {
        Self::spawn_with_env(bin, args, log, &[])
    }

    /// `spawn` with extra environment variables (the crash tests arm crash points this way).
    pub fn spawn_with_env(
        bin: &Path,
        args: &[String],
        log: &Path,
        env: &[(String, String)],
    ) -> Self {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .env("RUST_LOG", "info,openraft=warn,dormant_scheduler=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Self {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .expect("running child")
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout`, then SIGKILL.
    pub fn stop(&mut self, timeout: Duration) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status once the process has exited (reaped), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The v1 hierarchies the agent uses.
pub const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// Kills every process in the test's tenant cgroups (by PID, read from `cgroup.procs`) and
/// removes the cgroups, deepest first, on v1 (each hierarchy) or v2 (the one tree). For cleanup
/// after a test, pass or fail.
pub fn remove_cgroup_subtree(root: &Path, parent: &Path) {
    let unified = crate::CgroupVersion::of_host() == crate::CgroupVersion::V2;
    let pids_dir = if unified {
        root.join(parent)
    } else {
        root.join("pids").join(parent)
    };
    for _ in 0..50 {
        let pids = pids_under(&pids_dir);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bases: Vec<std::path::PathBuf> = if unified {
        vec![root.to_path_buf()]
    } else {
        V1_CONTROLLERS.iter().map(|c| root.join(c)).collect()
    };
    for base in bases {
        remove_dirs_deepest_first(&base.join(parent));
        // Also the shared top directory (parent is "<top>/<test>"), once no test uses it.
        if let Some(top) = parent.iter().next() {
            let _ = std::fs::remove_dir(base.join(top));
        }
    }
}

/// PIDs in every `cgroup.procs` under `dir`.
pub fn pids_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return pids;
    };
    if let Ok(content) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(content.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for e in entries.flatten() {
        if e.path().is_dir() {
            pids.extend(pids_under(&e.path()));
        }
    }
    pids
}

fn remove_dirs_deepest_first(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_dirs_deepest_first(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Whether a process with this PID exists (zombies count as gone).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Unmounts every mount under `dir` (deepest first) and detaches every loop device whose backing
/// file is under `dir`: tenant volumes a test left behind, pass or fail.
pub fn remove_mounts_and_loops(dir: &Path) {
    let prefix = dir.display().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for dev in devices.flatten() {
        let name = dev.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing =
            std::fs::read_to_string(dev.path().join("loop/backing_file")).unwrap_or_default();
        if backing.trim().starts_with(&prefix) {
            let _ = Command::new("losetup")
                .args(["--detach", &format!("/dev/{name}")])
                .status();
        }
    }
}

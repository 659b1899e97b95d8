//! Taking a test's host state apart after it, pass or fail: the processes in its tenant cgroups
//! and the cgroups themselves (in every hierarchy), the mounts under its state directory and the
//! loop devices behind its tenants' volumes. A full run of the suite must leave the host as it
//! found it; `scripts/host-leftovers` checks that around the whole suite.
//!
//! Loop devices are the subtle part. The agent attaches each image through the state directory's
//! `tenants` mount (a bind mount of the directory onto itself), and the kernel names a loop
//! device's backing file by its path through that mount. Once the mount is detached (a lazy
//! unmount), the name becomes relative to the detached mount (`/acme/volume.img`), so a device
//! can no longer be recognised by its path. The devices are therefore collected first, while
//! their paths still say whose they are, and detached by that list after the volumes are
//! unmounted.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::process::{pids_under, V1_CONTROLLERS};

/// One line of `/proc/self/mountinfo`, the fields the cleanup needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// The mounts of this process's mount namespace (the host's: tests run there).
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            // "36 35 98:0 /root /mount/point opts [optional...] - fstype source superopts"
            let (before, after) = line.split_once(" - ")?;
            let mount_point = unescape_octal(before.split(' ').nth(4)?);
            let mut after = after.split(' ');
            let fstype = after.next()?.to_string();
            let source = unescape_octal(after.next().unwrap_or_default());
            Some(MountEntry {
                mount_point,
                fstype,
                source,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is `dir` or below it (whole components: `/a/bc` is not under `/a/b`).
fn is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `dir` as given and as the kernel spells it (the agent canonicalises its state directory, so
/// its mounts and backing files are named by the canonical path).
fn spellings(dir: &Path) -> Vec<String> {
    let mut out = vec![dir.display().to_string()];
    if let Ok(canonical) = std::fs::canonicalize(dir) {
        let canonical = canonical.display().to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    out
}

/// An attached loop device as `losetup --list --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub name: String,
    /// The backing file's path as the kernel names it now: relative to its mount, and with
    /// " (deleted)" once the file is unlinked.
    pub back_file: String,
    /// The backing file's filesystem (`major:minor`) and inode: who the device belongs to, also
    /// after the path stopped saying so.
    pub back_dev: String,
    pub back_ino: u64,
    /// A detach was asked while the device was busy: the kernel frees it with its last user.
    pub autoclear: bool,
}

impl LoopDevice {
    /// The backing file's path without the " (deleted)" the kernel appends to unlinked files.
    pub fn back_path(&self) -> &str {
        self.back_file
            .strip_suffix(" (deleted)")
            .unwrap_or(&self.back_file)
    }

    /// The same device still backed by the same file: loop numbers are reused at once (say by a
    /// parallel test's agent), so a number alone does not say which device it is.
    fn same_as(&self, other: &LoopDevice) -> bool {
        self.name == other.name
            && self.back_dev == other.back_dev
            && self.back_ino == other.back_ino
    }
}

/// Every attached loop device on the host (empty if `losetup` cannot be run).
pub fn loop_devices() -> Vec<LoopDevice> {
    let out = Command::new("losetup")
        .args([
            "--list",
            "--json",
            "--output",
            "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,AUTOCLEAR",
        ])
        .output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "cleanup: losetup --list failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Vec::new();
        }
        Err(e) => {
            eprintln!("cleanup: cannot run losetup: {e}");
            return Vec::new();
        }
    };
    // No device at all prints nothing rather than an empty list.
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.trim().to_string(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    json["loopdevices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| LoopDevice {
            name: text(&d["name"]),
            back_file: text(&d["back-file"]),
            back_dev: text(&d["back-maj:min"]),
            back_ino: text(&d["back-ino"]).parse().unwrap_or(0),
            // util-linux writes booleans in JSON; older versions wrote "0"/"1".
            autoclear: matches!(text(&d["autoclear"]).as_str(), "true" | "1"),
        })
        .collect()
}

/// `(filesystem, inode)` of every regular file under `dir`, without descending into other
/// filesystems (the tenants' mounted volumes hold their data, not images).
fn file_ids_under(dir: &Path) -> HashSet<(String, u64)> {
    let mut ids = HashSet::new();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return ids;
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(md) = entry.metadata() else { continue };
            if md.is_dir() && md.dev() == top.dev() {
                stack.push(entry.path());
            } else if md.is_file() {
                let dev = md.dev();
                let id = format!(
                    "{}:{}",
                    nix::sys::stat::major(dev),
                    nix::sys::stat::minor(dev)
                );
                ids.insert((id, md.ino()));
            }
        }
    }
    ids
}

/// Unmounts every mount under any of `dirs`, deepest first, until none is left or a pass changes
/// nothing. With `lazy`, a busy mount is detached (`MNT_DETACH`) instead of being left.
fn unmount_under(dirs: &[String], lazy: bool) {
    for _ in 0..10 {
        let mut targets: Vec<String> = mounts()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|m| dirs.iter().any(|d| is_under(m, d)))
            .collect();
        if targets.is_empty() {
            return;
        }
        targets.sort_by_key(|m| std::cmp::Reverse((m.matches('/').count(), m.len())));
        targets.dedup();
        let mut progress = false;
        for target in targets {
            progress |= match umount2(target.as_str(), MntFlags::empty()) {
                // Not a mount point any more: an unmount above propagated to it.
                Ok(()) | Err(Errno::EINVAL) => true,
                Err(Errno::EBUSY) if lazy => umount2(target.as_str(), MntFlags::MNT_DETACH).is_ok(),
                Err(_) => false,
            };
        }
        if !progress {
            return;
        }
    }
}

/// Detaches `device` if it is still the same device (see [`LoopDevice::same_as`]).
fn detach(device: &LoopDevice) {
    if !loop_devices().iter().any(|d| d.same_as(device)) {
        return;
    }
    let out = Command::new("losetup")
        .args(["--detach", &device.name])
        .output();
    if let Ok(out) = out {
        if !out.status.success() {
            eprintln!(
                "cleanup: losetup --detach {} ({}): {}",
                device.name,
                device.back_file,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// Unmounts every mount under `dir` and detaches every loop device whose backing file is (or
/// was, before it was deleted) under `dir`: tenant volumes a test left behind, pass or fail.
/// Run it once nothing of the test runs any more. Returns what could not be removed, for the
/// test's output.
pub fn remove_mounts_and_loops(dir: &Path) -> Vec<String> {
    let dirs = spellings(dir);
    let files = file_ids_under(dir);
    // Collected before anything is unmounted, while the kernel's paths still name the directory.
    let ours: Vec<LoopDevice> = loop_devices()
        .into_iter()
        .filter(|d| {
            dirs.iter().any(|p| is_under(d.back_path(), p))
                || files.contains(&(d.back_dev.clone(), d.back_ino))
        })
        .collect();
    // The volumes first, plainly: no process of the test is left to hold them. The `tenants`
    // bind mount stays busy (the loop devices hold the images open through it) until...
    unmount_under(&dirs, false);
    // ...the devices are detached.
    for device in &ours {
        detach(device);
    }
    // Then the rest; whatever is still busy is detached and goes with its last user.
    unmount_under(&dirs, true);

    let mut left: Vec<String> = mounts()
        .into_iter()
        .filter(|m| dirs.iter().any(|d| is_under(&m.mount_point, d)))
        .map(|m| format!("mount {} ({} {})", m.mount_point, m.fstype, m.source))
        .collect();
    left.extend(
        loop_devices()
            .into_iter()
            .filter(|d| ours.iter().any(|o| o.same_as(d)))
            .map(|d| {
                let pending = if d.autoclear {
                    " (detach pending: the kernel frees it with its last user)"
                } else {
                    ""
                };
                format!("loop device {} on {}{pending}", d.name, d.back_file)
            }),
    );
    left
}

/// Every cgroup hierarchy mounted at or under `root`: each v1 hierarchy (co-mounted controllers
/// are one mount) plus the v2 tree of a hybrid host, or the one v2 tree. Read from the mounts, so
/// hierarchies the agent might use one day are covered too.
pub fn cgroup_hierarchies(root: &Path) -> Vec<PathBuf> {
    let root_text = root.display().to_string();
    let mut found: Vec<PathBuf> = mounts()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .filter(|m| is_under(&m.mount_point, &root_text))
        .map(|m| PathBuf::from(m.mount_point))
        .collect();
    found.sort();
    found.dedup();
    if found.is_empty() {
        // No mountinfo to read: the layout the agent uses.
        found = match crate::CgroupVersion::of_host() {
            crate::CgroupVersion::V2 => vec![root.to_path_buf()],
            crate::CgroupVersion::V1 => V1_CONTROLLERS.iter().map(|c| root.join(c)).collect(),
        };
    }
    found
}

/// Thaws `dir` and every cgroup below it, parents first (a v1 child stays frozen while its
/// parent is): a frozen v1 process does not die of SIGKILL until it is thawed.
fn thaw(dir: &Path) {
    for (file, value) in [("freezer.state", "THAWED"), ("cgroup.freeze", "0")] {
        // Never created: only a controller's own files may be written.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(dir.join(file)) {
            use std::io::Write;
            let _ = f.write_all(value.as_bytes());
        }
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            thaw(&entry.path());
        }
    }
}

fn remove_dirs_deepest_first(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dirs_deepest_first(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kills every process in the test's tenant cgroups and removes the cgroups, deepest first, in
/// every hierarchy under `root` (each v1 hierarchy, or the v2 tree). `parent` is
/// `<top>/<test>`; `<top>` goes too once no other test uses it. Returns what could not be
/// removed, for the test's output.
pub fn remove_cgroup_subtree(root: &Path, parent: &Path) -> Vec<String> {
    let hierarchies = cgroup_hierarchies(root);
    let dirs: Vec<PathBuf> = hierarchies.iter().map(|h| h.join(parent)).collect();
    for _ in 0..100 {
        for dir in &dirs {
            thaw(dir);
            // v2 kills the whole subtree at once, frozen or not, with no PID to reuse in between.
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.kill"))
            {
                use std::io::Write;
                let _ = f.write_all(b"1");
            }
        }
        // By PID for v1: each process of the test, from every hierarchy's cgroup.procs.
        let pids: BTreeSet<i32> = dirs.iter().flat_map(|d| pids_under(d)).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut left = Vec::new();
    for (hierarchy, dir) in hierarchies.iter().zip(&dirs) {
        // A cgroup whose last process has just died can refuse rmdir for a moment.
        for _ in 0..40 {
            remove_dirs_deepest_first(dir);
            if !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if dir.exists() {
            let pids = pids_under(dir);
            left.push(format!("cgroup {} (processes {pids:?})", dir.display()));
        }
        // The shared top directory, once no test uses it (removing a non-empty one fails).
        if let Some(top) = parent.iter().next() {
            let _ = std::fs::remove_dir(hierarchy.join(top));
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_means_whole_components() {
        assert!(is_under("/var/lib/t/dt-ab", "/var/lib/t/dt-ab"));
        assert!(is_under(
            "/var/lib/t/dt-ab/x/volume.img",
            "/var/lib/t/dt-ab"
        ));
        assert!(is_under("/var/lib/t/dt-ab/x", "/var/lib/t/dt-ab/"));
        assert!(!is_under("/var/lib/t/dt-abc/x", "/var/lib/t/dt-ab"));
        assert!(!is_under("/acme/volume.img", "/var/lib/t/dt-ab"));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_octal(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
        assert_eq!(unescape_octal(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn deleted_backing_files_keep_their_path() {
        let d = LoopDevice {
            name: "/dev/loop1".into(),
            back_file: "/var/lib/t/dt-ab/tenants/acme/volume.img (deleted)".into(),
            back_dev: "254:0".into(),
            back_ino: 7,
            autoclear: false,
        };
        assert_eq!(d.back_path(), "/var/lib/t/dt-ab/tenants/acme/volume.img");
        assert!(is_under(d.back_path(), "/var/lib/t/dt-ab"));
    }
}

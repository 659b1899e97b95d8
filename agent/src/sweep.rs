//! The sweep at start: before resuming tenants, the agent walks what it owns on this host and
//! either keeps each thing (it belongs to a tenant whose record is on disk: the tenant's own task
//! finishes or adopts it) or removes it, logging each removal. What it owns: the trash of
//! interrupted deletes, tenant directories without a record (a crash before the record was
//! written), half-made volume images, mounts under its state directory, loop devices backed by
//! files under it (a deleted image's included), per-tenant run directories, and cgroups under its
//! cgroup parent.
//!
//! Everything here is best effort and idempotent: a failure is logged and the next start tries
//! again; nothing that belongs to a tenant with a record is touched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dormant_common::TenantName;
use nix::mount::{umount2, MntFlags};
use tracing::{info, warn};

use crate::host::Host;
use crate::tenant::TenantRecord;

/// What the sweep removed, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub mounts: Vec<PathBuf>,
    pub loop_devices: Vec<String>,
    pub directories: Vec<PathBuf>,
    pub cgroups: Vec<String>,
}

/// Sweeps the host; `records` are the tenants found on disk (kept).
pub fn sweep(host: &Host, records: &[TenantRecord]) -> Swept {
    let mut swept = Swept::default();
    let tenants_dir = host.tenants_dir();
    let known: BTreeSet<&str> = records.iter().map(|r| r.spec.name.as_str()).collect();
    let known_dirs: BTreeSet<PathBuf> = records
        .iter()
        .map(|r| tenants_dir.join(r.spec.name.as_str()))
        .collect();

    // Mounts first: a directory cannot go while something is mounted in it. A tenant with a
    // record keeps the volume at its data directory; every other mount under ours goes.
    let keep_mounts: BTreeSet<PathBuf> = known_dirs.iter().map(|d| d.join("data")).collect();
    for mountpoint in mounts_under(&host.state_dir) {
        // `tenants` itself is the agent's own bind mount (shared, for propagation).
        if mountpoint == tenants_dir || keep_mounts.contains(&mountpoint) {
            continue;
        }
        match umount2(&mountpoint, MntFlags::MNT_DETACH) {
            Ok(()) => {
                info!(mountpoint = %mountpoint.display(), "sweep: unmounted what no tenant owns");
                swept.mounts.push(mountpoint);
            }
            Err(e) => warn!(mountpoint = %mountpoint.display(), error = %e, "sweep: unmount"),
        }
    }

    // Loop devices backed by files under our directory: kept only if backing a known tenant's
    // image that still exists and mounted at its data directory (or not mounted yet: its task
    // mounts it). A deleted image's device always goes.
    let mounted_devices = mounted_sources();
    for (device, backing) in loop_devices() {
        let (path, deleted) = match backing.strip_suffix(" (deleted)") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(&backing), false),
        };
        if !path.starts_with(&host.state_dir) {
            continue;
        }
        let owner_known = known_dirs.iter().any(|d| path == d.join("volume.img"));
        // Two devices for one image (a crash between attach and mount, then a second attach):
        // keep the one that is mounted.
        let duplicate =
            owner_known && !mounted_devices.contains(&device) && loop_devices_for(&backing) > 1;
        if owner_known && !deleted && !duplicate {
            continue;
        }
        match std::process::Command::new("losetup")
            .args(["--detach", &device])
            .output()
        {
            Ok(out) if out.status.success() => {
                info!(
                    device,
                    backing, "sweep: detached a loop device no tenant owns"
                );
                swept.loop_devices.push(device);
            }
            Ok(out) => {
                warn!(device, error = %String::from_utf8_lossy(&out.stderr).trim(), "sweep: losetup --detach");
            }
            Err(e) => warn!(device, error = %e, "sweep: losetup"),
        }
    }

    // Directories: the trash, and tenant directories without a record.
    for dir in std::fs::read_dir(&tenants_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
    {
        let trash = dir == host.trash_dir();
        if !trash && known_dirs.contains(&dir) {
            // A known tenant's half-made image (a crash inside mkfs) is made again from empty.
            let partial = dir.join("volume.img.partial");
            if partial.exists() && std::fs::remove_file(&partial).is_ok() {
                info!(path = %partial.display(), "sweep: removed a half-made volume image");
                swept.directories.push(partial);
            }
            continue;
        }
        remove_dir(&dir, &mut swept);
    }
    // Run directories are named by the scheduler's uid of the tenant.
    let known_uids: BTreeSet<String> = records.iter().map(|r| r.spec.uid.to_string()).collect();
    for dir in std::fs::read_dir(host.runs_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if !known_uids.contains(&dir.file_name().to_string_lossy().into_owned()) {
            remove_dir(&dir.path(), &mut swept);
        }
    }

    // cgroups of tenants without a record: whatever runs there is killed, then the cgroup goes.
    match host.cgroups.tenant_names() {
        Ok(names) => {
            for name in names.iter().filter(|n| !known.contains(n.as_str())) {
                let Ok(tenant) = TenantName::parse(name) else {
                    warn!(
                        cgroup = name,
                        "sweep: a cgroup under our parent that is no tenant's name; left alone"
                    );
                    continue;
                };
                let cgroup = host.cgroups.tenant(&tenant);
                let result = cgroup
                    .pids()
                    .and_then(|pids| {
                        if pids.is_empty() {
                            Ok(())
                        } else {
                            cgroup.kill_all()
                        }
                    })
                    .and_then(|()| cgroup.delete());
                match result {
                    Ok(()) => {
                        info!(cgroup = %cgroup.display_path().display(), "sweep: removed a cgroup no tenant owns");
                        swept.cgroups.push(name.clone());
                    }
                    Err(e) => warn!(cgroup = name, error = %e, "sweep: removing a cgroup"),
                }
            }
        }
        Err(e) => warn!(error = %e, "sweep: listing tenant cgroups"),
    }
    swept
}

fn remove_dir(dir: &Path, swept: &mut Swept) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            info!(path = %dir.display(), "sweep: removed what no tenant owns");
            swept.directories.push(dir.to_path_buf());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %dir.display(), error = %e, "sweep: remove"),
    }
}

/// Mount points strictly below `dir`, deepest first (so nested mounts go before their parent).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// The devices mounted anywhere in this namespace (`/dev/loop3`, ...).
fn mounted_sources() -> BTreeSet<String> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return BTreeSet::new();
    };
    // After the " - " separator: filesystem type, then the source.
    mountinfo
        .lines()
        .filter_map(|l| l.split_once(" - ")?.1.split(' ').nth(1).map(str::to_string))
        .collect()
}

/// Every attached loop device with its backing file as the kernel names it (with " (deleted)"
/// when the file is gone).
fn loop_devices() -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Some((format!("/dev/{name}"), backing.trim_end().to_string()))
        })
        .collect()
}

fn loop_devices_for(backing: &str) -> usize {
    loop_devices().iter().filter(|(_, b)| b == backing).count()
}

//! The sweep at start: before resuming tenants, the agent removes what it owns and no tenant
//! does, logging each removal. It touches only its own shapes under its own state directory and
//! cgroup parent, never anything else that happens to live there:
//!
//! - `tenants/.trash/*`: directories of deletes interrupted after their one rename;
//! - `tenants/<name>` without a record and never initialised (a crash before the record was
//!   written, or by an older agent that wrote it later): its cgroup `<name>`, its mount at
//!   `tenants/<name>/data`, the loop devices backed by `tenants/<name>/volume.img`, the directory;
//! - loop devices backed by an image of that shape whose file is gone (` (deleted)`), and
//!   duplicates of a recorded tenant's image that are not the mounted one;
//! - `run/<tenant uid>` directories of no recorded tenant.
//!
//! A tenant whose record exists but cannot be read is quarantined: nothing of it is touched.
//! Directories are removed with `rm -rf --one-file-system`, which walks iteratively: a tenant can
//! make its run directory arbitrarily deep, and a recursive walk in the agent would overflow its
//! stack. Everything is best effort and idempotent; a failure is logged and the next start tries
//! again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dormant_common::TenantName;
use nix::mount::{umount2, MntFlags};
use tracing::{info, warn};

use crate::host::Host;
use crate::tenant::record::OnDisk;
use crate::tenant_fs;

/// What the sweep removed, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub mounts: Vec<PathBuf>,
    pub loop_devices: Vec<String>,
    pub directories: Vec<PathBuf>,
    pub cgroups: Vec<String>,
}

/// Sweeps the host; what `found` has records for (or quarantined) is kept.
pub fn sweep(host: &Host, found: &OnDisk) -> Swept {
    let mut swept = Swept::default();
    let tenants_dir = host.tenants_dir();
    let trash = host.trash_dir();
    // Unrecorded directories that were initialised hold data: kept, like a quarantine.
    let mut doomed: Vec<&str> = Vec::new();
    let mut held: Vec<&str> = Vec::new();
    for name in &found.unrecorded {
        let dir = tenants_dir.join(name);
        if dir.join("initialized").exists() {
            tracing::error!(tenant_dir = %dir.display(), "a tenant directory with data but no record: left as it is until an operator looks");
            held.push(name);
        } else {
            doomed.push(name);
        }
    }
    let kept: BTreeSet<&str> = found
        .records
        .iter()
        .map(|r| r.spec.name.as_str())
        .chain(found.quarantined.iter().map(String::as_str))
        .chain(held.iter().copied())
        .collect();
    let trashed: Vec<PathBuf> = std::fs::read_dir(&trash)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();

    // cgroups first: a stray engine must not write while its volume goes. Trash entries are
    // named `<tenant>-<nanos>`.
    let mut cgroup_names: BTreeSet<String> = doomed.iter().map(|n| n.to_string()).collect();
    cgroup_names.extend(trashed.iter().filter_map(|p| {
        let name = p.file_name()?.to_str()?;
        Some(name.rsplit_once('-')?.0.to_string())
    }));
    let existing: BTreeSet<String> = match host.cgroups.tenant_names() {
        Ok(names) => names.into_iter().collect(),
        Err(e) => {
            warn!(error = %e, "sweep: listing tenant cgroups");
            BTreeSet::new()
        }
    };
    for name in cgroup_names
        .iter()
        .filter(|n| existing.contains(*n) && !kept.contains(n.as_str()))
    {
        let Ok(tenant) = TenantName::parse(name) else {
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

    // Mounts of the doomed directories and of the trash (deepest first).
    let doomed_mounts: BTreeSet<PathBuf> = doomed
        .iter()
        .map(|n| tenants_dir.join(n).join("data"))
        .collect();
    for mountpoint in mounts_under(&tenants_dir) {
        let ours = doomed_mounts.contains(&mountpoint)
            || (mountpoint.starts_with(&trash) && mountpoint != trash);
        if !ours {
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

    // Loop devices backed by one of our image shapes.
    let recorded_images: BTreeSet<PathBuf> = found
        .records
        .iter()
        .map(|r| tenants_dir.join(r.spec.name.as_str()).join("volume.img"))
        .collect();
    let mounted_devices = mounted_sources();
    let devices = loop_devices();
    for (device, backing) in &devices {
        let (path, deleted) = match backing.strip_suffix(" (deleted)") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(backing), false),
        };
        let Some(owner) = image_owner(&tenants_dir, &path) else {
            continue;
        };
        let remove = match owner {
            ImageOwner::Trash => true,
            ImageOwner::Tenant(name) if kept.contains(name.as_str()) => {
                // Two devices for one image (a crash between an attach and its mount, then a
                // second attach): the one not mounted goes. A deleted image is no tenant's.
                let duplicate = recorded_images.contains(&path)
                    && !mounted_devices.contains(device)
                    && devices.iter().filter(|(_, b)| b == backing).count() > 1;
                deleted || duplicate
            }
            ImageOwner::Tenant(_) => true,
        };
        if !remove {
            continue;
        }
        match std::process::Command::new("losetup")
            .args(["--detach", device])
            .output()
        {
            Ok(out) if out.status.success() => {
                info!(
                    device,
                    backing, "sweep: detached a loop device no tenant owns"
                );
                swept.loop_devices.push(device.clone());
            }
            Ok(out) => {
                warn!(device, error = %String::from_utf8_lossy(&out.stderr).trim(), "sweep: losetup --detach");
            }
            Err(e) => warn!(device, error = %e, "sweep: losetup"),
        }
    }

    // Directories: the trash, the doomed ones, run directories of no recorded tenant.
    for dir in trashed {
        remove_dir(&dir, &mut swept);
    }
    for name in &doomed {
        remove_dir(&tenants_dir.join(name), &mut swept);
    }
    for record in &found.records {
        // A half-made image (a crash inside mkfs) is made again from empty.
        let partial = tenants_dir
            .join(record.spec.name.as_str())
            .join("volume.img.partial");
        if partial.exists() && std::fs::remove_file(&partial).is_ok() {
            info!(path = %partial.display(), "sweep: removed a half-made volume image");
            swept.directories.push(partial);
        }
    }
    // A quarantined or held tenant's uid is unknown: then no run directory goes.
    if found.quarantined.is_empty() && held.is_empty() {
        let known_uids: BTreeSet<String> = found
            .records
            .iter()
            .map(|r| r.spec.uid.to_string())
            .collect();
        for entry in std::fs::read_dir(host.runs_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<u64>().is_ok() && !known_uids.contains(&name) {
                let path = entry.path();
                match crate::socket_dir::unmount(&path) {
                    Ok(()) => {}
                    Err(e) => warn!(path = %path.display(), error = %e, "sweep: unmount"),
                }
                remove_dir(&path, &mut swept);
            }
        }
    }
    swept
}

enum ImageOwner {
    Trash,
    Tenant(String),
}

/// Whose image `path` is, if it has one of our shapes: `tenants/<name>/volume.img` or anything
/// under `tenants/.trash/`.
fn image_owner(tenants_dir: &Path, path: &Path) -> Option<ImageOwner> {
    let rel = path.strip_prefix(tenants_dir).ok()?;
    let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
    match parts.as_slice() {
        [".trash", ..] => Some(ImageOwner::Trash),
        [name, "volume.img"] if TenantName::parse(name).is_ok() => {
            Some(ImageOwner::Tenant((*name).to_string()))
        }
        _ => None,
    }
}

fn remove_dir(dir: &Path, swept: &mut Swept) {
    match tenant_fs::remove_tree(dir) {
        Ok(()) => {
            info!(path = %dir.display(), "sweep: removed what no tenant owns");
            swept.directories.push(dir.to_path_buf());
        }
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
pub fn loop_devices() -> Vec<(String, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_image_shapes_are_claimed() {
        let t = Path::new("/var/lib/dormant/tenants");
        assert!(matches!(
            image_owner(t, &t.join("acme/volume.img")),
            Some(ImageOwner::Tenant(n)) if n == "acme"
        ));
        assert!(matches!(
            image_owner(t, &t.join(".trash/acme-17/volume.img")),
            Some(ImageOwner::Trash)
        ));
        // Anything else under the state directory, or elsewhere, is not ours.
        for other in [
            "/var/lib/dormant/tenants/acme/other.img",
            "/var/lib/dormant/tenants/ghost.img",
            "/var/lib/dormant/images/acme/volume.img",
            "/var/lib/dormant/tenants/acme/data/volume.img",
            "/srv/volume.img",
        ] {
            assert!(image_owner(t, Path::new(other)).is_none(), "{other}");
        }
    }
}

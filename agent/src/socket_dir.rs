//! A tenant's socket directory on the host (`<state_dir>/run/<tenant uid>`, the engine's
//! `/run/engine`): a small tmpfs of its own, owned by the tenant, so that what a tenant writes there (it may
//! write anything: a PostgreSQL superuser has a shell) is capped and charged to its own memory
//! cgroup, never to the host's disk. The directory stays at a short path because a Unix socket's
//! path must fit in 108 bytes; the volume's path is too long for it.
//!
//! Mounted when nothing of the tenant runs (before an init or an engine start), so an engine an
//! older agent started, with its socket in a plain directory, keeps working until its next start.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{Gid, Uid};

/// Size of each tenant's socket directory: sockets, lock and pid files, a password file for the
/// time of an init.
pub const SOCKET_DIR_BYTES: u64 = 1 << 20;
const SOCKET_DIR_INODES: u64 = 256;

/// Whether `dir` is a mount of its own (another device than its parent's).
pub fn is_mounted(dir: &Path) -> std::io::Result<bool> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    Ok(std::fs::metadata(dir)?.dev() != std::fs::metadata(parent)?.dev())
}

/// Mounts the tmpfs on `dir` (an existing directory) unless it is mounted already. Whatever a
/// plain directory held (an older agent's sockets) is hidden under it.
pub fn ensure_mounted(dir: &Path, uid: Uid, gid: Gid) -> std::io::Result<()> {
    if is_mounted(dir)? {
        return Ok(());
    }
    let options = format!(
        "size={SOCKET_DIR_BYTES},nr_inodes={SOCKET_DIR_INODES},mode=0700,uid={uid},gid={gid}"
    );
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(std::io::Error::from)
}

/// Unmounts the tmpfs from `dir` if there is one (detached if busy: an engine being killed may
/// still hold it).
pub fn unmount(dir: &Path) -> std::io::Result<()> {
    match is_mounted(dir) {
        Ok(true) => umount2(dir, MntFlags::MNT_DETACH).map_err(std::io::Error::from),
        Ok(false) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

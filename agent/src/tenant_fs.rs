//! Touching paths inside directories a tenant controls, as root, without letting the tenant
//! redirect us: a tenant that runs code (PostgreSQL's superuser can) may replace its socket or
//! config file with a symlink to a host file or another tenant's socket. Everything here refuses
//! to follow a final symlink and checks what it opened before using it. Also root's own files that
//! must survive a crash, written atomically.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::unistd::{Gid, Uid};

fn refused(path: &Path, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("{}: {why}", path.display()),
    )
}

/// Connects to the engine's Unix socket at `path`, which must be a socket owned by `owner`, not
/// a symlink: the socket is opened with `O_PATH | O_NOFOLLOW` and connected to through that
/// descriptor, so what was checked is what is connected to.
pub async fn connect_socket(path: &Path, owner: Uid) -> std::io::Result<tokio::net::UnixStream> {
    let handle = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = handle.metadata()?;
    if meta.mode() & libc::S_IFMT != libc::S_IFSOCK {
        return Err(refused(path, "not a socket"));
    }
    if meta.uid() != owner.as_raw() {
        return Err(refused(path, "socket not owned by the tenant"));
    }
    let via = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let stream = tokio::net::UnixStream::connect(&via).await;
    drop(handle);
    stream
}

/// Reads at most `max` bytes of a regular file in a tenant's directory (not a symlink, not a
/// FIFO or device that could block or never end).
pub fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(refused(path, "not a regular file"));
    }
    let mut text = String::new();
    file.take(max).read_to_string(&mut text)?;
    Ok(text)
}

/// Writes a fresh file (mode 0600) owned by `uid`/`gid` into a tenant's directory. Whatever is
/// at `path` is unlinked first (a symlink is removed, never followed) and the new file is created
/// exclusively, so root never writes through a link the tenant planted.
pub fn write_private(path: &Path, content: &str, uid: Uid, gid: Gid) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(content.as_bytes())?;
    nix::unistd::fchown(&file, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Replaces root's file at `path` (mode 0600) so that after a crash it holds either the old
/// content or the new, never a torn mix: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| refused(path, "has no parent directory"))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// `write_atomic`, skipped when the file already holds exactly `content` (written durably by an
/// earlier `write_atomic`): every start of every tenant prepares its files again, and a thousand
/// resumed tenants must not cost a thousand rounds of fsyncs.
pub fn write_atomic_if_changed(path: &Path, content: &[u8]) -> std::io::Result<()> {
    match std::fs::read(path) {
        Ok(current) if current == content => Ok(()),
        _ => write_atomic(path, content),
    }
}

/// Opens the directory holding `base/rel`'s last component, walking each directory below `base`
/// with `O_NOFOLLOW` relative to the one before: a symlink the tenant planted anywhere in `rel`
/// is refused, never followed. `None` when a directory on the way is missing.
fn open_parent_below<'a>(
    base: &Path,
    rel: &'a Path,
) -> std::io::Result<Option<(std::os::fd::OwnedFd, &'a std::ffi::OsStr)>> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let parts: Vec<_> = rel.components().collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Err(refused(rel, "no file name"));
    };
    let std::path::Component::Normal(name) = last else {
        return Err(refused(rel, "must be a plain relative path"));
    };
    let mut dir = match open(base, dir_flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for part in dirs {
        let std::path::Component::Normal(part) = part else {
            return Err(refused(rel, "must be a plain relative path"));
        };
        dir = match openat(&dir, *part, dir_flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
    }
    Ok(Some((dir, name)))
}

/// Removes the file at `base/rel`, where everything below `base` is the tenant's, never through
/// a link the tenant planted (see `open_parent_below`). Missing is fine.
pub fn remove_below(base: &Path, rel: &Path) -> std::io::Result<()> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let Some((dir, name)) = open_parent_below(base, rel)? else {
        return Ok(());
    };
    match unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `read_small` of `base/rel`, never through a link the tenant planted anywhere on the way (see
/// `open_parent_below`); a missing file is `NotFound`.
pub fn read_small_below(base: &Path, rel: &Path, max: u64) -> std::io::Result<String> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let Some((dir, name)) = open_parent_below(base, rel)? else {
        return Err(std::io::ErrorKind::NotFound.into());
    };
    let fd = openat(
        &dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(refused(rel, "not a regular file"));
    }
    let mut text = String::new();
    file.take(max).read_to_string(&mut text)?;
    Ok(text)
}

/// Removes the tree at `path` (missing is fine) with `rm -rf --one-file-system`: a tenant can
/// make its directories arbitrarily deep, and `rm`'s iterative walk (fts, never following links)
/// handles that where a recursive walk in the agent would overflow its stack.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let out = std::process::Command::new("rm")
        .args(["-rf", "--one-file-system", "--"])
        .arg(path)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "rm -rf {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> (Uid, Gid) {
        (Uid::current(), Gid::current())
    }

    #[test]
    fn write_private_replaces_a_planted_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let conf = dir.path().join("redis.conf");
        std::os::unix::fs::symlink(&victim, &conf).unwrap();
        let (uid, gid) = me();
        write_private(&conf, "requirepass x\n", uid, gid).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&conf).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "requirepass x\n");
        assert_eq!(std::fs::metadata(&conf).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn read_small_refuses_symlinks_and_fifos_and_caps_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(10_000)).unwrap();
        assert_eq!(read_small(&big, 100).unwrap().len(), 100);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert!(read_small(&link, 100).is_err());
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_small(&fifo, 100).is_err());
    }

    #[tokio::test]
    async fn connect_socket_refuses_a_symlink_and_a_foreign_owner() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.sock");
        let _listener = tokio::net::UnixListener::bind(&real).unwrap();
        let (uid, _) = me();
        assert!(connect_socket(&real, uid).await.is_ok());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(connect_socket(&link, uid).await.is_err());
        let other = Uid::from_raw(uid.as_raw().wrapping_add(1));
        let err = connect_socket(&real, other).await.unwrap_err();
        assert!(err.to_string().contains("not owned by the tenant"), "{err}");
    }

    #[test]
    fn remove_below_never_follows_a_planted_directory_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("data");
        std::fs::create_dir_all(base.join("pgdata")).unwrap();
        std::fs::write(base.join("pgdata/postmaster.pid"), "1\n").unwrap();
        assert_eq!(
            read_small_below(&base, Path::new("pgdata/postmaster.pid"), 100).unwrap(),
            "1\n"
        );
        remove_below(&base, Path::new("pgdata/postmaster.pid")).unwrap();
        assert!(!base.join("pgdata/postmaster.pid").exists());
        // Missing is fine.
        remove_below(&base, Path::new("pgdata/postmaster.pid")).unwrap();
        remove_below(&base, Path::new("nothing/here")).unwrap();
        // A tenant replaces pgdata with a link to a host directory: the host file stays.
        let host = dir.path().join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("postmaster.pid"), "precious").unwrap();
        std::fs::remove_dir(base.join("pgdata")).unwrap();
        std::os::unix::fs::symlink(&host, base.join("pgdata")).unwrap();
        assert!(remove_below(&base, Path::new("pgdata/postmaster.pid")).is_err());
        assert!(host.join("postmaster.pid").exists());
        assert!(read_small_below(&base, Path::new("pgdata/postmaster.pid"), 100).is_err());
    }

    #[test]
    fn remove_tree_removes_a_tree_deeper_than_any_recursion_and_spares_link_targets() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run");
        let mut deep = root.clone();
        for _ in 0..300 {
            deep.push("a");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.join("precious").exists());
        remove_tree(&root).unwrap();
    }

    #[test]
    fn write_atomic_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenant.json");
        write_atomic(&path, b"{}").unwrap();
        write_atomic(&path, b"{\"a\":1}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}");
        assert!(!dir.path().join("tenant.tmp").exists());
        write_atomic_if_changed(&path, b"{\"a\":1}").unwrap();
        write_atomic_if_changed(&path, b"{\"a\":2}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":2}");
    }
}

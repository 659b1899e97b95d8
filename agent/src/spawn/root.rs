//! What of the host a tenant's minimal root shows, read from the host before the fork: `/usr`
//! (read-only, the only place programs run from), the top-level links into it (`/bin -> usr/bin`
//! on a merged-/usr system, or read-only binds where they are real directories), and a short
//! allow list of `/etc` that programs need to start (the dynamic linker's cache, name service
//! switch, time zone, alternatives). Nothing else of the host: not its `/etc/dormant`, not the
//! state directory, not `/sys`, not another tenant.
//!
//! Like Firecracker's jailer (a chroot of only what the microVM needs), with `pivot_root` and the
//! old root detached, so no path leads back out.

use std::path::{Path, PathBuf};

/// Top-level names that hold programs and libraries on one layout or another.
const PROGRAM_DIRS: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// `/etc` entries a tenant gets read-only, when the host has them. `passwd` and `group` are the
/// tenant's own files, bound apart.
pub const ETC_ALLOWED: [&str; 14] = [
    "alternatives",
    "gai.conf",
    "host.conf",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "protocols",
    "services",
    "ssl",
    "timezone",
];

/// One entry of the host seen from a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A symbolic link, made again with the same target.
    Link { name: String, target: PathBuf },
    /// A directory, bound read-only.
    Dir { name: String },
    /// A regular file, bound read-only.
    File { name: String },
}

/// The host's side of a tenant root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRoot {
    /// Entries of `/` besides `/usr` (`bin`, `lib64`...).
    pub top: Vec<HostEntry>,
    /// Entries of `/etc` from `ETC_ALLOWED`.
    pub etc: Vec<HostEntry>,
}

impl HostRoot {
    /// Reads the host's layout under `root` (`/` but in tests).
    pub fn read(root: &Path) -> Self {
        Self {
            top: PROGRAM_DIRS
                .iter()
                .filter_map(|name| entry(root, name))
                .collect(),
            etc: ETC_ALLOWED
                .iter()
                .filter_map(|name| entry(&root.join("etc"), name))
                .collect(),
        }
    }
}

fn entry(dir: &Path, name: &str) -> Option<HostEntry> {
    let path = dir.join(name);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    let name = name.to_string();
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&path).ok()?;
        Some(HostEntry::Link { name, target })
    } else if meta.is_dir() {
        Some(HostEntry::Dir { name })
    } else if meta.is_file() {
        Some(HostEntry::File { name })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_dirs_and_files_are_told_apart_and_missing_ones_skipped() {
        let dir = std::env::temp_dir().join(format!("dormant-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
        std::fs::create_dir_all(dir.join("lib64")).unwrap();
        std::os::unix::fs::symlink("usr/bin", dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("etc/ssl")).unwrap();
        std::fs::write(dir.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.join("etc/shadow"), "secret").unwrap();
        let host = HostRoot::read(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            host.top,
            vec![
                HostEntry::Link {
                    name: "bin".into(),
                    target: "usr/bin".into()
                },
                HostEntry::Dir {
                    name: "lib64".into()
                },
            ]
        );
        assert_eq!(
            host.etc,
            vec![
                HostEntry::File {
                    name: "hosts".into()
                },
                HostEntry::Dir { name: "ssl".into() },
            ]
        );
    }
}

//! The data disk's free space. Writes are refused while it is under the reserve, with a message
//! that names the disk, so the store never reaches ENOSPC through a proposal of this replica
//! (etcd's space quota plays the same part). Entries a leader replicates here still land, inside
//! the reserve; if the disk fills anyway, Raft stops and the process exits (`app`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use dormant_common::Bytes;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DiskError {
    #[error(
        "the scheduler's data disk is nearly full: {path} has {free} free, under the {reserve} \
         reserve (disk_reserve); writes are refused until space is freed (reads still answer)"
    )]
    UnderReserve {
        path: String,
        free: String,
        reserve: String,
    },
}

/// Checks the free space under the data directory against the reserve.
#[derive(Debug)]
pub struct DiskReserve {
    path: PathBuf,
    reserve: Bytes,
    /// Whether the last check found the disk short, so the change is logged once, not per write.
    short: AtomicBool,
}

impl DiskReserve {
    pub fn new(path: &Path, reserve: Bytes) -> Self {
        Self {
            path: path.to_path_buf(),
            reserve,
            short: AtomicBool::new(false),
        }
    }

    /// `Ok` while the disk has at least the reserve free (or cannot be measured: the store's own
    /// error then says what is wrong).
    pub fn check(&self) -> Result<(), DiskError> {
        let Ok(stat) = nix::sys::statvfs::statvfs(&self.path) else {
            return Ok(());
        };
        // Space an unprivileged writer may use: root's reserved blocks are no margin to count on.
        let free = stat.blocks_available().saturating_mul(stat.fragment_size());
        let short = free < self.reserve.0;
        if short != self.short.swap(short, Ordering::Relaxed) {
            if short {
                warn!(path = %self.path.display(), free = %Bytes(free).human(), reserve = %self.reserve.human(), "data disk under the reserve: refusing writes");
            } else {
                info!(path = %self.path.display(), free = %Bytes(free).human(), "data disk has room again: accepting writes");
            }
        }
        if short {
            return Err(DiskError::UnderReserve {
                path: self.path.display().to_string(),
                free: Bytes(free).human(),
                reserve: self.reserve.human(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_naming_the_path_and_the_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = DiskReserve::new(dir.path(), Bytes(u64::MAX));
        let err = reserve.check().unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("reserve (disk_reserve)"), "{err}");
        let roomy = DiskReserve::new(dir.path(), Bytes(1));
        assert_eq!(roomy.check(), Ok(()));
    }
}

//! Usage for billing: per tenant, counters that only grow (CPU seconds, memory byte-seconds,
//! storage byte-seconds, awake seconds), integrated from the samples each heartbeat takes and
//! kept in one file of the agent's (`usage.json` in the state directory), with no Raft entry.
//!
//! Why they survive restarts without loss or double counting:
//! - Only saved figures are shown: the book is written (temporary file, fsync, rename, fsync of
//!   the directory) and only then do its figures replace the ones `/metrics` shows. A figure
//!   once exported is never lower after a restart, a crash or a power loss, so Prometheus never
//!   sees a drop it would take for a reset; a save that fails leaves the previous figures shown.
//! - Each meter keeps its last sample, the cgroup's own CPU counter included. After a restart
//!   (of the agent: the engine and its cgroup live on) the next sample adds the CPU the cgroup
//!   counted meanwhile, and integrates memory and storage across the gap from the last sample.
//! - A counter lower than the last sample's belongs to a cgroup made again: it counts from zero.
//!   A sample from another boot (the boot id differs: the engines died with the host) integrates
//!   nothing across the gap, and counts its new cgroup's CPU from zero.
//! - A sample whose CPU counter reads 0 is no reading (the cgroup could not be read, or no
//!   process ever ran in it): it is skipped, and the next one integrates across it.
//! - A deleted tenant's meter goes with it; a tenant created again under the same name (another
//!   uid) starts a new one.
//!
//! The cost is one small file written and synced per heartbeat interval, for all tenants at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dormant_common::TenantUid;
use serde::{Deserialize, Serialize};

/// One sample of a tenant, taken with a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at_unix_ms: u64,
    /// The cgroup's own cumulative CPU counter.
    pub cpu_usage_usec: u64,
    pub memory_bytes: u64,
    pub storage_bytes: u64,
    /// The engine runs (not hibernated, not failed).
    pub awake: bool,
}

/// A tenant's totals since it came to this host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Meter {
    /// The tenant's uid (given by the scheduler, unique per create): another uid under the name
    /// is another tenant.
    pub uid: TenantUid,
    pub cpu_seconds: f64,
    pub memory_byte_seconds: f64,
    pub storage_byte_seconds: f64,
    pub awake_seconds: f64,
    /// Where the integration goes on from.
    pub last: Option<Sample>,
    /// The boot the last sample was taken in.
    #[serde(default)]
    pub boot_id: String,
}

impl Meter {
    /// Adds what happened between the last sample and `now`.
    pub fn observe(&mut self, now: Sample, boot_id: &str) {
        if let Some(last) = self.last.filter(|_| self.boot_id == boot_id) {
            // A clock that stepped back counts no time, never negative time.
            let seconds = now.at_unix_ms.saturating_sub(last.at_unix_ms) as f64 / 1000.0;
            let cpu_usec = if now.cpu_usage_usec >= last.cpu_usage_usec {
                now.cpu_usage_usec - last.cpu_usage_usec
            } else {
                now.cpu_usage_usec
            };
            self.cpu_seconds += cpu_usec as f64 / 1e6;
            // Trapezoids: memory and storage change smoothly enough between samples.
            let mean = |a: u64, b: u64| (a as f64 + b as f64) / 2.0;
            self.memory_byte_seconds += mean(last.memory_bytes, now.memory_bytes) * seconds;
            self.storage_byte_seconds += mean(last.storage_bytes, now.storage_bytes) * seconds;
            if last.awake && now.awake {
                self.awake_seconds += seconds;
            } else if last.awake || now.awake {
                self.awake_seconds += seconds / 2.0;
            }
        } else {
            // The first sample, or the first of a new boot: what the cgroup counted before it is
            // this tenant's too.
            self.cpu_seconds += now.cpu_usage_usec as f64 / 1e6;
        }
        self.last = Some(now);
        self.boot_id = boot_id.to_string();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("usage book {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Every tenant's meter on this host, and the file that keeps them.
#[derive(Debug)]
pub struct UsageBook {
    path: PathBuf,
    boot_id: String,
    meters: BTreeMap<String, Meter>,
    /// The figures last saved: the ones shown.
    saved: BTreeMap<String, Meter>,
}

impl UsageBook {
    /// The book in `state_dir`, or an empty one if there is none yet. A book that does not
    /// parse is moved aside (`usage.json.unreadable`, for the operator) and a new one begun:
    /// tenants run whatever happened to their bill.
    pub fn open(state_dir: &Path) -> Result<Self, BillingError> {
        let path = state_dir.join("usage.json");
        let meters = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(meters) => meters,
                Err(e) => {
                    let aside = path.with_extension("json.unreadable");
                    tracing::error!(path = %path.display(), aside = %aside.display(), error = %e, "the usage book does not parse: moved aside, counting anew");
                    std::fs::rename(&path, &aside).map_err(|source| BillingError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(BillingError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Ok(Self {
            path,
            boot_id: boot_id(),
            saved: meters.clone(),
            meters,
        })
    }

    /// Records one sample of tenant `name` (uid `uid`).
    pub fn observe(&mut self, name: &str, uid: TenantUid, sample: Sample) {
        if sample.cpu_usage_usec == 0 {
            return;
        }
        let meter = self.meters.entry(name.to_string()).or_default();
        if meter.uid != uid {
            *meter = Meter {
                uid,
                ..Meter::default()
            };
        }
        meter.observe(sample, &self.boot_id);
    }

    /// Drops the meters of tenants not in `present`: they left this host.
    pub fn retain(&mut self, present: impl Fn(&str) -> bool) {
        self.meters.retain(|name, _| present(name));
    }

    /// A tenant's figures as last saved: the ones to show.
    pub fn meter(&self, name: &str) -> Option<&Meter> {
        self.saved.get(name)
    }

    /// Writes the book durably (temporary file, fsync, rename, fsync of the directory); once it
    /// is written, its figures are the ones shown.
    pub fn save(&mut self) -> Result<(), BillingError> {
        use std::io::Write;
        let io = |source| BillingError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        // Serialising maps of plain numbers cannot fail.
        let bytes = serde_json::to_vec(&self.meters).unwrap_or_default();
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        self.saved.clone_from(&self.meters);
        Ok(())
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); empty where the kernel has none, which
/// then counts as one long boot.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: u64, cpu_s: u64, memory: u64, awake: bool) -> Sample {
        Sample {
            at_unix_ms: at_s * 1000,
            cpu_usage_usec: cpu_s * 1_000_000,
            memory_bytes: memory,
            storage_bytes: 1000,
            awake,
        }
    }

    #[test]
    fn samples_integrate_cpu_memory_storage_and_awake_time() {
        let mut m = Meter::default();
        m.observe(sample(100, 5, 100, true), "b");
        m.observe(sample(110, 8, 300, true), "b");
        m.observe(sample(120, 9, 300, false), "b");
        assert_eq!(m.cpu_seconds, 9.0);
        assert_eq!(m.memory_byte_seconds, 200.0 * 10.0 + 300.0 * 10.0);
        assert_eq!(m.storage_byte_seconds, 1000.0 * 20.0);
        assert_eq!(m.awake_seconds, 10.0 + 5.0);
    }

    #[test]
    fn a_cgroup_made_again_counts_from_zero_and_a_new_boot_integrates_no_gap() {
        let mut m = Meter::default();
        m.observe(sample(100, 50, 100, true), "b");
        m.observe(sample(110, 2, 100, true), "b");
        assert_eq!(m.cpu_seconds, 52.0);
        // After a reboot: no time across the gap, and the new cgroup's CPU from zero.
        m.observe(sample(10_000, 3, 100, true), "other boot");
        assert_eq!(m.cpu_seconds, 55.0);
        assert_eq!(m.awake_seconds, 10.0);
        m.observe(sample(10_010, 4, 100, true), "other boot");
        assert_eq!(m.cpu_seconds, 56.0);
    }

    #[test]
    fn a_clock_stepping_back_counts_no_time() {
        let mut m = Meter::default();
        m.observe(sample(100, 1, 100, true), "b");
        m.observe(sample(90, 1, 100, true), "b");
        assert_eq!(m.awake_seconds, 0.0);
        assert_eq!(m.memory_byte_seconds, 0.0);
    }

    #[test]
    fn only_saved_figures_are_shown_and_the_book_goes_on_from_its_last_saved_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = UsageBook::open(dir.path()).unwrap();
        book.observe("t", TenantUid::new(7), sample(100, 10, 100, true));
        book.observe("t", TenantUid::new(7), sample(110, 12, 100, true));
        assert!(
            book.meter("t").is_none(),
            "nothing shown before it is saved"
        );
        book.save().unwrap();
        assert_eq!(book.meter("t").unwrap().cpu_seconds, 12.0);
        // A sample not saved yet is not shown; an agent killed now loses nothing: after the
        // restart, the next sample adds that CPU from the saved sample on.
        book.observe("t", TenantUid::new(7), sample(120, 15, 100, true));
        assert_eq!(book.meter("t").unwrap().cpu_seconds, 12.0);
        drop(book);
        let mut book = UsageBook::open(dir.path()).unwrap();
        assert_eq!(book.meter("t").unwrap().cpu_seconds, 12.0);
        // A cgroup that could not be read (a counter of 0) is no reading: skipped.
        book.observe("t", TenantUid::new(7), sample(125, 0, 0, true));
        book.observe("t", TenantUid::new(7), sample(130, 16, 100, true));
        book.save().unwrap();
        let after = book.meter("t").unwrap();
        assert_eq!(after.cpu_seconds, 16.0);
        assert_eq!(after.awake_seconds, 30.0);
        assert_eq!(after.memory_byte_seconds, 100.0 * 30.0);
        // Another uid under the same name is another tenant.
        book.observe("t", TenantUid::new(8), sample(140, 1, 100, true));
        book.save().unwrap();
        assert_eq!(book.meter("t").unwrap().cpu_seconds, 1.0);
        book.retain(|name| name != "t");
        book.save().unwrap();
        assert!(book.meter("t").is_none());
    }

    #[test]
    fn an_unreadable_book_is_moved_aside_and_a_new_one_begun() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("usage.json"), b"{not json").unwrap();
        let mut book = UsageBook::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("usage.json.unreadable")).unwrap(),
            b"{not json"
        );
        book.observe("t", TenantUid::new(1), sample(100, 1, 100, true));
        book.save().unwrap();
        assert!(UsageBook::open(dir.path()).unwrap().meter("t").is_some());
    }
}

//! A bundle of CPU, memory and storage: what a tenant reserves and what a node offers.

use serde::{Deserialize, Serialize};

use crate::quantity::{Bytes, MilliCpu};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub cpu: MilliCpu,
    pub memory: Bytes,
    pub storage: Bytes,
}

impl Resources {
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu: MilliCpu(self.cpu.0.saturating_add(other.cpu.0)),
            memory: Bytes(self.memory.0.saturating_add(other.memory.0)),
            storage: Bytes(self.storage.0.saturating_add(other.storage.0)),
        }
    }

    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu: MilliCpu(self.cpu.0.saturating_sub(other.cpu.0)),
            memory: Bytes(self.memory.0.saturating_sub(other.memory.0)),
            storage: Bytes(self.storage.0.saturating_sub(other.storage.0)),
        }
    }

    /// True when every dimension of `self` is at most the same dimension of `room`.
    pub fn fits_in(&self, room: &Resources) -> bool {
        self.cpu <= room.cpu && self.memory <= room.memory && self.storage <= room.storage
    }

    /// Each dimension scaled by `ratio` (the overcommit ratio), rounded down.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "rounding down to whole units is the intent; ratios are small"
    )]
    pub fn scaled(self, ratio: f64) -> Resources {
        let scale = |v: u64| (v as f64 * ratio) as u64;
        Resources {
            cpu: MilliCpu(scale(self.cpu.0)),
            memory: Bytes(scale(self.memory.0)),
            storage: Bytes(scale(self.storage.0)),
        }
    }
}

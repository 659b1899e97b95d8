//! A snapshot as stored in sled: openraft's metadata plus the serialized state machine.

use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta<u64, BasicNode>,
    /// The encoded state machine. As bytes: a plain `Vec<u8>` would be written one number per
    /// byte. `serde_bytes` still reads the array of numbers that older versions wrote in JSON.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

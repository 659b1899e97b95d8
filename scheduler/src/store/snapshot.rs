//! A snapshot as stored in sled: openraft's metadata plus the serialized state machine.

use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta<u64, BasicNode>,
    pub data: Vec<u8>,
}

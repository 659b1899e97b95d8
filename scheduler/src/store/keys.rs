//! Keys of the sled trees. Log keys are big-endian indexes, so key order is log order; metadata
//! keys are typed markers, each with a constant key and the type of its value.

use openraft::{LogId, Vote};
use serde::{de::DeserializeOwned, Serialize};

use super::snapshot::StoredSnapshot;

pub const LOGS_TREE: &str = "logs";
pub const META_TREE: &str = "meta";
pub const SNAPSHOT_TREE: &str = "snapshot";

pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub fn index_of_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// A metadata entry: its key and the type stored under it.
pub trait MetaKey {
    const KEY: &'static str;
    type Value: Serialize + DeserializeOwned;
}

pub struct VoteKey;
impl MetaKey for VoteKey {
    const KEY: &'static str = "vote";
    type Value = Vote<u64>;
}

pub struct CommittedKey;
impl MetaKey for CommittedKey {
    const KEY: &'static str = "committed";
    type Value = Option<LogId<u64>>;
}

pub struct LastPurgedKey;
impl MetaKey for LastPurgedKey {
    const KEY: &'static str = "last_purged";
    type Value = LogId<u64>;
}

pub struct CurrentSnapshotKey;
impl MetaKey for CurrentSnapshotKey {
    const KEY: &'static str = "current";
    type Value = StoredSnapshot;
}

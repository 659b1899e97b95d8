//! The Raft log and vote in sled. The vote is flushed before `save_vote` returns, and appended
//! entries are flushed before openraft's callback says they are durable. The flush runs in a task
//! of its own, so openraft goes on (replicating, taking requests) while the disk syncs, and one
//! flush answers every append that arrived before it started (group commit). Values are in
//! `codec`'s format; entries an older version wrote in JSON are read as they are.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use super::keys::{self, CommittedKey, LastPurgedKey, MetaKey, VoteKey};
use crate::{codec, TypeConfig};

type StoreResult<T> = Result<T, StorageError<u64>>;

#[derive(Debug, Clone)]
pub struct LogStore {
    logs: sled::Tree,
    meta: sled::Tree,
    /// Appends waiting for a flush; the flusher task starts with the first append.
    flusher: Arc<OnceLock<mpsc::UnboundedSender<LogFlushed<TypeConfig>>>>,
}

/// Flushes the log tree for every group of appends that queued up meanwhile, then tells openraft
/// each of them is durable, in the order they came.
async fn flush_in_groups(
    logs: sled::Tree,
    mut waiting: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>,
) {
    while let Some(first) = waiting.recv().await {
        let mut group = vec![first];
        while let Ok(next) = waiting.try_recv() {
            group.push(next);
        }
        let flushed = logs.flush_async().await;
        for callback in group {
            let result = match &flushed {
                Ok(_) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            callback.log_io_completed(result);
        }
    }
}

fn logs_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::Logs, verb, AnyError::new(&e)).into()
}

fn meta_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::Store, verb, AnyError::new(&e)).into()
}

impl LogStore {
    pub(super) fn new(logs: sled::Tree, meta: sled::Tree) -> Self {
        Self {
            logs,
            meta,
            flusher: Arc::new(OnceLock::new()),
        }
    }

    fn get_meta<K: MetaKey>(&self) -> StoreResult<Option<K::Value>> {
        let Some(bytes) = self
            .meta
            .get(K::KEY)
            .map_err(|e| meta_err(ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        codec::decode(&bytes)
            .map(Some)
            .map_err(|e| meta_err(ErrorVerb::Read, e))
    }

    fn put_meta<K: MetaKey>(&self, value: &K::Value) -> StoreResult<()> {
        let bytes = codec::encode(value).map_err(|e| meta_err(ErrorVerb::Write, e))?;
        self.meta
            .insert(K::KEY, bytes)
            .map_err(|e| meta_err(ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self) -> StoreResult<()> {
        self.logs
            .flush_async()
            .await
            .map_err(|e| logs_err(ErrorVerb::Write, e))?;
        self.meta
            .flush_async()
            .await
            .map_err(|e| meta_err(ErrorVerb::Write, e))?;
        Ok(())
    }

    fn last_entry(&self) -> StoreResult<Option<Entry<TypeConfig>>> {
        match self.logs.last().map_err(|e| logs_err(ErrorVerb::Read, e))? {
            None => Ok(None),
            Some((_, bytes)) => codec::decode(&bytes)
                .map(Some)
                .map_err(|e| logs_err(ErrorVerb::Read, e)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => keys::log_key(*i),
            Bound::Excluded(i) => keys::log_key(i.saturating_add(1)),
            Bound::Unbounded => keys::log_key(0),
        };
        let mut entries = Vec::new();
        for item in self.logs.range(start..) {
            let (key, bytes) = item.map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let index = keys::index_of_key(&key)
                .ok_or_else(|| logs_err(ErrorVerb::Read, std::fmt::Error))?;
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> =
                codec::decode(&bytes).map_err(|e| logs_err(ErrorVerb::Read, e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged = self.get_meta::<LastPurgedKey>()?;
        let last = self.last_entry()?.map(|e| e.log_id).or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StoreResult<()> {
        self.put_meta::<VoteKey>(vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<u64>>> {
        self.get_meta::<VoteKey>()
    }

    /// Not flushed on its own: losing it only means re-applying fewer entries at start-up, and
    /// the next commit brings it back.
    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StoreResult<()> {
        self.put_meta::<CommittedKey>(&committed)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<u64>>> {
        Ok(self.get_meta::<CommittedKey>()?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| logs_err(ErrorVerb::Write, e))?;
            batch.insert(&keys::log_key(entry.log_id.index), bytes);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| logs_err(ErrorVerb::Write, e))?;
        let flusher = self.flusher.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(flush_in_groups(self.logs.clone(), rx));
            tx
        });
        if let Err(mpsc::error::SendError(callback)) = flusher.send(callback) {
            // The flusher is gone (shutting down): flush here.
            let flushed = self.logs.flush_async().await;
            callback.log_io_completed(flushed.map(|_| ()).map_err(std::io::Error::other));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range(keys::log_key(log_id.index)..) {
            let (key, _) = item.map_err(|e| logs_err(ErrorVerb::Read, e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| logs_err(ErrorVerb::Delete, e))?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StoreResult<()> {
        // Record the purge point first: a crash in between leaves extra entries, never a gap.
        self.put_meta::<LastPurgedKey>(&log_id)?;
        self.flush().await?;
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=keys::log_key(log_id.index)) {
            let (key, _) = item.map_err(|e| logs_err(ErrorVerb::Read, e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| logs_err(ErrorVerb::Delete, e))?;
        self.flush().await
    }
}

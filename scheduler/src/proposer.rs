//! Concurrent writes share Raft entries. openraft 0.9 turns each `client_write` into one log
//! entry, one append to the store and one round of replication messages, all in its single core
//! task: that bounded a leader near 2,500 creates a second however many clients waited. Here,
//! writes that arrive while earlier ones are being committed are proposed together, as one
//! `Command::Batch` entry (etcd batches the proposals of its Raft loop the same way); a write that
//! finds nothing else waiting is proposed alone, as before.
//!
//! At most [`IN_FLIGHT`] batches are being committed at a time. Writes that arrive meanwhile
//! queue up and go together in the next entry, at most [`MAX_BATCH`] of them. Each caller gets
//! its own command's result; an error of the Raft write itself (leadership lost, stopped) reaches
//! every caller of that entry, as it would have reached each alone. A write whose caller stopped
//! waiting (told the outcome is unknown after `consensus::COMMIT_WAIT`) is dropped unproposed.
//!
//! Batches are proposed only while every other member has answered this process in the current
//! format (`network`): a replica of an older version knows no `Batch` and could not apply one.
//! Until then each write is an entry of its own, proposed at once, as before batches.

use std::sync::Arc;

use openraft::error::{ClientWriteError, Fatal, RaftError};
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::network::PeerNetwork;
use crate::state::{ApplyError, ApplyResult, Command, Outcome};
use crate::Raft;

/// Entries being committed at once. Enough to keep replication busy while the next batch fills;
/// few enough that a busy leader's queue turns into batches rather than into more entries.
/// Measured with `dormant-bench placement` (64 clients, 2 cores) on one build: 2 in flight gave
/// 4,400-4,700 creates/s, 8 gave 6,600-6,700, 16 gave 3,600.
pub const IN_FLIGHT: usize = 8;
/// Commands in one entry at most: bounds an entry's size, and with openraft's
/// `max_payload_entries` (`app::raft_config`) an append-entries message's.
pub const MAX_BATCH: usize = 128;

/// What committing a command produced: its own result, or why the Raft write failed.
pub type Written = Result<ApplyResult, RaftError<u64, ClientWriteError<u64, BasicNode>>>;

struct Waiting {
    command: Command,
    reply: oneshot::Sender<Written>,
}

/// Hands commands to the batching task; cheap to share.
#[derive(Debug, Clone)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("command", &self.command)
            .finish()
    }
}

impl Proposer {
    /// Starts the batching task of replica `id` on the current runtime.
    pub fn spawn(id: u64, raft: Raft, network: PeerNetwork) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(propose_in_batches(id, raft, network, waiting));
        Self { queue }
    }

    /// Commits `command` (alone or in a batch) and returns what applying it produced.
    pub async fn write(&self, command: Command) -> Written {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Waiting { command, reply }).is_err() {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        answer
            .await
            .unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }
}

/// Whether every other member of the current membership answered this process in the
/// current format.
fn members_read_current(id: u64, raft: &Raft, network: &PeerNetwork) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let others = m
        .membership_config
        .membership()
        .nodes()
        .filter(|(member, _)| **member != id)
        .map(|(_, node)| node.addr.as_str());
    network.all_read_current(others)
}

async fn propose_in_batches(
    id: u64,
    raft: Raft,
    network: PeerNetwork,
    mut queue: mpsc::UnboundedReceiver<Waiting>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        if !members_read_current(id, &raft, &network) {
            let raft = raft.clone();
            tokio::spawn(async move { write_batch(&raft, vec![first]).await });
            continue;
        }
        // Wait for a slot before gathering: what arrives meanwhile joins this entry.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write_batch(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn write_batch(raft: &Raft, mut batch: Vec<Waiting>) {
    // Its caller was told the outcome is unknown and may have moved on: never proposed.
    batch.retain(|w| !w.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    if batch.len() == 1 {
        let Waiting { command, reply } = batch.remove(0);
        let written = raft.client_write(command).await.map(|r| r.data);
        let _ = reply.send(written);
        return;
    }
    let (commands, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|w| (w.command, w.reply)).unzip();
    let count = commands.len();
    match raft.client_write(Command::Batch(commands)).await {
        Ok(written) => match written.data {
            Ok(Outcome::Batch(results)) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            // Applying a batch yields a batch of results, one each: anything else is a bug,
            // and no caller may take it for its own answer.
            other => {
                tracing::error!(
                    ?other,
                    count,
                    "a batch was applied with an unexpected result"
                );
                let why = format!("{other:?}");
                for reply in replies {
                    let _ = reply.send(Ok(Err(ApplyError::UnexpectedBatchResult(why.clone()))));
                }
            }
        },
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

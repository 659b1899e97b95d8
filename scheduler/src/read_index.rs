//! Linearizable reads, batched. Confirming leadership costs a heartbeat round to a quorum; under
//! many concurrent requests one round answers every request that arrived before it started
//! (etcd batches its ReadIndex the same way). A request that arrives while a round is out waits
//! for the next one, which starts after it arrived: the answer is as current as its own round.
//! A leader answers only once its term is fenced (`fence`): openraft's read point alone can
//! predate a restart.

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::{mpsc, oneshot};

use crate::fence::Fence;
use crate::refusals::ConsensusError;
use crate::Raft;

type Waiter = oneshot::Sender<Result<(), ConsensusError>>;

/// Hands requests to the batching task; cheap to share.
#[derive(Debug, Clone)]
pub struct ReadIndex {
    queue: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the batching task on the current runtime.
    pub fn spawn(id: u64, raft: Raft, fence: Fence) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(confirm_in_batches(id, raft, fence, waiting));
        Self { queue }
    }

    /// Waits until this replica's state reflects every write committed before the call.
    pub async fn confirm(&self) -> Result<(), ConsensusError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(tx)
            .map_err(|_| ConsensusError::ShuttingDown)?;
        rx.await.unwrap_or(Err(ConsensusError::ShuttingDown))
    }
}

async fn confirm_in_batches(
    id: u64,
    raft: Raft,
    fence: Fence,
    mut waiting: mpsc::UnboundedReceiver<Waiter>,
) {
    while let Some(first) = waiting.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = waiting.try_recv() {
            batch.push(next);
        }
        // The read point is an entry of the term this replica leads (openraft's no-op, or the
        // commit index when later); after a restart it can predate the crash, so the term must
        // also be fenced by this process. Checked after the confirmation, not before: a replica
        // that has not published its leadership yet would otherwise skip the fence.
        // Every refusal here comes before a write proposes anything (`ConsensusError` marks
        // them "not proposed").
        let result = match linearizable_now(id, &raft).await {
            Ok(Some(read_point)) if !fence.wait(read_point.leader_id.term).await => {
                Err(ConsensusError::Unfenced {
                    term: read_point.leader_id.term,
                })
            }
            Ok(_) => Ok(()),
            Err(refused) => Err(refused),
        };
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}

/// One leadership confirmation with a quorum, then waiting for the state machine to catch up to
/// the read point, which it returns (an entry of the leader's term).
pub async fn linearizable_now(
    id: u64,
    raft: &crate::Raft,
) -> Result<Option<openraft::LogId<u64>>, ConsensusError> {
    match raft.ensure_linearizable().await {
        Ok(read_point) => Ok(read_point),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(ConsensusError::NotLeader {
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            })
        }
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
            let voters: Vec<u64> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            Err(ConsensusError::NoQuorum {
                answering: e.got.into_iter().collect(),
                voters,
            })
        }
        Err(RaftError::Fatal(fatal)) => Err(ConsensusError::Stopped {
            id,
            why: fatal.to_string(),
            before_proposing: true,
        }),
    }
}

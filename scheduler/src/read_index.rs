//! Linearizable reads, batched. Confirming leadership costs a heartbeat round to a quorum; under
//! many concurrent requests one round answers every request that arrived before it started
//! (etcd batches its ReadIndex the same way). A request that arrives while a round is out waits
//! for the next one, which starts after it arrived: the answer is as current as its own round.

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::grpc::linearizable_now;
use crate::Raft;

type Waiter = oneshot::Sender<Result<(), Status>>;

/// Hands requests to the batching task; cheap to share.
#[derive(Debug, Clone)]
pub struct ReadIndex {
    queue: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the batching task on the current runtime.
    pub fn spawn(raft: Raft) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(confirm_in_batches(raft, waiting));
        Self { queue }
    }

    /// Waits until this replica's state reflects every write committed before the call.
    pub async fn confirm(&self) -> Result<(), Status> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(tx)
            .map_err(|_| Status::unavailable("the scheduler is shutting down"))?;
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("the scheduler is shutting down")))
    }
}

async fn confirm_in_batches(raft: Raft, mut waiting: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = waiting.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = waiting.try_recv() {
            batch.push(next);
        }
        let result = linearizable_now(&raft).await;
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}

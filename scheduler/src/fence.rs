//! The leader's fence: before a leader answers anything from its state, this process commits and
//! applies an entry of the current term.
//!
//! openraft's own no-op does not suffice after a restart: a leader killed and restarted resumes
//! its term (its vote was committed) and reuses the first entry it wrote in that term, from before
//! the crash, as the read point, while its commit index restarts from the unflushed value on disk.
//! A linearizable read then answered from state missing writes acknowledged before the crash. An
//! entry this process commits itself cannot predate the crash: once it is applied, so is
//! everything committed before it (Raft's leader completeness). Flushing the commit index on every
//! commit would fix it too, at the cost of a sync per commit on the path of every write; the fence
//! costs one entry per term.
//!
//! The fence restates the cluster identity (`SetClusterId`, a no-op once one is applied, in every
//! version): no new command, so replicas of an older version apply it during a rolling upgrade.
//! While the state has no identity, the fence is the proposal that chooses it.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::state::Command;
use crate::store::SharedState;
use crate::Raft;

/// How long a read waits for a new leader's fence before it is told to retry.
const FENCE_WAIT: Duration = Duration::from_secs(3);

/// The term whose fence this process has applied, shared with readers.
#[derive(Debug, Clone)]
pub struct Fence {
    fenced: watch::Receiver<Option<u64>>,
}

impl Fence {
    /// Starts the task that fences each term this replica leads.
    pub fn spawn(id: u64, raft: Raft, state: SharedState) -> Self {
        let (tx, fenced) = watch::channel(None);
        tokio::spawn(fence_each_term(id, raft, state, tx));
        Self { fenced }
    }

    /// Whether `term`'s fence is applied here.
    pub fn holds(&self, term: u64) -> bool {
        *self.fenced.borrow() == Some(term)
    }

    /// Waits (at most [`FENCE_WAIT`]) until `term`'s fence is applied; false if it was not.
    pub async fn wait(&self, term: u64) -> bool {
        let mut fenced = self.fenced.clone();
        let applied = async move { fenced.wait_for(|t| *t == Some(term)).await.is_ok() };
        tokio::time::timeout(FENCE_WAIT, applied)
            .await
            .unwrap_or(false)
    }
}

/// A new cluster identity: 128 random bits in hex.
fn new_cluster_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whenever this replica leads in a term it has not fenced, proposes the fence; a failed
/// proposal is retried while the term lasts.
async fn fence_each_term(
    id: u64,
    raft: Raft,
    state: SharedState,
    fenced: watch::Sender<Option<u64>>,
) {
    let mut metrics = raft.metrics();
    let mut announced_identity = false;
    loop {
        let term = {
            let m = metrics.borrow_and_update();
            (m.current_leader == Some(id)).then_some(m.current_term)
        };
        if let Some(term) = term.filter(|t| *fenced.borrow() != Some(*t)) {
            let identity = state.read().cluster.cluster_id.clone();
            let proposal = Command::SetClusterId(identity.unwrap_or_else(new_cluster_id));
            match tokio::time::timeout(Duration::from_secs(10), raft.client_write(proposal)).await {
                Ok(Ok(written)) => {
                    let written_in = written.log_id.leader_id.term;
                    info!(
                        term = written_in,
                        index = written.log_id.index,
                        "leading: fenced the term, answering from applied state"
                    );
                    fenced.send_replace(Some(written_in));
                }
                Ok(Err(e)) => {
                    warn!(error = %e, term, "fencing the term; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => warn!(term, "fencing the term: not committed within 10s; retrying"),
            }
            continue;
        }
        if !announced_identity {
            if let Some(identity) = state.read().cluster.cluster_id.clone() {
                info!(cluster_id = %identity, "cluster identity");
                announced_identity = true;
            }
        }
        // Leadership shows in the metrics; checked every second anyway, as a safety net.
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await {
            return; // Raft stopped.
        }
    }
}

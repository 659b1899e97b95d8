//! Consensus as the services use it: proposing a command, confirming a linearizable read point,
//! and the lease check that lets the leader answer heartbeats without a round trip. Every
//! refusal is a typed `refusals::ConsensusError`, made a gRPC status once, at the services' edge.

use openraft::error::{ClientWriteError, RaftError};

pub use crate::refusals::ConsensusError;
use crate::replica::App;
use crate::state::{Command, Outcome};

pub use crate::refusals::COMMIT_WAIT;

/// Commits `command` through Raft and returns what applying it produced.
pub async fn propose(app: &App, command: Command) -> Result<Outcome, ConsensusError> {
    app.disk
        .check()
        .map_err(|e| ConsensusError::DiskReserve(e.to_string()))?;
    // Refused here, nothing was proposed. Once `client_write` has the command, a refusal to
    // forward may come after it was appended (and truncated, yet possibly kept by a replica that
    // wins the next election): that outcome is unknown, and not marked.
    if !app.is_leader() {
        return Err(ConsensusError::NotLeader {
            leader: app.leader(),
        });
    }
    let Ok(written) = tokio::time::timeout(COMMIT_WAIT, app.proposer.write(command)).await else {
        return Err(ConsensusError::NotCommitted);
    };
    match written {
        Ok(applied) => applied.map_err(ConsensusError::Refused),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err(ConsensusError::OutcomeUnknown(
                "leadership changed while the write was being committed",
            ))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(ConsensusError::Membership(e.to_string()))
        }
        Err(RaftError::Fatal(fatal)) => Err(ConsensusError::Stopped {
            id: app.settings.id,
            why: fatal.to_string(),
            before_proposing: false,
        }),
    }
}

/// Waits until this replica's state reflects every write committed before the call (batched
/// with concurrent callers, see `read_index`).
pub async fn linearizable(app: &App) -> Result<(), ConsensusError> {
    app.read_index.confirm().await
}

/// For a write decided from this replica's applied state (a placement), instead of a read round
/// to a quorum: this replica leads and has applied its term's fence, so its state holds every
/// write acknowledged before the call (a leader applies an entry before acknowledging it, and
/// the fence follows everything earlier terms committed). A leader deposed without knowing it
/// may decide from older state, but gets nothing committed; and `apply` checks a placement again
/// against the state at its own index.
pub async fn fenced_leader(app: &App) -> Result<(), ConsensusError> {
    let (leading, term) = {
        let metrics = app.raft.metrics();
        let m = metrics.borrow();
        (m.current_leader == Some(app.settings.id), m.current_term)
    };
    if !leading {
        return Err(ConsensusError::NotLeader {
            leader: app.leader(),
        });
    }
    if !app.fence.wait(term).await {
        return Err(ConsensusError::Unfenced { term });
    }
    Ok(())
}

/// How recently a majority must have acknowledged this leader for [`current_enough`]. A follower
/// refuses to vote for anyone for the leader lease (the maximum election timeout, 600 ms) after
/// it received a heartbeat, and openraft counts an acknowledgement from when the heartbeat was
/// sent. The figure read is openraft's metrics, published on every event and at least every tick
/// (1.5 heartbeats, 150 ms), so it may be that much old: 350 + 150 = 500 ms leaves 100 ms before
/// another leader could exist.
pub const LEASE: std::time::Duration = std::time::Duration::from_millis(350);

/// A check without a round trip, for the many heartbeats: this replica leads, has fenced its term
/// (so its state holds everything committed before, see `fence`), and a majority acknowledged it
/// within [`LEASE`] (so it is not a leader cut off and replaced). Its applied state is then at
/// least as current as anything an agent was told before. Returns the term it leads.
pub fn current_enough(app: &App) -> Result<u64, ConsensusError> {
    // Read in place: this runs for every heartbeat, and the metrics carry per-member maps.
    let (leading, term, since_ack, sole_voter) = {
        let metrics = app.raft.metrics();
        let m = metrics.borrow();
        let mut voters = m.membership_config.membership().voter_ids();
        let sole_voter = voters.next() == Some(app.settings.id) && voters.next().is_none();
        (
            m.current_leader == Some(app.settings.id),
            m.current_term,
            m.millis_since_quorum_ack,
            sole_voter,
        )
    };
    if !leading {
        return Err(ConsensusError::NotLeader {
            leader: app.leader(),
        });
    }
    if !app.fence.holds(term) {
        return Err(ConsensusError::Unfenced { term });
    }
    match since_ack {
        // The only voter: no other leader can be elected, whatever the time.
        _ if sole_voter => Ok(term),
        Some(ms) if u128::from(ms) < LEASE.as_millis() => Ok(term),
        since => Err(ConsensusError::LeaseExpired {
            since: since.map_or("never".to_string(), |ms| format!("{ms} ms ago")),
        }),
    }
}

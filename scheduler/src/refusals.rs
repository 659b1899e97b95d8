//! Refusals as gRPC statuses, with deliberate codes, made in one place: the replica is not the
//! leader, its Raft stopped, or applying a command refused it. Consensus refuses with a typed
//! [`ConsensusError`], made a status here (`From<ConsensusError> for Status`) once, at the
//! services' edge. Those made before anything was proposed carry the "not proposed" mark
//! (`dormant_proto::refusal`), which clients read.

use dormant_proto::refusal::not_proposed;
use tonic::Status;

use crate::state::ApplyError;

/// How long a write waits to be committed before the caller is told there is no quorum.
pub const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `Unavailable` naming the leader, for a replica that is not it (nothing was proposed).
pub fn not_leader(leader: Option<(u64, String)>) -> Status {
    not_proposed(Status::unavailable(not_leader_text(&leader)))
}

/// What a replica that is not the leader says: who is, if it knows.
pub fn not_leader_text(leader: &Option<(u64, String)>) -> String {
    match leader {
        Some((id, addr)) => {
            format!("this replica is not the leader; the leader is {id} at {addr}")
        }
        None => "no leader is elected yet; retry shortly".into(),
    }
}

/// A command that applying refused: the code says which kind of refusal.
pub fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::TenantExists(_) => Status::already_exists(e.to_string()),
        ApplyError::TenantNotFound(_) | ApplyError::NodeNotFound(_) => {
            Status::not_found(e.to_string())
        }
        ApplyError::StalePlacement { .. } => Status::aborted(e.to_string()),
        ApplyError::UnexpectedBatchResult(_) => Status::internal(e.to_string()),
        ApplyError::Shrink { .. } | ApplyError::NotReportable { .. } => {
            Status::invalid_argument(e.to_string())
        }
        ApplyError::Deleting(_)
        | ApplyError::DoesNotFit { .. }
        | ApplyError::NotPlaced { .. }
        | ApplyError::ForceOnReadyNode { .. }
        | ApplyError::NodeReady(_)
        | ApplyError::NodeHasTenants { .. } => Status::failed_precondition(e.to_string()),
    }
}

/// `Unavailable` for a replica whose Raft stopped (a storage error; the process exits): the
/// caller goes to another replica.
pub fn raft_stopped(id: u64, e: &openraft::error::Fatal<u64>) -> Status {
    ConsensusError::Stopped {
        id,
        why: e.to_string(),
        before_proposing: false,
    }
    .into()
}

/// Why a call through consensus was refused or could not finish.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsensusError {
    /// This replica does not lead; the leader as it knows it. Nothing was proposed.
    #[error("{}", not_leader_text(leader))]
    NotLeader { leader: Option<(u64, String)> },
    /// It leads `term` but has not applied an entry of it yet. Nothing was proposed.
    #[error(
        "this replica leads term {term} but has not yet committed an entry of it; retry shortly"
    )]
    Unfenced { term: u64 },
    /// A majority did not acknowledge this leader within the lease. Nothing was proposed.
    #[error("no quorum: a majority last acknowledged this leader {since}")]
    LeaseExpired { since: String },
    /// A read round found no majority. Nothing was proposed.
    #[error(
        "no quorum: only replicas {answering:?} of the voters {voters:?} answer; nothing is read \
         or written until a majority is back"
    )]
    NoQuorum {
        answering: Vec<u64>,
        voters: Vec<u64>,
    },
    /// The data disk is under its reserve. Nothing was proposed.
    #[error("{0}")]
    DiskReserve(String),
    /// Proposed, and not committed within [`COMMIT_WAIT`].
    #[error(
        "no quorum: the write was not committed within {COMMIT_WAIT:?}; its outcome is unknown \
         (it may still be applied): check with a read before trying again"
    )]
    NotCommitted,
    /// Proposed, and then something (leadership) changed: it may or may not be applied.
    #[error(
        "{0}; its outcome is unknown (it may still be applied): check with a read before trying \
         again"
    )]
    OutcomeUnknown(&'static str),
    /// Committed, and applying refused it.
    #[error(transparent)]
    Refused(ApplyError),
    /// A membership change openraft refused.
    #[error("membership: {0}")]
    Membership(String),
    /// This replica's Raft stopped (a storage error; the process exits): the caller goes to
    /// another replica. `before_proposing` if the call had proposed nothing.
    #[error("replica {id} stopped serving ({why}); it exits and restarts; use another replica")]
    Stopped {
        id: u64,
        why: String,
        before_proposing: bool,
    },
    /// The process is stopping.
    #[error("the scheduler is shutting down")]
    ShuttingDown,
}

impl ConsensusError {
    /// Whether nothing was proposed, so a client may send the same write again, anywhere.
    pub fn proposed_nothing(&self) -> bool {
        match self {
            Self::NotLeader { .. }
            | Self::Unfenced { .. }
            | Self::LeaseExpired { .. }
            | Self::NoQuorum { .. }
            | Self::DiskReserve(_) => true,
            Self::Stopped {
                before_proposing, ..
            } => *before_proposing,
            Self::NotCommitted
            | Self::OutcomeUnknown(_)
            | Self::Refused(_)
            | Self::Membership(_)
            | Self::ShuttingDown => false,
        }
    }
}

impl From<ConsensusError> for Status {
    fn from(e: ConsensusError) -> Status {
        let status = match &e {
            ConsensusError::NotLeader { leader } => not_leader(leader.clone()),
            ConsensusError::Stopped { .. } => Status::unavailable(e.to_string()),
            ConsensusError::Refused(refused) => apply_status(refused.clone()),
            ConsensusError::DiskReserve(_) => Status::resource_exhausted(e.to_string()),
            ConsensusError::Membership(_) => Status::failed_precondition(e.to_string()),
            ConsensusError::Unfenced { .. }
            | ConsensusError::LeaseExpired { .. }
            | ConsensusError::NoQuorum { .. }
            | ConsensusError::NotCommitted
            | ConsensusError::OutcomeUnknown(_)
            | ConsensusError::ShuttingDown => Status::unavailable(e.to_string()),
        };
        if e.proposed_nothing() {
            not_proposed(status)
        } else {
            status
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_before_proposing_are_marked_and_the_others_are_not() {
        use dormant_proto::refusal::is_not_proposed;
        let marked = [
            ConsensusError::NotLeader { leader: None },
            ConsensusError::Unfenced { term: 3 },
            ConsensusError::LeaseExpired {
                since: "never".into(),
            },
            ConsensusError::NoQuorum {
                answering: vec![1],
                voters: vec![1, 2, 3],
            },
            ConsensusError::DiskReserve("disk".into()),
            ConsensusError::Stopped {
                id: 1,
                why: "stopped".into(),
                before_proposing: true,
            },
        ];
        for e in marked {
            let status = Status::from(e.clone());
            assert!(is_not_proposed(&status), "{e:?} -> {status:?}");
        }
        let unmarked = [
            ConsensusError::NotCommitted,
            ConsensusError::OutcomeUnknown("leadership changed"),
            ConsensusError::Refused(ApplyError::TenantExists("a".into())),
            ConsensusError::Membership("busy".into()),
            ConsensusError::Stopped {
                id: 1,
                why: "stopped".into(),
                before_proposing: false,
            },
            ConsensusError::ShuttingDown,
        ];
        for e in unmarked {
            let status = Status::from(e.clone());
            assert!(!is_not_proposed(&status), "{e:?} -> {status:?}");
        }
        let refused = Status::from(ConsensusError::Refused(ApplyError::TenantExists(
            "a".into(),
        )));
        assert_eq!(refused.code(), tonic::Code::AlreadyExists);
        let disk = Status::from(ConsensusError::DiskReserve("full".into()));
        assert_eq!(disk.code(), tonic::Code::ResourceExhausted);
        let lease = Status::from(ConsensusError::LeaseExpired {
            since: "900 ms ago".into(),
        });
        assert!(lease.message().contains("900 ms ago"), "{lease:?}");
    }
}

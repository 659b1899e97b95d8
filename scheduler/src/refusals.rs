//! Refusals as gRPC statuses, with deliberate codes, made in one place: the replica is not the
//! leader, its Raft stopped, or applying a command refused it. Those made before anything was
//! proposed carry the "not proposed" mark (`dormant_proto::refusal`), which clients read.

use dormant_proto::refusal::not_proposed;
use tonic::Status;

use crate::state::ApplyError;

/// `Unavailable` naming the leader, for a replica that is not it (nothing was proposed).
pub fn not_leader(leader: Option<(u64, String)>) -> Status {
    not_proposed(match leader {
        Some((id, addr)) => Status::unavailable(format!(
            "this replica is not the leader; the leader is {id} at {addr}"
        )),
        None => Status::unavailable("no leader is elected yet; retry shortly"),
    })
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
    Status::unavailable(format!(
        "replica {id} stopped serving ({e}); it exits and restarts; use another replica"
    ))
}

//! The scheduler's own membership: add a learner, promote it to voter, remove a member, and the
//! status that shows them. Changes run on the leader one at a time (openraft refuses a second
//! joint change too, but a clear error before trying is kinder); replica ids are never reused.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Membership};
use tokio::sync::MutexGuard;
use tonic::Status;
use tracing::info;

use crate::consensus::linearizable;
use crate::replica::App;

/// How long adding a learner waits for it to catch up with the log (less than dormantctl's
/// 30 s request timeout, so the operator reads this answer rather than a client timeout).
const CATCH_UP: Duration = Duration::from_secs(20);

fn raft_status(id: u64, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    use crate::consensus::ConsensusError;
    match e {
        // The joint configuration may already be committed: not "not proposed".
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ConsensusError::OutcomeUnknown("leadership changed during the membership change")
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ConsensusError::Membership(e.to_string())
        }
        RaftError::Fatal(e) => ConsensusError::Stopped {
            id,
            why: e.to_string(),
            before_proposing: false,
        },
    }
    .into()
}

/// The latest membership this replica knows (possibly not yet committed).
fn membership(app: &App) -> Membership<u64, BasicNode> {
    app.raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone()
}

/// Takes the membership lock, or says a change is already running.
async fn one_at_a_time(app: &App) -> Result<MutexGuard<'_, ()>, Status> {
    let guard = app.membership.try_lock().map_err(|_| {
        Status::aborted("membership: another membership change is in progress; retry when it ends")
    })?;
    // Start from the committed state: a change proposed on a stale view would be refused anyway.
    linearizable(app).await?;
    Ok(guard)
}

/// Asks the replica at `address` who it is, and checks it is a fresh replica `id`.
async fn probe_new_replica(app: &App, id: u64, address: &str) -> Result<(), Status> {
    let unreachable = |why: String| {
        Status::failed_precondition(format!("address: {address} does not answer: {why}"))
    };
    let endpoint = app
        .network
        .transport()
        .endpoint(address)
        .map_err(|e| Status::invalid_argument(format!("address: {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        // The interesting part ("Connection refused") is at the end of the chain.
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = s.to_string();
            source = s.source();
        }
        unreachable(why)
    })?;
    let status = OperatorClient::new(channel)
        .cluster_status(pb::ClusterStatusRequest { stale: true })
        .await
        .map_err(|s| unreachable(s.message().to_string()))?
        .into_inner();
    if status.this_id != id {
        return Err(Status::invalid_argument(format!(
            "address: {address} answers as replica {}, not {id}",
            status.this_id
        )));
    }
    if !status.members.is_empty() {
        return Err(Status::failed_precondition(format!(
            "address: replica {id} at {address} already belongs to a cluster; \
             a new member starts with an empty data dir and without --bootstrap"
        )));
    }
    Ok(())
}

pub async fn add_learner(app: &App, id: u64, address: String) -> Result<(), Status> {
    if id == 0 {
        return Err(Status::invalid_argument("id: must be greater than 0"));
    }
    if address.is_empty() {
        return Err(Status::invalid_argument("address: required (host:port)"));
    }
    let _one = one_at_a_time(app).await?;
    if membership(app).get_node(&id).is_some() {
        return Err(Status::already_exists(format!(
            "id: {id} is already a member"
        )));
    }
    if app.state.read().member_ids_ever.contains(&id) {
        return Err(Status::failed_precondition(format!(
            "id: {id} was a member before; replica ids are never reused \
             (start the replica with a new --id and an empty data dir)"
        )));
    }
    probe_new_replica(app, id, &address).await?;
    let add = app.raft.add_learner(
        id,
        BasicNode {
            addr: address.clone(),
        },
        true,
    );
    match tokio::time::timeout(CATCH_UP, add).await {
        Ok(result) => result.map_err(|e| raft_status(app.settings.id, e))?,
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "learner {id} was not confirmed within {CATCH_UP:?}: it may be added and still \
                 catching up; see `dormantctl cluster status`"
            )))
        }
    };
    info!(member = id, %address, "learner added");
    Ok(())
}

pub async fn promote(app: &App, id: u64) -> Result<(), Status> {
    let _one = one_at_a_time(app).await?;
    let m = membership(app);
    if m.get_node(&id).is_none() {
        return Err(Status::not_found(format!("id: {id} is not a member")));
    }
    // In a joint configuration (a change cut short by a leader change) the id may be a voter of
    // one half only: adding it again completes the change.
    let uniform = m.get_joint_config().len() == 1;
    if uniform && m.voter_ids().any(|v| v == id) {
        return Err(Status::failed_precondition(format!(
            "id: {id} is already a voter"
        )));
    }
    app.raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
        .map_err(|e| raft_status(app.settings.id, e))?;
    info!(member = id, "learner promoted to voter");
    Ok(())
}

pub async fn remove(app: &App, id: u64) -> Result<(), Status> {
    let _one = one_at_a_time(app).await?;
    let m = membership(app);
    if m.get_node(&id).is_none() {
        return Err(Status::not_found(format!("id: {id} is not a member")));
    }
    let mut voters: BTreeSet<u64> = m.voter_ids().collect();
    let change = if voters.remove(&id) {
        if voters.is_empty() {
            return Err(Status::failed_precondition(format!(
                "id: {id} is the last voter; a cluster cannot remove its last voter"
            )));
        }
        // retain = false below drops it from the members too, not only from the voters.
        ChangeMembers::ReplaceAllVoters(voters)
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    app.raft
        .change_membership(change, false)
        .await
        .map_err(|e| raft_status(app.settings.id, e))?;
    info!(member = id, "member removed");
    Ok(())
}

/// This replica's view: leader, term, indexes, and the members with their roles and lag (only
/// the leader knows lag; elsewhere it is 0).
pub async fn status(app: &App) -> Result<pb::ClusterStatusResponse, Status> {
    let m = app.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: HashSet<u64> = membership.voter_ids().collect();
    let last_index = m.last_log_index.unwrap_or(0);
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let lag = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id))
                .map(|matched| last_index.saturating_sub(matched.map(|l| l.index).unwrap_or(0)))
                .unwrap_or(0);
            pb::Member {
                id: *id,
                address: node.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                lag,
            }
        })
        .collect();
    let committed = app
        .raft
        .with_raft_state(|st| st.committed.map(|l| l.index).unwrap_or(0))
        .await
        .map_err(|e| crate::refusals::raft_stopped(app.settings.id, &e))?;
    let leader_address = m
        .current_leader
        .and_then(|id| membership.get_node(&id))
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    Ok(pb::ClusterStatusResponse {
        leader_id: m.current_leader.unwrap_or(0),
        term: m.current_term,
        commit_index: committed,
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        members,
        this_id: app.settings.id,
        leader_address,
        last_log_index: last_index,
        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        // Filled in by the API, which reads the applied state.
        cluster_id: String::new(),
    })
}

//! Requests a follower cannot answer go to the leader, once. A follower forwards writes,
//! linearizable reads and heartbeats (liveness lives in the leader's memory) over the channel it
//! already keeps to the leader for Raft; `stale` reads are answered where they arrive. A request
//! that was already forwarded is never forwarded again, so a leadership change cannot loop it.

use dormant_proto::refusal::not_proposed;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::refusals::not_leader;
use crate::replica::App;

/// Metadata key a forwarding replica sets to its own id.
pub const FORWARDED_BY: &str = "dormant-forwarded-by";

/// The channel to send `req` to the leader on, or `None` to answer it here.
pub fn to_leader<T>(
    app: &App,
    req: &mut Request<T>,
    stale: bool,
) -> Result<Option<Channel>, Status> {
    if stale || app.is_leader() {
        return Ok(None);
    }
    if let Some(by) = req.metadata().get(FORWARDED_BY) {
        let by = by.to_str().unwrap_or("?");
        return Err(not_proposed(Status::unavailable(format!(
            "replica {by} forwarded this to replica {}, which is not the leader either \
             (leadership is changing); retry",
            app.settings.id
        ))));
    }
    let Some((id, addr)) = app.leader() else {
        return Err(not_leader(None));
    };
    let channel = app.network.channel(&addr).map_err(|e| {
        not_proposed(Status::unavailable(format!(
            "the leader {id} at {addr} is unreachable: {e}"
        )))
    })?;
    req.metadata_mut()
        .insert(FORWARDED_BY, MetadataValue::from(app.settings.id));
    Ok(Some(channel))
}

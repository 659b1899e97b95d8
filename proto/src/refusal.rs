//! The machine-readable part of a refusal, shared by the scheduler (which marks) and its clients
//! (which read): a status that carries [`NOT_PROPOSED`] in its metadata changed nothing, because
//! the replica refused it before proposing anything to Raft, so a write may be sent again. The
//! mark travels in the response's trailers, and a follower that forwarded the call passes the
//! leader's status back as it came, mark included.

use tonic::metadata::MetadataValue;
use tonic::Status;

/// Metadata key of the mark; its value is always `"1"`.
pub const NOT_PROPOSED: &str = "dormant-not-proposed";

/// `status`, marked as refused before anything was proposed.
pub fn not_proposed(mut status: Status) -> Status {
    status
        .metadata_mut()
        .insert(NOT_PROPOSED, MetadataValue::from_static("1"));
    status
}

/// Whether a call failed before anything was sent: its connection could not be made (refused,
/// timed out, no route). Read from the error's sources, which only the process that made the
/// call has; a replica forwarding a call marks such a failure before passing it on
/// ([`mark_if_unsent`]).
pub fn never_sent(status: &Status) -> bool {
    use std::io::ErrorKind;
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        // hyper-util's connector names the phase; its message is that library's, not ours.
        if e.to_string().starts_with("tcp connect error") {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// `status` marked if the call never left this process; as it was otherwise.
pub fn mark_if_unsent(status: Status) -> Status {
    if never_sent(&status) {
        not_proposed(status)
    } else {
        status
    }
}

/// Whether `status` carries the mark.
pub fn is_not_proposed(status: &Status) -> bool {
    status
        .metadata()
        .get(NOT_PROPOSED)
        .is_some_and(|v| v.as_bytes() == b"1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_survives_the_trailers_round_trip() {
        let marked = not_proposed(Status::unavailable("no leader is elected yet"));
        assert!(is_not_proposed(&marked));
        // What a client decodes from the trailers the server wrote.
        let response = marked.into_http::<()>();
        let decoded = Status::from_header_map(response.headers()).unwrap();
        assert!(is_not_proposed(&decoded));
        assert!(!is_not_proposed(&Status::unavailable(
            "proposed, then cut off"
        )));
    }
}

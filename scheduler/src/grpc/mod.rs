//! The scheduler's gRPC services: `api` for operators, `agent` for hosts, `raft` for peers;
//! `forward` sends what a follower cannot answer to the leader; `tls` accepts connections and
//! `authz` decides which identities may call which service.
//! Refusals are made in `crate::refusals`; consensus (proposing, reads, the lease) is in
//! `crate::consensus`.

pub mod agent;
pub mod api;
pub mod authz;
pub mod convert;
pub mod forward;
pub mod membership;
pub mod raft;
pub mod tls;

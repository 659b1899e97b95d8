//! Dormant's scheduler: a Raft-replicated state machine of nodes and tenants (openraft, stored
//! in sled), placement by capacity, and the gRPC services for operators, agents and peers.

#![deny(unsafe_code)]

pub mod app;
pub mod codec;
pub mod config;
pub mod consensus;
pub mod disk;
pub mod fence;
pub mod grpc;
pub mod heartbeat;
pub mod liveness;
pub mod metrics;
pub mod minimums;
pub mod network;
pub mod pending;
pub mod placement;
pub mod proposer;
pub mod read_index;
pub mod refusals;
pub mod replica;
pub mod state;
// openraft's storage traits fix the error type to its (large) `StorageError`; boxing it in our
// helpers would only add a conversion at every trait boundary.
#[allow(clippy::result_large_err)]
pub mod store;
pub mod transitions;

use std::io::Cursor;

openraft::declare_raft_types!(
    /// openraft's type configuration for the scheduler.
    pub TypeConfig:
        D = state::Command,
        R = state::ApplyResult,
);

pub type Raft = openraft::Raft<TypeConfig>;

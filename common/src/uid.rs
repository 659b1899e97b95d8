//! A tenant's uid: which create of a name a record, a heartbeat or a delete is about. The
//! scheduler gives it (the create's log index, or past it, see its `ClusterState::next_uid`);
//! it never repeats in a cluster's life, so a tenant deleted and created again under its name is
//! told apart. Not a Unix user id: those the agent gives its tenants' processes are `nix` `Uid`s.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stored and sent as the bare number, as it was before it had a type of its own.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct TenantUid(u64);

impl TenantUid {
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The number, for the wire and for paths.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TenantUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_stored_as_the_bare_number_older_records_hold() {
        let uid = TenantUid::new(42);
        assert_eq!(serde_json::to_string(&uid).unwrap(), "42");
        assert_eq!(serde_json::from_str::<TenantUid>("42").unwrap(), uid);
        assert_eq!(uid.to_string(), "42");
    }
}

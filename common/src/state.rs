//! The states a tenant and a node can be in, with the names the API and the CLI show.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantState {
    /// Accepted, not yet on a node (no node with room, or not yet placed).
    Pending,
    /// Placed; the agent is preparing or starting its engine.
    Starting,
    /// The engine answers on the tenant's endpoint.
    Running,
    /// Engine stopped for idleness; the endpoint still accepts connections.
    Hibernated,
    /// Hibernated and starting again because a client connected.
    Waking,
    /// The engine could not be kept running; the reason says why.
    Failed,
    /// Its node is down; its data lives on that node.
    Lost,
    /// Being removed from its node.
    Deleting,
}

impl TenantState {
    pub const ALL: [TenantState; 8] = [
        TenantState::Pending,
        TenantState::Starting,
        TenantState::Running,
        TenantState::Hibernated,
        TenantState::Waking,
        TenantState::Failed,
        TenantState::Lost,
        TenantState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TenantState::Pending => "pending",
            TenantState::Starting => "starting",
            TenantState::Running => "running",
            TenantState::Hibernated => "hibernated",
            TenantState::Waking => "waking",
            TenantState::Failed => "failed",
            TenantState::Lost => "lost",
            TenantState::Deleting => "deleting",
        }
    }
}

impl fmt::Display for TenantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state: {0:?} is not a state this version knows")]
pub struct UnknownState(pub String);

impl FromStr for TenantState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Down => "down",
        }
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeStatus {
    type Err = UnknownState;
    /// Also takes `cordoned`, which the operator API shows for a ready node that takes nothing
    /// new (the cordon itself is a flag of its own).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" | "cordoned" => Ok(NodeStatus::Ready),
            "down" => Ok(NodeStatus::Down),
            other => Err(UnknownState(other.to_string())),
        }
    }
}

/// What the scheduler wants for a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Deleted,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Deleted => "deleted",
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DesiredState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [DesiredState::Running, DesiredState::Deleted]
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_states_round_trip_through_their_names() {
        for st in TenantState::ALL {
            assert_eq!(st.as_str().parse::<TenantState>().unwrap(), st);
        }
        assert!("sleeping".parse::<TenantState>().is_err());
        for d in [DesiredState::Running, DesiredState::Deleted] {
            assert_eq!(d.as_str().parse::<DesiredState>().unwrap(), d);
        }
        for n in [NodeStatus::Ready, NodeStatus::Down] {
            assert_eq!(n.as_str().parse::<NodeStatus>().unwrap(), n);
        }
        assert_eq!("cordoned".parse::<NodeStatus>().unwrap(), NodeStatus::Ready);
    }
}

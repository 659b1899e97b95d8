//! The one place where `dormant_common`'s types and the wire's meet: `Resources` both ways,
//! `EngineAccess` onto the wire (the scheduler checks what comes back with its rules), and
//! the states that cross the wire as text, which become `dormant_common`'s enums here:
//! everything else compares enums, so a state renamed or removed fails to compile where it is
//! used. The wire keeps text (readable in `grpcurl`, and what every released agent and replica
//! speaks); a value this version does not know is an error naming it, never a guess.

use dormant_common::state::UnknownState;
use dormant_common::{
    Bytes, DesiredState, EngineAccess, MilliCpu, NodeStatus, Resources, TenantState,
};

use crate::v1;

impl From<&Resources> for v1::Resources {
    fn from(r: &Resources) -> Self {
        v1::Resources {
            milli_cpu: r.cpu.0,
            memory_bytes: r.memory.0,
            storage_bytes: r.storage.0,
        }
    }
}

impl From<&v1::Resources> for Resources {
    fn from(r: &v1::Resources) -> Self {
        Resources {
            cpu: MilliCpu(r.milli_cpu),
            memory: Bytes(r.memory_bytes),
            storage: Bytes(r.storage_bytes),
        }
    }
}

impl v1::EngineAccess {
    /// `engine`'s access as a node reports it.
    pub fn new(engine: &str, access: &EngineAccess) -> Self {
        v1::EngineAccess {
            engine: engine.to_string(),
            user: access.user.clone(),
            uri_scheme: access.uri_scheme.clone(),
            uri_path: access.uri_path.clone(),
        }
    }
}

impl v1::Tenant {
    pub fn typed_state(&self) -> Result<TenantState, UnknownState> {
        self.state.parse()
    }
}

impl v1::ObservedTenant {
    pub fn typed_state(&self) -> Result<TenantState, UnknownState> {
        self.state.parse()
    }
}

impl v1::DesiredTenant {
    pub fn typed_desired_state(&self) -> Result<DesiredState, UnknownState> {
        self.desired_state.parse()
    }
}

impl v1::Node {
    /// Ready or down; a cordoned node is ready (`cordoned` says the rest).
    pub fn typed_status(&self) -> Result<NodeStatus, UnknownState> {
        self.status.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_cross_the_wire_unchanged() {
        let r = Resources {
            cpu: MilliCpu(1500),
            memory: Bytes(3 << 30),
            storage: Bytes(7),
        };
        assert_eq!(Resources::from(&v1::Resources::from(&r)), r);
    }

    #[test]
    fn wire_states_read_as_enums_and_unknown_ones_are_errors() {
        let t = v1::Tenant {
            state: TenantState::Hibernated.to_string(),
            ..Default::default()
        };
        assert_eq!(t.typed_state(), Ok(TenantState::Hibernated));
        let d = v1::DesiredTenant {
            desired_state: "deleted".into(),
            ..Default::default()
        };
        assert_eq!(d.typed_desired_state(), Ok(DesiredState::Deleted));
        let n = v1::Node {
            status: "cordoned".into(),
            ..Default::default()
        };
        assert_eq!(n.typed_status(), Ok(NodeStatus::Ready));
        let odd = v1::Tenant {
            state: "sleeping".into(),
            ..Default::default()
        };
        assert!(odd.typed_state().is_err());
    }
}

//! What the leader remembers of heartbeats, in memory only: when each node was last heard from
//! and the latest usage it reported. Heartbeats never become Raft entries; only transitions do.

use std::collections::HashMap;
use std::time::Instant;

use dormant_common::{NodeName, TenantName};
use dormant_proto::v1::{NodeUsage, TenantUsage};

#[derive(Debug, Clone)]
pub struct NodeSeen {
    pub at: Instant,
    pub usage: NodeUsage,
}

#[derive(Debug, Default)]
pub struct Liveness {
    nodes: HashMap<NodeName, NodeSeen>,
    tenants: HashMap<TenantName, TenantUsage>,
}

impl Liveness {
    /// Records a heartbeat from `node` at `at`, with the usage it carried.
    pub fn observe(
        &mut self,
        node: &NodeName,
        at: Instant,
        usage: NodeUsage,
        tenants: impl IntoIterator<Item = (TenantName, TenantUsage)>,
    ) {
        self.nodes.insert(node.clone(), NodeSeen { at, usage });
        self.tenants.extend(tenants);
    }

    pub fn node(&self, node: &NodeName) -> Option<&NodeSeen> {
        self.nodes.get(node)
    }

    pub fn tenant_usage(&self, tenant: &TenantName) -> Option<&TenantUsage> {
        self.tenants.get(tenant)
    }

    pub fn forget_tenant(&mut self, tenant: &TenantName) {
        self.tenants.remove(tenant);
    }
}

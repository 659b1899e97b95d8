//! The per-node index, derived from the tenants and never stored: what each node's tenants
//! reserve and which ports they hold. Placement asks it for every node on every create.

use std::collections::BTreeSet;

use dormant_common::{NodeName, Resources, TenantName};

use super::{ClusterState, NodeRecord, TenantRecord, Tombstone};
use crate::placement;

/// What the tenants placed on one node reserve and use.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct NodeLoad {
    pub(super) allocated: Resources,
    pub(super) ports: BTreeSet<u16>,
    pub(super) tenants: BTreeSet<TenantName>,
}

impl ClusterState {
    /// Resources reserved on `node` by the tenants placed there (deleting ones too, until gone).
    pub fn allocated(&self, node: &NodeName) -> Resources {
        self.by_node
            .get(node)
            .map(|l| l.allocated)
            .unwrap_or_default()
    }

    pub fn tenants_on<'a>(
        &'a self,
        node: &'a NodeName,
    ) -> impl Iterator<Item = &'a TenantRecord> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flat_map(|l| l.tenants.iter())
            .filter_map(|name| self.tenants.get(name))
    }

    /// The view of every node that placement needs.
    pub fn node_views(&self) -> Vec<placement::NodeView<'_>> {
        // Both maps are ordered by node name: walked together, not looked up node by node
        // (this runs for every create, over every node).
        let mut loads = self.by_node.iter().peekable();
        self.nodes
            .values()
            .map(|n| {
                while loads.next_if(|(id, _)| *id < &n.id).is_some() {}
                let load = loads.next_if(|(id, _)| *id == &n.id).map(|(_, load)| load);
                let allocated = load.map(|l| l.allocated).unwrap_or_default();
                n.view(allocated, Self::has_free_port(n, load))
            })
            .collect()
    }

    /// Whether `node` (holding `load`) has a port left, without searching for it (placement
    /// asks for every node).
    pub(super) fn has_free_port(node: &NodeRecord, load: Option<&NodeLoad>) -> bool {
        let (first, last) = node.port_range;
        let Some(load) = load else {
            return true;
        };
        let size = usize::from(last - first) + 1;
        let all_in_range = load.ports.first().is_some_and(|p| *p >= first)
            && load.ports.last().is_some_and(|p| *p <= last);
        if all_in_range {
            // Ports in a set are distinct: fewer of them than the range holds leaves a gap.
            load.ports.len() < size
        } else {
            // The range changed since they were given (the agent registered again).
            load.ports.range(first..=last).count() < size
        }
    }

    pub(super) fn free_port(&self, node: &NodeRecord) -> Option<u16> {
        let (first, last) = node.port_range;
        let Some(load) = self.by_node.get(&node.id) else {
            return Some(first);
        };
        // Ports are given lowest first, so they are usually first..first+len: then the next one
        // is free, without walking them all.
        let len = u16::try_from(load.ports.len()).unwrap_or(u16::MAX);
        let packed = load.ports.first() == Some(&first)
            && first
                .checked_add(len - 1)
                .is_some_and(|end| load.ports.last() == Some(&end));
        if packed {
            return first.checked_add(len).filter(|p| *p <= last);
        }
        // Otherwise the first gap in the range is the lowest free port.
        let mut candidate = first;
        for &used in load.ports.range(first..=last) {
            if used != candidate {
                return Some(candidate);
            }
            candidate = candidate.checked_add(1)?;
        }
        (candidate <= last).then_some(candidate)
    }

    /// Adds a tenant, counting it on its node.
    pub(super) fn insert_tenant(&mut self, name: TenantName, t: TenantRecord) {
        if let Some(node) = &t.node {
            let load = self.by_node.entry(node.clone()).or_default();
            load.allocated = load.allocated.saturating_add(t.resources);
            load.ports.extend(t.port);
            load.tenants.insert(name.clone());
        }
        self.tenants.insert(name, t);
    }

    /// Removes a tenant and what it held on its node.
    pub(super) fn remove_tenant(&mut self, name: &TenantName) {
        let Some(t) = self.tenants.remove(name) else {
            return;
        };
        if let Some(node) = &t.node {
            if let Some(load) = self.by_node.get_mut(node) {
                load.allocated = load.allocated.saturating_sub(t.resources);
                if let Some(port) = t.port {
                    load.ports.remove(&port);
                }
                load.tenants.remove(name);
                if load.tenants.is_empty() && load.ports.is_empty() {
                    self.by_node.remove(node);
                }
            }
        }
    }

    /// Records a forced delete's tombstone on `node`; its port stays taken there.
    pub(super) fn insert_tombstone(&mut self, node: &NodeName, name: TenantName, stone: Tombstone) {
        if let Some(port) = stone.port {
            self.by_node
                .entry(node.clone())
                .or_default()
                .ports
                .insert(port);
        }
        self.tombstones
            .entry(node.clone())
            .or_default()
            .insert(name, stone);
    }

    /// Drops a tombstone (its node confirmed the tenant gone) and frees its port.
    pub(super) fn remove_tombstone(&mut self, node: &NodeName, name: &TenantName) {
        let Some(stones) = self.tombstones.get_mut(node) else {
            return;
        };
        let Some(stone) = stones.remove(name) else {
            return;
        };
        if stones.is_empty() {
            self.tombstones.remove(node);
        }
        if let (Some(port), Some(load)) = (stone.port, self.by_node.get_mut(node)) {
            load.ports.remove(&port);
            if load.tenants.is_empty() && load.ports.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// The index rebuilt from the tenants: what `by_node` must always equal.
    #[cfg(test)]
    pub(super) fn recomputed_index(&self) -> std::collections::BTreeMap<NodeName, NodeLoad> {
        let mut fresh = ClusterState::default();
        for (name, t) in &self.tenants {
            fresh.insert_tenant(name.clone(), t.clone());
        }
        for (node, stones) in &self.tombstones {
            for (name, stone) in stones {
                fresh.insert_tombstone(node, name.clone(), stone.clone());
            }
        }
        fresh.by_node
    }
}

//! `apply`: what each command does to the state, re-checking what the leader decided.

use dormant_common::{NodeName, NodeStatus, TenantName, TenantState, TenantUid};

use super::*;
use crate::placement;

impl ClusterState {
    /// Removes a placed tenant whose node is down or gone, leaving a tombstone on that node.
    pub(super) fn force_remove(&mut self, name: &TenantName, index: u64) {
        let Some(t) = self.tenants.get(name) else {
            return;
        };
        let node = t.node.clone();
        let stone = Tombstone {
            uid: t.uid,
            port: t.port,
            deleted_at: index,
        };
        self.remove_tenant(name);
        if let Some(node) = node {
            self.insert_tombstone(&node, name.clone(), stone);
        }
    }
    /// Checks that `ask` still fits on `node` and returns the port it gets there.
    pub(super) fn recheck(
        &self,
        name: &TenantName,
        node: &NodeName,
        ask: &placement::Ask<'_>,
        overcommit: f64,
    ) -> Result<u16, String> {
        let Some(record) = self.nodes.get(node) else {
            return Err("node is not registered".into());
        };
        // One tombstone per name and node: the node removes the earlier tenant first.
        if self
            .tombstones
            .get(node)
            .is_some_and(|stones| stones.contains_key(name))
        {
            return Err(format!(
                "{node}: still removing an earlier tenant of this name (deleted with --force)"
            ));
        }
        let view = record.view(self.allocated(node), true);
        placement::check(&view, ask, overcommit)?;
        self.free_port(record)
            .ok_or_else(|| format!("{node}: no free port in its range"))
    }

    /// Applies one command at log index `index`.
    pub fn apply(&mut self, index: u64, command: Command) -> ApplyResult {
        let result = self.apply_inner(index, command);
        #[cfg(test)]
        assert_eq!(
            self.by_node,
            self.recomputed_index(),
            "per-node index drifted"
        );
        result
    }

    pub(super) fn apply_inner(&mut self, index: u64, command: Command) -> ApplyResult {
        match command {
            Command::SetClusterId(id) => {
                // A leader that had not applied an earlier choice yet may propose a second one:
                // the first in the log wins on every replica.
                if self.cluster_id.is_some() {
                    return Ok(Outcome::Nothing);
                }
                self.cluster_id = Some(id);
                Ok(Outcome::Nothing)
            }
            Command::RegisterNode(mut node) => {
                // Cordoning is the operator's, not the agent's: a re-registration keeps it.
                node.cordoned = self.nodes.get(&node.id).is_some_and(|n| n.cordoned);
                node.status = NodeStatus::Ready;
                self.nodes.insert(node.id.clone(), node.clone());
                self.set_tenants_lost(&node.id, false);
                Ok(Outcome::Node(node))
            }
            Command::SetNodeStatus { node, status, .. } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                if record.status == status {
                    return Ok(Outcome::Nothing);
                }
                record.status = status;
                let record = record.clone();
                self.set_tenants_lost(&node, status == NodeStatus::Down);
                Ok(Outcome::Node(record))
            }
            Command::SetNodeCordon { node, cordoned } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                record.cordoned = cordoned;
                Ok(Outcome::Node(record.clone()))
            }
            Command::CreateTenant {
                spec,
                password,
                node,
                pending_reason,
                overcommit,
            } => {
                if self.tenants.contains_key(&spec.name) {
                    return Err(ApplyError::TenantExists(spec.name.to_string()));
                }
                let mut record = TenantRecord {
                    uid: self.next_uid(index),
                    name: spec.name.clone(),
                    engine: spec.engine,
                    resources: spec.resources,
                    password,
                    state: TenantState::Pending,
                    desired: DesiredState::Running,
                    node: None,
                    port: None,
                    reason: pending_reason,
                    deleted_at: None,
                    constraints: spec.constraints,
                    lost_from: None,
                    restart_generation: 0,
                    idle_after: spec.idle_after,
                    hibernate: spec.hibernate,
                    hibernate_generation: 0,
                    wake_generation: 0,
                };
                if let Some(node) = node {
                    // A placement that went stale leaves the tenant pending: the placer tries again.
                    match self.recheck(&record.name, &node, &record.ask(), overcommit) {
                        Ok(port) => {
                            record.state = TenantState::Starting;
                            record.node = Some(node);
                            record.port = Some(port);
                            record.reason = None;
                        }
                        Err(why) => record.reason = Some(why),
                    }
                }
                self.insert_tenant(spec.name, record.clone());
                Ok(Outcome::Tenant(record))
            }
            Command::AssignTenant {
                name,
                uid,
                node,
                overcommit,
            } => {
                let tenant = self.tenant_with_uid(&name, uid)?;
                if tenant.state != TenantState::Pending || tenant.desired != DesiredState::Running {
                    return Ok(Outcome::Nothing);
                }
                let port = self
                    .recheck(&name, &node, &tenant.ask(), overcommit)
                    .map_err(|why| ApplyError::StalePlacement {
                        tenant: name.to_string(),
                        node: node.to_string(),
                        why,
                    })?;
                let mut tenant = self.tenant_with_uid(&name, uid)?.clone();
                tenant.state = TenantState::Starting;
                tenant.node = Some(node);
                tenant.port = Some(port);
                tenant.reason = None;
                // Out and in again, so its node counts it.
                self.remove_tenant(&name);
                self.insert_tenant(name, tenant.clone());
                Ok(Outcome::Tenant(tenant))
            }
            Command::SetPendingReason { name, uid, reason } => {
                let tenant = self.tenant_with_uid_mut(&name, uid)?;
                if tenant.state != TenantState::Pending {
                    return Ok(Outcome::Nothing);
                }
                tenant.reason = Some(reason);
                Ok(Outcome::Tenant(tenant.clone()))
            }
            Command::UpdateTenant {
                name,
                uid,
                resources,
                overcommit,
                idle_after,
                hibernate,
            } => {
                let tenant = self.tenant_with_uid(&name, uid)?;
                if tenant.desired == DesiredState::Deleted {
                    return Err(ApplyError::Deleting(name.to_string()));
                }
                if resources.storage < tenant.resources.storage {
                    return Err(ApplyError::Shrink {
                        asked: resources.storage.human(),
                        has: tenant.resources.storage.human(),
                    });
                }
                // Unchanged resources need no room: a policy change must not be refused because
                // the node shrank under the tenant since it was placed.
                let resized = resources != tenant.resources;
                if let Some(node) = tenant.node.as_ref().filter(|_| resized) {
                    let record = self
                        .nodes
                        .get(node)
                        .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                    // Room as if the tenant's current reservation were already released.
                    let view =
                        record.view(self.allocated(node).saturating_sub(tenant.resources), true);
                    placement::check_room(&view, &resources, overcommit).map_err(|why| {
                        ApplyError::DoesNotFit {
                            tenant: name.to_string(),
                            why,
                        }
                    })?;
                }
                let mut tenant = self.tenant_with_uid(&name, uid)?.clone();
                tenant.resources = resources;
                if let Some(idle_after) = idle_after {
                    tenant.idle_after = idle_after;
                }
                if let Some(hibernate) = hibernate {
                    tenant.hibernate = hibernate;
                }
                self.remove_tenant(&name);
                self.insert_tenant(name, tenant.clone());
                Ok(Outcome::Tenant(tenant))
            }
            Command::DeleteTenant { name } => {
                let tenant = self
                    .tenants
                    .get_mut(&name)
                    .ok_or_else(|| ApplyError::TenantNotFound(name.to_string()))?;
                if tenant.node.is_none() {
                    self.remove_tenant(&name);
                    return Ok(Outcome::Removed);
                }
                if tenant.desired != DesiredState::Deleted {
                    tenant.desired = DesiredState::Deleted;
                    tenant.state = TenantState::Deleting;
                    tenant.deleted_at = Some(index);
                    tenant.reason = None;
                }
                Ok(Outcome::Tenant(tenant.clone()))
            }
            Command::RestartTenant { name, uid } => {
                self.raise_generation(&name, uid, EngineAction::Restart)
            }
            Command::HibernateTenant { name, uid } => {
                self.raise_generation(&name, uid, EngineAction::Hibernate)
            }
            Command::WakeTenant { name, uid } => {
                self.raise_generation(&name, uid, EngineAction::Wake)
            }
            Command::ObserveTenant {
                node,
                name,
                uid,
                state,
                reason,
            } => {
                let tenant = self.tenant_with_uid_mut(&name, uid)?;
                // Reports from a node the tenant is not on, or about a tenant being deleted, change nothing.
                if tenant.node.as_ref() != Some(&node) || tenant.desired == DesiredState::Deleted {
                    return Ok(Outcome::Nothing);
                }
                // The heartbeat handler never proposes these; a log that holds one anyway (another
                // version, a bug) must not make an agent the author of a scheduler's state.
                if !AGENT_REPORTED_STATES.contains(&state) {
                    return Err(ApplyError::NotReportable {
                        tenant: name.to_string(),
                        state,
                    });
                }
                tenant.state = state;
                tenant.reason = reason;
                tenant.lost_from = None;
                Ok(Outcome::Tenant(tenant.clone()))
            }
            Command::RemoveTenant { name, uid } => {
                self.tenant_with_uid(&name, uid)?;
                self.remove_tenant(&name);
                Ok(Outcome::Removed)
            }
            Command::ForceDeleteTenant { name, uid } => {
                let tenant = self.tenant_with_uid(&name, uid)?;
                if let Some(node) = tenant.node.as_ref().and_then(|n| self.nodes.get(n)) {
                    if node.status == NodeStatus::Ready {
                        return Err(ApplyError::ForceOnReadyNode {
                            tenant: name.to_string(),
                            node: node.id.to_string(),
                        });
                    }
                }
                self.force_remove(&name, index);
                Ok(Outcome::Removed)
            }
            Command::RemoveNode { node, force } => {
                let record = self
                    .nodes
                    .get(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.to_string()))?;
                let on_it: Vec<TenantName> =
                    self.tenants_on(&node).map(|t| t.name.clone()).collect();
                if !force {
                    if record.status == NodeStatus::Ready {
                        return Err(ApplyError::NodeReady(node.to_string()));
                    }
                    if !on_it.is_empty() {
                        const SHOWN: usize = 10;
                        let mut tenants: Vec<&str> =
                            on_it.iter().take(SHOWN).map(TenantName::as_str).collect();
                        let more = format!("and {} more", on_it.len().saturating_sub(SHOWN));
                        if on_it.len() > SHOWN {
                            tenants.push(&more);
                        }
                        return Err(ApplyError::NodeHasTenants {
                            node: node.to_string(),
                            tenants: tenants.join(", "),
                        });
                    }
                }
                for name in &on_it {
                    self.force_remove(name, index);
                }
                self.nodes.remove(&node);
                Ok(Outcome::NodeRemoved(on_it))
            }
            Command::ForgetTombstone { node, name, uid } => {
                let matches = self
                    .tombstones
                    .get(&node)
                    .and_then(|stones| stones.get(&name))
                    .is_some_and(|stone| stone.uid == uid);
                if matches {
                    self.remove_tombstone(&node, &name);
                    Ok(Outcome::Removed)
                } else {
                    Ok(Outcome::Nothing)
                }
            }
            // The state machine unpacks batches itself (it checks each command's term and logs
            // its transitions); this is the same order for callers that hold a state only.
            Command::Batch(commands) => Ok(Outcome::Batch(
                commands
                    .into_iter()
                    .map(|command| self.apply_inner(index, command))
                    .collect(),
            )),
        }
    }

    /// Raises the generation of `action` for a placed tenant that is not being deleted: its agent
    /// acts once for the new value.
    pub(super) fn raise_generation(
        &mut self,
        name: &TenantName,
        uid: TenantUid,
        action: EngineAction,
    ) -> ApplyResult {
        let tenant = self.tenant_with_uid_mut(name, uid)?;
        if tenant.desired == DesiredState::Deleted {
            return Err(ApplyError::Deleting(name.to_string()));
        }
        if tenant.node.is_none() {
            return Err(ApplyError::NotPlaced {
                tenant: name.to_string(),
                action,
            });
        }
        let generation = match action {
            EngineAction::Restart => &mut tenant.restart_generation,
            EngineAction::Hibernate => &mut tenant.hibernate_generation,
            EngineAction::Wake => &mut tenant.wake_generation,
        };
        *generation += 1;
        Ok(Outcome::Tenant(tenant.clone()))
    }

    /// Marks the tenants of `node` that are meant to run lost (remembering their state, whichever
    /// it was: a hibernated tenant comes back hibernated, its reservation kept meanwhile), or
    /// restores them.
    pub(super) fn set_tenants_lost(&mut self, node: &NodeName, lost: bool) {
        let names: Vec<TenantName> = self.tenants_on(node).map(|t| t.name.clone()).collect();
        for name in &names {
            let Some(t) = self.tenants.get_mut(name) else {
                continue;
            };
            if t.desired != DesiredState::Running {
                continue;
            }
            if lost && t.state != TenantState::Lost {
                t.lost_from = Some(t.state);
                t.state = TenantState::Lost;
            } else if !lost {
                if let Some(previous) = t.lost_from.take() {
                    t.state = previous;
                }
            }
        }
    }

    pub(super) fn tenant_with_uid(
        &self,
        name: &TenantName,
        uid: TenantUid,
    ) -> Result<&TenantRecord, ApplyError> {
        self.tenants
            .get(name)
            .filter(|t| t.uid == uid)
            .ok_or_else(|| ApplyError::TenantNotFound(name.to_string()))
    }

    pub(super) fn tenant_with_uid_mut(
        &mut self,
        name: &TenantName,
        uid: TenantUid,
    ) -> Result<&mut TenantRecord, ApplyError> {
        self.tenants
            .get_mut(name)
            .filter(|t| t.uid == uid)
            .ok_or_else(|| ApplyError::TenantNotFound(name.to_string()))
    }
}

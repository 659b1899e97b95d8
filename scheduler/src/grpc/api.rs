//! The operator API: create, read, update, restart, hibernate, wake and delete tenants, list and
//! cordon nodes, show and change the scheduler's membership. A follower forwards every call to the
//! leader unless the read asks for `stale`. Validation happens before anything is proposed, so a
//! refused request changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{Bytes, MilliCpu, NodeName, NodeStatus, Resources, TenantName};
use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use dormant_proto::v1::operator_server::{Operator, OperatorServer};
use rand::distr::{Alphanumeric, SampleString};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::convert::{credentials, node_to_pb, tenant_to_pb, tenants_to_pb};
use super::{authz, forward, membership};
use crate::consensus::{fenced_leader, linearizable, propose};
use crate::minimums;
use crate::placement;
use crate::replica::App;
use crate::state::{
    ApplyError, ClusterState, Command, DesiredState, EngineAction, Outcome, TenantSpec,
};

/// Engines every agent knows without configuration; others are known once a node offers them.
pub const BUILTIN_ENGINES: [&str; 2] = ["postgres", "redis"];

pub struct OperatorService {
    app: Arc<App>,
}

pub fn server(app: Arc<App>) -> OperatorServer<OperatorService> {
    OperatorServer::new(OperatorService { app })
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn parse_name(name: &str) -> Result<TenantName, Status> {
    TenantName::parse(name).map_err(invalid)
}

/// Parses `key=value` label constraints; keys are label names, values non-empty. Both are
/// bounded as a node's labels are (no longer value could match one), so a tenant record stays
/// small in the log.
fn parse_constraints(raw: &[String]) -> Result<BTreeMap<String, String>, Status> {
    use super::agent::{MAX_LABELS, MAX_STRING_LEN};
    if raw.len() > MAX_LABELS {
        return Err(invalid(format!(
            "constraints: {} given, at most {MAX_LABELS} allowed",
            raw.len()
        )));
    }
    let mut constraints = BTreeMap::new();
    for c in raw {
        let Some((key, value)) = c.split_once('=') else {
            return Err(invalid(format!("constraints: {c:?} is not key=value")));
        };
        let label_char = |ch: char| ch.is_ascii_alphanumeric() || "-_./".contains(ch);
        if key.is_empty() || key.len() > 63 || !key.chars().all(label_char) {
            return Err(invalid(format!(
                "constraints: key {key:?} must be 1-63 letters, digits, '-', '_', '.' or '/'"
            )));
        }
        if value.is_empty() {
            return Err(invalid(format!("constraints: {c:?} has an empty value")));
        }
        if value.len() > MAX_STRING_LEN {
            return Err(invalid(format!(
                "constraints: the value of {key} has {} bytes, at most {MAX_STRING_LEN} allowed \
                 (a node label value's limit)",
                value.len()
            )));
        }
        if let Some(other) = constraints.insert(key.to_string(), value.to_string()) {
            if other != value {
                return Err(invalid(format!(
                    "constraints: {key} asked to be both {other} and {value}"
                )));
            }
        }
    }
    Ok(constraints)
}

/// Parses `idle_after` ("30s", "10m", "never"); empty is `None` (the default on create,
/// unchanged on update). The refusal names the field.
fn parse_idle_after(raw: &str) -> Result<Option<IdleAfter>, Status> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(invalid)
}

/// Parses `hibernate` ("stop" or "freeze"); empty is `None`, as for [`parse_idle_after`].
fn parse_hibernate(raw: &str) -> Result<Option<HibernateMode>, Status> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(invalid)
}

/// Parses and checks a create request against the rules that need no cluster state.
fn parse_spec(req: &pb::CreateTenantRequest) -> Result<TenantSpec, Status> {
    let name = parse_name(&req.name)?;
    if req.engine.is_empty() {
        return Err(Status::invalid_argument("engine: required"));
    }
    let resources = Resources {
        cpu: MilliCpu::parse("cpu", &req.cpu).map_err(invalid)?,
        memory: Bytes::parse("memory", &req.memory).map_err(invalid)?,
        storage: Bytes::parse("storage", &req.storage).map_err(invalid)?,
    };
    minimums::check(&req.engine, &resources).map_err(Status::invalid_argument)?;
    Ok(TenantSpec {
        name,
        engine: req.engine.clone(),
        resources,
        constraints: parse_constraints(&req.constraints)?,
        idle_after: parse_idle_after(&req.idle_after)?.unwrap_or_default(),
        hibernate: parse_hibernate(&req.hibernate)?.unwrap_or_default(),
    })
}

/// Checks the rules that need the cluster state: a known engine, a size some node could hold.
fn check_against_cluster(
    spec: &TenantSpec,
    cluster: &ClusterState,
    overcommit: f64,
) -> Result<(), Status> {
    let mut known: BTreeSet<&str> = BUILTIN_ENGINES.into_iter().collect();
    known.extend(
        cluster
            .nodes
            .values()
            .flat_map(|n| n.engines.iter().map(String::as_str)),
    );
    if !known.contains(spec.engine.as_str()) {
        let known: Vec<&str> = known.into_iter().collect();
        return Err(Status::invalid_argument(format!(
            "engine: unknown engine {:?}; known engines: {}",
            spec.engine,
            known.join(", ")
        )));
    }
    if cluster.tenants.contains_key(&spec.name) {
        return Err(Status::already_exists(format!(
            "name: tenant {:?} already exists",
            spec.name.as_str()
        )));
    }
    // Bigger than every node's whole capacity: it could never run here, so refuse instead of
    // leaving it pending forever.
    let ready: Vec<Resources> = cluster
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Ready)
        .map(|n| n.capacity.scaled(overcommit))
        .collect();
    if !ready.is_empty() && !ready.iter().any(|cap| spec.resources.fits_in(cap)) {
        let max_cpu = ready.iter().map(|c| c.cpu).max().unwrap_or_default();
        let max_mem = ready.iter().map(|c| c.memory).max().unwrap_or_default();
        let max_sto = ready.iter().map(|c| c.storage).max().unwrap_or_default();
        let r = &spec.resources;
        let msg = if r.cpu > max_cpu {
            format!(
                "cpu: {} asked, more than any node's capacity ({} at most)",
                r.cpu, max_cpu
            )
        } else if r.memory > max_mem {
            format!(
                "memory: {} asked, more than any node's capacity ({} at most)",
                r.memory.human(),
                max_mem.human()
            )
        } else if r.storage > max_sto {
            format!(
                "storage: {} asked, more than any node's capacity ({} at most)",
                r.storage.human(),
                max_sto.human()
            )
        } else {
            "resources: no single node has this much cpu, memory and storage together".to_string()
        };
        return Err(Status::invalid_argument(msg));
    }
    Ok(())
}

fn tenant_of(outcome: Outcome) -> Result<crate::state::TenantRecord, Status> {
    match outcome {
        Outcome::Tenant(t) => Ok(t),
        other => Err(Status::internal(format!(
            "unexpected apply outcome {other:?}"
        ))),
    }
}

/// `status` with this replica's view of the cluster identity (empty until the first leader has
/// chosen it, or this replica has applied that choice).
fn with_cluster_id(
    app: &App,
    mut status: pb::ClusterStatusResponse,
) -> Response<pb::ClusterStatusResponse> {
    status.cluster_id = app
        .state
        .read()
        .cluster
        .cluster_id
        .clone()
        .unwrap_or_default();
    Response::new(status)
}

impl OperatorService {
    /// Asks a placed tenant's engine to `action` once (restart, hibernate, wake) by raising that
    /// generation. Refused here with the rule; apply checks again against the state at its log
    /// index. Each call that is applied asks once more, so it is never resent blindly.
    async fn raise_generation(
        &self,
        name: &str,
        action: EngineAction,
    ) -> Result<Response<pb::Tenant>, Status> {
        let name = parse_name(name)?;
        linearizable(&self.app).await?;
        let uid = {
            let sm = self.app.state.read();
            let t = sm.cluster.tenants.get(&name).ok_or_else(|| {
                Status::not_found(format!("name: tenant {:?} not found", name.as_str()))
            })?;
            if t.desired == DesiredState::Deleted {
                let done = match action {
                    EngineAction::Restart => "restarted",
                    EngineAction::Hibernate => "hibernated",
                    EngineAction::Wake => "woken",
                };
                return Err(Status::failed_precondition(format!(
                    "name: tenant {:?} is being deleted; a deleted tenant is not {done}",
                    name.as_str()
                )));
            }
            if t.node.is_none() {
                return Err(crate::refusals::apply_status(ApplyError::NotPlaced {
                    tenant: name.to_string(),
                    action,
                }));
            }
            t.uid
        };
        let command = match action {
            EngineAction::Restart => Command::RestartTenant { name, uid },
            EngineAction::Hibernate => Command::HibernateTenant { name, uid },
            EngineAction::Wake => Command::WakeTenant { name, uid },
        };
        let tenant = tenant_of(propose(&self.app, command).await?)?;
        let generation = match action {
            EngineAction::Restart => tenant.restart_generation,
            EngineAction::Hibernate => tenant.hibernate_generation,
            EngineAction::Wake => tenant.wake_generation,
        };
        info!(tenant_id = %tenant.name, uid = tenant.uid.get(), generation, "tenant {action} requested");
        let sm = self.app.state.read();
        Ok(Response::new(tenant_to_pb(
            &tenant,
            &sm.cluster,
            &self.app.liveness(),
            self.app.settings.overcommit_ratio,
        )))
    }
}

/// Answers the call on the leader: a follower returns the leader's answer.
macro_rules! on_leader {
    ($self:ident, $req:ident, $stale:expr, $method:ident) => {
        if let Some(leader) = forward::to_leader(&$self.app, &mut $req, $stale)? {
            // A leader that could not be reached got nothing: say so for the caller's retry.
            return OperatorClient::new(leader)
                .$method($req)
                .await
                .map_err(dormant_proto::refusal::mark_if_unsent);
        }
    };
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn create_tenant(
        &self,
        mut req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        on_leader!(self, req, false, create_tenant);
        let req = req.into_inner();
        let spec = parse_spec(&req)?;
        // No read round: the placement is checked again at apply (`consensus::fenced_leader`).
        fenced_leader(&self.app).await?;
        let settings = &self.app.settings;
        let decide = || {
            let sm = self.app.state.read();
            check_against_cluster(&spec, &sm.cluster, settings.overcommit_ratio)?;
            Ok::<_, Status>(
                match placement::place(
                    &spec.ask(),
                    &sm.cluster.node_views(),
                    settings.placement,
                    settings.overcommit_ratio,
                ) {
                    Ok(node) => (Some(node), None),
                    Err(why) => (None, Some(why.to_string())),
                },
            )
        };
        // A refusal is an answer from this replica's state alone: only once a quorum confirms
        // it still leads (a deposed leader may not know of a delete that freed the name).
        let (node, pending_reason) = match decide() {
            Ok(decided) => decided,
            Err(_) => {
                linearizable(&self.app).await?;
                decide()?
            }
        };
        let password = Alphanumeric.sample_string(&mut rand::rng(), 24);
        let tenant = tenant_of(
            propose(
                &self.app,
                Command::CreateTenant {
                    spec,
                    password,
                    node,
                    pending_reason,
                    overcommit: settings.overcommit_ratio,
                },
            )
            .await?,
        )?;
        // `transitions` logs the creation at info on every replica; this adds the details.
        debug!(tenant_id = %tenant.name, uid = tenant.uid.get(), state = %tenant.state, node = ?tenant.node, idle_after = %tenant.idle_after, hibernate = %tenant.hibernate, "tenant created");
        if tenant.node.is_some() {
            self.app.counters.placements.inc();
        } else {
            self.app.counters.placement_refusals.inc();
        }
        if tenant.node.is_none() {
            // Pending: perhaps only because concurrent creates made our choice stale.
            self.app.placer.notify_one();
        }
        let sm = self.app.state.read();
        let live = self.app.liveness();
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant_to_pb(
                &tenant,
                &sm.cluster,
                &live,
                self.app.settings.overcommit_ratio,
            )),
            credentials: Some(credentials(&tenant, &sm.cluster)),
        }))
    }

    async fn restart_tenant(
        &self,
        mut req: Request<pb::RestartTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        on_leader!(self, req, false, restart_tenant);
        self.raise_generation(&req.into_inner().name, EngineAction::Restart)
            .await
    }

    async fn hibernate_tenant(
        &self,
        mut req: Request<pb::HibernateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        on_leader!(self, req, false, hibernate_tenant);
        self.raise_generation(&req.into_inner().name, EngineAction::Hibernate)
            .await
    }

    async fn wake_tenant(
        &self,
        mut req: Request<pb::WakeTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        on_leader!(self, req, false, wake_tenant);
        self.raise_generation(&req.into_inner().name, EngineAction::Wake)
            .await
    }

    async fn update_tenant(
        &self,
        mut req: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        on_leader!(self, req, false, update_tenant);
        let req = req.into_inner();
        let name = parse_name(&req.name)?;
        if req.cpu.is_empty()
            && req.memory.is_empty()
            && req.storage.is_empty()
            && req.idle_after.is_empty()
            && req.hibernate.is_empty()
        {
            return Err(Status::invalid_argument(
                "resources: give at least one of cpu, memory, storage, idle_after or hibernate",
            ));
        }
        let idle_after = parse_idle_after(&req.idle_after)?;
        let hibernate = parse_hibernate(&req.hibernate)?;
        linearizable(&self.app).await?;
        let (uid, current, engine) = {
            let sm = self.app.state.read();
            let t = sm.cluster.tenants.get(&name).ok_or_else(|| {
                Status::not_found(format!("tenant {:?} not found", name.as_str()))
            })?;
            (t.uid, t.resources, t.engine.clone())
        };
        let resources = Resources {
            cpu: if req.cpu.is_empty() {
                current.cpu
            } else {
                MilliCpu::parse("cpu", &req.cpu).map_err(invalid)?
            },
            memory: if req.memory.is_empty() {
                current.memory
            } else {
                Bytes::parse("memory", &req.memory).map_err(invalid)?
            },
            storage: if req.storage.is_empty() {
                current.storage
            } else {
                Bytes::parse("storage", &req.storage).map_err(invalid)?
            },
        };
        // Only the sizes given are held to the minimum: a tenant made before it existed keeps
        // what it has.
        let given = Resources {
            cpu: resources.cpu,
            memory: Bytes(if req.memory.is_empty() {
                u64::MAX
            } else {
                resources.memory.0
            }),
            storage: Bytes(if req.storage.is_empty() {
                u64::MAX
            } else {
                resources.storage.0
            }),
        };
        minimums::check(&engine, &given).map_err(Status::invalid_argument)?;
        let tenant = tenant_of(
            propose(
                &self.app,
                Command::UpdateTenant {
                    name,
                    uid,
                    resources,
                    overcommit: self.app.settings.overcommit_ratio,
                    idle_after,
                    hibernate,
                },
            )
            .await?,
        )?;
        info!(tenant_id = %tenant.name, uid = tenant.uid.get(), cpu = %tenant.resources.cpu, memory = %tenant.resources.memory, storage = %tenant.resources.storage, idle_after = %tenant.idle_after, hibernate = %tenant.hibernate, "tenant updated");
        let sm = self.app.state.read();
        Ok(Response::new(tenant_to_pb(
            &tenant,
            &sm.cluster,
            &self.app.liveness(),
            self.app.settings.overcommit_ratio,
        )))
    }

    async fn get_tenant(
        &self,
        mut req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let stale = req.get_ref().stale;
        on_leader!(self, req, stale, get_tenant);
        let name = parse_name(&req.into_inner().name)?;
        if !stale {
            linearizable(&self.app).await?;
        }
        let sm = self.app.state.read();
        let t =
            sm.cluster.tenants.get(&name).ok_or_else(|| {
                Status::not_found(format!("tenant {:?} not found", name.as_str()))
            })?;
        Ok(Response::new(tenant_to_pb(
            t,
            &sm.cluster,
            &self.app.liveness(),
            self.app.settings.overcommit_ratio,
        )))
    }

    async fn list_tenants(
        &self,
        mut req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let stale = req.get_ref().stale;
        on_leader!(self, req, stale, list_tenants);
        if !stale {
            linearizable(&self.app).await?;
        }
        let sm = self.app.state.read();
        let live = self.app.liveness();
        let tenants = tenants_to_pb(
            sm.cluster.tenants.values(),
            &sm.cluster,
            &live,
            self.app.settings.overcommit_ratio,
        );
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }

    async fn delete_tenant(
        &self,
        mut req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        on_leader!(self, req, false, delete_tenant);
        let req = req.into_inner();
        let name = parse_name(&req.name)?;
        let command = if req.force {
            linearizable(&self.app).await?;
            let uid = self
                .app
                .state
                .read()
                .cluster
                .tenants
                .get(&name)
                .map(|t| t.uid)
                .ok_or_else(|| {
                    Status::not_found(format!("tenant {:?} not found", name.as_str()))
                })?;
            Command::ForceDeleteTenant {
                name: name.clone(),
                uid,
            }
        } else {
            Command::DeleteTenant { name: name.clone() }
        };
        let outcome = propose(&self.app, command).await?;
        if req.force {
            self.app.liveness().forget_tenant(&name);
            warn!(tenant_id = %name, "tenant deleted with --force: its node, if it returns, removes its data");
        } else {
            info!(tenant_id = %name, "tenant delete requested");
        }
        let sm = self.app.state.read();
        let tenant = match outcome {
            Outcome::Tenant(t) => tenant_to_pb(
                &t,
                &sm.cluster,
                &self.app.liveness(),
                self.app.settings.overcommit_ratio,
            ),
            // A pending tenant had nothing on any node and is gone already.
            _ => pb::Tenant {
                name: name.to_string(),
                removed: true,
                ..Default::default()
            },
        };
        Ok(Response::new(tenant))
    }

    async fn get_credentials(
        &self,
        mut req: Request<pb::GetCredentialsRequest>,
    ) -> Result<Response<pb::Credentials>, Status> {
        authz::may_read_secrets(&req, "GetCredentials")?;
        on_leader!(self, req, false, get_credentials);
        let name = parse_name(&req.into_inner().name)?;
        linearizable(&self.app).await?;
        let sm = self.app.state.read();
        let t =
            sm.cluster.tenants.get(&name).ok_or_else(|| {
                Status::not_found(format!("tenant {:?} not found", name.as_str()))
            })?;
        Ok(Response::new(credentials(t, &sm.cluster)))
    }

    async fn list_nodes(
        &self,
        mut req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let stale = req.get_ref().stale;
        on_leader!(self, req, stale, list_nodes);
        if !stale {
            linearizable(&self.app).await?;
        }
        let sm = self.app.state.read();
        let live = self.app.liveness();
        let nodes = sm
            .cluster
            .nodes
            .values()
            .map(|n| node_to_pb(n, &sm.cluster, &live))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn cluster_status(
        &self,
        mut req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let stale = req.get_ref().stale;
        on_leader!(self, req, stale, cluster_status);
        Ok(with_cluster_id(
            &self.app,
            membership::status(&self.app).await?,
        ))
    }

    async fn add_learner(
        &self,
        mut req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        on_leader!(self, req, false, add_learner);
        let req = req.into_inner();
        membership::add_learner(&self.app, req.id, req.address).await?;
        Ok(with_cluster_id(
            &self.app,
            membership::status(&self.app).await?,
        ))
    }

    async fn promote_member(
        &self,
        mut req: Request<pb::PromoteMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        on_leader!(self, req, false, promote_member);
        membership::promote(&self.app, req.into_inner().id).await?;
        Ok(with_cluster_id(
            &self.app,
            membership::status(&self.app).await?,
        ))
    }

    async fn remove_member(
        &self,
        mut req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        on_leader!(self, req, false, remove_member);
        membership::remove(&self.app, req.into_inner().id).await?;
        Ok(with_cluster_id(
            &self.app,
            membership::status(&self.app).await?,
        ))
    }

    async fn remove_node(
        &self,
        mut req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        on_leader!(self, req, false, remove_node);
        let req = req.into_inner();
        let node = NodeName::parse(&req.id).map_err(invalid)?;
        let outcome = propose(
            &self.app,
            Command::RemoveNode {
                node: node.clone(),
                force: req.force,
            },
        )
        .await?;
        let Outcome::NodeRemoved(deleted) = outcome else {
            return Err(Status::internal(format!(
                "unexpected apply outcome {outcome:?}"
            )));
        };
        let mut live = self.app.liveness();
        live.forget_node(&node);
        for name in &deleted {
            live.forget_tenant(name);
        }
        drop(live);
        warn!(node_id = %node, force = req.force, deleted_tenants = deleted.len(), "node removed");
        Ok(Response::new(pb::RemoveNodeResponse {
            deleted_tenants: deleted.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn set_node_cordon(
        &self,
        mut req: Request<pb::SetNodeCordonRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        on_leader!(self, req, false, set_node_cordon);
        let req = req.into_inner();
        let node = NodeName::parse(&req.id).map_err(invalid)?;
        let outcome = propose(
            &self.app,
            Command::SetNodeCordon {
                node: node.clone(),
                cordoned: req.cordoned,
            },
        )
        .await?;
        info!(node_id = %node, cordoned = req.cordoned, "node cordon changed");
        if !req.cordoned {
            self.app.placer.notify_one();
        }
        let Outcome::Node(record) = outcome else {
            return Err(Status::internal(format!(
                "unexpected apply outcome {outcome:?}"
            )));
        };
        let sm = self.app.state.read();
        Ok(Response::new(node_to_pb(
            &record,
            &sm.cluster,
            &self.app.liveness(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_utils::{node, res};

    fn req(
        name: &str,
        engine: &str,
        cpu: &str,
        memory: &str,
        storage: &str,
    ) -> pb::CreateTenantRequest {
        pb::CreateTenantRequest {
            name: name.into(),
            engine: engine.into(),
            cpu: cpu.into(),
            memory: memory.into(),
            storage: storage.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (req("../x", "postgres", "1", "1GiB", "1GiB"), "name:"),
            (req("a", "", "1", "1GiB", "1GiB"), "engine:"),
            (req("a", "postgres", "-1", "1GiB", "1GiB"), "cpu:"),
            (req("a", "postgres", "1", "0", "1GiB"), "memory:"),
            (req("a", "postgres", "1", "1GiB", "ten"), "storage:"),
            (
                pb::CreateTenantRequest {
                    idle_after: "soon".into(),
                    ..req("a", "postgres", "1", "1GiB", "1GiB")
                },
                "idle_after:",
            ),
            (
                pb::CreateTenantRequest {
                    idle_after: "0s".into(),
                    ..req("a", "postgres", "1", "1GiB", "1GiB")
                },
                "idle_after:",
            ),
            (
                pb::CreateTenantRequest {
                    hibernate: "pause".into(),
                    ..req("a", "postgres", "1", "1GiB", "1GiB")
                },
                "hibernate:",
            ),
        ];
        for (r, field) in cases {
            let status = parse_spec(&r).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }

    #[test]
    fn unknown_engine_and_oversize_are_refused_with_the_rule() {
        let mut cluster = ClusterState::default();
        let n = node("a", res(2000, 4096, 100));
        cluster.nodes.insert(n.id.clone(), n);
        let spec = parse_spec(&req("a", "mysql", "1", "1GiB", "1GiB")).unwrap();
        let err = check_against_cluster(&spec, &cluster, 1.0).unwrap_err();
        assert!(
            err.message()
                .starts_with("engine: unknown engine \"mysql\""),
            "{}",
            err.message()
        );
        let spec = parse_spec(&req("a", "postgres", "1", "64GiB", "1GiB")).unwrap();
        let err = check_against_cluster(&spec, &cluster, 1.0).unwrap_err();
        assert_eq!(
            err.message(),
            "memory: 64GiB asked, more than any node's capacity (4GiB at most)"
        );
    }

    #[test]
    fn constraints_must_be_key_value() {
        let mut r = req("a", "postgres", "1", "1GiB", "1GiB");
        r.constraints = vec!["zone=eu-1".into(), "rack=r2".into()];
        let spec = parse_spec(&r).unwrap();
        assert_eq!(spec.constraints["zone"], "eu-1");
        let long = format!("zone={}", "e".repeat(64));
        for (bad, message) in [
            ("zone", "constraints: \"zone\" is not key=value"),
            ("=eu", "constraints: key \"\" must be 1-63"),
            ("zone=", "constraints: \"zone=\" has an empty value"),
            (
                long.as_str(),
                "constraints: the value of zone has 64 bytes, at most 63 allowed",
            ),
        ] {
            r.constraints = vec![bad.into()];
            let err = parse_spec(&r).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(message), "{}", err.message());
        }
        r.constraints = vec!["zone=a".into(), "zone=b".into()];
        let err = parse_spec(&r).unwrap_err();
        assert_eq!(err.message(), "constraints: zone asked to be both a and b");
        r.constraints = (0..65).map(|i| format!("k{i}=v")).collect();
        let err = parse_spec(&r).unwrap_err();
        assert_eq!(err.message(), "constraints: 65 given, at most 64 allowed");
    }

    #[test]
    fn the_hibernation_policy_defaults_when_empty_and_parses_when_given() {
        let spec = parse_spec(&req("a", "postgres", "1", "1GiB", "1GiB")).unwrap();
        assert_eq!(
            (spec.idle_after, spec.hibernate),
            (IdleAfter::default(), HibernateMode::Stop)
        );
        let spec = parse_spec(&pb::CreateTenantRequest {
            idle_after: "never".into(),
            hibernate: "freeze".into(),
            ..req("a", "postgres", "1", "1GiB", "1GiB")
        })
        .unwrap();
        assert_eq!(
            (spec.idle_after, spec.hibernate),
            (IdleAfter::Never, HibernateMode::Freeze)
        );
        // On update, empty means unchanged.
        assert_eq!(parse_idle_after("").unwrap(), None);
        assert_eq!(parse_hibernate("").unwrap(), None);
        assert_eq!(
            parse_idle_after("90s").unwrap(),
            Some(IdleAfter::After(std::time::Duration::from_secs(90)))
        );
        let err = parse_hibernate("pause").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "hibernate: \"pause\" is not a mode; use \"stop\" or \"freeze\""
        );
    }
}

//! The agent API: hosts register, then heartbeat. A heartbeat records liveness and usage in the
//! leader's memory (a follower forwards it), commits only *changes* (a down node back, a tenant's
//! new state), and answers with the node's desired tenant set. Every answer names the cluster,
//! which agents check against the one they belong to; until the cluster has an identity there is
//! no answer. A node speaks only as itself (its certificate's identity, `authz`), checked before
//! anything else, forwarding included; a registration's strings have bounded sizes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use dormant_common::{EngineAccess, NodeName, NodeStatus, TenantName, TenantState, TenantUid};
use dormant_proto::v1 as pb;
use dormant_proto::v1::agent_api_client::AgentApiClient;
use dormant_proto::v1::agent_api_server::{AgentApi, AgentApiServer};
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::convert::{resources_from_pb, resources_to_pb};
use super::{authz, forward};
use crate::consensus::propose;
use crate::heartbeat::{self, Decision, Report};
use crate::liveness::{Arrival, TenantSeen};
use crate::replica::App;
use crate::state::{ClusterState, Command, DesiredState, NodeRecord, TenantRecord};

pub struct AgentService {
    app: Arc<App>,
}

pub fn server(app: Arc<App>) -> AgentApiServer<AgentService> {
    AgentApiServer::new(AgentService { app })
}

/// One tenant of a heartbeat, parsed.
struct Observed {
    name: TenantName,
    uid: TenantUid,
    state: TenantState,
    reason: Option<String>,
    seen: TenantSeen,
}

/// The cluster's identity for an answer. An agent records the first it hears and refuses every
/// other, so an answer without one would be refused (or, from a new agent, never be checked):
/// there is none until the leader has chosen it, moments after the cluster first has a leader.
fn cluster_id(app: &App) -> Result<String, Status> {
    app.state
        .read()
        .cluster
        .cluster_id
        .clone()
        .ok_or_else(|| Status::unavailable("cluster identity not chosen yet; retry shortly"))
}

/// Refuses a node that belongs to another cluster (the identity it recorded at its first
/// registration) before anything of it is recorded here. An empty one is a node that never
/// registered, or an agent older than identities.
fn check_node_cluster(app: &App, node: &str, theirs: &str) -> Result<(), Status> {
    let ours = app.state.read().cluster.cluster_id.clone();
    match ours {
        Some(ours) if !theirs.is_empty() && ours != theirs => {
            Err(Status::failed_precondition(format!(
                "cluster_id: node {node} belongs to scheduler cluster {theirs}, this is cluster {ours}; \
                 point the agent at its own cluster, or remove its cluster-id file to move it here"
            )))
        }
        _ => Ok(()),
    }
}

/// This replica's wall clock in Unix ms (only compared with itself, see `Liveness::judge_arrival`).
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_node(id: &str) -> Result<NodeName, Status> {
    NodeName::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Longest `address` a node may register: a DNS name's limit.
pub const MAX_ADDRESS_LEN: usize = 253;
/// Most engines and labels a node may register, and the longest name, label key or label value.
pub const MAX_ENGINES: usize = 64;
pub const MAX_LABELS: usize = 64;
pub const MAX_STRING_LEN: usize = 63;

/// Every string of a registration is kept in the replicated state: each has a bounded size, and
/// a refusal names the field and the rule.
fn check_sizes(req: &pb::RegisterRequest) -> Result<(), Status> {
    let too_long = |field: String, value: &str, max: usize| {
        Status::invalid_argument(format!(
            "{field}: {} characters, at most {max} allowed",
            value.chars().count()
        ))
    };
    if req.address.is_empty() {
        return Err(Status::invalid_argument("address: required"));
    }
    if req.address.len() > MAX_ADDRESS_LEN {
        return Err(too_long("address".into(), &req.address, MAX_ADDRESS_LEN));
    }
    if req
        .address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Status::invalid_argument(
            "address: must be a host name or an IP address, without spaces or control characters",
        ));
    }
    if req.engines.len() > MAX_ENGINES {
        return Err(Status::invalid_argument(format!(
            "engines: {} engines, at most {MAX_ENGINES} allowed",
            req.engines.len()
        )));
    }
    for e in &req.engines {
        if e.is_empty() || e.len() > MAX_STRING_LEN {
            return Err(Status::invalid_argument(format!(
                "engines: {:?} must have 1 to {MAX_STRING_LEN} characters",
                e.chars().take(MAX_STRING_LEN).collect::<String>()
            )));
        }
    }
    if req.labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "labels: {} labels, at most {MAX_LABELS} allowed",
            req.labels.len()
        )));
    }
    for (k, v) in &req.labels {
        if k.is_empty() || k.len() > MAX_STRING_LEN {
            return Err(Status::invalid_argument(format!(
                "labels: key {:?} must have 1 to {MAX_STRING_LEN} characters",
                k.chars().take(MAX_STRING_LEN).collect::<String>()
            )));
        }
        if v.len() > MAX_STRING_LEN {
            return Err(too_long(format!("labels.{k}"), v, MAX_STRING_LEN));
        }
    }
    if req.cgroup_driver.len() > MAX_STRING_LEN {
        return Err(too_long(
            "cgroup_driver".into(),
            &req.cgroup_driver,
            MAX_STRING_LEN,
        ));
    }
    Ok(())
}

fn parse_registration(req: pb::RegisterRequest) -> Result<NodeRecord, Status> {
    let id = parse_node(&req.node_id)?;
    check_sizes(&req)?;
    let capacity = resources_from_pb(&req.capacity.unwrap_or_default());
    if capacity.cpu.0 == 0 || capacity.memory.0 == 0 || capacity.storage.0 == 0 {
        return Err(Status::invalid_argument(
            "capacity: cpu, memory and storage must all be greater than zero",
        ));
    }
    let port = |v: u32, field: &str| {
        u16::try_from(v).ok().filter(|p| *p > 0).ok_or_else(|| {
            Status::invalid_argument(format!("{field}: {v} is not a TCP port (1-65535)"))
        })
    };
    let start = port(req.port_range_start, "port_range_start")?;
    let end = port(req.port_range_end, "port_range_end")?;
    if start > end {
        return Err(Status::invalid_argument(format!(
            "port_range: start {start} is after end {end}"
        )));
    }
    let engine_access = parse_engine_access(&req.engines, req.engine_access)?;
    Ok(NodeRecord {
        id,
        address: req.address,
        capacity,
        engines: req.engines.into_iter().collect(),
        labels: req.labels.into_iter().collect::<BTreeMap<_, _>>(),
        cgroup_driver: req.cgroup_driver,
        port_range: (start, end),
        status: NodeStatus::Ready,
        // The operator's; apply keeps the stored value.
        cordoned: false,
        engine_access,
    })
}

/// Each engine's access as the agent reports it: one entry for every engine it offers, each
/// checked by the rules the agent's config is. None at all: an agent of an older version, whose
/// engines serve the defaults credentials assume for it.
fn parse_engine_access(
    engines: &[String],
    reported: Vec<pb::EngineAccess>,
) -> Result<BTreeMap<String, EngineAccess>, Status> {
    let mut access = BTreeMap::new();
    if reported.is_empty() {
        return Ok(access);
    }
    for a in reported {
        if !engines.contains(&a.engine) {
            return Err(Status::invalid_argument(format!(
                "engine_access: {:?} is not one of the engines this node offers",
                a.engine.chars().take(MAX_STRING_LEN).collect::<String>()
            )));
        }
        // Engine names were checked for length only: printed escaped.
        let checked = EngineAccess::new(&a.user, &a.uri_scheme, &a.uri_path).map_err(|e| {
            Status::invalid_argument(format!(
                "engine_access.{}.{e}",
                dormant_common::text::escape_control(&a.engine)
            ))
        })?;
        if access.insert(a.engine.clone(), checked).is_some() {
            return Err(Status::invalid_argument(format!(
                "engine_access: {:?} is given twice",
                a.engine
            )));
        }
    }
    if let Some(missing) = engines.iter().find(|e| !access.contains_key(*e)) {
        return Err(Status::invalid_argument(format!(
            "engine_access: none given for engine {missing:?}, which this node offers"
        )));
    }
    Ok(access)
}

/// Whether `node`'s record lacks the engine access its agent reported: the registration went
/// through a leader of an older version (which drops the field), or the record through an older
/// replica's snapshot.
fn engine_access_lost(cluster: &ClusterState, node: &NodeName) -> bool {
    cluster
        .nodes
        .get(node)
        .is_some_and(|n| n.engine_access.is_empty() && !n.engines.is_empty())
}

/// A placed tenant as its node's desired set carries it; `None` for one without a port (none is
/// placed without one).
fn desired(t: &TenantRecord) -> Option<pb::DesiredTenant> {
    Some(pb::DesiredTenant {
        name: t.name.to_string(),
        uid: t.uid.get(),
        engine: t.engine.clone(),
        resources: Some(resources_to_pb(&t.resources)),
        port: u32::from(t.port?),
        password: t.password.clone(),
        desired_state: t.desired.as_str().to_string(),
        restart_generation: t.restart_generation,
        idle_after_ms: t.idle_after.as_millis(),
        hibernate: t.hibernate.as_str().to_string(),
        hibernate_generation: t.hibernate_generation,
        wake_generation: t.wake_generation,
    })
}

/// What `node` is to run and to delete: its tenants, and the tombstones of tenants deleted with
/// `--force` while it was away. Names never clash: the state machine places no tenant of a
/// tombstone's name on its node until the tombstone is gone.
fn desired_set(cluster: &ClusterState, node: &NodeName) -> Vec<pb::DesiredTenant> {
    let mut set: Vec<pb::DesiredTenant> = cluster.tenants_on(node).filter_map(desired).collect();
    set.extend(
        cluster
            .tombstones
            .get(node)
            .into_iter()
            .flatten()
            .map(|(name, stone)| pb::DesiredTenant {
                name: name.to_string(),
                uid: stone.uid.get(),
                desired_state: DesiredState::Deleted.as_str().to_string(),
                ..Default::default()
            }),
    );
    set
}

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn register(
        &self,
        mut req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        // Before forwarding: the leader trusts what a replica forwards.
        authz::node_may_act_as(&req, &req.get_ref().node_id, "Register")?;
        if let Some(leader) = forward::to_leader(&self.app, &mut req, false)? {
            return AgentApiClient::new(leader).register(req).await;
        }
        let req = req.into_inner();
        check_node_cluster(&self.app, &req.node_id, &req.cluster_id)?;
        let record = parse_registration(req)?;
        // Before anything is proposed: an agent must not join a cluster it cannot tell apart.
        // Once chosen the identity never changes, so this is the one to answer with.
        let cluster_id = cluster_id(&self.app)?;
        // Unchanged apart from the cordon (which the agent does not know): nothing to commit.
        let unchanged = self
            .app
            .state
            .read()
            .cluster
            .nodes
            .get(&record.id)
            .is_some_and(|n| {
                *n == NodeRecord {
                    cordoned: n.cordoned,
                    ..record.clone()
                }
            });
        if !unchanged {
            propose(&self.app, Command::RegisterNode(record.clone())).await?;
        }
        self.app.liveness().touch(&record.id, Instant::now());
        info!(node_id = %record.id, address = %record.address, "node registered");
        self.app.placer.notify_one();
        Ok(Response::new(pb::RegisterResponse { cluster_id }))
    }

    async fn heartbeat(
        &self,
        mut req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        authz::node_may_act_as(&req, &req.get_ref().node_id, "Heartbeat")?;
        if let Some(leader) = forward::to_leader(&self.app, &mut req, false)? {
            return AgentApiClient::new(leader).heartbeat(req).await;
        }
        let req = req.into_inner();
        let node = parse_node(&req.node_id)?;
        check_node_cluster(&self.app, &req.node_id, &req.cluster_id)?;
        let arrival = self.app.liveness().judge_arrival(
            &node,
            req.sent_unix_ms,
            req.timeout_ms,
            unix_ms_now(),
        );
        if let Arrival::Late { beyond_timeout_ms } = arrival {
            self.app.counters.heartbeats_late.inc();
            // The agent gave up on it and has sent newer ones: acting on it could only write
            // out-of-date transitions.
            tracing::debug!(node_id = %node, beyond_timeout_ms, "dropped a late heartbeat");
            return Err(Status::deadline_exceeded(format!(
                "heartbeat from {node} arrived {beyond_timeout_ms} ms after its sender stopped \
                 waiting (beyond its usual transit time): dropped"
            )));
        }
        let mut observed = Vec::with_capacity(req.tenants.len());
        for t in &req.tenants {
            let name =
                TenantName::parse(&t.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let state = t
                .typed_state()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            observed.push(Observed {
                name,
                uid: TenantUid::new(t.uid),
                state,
                // The tenant's own text (its log lines): stored escaped and bounded.
                reason: (!t.reason.is_empty()).then(|| stored_reason(&t.reason)),
                seen: TenantSeen::from_report(t),
            });
        }
        // The answer is the node's desired set, and the agent removes what is missing from it:
        // it must come from current state, never from a leader that was just elected (and has
        // not applied all that was committed) or one cut off from its majority.
        let term = crate::consensus::current_enough(&self.app)?;
        self.app.counters.heartbeats.inc();
        let cluster_id = cluster_id(&self.app)?;

        // Work out the transitions to commit, from the applied state.
        let reports: Vec<Report> = observed
            .iter()
            .map(|o| Report {
                name: o.name.clone(),
                uid: o.uid,
                state: o.state,
                reason: o.reason.clone(),
            })
            .collect();
        let (access_lost, decision) = {
            let sm = self.app.state.read();
            (
                req.reports_engine_access && engine_access_lost(&sm.cluster, &node),
                heartbeat::decide(&sm.cluster, &node, &reports, req.seen_version, term),
            )
        };
        if access_lost {
            info!(node_id = %node, "the node's record holds no engine access though its agent reports it: asking it to register again");
        }
        // An unknown node, or one whose record lost its access: registering again fixes either.
        let (Decision::Changes { commands, accepted }, false) = (decision, access_lost) else {
            return Ok(Response::new(pb::HeartbeatResponse {
                register_again: true,
                cluster_id,
                ..Default::default()
            }));
        };
        let seen: Vec<(TenantName, TenantSeen)> = accepted
            .into_iter()
            .map(|i| (observed[i].name.clone(), observed[i].seen.clone()))
            .collect();
        self.app
            .liveness()
            .observe(&node, Instant::now(), req.usage.unwrap_or_default(), seen);
        for command in commands {
            debug!(node_id = %node, ?command, "heartbeat transition");
            if let Command::SetNodeStatus { .. } = &command {
                info!(node_id = %node, "node heard from again: ready, its tenants back");
                self.app.placer.notify_one();
            }
            if let Command::RemoveTenant { name, .. } = &command {
                self.app.liveness().forget_tenant(name);
                info!(tenant_id = %name, node_id = %node, "tenant removed from its node");
            }
            if let Command::ForgetTombstone { name, uid, .. } = &command {
                info!(tenant_id = %name, uid = uid.get(), node_id = %node, "the node removed a tenant deleted with --force while it was away");
            }
            propose(&self.app, command).await?;
        }

        let sm = self.app.state.read();
        let version = sm.last_applied.map(|l| l.index).unwrap_or(0);
        let tenants = desired_set(&sm.cluster, &node);
        Ok(Response::new(pb::HeartbeatResponse {
            version,
            tenants,
            register_again: false,
            cluster_id,
        }))
    }
}

/// Longest reason kept, in bytes (a reason is the last lines of a log, not the log).
const MAX_REASON_BYTES: usize = 1024;

/// A reason as stored in Raft: control characters escaped, at most `MAX_REASON_BYTES`.
fn stored_reason(reason: &str) -> String {
    let mut text = dormant_common::text::escape_control(reason);
    if text.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dormant_common::hibernation::{HibernateMode, IdleAfter};
    use dormant_common::TenantState;

    use super::*;

    #[test]
    fn engine_access_is_one_checked_entry_per_engine_or_none_from_an_older_agent() {
        let engines = vec!["postgres".to_string(), "kv".to_string()];
        let entry = |engine: &str, user: &str, scheme: &str| pb::EngineAccess {
            engine: engine.into(),
            user: user.into(),
            uri_scheme: scheme.into(),
            uri_path: String::new(),
        };
        let access = parse_engine_access(
            &engines,
            vec![
                entry("postgres", "postgres", "postgresql"),
                entry("kv", "owner", "kv"),
            ],
        )
        .unwrap();
        assert_eq!(access["kv"].uri("pw", "h:1"), "kv://owner:pw@h:1");
        assert!(parse_engine_access(&engines, Vec::new())
            .unwrap()
            .is_empty());
        for (reported, says) in [
            (
                vec![entry("postgres", "postgres", "postgresql")],
                "engine_access: none given for engine \"kv\"",
            ),
            (
                vec![
                    entry("postgres", "postgres", "postgresql"),
                    entry("kv", "a:b", "kv"),
                ],
                "engine_access.kv.user: 1 to 63 characters",
            ),
            (
                vec![
                    entry("postgres", "postgres", "postgresql"),
                    entry("kv", "u", "kv"),
                    entry("kv", "u", "kv"),
                ],
                "engine_access: \"kv\" is given twice",
            ),
            (
                vec![entry("mysql", "root", "mysql")],
                "engine_access: \"mysql\" is not one of the engines",
            ),
        ] {
            let err = parse_engine_access(&engines, reported).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(says), "{}", err.message());
        }
    }

    #[test]
    fn a_node_whose_record_lost_its_reported_engine_access_is_found() {
        let mut st = ClusterState::default();
        let reg = parse_registration(registration()).unwrap();
        assert!(!reg.engine_access.is_empty());
        st.apply(1, Command::RegisterNode(reg.clone())).unwrap();
        let id = reg.id.clone();
        assert!(!engine_access_lost(&st, &id));
        // As an older leader (or an older replica's snapshot) stores it: no access.
        st.apply(
            2,
            Command::RegisterNode(NodeRecord {
                engine_access: BTreeMap::new(),
                ..reg
            }),
        )
        .unwrap();
        assert!(engine_access_lost(&st, &id));
        assert!(!engine_access_lost(
            &st,
            &NodeName::parse("unknown").unwrap()
        ));
    }

    #[test]
    fn a_stored_reason_is_escaped_and_bounded() {
        let reason = stored_reason(&format!("\u{1b}[2J{}", "é".repeat(2000)));
        assert!(reason.starts_with("\\x1b[2J"), "{reason}");
        assert!(reason.len() <= MAX_REASON_BYTES + '…'.len_utf8());
        assert!(reason.ends_with('…'));
    }
    use crate::state::test_utils::res;

    fn record() -> TenantRecord {
        TenantRecord {
            uid: TenantUid::new(2),
            name: TenantName::parse("t").unwrap(),
            engine: "postgres".into(),
            resources: res(500, 512, 1),
            password: "pw".into(),
            state: TenantState::Hibernated,
            desired: DesiredState::Running,
            node: Some(NodeName::parse("a").unwrap()),
            port: Some(20000),
            reason: None,
            deleted_at: None,
            constraints: BTreeMap::new(),
            lost_from: None,
            restart_generation: 1,
            idle_after: IdleAfter::After(Duration::from_secs(30)),
            hibernate: HibernateMode::Freeze,
            hibernate_generation: 3,
            wake_generation: 4,
        }
    }

    fn registration() -> pb::RegisterRequest {
        pb::RegisterRequest {
            node_id: "a".into(),
            address: "10.0.0.1".into(),
            capacity: Some(pb::Resources {
                milli_cpu: 1000,
                memory_bytes: 1 << 30,
                storage_bytes: 1 << 30,
            }),
            engines: vec!["postgres".into()],
            port_range_start: 20000,
            port_range_end: 20010,
            engine_access: vec![pb::EngineAccess {
                engine: "postgres".into(),
                user: "postgres".into(),
                uri_scheme: "postgresql".into(),
                uri_path: "/postgres".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn registration_strings_have_bounded_sizes_named_in_the_refusal() {
        assert!(parse_registration(registration()).is_ok());
        let refusal =
            |r: pb::RegisterRequest| parse_registration(r).unwrap_err().message().to_string();
        let mut r = registration();
        r.address = "x".repeat(254);
        assert_eq!(refusal(r), "address: 254 characters, at most 253 allowed");
        let mut r = registration();
        r.engines.push("e".repeat(64));
        assert!(refusal(r).starts_with("engines: "), "engine name");
        let mut r = registration();
        r.engines = (0..65).map(|i| format!("e{i}")).collect();
        assert_eq!(refusal(r), "engines: 65 engines, at most 64 allowed");
        let mut r = registration();
        r.labels.insert("zone".into(), "v".repeat(64));
        assert_eq!(refusal(r), "labels.zone: 64 characters, at most 63 allowed");
        let mut r = registration();
        r.labels.insert("k".repeat(64), "v".into());
        assert!(refusal(r).starts_with("labels: key "));
        let mut r = registration();
        r.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(refusal(r), "labels: 65 labels, at most 64 allowed");
        let mut r = registration();
        r.address = "a b".into();
        assert!(refusal(r).starts_with("address: must be"));
    }

    #[test]
    fn the_desired_set_carries_the_hibernation_policy_and_generations() {
        let mut t = record();
        let d = desired(&t).unwrap();
        assert_eq!(d.idle_after_ms, 30_000);
        assert_eq!(d.hibernate, "freeze");
        assert_eq!(
            (
                d.restart_generation,
                d.hibernate_generation,
                d.wake_generation
            ),
            (1, 3, 4)
        );
        t.idle_after = IdleAfter::Never;
        t.hibernate = HibernateMode::Stop;
        let d = desired(&t).unwrap();
        assert_eq!((d.idle_after_ms, d.hibernate.as_str()), (0, "stop"));
        t.port = None;
        assert_eq!(desired(&t), None);
    }

    #[test]
    fn the_desired_set_carries_tombstones_as_deletes_beside_the_nodes_tenants() {
        use crate::state::test_utils::{node, spec};
        let mut cluster = ClusterState::default();
        let a = NodeName::parse("a").unwrap();
        let create = |name: &str| Command::CreateTenant {
            spec: spec(name, res(100, 64, 1)),
            password: "pw".into(),
            node: Some(a.clone()),
            pending_reason: None,
            overcommit: 1.0,
        };
        cluster
            .apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
            .unwrap();
        cluster.apply(2, create("t")).unwrap();
        let status = |status| Command::SetNodeStatus {
            node: a.clone(),
            status,
            decided_in_term: None,
        };
        cluster.apply(3, status(NodeStatus::Down)).unwrap();
        let t = TenantName::parse("t").unwrap();
        cluster
            .apply(
                4,
                Command::ForceDeleteTenant {
                    name: t.clone(),
                    uid: TenantUid::new(2),
                },
            )
            .unwrap();
        cluster.apply(5, status(NodeStatus::Ready)).unwrap();
        cluster.apply(6, create("u")).unwrap();
        let mut set: Vec<(String, u64, String)> = desired_set(&cluster, &a)
            .into_iter()
            .map(|d| (d.name, d.uid, d.desired_state))
            .collect();
        set.sort();
        assert_eq!(
            set,
            [
                ("t".to_string(), 2, "deleted".to_string()),
                ("u".to_string(), 6, "running".to_string())
            ]
        );
        cluster
            .apply(
                7,
                Command::ForgetTombstone {
                    node: a.clone(),
                    name: t,
                    uid: TenantUid::new(2),
                },
            )
            .unwrap();
        let set = desired_set(&cluster, &a);
        assert!(
            matches!(set.as_slice(), [d] if d.uid == 6 && d.desired_state == "running"),
            "{set:?}"
        );
    }
}

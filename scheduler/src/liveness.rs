//! What the leader remembers of heartbeats, in memory only: when each node was last heard from,
//! the latest usage it reported, and each tenant's latest usage (proxy counters included), open
//! connections and unfinished resize. Heartbeats never become Raft entries; only transitions do.
//! [`Watch`] decides, tick by tick and with the time passed in, which nodes are down.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dormant_common::{NodeName, NodeStatus, TenantName};
use dormant_proto::v1::{Connection, NodeUsage, ObservedTenant, TenantUsage};

/// The most open connections kept per tenant. The agent sends at most this many (its usage counts
/// them all); a longer list is cut here too, so no heartbeat grows the leader's memory unbounded.
pub const MAX_CONNECTIONS: usize = 100;

#[derive(Debug, Clone)]
pub struct NodeSeen {
    pub at: Instant,
    /// Absent until the node's first heartbeat (registration and grace carry none).
    pub usage: Option<NodeUsage>,
}

/// A tenant as its node's latest heartbeat described it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantSeen {
    pub usage: TenantUsage,
    /// A resize the agent could not finish yet, with the reason (say, the storage grow).
    pub resize_pending: Option<String>,
    /// Client connections open through the agent's proxy, at most [`MAX_CONNECTIONS`].
    pub connections: Vec<Connection>,
}

impl TenantSeen {
    /// What a heartbeat says of one tenant, its connection list cut to [`MAX_CONNECTIONS`].
    pub fn from_report(t: &ObservedTenant) -> Self {
        TenantSeen {
            usage: t.usage.unwrap_or_default(),
            resize_pending: (!t.resize_pending.is_empty()).then(|| t.resize_pending.clone()),
            connections: t
                .connections
                .iter()
                .take(MAX_CONNECTIONS)
                .cloned()
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Liveness {
    nodes: HashMap<NodeName, NodeSeen>,
    tenants: HashMap<TenantName, TenantSeen>,
    transit: HashMap<NodeName, Transit>,
}

/// How many recent transit times are kept per node; their minimum is the node's usual transit.
const TRANSIT_WINDOW: usize = 32;

/// A node's recent transit times: arrival on the leader's clock less sending on the agent's. The
/// clocks' offset is in every figure alike, so the minimum is the offset plus the fastest transit,
/// and a heartbeat is late by how much its figure exceeds that minimum.
#[derive(Debug, Default)]
struct Transit {
    recent: std::collections::VecDeque<i64>,
    /// When (leader's clock, Unix ms) heartbeats started arriving late without a break.
    late_since: Option<i64>,
}

/// Whether a heartbeat is taken or dropped as late.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    OnTime,
    /// It arrived this much later than its sender waited for an answer: the agent has given up
    /// on it and sent newer ones, so what it says is out of date.
    Late {
        beyond_timeout_ms: i64,
    },
}

impl Liveness {
    /// Records a heartbeat from `node` at `at`, with the usage it carried and what it said of
    /// the tenants placed on it (the caller leaves out reports about anyone else's).
    pub fn observe(
        &mut self,
        node: &NodeName,
        at: Instant,
        usage: NodeUsage,
        tenants: impl IntoIterator<Item = (TenantName, TenantSeen)>,
    ) {
        self.nodes.insert(
            node.clone(),
            NodeSeen {
                at,
                usage: Some(usage),
            },
        );
        self.tenants.extend(tenants);
    }

    /// Judges a heartbeat `node` sent at `sent_unix_ms` (its clock), waiting `timeout_ms` for an
    /// answer, that arrived at `arrived_unix_ms` (this replica's clock). Late heartbeats are
    /// dropped, unless they keep coming late for longer than the timeout: then the agent's clock
    /// stepped back (NTP), and the new transit times are its usual ones.
    pub fn judge_arrival(
        &mut self,
        node: &NodeName,
        sent_unix_ms: u64,
        timeout_ms: u64,
        arrived_unix_ms: u64,
    ) -> Arrival {
        if sent_unix_ms == 0 || timeout_ms == 0 {
            return Arrival::OnTime; // an agent that does not say
        }
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (arrived, timeout) = (to_i64(arrived_unix_ms), to_i64(timeout_ms));
        let transit = arrived.saturating_sub(to_i64(sent_unix_ms));
        let t = self.transit.entry(node.clone()).or_default();
        if let Some(usual) = t.recent.iter().min().copied() {
            let beyond = transit.saturating_sub(usual).saturating_sub(timeout);
            if beyond > 0 {
                let since = *t.late_since.get_or_insert(arrived);
                if arrived.saturating_sub(since) <= timeout {
                    return Arrival::Late {
                        beyond_timeout_ms: beyond,
                    };
                }
                t.recent.clear();
            }
        }
        t.late_since = None;
        if t.recent.len() == TRANSIT_WINDOW {
            t.recent.pop_front();
        }
        t.recent.push_back(transit);
        Arrival::OnTime
    }

    /// Counts `node` as heard from at `at` without usage (it registered).
    pub fn touch(&mut self, node: &NodeName, at: Instant) {
        let usage = self.nodes.get(node).and_then(|s| s.usage);
        self.nodes.insert(node.clone(), NodeSeen { at, usage });
    }

    /// A new leader has heard from no one: every node counts as heard from `now`.
    pub fn grant_grace(&mut self, nodes: impl IntoIterator<Item = NodeName>, now: Instant) {
        for node in nodes {
            self.touch(&node, now);
        }
    }

    /// How long `node` has been silent; a node never heard from starts its grace period now.
    pub fn silent_for(&mut self, node: &NodeName, now: Instant) -> Duration {
        let seen = self.nodes.entry(node.clone()).or_insert(NodeSeen {
            at: now,
            usage: None,
        });
        now.saturating_duration_since(seen.at)
    }

    pub fn node(&self, node: &NodeName) -> Option<&NodeSeen> {
        self.nodes.get(node)
    }

    pub fn tenant_usage(&self, tenant: &TenantName) -> Option<&TenantUsage> {
        self.tenants.get(tenant).map(|t| &t.usage)
    }

    /// The connections open through the tenant's proxy at its node's last heartbeat.
    pub fn connections(&self, tenant: &TenantName) -> &[Connection] {
        self.tenants
            .get(tenant)
            .map_or(&[], |t| t.connections.as_slice())
    }

    /// The resize the tenant's node last said it could not finish, if any.
    pub fn resize_pending(&self, tenant: &TenantName) -> Option<&str> {
        self.tenants.get(tenant)?.resize_pending.as_deref()
    }

    pub fn forget_tenant(&mut self, tenant: &TenantName) {
        self.tenants.remove(tenant);
    }

    /// Forgets a removed node: if it returns, it starts afresh.
    pub fn forget_node(&mut self, node: &NodeName) {
        self.nodes.remove(node);
        self.transit.remove(node);
    }
}

/// The leader's liveness watch: it judges silence only while heartbeats can be answered.
///
/// A heartbeat is answered only by a leader a majority acknowledged within the lease
/// (`consensus::current_enough`). While that does not hold (no quorum, a new term not yet fenced),
/// agents are refused through no fault of theirs, so silence proves nothing: the watch decides
/// nothing, and once it holds again every node gets a fresh grace period, as under a new leader.
/// A quorum loss of any length therefore marks no node down that kept heartbeating.
#[derive(Debug, Default)]
pub struct Watch {
    /// The term in which heartbeats have been answerable since the last grace was granted.
    answering_in: Option<u64>,
}

/// What one tick of the [`Watch`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Heartbeats cannot be answered now: nothing is judged.
    Paused,
    /// Heartbeats became answerable (a new term, or a quorum back): every node starts a grace.
    GraceGranted,
    /// These ready nodes have been silent for the grace period (possibly none).
    Down(Vec<NodeName>),
}

impl Watch {
    /// One tick at `now`. `answering`: the term this replica leads while it can answer heartbeats,
    /// `None` when it cannot (not leading, no quorum within the lease, term not fenced).
    pub fn tick<'a>(
        &mut self,
        answering: Option<u64>,
        nodes: impl IntoIterator<Item = (&'a NodeName, NodeStatus)>,
        live: &mut Liveness,
        grace: Duration,
        now: Instant,
    ) -> Verdict {
        let Some(term) = answering else {
            self.answering_in = None;
            return Verdict::Paused;
        };
        if self.answering_in != Some(term) {
            self.answering_in = Some(term);
            live.grant_grace(nodes.into_iter().map(|(n, _)| n.clone()), now);
            return Verdict::GraceGranted;
        }
        Verdict::Down(
            nodes
                .into_iter()
                .filter(|(_, status)| *status == NodeStatus::Ready)
                .filter(|(n, _)| live.silent_for(n, now) >= grace)
                .map(|(n, _)| n.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn a_node_silent_for_the_grace_while_heartbeats_are_answered_is_down() {
        let (a, b) = (NodeName::parse("a").unwrap(), NodeName::parse("b").unwrap());
        let nodes = [(&a, NodeStatus::Ready), (&b, NodeStatus::Ready)];
        let mut live = Liveness::default();
        let mut watch = Watch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, t0),
            Verdict::GraceGranted
        );
        live.observe(&a, at(9), NodeUsage::default(), []);
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, at(9)),
            Verdict::Down(vec![])
        );
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, at(10)),
            Verdict::Down(vec![b.clone()])
        );
        // A node already down is not marked again.
        let nodes = [(&a, NodeStatus::Ready), (&b, NodeStatus::Down)];
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, at(11)),
            Verdict::Down(vec![])
        );
    }

    #[test]
    fn a_quorum_loss_of_any_length_judges_no_one_and_ends_with_a_fresh_grace() {
        let a = NodeName::parse("a").unwrap();
        let nodes = [(&a, NodeStatus::Ready)];
        let mut live = Liveness::default();
        let mut watch = Watch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        watch.tick(Some(3), nodes, &mut live, GRACE, t0);
        live.observe(&a, at(1), NodeUsage::default(), []);
        // 30 s without a quorum: the node's heartbeats were refused, nothing is decided.
        for s in 2..=31 {
            assert_eq!(
                watch.tick(None, nodes, &mut live, GRACE, at(s)),
                Verdict::Paused
            );
        }
        // The quorum is back in the same term: a fresh grace, not a verdict on the refused time.
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, at(32)),
            Verdict::GraceGranted
        );
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, at(41)),
            Verdict::Down(vec![])
        );
        // Still silent a whole grace after that: down.
        assert_eq!(
            watch.tick(Some(3), nodes, &mut live, GRACE, at(42)),
            Verdict::Down(vec![a.clone()])
        );
    }

    #[test]
    fn a_heartbeat_later_than_its_timeout_beyond_the_usual_transit_is_dropped() {
        let a = NodeName::parse("a").unwrap();
        let mut live = Liveness::default();
        // The agent's clock is 5 s behind the leader's: only differences count.
        let skew = 5_000;
        let t0 = 1_700_000_000_000u64;
        for i in 0..10 {
            let sent = t0 + i * 1000;
            let arrived = sent + skew + 2 + (i % 3);
            assert_eq!(live.judge_arrival(&a, sent, 3000, arrived), Arrival::OnTime);
        }
        // Sent at t0 + 10 s, held in a buffer during a cut-off, arriving 9 s later.
        let sent = t0 + 10_000;
        assert_eq!(
            live.judge_arrival(&a, sent, 3000, sent + skew + 9_000),
            Arrival::Late {
                beyond_timeout_ms: 9_000 - 2 - 3000
            }
        );
        // Within its timeout: taken.
        assert_eq!(
            live.judge_arrival(&a, sent, 3000, sent + skew + 2_500),
            Arrival::OnTime
        );
        // Agents that do not say when they sent are always taken.
        assert_eq!(live.judge_arrival(&a, 0, 0, t0), Arrival::OnTime);
    }

    #[test]
    fn an_agent_clock_stepped_back_is_late_only_until_the_timeout_has_passed() {
        let a = NodeName::parse("a").unwrap();
        let mut live = Liveness::default();
        let t0 = 1_700_000_000_000u64;
        for i in 0..5 {
            let at = t0 + i * 1000;
            live.judge_arrival(&a, at, 3000, at + 1);
        }
        // NTP steps the agent's clock 60 s back: its heartbeats look a minute late.
        let step = 60_000;
        let judge = |live: &mut Liveness, i: u64| {
            let at = t0 + i * 1000;
            live.judge_arrival(&a, at - step, 3000, at + 1)
        };
        for i in 5..=8 {
            assert!(matches!(judge(&mut live, i), Arrival::Late { .. }), "{i}");
        }
        // More than the timeout of steady lateness: the new transit is the usual one.
        assert_eq!(judge(&mut live, 9), Arrival::OnTime);
        assert_eq!(judge(&mut live, 10), Arrival::OnTime);
    }

    #[test]
    fn a_new_term_starts_a_fresh_grace() {
        let a = NodeName::parse("a").unwrap();
        let nodes = [(&a, NodeStatus::Ready)];
        let mut live = Liveness::default();
        let mut watch = Watch::default();
        let t0 = Instant::now();
        watch.tick(Some(3), nodes, &mut live, GRACE, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            watch.tick(Some(4), nodes, &mut live, GRACE, later),
            Verdict::GraceGranted
        );
        assert_eq!(
            watch.tick(
                Some(4),
                nodes,
                &mut live,
                GRACE,
                later + Duration::from_secs(1)
            ),
            Verdict::Down(vec![])
        );
    }

    #[test]
    fn silence_counts_from_the_last_heartbeat_or_the_grace_given() {
        let mut live = Liveness::default();
        let a = NodeName::parse("a").unwrap();
        let t0 = Instant::now();
        assert_eq!(live.silent_for(&a, t0), Duration::ZERO);
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(live.silent_for(&a, t5), Duration::from_secs(5));
        live.observe(&a, t5, NodeUsage::default(), []);
        assert_eq!(
            live.silent_for(&a, t5 + Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        let t20 = t0 + Duration::from_secs(20);
        live.grant_grace([a.clone()], t20);
        assert_eq!(live.silent_for(&a, t20), Duration::ZERO);
        // The grace keeps the usage the node last reported.
        assert!(live.node(&a).unwrap().usage.is_some());
    }

    #[test]
    fn a_pending_resize_is_the_latest_heartbeats_word() {
        let mut live = Liveness::default();
        let a = NodeName::parse("a").unwrap();
        let t = TenantName::parse("t").unwrap();
        let seen = |resize: Option<&str>| TenantSeen {
            usage: TenantUsage::default(),
            resize_pending: resize.map(str::to_string),
            connections: Vec::new(),
        };
        let now = Instant::now();
        live.observe(
            &a,
            now,
            NodeUsage::default(),
            [(t.clone(), seen(Some("storage 2GiB: busy")))],
        );
        assert_eq!(live.resize_pending(&t), Some("storage 2GiB: busy"));
        live.observe(&a, now, NodeUsage::default(), [(t.clone(), seen(None))]);
        assert_eq!(live.resize_pending(&t), None);
        assert!(live.tenant_usage(&t).is_some());
    }

    #[test]
    fn open_connections_are_the_latest_heartbeats_word_and_at_most_a_hundred() {
        let mut live = Liveness::default();
        let a = NodeName::parse("a").unwrap();
        let t = TenantName::parse("t").unwrap();
        assert!(live.connections(&t).is_empty());
        let report = |n: u64| ObservedTenant {
            name: "t".into(),
            uid: 2,
            state: "running".into(),
            connections: (0..n)
                .map(|i| Connection {
                    peer: format!("10.0.0.1:{}", 40000 + i),
                    opened_unix_ms: 1_700_000_000_000 + i,
                })
                .collect(),
            usage: Some(TenantUsage {
                open_connections: n,
                ..Default::default()
            }),
            ..Default::default()
        };
        let now = Instant::now();
        let seen = TenantSeen::from_report(&report(250));
        assert_eq!(seen.connections.len(), MAX_CONNECTIONS);
        assert_eq!(seen.connections[0].peer, "10.0.0.1:40000");
        live.observe(&a, now, NodeUsage::default(), [(t.clone(), seen)]);
        assert_eq!(live.connections(&t).len(), MAX_CONNECTIONS);
        // The usage still counts them all.
        assert_eq!(live.tenant_usage(&t).unwrap().open_connections, 250);
        let seen = TenantSeen::from_report(&report(2));
        live.observe(&a, now, NodeUsage::default(), [(t.clone(), seen)]);
        assert_eq!(live.connections(&t).len(), 2);
        live.forget_tenant(&t);
        assert!(live.connections(&t).is_empty());
    }
}

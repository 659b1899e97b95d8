//! Placement: which node a tenant goes to. Pure functions, no I/O, no clock, no Raft: filter the
//! nodes that can take the tenant (ready, not cordoned, engine offered, labels matching the
//! tenant's constraints, room under capacity × overcommit, a free port), then score them
//! (bin-pack by dominant resource, or spread). The state machine calls [`check`] again at apply
//! time, so a stale choice is refused. Its input types are its own ([`NodeView`], [`Ask`]): the
//! state builds them, so this module depends on no record of the state's.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use dormant_common::{Bytes, NodeName, NodeStatus, Resources};
use serde::Deserialize;

/// How to choose among nodes that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Fill the fullest node first (by its dominant resource), keeping whole nodes free.
    #[default]
    BinPack,
    /// Use the emptiest node first.
    Spread,
}

/// What a tenant asks of its node.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub engine: &'a str,
    pub resources: &'a Resources,
    /// Labels the node must carry with these values.
    pub constraints: &'a BTreeMap<String, String>,
}

/// What placement needs to know of one node.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    pub id: &'a NodeName,
    pub status: NodeStatus,
    pub cordoned: bool,
    pub engines: &'a BTreeSet<String>,
    pub labels: &'a BTreeMap<String, String>,
    pub capacity: Resources,
    /// What the tenants placed there reserve.
    pub allocated: Resources,
    pub has_free_port: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no node is registered")]
    NoNodes,
    /// Every node was filtered out; one reason per node.
    #[error("no node has room: {}", shortened(.0))]
    NoneFits(Vec<String>),
}

/// At most this many nodes' reasons are spelled out; a fleet's worth would bury the point.
const REASONS_SHOWN: usize = 10;

fn shortened(reasons: &[String]) -> String {
    let mut shown = reasons[..reasons.len().min(REASONS_SHOWN)].join("; ");
    if reasons.len() > REASONS_SHOWN {
        shown += &format!("; and {} more nodes", reasons.len() - REASONS_SHOWN);
    }
    shown
}

fn gib(b: Bytes) -> String {
    format!("{:.2}GiB", b.0 as f64 / (1u64 << 30) as f64)
}

/// Whether `view` can take the tenant; the error says why not.
pub fn check(view: &NodeView<'_>, ask: &Ask<'_>, overcommit: f64) -> Result<(), String> {
    let node = view;
    let (engine, resources) = (ask.engine, ask.resources);
    if node.status != NodeStatus::Ready {
        return Err(format!("{}: {}", node.id, node.status));
    }
    if node.cordoned {
        return Err(format!("{}: cordoned", node.id));
    }
    if !node.engines.contains(engine) {
        return Err(format!("{}: does not offer engine {engine}", node.id));
    }
    for (key, wanted) in ask.constraints {
        match node.labels.get(key) {
            Some(value) if value == wanted => {}
            Some(value) => {
                return Err(format!("{}: label {key}={value}, wanted {wanted}", node.id))
            }
            None => return Err(format!("{}: no label {key}, wanted {wanted}", node.id)),
        }
    }
    check_room(view, resources, overcommit)?;
    if !view.has_free_port {
        return Err(format!("{}: no free port in its range", node.id));
    }
    Ok(())
}

/// Whether `view` has room for `resources` under capacity × overcommit. A resize of a tenant
/// already on the node asks only this: cordons and labels decide new placements, not growth.
pub fn check_room(
    view: &NodeView<'_>,
    resources: &Resources,
    overcommit: f64,
) -> Result<(), String> {
    let node = view;
    let free = node
        .capacity
        .scaled(overcommit)
        .saturating_sub(view.allocated);
    if resources.cpu > free.cpu {
        return Err(format!(
            "{}: {} CPU free, {} asked",
            node.id, free.cpu, resources.cpu
        ));
    }
    if resources.memory > free.memory {
        return Err(format!(
            "{}: {} memory free, {} asked",
            node.id,
            gib(free.memory),
            gib(resources.memory)
        ));
    }
    if resources.storage > free.storage {
        return Err(format!(
            "{}: {} storage free, {} asked",
            node.id,
            gib(free.storage),
            gib(resources.storage)
        ));
    }
    Ok(())
}

/// The share of the node's (overcommitted) capacity its most-used resource would reach with the
/// tenant on it, in parts per million (an `Ord` score).
fn dominant_share(view: &NodeView<'_>, resources: &Resources, overcommit: f64) -> u64 {
    let cap = view.capacity.scaled(overcommit);
    let after = view.allocated.saturating_add(*resources);
    let share = |used: u64, cap: u64| used.saturating_mul(1_000_000) / cap.max(1);
    share(after.cpu.0, cap.cpu.0)
        .max(share(after.memory.0, cap.memory.0))
        .max(share(after.storage.0, cap.storage.0))
}

/// Chooses a node for a tenant, or explains why none fits.
pub fn place(
    ask: &Ask<'_>,
    nodes: &[NodeView<'_>],
    policy: Policy,
    overcommit: f64,
) -> Result<NodeName, PlacementError> {
    if nodes.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    let mut reasons = Vec::new();
    let mut best: Option<(u64, &NodeView<'_>)> = None;
    let better = |a: &(u64, &NodeView<'_>), b: &(u64, &NodeView<'_>)| -> bool {
        let by_share = match policy {
            Policy::BinPack => b.0.cmp(&a.0),
            Policy::Spread => a.0.cmp(&b.0),
        };
        by_share.then_with(|| a.1.id.cmp(b.1.id)) == Ordering::Less
    };
    for view in nodes {
        match check(view, ask, overcommit) {
            Ok(()) => {
                let candidate = (dominant_share(view, ask.resources, overcommit), view);
                if best.as_ref().is_none_or(|b| better(&candidate, b)) {
                    best = Some(candidate);
                }
            }
            Err(why) => reasons.push(why),
        }
    }
    best.map(|(_, v)| v.id.clone())
        .ok_or(PlacementError::NoneFits(reasons))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dormant_common::MilliCpu;

    /// A node as placement sees it, owned (the state's records are not this module's).
    struct TestNode {
        id: NodeName,
        status: NodeStatus,
        cordoned: bool,
        engines: BTreeSet<String>,
        labels: BTreeMap<String, String>,
        capacity: Resources,
    }

    fn node(id: &str, capacity: Resources) -> TestNode {
        TestNode {
            id: NodeName::parse(id).unwrap(),
            status: NodeStatus::Ready,
            cordoned: false,
            engines: ["postgres".to_string()].into(),
            labels: BTreeMap::new(),
            capacity,
        }
    }

    fn res(milli_cpu: u64, memory_mib: u64, storage_gib: u64) -> Resources {
        Resources {
            cpu: MilliCpu(milli_cpu),
            memory: Bytes(memory_mib << 20),
            storage: Bytes(storage_gib << 30),
        }
    }

    static NO_CONSTRAINTS: BTreeMap<String, String> = BTreeMap::new();

    fn ask<'a>(engine: &'a str, resources: &'a Resources) -> Ask<'a> {
        Ask {
            engine,
            resources,
            constraints: &NO_CONSTRAINTS,
        }
    }

    fn views<'a>(nodes: &'a [TestNode], allocated: &[Resources]) -> Vec<NodeView<'a>> {
        nodes
            .iter()
            .zip(allocated)
            .map(|(n, a)| NodeView {
                id: &n.id,
                status: n.status,
                cordoned: n.cordoned,
                engines: &n.engines,
                labels: &n.labels,
                capacity: n.capacity,
                allocated: *a,
                has_free_port: true,
            })
            .collect()
    }

    #[test]
    fn place_binpack_prefers_the_fuller_node() {
        let nodes = [
            node("a", res(2000, 4096, 100)),
            node("b", res(2000, 4096, 100)),
        ];
        let v = views(&nodes, &[res(0, 0, 0), res(1000, 0, 0)]);
        let chosen = place(
            &ask("postgres", &res(500, 512, 1)),
            &v,
            Policy::BinPack,
            1.0,
        )
        .unwrap();
        assert_eq!(chosen.as_str(), "b");
        let chosen = place(&ask("postgres", &res(500, 512, 1)), &v, Policy::Spread, 1.0).unwrap();
        assert_eq!(chosen.as_str(), "a");
    }

    #[test]
    fn place_rejects_when_no_node_has_memory_and_says_why() {
        let nodes = [node("a", res(2000, 1024, 100))];
        let v = views(&nodes, &[res(0, 768, 0)]);
        let err = place(
            &ask("postgres", &res(100, 512, 1)),
            &v,
            Policy::BinPack,
            1.0,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no node has room: a: 0.25GiB memory free, 0.50GiB asked"
        );
    }

    #[test]
    fn place_explains_missing_engine_and_cpu() {
        let nodes = [
            node("a", res(1000, 4096, 100)),
            node("b", res(1000, 4096, 100)),
        ];
        let v = views(&nodes, &[res(600, 0, 0), res(0, 0, 0)]);
        let err = place(&ask("redis", &res(500, 1, 1)), &v, Policy::BinPack, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("a: does not offer engine redis"),
            "{err}"
        );
        let err = place(&ask("postgres", &res(1500, 1, 1)), &v, Policy::BinPack, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("a: 0.4 CPU free, 1.5 asked"),
            "{err}"
        );
    }

    #[test]
    fn overcommit_ratio_raises_room() {
        let nodes = [node("a", res(1000, 1024, 10))];
        let v = views(&nodes, &[res(1000, 0, 0)]);
        assert!(place(&ask("postgres", &res(500, 1, 1)), &v, Policy::BinPack, 1.0).is_err());
        assert!(place(&ask("postgres", &res(500, 1, 1)), &v, Policy::BinPack, 1.5).is_ok());
    }

    #[test]
    fn down_nodes_are_filtered() {
        let mut n = node("a", res(1000, 1024, 10));
        n.status = NodeStatus::Down;
        let nodes = [n];
        let v = views(&nodes, &[res(0, 0, 0)]);
        let err = place(&ask("postgres", &res(1, 1, 1)), &v, Policy::BinPack, 1.0).unwrap_err();
        assert_eq!(err.to_string(), "no node has room: a: down");
    }

    #[test]
    fn binpack_fills_one_node_before_the_next_and_spread_alternates() {
        let nodes = [
            node("a", res(1000, 4096, 100)),
            node("b", res(1000, 4096, 100)),
        ];
        for (policy, expected) in [
            (Policy::BinPack, ["a", "a", "a", "a", "b", "b"]),
            (Policy::Spread, ["a", "b", "a", "b", "a", "b"]),
        ] {
            let mut allocated = [res(0, 0, 0), res(0, 0, 0)];
            let mut chosen = Vec::new();
            for _ in 0..6 {
                let v = views(&nodes, &allocated);
                let n = place(&ask("postgres", &res(250, 256, 1)), &v, policy, 1.0).unwrap();
                let i = usize::from(n.as_str() == "b");
                allocated[i] = allocated[i].saturating_add(res(250, 256, 1));
                chosen.push(n.to_string());
            }
            assert_eq!(chosen, expected, "{policy:?}");
        }
    }

    #[test]
    fn constraints_filter_by_label_and_say_which() {
        let mut eu = node("a", res(1000, 4096, 100));
        eu.labels.insert("zone".into(), "eu-1".into());
        let mut us = node("b", res(1000, 4096, 100));
        us.labels.insert("zone".into(), "us-1".into());
        let bare = node("c", res(1000, 4096, 100));
        let nodes = [eu, us, bare];
        let v = views(&nodes, &[res(900, 0, 0), res(0, 0, 0), res(0, 0, 0)]);
        let wanted: BTreeMap<String, String> = [("zone".to_string(), "eu-1".to_string())].into();
        let r = res(100, 1, 1);
        let a = Ask {
            engine: "postgres",
            resources: &r,
            constraints: &wanted,
        };
        // Spread would pick the emptier b or c; the constraint leaves only a.
        assert_eq!(place(&a, &v, Policy::Spread, 1.0).unwrap().as_str(), "a");
        let r = res(200, 1, 1);
        let a = Ask { resources: &r, ..a };
        assert_eq!(
            place(&a, &v, Policy::Spread, 1.0).unwrap_err().to_string(),
            "no node has room: a: 0.1 CPU free, 0.2 asked; b: label zone=us-1, wanted eu-1; \
             c: no label zone, wanted eu-1"
        );
    }

    #[test]
    fn a_fleets_reasons_are_cut_short_with_a_count() {
        let nodes: Vec<TestNode> = (0..12)
            .map(|i| node(&format!("n{i:02}"), res(1000, 1024, 10)))
            .collect();
        let v = views(&nodes, &[res(1000, 0, 0); 12]);
        let err = place(&ask("postgres", &res(1, 1, 1)), &v, Policy::BinPack, 1.0).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("n09: 0 CPU free"), "{text}");
        assert!(!text.contains("n10"), "{text}");
        assert!(text.ends_with("; and 2 more nodes"), "{text}");
    }

    #[test]
    fn cordoned_nodes_take_nothing_new() {
        let mut n = node("a", res(1000, 1024, 10));
        n.cordoned = true;
        let nodes = [n];
        let v = views(&nodes, &[res(0, 0, 0)]);
        let err = place(&ask("postgres", &res(1, 1, 1)), &v, Policy::BinPack, 1.0).unwrap_err();
        assert_eq!(err.to_string(), "no node has room: a: cordoned");
    }
}

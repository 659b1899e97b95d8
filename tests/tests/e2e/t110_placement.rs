//! Placement through the real scheduler, with simulated nodes (registered and heartbeating over
//! the agent API, no agent behind them): bin-pack fills one node before the next, spread
//! alternates, label constraints hold, the overcommit ratio bounds reservations, and refusals
//! say why. Needs no root.

use dormant_tests::{Replicas, SimNode, SimNodeSpec};
use serde_json::Value;

fn create(set: &Replicas, name: &str, cpu: &str, extra: &[&str]) -> Value {
    let mut args = dormant_tests::cluster::create_args(name, "postgres", [cpu, "64MiB", "1GiB"]);
    args.push("--no-wait");
    args.extend_from_slice(extra);
    let out = set.ctl(&args);
    assert!(out.success, "create {name}: {}", out.stderr);
    out.json()
}

fn node_of(v: &Value) -> String {
    v["node"].as_str().unwrap_or("").to_string()
}

#[test]
fn t110_binpack_fills_a_node_first_and_constraints_hold() {
    let set = Replicas::start(1, &[]);
    let _a = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("a", 1000, 4096, 100).label("zone", "eu-1"),
    );
    let _b = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("b", 1000, 4096, 100).label("zone", "eu-1"),
    );
    let _c = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("c", 1000, 4096, 100).label("zone", "us-1"),
    );
    let placed: Vec<String> = (1..=5)
        .map(|n| node_of(&create(&set, &format!("p{n}"), "0.25", &[])))
        .collect();
    // Ties go to the lowest id; the fullest node that fits wins after that.
    assert_eq!(placed, ["a", "a", "a", "a", "b"]);
    let us = create(&set, "q", "0.5", &["--constraint", "zone=us-1"]);
    assert_eq!(node_of(&us), "c");
    let nowhere = create(&set, "r", "0.5", &["--constraint", "zone=ap-1"]);
    assert_eq!(nowhere["state"], "pending");
    let reason = nowhere["reason"].as_str().unwrap();
    for why in [
        "a: label zone=eu-1, wanted ap-1",
        "b: label zone=eu-1, wanted ap-1",
        "c: label zone=us-1, wanted ap-1",
    ] {
        assert!(reason.contains(why), "{reason}");
    }
    // Cordoned nodes take nothing new.
    let out = set.ctl(&["node", "cordon", "b"]);
    assert!(out.success, "{}", out.stderr);
    let next = create(&set, "s", "0.25", &["--constraint", "zone=eu-1"]);
    assert_eq!(next["state"], "pending", "{next}");
    assert!(
        next["reason"].as_str().unwrap().contains("b: cordoned"),
        "{next}"
    );
    assert!(set.ctl(&["node", "uncordon", "b"]).success);
    let placed = dormant_tests::wait_until(
        std::time::Duration::from_secs(15),
        "the pending tenant to be placed after uncordon",
        || {
            let t = set.ctl(&["tenant", "get", "s", "-o", "json"]).json();
            (t["node"] == "b").then_some(t)
        },
    );
    assert_eq!(placed["state"], "starting");
}

#[test]
fn t111_spread_alternates_and_overcommit_bounds_reservations() {
    let set = Replicas::start(1, &["--placement", "spread", "--overcommit-ratio", "1.5"]);
    let _a = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("a", 1000, 4096, 100),
    );
    let _b = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("b", 1000, 4096, 100),
    );
    let placed: Vec<String> = (1..=6)
        .map(|n| node_of(&create(&set, &format!("t{n}"), "0.5", &[])))
        .collect();
    // 1.5 CPU of reservations fit on each 1-CPU node at ratio 1.5, and no more.
    assert_eq!(placed, ["a", "b", "a", "b", "a", "b"]);
    let full = create(&set, "t7", "0.5", &[]);
    assert_eq!(full["state"], "pending");
    assert_eq!(
        full["reason"],
        "no node has room: a: 0 CPU free, 0.5 asked; b: 0 CPU free, 0.5 asked"
    );
    let nodes = set.ctl(&["node", "list", "-o", "json"]).json();
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["allocated"]["cpu"], 1.5, "{n}");
    }
}

/// Why a pending tenant waits is worked out on read: placing some of 50 waiting tenants writes
/// one entry per placement, none for the others' reasons, and the reasons shown still name what
/// is free now.
#[test]
fn t112_placements_among_50_pending_tenants_write_no_entries_for_their_reasons() {
    let set = Replicas::start(1, &[]);
    let _a = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("a", 1000, 65536, 1000),
    );
    assert_eq!(node_of(&create(&set, "blocker", "0.95", &[])), "a");
    for n in 0..50 {
        let t = create(&set, &format!("w{n:02}"), "0.1", &[]);
        assert_eq!(t["state"], "pending", "{t}");
        assert_eq!(t["reason"], "no node has room: a: 0.05 CPU free, 0.1 asked");
    }
    let last_log = || {
        set.status(0).expect("status")["last_log_index"]
            .as_u64()
            .unwrap()
    };
    let before = last_log();
    // Shrinking the blocker frees 0.62 CPU: room for 6 of them, with 0.07 left over.
    let out = set.ctl(&["tenant", "update", "blocker", "--cpu", "0.33"]);
    assert!(out.success, "{}", out.stderr);
    let placed = || {
        let all = set.ctl(&["tenant", "list", "-o", "json"]).json();
        all.as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"] != "blocker" && t["node"] == "a")
            .count()
    };
    dormant_tests::wait_until(
        std::time::Duration::from_secs(30),
        "6 waiting tenants to be placed",
        || (placed() == 6).then_some(()),
    );
    // The placer also runs every 3 s: give it two more passes to write anything it would.
    std::thread::sleep(std::time::Duration::from_secs(7));
    assert_eq!(placed(), 6, "no room for a seventh");
    let written = last_log() - before;
    // The update and one entry per placement; before reasons were read live, each placement also
    // rewrote the reason of every one still waiting (about 44 each).
    assert!(written <= 1 + 6 + 1, "{written} entries for 6 placements");
    let all = set.ctl(&["tenant", "list", "-o", "json"]).json();
    let waiting: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "pending")
        .collect();
    assert_eq!(waiting.len(), 44);
    for t in waiting {
        assert_eq!(
            t["reason"], "no node has room: a: 0.07 CPU free, 0.1 asked",
            "{t}"
        );
    }
}

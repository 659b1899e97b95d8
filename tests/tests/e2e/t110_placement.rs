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

/// Creates that arrive together share Raft entries (the leader's `proposer`), and each is
/// answered as if it came alone: 48 at once on a 3-replica cluster, plus a second create of one
/// of the names, all acknowledged with uids and ports of their own except the repeated name,
/// refused with the field and the rule; fewer entries than creates; every replica the same.
#[test]
fn t113_creates_arriving_together_share_entries_and_each_is_answered_as_if_alone() {
    use dormant_common::tls::PeerIdentity;
    use dormant_proto::v1 as pb;
    use dormant_proto::v1::operator_client::OperatorClient;
    use dormant_tests::tls::OPERATOR;

    let set = Replicas::start(3, &[]);
    let _a = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("a", 64_000, 1 << 20, 100_000),
    );
    let leader = set.leader();
    let last_log = || {
        set.status(leader).expect("status")["last_log_index"]
            .as_u64()
            .unwrap()
    };
    let before = last_log();
    let transport = set
        .security
        .transport(&PeerIdentity::Operator(OPERATOR.into()));
    let url = set.url(leader);
    let mut names: Vec<String> = (0..48).map(|n| format!("c{n:02}")).collect();
    names.push("c07".into());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answers = runtime.block_on(async {
        let channel = transport
            .endpoint(&url)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the leader");
        // All sent before any is answered: one task each on one HTTP/2 connection.
        let mut calls = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let mut client = OperatorClient::new(channel.clone());
            let request = pb::CreateTenantRequest {
                name: name.clone(),
                engine: "postgres".into(),
                cpu: "10m".into(),
                memory: "64MiB".into(),
                storage: "64MiB".into(),
                ..Default::default()
            };
            calls.spawn(async move { (i, client.create_tenant(request).await) });
        }
        let mut answers = Vec::new();
        while let Some(done) = calls.join_next().await {
            answers.push(done.expect("a create task"));
        }
        answers.sort_by_key(|(i, _)| *i);
        answers
    });
    let mut uids = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    let mut refused = Vec::new();
    for (i, answer) in &answers {
        match answer {
            Ok(reply) => {
                let tenant = reply.get_ref().tenant.clone().expect("the tenant");
                assert_eq!(tenant.name, names[*i]);
                assert_eq!(tenant.node, "a", "{tenant:?}");
                assert!(uids.insert(tenant.uid), "uid {} given twice", tenant.uid);
                assert!(ports.insert(tenant.endpoint.clone()), "{}", tenant.endpoint);
            }
            Err(status) => refused.push((names[*i].clone(), status.clone())),
        }
    }
    assert_eq!(uids.len(), 48, "refused: {refused:?}");
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (name, status) = &refused[0];
    assert_eq!(name, "c07");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("already exists"), "{status:?}");
    let written = last_log() - before;
    eprintln!("49 creates sent at once: {written} entries");
    assert!(
        written < 49,
        "{written} entries for 49 creates sent at once: none shared an entry"
    );
    set.wait_converged();
    let names_everywhere: Vec<_> = (0..3).map(|i| set.tenant_names(i)).collect();
    assert_eq!(names_everywhere[0].len(), 48);
    assert!(names_everywhere.iter().all(|n| n == &names_everywhere[0]));
}

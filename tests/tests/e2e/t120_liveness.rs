//! Node liveness: a node silent for the grace period is marked down through Raft and its
//! tenants lost; when it comes back they return to their state. Heartbeats stay in the leader's
//! memory: a quiet minute of heartbeats writes no Raft entry, and a new leader gives every node a
//! fresh grace period instead of marking them all down.

use std::time::Duration;

use dormant_tests::{redis_cli, require_root, wait_until, Cluster, ClusterOptions, Replicas};
use dormant_tests::{SimNode, SimNodeSpec};

fn node_status(cluster: &Cluster, id: &str) -> String {
    let nodes = cluster.ctl_json(&["node", "list"]);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn t120_a_silent_node_goes_down_its_tenants_lost_and_both_come_back() {
    if !require_root("t120_a_silent_node_goes_down_its_tenants_lost_and_both_come_back") {
        return;
    }
    let opts = ClusterOptions {
        scheduler_flags: vec!["--node-grace-period-ms".into(), "3000".into()],
        ..Default::default()
    };
    let mut cluster = Cluster::start_with("liveness", opts);
    cluster.add_agent("node-a");
    let cache = cluster.create_running("cache", "redis", ["0.25", "128MiB", "256MiB"]);
    let endpoint = cache["endpoint"].as_str().unwrap().to_string();
    let password = cache["credentials"]["password"]
        .as_str()
        .unwrap()
        .to_string();

    // The agent dies; its engine keeps serving (by design), but the scheduler cannot know that.
    cluster.kill_agent(0);
    wait_until(Duration::from_secs(30), "the node to be down", || {
        (node_status(&cluster, "node-a") == "down").then_some(())
    });
    let t = cluster.tenant("cache");
    assert_eq!(t["state"], "lost", "{t}");
    // Nothing new lands on a down node.
    let out = cluster.create("other", "redis", ["0.1", "64MiB", "128MiB"], &["--no-wait"]);
    assert!(out.success, "{}", out.stderr);
    let other = out.json();
    assert_eq!(other["state"], "pending");
    assert!(
        other["reason"].as_str().unwrap().contains("node-a: down"),
        "{other}"
    );

    cluster.start_agent(0);
    assert_eq!(node_status(&cluster, "node-a"), "ready");
    cluster.wait_tenant_state("cache", "running", Duration::from_secs(60));
    assert_eq!(
        redis_cli(&endpoint, &password, &["PING"]).unwrap().trim(),
        "PONG"
    );
    // The pending tenant found room once the node was back.
    cluster.wait_tenant_state("other", "running", Duration::from_secs(60));
}

#[test]
fn t121_a_quiet_minute_of_heartbeats_writes_no_raft_entry_and_a_new_leader_waits() {
    let mut set = Replicas::start(3, &["--node-grace-period-ms", "3000"]);
    let nodes: Vec<SimNode> = (1..=40)
        .map(|n| {
            let mut spec = SimNodeSpec::new(&format!("sim-{n:02}"), 4000, 8192, 100);
            spec.heartbeat = Duration::from_millis(250);
            SimNode::start(&set.security, &set.urls(), spec)
        })
        .collect();
    set.wait_converged();
    let applied = |set: &Replicas| -> Vec<u64> {
        (0..3)
            .map(|i| set.status(i).unwrap()["applied_index"].as_u64().unwrap())
            .collect()
    };
    let before = applied(&set);
    // 40 nodes × 4 heartbeats/s × 60 s = 9,600 heartbeats.
    std::thread::sleep(Duration::from_secs(60));
    let after = applied(&set);
    assert_eq!(before, after, "heartbeats wrote Raft entries");
    let all_ready = |set: &Replicas| {
        let out = set.ctl(&["node", "list", "-o", "json"]);
        assert!(out.success, "{}", out.stderr);
        let v = out.json();
        let down: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["status"] != "ready")
            .map(|n| n["id"].to_string())
            .collect();
        assert_eq!(v.as_array().unwrap().len(), 40);
        down
    };
    assert!(all_ready(&set).is_empty());

    // A new leader has heard from nobody yet: it must not mark the fleet down.
    let old = set.leader();
    set.kill(old);
    let new = set.leader();
    // Its first entry is its fence (an entry of its own term, committed before it answers from
    // its state), written within milliseconds of the election.
    std::thread::sleep(Duration::from_secs(2));
    let leading_since = set.status(new).unwrap()["applied_index"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let down = all_ready(&set);
    assert!(
        down.is_empty(),
        "a new leader marked live nodes down: {down:?}"
    );
    let now = set.status(new).unwrap()["applied_index"].as_u64().unwrap();
    assert_eq!(
        leading_since, now,
        "the new leader wrote entries while nothing changed"
    );

    // And a node that really stops is noticed by the new leader.
    let mut nodes = nodes;
    nodes.pop().unwrap().silence();
    wait_until(Duration::from_secs(30), "sim-40 to be down", || {
        let v = set.ctl(&["node", "list", "-o", "json"]).json();
        v.as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "sim-40" && n["status"] == "down")
            .then_some(())
    });
}

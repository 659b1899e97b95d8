//! Acceptance 4: a tenant that fits nowhere is `pending` with a reason, and is placed once a
//! node with room registers.

use std::time::Duration;

use dormant_tests::{psql, require_root, Cluster};

#[test]
fn pending_tenant_is_placed_when_a_node_registers() {
    if !require_root("pending_tenant_is_placed_when_a_node_registers") {
        return;
    }
    let mut cluster = Cluster::start("t40");
    let out = cluster.create("early", "postgres", ["0.25", "256MiB", "256MiB"], &[]);
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    assert_eq!(t["state"], "pending");
    assert_eq!(t["reason"], "no node is registered");
    assert_eq!(t["endpoint"], serde_json::Value::Null);

    cluster.add_agent("n1");
    let t = cluster.wait_tenant_state("early", "running", Duration::from_secs(60));
    assert_eq!(t["node"], "n1");
    let uri = cluster.ctl_json(&["tenant", "credentials", "early"])["uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(psql(&uri, "SELECT 40 + 2").unwrap(), "42");
}

#[test]
fn pending_reason_names_the_short_resource() {
    if !require_root("pending_reason_names_the_short_resource") {
        return;
    }
    let mut cluster = Cluster::start("t40r");
    cluster.add_agent("n1");
    // Fill the node's CPU with one tenant, then ask for more than is left.
    let cores = std::thread::available_parallelism().unwrap().get();
    cluster.create_tenant("big", &cores.to_string(), "256MiB", "256MiB");
    let out = cluster.create("small", "postgres", ["0.5", "256MiB", "256MiB"], &[]);
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    assert_eq!(t["state"], "pending");
    assert_eq!(
        t["reason"], "no node has room: n1: 0 CPU free, 0.5 asked",
        "{t}"
    );
    // Room comes back when the big one goes.
    assert!(cluster.ctl(&["tenant", "delete", "big"]).success);
    cluster.wait_tenant_state("small", "running", Duration::from_secs(60));
}

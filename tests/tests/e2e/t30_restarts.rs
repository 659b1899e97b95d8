//! Acceptance 3: restarting the scheduler keeps every tenant and node; restarting the agent
//! (kill -9) loses no tenant: its engine keeps running, is adopted, and answers again.

use std::time::Duration;

use dormant_tests::{psql, require_root, wait_until, Cluster};

#[test]
fn scheduler_restart_keeps_tenants_and_nodes() {
    if !require_root("scheduler_restart_keeps_tenants_and_nodes") {
        return;
    }
    let mut cluster = Cluster::start("t30s");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("keep", "0.25", "256MiB", "256MiB");
    let uri = t["credentials"]["uri"].as_str().unwrap().to_string();
    // A pending one too: it must survive as pending.
    let out = cluster.ctl(&[
        "tenant",
        "create",
        "waits",
        "--engine",
        "postgres",
        "--cpu",
        "2",
        "--memory",
        "256MiB",
        "--storage",
        "256MiB",
        "-o",
        "json",
    ]);
    assert!(out.success, "{}", out.stderr);
    let before_tenants = cluster.ctl_json(&["tenant", "list"]);
    let before_nodes = cluster.ctl_json(&["node", "list"]);

    cluster.kill_scheduler();
    cluster.start_scheduler();

    let strip_usage = |mut v: serde_json::Value| {
        for t in v.as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("usage");
        }
        v
    };
    assert_eq!(
        strip_usage(cluster.ctl_json(&["tenant", "list"])),
        strip_usage(before_tenants)
    );
    assert_eq!(cluster.ctl_json(&["node", "list"]), before_nodes);
    assert_eq!(psql(&uri, "SELECT 'still here'").unwrap(), "still here");
    // The agent carries on with the restarted scheduler: a delete still goes through.
    let out = cluster.ctl(&["tenant", "delete", "keep"]);
    assert!(out.success, "{}", out.stderr);
}

#[test]
fn agent_kill_9_keeps_the_tenant_running_and_reachable() {
    if !require_root("agent_kill_9_keeps_the_tenant_running_and_reachable") {
        return;
    }
    let mut cluster = Cluster::start("t30a");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("survivor", "0.25", "256MiB", "256MiB");
    let uri = t["credentials"]["uri"].as_str().unwrap().to_string();
    psql(
        &uri,
        "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('before')",
    )
    .unwrap();
    let pid_file = cluster.agents[0]
        .state_dir
        .join("tenants/survivor/engine.pid");
    let pid_before = std::fs::read_to_string(&pid_file).unwrap();

    cluster.kill_agent(0);
    // The engine outlives the agent.
    let pid: i32 = pid_before.trim().parse().unwrap();
    assert!(
        dormant_tests::process::pid_alive(pid),
        "engine died with the agent"
    );

    cluster.start_agent(0);
    let out = wait_until(
        Duration::from_secs(30),
        "the endpoint to answer again",
        || psql(&uri, "SELECT v FROM kept").ok(),
    );
    assert_eq!(out, "before");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        pid_before,
        "engine was restarted"
    );
    assert!(cluster.agent_log(0).contains("adopted running engine"));
    assert_eq!(cluster.tenant("survivor")["state"], "running");
}

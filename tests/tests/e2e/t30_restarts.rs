//! Acceptance 3: restarting the scheduler keeps every tenant and node; restarting the agent
//! (kill -9) loses no tenant: its engine keeps running, is adopted, and answers again.

use std::time::Duration;

use dormant_tests::{psql, redis_cli, require_root, wait_until, Cluster};

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
    let out = cluster.create("waits", "postgres", ["2", "256MiB", "256MiB"], &[]);
    assert!(out.success, "{}", out.stderr);
    let before_tenants = cluster.ctl_json(&["tenant", "list"]);
    let before_nodes = cluster.ctl_json(&["node", "list"]);

    cluster.kill_scheduler();
    cluster.start_scheduler();

    // Usage is live (the leader's memory of the last heartbeats), not replicated state.
    let strip_usage = |mut v: serde_json::Value| {
        for t in v.as_array_mut().unwrap() {
            let t = t.as_object_mut().unwrap();
            t.remove("usage");
            t.remove("used");
        }
        v
    };
    assert_eq!(
        strip_usage(cluster.ctl_json(&["tenant", "list"])),
        strip_usage(before_tenants)
    );
    assert_eq!(
        strip_usage(cluster.ctl_json(&["node", "list"])),
        strip_usage(before_nodes)
    );
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
    // A second tenant of another engine: every tenant must survive, not just one.
    let cache = cluster.create_running("cache", "redis", ["0.25", "128MiB", "256MiB"]);
    let cache_endpoint = cache["endpoint"].as_str().unwrap().to_string();
    let pids_before = [
        cluster.engine_pid(0, "survivor"),
        cluster.engine_pid(0, "cache"),
    ];

    cluster.kill_agent(0);
    // The engines outlive the agent.
    for pid in pids_before {
        assert!(
            dormant_tests::process::pid_alive(pid),
            "engine {pid} died with the agent"
        );
    }

    cluster.start_agent(0);
    let out = wait_until(
        Duration::from_secs(30),
        "the endpoint to answer again",
        || psql(&uri, "SELECT v FROM kept").ok(),
    );
    assert_eq!(out, "before");
    // The redis endpoint answers again too (the proxy is the agent's; the engine never stopped).
    let password = cache["credentials"]["password"].as_str().unwrap();
    wait_until(Duration::from_secs(30), "redis to answer again", || {
        (redis_cli(&cache_endpoint, password, &["PING"]).ok()? == "PONG").then_some(())
    });
    assert_eq!(
        [
            cluster.engine_pid(0, "survivor"),
            cluster.engine_pid(0, "cache"),
        ],
        pids_before,
        "an engine was restarted"
    );
    let log = cluster.agent_log(0);
    assert_eq!(log.matches("adopted running engine").count(), 2, "{log}");
    assert_eq!(cluster.tenant("survivor")["state"], "running");
    assert_eq!(cluster.tenant("cache")["state"], "running");
}

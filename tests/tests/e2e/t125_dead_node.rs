//! A node that dies for good: `tenant delete --force` and `node remove --force` free its tenants'
//! names and ports at once; when the node's agent comes back after all, it removes the deleted
//! tenants' data instead of starting them again, and only then are their ports given out there.
//! Needs root (real agents and engines).

use std::time::Duration;

use dormant_tests::{require_root, wait_until, Cluster, ClusterOptions};
use serde_json::Value;

fn node(cluster: &Cluster, id: &str) -> Option<Value> {
    let nodes = cluster.ctl_json(&["node", "list"]);
    nodes.as_array()?.iter().find(|n| n["id"] == id).cloned()
}

fn port_of(t: &Value) -> u16 {
    let endpoint = t["endpoint"].as_str().unwrap();
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn t125_a_dead_node_is_removed_its_tenants_freed_and_on_return_it_deletes_them() {
    if !require_root("t125_a_dead_node_is_removed") {
        return;
    }
    let opts = ClusterOptions {
        scheduler_flags: vec![
            "--node-grace-period-ms".into(),
            "3000".into(),
            "--log-json".into(),
        ],
        ..Default::default()
    };
    let mut cluster = Cluster::start_with("deadnode", opts);
    let n1 = cluster.add_agent("n1");
    let sizes = ["0.1", "64MiB", "128MiB"];
    let a = cluster.create_running("a", "redis", sizes);
    cluster.create_running("b", "redis", sizes);
    let port_a = port_of(&a);
    cluster.add_agent("n2");

    // The host dies: its agent and its engines, all at once.
    let engines = [cluster.engine_pid(n1, "a"), cluster.engine_pid(n1, "b")];
    cluster.kill_agent(n1);
    for pid in engines {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until(Duration::from_secs(30), "n1 to be down", || {
        (node(&cluster, "n1")?["status"] == "down").then_some(())
    });
    assert_eq!(cluster.tenant("a")["state"], "lost");

    // Not forgotten by accident: it holds tenants.
    let out = cluster.ctl(&["node", "remove", "n1"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("holds tenants (a, b)"),
        "{}",
        out.stderr
    );
    // A forced delete is for a tenant whose node is away, not one on a ready node.
    cluster.create_running("on-n2", "redis", sizes);
    let out = cluster.ctl(&["tenant", "delete", "on-n2", "--force"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("is ready: a plain delete"),
        "{}",
        out.stderr
    );

    // The name is free at once: a tenant of that name runs on n2.
    let out = cluster.ctl(&["tenant", "delete", "a", "--force"]);
    assert!(out.success, "{}", out.stderr);
    let again = cluster.create_running("a", "redis", sizes);
    assert_eq!(again["node"], "n2", "{again}");

    let out = cluster.ctl(&["node", "remove", "n1", "--force", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.json()["deleted_tenants"], serde_json::json!(["b"]));
    assert!(node(&cluster, "n1").is_none());
    let out = cluster.ctl(&["tenant", "get", "b"]);
    assert!(
        !out.success && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );

    // The host comes back after all, its disk intact: its agent registers again, removes the
    // tenants deleted while it was away, and never starts them.
    let state_dir = cluster.agents[n1].state_dir.clone();
    assert!(state_dir.join("tenants/a").exists() && state_dir.join("tenants/b").exists());
    cluster.start_agent(n1);
    wait_until(
        Duration::from_secs(60),
        "n1 to remove what was deleted while it was away",
        || {
            let n = node(&cluster, "n1")?;
            (n["removing"].as_array()?.is_empty()
                && !state_dir.join("tenants/a").exists()
                && !state_dir.join("tenants/b").exists())
            .then_some(())
        },
    );
    assert_eq!(node(&cluster, "n1").unwrap()["tenants"], 0);
    // The second run's log (the file is appended to): both deleted, neither brought up.
    let log = cluster.agent_log(n1);
    let (first_run, second_run) = log.split_at(log.rfind("swept the host at start").unwrap());
    assert!(
        first_run.contains("to=running"),
        "the pattern below: {first_run}"
    );
    assert_eq!(
        second_run.matches("tenant deleted from this host").count(),
        2,
        "{second_run}"
    );
    assert!(!second_run.contains("to=running"), "{second_run}");
    // The ports were held until then; now n1 gives the first one out again.
    assert!(cluster.ctl(&["node", "cordon", "n2"]).success);
    let c = cluster.create_running("c", "redis", sizes);
    assert_eq!((c["node"].as_str(), port_of(&c)), (Some("n1"), port_a));
    // The tenant of that name on n2 was never touched.
    assert_eq!(cluster.tenant("a")["state"], "running");
}

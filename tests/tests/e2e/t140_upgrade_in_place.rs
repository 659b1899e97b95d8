//! Upgrade in place: tenants created by the agent of an older commit are taken over by this
//! tree's agent, started on the same state directory after the old one is killed (kill -9, as a
//! crash or a hasty upgrade would), with no engine restarted and no data lost. The old agent is
//! built from the repository's history (`dormant_tests::old_build`); its first build takes
//! minutes, later runs reuse it.
//!
//! The new agent may write new fields into the tenants' records; the old records must only read.
//!
//! The old agent cannot speak TLS: this test's cluster is plaintext (`--insecure`), the only one
//! in the suite.

use std::time::Duration;

use dormant_tests::process::{pid_alive, pids_under, start_time};
use dormant_tests::{
    old_build, psql, redis_cli, require_root, wait_until, Cluster, ClusterOptions,
};

/// The last commit on main before the agent's rewrite: the layout of state directories, records
/// and cgroups that running hosts have.
const OLD_AGENT_COMMIT: &str = "5b8ced2";

/// One engine process: its PID and when it started (a PID alone could have been reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Engine {
    pid: i32,
    started: u64,
}

fn engine(cluster: &Cluster, tenant: &str) -> Engine {
    let pid = cluster.engine_pid(0, tenant);
    let started = start_time(pid).unwrap_or_else(|| panic!("engine {pid} of {tenant} is gone"));
    Engine { pid, started }
}

/// The tenant's usage as the leader last heard it from the node, once there is one.
fn usage(cluster: &Cluster, tenant: &str) -> Option<serde_json::Value> {
    let t = cluster.tenant(tenant);
    (!t["usage"].is_null()).then(|| t["usage"].clone())
}

#[test]
fn t140_tenants_of_the_previous_agent_are_adopted_without_a_restart() {
    let test = "t140_tenants_of_the_previous_agent_are_adopted_without_a_restart";
    if !require_root(test) {
        return;
    }
    let Some(old) = old_build::build(test, OLD_AGENT_COMMIT, "dormant-agent") else {
        return;
    };
    // The one cluster of the suite without TLS: the old agent predates it and can only speak
    // plaintext, so the scheduler, dormantctl and this tree's agent run with --insecure too
    // (this tree's agent through DORMANT_INSECURE=1, since it is given the old one's flags).
    let mut cluster = Cluster::start_with(
        "t140",
        ClusterOptions {
            insecure: true,
            ..ClusterOptions::default()
        },
    );
    cluster.add_agent_from("n1", &old, &[]);

    let pg = cluster.create_tenant("keep", "0.25", "256MiB", "256MiB");
    let uri = pg["credentials"]["uri"].as_str().unwrap().to_string();
    psql(
        &uri,
        "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('written under the old agent')",
    )
    .unwrap();
    let cache = cluster.create_running("cache", "redis", ["0.25", "128MiB", "256MiB"]);
    let endpoint = cache["endpoint"].as_str().unwrap().to_string();
    let password = cache["credentials"]["password"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        redis_cli(
            &endpoint,
            &password,
            &["SET", "kept", "written under the old agent"]
        )
        .unwrap(),
        "OK"
    );
    let tenants = ["keep", "cache"];
    let engines_before = tenants.map(|t| engine(&cluster, t));
    // The old agent's own count, so a restart it made is not mistaken for the upgrade's.
    for t in tenants {
        let u = wait_until(Duration::from_secs(30), "the old agent's usage", || {
            usage(&cluster, t)
        });
        assert_eq!(u["restarts"], 0, "{t} restarted under the old agent: {u}");
    }

    cluster.kill_agent(0);
    for (t, e) in tenants.iter().zip(engines_before) {
        assert!(
            pid_alive(e.pid),
            "engine {} of {t} died with the agent",
            e.pid
        );
    }
    // Whatever the leader reports from now on that differs from this came from the new agent.
    let cpu_at_kill = tenants.map(|t| usage(&cluster, t).unwrap()["cpu_usage_usec"].clone());

    cluster.agents[0].bin = cluster.bin("dormant-agent");
    cluster.start_agent(0);

    // The data reads back, through the new agent's proxies.
    let v = wait_until(
        Duration::from_secs(30),
        "the postgres tenant to answer again",
        || psql(&uri, "SELECT v FROM kept").ok(),
    );
    assert_eq!(v, "written under the old agent");
    let v = wait_until(
        Duration::from_secs(30),
        "the redis tenant to answer again",
        || redis_cli(&endpoint, &password, &["GET", "kept"]).ok(),
    );
    assert_eq!(v, "written under the old agent");

    // Both running as the new agent reports them (its usage differs from the last the old one
    // sent: the engines did work since, answering the reads above), none restarted.
    for (t, at_kill) in tenants.iter().zip(&cpu_at_kill) {
        let u = wait_until(
            Duration::from_secs(30),
            &format!("a report on {t} from the new agent"),
            || usage(&cluster, t).filter(|u| u["cpu_usage_usec"] != *at_kill),
        );
        assert_eq!(u["restarts"], 0, "{t} restarted under the new agent: {u}");
        assert_eq!(cluster.tenant(t)["state"], "running", "{t}");
    }
    // The very processes the old agent started: alive (a dead engine nobody reaped keeps its
    // PID and start time as a zombie), same PID and start time, still in the tenant's cgroup.
    // This is the proof that nothing restarted: `restarts` above counts only the new agent's own
    // restarts, and an engine it started afresh at takeover would be its first start, not one.
    // Read from the kernel, not the agent's files, whose layout the new agent may change.
    for (t, before) in tenants.iter().zip(engines_before) {
        assert!(
            pid_alive(before.pid) && start_time(before.pid) == Some(before.started),
            "the engine of {t} (PID {}) is gone: the new agent did not adopt it",
            before.pid
        );
        let cgroup = cluster.tenant_cgroup("n1", t, "pids");
        assert!(
            pids_under(&cgroup).contains(&before.pid),
            "engine {} of {t} is not in {}",
            before.pid,
            cgroup.display()
        );
    }
    // And the new agent carries on with them: writes and a delete go through.
    psql(
        &uri,
        "INSERT INTO kept VALUES ('written under the new agent')",
    )
    .unwrap();
    assert_eq!(
        psql(&uri, "SELECT count(*) FROM kept").unwrap(),
        "2",
        "rows after the upgrade"
    );
    let out = cluster.ctl(&["tenant", "delete", "cache"]);
    assert!(out.success, "{}", out.stderr);
    let cache_dir = cluster.agents[0].state_dir.join("tenants/cache");
    let cache_pid = engines_before[1].pid;
    wait_until(
        Duration::from_secs(60),
        "the new agent to take the adopted cache apart",
        || (!pid_alive(cache_pid) && !cache_dir.exists()).then_some(()),
    );
}

//! The contract between the scheduler and its agents, through the real scheduler: a heartbeat
//! changes only what an agent may say (starting, running, hibernated, waking, failed, about the
//! tenants placed on its node) and its pending resizes show in `tenant get`, `tenant restart`
//! reaches the node's desired set, and every answer names the cluster, which is chosen once and
//! kept. The first three use simulated nodes (one-shot agent API calls, nothing behind them) and
//! need no root; the last runs a real agent against a scheduler replaced by a freshly bootstrapped
//! one.

use std::time::Duration;

use dormant_proto::v1 as pb;
use dormant_tests::sim_node::{heartbeat_with, observed, register_once};
use dormant_tests::{redis_cli, require_root, wait_until, Cluster, Replicas, SimNodeSpec};
use serde_json::Value;

/// Nodes here heartbeat only when the test says so; a grace period longer than any test keeps
/// them ready meanwhile, so nothing but the test's own calls writes to the log.
const QUIET_NODES: [&str; 2] = ["--node-grace-period-ms", "600000"];

fn ctl_json(set: &Replicas, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let out = set.ctl(&args);
    assert!(out.success, "dormantctl {args:?}: {}", out.stderr);
    out.json()
}

fn applied_index(set: &Replicas) -> u64 {
    ctl_json(set, &["cluster", "status"])["applied_index"]
        .as_u64()
        .unwrap()
}

/// Registers node `id` through any running replica (followers forward), retrying while the
/// cluster has no leader or no identity yet.
fn register(set: &Replicas, id: &str) -> pb::RegisterResponse {
    let spec = SimNodeSpec::new(id, 2000, 4096, 100);
    wait_until(
        Duration::from_secs(30),
        &format!("node {id} to register"),
        || {
            (0..set.replicas.len())
                .filter(|i| set.is_up(*i))
                .find_map(|i| register_once(&set.security, &set.url(i), &spec).ok())
        },
    )
}

/// `tenant create NAME --no-wait` on the simulated nodes; returns its JSON.
fn create(set: &Replicas, name: &str, extra: &[&str]) -> Value {
    let mut args = dormant_tests::cluster::create_args(name, "redis", ["0.25", "64MiB", "1GiB"]);
    args.push("--no-wait");
    args.extend_from_slice(extra);
    let out = set.ctl(&args);
    assert!(out.success, "create {name}: {}", out.stderr);
    out.json()
}

#[test]
fn t130_a_heartbeat_changes_only_what_an_agent_may_report_about_its_own_tenants_and_shows_its_pending_resize(
) {
    let set = Replicas::start(1, &QUIET_NODES);
    let url = set.url(0);
    register(&set, "a");
    register(&set, "b");
    let t = create(&set, "t", &[]);
    // Bin-packing breaks the tie between two empty nodes by the lowest id.
    assert_eq!(t["node"], "a", "{t}");
    let uid = t["uid"].as_u64().unwrap();
    heartbeat_with(
        &set.security,
        &url,
        "a",
        vec![observed("t", uid, "running")],
    )
    .unwrap();
    let before = ctl_json(&set, &["tenant", "get", "t"]);
    assert_eq!(before["state"], "running", "{before}");
    let applied = applied_index(&set);

    let mut b_speaks_for_a = observed("t", uid, "failed");
    b_speaks_for_a.reason = "node b says so".into();
    b_speaks_for_a.resize_pending = "storage 9GiB: node b says so".into();
    b_speaks_for_a.usage = Some(pb::TenantUsage {
        memory_bytes: 777 << 20,
        ..Default::default()
    });
    let reports = [
        // States that are the scheduler's to decide.
        ("a", observed("t", uid, "pending")),
        ("a", observed("t", uid, "lost")),
        // The agent's word only for a tenant it was told to delete.
        ("a", observed("t", uid, "deleting")),
        // Another tenant that once had the name.
        ("a", observed("t", uid + 1000, "failed")),
        // Another node speaking for a's tenant.
        ("b", b_speaks_for_a),
    ];
    for (node, report) in reports {
        let what = format!(
            "node {node} reporting {} (uid {})",
            report.state, report.uid
        );
        let answer = heartbeat_with(&set.security, &url, node, vec![report])
            .unwrap_or_else(|s| panic!("{what}: the heartbeat was not answered: {s:?}"));
        assert!(!answer.cluster_id.is_empty(), "{what}: {answer:?}");
        let now = ctl_json(&set, &["tenant", "get", "t"]);
        for field in ["state", "node", "reason", "uid"] {
            assert_eq!(now[field], before[field], "{what} changed {field}: {now}");
        }
        assert_eq!(applied_index(&set), applied, "{what} wrote a Raft entry");
    }
    // Node b's usage and pending resize for a's tenant did not reach the leader's memory either.
    let now = ctl_json(&set, &["tenant", "get", "t"]);
    assert_eq!(now["usage"]["memory_bytes"], 0, "{now}");
    assert_eq!(now["resize_pending"], Value::Null, "{now}");

    // A resize node a could not finish shows in tenant get, from memory: no Raft entry.
    let mut resizing = observed("t", uid, "running");
    resizing.resize_pending = "storage 2GiB: resize2fs needs CAP_SYS_RESOURCE".into();
    heartbeat_with(&set.security, &url, "a", vec![resizing]).unwrap();
    let now = ctl_json(&set, &["tenant", "get", "t"]);
    assert_eq!(
        now["resize_pending"], "storage 2GiB: resize2fs needs CAP_SYS_RESOURCE",
        "{now}"
    );
    let text = set.ctl(&["tenant", "get", "t"]).stdout;
    assert!(
        text.contains("\nresize pending: storage 2GiB: resize2fs needs CAP_SYS_RESOURCE"),
        "{text}"
    );
    assert_eq!(
        applied_index(&set),
        applied,
        "a pending resize wrote a Raft entry"
    );
    heartbeat_with(
        &set.security,
        &url,
        "a",
        vec![observed("t", uid, "running")],
    )
    .unwrap();
    let now = ctl_json(&set, &["tenant", "get", "t"]);
    assert_eq!(now["resize_pending"], Value::Null, "finished: {now}");

    // What node a may say still goes through.
    for state in ["hibernated", "waking", "running"] {
        heartbeat_with(&set.security, &url, "a", vec![observed("t", uid, state)]).unwrap();
        let now = ctl_json(&set, &["tenant", "get", "t"]);
        assert_eq!(now["state"], state, "{now}");
    }
    let mut failed = observed("t", uid, "failed");
    failed.reason = "engine exited with status 1".into();
    heartbeat_with(&set.security, &url, "a", vec![failed]).unwrap();
    let after = ctl_json(&set, &["tenant", "get", "t"]);
    assert_eq!(after["state"], "failed", "{after}");
    assert_eq!(after["reason"], "engine exited with status 1", "{after}");
    assert!(applied_index(&set) > applied);
}

#[test]
fn t131_tenant_restart_raises_the_generation_in_the_nodes_desired_set_and_refuses_with_the_rule() {
    let set = Replicas::start(1, &QUIET_NODES);
    let url = set.url(0);
    register(&set, "a");
    let t = create(&set, "t", &[]);
    assert_eq!(t["node"], "a", "{t}");
    assert_eq!(t["restart_generation"], 0, "{t}");
    let desired_generation = || {
        let answer = heartbeat_with(&set.security, &url, "a", Vec::new()).unwrap();
        let t = answer.tenants.iter().find(|d| d.name == "t");
        t.unwrap_or_else(|| panic!("t not in a's desired set: {answer:?}"))
            .restart_generation
    };
    assert_eq!(desired_generation(), 0);

    let restarted = ctl_json(&set, &["tenant", "restart", "t"]);
    assert_eq!(restarted["restart_generation"], 1, "{restarted}");
    assert_eq!(restarted["name"], "t");
    assert_eq!(desired_generation(), 1);
    let out = set.ctl(&["tenant", "restart", "t"]);
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("restart generation 2"),
        "{}",
        out.stdout
    );
    assert_eq!(desired_generation(), 2);
    assert_eq!(
        ctl_json(&set, &["tenant", "get", "t"])["restart_generation"],
        2
    );
    let shown = set.ctl(&["tenant", "get", "t"]);
    assert!(
        shown.stdout.contains("\nrestart generation: 2"),
        "{}",
        shown.stdout
    );

    let refused = |name: &str, why: &str| {
        let out = set.ctl(&["tenant", "restart", name]);
        assert!(
            !out.success,
            "restart {name} was not refused: {}",
            out.stdout
        );
        assert!(
            out.stderr.contains(why),
            "restart {name}: {why:?} not in {}",
            out.stderr
        );
    };
    refused("nope", "name: tenant \"nope\" not found");
    refused("../x", "name:");
    let p = create(&set, "p", &["--constraint", "zone=nowhere"]);
    assert_eq!(p["state"], "pending", "{p}");
    refused("p", "name: tenant \"p\" is pending");
    let out = set.ctl(&["tenant", "delete", "t", "--no-wait"]);
    assert!(out.success, "{}", out.stderr);
    // Node a has not heartbeat since: t waits for it, deleting.
    refused("t", "name: tenant \"t\" is being deleted");
    assert_eq!(
        ctl_json(&set, &["tenant", "get", "t"])["restart_generation"],
        2
    );
}

#[test]
fn t132_the_cluster_identity_is_chosen_once_and_kept_across_leaders_restarts_and_snapshots() {
    let mut set = Replicas::start(3, &["--snapshot-every", "10"]);
    let first = register(&set, "a").cluster_id;
    assert_eq!(first.len(), 32, "{first:?}");
    assert!(first.chars().all(|c| c.is_ascii_hexdigit()), "{first:?}");
    // Every replica applied the same choice.
    set.wait_converged();
    for i in 0..3 {
        assert_eq!(set.status(i).unwrap()["cluster_id"], first.as_str());
    }
    // Enough entries for a snapshot, so a restarted replica reads the identity from one.
    for n in 0..12 {
        create(&set, &format!("t{n}"), &[]);
    }
    let leader = set.leader();
    wait_until(Duration::from_secs(30), "a snapshot on the leader", || {
        let s = set.status(leader)?;
        (s["snapshot_index"].as_u64()? > 0).then_some(())
    });

    set.kill(leader);
    let answer = register(&set, "a");
    assert_eq!(answer.cluster_id, first, "the new leader's answer");
    set.restart(leader);
    set.wait_converged();
    for i in 0..3 {
        let status = set.status(i).unwrap();
        assert_eq!(
            status["cluster_id"],
            first.as_str(),
            "replica {i}: {status}"
        );
    }
    let new_leader = set.leader();
    let heartbeat = heartbeat_with(&set.security, &set.url(new_leader), "a", Vec::new()).unwrap();
    assert_eq!(heartbeat.cluster_id, first);
    let text = set.ctl(&["cluster", "status"]);
    assert!(
        text.stdout.starts_with(&format!("cluster: {first}\n")),
        "{}",
        text.stdout
    );
}

#[test]
fn t133_an_agent_keeps_its_tenants_when_a_fresh_cluster_answers_at_its_schedulers_address() {
    if !require_root(
        "t133_an_agent_keeps_its_tenants_when_a_fresh_cluster_answers_at_its_schedulers_address",
    ) {
        return;
    }
    let mut cluster = Cluster::start("identity");
    cluster.add_agent("node-a");
    let cache = cluster.create_running("cache", "redis", ["0.25", "128MiB", "256MiB"]);
    let endpoint = cache["endpoint"].as_str().unwrap().to_string();
    let password = cache["credentials"]["password"]
        .as_str()
        .unwrap()
        .to_string();
    let ours = cluster.ctl_json(&["cluster", "status"])["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();
    // As the agent names it (its state dir is canonical).
    let record = std::fs::canonicalize(cluster.agents[0].state_dir.join("cluster-id")).unwrap();
    assert_eq!(std::fs::read_to_string(&record).unwrap().trim(), ours);
    let pid = cluster.engine_pid(0, "cache");

    // The scheduler's data is lost and a new cluster is bootstrapped at the same address: it
    // knows nothing of node-a's tenant.
    cluster.kill_scheduler();
    std::fs::remove_dir_all(cluster.dir().join("scheduler")).unwrap();
    cluster.start_scheduler();
    let theirs = wait_until(
        Duration::from_secs(30),
        "the new cluster's identity",
        || {
            cluster.ctl_json(&["cluster", "status"])["cluster_id"]
                .as_str()
                .map(str::to_string)
        },
    );
    assert_ne!(theirs, ours);
    // The agent sends the cluster it belongs to, and the new cluster refuses it before recording
    // anything; the agent logs the refusal, naming both identities, the first time and every
    // 30th: by the second line it has been refused 30 times in a row.
    let refusal = format!(
        "cluster_id: node node-a belongs to scheduler cluster {ours}, this is cluster {theirs}"
    );
    wait_until(
        Duration::from_secs(60),
        "the agent to be refused by the new cluster 30 times",
        || {
            let log = cluster.agent_log(0);
            (log.lines().filter(|l| l.contains(&refusal)).count() >= 2).then_some(())
        },
    );

    // Nothing was deleted or restarted: the same engine process serves the same data.
    assert_eq!(cluster.engine_pid(0, "cache"), pid);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(
        redis_cli(&endpoint, &password, &["PING"]).unwrap().trim(),
        "PONG"
    );
    assert_eq!(std::fs::read_to_string(&record).unwrap().trim(), ours);
    // And the new cluster never got the node: the agent did not register with it.
    let nodes = cluster.ctl_json(&["node", "list"]);
    assert_eq!(nodes.as_array().unwrap().len(), 0, "{nodes}");
}

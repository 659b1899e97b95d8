//! Upgrade in place of a 3-replica scheduler cluster, one replica at a time, from the version
//! that stored and sent everything in JSON (`OLD_SCHEDULER_COMMIT`, built from the repository's
//! history by `dormant_tests::old_build`) to this tree's (MessagePack after a format byte, writes
//! batched into shared entries). Each replica is killed (-9, as a hasty upgrade would) and started
//! on its own data directory with the new binary. At every step: the tenants and the node written
//! by the old version are all there, unchanged, on every replica; writes are answered; and every
//! replica that is up applies them.
//!
//! The mixed clusters this goes through, and what each shows:
//! - an old leader with a new follower: the new one reads the old one's JSON (entries, snapshots
//!   sent to it) and answers it in JSON;
//! - a new leader with an old follower: the leader finds the old follower cannot read the new
//!   format, sends it JSON, and proposes no batches (which the old version cannot apply) while
//!   it is there: concurrent creates then still reach the old follower, one entry each;
//! - all new: concurrent creates share entries.
//!
//! Snapshots every 20 entries, so each replica opens a snapshot, not only a log, written in JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use dormant_tests::cluster::bin_dir;
use dormant_tests::replicas::Replicas;
use dormant_tests::sim_node::{SimNode, SimNodeSpec};
use dormant_tests::{cluster, old_build, wait_until};
use serde_json::Value;

/// The last commit whose scheduler wrote JSON: the state running clusters have.
const OLD_SCHEDULER_COMMIT: &str = "a313f8d";

fn create_args(name: &str) -> Vec<&str> {
    let mut args = cluster::create_args(name, "postgres", ["0.1", "64MiB", "1GiB"]);
    args.push("--no-wait");
    args
}

/// What must survive an upgrade of each tenant, as replica `i` has applied it: everything but
/// the state, which follows the (simulated) node's heartbeats.
fn tenants_at(set: &Replicas, i: usize) -> BTreeMap<String, Value> {
    let out = set.ctl_at(i, &["tenant", "list", "--stale", "-o", "json"]);
    assert!(out.success, "tenant list at replica {i}: {}", out.stderr);
    out.json()
        .as_array()
        .expect("a list of tenants")
        .iter()
        .map(|t| {
            let kept = serde_json::json!({
                "uid": t["uid"], "engine": t["engine"], "node": t["node"],
                "endpoint": t["endpoint"], "resources": t["resources"],
            });
            (t["name"].as_str().expect("a name").to_string(), kept)
        })
        .collect()
}

fn nodes_at(set: &Replicas, i: usize) -> BTreeMap<String, Value> {
    let out = set.ctl_at(i, &["node", "list", "--stale", "-o", "json"]);
    assert!(out.success, "node list at replica {i}: {}", out.stderr);
    out.json()
        .as_array()
        .expect("a list of nodes")
        .iter()
        .map(|n| {
            let id = n["id"].as_str().expect("an id").to_string();
            (id, n["capacity"].clone())
        })
        .collect()
}

/// Creates `names` at once, each from its own `dormantctl`; all must be acknowledged.
fn create_concurrently(set: &Replicas, names: &[String]) {
    std::thread::scope(|s| {
        let runs: Vec<_> = names
            .iter()
            .map(|name| s.spawn(move || (name, set.ctl(&create_args(name)))))
            .collect();
        for run in runs {
            let (name, out) = run.join().expect("a create thread");
            assert!(out.success, "create {name}: {}", out.stderr);
        }
    });
}

/// Every replica that is up has applied all of `acked` and the same tenants as replica `first`,
/// and still has what the old version wrote (`before`, `nodes`) unchanged.
fn check_everywhere(
    set: &Replicas,
    what: &str,
    before: &BTreeMap<String, Value>,
    nodes: &BTreeMap<String, Value>,
    acked: &BTreeSet<String>,
) {
    set.wait_converged();
    let up: Vec<usize> = (0..set.replicas.len()).filter(|i| set.is_up(*i)).collect();
    let reference = tenants_at(set, up[0]);
    for &i in &up {
        let tenants = tenants_at(set, i);
        assert_eq!(tenants, reference, "{what}: replica {i} differs");
        for (name, kept) in before {
            assert_eq!(
                tenants.get(name),
                Some(kept),
                "{what}: {name} at replica {i}"
            );
        }
        let names: BTreeSet<String> = tenants.keys().cloned().collect();
        let missing: Vec<_> = acked.difference(&names).collect();
        assert!(missing.is_empty(), "{what}: replica {i} lacks {missing:?}");
        assert_eq!(&nodes_at(set, i), nodes, "{what}: nodes at replica {i}");
    }
}

/// Kills replica `i` (-9) and starts it again on its data directory with `binary`.
fn replace(set: &mut Replicas, i: usize, binary: &Path) {
    set.kill(i);
    set.replicas[i].binary = binary.to_path_buf();
    set.restart(i);
}

#[test]
fn t141_a_json_era_cluster_is_upgraded_one_replica_at_a_time_and_loses_nothing() {
    let test = "t141_a_json_era_cluster_is_upgraded_one_replica_at_a_time_and_loses_nothing";
    let Some(old) = old_build::build(test, OLD_SCHEDULER_COMMIT, "dormant-scheduler") else {
        return;
    };
    let new = bin_dir().join("dormant-scheduler");
    let mut set = Replicas::start_with_binary(3, &["--snapshot-every", "20"], &old);
    let node = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("n1", 64_000, 256 * 1024, 4096),
    );
    let mut acked = BTreeSet::new();
    for n in 0..30 {
        let name = format!("old-{n}");
        let out = set.ctl(&create_args(&name));
        assert!(out.success, "{}", out.stderr);
        acked.insert(name);
    }
    set.wait_converged();
    let before = tenants_at(&set, 0);
    let nodes = nodes_at(&set, 0);
    assert_eq!(before.len(), 30);
    assert!(
        before.values().all(|t| t["node"] == "n1"),
        "the old version placed every tenant on n1: {before:?}"
    );
    assert_eq!(nodes.len(), 1);
    let mut round = 0;
    let mut write_and_check = |set: &Replicas, acked: &mut BTreeSet<String>, what: &str| {
        round += 1;
        let names: Vec<String> = (0..12).map(|k| format!("r{round}-{k}")).collect();
        create_concurrently(set, &names);
        acked.extend(names);
        check_everywhere(set, what, &before, &nodes, acked);
    };

    // 1. A follower upgraded: an old leader replicates to a new follower.
    let leader = set.leader();
    let first = (leader + 1) % 3;
    replace(&mut set, first, &new);
    write_and_check(&set, &mut acked, "old leader, one new follower");

    // 2. The old leader upgraded too: one of the new replicas leads (the old one, if it wins the
    //    election, is killed and started again, still old, until a new one leads). The old
    //    follower is sent JSON and no batches.
    replace(&mut set, leader, &new);
    let last = 3 - first - leader;
    wait_until(Duration::from_secs(60), "a new replica to lead", || {
        let now = set.leader();
        if now == last {
            replace(&mut set, last, &old);
            return None;
        }
        Some(())
    });
    write_and_check(&set, &mut acked, "new leader, one old follower");
    // The old follower down while the cluster writes past its log (snapshots every 20 entries,
    // 4 kept): back, it needs the new leader's snapshot, re-encoded in JSON for it.
    set.kill(last);
    for n in 0..40 {
        let name = format!("while-old-down-{n}");
        let out = set.ctl(&create_args(&name));
        assert!(out.success, "{}", out.stderr);
        acked.insert(name);
    }
    set.restart(last);
    write_and_check(
        &set,
        &mut acked,
        "an old follower caught up from a snapshot",
    );
    assert!(
        set.log(last)
            .contains("installed a snapshot from the leader"),
        "the old follower caught up from a snapshot:\n{}",
        set.log(last)
    );
    let leading = set.leader();
    assert!(
        set.log(leading)
            .contains("the peer did not read the current format"),
        "the new leader noticed the old follower:\n{}",
        set.log(leading)
    );

    // 3. The last one upgraded: all new, writes batched again.
    replace(&mut set, last, &new);
    write_and_check(&set, &mut acked, "all new");

    // The node kept heartbeating through it all and is ready.
    let out = set.ctl(&["node", "list", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.json()[0]["status"], "ready", "{}", out.stdout);
    drop(node);
}

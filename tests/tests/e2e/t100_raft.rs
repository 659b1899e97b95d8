//! The scheduler as a Raft cluster of separate processes on loopback: leader failover without
//! losing acknowledged writes, a lagging replica catching up through a snapshot, a minority that
//! cannot commit, and membership changes from the CLI. Needs no root (no agents).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormant_tests::cluster::{self, bin_dir, run_ctl};
use dormant_tests::{wait_until, Replicas};

/// A pending postgres tenant (no nodes here): a create is one Raft entry.
fn create_args(name: &str) -> Vec<&str> {
    let mut args = cluster::create_args(name, "postgres", ["0.1", "64MiB", "1GiB"]);
    args.push("--no-wait");
    args
}

#[test]
fn t100_killing_the_leader_loses_no_acknowledged_create() {
    let mut set = Replicas::start(3, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let creator = {
        let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
        let (bins, urls, security) = (bin_dir(), set.urls(), set.security.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("c{n}");
                let out = run_ctl(&bins, &security, &urls, &create_args(&name));
                if out.success {
                    acked.lock().unwrap().push(name);
                } else {
                    refused
                        .lock()
                        .unwrap()
                        .push(format!("{name}: {}", out.stderr.trim()));
                }
            }
        })
    };
    let count = || acked.lock().unwrap().len();
    for round in 1..=3 {
        let before = count();
        wait_until(Duration::from_secs(30), "creates to go through", || {
            (count() >= before + 5).then_some(())
        });
        let old = set.leader();
        let old_id = set.replicas[old].id;
        set.kill(old);
        let new = set.leader();
        assert_ne!(set.replicas[new].id, old_id, "round {round}");
        let after_kill = count();
        wait_until(
            Duration::from_secs(30),
            &format!(
                "round {round}: the new leader {} to serve writes",
                set.replicas[new].id
            ),
            || (count() >= after_kill + 3).then_some(()),
        );
        // Back on its own data dir, so the next round still has a quorum after its kill.
        set.restart(old);
    }
    stop.store(true, Ordering::Relaxed);
    creator.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    eprintln!(
        "{} creates acknowledged, {} refused: {refused:?}",
        acked.len(),
        refused.len()
    );
    set.wait_converged();
    for i in 0..set.replicas.len() {
        let names = set.tenant_names(i);
        let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "replica {} lost acknowledged creates: {missing:?}",
            set.replicas[i].id
        );
    }
}

/// t100 with 16 creators at once, so the leader batches them into shared entries: three
/// leaders killed (-9) mid-batch lose no acknowledged create, and every replica gives every
/// tenant the same uid, no uid twice.
#[test]
fn t107_killing_the_leader_mid_batch_loses_no_acknowledged_create_and_uids_stay_unique() {
    let mut set = Replicas::start(3, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let creators: Vec<_> = (0..16)
        .map(|c| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let (bins, urls, security) = (bin_dir(), set.urls(), set.security.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let name = format!("w{c}-{n}");
                    if run_ctl(&bins, &security, &urls, &create_args(&name)).success {
                        acked.lock().unwrap().push(name);
                    }
                }
            })
        })
        .collect();
    let count = || acked.lock().unwrap().len();
    for round in 1..=3 {
        let before = count();
        wait_until(Duration::from_secs(30), "creates to go through", || {
            (count() >= before + 40).then_some(())
        });
        let old = set.leader();
        set.kill(old);
        let after_kill = count();
        wait_until(
            Duration::from_secs(30),
            &format!("round {round}: a new leader to serve writes"),
            || (count() >= after_kill + 20).then_some(()),
        );
        set.restart(old);
    }
    stop.store(true, Ordering::Relaxed);
    for creator in creators {
        creator.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    set.wait_converged();
    let uids_at = |i: usize| -> std::collections::BTreeMap<String, u64> {
        let out = set.ctl_at(i, &["tenant", "list", "--stale", "-o", "json"]);
        assert!(out.success, "{}", out.stderr);
        out.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["uid"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let first = uids_at(0);
    let missing: Vec<&String> = acked.iter().filter(|n| !first.contains_key(*n)).collect();
    assert!(missing.is_empty(), "lost acknowledged creates: {missing:?}");
    let distinct: std::collections::BTreeSet<u64> = first.values().copied().collect();
    assert_eq!(distinct.len(), first.len(), "a uid given twice");
    for i in 1..set.replicas.len() {
        assert_eq!(
            uids_at(i),
            first,
            "replica {} numbers tenants otherwise",
            set.replicas[i].id
        );
    }
    let entries = set.status(set.leader()).expect("status")["last_log_index"].clone();
    eprintln!(
        "{} creates acknowledged, {} tenants, {entries} log entries in all",
        acked.len(),
        first.len()
    );
}

#[test]
fn t101_a_replica_that_fell_behind_catches_up_through_a_snapshot() {
    // A snapshot every 20 entries keeps 4 past it: 60 creates compact the log well past the
    // paused replica's last entry.
    let mut set = Replicas::start(3, &["--snapshot-every", "20"]);
    set.wait_converged();
    let leader = set.leader();
    let behind = (leader + 1) % 3;
    let last_before = set.status(behind).unwrap()["last_log_index"]
        .as_u64()
        .unwrap();
    set.pause(behind);
    let names: Vec<String> = (1..=60).map(|n| format!("s{n}")).collect();
    for name in &names {
        let out = set.ctl_at(leader, &create_args(name));
        assert!(out.success, "create {name}: {}", out.stderr);
    }
    let leader_status = set.status(leader).unwrap();
    let purged = leader_status["purged_index"].as_u64().unwrap();
    assert!(
        purged > last_before,
        "the leader's log must be compacted past the paused replica's last entry \
         ({last_before}): {leader_status}"
    );
    set.resume(behind);
    wait_until(
        Duration::from_secs(60),
        "the paused replica to catch up",
        || {
            let have = set.tenant_names(behind);
            names.iter().all(|n| have.contains(n)).then_some(())
        },
    );
    assert!(
        set.log(behind)
            .contains("installed a snapshot from the leader"),
        "the replica caught up without a snapshot, yet the entries it lacked were purged"
    );
    set.wait_converged();
}

#[test]
fn t102_a_minority_cannot_commit_and_applies_nothing() {
    let mut set = Replicas::start(3, &[]);
    let leader = set.leader();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for f in &followers {
        set.pause(*f);
    }
    let out = set.ctl_at(leader, &create_args("minority"));
    assert!(
        !out.success,
        "a write without quorum succeeded: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains("no quorum") || out.stderr.contains("no leader"),
        "unclear error: {}",
        out.stderr
    );
    eprintln!("refused as expected: {}", out.stderr.trim());
    for f in &followers {
        set.resume(*f);
    }
    set.wait_converged();
    for i in 0..3 {
        assert!(
            !set.tenant_names(i).contains("minority"),
            "replica {} applied the refused write",
            set.replicas[i].id
        );
    }
    // The cluster is whole again.
    let out = set.ctl(&create_args("majority"));
    assert!(out.success, "{}", out.stderr);
}

fn members(set: &Replicas) -> Vec<(u64, String)> {
    let out = set.ctl(&["cluster", "status", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    let mut m: Vec<(u64, String)> = out.json()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    m.sort();
    m
}

fn expect_refusal(set: &Replicas, args: &[&str], message: &str) {
    let before = members(set);
    let out = set.ctl(args);
    assert!(!out.success, "{args:?} succeeded");
    assert!(
        out.stderr.contains(message),
        "{args:?}: expected {message:?}, got {}",
        out.stderr
    );
    assert_eq!(members(set), before, "{args:?} changed the membership");
}

#[test]
fn t103_membership_grows_1_3_5_and_shrinks_to_3_from_the_cli() {
    let mut set = Replicas::start(1, &[]);
    let mut created = Vec::new();
    let mut create = |set: &Replicas, prefix: &str| {
        for n in 1..=5 {
            let name = format!("{prefix}{n}");
            let out = set.ctl(&create_args(&name));
            assert!(out.success, "create {name}: {}", out.stderr);
            created.push(name);
        }
    };
    expect_refusal(&set, &["cluster", "remove", "1"], "id: 1 is the last voter");
    expect_refusal(&set, &["cluster", "remove", "9"], "id: 9 is not a member");
    expect_refusal(&set, &["cluster", "promote", "9"], "id: 9 is not a member");
    create(&set, "a");

    set.join(2);
    set.join(3);
    assert_eq!(members(&set).len(), 3);
    create(&set, "b");
    expect_refusal(
        &set,
        &["cluster", "add-learner", "2", &set.replicas[1].addr.clone()],
        "id: 2 is already a member",
    );
    let dead = format!("127.0.0.1:{}", dormant_tests::cluster::free_port());
    expect_refusal(
        &set,
        &["cluster", "add-learner", "4", &dead],
        "does not answer",
    );
    let wrong = set.replicas[2].addr.clone();
    expect_refusal(
        &set,
        &["cluster", "add-learner", "4", &wrong],
        "answers as replica 3, not 4",
    );

    // Two changes at once: the second is refused while the first waits on a replica that does
    // not answer (paused), and the first fails without changing anything.
    let four = set.spawn(4, false);
    let five = set.spawn(5, false);
    set.pause(four);
    let slow = {
        let (bins, urls, addr) = (bin_dir(), set.urls(), set.replicas[four].addr.clone());
        let security = set.security.clone();
        std::thread::spawn(move || {
            run_ctl(
                &bins,
                &security,
                &urls,
                &["cluster", "add-learner", "4", &addr],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    expect_refusal(
        &set,
        &[
            "cluster",
            "add-learner",
            "5",
            &set.replicas[five].addr.clone(),
        ],
        "another membership change is in progress",
    );
    let slow = slow.join().unwrap();
    assert!(
        !slow.success && slow.stderr.contains("does not answer"),
        "{}",
        slow.stderr
    );
    assert_eq!(members(&set).len(), 3);
    set.resume(four);

    for (id, i) in [(4, four), (5, five)] {
        let addr = set.replicas[i].addr.clone();
        let out = set.ctl(&["cluster", "add-learner", &id.to_string(), &addr]);
        assert!(out.success, "add-learner {id}: {}", out.stderr);
        assert!(members(&set).contains(&(id, "learner".to_string())));
        let out = set.ctl(&["cluster", "promote", &id.to_string()]);
        assert!(out.success, "promote {id}: {}", out.stderr);
    }
    let five_voters: Vec<(u64, String)> = (1..=5).map(|id| (id, "voter".to_string())).collect();
    assert_eq!(members(&set), five_voters);
    create(&set, "c");

    // Shrink to 3, removing the first replica (the leader so far) among others.
    for id in [1, 5] {
        let out = set.ctl(&["cluster", "remove", &id.to_string()]);
        assert!(out.success, "remove {id}: {}", out.stderr);
        let i = set.index_of(id);
        set.kill(i);
    }
    let three: Vec<(u64, String)> = [2, 3, 4]
        .iter()
        .map(|id| (*id, "voter".to_string()))
        .collect();
    assert_eq!(members(&set), three);
    expect_refusal(
        &set,
        &["cluster", "add-learner", "1", &set.replicas[0].addr.clone()],
        "id: 1 was a member before",
    );
    create(&set, "d");
    set.wait_converged();
    for id in [2, 3, 4] {
        let names = set.tenant_names(set.index_of(id));
        let missing: Vec<&String> = created.iter().filter(|n| !names.contains(*n)).collect();
        assert!(missing.is_empty(), "replica {id} lacks {missing:?}");
    }
}

#[test]
fn t104_any_replica_answers_and_stale_reads_stay_local() {
    let set = Replicas::start(3, &[]);
    let leader = set.leader();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (a, b) = (followers[0], followers[1]);
    // A write sent to one follower is forwarded; a default (linearizable) read at the other
    // follower sees it at once.
    let out = set.ctl_at(a, &create_args("via-follower"));
    assert!(out.success, "{}", out.stderr);
    let out = set.ctl_at(b, &["tenant", "get", "via-follower", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.json()["name"], "via-follower");
    // Cluster status at a follower is the leader's view (it knows the lag); --stale is its own.
    let forwarded = set.ctl_at(b, &["cluster", "status", "-o", "json"]).json();
    assert_eq!(forwarded["this_id"], set.replicas[leader].id);
    let own = set.status(b).unwrap();
    assert_eq!(own["this_id"], set.replicas[b].id);
    assert_eq!(own["leader_id"], set.replicas[leader].id);
    // A node talking only to a follower registers and stays ready: its heartbeats reach the
    // leader, which alone keeps liveness.
    let _node = dormant_tests::SimNode::start(
        &set.security,
        &set.url(a),
        dormant_tests::SimNodeSpec::new("via-follower-node", 1000, 1024, 10),
    );
    std::thread::sleep(Duration::from_secs(3));
    let nodes = set.ctl_at(leader, &["node", "list", "-o", "json"]).json();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "via-follower-node")
        .cloned()
        .unwrap();
    assert_eq!(node["status"], "ready");
    assert!(
        !node["used"].is_null(),
        "the leader has the node's heartbeat usage: {node}"
    );
    // A stale read at a paused leader's follower still answers (no leader needed).
    let mut set = set;
    set.pause(leader);
    let out = set.ctl_at(a, &["tenant", "list", "--stale", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("via-follower"));
    set.resume(leader);
}

#[test]
fn t105_a_leader_cut_off_from_its_majority_does_not_answer_heartbeats() {
    // An agent removes what its desired set lacks: a leader that cannot confirm its state is
    // current must refuse instead of answering from it.
    let mut set = Replicas::start(3, &[]);
    let leader = set.leader();
    let url = set.url(leader);
    let _node = dormant_tests::SimNode::start(
        &set.security,
        &url,
        dormant_tests::SimNodeSpec::new("n1", 1000, 1024, 10),
    );
    assert!(dormant_tests::sim_node::heartbeat_once(&set.security, &url, "n1").is_ok());
    for f in (0..3).filter(|i| *i != leader) {
        set.pause(f);
    }
    // Within its lease (under a second) it may still answer; then it must refuse.
    let refused = wait_until(
        Duration::from_secs(10),
        "the cut-off leader to refuse",
        || dormant_tests::sim_node::heartbeat_once(&set.security, &url, "n1").err(),
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("no quorum"),
        "{}",
        refused.message()
    );
    for f in (0..3).filter(|i| *i != leader) {
        set.resume(f);
    }
    wait_until(Duration::from_secs(30), "heartbeats answered again", || {
        let leader = set.leader();
        dormant_tests::sim_node::heartbeat_once(&set.security, &set.url(leader), "n1").ok()
    });
}

#[test]
fn t106_dormantctl_into_a_closed_pipe_exits_quietly() {
    // `dormantctl tenant list | head -1`: the reader is gone before the rest is written.
    let set = Replicas::start(1, &[]);
    for n in 0..3 {
        let name = format!("piped-{n}");
        assert!(set.ctl(&create_args(&name)).success);
    }
    for args in [
        vec!["tenant", "list"],
        vec!["cluster", "status"],
        vec!["tenant", "list", "-o", "json"],
    ] {
        let mut child = std::process::Command::new(bin_dir().join("dormantctl"))
            .arg("--scheduler")
            .arg(set.urls())
            .args(set.security.operator_args())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end at once: every write dormantctl makes meets a closed pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

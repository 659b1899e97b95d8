//! Raft at its worst moments: every replica killed at once under load, a data disk filled to the
//! brim, one replica of three gone while dormantctl works, a quorum lost for 30 s. Real
//! `dormant-scheduler` processes on loopback; the full-disk test needs root (a tmpfs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormant_tests::cluster::{self, bin_dir, run_ctl, TEST_ROOT};
use dormant_tests::{require_root, wait_until, Replicas, SimNode, SimNodeSpec};

/// A pending postgres tenant (no nodes here): a create is one Raft entry.
fn create_args(name: &str) -> Vec<&str> {
    let mut args = cluster::create_args(name, "postgres", ["0.1", "64MiB", "1GiB"]);
    args.push("--no-wait");
    args
}

/// Clients creating tenants through every replica until stopped; what was acknowledged.
struct Creators {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Creators {
    fn start(set: &Replicas, clients: usize, prefix: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, acked) = (stop.clone(), acked.clone());
                let (bins, urls, security) = (bin_dir(), set.urls(), set.security.clone());
                let prefix = format!("{prefix}{c}-");
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let name = format!("{prefix}{n}");
                        if run_ctl(&bins, &security, &urls, &create_args(&name)).success {
                            acked.lock().unwrap().insert(name);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            acked,
            threads,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the clients; the creates they had acknowledged.
    fn finish(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// The tenant names in a linearizable `tenant list` through any replica.
fn linearizable_names(set: &Replicas) -> Result<BTreeSet<String>, String> {
    let out = set.ctl(&["tenant", "list", "-o", "json"]);
    if !out.success {
        return Err(out.stderr);
    }
    Ok(out
        .json()
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect())
}

#[test]
fn t170_after_a_whole_cluster_crash_the_first_read_has_every_acknowledged_create() {
    let mut set = Replicas::start(3, &[]);
    let mut acked_total = 0;
    for round in 1..=10 {
        let creators = Creators::start(&set, 4, &format!("r{round}c"));
        wait_until(Duration::from_secs(30), "creates to go through", || {
            (creators.count() >= 10).then_some(())
        });
        // kill -9 every replica at once, creates in flight.
        for i in 0..3 {
            set.kill(i);
        }
        let acked = creators.finish();
        acked_total += acked.len();
        // Staggered: one replica back a little before the others (it may resume its term).
        let first = round % 3;
        set.restart(first);
        std::thread::sleep(Duration::from_millis(250));
        for i in (0..3).filter(|i| *i != first) {
            set.restart(i);
        }
        // The very first linearizable read (dormantctl retries while no leader can answer).
        let names = linearizable_names(&set)
            .unwrap_or_else(|e| panic!("round {round}: the first read failed: {e}"));
        let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: the first read after the crash lacks acknowledged creates {missing:?}"
        );
    }
    eprintln!("10 whole-cluster crashes, {acked_total} acknowledged creates, all read back");
}

/// A tmpfs of `size` at a directory of its own, unmounted (lazily) and removed on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        std::fs::create_dir_all(TEST_ROOT).unwrap();
        let path = tempfile::Builder::new()
            .prefix("disk-")
            .tempdir_in(TEST_ROOT)
            .unwrap()
            .keep();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", path.display());
        std::fs::create_dir(path.join("data")).unwrap();
        Self { path }
    }

    /// Fills the disk to the brim with `filler`; returns how many bytes that took.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
        // The last partial block's bytes too, one at a time.
        while let Ok(1) = f.write(&[0]) {
            written += 1;
        }
        written
    }

    fn free_space(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }

    fn data_dir(&self) -> PathBuf {
        self.path.join("data")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Every status code and message a `dormantctl` run printed, for the "never Internal" check.
fn never_internal(what: &str, out: &cluster::CtlOutput) {
    assert!(
        !out.stderr.contains("Internal") && !out.stderr.contains("raft stopped"),
        "{what}: {}",
        out.stderr
    );
}

#[test]
fn t171_a_full_data_disk_refuses_writes_naming_it_and_a_replica_that_hits_it_exits_and_rejoins() {
    if !require_root("t171") {
        return;
    }
    let disk = SmallDisk::mount("48m");
    let data: &Path = &disk.data_dir();
    // Snapshots every 50 entries: the follower of step 2 then soon needs room for a whole
    // state, as a busy cluster's would. Log entries alone are small in the current encoding:
    // the follower took more than 450 of them (a minute of creates) before it needed space.
    let mut set = Replicas::start_with_data_dir(
        3,
        &["--disk-reserve", "8MiB", "--snapshot-every", "50"],
        &[(1, data)],
    );
    let mut acked = BTreeSet::new();
    for n in 0..20 {
        let name = format!("before-{n}");
        let out = set.ctl(&create_args(&name));
        assert!(out.success, "{}", out.stderr);
        acked.insert(name);
    }

    // 1. Replica 1 leads (it bootstrapped; an election since moves the lead back) and its disk
    //    is full: writes are refused with a message that names the disk, reads still answer,
    //    the replica stays up.
    let mut leader = set.leader();
    for _ in 0..5 {
        if set.replicas[leader].id == 1 {
            break;
        }
        set.kill(leader);
        let other = set.leader();
        set.restart(leader);
        leader = other;
        set.wait_converged();
    }
    assert_eq!(set.replicas[leader].id, 1, "replica 1 never led again");
    // sled's own background flush (every 500 ms) of what the creates wrote, before the disk fills.
    std::thread::sleep(Duration::from_secs(1));
    let filled = disk.fill();
    eprintln!("filled the leader's disk with {filled} bytes");
    let out = set.ctl(&create_args("while-full"));
    assert!(!out.success, "a write on a full disk was accepted");
    let named = set.dir().join("s1");
    assert!(
        out.stderr.contains("data disk is nearly full")
            && out.stderr.contains(&*named.to_string_lossy()),
        "the refusal names the disk: {}",
        out.stderr
    );
    never_internal("write on a full disk", &out);
    let names = linearizable_names(&set).expect("reads answer while the disk is full");
    assert!(acked.iter().all(|n| names.contains(n)));
    assert!(
        set.exited(leader).is_none(),
        "the leader exited under the reserve"
    );

    // Space back: writes accepted again.
    disk.free_space();
    let out = set.ctl(&create_args("after-space"));
    assert!(out.success, "{}", out.stderr);
    acked.insert("after-space".into());

    // 2. Replica 1 a follower, its disk filled to the brim while the others take writes: it
    //    cannot store what the leader sends, so it exits non-zero (no zombie answering
    //    "raft stopped"), and dormantctl with it listed first goes on through the others.
    set.kill(leader);
    let new_leader = set.leader();
    assert_ne!(set.replicas[new_leader].id, 1);
    set.restart(leader);
    set.wait_converged();
    disk.fill();
    let first = set.url(leader);
    let others: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| set.url(i))
        .collect();
    let urls = format!("{first},{}", others.join(","));
    let security = set.security.clone();
    let ctl = |args: &[&str]| run_ctl(&bin_dir(), &security, &urls, args);
    let mut n = 0;
    // Large records (32 constraints of the longest key and value, about 4 KiB each; these
    // tenants stay pending, there are no nodes): the follower's store runs out of room within a
    // few hundred of them even where sled finds free space in its own files.
    let pads: Vec<String> = (0..32)
        .map(|i| format!("pad-{i:02}-{}={}", "k".repeat(56), "v".repeat(63)))
        .collect();
    let status = wait_until(
        Duration::from_secs(120),
        "the follower with a full disk to exit",
        || {
            n += 1;
            let name = format!("full-follower-{n}");
            let mut args = create_args(&name);
            for pad in &pads {
                args.extend(["--constraint", pad.as_str()]);
            }
            let out = ctl(&args);
            never_internal("write while a follower's disk is full", &out);
            assert!(
                out.success,
                "a write failed with one replica down: {}",
                out.stderr
            );
            acked.insert(name);
            set.exited(leader)
        },
    );
    assert!(!status.success(), "exited {status:?}");
    assert!(
        set.log(leader).contains("raft stopped on its own"),
        "the replica says why it stopped"
    );
    for args in [
        vec!["tenant", "get", "before-1"],
        vec!["tenant", "list"],
        vec!["cluster", "status"],
    ] {
        let out = ctl(&args);
        assert!(out.success, "{args:?} with replica 1 gone: {}", out.stderr);
    }

    // Space back, the replica restarted (systemd would): it rejoins with every write.
    disk.free_space();
    set.restart(leader);
    set.wait_converged();
    let names = set.tenant_names(leader);
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(missing.is_empty(), "replica 1 lacks {missing:?}");
    drop(set);
}

#[test]
fn t172_dormantctl_succeeds_through_the_others_while_any_one_replica_is_down() {
    let mut set = Replicas::start(3, &[]);
    for down in 0..3 {
        set.kill(down);
        // The stopped replica listed first.
        let urls = std::iter::once(down)
            .chain((0..3).filter(|i| *i != down))
            .map(|i| set.url(i))
            .collect::<Vec<_>>()
            .join(",");
        let ctl = |args: &[&str]| run_ctl(&bin_dir(), &set.security, &urls, args);
        let name = format!("with-{down}-down");
        for args in [
            create_args(&name),
            vec!["tenant", "get", &name],
            vec!["tenant", "list"],
            vec!["node", "list"],
            vec!["cluster", "status"],
            vec!["tenant", "delete", &name, "--no-wait"],
        ] {
            let out = ctl(&args);
            assert!(
                out.success,
                "{args:?} with replica {} down: {}",
                set.replicas[down].id, out.stderr
            );
        }
        set.restart(down);
    }
    // A follower stopped (SIGSTOP: it accepts connections and answers nothing) listed first.
    let leader = set.leader();
    let paused = (0..3).find(|i| *i != leader).unwrap();
    set.pause(paused);
    let urls = std::iter::once(paused)
        .chain((0..3).filter(|i| *i != paused))
        .map(|i| set.url(i))
        .collect::<Vec<_>>()
        .join(",");
    let ctl = |args: &[&str]| run_ctl(&bin_dir(), &set.security, &urls, args);
    for args in [
        create_args("with-one-paused"),
        vec!["tenant", "get", "with-one-paused"],
        vec!["cluster", "status"],
    ] {
        let out = ctl(&args);
        assert!(
            out.success,
            "{args:?} with a follower stopped: {}",
            out.stderr
        );
    }
    set.resume(paused);
}

/// A write sent through a follower while the leader is gone: the follower's refusals say
/// "not proposed" in a way dormantctl reads (not its words), so dormantctl sends the create again,
/// through the same follower, until a new leader takes it; the tenant exists once.
#[test]
fn t175_a_write_through_a_follower_is_resent_only_while_nothing_was_proposed() {
    let mut set = Replicas::start(3, &[]);
    let leader = set.leader();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    set.kill(leader);
    // Only the follower: every retry goes through it, forwarded to whoever leads.
    let out = set.ctl_at(follower, &create_args("through-a-follower"));
    assert!(out.success, "{}", out.stderr);
    set.restart(leader);
    set.wait_converged();
    assert!(set.tenant_names(follower).contains("through-a-follower"));
}

#[test]
fn t173_a_quorum_lost_for_30s_marks_no_node_down_that_kept_heartbeating() {
    let mut set = Replicas::start(3, &["--node-grace-period-ms", "3000"]);
    let leader = set.leader();
    let nodes: Vec<SimNode> = (1..=5)
        .map(|n| {
            let mut spec = SimNodeSpec::new(&format!("q-{n}"), 4000, 8192, 100);
            spec.heartbeat = Duration::from_millis(250);
            SimNode::start(&set.security, &set.urls(), spec)
        })
        .collect();
    set.wait_converged();
    // The leader alone for 30 s: it cannot answer heartbeats (no quorum), and must not judge the
    // nodes it cannot hear from.
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for f in &followers {
        set.kill(*f);
    }
    std::thread::sleep(Duration::from_secs(30));
    for f in &followers {
        set.restart(*f);
    }
    set.wait_converged();
    // Well past a grace period with the quorum back.
    std::thread::sleep(Duration::from_secs(6));
    let out = set.ctl(&["node", "list", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    let listed = out.json();
    let not_ready: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] != "ready")
        .map(|n| n["id"].to_string())
        .collect();
    assert!(not_ready.is_empty(), "nodes not ready: {not_ready:?}");
    for i in 0..3 {
        let log = set.log(i);
        assert!(
            !log.contains("marking it down"),
            "replica {} marked a heartbeating node down:\n{log}",
            set.replicas[i].id
        );
    }
    drop(nodes);
}

#[test]
fn t174_a_heartbeat_held_up_past_its_timeout_is_dropped_and_changes_nothing() {
    use dormant_tests::sim_node::{heartbeat_sent_at, register_once, unix_ms_now};
    let set = Replicas::start(1, &["--node-grace-period-ms", "1500"]);
    let url = set.url(0);
    let spec = SimNodeSpec::new("late", 1000, 1024, 10);
    register_once(&set.security, &url, &spec).expect("register");
    let transport = set.security.node_transport("late");
    let on_time = || heartbeat_sent_at(&transport, &url, "late", Vec::new(), unix_ms_now());
    for _ in 0..5 {
        on_time().expect("an on-time heartbeat is answered");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = || {
        let out = set.ctl(&["node", "list", "-o", "json"]);
        assert!(out.success, "{}", out.stderr);
        let nodes = out.json();
        let node = nodes.as_array().unwrap().iter().find(|n| n["id"] == "late");
        node.and_then(|n| n["status"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    wait_until(
        Duration::from_secs(30),
        "the silent node to go down",
        || (status() == "down").then_some(()),
    );
    let applied = set.status(0).unwrap()["applied_index"].clone();
    // Sent 10 s ago: its sender stopped waiting 7 s ago. Taking it would write `ready` from news
    // the agent itself has given up on.
    let late = heartbeat_sent_at(&transport, &url, "late", Vec::new(), unix_ms_now() - 10_000)
        .expect_err("a late heartbeat is dropped");
    assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");
    assert!(late.message().contains("dropped"), "{}", late.message());
    assert_eq!(status(), "down");
    assert_eq!(
        set.status(0).unwrap()["applied_index"],
        applied,
        "it wrote an entry"
    );
    // The next one on time brings the node back.
    on_time().expect("an on-time heartbeat is answered");
    assert_eq!(status(), "ready");
}

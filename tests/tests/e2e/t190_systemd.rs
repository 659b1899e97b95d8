//! systemd: both unit files pass `systemd-analyze verify` with nothing to say (a unit with a
//! mistake is shown to fail the same check), and both daemons speak the notify protocol the way
//! their `Type=notify` units with a watchdog expect: `READY=1` only once really ready (the agent
//! once the scheduler lists its node, never while the scheduler is away; the scheduler once its
//! gRPC answers), `WATCHDOG=1` pings at half of `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM, every
//! message from the daemon's own PID (`NotifyAccess=main`); an agent restarted with a tenant is
//! ready again with the tenant's engine untouched. The test stands in for systemd with a datagram
//! socket of its own (there is no systemd to run the units on this machine).

use std::path::{Path, PathBuf};
use std::time::Duration;

use dormant_tests::cluster::{self, ClusterOptions};
use dormant_tests::notify::{Notification, NotifySocket};
use dormant_tests::{require_root, Cluster};
use nix::sys::signal::Signal;

const UNITS: [&str; 2] = ["dormant-agent.service", "dormant-scheduler.service"];
/// The watchdog the tests ask for: pings every second.
const WATCHDOG: Duration = Duration::from_secs(2);
/// How long a wait for the next message may take before the test gives up (not a goal).
const PATIENCE: Duration = Duration::from_secs(60);

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// `systemd-analyze verify` on `unit`: whether it exited 0, and everything it printed.
fn verify(unit: &Path) -> (bool, String) {
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze (Debian's systemd package; scripts/install-deps test)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Whether `systemd-analyze` can run here; under `CI=true` its absence fails the test.
fn have_systemd_analyze(test: &str) -> bool {
    let found = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{test} needs systemd-analyze (Debian's systemd package) and CI=true forbids skipping"
        );
        eprintln!("SKIPPED {test}: no systemd-analyze");
    }
    found
}

#[test]
fn t190_units_verify_clean() {
    if !have_systemd_analyze("t190_units_verify_clean") {
        return;
    }
    // systemd-analyze checks that ExecStart's program exists: each unit is checked as a copy that
    // runs this build's binary instead of /usr/local/bin's.
    let bins = cluster::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let text = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
        assert!(
            text.contains("\nExecStart=/usr/local/bin/"),
            "{unit}: ExecStart is not under /usr/local/bin"
        );
        for line in ["Type=notify", "NotifyAccess=main", "WatchdogSec=30s"] {
            assert!(text.lines().any(|l| l == line), "{unit}: no line {line:?}");
        }
        let copy = dir.path().join(unit);
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/", &format!("{}/", bins.display())),
        )
        .unwrap();
        let (exited_0, said) = verify(&copy);
        assert!(
            exited_0 && said.trim().is_empty(),
            "systemd-analyze verify {unit}: exited 0: {exited_0}; said:\n{said}"
        );
    }
    // Restarting the agent must leave tenants alone: systemd signals only its main process and
    // lets it manage cgroups.
    let agent = std::fs::read_to_string(systemd_dir().join(UNITS[0])).unwrap();
    for line in ["KillMode=process", "Delegate=yes"] {
        assert!(
            agent.lines().any(|l| l == line),
            "{}: no line {line:?}",
            UNITS[0]
        );
    }

    // The check finds mistakes: a misspelt type and an unknown key are reported (systemd-analyze
    // still exits 0 for these, hence the check of what it said).
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(dir.path().join(UNITS[0]))
            .unwrap()
            .replace("Type=notify", "Type=notfy")
            .replace("NotifyAccess=main", "NotifyAcess=main"),
    )
    .unwrap();
    let (_, said) = verify(&broken);
    assert!(
        said.contains("notfy") && said.contains("NotifyAcess"),
        "systemd-analyze verify missed the mistakes in a broken unit; said:\n{said}"
    );
}

/// Asserts that every message came from `pid`.
fn all_from(seen: &[Notification], pid: i32, who: &str) {
    for n in seen {
        assert_eq!(n.pid, pid, "a message not from {who} (pid {pid}): {n:?}");
    }
}

/// Waits for `count` more watchdog pings from `pid`, asserting that none of the messages on the
/// way says `forbidden`.
fn pings(notify: &NotifySocket, pid: i32, count: usize, forbidden: &str) {
    let mut pinged = 0;
    let seen = notify.until(PATIENCE, &format!("{count} watchdog pings"), |n| {
        if n.has("WATCHDOG=1") {
            pinged += 1;
        }
        pinged == count
    });
    all_from(&seen, pid, "the daemon");
    for n in &seen {
        assert!(
            !n.text.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} now: {n:?}"
        );
    }
}

#[test]
fn t190_agent_is_ready_once_registered_pings_stops_and_restarts() {
    if !require_root("t190_agent_is_ready_once_registered_pings_stops_and_restarts") {
        return;
    }
    let notify = NotifySocket::bind();
    let mut cluster = Cluster::start("t190a");
    // The scheduler is away when the agent starts: the agent cannot register, so it must not
    // say it is ready, however long it runs.
    cluster.kill_scheduler();
    let bin = cluster.bin("dormant-agent");
    let i = cluster.add_agent_unstarted("n1", &bin, &[]);
    cluster.agents[i].env = notify.env(Some(WATCHDOG));
    cluster.spawn_agent(i);
    let pid = cluster.agents[i].proc.as_ref().unwrap().pid();

    // Waiting for the scheduler: pings, each extending the start timeout, and a status that says
    // what it waits for; no READY=1.
    let mut extended = 0;
    let seen = notify.until(
        PATIENCE,
        "three start-timeout extensions while the scheduler is away",
        |n| {
            if n.has("WATCHDOG=1") && n.value("EXTEND_TIMEOUT_USEC").is_some() {
                extended += 1;
            }
            extended == 3
        },
    );
    all_from(&seen, pid, "the agent");
    for n in &seen {
        assert!(
            !n.has("READY=1"),
            "READY=1 with no scheduler to register with: {n:?}"
        );
    }
    let statuses: Vec<&str> = seen.iter().filter_map(|n| n.value("STATUS")).collect();
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("registering with the scheduler (")),
        "no status saying the agent waits for the scheduler: {statuses:?}"
    );
    assert!(
        cluster.agents[i].proc.as_mut().unwrap().is_running(),
        "the agent exited while the scheduler was away:\n{}",
        cluster.agent_log(i)
    );

    // The scheduler comes: READY=1 follows the registration, so the node is listed by the time
    // it arrives.
    cluster.spawn_scheduler();
    let seen = notify.until(PATIENCE, "READY=1", |n| n.has("READY=1"));
    let nodes = cluster.ctl_json(&["node", "list"]);
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "n1" && n["status"] == "ready"),
        "READY=1 came, but the scheduler does not list node n1 as ready: {nodes}"
    );
    all_from(&seen, pid, "the agent");
    let ready = seen.last().unwrap();
    assert!(
        ready
            .value("STATUS")
            .is_some_and(|s| s.starts_with("node n1 reporting to ")),
        "{ready:?}"
    );

    // Ready: watchdog pings go on, without extending a start that is over.
    pings(&notify, pid, 3, "EXTEND_TIMEOUT_USEC=");

    // A tenant, then what `systemctl restart dormant-agent` does: SIGTERM, STOPPING=1, a clean
    // exit, a new agent. The new one is ready once it has registered again with the tenant it
    // found on disk, whose engine it kept.
    let out = cluster.create("cache", "redis", ["0.25", "128MiB", "256MiB"], &[]);
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    let password = t["credentials"]["password"].as_str().unwrap().to_string();
    let engine = cluster.engine_pid(i, "cache");
    cluster.agents[i]
        .proc
        .as_ref()
        .unwrap()
        .signal(Signal::SIGTERM);
    let seen = notify.until(PATIENCE, "STOPPING=1", |n| n.has("STOPPING=1"));
    all_from(&seen, pid, "the agent");
    let status = cluster.wait_agent_exit(i, PATIENCE);
    assert!(
        status.success(),
        "the agent exited {status} after SIGTERM:\n{}",
        cluster.agent_log(i)
    );

    cluster.spawn_agent(i);
    let pid = cluster.agents[i].proc.as_ref().unwrap().pid();
    let seen = notify.until(PATIENCE, "READY=1 from the restarted agent", |n| {
        n.has("READY=1")
    });
    all_from(&seen, pid, "the restarted agent");
    assert!(
        seen.last()
            .and_then(|n| n.value("STATUS"))
            .is_some_and(|s| s.ends_with("; 1 tenants")),
        "{seen:?}"
    );
    assert_eq!(
        dormant_tests::redis_cli(&endpoint, &password, &["PING"]).as_deref(),
        Ok("PONG")
    );
    assert_eq!(
        cluster.engine_pid(i, "cache"),
        engine,
        "the restart touched the tenant's engine"
    );
    assert!(dormant_tests::process::pid_alive(engine));
}

#[test]
fn t190_scheduler_is_ready_once_its_grpc_answers() {
    if !require_root("t190_scheduler_is_ready_once_its_grpc_answers") {
        return;
    }
    // Both ways the replica serves: mutual TLS, and plaintext (`--insecure`, bound differently).
    for insecure in [false, true] {
        let notify = NotifySocket::bind();
        let mut cluster = Cluster::start_with(
            "t190s",
            ClusterOptions {
                insecure,
                ..ClusterOptions::default()
            },
        );
        cluster.kill_scheduler();
        cluster.scheduler_env = notify.env(Some(WATCHDOG));
        cluster.spawn_scheduler();
        let pid = cluster.scheduler.as_ref().unwrap().pid();

        let seen = notify.until(PATIENCE, "READY=1", |n| n.has("READY=1"));
        // Ready means answering: a call made now is served.
        let status = cluster.ctl(&["cluster", "status", "--stale", "-o", "json"]);
        assert!(
            status.success,
            "READY=1 came (insecure: {insecure}), but the replica does not answer: {}",
            status.stderr
        );
        all_from(&seen, pid, "the scheduler");

        // Pings, and a status (sent when it changes) that says how its Raft is.
        let (mut pinged, mut leads) = (0, false);
        let seen = notify.until(PATIENCE, "3 pings and a status naming the leader", |n| {
            pinged += usize::from(n.has("WATCHDOG=1"));
            leads |= n
                .value("STATUS")
                .is_some_and(|s| s.contains(": Leader, term ") && s.ends_with(", leader 1"));
            pinged >= 3 && leads
        });
        all_from(&seen, pid, "the scheduler");
        assert!(!seen.iter().any(|n| n.has("READY=1")), "READY=1 again");

        // SIGTERM: STOPPING=1, then a clean exit.
        cluster.scheduler.as_ref().unwrap().signal(Signal::SIGTERM);
        let seen = notify.until(PATIENCE, "STOPPING=1", |n| n.has("STOPPING=1"));
        all_from(&seen, pid, "the scheduler");
        let exited = dormant_tests::wait_until(PATIENCE, "the scheduler to exit", || {
            cluster.scheduler.as_mut().unwrap().try_wait()
        });
        assert!(
            exited.success(),
            "the scheduler exited {exited} after SIGTERM"
        );
    }
}

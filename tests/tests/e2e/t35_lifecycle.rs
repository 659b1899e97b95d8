//! The tenant's lifecycle on the agent, tried the ways that used to break it (issue 13): an
//! engine killed with SIGKILL, a delete of an engine that is not ready yet after an agent restart,
//! a resize whose storage grow fails, an agent restart that must not look like an engine restart,
//! and a state directory tenants cannot pass through.

use std::time::Duration;

use dormant_tests::{psql, redis_cli, require_root, wait_until, CgroupVersion, Cluster};

/// Clients that connect while a SIGKILLed PostgreSQL restarts wait and then get answers; none is
/// let through before the new engine really answers (no "the database system is starting up").
#[test]
fn clients_during_an_engine_restart_wait_and_succeed() {
    if !require_root("clients_during_an_engine_restart_wait_and_succeed") {
        return;
    }
    let mut cluster = Cluster::start("t35k");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("phoenix", "0.5", "256MiB", "256MiB");
    let uri = t["credentials"]["uri"].as_str().unwrap().to_string();
    psql(&uri, "CREATE TABLE t(v int); INSERT INTO t VALUES (7)").unwrap();
    let pid = cluster.engine_pid(0, "phoenix");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Clients arriving over the next second and a half: during the crash, the backoff, the
    // crash recovery of the new postmaster.
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(250 * i));
                psql(&uri, "SELECT v FROM t")
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(
            c.join().unwrap(),
            Ok("7".to_string()),
            "client {i} during the restart"
        );
    }
    assert_ne!(cluster.engine_pid(0, "phoenix"), pid, "a new engine runs");
    assert_eq!(cluster.tenant("phoenix")["state"], "running");
}

const SLOW_ENGINE: &str = r#"
[engines.slowpoke]
# Ignores SIGTERM (as PID 1 without handlers, like a PostgreSQL that has not installed them yet)
# and takes seconds before it listens.
start = ["/bin/sh", "-c", "trap '' TERM; sleep 8; exec /usr/bin/redis-server --port 0 --unixsocket {run}/slow.sock --unixsocketperm 700 --dir {data}"]
socket = "{run}/slow.sock"
stop_signal = "SIGTERM"
stop_timeout_ms = 600000
"#;

/// The engine died while the agent was down; the restarted agent starts it again; a delete
/// arriving before it is ready kills it instead of waiting out its 10-minute stop timeout.
#[test]
fn deleting_an_engine_that_is_not_ready_does_not_wait_out_its_stop_timeout() {
    if !require_root("deleting_an_engine_that_is_not_ready_does_not_wait_out_its_stop_timeout") {
        return;
    }
    let mut cluster = Cluster::start("t35d");
    let config = cluster.dir().join("agent.toml");
    std::fs::write(&config, SLOW_ENGINE).unwrap();
    cluster.add_agent_with("n1", &["--config", config.to_str().unwrap()]);
    cluster.create_running("slow", "slowpoke", ["0.25", "128MiB", "128MiB"]);

    cluster.kill_agent(0);
    // The engine dies while its agent is down.
    let cgroup = cluster.tenant_cgroup_handle("n1", "slow");
    cgroup.kill_all().unwrap();
    cluster.start_agent(0);
    // The restarted agent found no engine to adopt and started one; it is not ready yet.
    wait_until(
        Duration::from_secs(30),
        "the engine to be started again",
        || {
            cluster
                .agent_log(0)
                .rsplit("resuming tenant found on disk")
                .next()?
                .contains("engine started")
                .then_some(())
        },
    );
    let out = cluster.ctl(&["tenant", "delete", "slow", "--no-wait"]);
    assert!(out.success, "{}", out.stderr);
    // Far inside the stop timeout (600 s): this wait only stops a hung test.
    wait_until(Duration::from_secs(60), "the tenant to be gone", || {
        cluster
            .ctl_json(&["tenant", "list"])
            .as_array()?
            .is_empty()
            .then_some(())
    });
    assert!(cgroup.pids().unwrap_or_default().is_empty());
}

/// CPU and memory take effect at once even when the storage grow fails; `tenant get` shows the
/// grow pending with its reason, and the engine keeps running.
#[test]
fn a_failing_storage_grow_does_not_hold_back_cpu_and_memory() {
    if !require_root("a_failing_storage_grow_does_not_hold_back_cpu_and_memory") {
        return;
    }
    let mut cluster = Cluster::start("t35r");
    cluster.add_agent("n1");
    // The online grow fails on any host (it fails for real without CAP_SYS_RESOURCE).
    cluster.agents[0].env = vec![("FAILPOINTS".into(), "volume.resize2fs=return".into())];
    cluster.kill_agent(0);
    cluster.start_agent(0);
    let t = cluster.create_running("stretch", "redis", ["0.25", "128MiB", "128MiB"]);
    let pid = cluster.engine_pid(0, "stretch");
    let out = cluster.ctl(&[
        "tenant",
        "update",
        "stretch",
        "--cpu",
        "1.5",
        "--memory",
        "256MiB",
        "--storage",
        "256MiB",
    ]);
    assert!(out.success, "{}", out.stderr);

    let (cpu_file, cpu_value, mem_file) = match CgroupVersion::of_host() {
        CgroupVersion::V1 => (
            cluster
                .tenant_cgroup("n1", "stretch", "cpu")
                .join("cpu.cfs_quota_us"),
            "150000",
            cluster
                .tenant_cgroup("n1", "stretch", "memory")
                .join("memory.limit_in_bytes"),
        ),
        CgroupVersion::V2 => (
            cluster.tenant_cgroup("n1", "stretch", "").join("cpu.max"),
            "150000 100000",
            cluster
                .tenant_cgroup("n1", "stretch", "")
                .join("memory.max"),
        ),
    };
    wait_until(
        Duration::from_secs(20),
        "the new CPU and memory limits",
        || {
            let cpu = std::fs::read_to_string(&cpu_file).ok()?;
            let mem = std::fs::read_to_string(&mem_file).ok()?;
            (cpu.trim() == cpu_value && mem.trim() == (256u64 << 20).to_string()).then_some(())
        },
    );
    let pending = wait_until(
        Duration::from_secs(20),
        "the pending grow in tenant get",
        || {
            let v = cluster.tenant("stretch");
            let p = v["resize_pending"].as_str()?.to_string();
            (!p.is_empty()).then_some(p)
        },
    );
    assert!(pending.contains("storage 256MiB"), "{pending}");
    assert!(pending.contains("volume.resize2fs"), "{pending}");
    let text = cluster.ctl(&["tenant", "get", "stretch"]);
    assert!(text.stdout.contains("storage 256MiB"), "{}", text.stdout);
    assert_eq!(cluster.engine_pid(0, "stretch"), pid);
    let password = t["credentials"]["password"].as_str().unwrap();
    let endpoint = t["endpoint"].as_str().unwrap();
    assert_eq!(redis_cli(endpoint, password, &["PING"]), Ok("PONG".into()));
}

/// An agent kill -9 and restart adopts the engines and writes no Raft entry: adopted tenants are
/// never reported `starting`.
#[test]
fn an_agent_restart_is_not_reported_as_an_engine_restart() {
    if !require_root("an_agent_restart_is_not_reported_as_an_engine_restart") {
        return;
    }
    let mut cluster = Cluster::start("t35a");
    cluster.add_agent("n1");
    cluster.create_running("steady", "redis", ["0.25", "128MiB", "128MiB"]);
    cluster.create_running("calm", "redis", ["0.25", "128MiB", "128MiB"]);
    let applied = |c: &Cluster| c.ctl_json(&["cluster", "status"])["applied_index"].clone();
    let before = applied(&cluster);
    for _ in 0..3 {
        cluster.kill_agent(0);
        cluster.start_agent(0);
        wait_until(Duration::from_secs(30), "both engines adopted", || {
            let log = cluster.agent_log(0);
            let last = log.rsplit("swept the host at start").next()?;
            (last.matches("adopted running engine").count() == 2).then_some(())
        });
        // A few heartbeats after the adoption.
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert_eq!(
        applied(&cluster),
        before,
        "an agent restart wrote Raft entries"
    );
    assert_eq!(cluster.tenant("steady")["state"], "running");
    assert_eq!(cluster.tenant("steady")["usage"]["restarts"], 0);
}

/// Secrets at rest: whatever the umask it was started with (0 here), the agent's state
/// directory and the scheduler's data directory are root's alone (0700), their files 0600; a
/// tenant still starts and answers (its root is built from them as root).
#[test]
fn state_directories_are_root_only_whatever_the_umask() {
    if !require_root("state_directories_are_root_only_whatever_the_umask") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // nextest runs each test in a process of its own: the umask is this test's.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let mut cluster = Cluster::start("t35p");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("sealed", "0.25", "256MiB", "256MiB");
    let uri = t["credentials"]["uri"].as_str().unwrap().to_string();
    assert_eq!(psql(&uri, "SELECT 1").unwrap(), "1");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let state = cluster.agents[0].state_dir.clone();
    for dir in [
        state.clone(),
        state.join("tenants"),
        state.join("run"),
        state.join("tenants/sealed"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in ["tenant.json", "engine.log", "uid"] {
        let path = state.join("tenants/sealed").join(file);
        assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
    }
    let mut stack = vec![cluster.dir().join("scheduler")];
    let mut files = 0;
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            assert_eq!(mode(&path), 0o700, "{}", path.display());
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            files += 1;
            assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
        }
    }
    assert!(files > 0, "the scheduler wrote no files");
}

/// `tenant restart` is the way out of `failed`: a PostgreSQL whose configuration an operator broke
/// fails its restarts until it is `failed`; once the file is fixed, `tenant restart` brings it
/// back with its data. On a running tenant it restarts the engine once, data kept.
#[test]
fn tenant_restart_brings_a_failed_tenant_back_with_its_data() {
    if !require_root("tenant_restart_brings_a_failed_tenant_back_with_its_data") {
        return;
    }
    let mut cluster = Cluster::start("t35f");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("lazarus", "0.5", "256MiB", "256MiB");
    let uri = t["credentials"]["uri"].as_str().unwrap().to_string();
    psql(
        &uri,
        "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('still here')",
    )
    .unwrap();

    // A running tenant restarts once: a new engine, the same data.
    let first = cluster.engine_pid(0, "lazarus");
    let out = cluster.ctl(&["tenant", "restart", "lazarus"]);
    assert!(out.success, "{}", out.stderr);
    let second = wait_until(Duration::from_secs(60), "a new engine", || {
        let pid = cluster.engine_pid_now(0, "lazarus")?;
        (pid != first && cluster.tenant("lazarus")["state"] == "running").then_some(pid)
    });
    assert!(!dormant_tests::process::pid_alive(first));
    wait_until(
        Duration::from_secs(30),
        "the restarted engine to answer",
        || {
            psql(&uri, "SELECT v FROM kept")
                .ok()
                .filter(|v| v == "still here")
        },
    );

    // The configuration is broken, then the engine dies: every restart fails until `failed`.
    let conf = cluster.agents[0]
        .state_dir
        .join("tenants/lazarus/data/pgdata/postgresql.auto.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}this line is not a setting\n")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed = cluster.wait_tenant_state("lazarus", "failed", Duration::from_secs(120));
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("5 failures in a row"), "{reason}");
    // A client of a failed tenant is closed at once, not held for an engine that is not coming
    // (psql would give up waiting after 20 s with "timeout expired").
    let sep = if uri.contains('?') { '&' } else { '?' };
    let refused = psql(&format!("{uri}{sep}connect_timeout=20"), "SELECT 1").unwrap_err();
    assert!(!refused.contains("timeout"), "{refused}");

    // Fixed, and restarted by the operator: back, with its data.
    std::fs::write(&conf, good).unwrap();
    let out = cluster.ctl(&["tenant", "restart", "lazarus", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    cluster.wait_tenant_state("lazarus", "running", Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "the data back", || {
        psql(&uri, "SELECT v FROM kept")
            .ok()
            .filter(|v| v == "still here")
    });
    assert_eq!(cluster.tenant("lazarus")["restart_generation"], 2);
}

/// One agent per state directory: a second one (an operator's manual run beside the unit) would
/// take the first one's tenants for leftovers; it refuses at start, naming the one that holds it.
#[test]
fn a_second_agent_on_the_same_state_dir_is_refused() {
    if !require_root("a_second_agent_on_the_same_state_dir_is_refused") {
        return;
    }
    let mut cluster = Cluster::start("t35l");
    cluster.add_agent("n1");
    let t = cluster.create_running("solo", "redis", ["0.25", "128MiB", "128MiB"]);
    let pid = cluster.engine_pid(0, "solo");
    let holder = cluster.agents[0].proc.as_ref().unwrap().pid();
    let (status, log) = cluster.agent_refusing_to_start("n1", &[]);
    assert!(!status.success());
    assert!(log.contains("another agent"), "{log}");
    assert!(log.contains(&format!("pid {holder}")), "{log}");
    // The first agent's tenant was not touched.
    assert_eq!(cluster.engine_pid(0, "solo"), pid);
    let password = t["credentials"]["password"].as_str().unwrap();
    let endpoint = t["endpoint"].as_str().unwrap();
    assert_eq!(redis_cli(endpoint, password, &["PING"]), Ok("PONG".into()));
}

//! The crash matrix (issue 13, acceptance 1): for every named step of create, resize and delete,
//! the agent is killed exactly there (a crash point armed through `FAILPOINTS`, which SIGKILLs
//! the agent as `kill -9` would) and started again. Each operation completes; nothing is left
//! behind (process, cgroup, loop device, mount, port, directory with the tenant's uid); the
//! engine is not restarted where it did not need to be; and an interrupted init never runs beside
//! a second one. The step names are the agent's own list (`dormant_agent::crash::STEPS`), so a new
//! step without a case here fails `every_crash_point_has_a_case`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dormant_tests::{psql, redis_cli, require_root, wait_until, CgroupVersion, Cluster};

const CREATE_STEPS: &[&str] = &[
    "create.after_record",
    "create.after_cgroup",
    "create.after_image",
    "create.after_attach",
    "create.after_mount",
    "create.during_init",
    "create.after_init",
    "start.after_spawn",
];
const RESTART_STEPS: &[&str] = &["restart.after_intent", "restart.after_stop"];
const HIBERNATE_STEPS: &[&str] = &["hibernate.after_intent", "hibernate.after_stop"];
const RESIZE_STEPS: &[&str] = &[
    "resize.after_record",
    "resize.after_limits",
    "resize.after_image_grow",
];
const DELETE_STEPS: &[&str] = &[
    "delete.after_intent",
    "delete.after_stop",
    "delete.after_cgroup",
    "delete.after_unmount",
    "delete.after_detach",
    "delete.after_trash",
];

#[test]
fn every_crash_point_has_a_case() {
    let covered: Vec<&str> = [
        CREATE_STEPS,
        RESTART_STEPS,
        HIBERNATE_STEPS,
        RESIZE_STEPS,
        DELETE_STEPS,
    ]
    .concat();
    assert_eq!(
        covered,
        dormant_agent::crash::STEPS,
        "the crash matrix must cover exactly the agent's crash points"
    );
}

/// Arms `step` on agent 0 and restarts it so the next operation dies there.
fn arm(cluster: &mut Cluster, step: &str) {
    cluster.kill_agent(0);
    cluster.agents[0].env = vec![("FAILPOINTS".into(), format!("{step}=return"))];
    cluster.start_agent(0);
}

/// Waits for the armed agent to die at `step`, then starts it again unarmed.
fn crash_and_restart(cluster: &mut Cluster, step: &str) {
    let status = cluster.wait_agent_exit(0, Duration::from_secs(120));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "the agent should have died by SIGKILL at {step}: {status}\n{}",
        cluster.agent_log(0)
    );
    assert!(
        cluster.agent_log(0).contains(&format!(
            "crash point reached: killing the agent with SIGKILL step=\"{step}\""
        )) || cluster.agent_log(0).contains(&format!("step={step}")),
        "not killed at {step}:\n{}",
        cluster.agent_log(0)
    );
    cluster.agents[0].env.clear();
    cluster.start_agent(0);
}

/// Loop devices whose backing file is under `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    dormant_tests::cleanup::loop_devices()
        .into_iter()
        .filter(|d| Path::new(d.back_path()).starts_with(dir))
        .map(|d| format!("{} -> {}", d.name, d.back_file))
        .collect()
}

/// Mount points under `dir` but `dir/tenants` itself (the agent's own shared bind mount).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    dormant_tests::cleanup::mounts()
        .into_iter()
        .map(|m| PathBuf::from(m.mount_point))
        .filter(|m| m.starts_with(dir) && *m != dir.join("tenants"))
        .collect()
}

/// Everything of any tenant left on agent 0's host, for a host that should have none.
fn leftovers(cluster: &Cluster) -> Vec<String> {
    let state = cluster.agents[0].state_dir.clone();
    let mut left: Vec<String> = loop_devices_under(&state);
    left.extend(
        mounts_under(&state)
            .iter()
            .map(|m| format!("mount {}", m.display())),
    );
    for sub in ["tenants", "tenants/.trash", "run"] {
        for e in std::fs::read_dir(state.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name() != ".trash" {
                left.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    let parents: Vec<PathBuf> = match CgroupVersion::of_host() {
        CgroupVersion::V1 => dormant_tests::process::V1_CONTROLLERS
            .iter()
            .map(|c| {
                Path::new(dormant_tests::cluster::CGROUP_ROOT)
                    .join(c)
                    .join(&cluster.cgroup_parent)
                    .join("n1")
            })
            .collect(),
        CgroupVersion::V2 => vec![Path::new(dormant_tests::cluster::CGROUP_ROOT)
            .join(&cluster.cgroup_parent)
            .join("n1")],
    };
    for parent in parents {
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                left.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    left
}

fn port_closed(endpoint: &str) -> bool {
    std::net::TcpStream::connect(endpoint).is_err()
}

/// A PostgreSQL tenant (init matters for the create steps) created with the agent killed at
/// `step`: after the restart it runs, answers, holds exactly one volume, and a delete then leaves
/// nothing.
fn create_crash(test: &str, step: &str) {
    if !require_root(test) {
        return;
    }
    let mut cluster = Cluster::start(test);
    cluster.add_agent("n1");
    arm(&mut cluster, step);
    // A tenth of a core makes initdb take seconds: still running when the agent comes back.
    let cpu = if step == "create.during_init" {
        "0.1"
    } else {
        "0.5"
    };
    let out = cluster.create(
        "crashy",
        "postgres",
        [cpu, "256MiB", "256MiB"],
        &["--no-wait"],
    );
    assert!(out.success, "{}", out.stderr);
    crash_and_restart(&mut cluster, step);
    let t = cluster.wait_tenant_state("crashy", "running", Duration::from_secs(120));
    let credentials = cluster.ctl_json(&["tenant", "credentials", "crashy"]);
    let uri = credentials["uri"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(30), "the tenant to answer", || {
        psql(&uri, "SELECT 'up'").ok().filter(|o| o == "up")
    });
    let state = cluster.agents[0].state_dir.clone();
    assert_eq!(
        loop_devices_under(&state).len(),
        1,
        "one volume, one loop device: {:?}",
        loop_devices_under(&state)
    );
    // Its volume and its socket directory, each mounted once.
    let mounts = mounts_under(&state);
    let uid = t["uid"].as_u64().unwrap();
    assert_eq!(
        mounts,
        [
            state.join("tenants/crashy/data"),
            state.join("run").join(uid.to_string())
        ],
        "{mounts:?}"
    );
    let log = cluster.agent_log(0);
    if step == "create.during_init" {
        // The init the crash interrupted was killed before the second one began.
        assert!(
            log.contains("killed what an interrupted init left in the cgroup"),
            "{log}"
        );
    }
    assert_eq!(
        log.matches("data initialised").count(),
        1,
        "exactly one init completed:\n{log}"
    );
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    let out = cluster.ctl(&["tenant", "delete", "crashy"]);
    assert!(out.success, "{}", out.stderr);
    wait_until(Duration::from_secs(30), "nothing left on the host", || {
        leftovers(&cluster).is_empty().then_some(())
    });
    assert!(port_closed(&endpoint), "port {endpoint} still open");
}

/// A running redis tenant restarted with the agent killed at `step`: after the agent's restart
/// the engine has been restarted exactly once (a new process, which then stays), the generation
/// is recorded, and the data is kept.
fn restart_crash(test: &str, step: &str) {
    if !require_root(test) {
        return;
    }
    let mut cluster = Cluster::start(test);
    cluster.add_agent("n1");
    let t = cluster.create_running("again", "redis", ["0.25", "128MiB", "128MiB"]);
    let password = t["credentials"]["password"].as_str().unwrap().to_string();
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    assert_eq!(
        redis_cli(&endpoint, &password, &["SET", "k", "kept"]),
        Ok("OK".into())
    );
    assert_eq!(redis_cli(&endpoint, &password, &["SAVE"]), Ok("OK".into()));
    let pid = cluster.engine_pid(0, "again");
    arm(&mut cluster, step);
    let out = cluster.ctl(&["tenant", "restart", "again"]);
    assert!(out.success, "{}", out.stderr);
    crash_and_restart(&mut cluster, step);
    let new_pid = wait_until(Duration::from_secs(60), "a new engine running", || {
        let now =
            std::fs::read_to_string(cluster.agents[0].state_dir.join("tenants/again/engine.pid"))
                .ok()?
                .trim()
                .parse::<i32>()
                .ok()?;
        (now != pid && cluster.tenant("again")["state"] == "running").then_some(now)
    });
    wait_until(Duration::from_secs(30), "redis to answer", || {
        redis_cli(&endpoint, &password, &["GET", "k"])
            .ok()
            .filter(|v| v == "kept")
    });
    // Settled: the restart is not done a second time.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.engine_pid(0, "again"), new_pid, "restarted twice");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            cluster.agents[0]
                .state_dir
                .join("tenants/again/tenant.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["restart_generation"], 1, "{record}");
    assert!(record.get("restarting_from").is_none(), "{record}");
}

/// A redis tenant hibernating after 2 s idle, with the agent killed at `step` (`freeze` mode for
/// the step after the freeze, so the next agent finds a frozen engine; `stop` for the intent):
/// after the restart the tenant is (or becomes again) hibernated, a client wakes it and reads
/// what was saved, and the record says it is awake.
fn hibernate_crash(test: &str, step: &str) {
    if !require_root(test) {
        return;
    }
    let mode = if step == "hibernate.after_stop" {
        "freeze"
    } else {
        "stop"
    };
    let mut cluster = Cluster::start(test);
    cluster.add_agent("n1");
    let out = cluster.create(
        "dozy",
        "redis",
        ["0.25", "128MiB", "128MiB"],
        &["--idle-after", "2s", "--hibernate", mode],
    );
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    let password = t["credentials"]["password"].as_str().unwrap().to_string();
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    assert_eq!(
        redis_cli(&endpoint, &password, &["SET", "k", "kept"]),
        Ok("OK".into())
    );
    assert_eq!(redis_cli(&endpoint, &password, &["SAVE"]), Ok("OK".into()));
    arm(&mut cluster, step);
    crash_and_restart(&mut cluster, step);
    cluster.wait_tenant_state("dozy", "hibernated", Duration::from_secs(60));
    assert_eq!(
        redis_cli(&endpoint, &password, &["GET", "k"]),
        Ok("kept".into())
    );
    cluster.wait_tenant_state("dozy", "running", Duration::from_secs(30));
    // Written once the engine answers again. It may hibernate again 2 s later: then the record
    // says so a moment before the scheduler hears of it, so a record that says hibernated must
    // be matched by the scheduler within a few heartbeats.
    let path = cluster.agents[0].state_dir.join("tenants/dozy/tenant.json");
    wait_until(
        Duration::from_secs(10),
        "the record to agree with the tenant's state",
        || {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            (record.get("hibernated").is_none() || cluster.tenant("dozy")["state"] == "hibernated")
                .then_some(())
        },
    );
}

/// A running redis tenant resized with the agent killed at `step`: after the restart the new
/// CPU limit is in force, the record says the new size, and the engine never restarted.
fn resize_crash(test: &str, step: &str) {
    if !require_root(test) {
        return;
    }
    let mut cluster = Cluster::start(test);
    cluster.add_agent("n1");
    let t = cluster.create_running("grow", "redis", ["0.25", "128MiB", "128MiB"]);
    let pid = cluster.engine_pid(0, "grow");
    arm(&mut cluster, step);
    let out = cluster.ctl(&[
        "tenant",
        "update",
        "grow",
        "--cpu",
        "0.5",
        "--storage",
        "256MiB",
    ]);
    assert!(out.success, "{}", out.stderr);
    crash_and_restart(&mut cluster, step);
    let quota_file = match CgroupVersion::of_host() {
        CgroupVersion::V1 => cluster
            .tenant_cgroup("n1", "grow", "cpu")
            .join("cpu.cfs_quota_us"),
        CgroupVersion::V2 => cluster.tenant_cgroup("n1", "grow", "cpu").join("cpu.max"),
    };
    wait_until(Duration::from_secs(30), "the new CPU limit", || {
        let q = std::fs::read_to_string(&quota_file).ok()?;
        (q.trim() == "50000" || q.trim().starts_with("50000 ")).then_some(())
    });
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cluster.agents[0].state_dir.join("tenants/grow/tenant.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["resources"]["storage"], 256 << 20, "{record}");
    assert_eq!(
        cluster.engine_pid(0, "grow"),
        pid,
        "the engine was restarted"
    );
    assert!(dormant_tests::process::pid_alive(pid));
    let password = t["credentials"]["password"].as_str().unwrap();
    let endpoint = t["endpoint"].as_str().unwrap();
    wait_until(Duration::from_secs(30), "redis to answer", || {
        (redis_cli(endpoint, password, &["PING"]).ok()? == "PONG").then_some(())
    });
    assert_eq!(cluster.tenant("grow")["usage"]["restarts"], 0);
}

/// A running redis tenant deleted with the agent killed at `step`: after the restart the delete
/// completes and nothing of the tenant is left.
fn delete_crash(test: &str, step: &str) {
    if !require_root(test) {
        return;
    }
    let mut cluster = Cluster::start(test);
    cluster.add_agent("n1");
    let t = cluster.create_running("doomed", "redis", ["0.25", "128MiB", "128MiB"]);
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    let pid = cluster.engine_pid(0, "doomed");
    arm(&mut cluster, step);
    let out = cluster.ctl(&["tenant", "delete", "doomed", "--no-wait"]);
    assert!(out.success, "{}", out.stderr);
    crash_and_restart(&mut cluster, step);
    wait_until(Duration::from_secs(60), "the tenant to be gone", || {
        let list = cluster.ctl_json(&["tenant", "list"]);
        list.as_array()?.is_empty().then_some(())
    });
    wait_until(Duration::from_secs(30), "nothing left on the host", || {
        leftovers(&cluster).is_empty().then_some(())
    });
    assert!(
        !dormant_tests::process::pid_alive(pid),
        "engine {pid} still runs"
    );
    assert!(port_closed(&endpoint), "port {endpoint} still open");
    // The restarted agent resumed the delete, it did not start the engine again.
    let log = cluster.agent_log(0);
    let after_restart = log
        .rsplit("resuming tenant found on disk")
        .next()
        .unwrap_or("");
    assert!(!after_restart.contains("engine started"), "{log}");
}

macro_rules! cases {
    ($run:ident: $($name:ident => $step:literal,)*) => {
        $(
            #[test]
            fn $name() {
                $run(stringify!($name), $step);
            }
        )*
    };
}

cases! { create_crash:
    create_after_record => "create.after_record",
    create_after_cgroup => "create.after_cgroup",
    create_after_image => "create.after_image",
    create_after_attach => "create.after_attach",
    create_after_mount => "create.after_mount",
    create_during_init => "create.during_init",
    create_after_init => "create.after_init",
    start_after_spawn => "start.after_spawn",
}

cases! { restart_crash:
    restart_after_intent => "restart.after_intent",
    restart_after_stop => "restart.after_stop",
}

cases! { hibernate_crash:
    hibernate_after_intent => "hibernate.after_intent",
    hibernate_after_stop => "hibernate.after_stop",
}

cases! { resize_crash:
    resize_after_record => "resize.after_record",
    resize_after_limits => "resize.after_limits",
    resize_after_image_grow => "resize.after_image_grow",
}

cases! { delete_crash:
    delete_after_intent => "delete.after_intent",
    delete_after_stop => "delete.after_stop",
    delete_after_cgroup => "delete.after_cgroup",
    delete_after_unmount => "delete.after_unmount",
    delete_after_detach => "delete.after_detach",
    delete_after_trash => "delete.after_trash",
}

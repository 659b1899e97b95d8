//! Issue 15, the engine's output on the host's disk: a tenant that floods its stdout and stderr
//! (a `RAISE LOG` loop, `head -c 1G /dev/zero >&2` from `COPY ... PROGRAM`) leaves its log files
//! within `engine_log_max` and keeps answering; its output pipe outlives a kill -9 of the agent
//! (the listener keeper holds it), so what the engine writes while no agent runs, and after,
//! still reaches `engine.log`. Real PostgreSQL, real cgroups, as root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dormant_tests::{psql, require_root, wait_until, Cluster};

/// The cap the test's agent runs with (the default is 8 MiB), and its rate.
const MAX: u64 = 1 << 20;
const CONFIG: &str = "engine_log_max = \"1MiB\"\nengine_log_rate = \"256KiB\"\n";

fn log_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("engine.log"), dir.join("engine.log.1"))
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// The agent's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn within_cap(dir: &Path, when: &str) -> u64 {
    let (log, prev) = log_files(dir);
    let (a, b) = (size(&log), size(&prev));
    eprintln!("{when}: engine.log {a} B, engine.log.1 {b} B");
    assert!(
        a <= MAX / 2 && b <= MAX / 2,
        "{when}: {a} + {b} over the cap"
    );
    a + b
}

#[test]
fn a_log_flood_stays_within_the_cap_and_the_pipe_outlives_the_agent() {
    if !require_root("a_log_flood_stays_within_the_cap_and_the_pipe_outlives_the_agent") {
        return;
    }
    let mut cluster = Cluster::start("t41");
    let config = cluster.dir().join("agent-log.toml");
    std::fs::write(&config, CONFIG).unwrap();
    cluster.add_agent_with("n1", &["--config", config.to_str().unwrap()]);
    let created = cluster.create_tenant("flood", "0.5", "256MiB", "512MiB");
    let uri = created["credentials"]["uri"].as_str().unwrap().to_string();
    let dir = cluster.agents[0].state_dir.join("tenants/flood");
    let (log, prev) = log_files(&dir);
    // The engine's start-up output came through the pipe.
    wait_until(
        Duration::from_secs(10),
        "PostgreSQL's start-up lines",
        || {
            text(&log)
                .contains("ready to accept connections")
                .then_some(())
        },
    );
    let agent_pid = cluster.agents[0].proc.as_ref().unwrap().pid();
    let engine_pid = cluster.engine_pid(0, "flood");

    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let agent_cpu = |cpu0: u64, t0: Instant| {
        (cpu_ticks(agent_pid) - cpu0) as f64 / ticks_per_sec / t0.elapsed().as_secs_f64() * 100.0
    };
    let (cpu0, t0) = (cpu_ticks(agent_pid), Instant::now());
    psql(&uri, "SELECT pg_sleep(4)").unwrap();
    eprintln!(
        "quiet: the agent used {:.1}% of a core",
        agent_cpu(cpu0, t0)
    );

    // 1. A RAISE LOG loop for a few seconds (PostgreSQL writes each line to stderr itself).
    let (cpu0, t0) = (cpu_ticks(agent_pid), Instant::now());
    let out = psql(
        &uri,
        "SET statement_timeout = '4s'; \
         DO $$ BEGIN LOOP RAISE LOG 'flood %', repeat('x', 200); END LOOP; END $$",
    );
    assert!(
        out.as_ref().is_err_and(|e| e.contains("statement timeout")),
        "{out:?}"
    );
    eprintln!(
        "RAISE LOG flood: the agent used {:.1}% of a core",
        agent_cpu(cpu0, t0)
    );
    within_cap(&dir, "after the RAISE LOG flood");
    assert!(
        text(&log).contains("flood xxx") || text(&prev).contains("flood xxx"),
        "some of the flood is logged"
    );

    // 2. A GiB of zeros on stderr, from a program the engine starts.
    let (cpu0, t0) = (cpu_ticks(agent_pid), Instant::now());
    let out = psql(
        &uri,
        "COPY (SELECT 1) TO PROGRAM 'head -c 1G /dev/zero >&2'",
    );
    let took = t0.elapsed();
    eprintln!(
        "1 GiB on stderr: {out:?} in {took:?}; the agent used {:.1}% of a core",
        agent_cpu(cpu0, t0)
    );
    assert!(out.is_ok(), "{out:?}");
    within_cap(&dir, "after 1 GiB of zeros");

    // The tenant still answers, with the same engine.
    assert_eq!(psql(&uri, "SELECT 40 + 2"), Ok("42".to_string()));
    assert_eq!(cluster.tenant("flood")["state"], "running");
    assert_eq!(cluster.engine_pid(0, "flood"), engine_pid);
    // The drop was logged by the agent, with its count once it ended, and noted in the log.
    let marker = "DO $$ BEGIN RAISE LOG 'after the flood'; END $$";
    psql(&uri, marker).unwrap();
    wait_until(Duration::from_secs(10), "the line after the flood", || {
        text(&log).contains("after the flood").then_some(())
    });
    // The count comes once the engine has been quiet for a second.
    let agent_log = wait_until(Duration::from_secs(10), "the drop count", || {
        let text = cluster.agent_log(0);
        text.contains("dropped_bytes=").then_some(text)
    });
    let episodes = agent_log.matches("dropping its output").count();
    eprintln!(
        "drop episodes logged: {episodes}; {}",
        agent_log
            .lines()
            .filter(|l| l.contains("dropped_bytes="))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(episodes >= 1, "the agent logged no drop");
    // The agent logs the count before its writer puts the note in the file: wait for it.
    wait_until(Duration::from_secs(10), "the drop note in the log", || {
        (text(&log).contains("[dormant-agent]") || text(&prev).contains("[dormant-agent]"))
            .then_some(())
    });

    // 3. kill -9 of the agent: the engine runs on, and its output waits in the pipe the keeper
    // holds. A statement that logs only after the agent is gone (its client is cut with the
    // agent, the backend goes on until it writes back).
    let late = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            psql(
                &uri,
                "DO $$ BEGIN PERFORM pg_sleep(1.5); RAISE LOG 'written while no agent ran'; END $$",
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_agent(0);
    let _ = late.join();
    // The keeper holds both ends of the tenant's pipe.
    {
        let sock = cluster.agents[0].state_dir.join("keeper/keeper.sock");
        let mut keeper = dormant_agent::keeper::KeeperClient::connect(&sock).unwrap();
        let kept = keeper.get("log/", false).unwrap();
        assert_eq!(
            kept.len(),
            1,
            "{:?}",
            kept.iter().map(|k| &k.0).collect::<Vec<_>>()
        );
        assert_eq!(kept[0].0, "log/flood");
        assert_eq!(kept[0].1.len(), 2);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !text(&log).contains("written while no agent ran"),
        "no agent ran to write it"
    );
    cluster.start_agent(0);
    cluster.wait_tenant_state("flood", "running", Duration::from_secs(30));
    assert_eq!(
        cluster.engine_pid(0, "flood"),
        engine_pid,
        "the engine was adopted"
    );
    wait_until(
        Duration::from_secs(10),
        "the line written while no agent ran",
        || {
            text(&log)
                .contains("written while no agent ran")
                .then_some(())
        },
    );
    psql(&uri, "DO $$ BEGIN RAISE LOG 'after the restart'; END $$").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the line after the restart",
        || text(&log).contains("after the restart").then_some(()),
    );
    assert!(cluster
        .agent_log(0)
        .contains("took back the engine's output pipe"));
    within_cap(&dir, "at the end");

    // 4. Deleted: nothing of it is left, the keeper's copy of the pipe included (checked with
    // the agent down: the keeper serves one agent at a time).
    let out = cluster.ctl(&["tenant", "delete", "flood"]);
    assert!(out.success, "delete: {}", out.stderr);
    wait_until(
        Duration::from_secs(30),
        "the tenant's directory to go",
        || (!dir.exists()).then_some(()),
    );
    cluster.kill_agent(0);
    let sock = cluster.agents[0].state_dir.join("keeper/keeper.sock");
    let mut keeper = dormant_agent::keeper::KeeperClient::connect(&sock).unwrap();
    assert!(keeper.get("log/", false).unwrap().is_empty());
}

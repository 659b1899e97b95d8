//! Engines beyond PostgreSQL: the built-in Redis end to end, and custom engines defined in the
//! agent's config alone (one that works, one that exits at once and must end `failed` after
//! backoff with its exit reason).

use std::time::Duration;

use dormant_tests::{redis_cli, redis_cli_uri, require_root, wait_until, Cluster};

#[test]
fn a_redis_tenant_works_end_to_end() {
    if !require_root("a_redis_tenant_works_end_to_end") {
        return;
    }
    let mut cluster = Cluster::start("t80r");
    cluster.add_agent("n1");
    let nodes = cluster.ctl_json(&["node", "list"]);
    assert!(nodes[0]["engines"].to_string().contains("redis"), "{nodes}");
    let out = cluster.create("cache", "redis", ["0.25", "128MiB", "256MiB"], &[]);
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    assert_eq!(t["state"], "running", "{t}");
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    let password = t["credentials"]["password"].as_str().unwrap().to_string();
    assert!(t["credentials"]["uri"]
        .as_str()
        .unwrap()
        .starts_with("redis://default:"));

    assert_eq!(
        redis_cli(&endpoint, &password, &["SET", "greeting", "hello"]),
        Ok("OK".into())
    );
    assert_eq!(
        redis_cli(&endpoint, &password, &["GET", "greeting"]),
        Ok("hello".into())
    );
    // Every connection authenticates.
    let refused = redis_cli(&endpoint, "wrong", &["GET", "greeting"]).expect_err("wrong password");
    assert!(
        refused.contains("WRONGPASS") || refused.contains("NOAUTH"),
        "{refused}"
    );

    // The engine runs in the tenant's cgroup, as the tenant's user; its config holds the password
    // and is readable by that user alone.
    let pid = cluster.engine_pid(0, "cache");
    let procs = std::fs::read_to_string(
        cluster
            .tenant_cgroup("n1", "cache", "pids")
            .join("cgroup.procs"),
    )
    .unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !cmdline.contains(&password),
        "the password is on the command line"
    );
    let conf = cluster.agents[0]
        .state_dir
        .join("tenants/cache/data/redis.conf");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Delete removes it all.
    let dir = cluster.tenant_cgroup("n1", "cache", "pids");
    assert!(cluster.ctl(&["tenant", "delete", "cache"]).success);
    wait_until(Duration::from_secs(20), "the redis cgroup to go", || {
        (!dir.exists()).then_some(())
    });
    assert!(!cluster.agents[0].state_dir.join("tenants/cache").exists());
    assert!(redis_cli(&endpoint, &password, &["PING"]).is_err());
}

const AGENT_CONFIG: &str = r#"
# Custom engines, from the agent's config alone.
[engines.crashy]
start = ["/bin/sh", "-c", "echo 'crashy: cannot open the database' >&2; exit 3"]
socket = "{run}/crashy.sock"

[engines.kv]
start = ["/usr/bin/redis-server", "{data}/kv.conf"]
files = { "{data}/kv.conf" = "port 0\nunixsocket {run}/kv.sock\nunixsocketperm 700\ndir {data}\nrequirepass {password}\n" }
socket = "{run}/kv.sock"
stop_signal = "SIGTERM"
stop_timeout_ms = 5000
# What the credentials say: Redis' own user and scheme, reported to the scheduler.
user = "default"
uri_scheme = "redis"
"#;

#[test]
fn custom_engines_come_from_config_and_a_crashing_one_ends_failed_with_its_reason() {
    if !require_root(
        "custom_engines_come_from_config_and_a_crashing_one_ends_failed_with_its_reason",
    ) {
        return;
    }
    let mut cluster = Cluster::start("t80c");
    let config = cluster.dir().join("agent.toml");
    std::fs::write(&config, AGENT_CONFIG).unwrap();
    cluster.add_agent_with("n1", &["--config", config.to_str().unwrap()]);
    let node = cluster.ctl_json(&["node", "list"])[0].clone();
    let engines = node["engines"].to_string();
    assert!(
        engines.contains("crashy") && engines.contains("kv"),
        "{engines}"
    );
    // What the agent reported for each engine, as operators see it.
    let access = |engine: &str| {
        node["engine_access"]
            .as_array()
            .and_then(|all| all.iter().find(|a| a["engine"] == engine).cloned())
            .unwrap_or_default()
    };
    assert_eq!(access("kv")["user"], "default", "{node}");
    assert_eq!(access("crashy")["user"], "admin", "{node}");
    if engines.contains("postgres") {
        assert_eq!(access("postgres")["uri_path"], "/postgres", "{node}");
    }

    // The working custom engine.
    let out = cluster.create("mine", "kv", ["0.25", "128MiB", "256MiB"], &[]);
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    let endpoint = t["endpoint"].as_str().unwrap();
    let password = t["credentials"]["password"].as_str().unwrap();
    assert_eq!(redis_cli(endpoint, password, &["PING"]), Ok("PONG".into()));
    // The credentials are the agent's config's, not a guess from the engine's name.
    assert_eq!(t["credentials"]["user"], "default", "{t}");
    let uri = t["credentials"]["uri"].as_str().unwrap_or_default();
    assert_eq!(uri, format!("redis://default:{password}@{endpoint}"), "{t}");
    // And a client given only the URI gets in as that user.
    assert_eq!(redis_cli_uri(uri, &["PING"]), Ok("PONG".into()));

    // The crashing one: create does not wait for it.
    let out = cluster.create(
        "broken",
        "crashy",
        ["0.25", "64MiB", "256MiB"],
        &["--no-wait"],
    );
    assert!(out.success, "{}", out.stderr);
    // On the way it is seen restarting with the reason.
    let mut seen_restarting = false;
    let t = wait_until(Duration::from_secs(60), "broken to be failed", || {
        let t = cluster.tenant("broken");
        if t["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("restarting after")
        {
            seen_restarting = true;
        }
        (t["state"] == "failed").then_some(t)
    });
    let reason = t["reason"].as_str().unwrap();
    assert!(reason.contains("exited with code 3"), "{reason}");
    // Unset in its config: `admin`, and the engine's name as the scheme.
    let out = cluster.ctl(&["tenant", "credentials", "broken"]);
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.starts_with("crashy://admin:"), "{}", out.stdout);
    assert!(
        reason.contains("crashy: cannot open the database"),
        "{reason}"
    );
    assert!(reason.contains("5 failures in a row"), "{reason}");
    assert_eq!(t["usage"]["restarts"], 4, "{t}");
    assert!(seen_restarting, "never seen restarting: {t}");
    // A failed tenant leaves no process behind, and the neighbour is untouched.
    let procs = std::fs::read_to_string(
        cluster
            .tenant_cgroup("n1", "broken", "pids")
            .join("cgroup.procs"),
    )
    .unwrap_or_default();
    assert_eq!(procs.trim(), "");
    assert_eq!(redis_cli(endpoint, password, &["PING"]), Ok("PONG".into()));
}

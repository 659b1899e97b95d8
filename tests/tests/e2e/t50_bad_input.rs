//! Acceptance 5: each bad input gets a clear error naming the field and the rule, and leaves
//! the cluster's state unchanged.

use dormant_tests::{require_root, Cluster};

#[test]
fn bad_input_is_refused_with_the_field_named_and_changes_nothing() {
    if !require_root("bad_input_is_refused_with_the_field_named_and_changes_nothing") {
        return;
    }
    let mut cluster = Cluster::start("t50");
    cluster.add_agent("n1");
    cluster.create_tenant("taken", "0.25", "256MiB", "256MiB");
    let before = cluster.ctl_json(&["tenant", "list"]);
    let nodes_before = cluster.ctl_json(&["node", "list"]);

    let create = |name: &str, engine: &str, cpu: &str, mem: &str, sto: &str| {
        cluster.create(name, engine, [cpu, mem, sto], &["--no-wait"])
    };
    let cases = [
        (
            create("../x", "postgres", "1", "1GiB", "256MiB"),
            "name: \"../x\" may contain only lowercase letters",
        ),
        (
            create("A B", "postgres", "1", "1GiB", "256MiB"),
            "name: \"A B\" may contain only lowercase letters",
        ),
        (
            create(&"a".repeat(64), "postgres", "1", "1GiB", "256MiB"),
            "name: 64 characters, at most 63 allowed",
        ),
        (
            create("ok", "postgres", "0", "1GiB", "256MiB"),
            "cpu: must be greater than zero",
        ),
        (
            create("ok", "postgres", "-1", "1GiB", "256MiB"),
            "cpu: \"-1\" is not a number of cores",
        ),
        (
            create("ok", "postgres", "1", "lots", "256MiB"),
            "memory: \"lots\" is not a size",
        ),
        (
            create("ok", "postgres", "1", "1GiB", "0GiB"),
            "storage: must be greater than zero",
        ),
        (
            create("ok", "mysql", "1", "1GiB", "256MiB"),
            "engine: unknown engine \"mysql\"",
        ),
        (
            create("taken", "postgres", "1", "1GiB", "256MiB"),
            "name: tenant \"taken\" already exists",
        ),
        (
            create("ok", "postgres", "1", "100TiB", "256MiB"),
            "memory: 100TiB asked, more than any node's capacity",
        ),
        (
            create("ok", "postgres", "512", "1GiB", "256MiB"),
            "cpu: 512 asked, more than any node's capacity",
        ),
    ];
    for (out, expected) in &cases {
        assert!(
            !out.success,
            "accepted, expected {expected:?}: {}",
            out.stdout
        );
        assert!(
            out.stderr.contains(expected),
            "expected {expected:?} in: {}",
            out.stderr
        );
    }
    for args in [["tenant", "get", "nope"], ["tenant", "delete", "nope"]] {
        let out = cluster.ctl(&args);
        assert!(!out.success);
        assert!(
            out.stderr.contains("tenant \"nope\" not found"),
            "{}",
            out.stderr
        );
    }
    let out = cluster.ctl(&["tenant", "get", "Bad_Name"]);
    assert!(out.stderr.contains("name: \"Bad_Name\""), "{}", out.stderr);

    assert_eq!(
        cluster
            .ctl_json(&["tenant", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].clone(), t["state"].clone()))
            .collect::<Vec<_>>(),
        before
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].clone(), t["state"].clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        cluster.ctl_json(&["node", "list"])[0]["allocated"],
        nodes_before[0]["allocated"]
    );
}

/// A daemon given a bad config file stops with one line (the program, the file, the line and
/// column, what is wrong), never a backtrace, whatever RUST_BACKTRACE says. Needs no root.
#[test]
fn t51_a_bad_config_file_stops_either_daemon_with_one_line_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "# a comment\nlisten_adress = \"127.0.0.1:1\"\n").unwrap();
    for daemon in ["dormant-scheduler", "dormant-agent"] {
        let out = std::process::Command::new(dormant_tests::cluster::bin_dir().join(daemon))
            .arg("--config")
            .arg(&config)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{daemon} started with a bad config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{daemon}: {stderr}");
        let expected = format!(
            "{daemon}: config {}: line 2, column 1: unknown field `listen_adress`",
            config.display()
        );
        assert!(stderr.starts_with(&expected), "{daemon}: {stderr}");
    }
}

/// Sizes below an engine's minimum are refused at once, naming the field and the minimum, and
/// change nothing; a tenant at exactly the minimum starts and answers (the minimums are real).
#[test]
fn t52_sizes_below_the_engines_minimum_are_refused_and_the_minimum_itself_runs() {
    if !require_root("t52_sizes_below_the_engines_minimum_are_refused") {
        return;
    }
    let mut cluster = Cluster::start("t52");
    cluster.add_agent("n1");
    for (sizes, expected) in [
        (
            ["0.25", "64MiB", "1"],
            "storage: 1B asked, less than the 64MiB a postgres tenant needs at least",
        ),
        (
            ["0.25", "1", "64MiB"],
            "memory: 1B asked, less than the 64MiB a postgres tenant needs at least",
        ),
    ] {
        let out = cluster.create("tiny", "postgres", sizes, &["--no-wait"]);
        assert!(!out.success, "{sizes:?} accepted");
        assert!(out.stderr.contains(expected), "{sizes:?}: {}", out.stderr);
    }
    assert_eq!(cluster.ctl_json(&["tenant", "list"]), serde_json::json!([]));
    let pg = cluster.create_running("pg-min", "postgres", ["0.25", "64MiB", "64MiB"]);
    let uri = pg["credentials"]["uri"].as_str().unwrap();
    assert_eq!(dormant_tests::psql(uri, "SELECT 6 * 7").unwrap(), "42");
    let redis = cluster.create_running("redis-min", "redis", ["0.1", "16MiB", "16MiB"]);
    let endpoint = redis["endpoint"].as_str().unwrap();
    let password = redis["credentials"]["password"].as_str().unwrap();
    assert_eq!(
        dormant_tests::redis_cli(endpoint, password, &["PING"]).unwrap(),
        "PONG"
    );
    // An update below the minimum is refused the same way.
    let out = cluster.ctl(&["tenant", "update", "redis-min", "--memory", "1MiB"]);
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("memory: 1MiB asked, less than the 16MiB a redis tenant needs at least"),
        "{}",
        out.stderr
    );
}

//! Prometheus metrics: a real Prometheus server (Debian's `prometheus`), started by the test,
//! scrapes a scheduler's `/metrics`, and its queries return the cluster's own figures;
//! `promtool check metrics` finds nothing wrong with the endpoints. An agent exports its tenants'
//! figures while they exist (that test needs root: a real agent and engine).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use dormant_tests::cluster::{self, free_port};
use dormant_tests::process::ProcGuard;
use dormant_tests::{
    require_root, wait_until, Cluster, ClusterOptions, Replicas, SimNode, SimNodeSpec,
};

/// `GET path` over plain HTTP/1.0; the body, or `None` if the server did not answer 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// The value of the sample written exactly `series` (name and labels) in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Percent-encodes a PromQL query for a URL.
fn encode_query(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The single value a PromQL instant query returns, once Prometheus has one.
fn prom_value(prometheus: &str, query: &str) -> Option<f64> {
    let body = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", encode_query(query)),
    )?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    let [one] = result.as_slice() else {
        return None;
    };
    one["value"][1].as_str()?.parse().ok()
}

/// `promtool check metrics` (Debian's prometheus package) finds nothing wrong with `text`.
fn promtool_check(text: &str) {
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// A Prometheus server scraping `targets` every second; its guard and address.
fn start_prometheus(dir: &Path, targets: &[&str]) -> (ProcGuard, String) {
    let config = dir.join("prometheus.yml");
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: dormant\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
        format!("--web.listen-address={listen}"),
    ];
    let guard = ProcGuard::spawn(
        Path::new("/usr/bin/prometheus"),
        &args,
        &dir.join("prometheus.log"),
    );
    (guard, listen)
}

/// The names of the samples in an exposition (`dormant_placements_total`, `..._bucket`, ...).
fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The repository's Grafana dashboard and alerting rules: the dashboard parses, every metric
/// their queries name is one the binaries exported in `expositions`, Prometheus runs every query
/// without an error, and promtool accepts the rules and the example scrape config.
fn check_dashboard(expositions: &[&str], prometheus: &str) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    let exported: std::collections::BTreeSet<String> =
        expositions.iter().flat_map(|t| sample_names(t)).collect();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(queries.len() > 20, "{} queries", queries.len());
    let monitoring = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring");
    let rules = std::fs::read_to_string(monitoring.join("alerts.yml")).unwrap();
    let alert_queries: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .map(str::to_string)
        .collect();
    assert!(alert_queries.len() >= 10, "{alert_queries:?}");
    queries.extend(alert_queries);
    for query in &queries {
        let names = query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("dormant_"));
        for name in names {
            assert!(
                exported.contains(name),
                "the dashboard queries {name}, which nothing exports ({query})"
            );
        }
        let body = http_get(
            prometheus,
            &format!("/api/v1/query?query={}", encode_query(query)),
        )
        .unwrap_or_else(|| panic!("Prometheus refused {query}"));
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "{query}: {answer}");
    }
    for (check, file) in [("config", "prometheus.yml"), ("rules", "alerts.yml")] {
        let checked = std::process::Command::new("promtool")
            .args(["check", check])
            .arg(monitoring.join(file))
            .output()
            .expect("promtool");
        assert!(
            checked.status.success(),
            "promtool check {check} {file}: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}

#[test]
fn t180_prometheus_scrapes_the_scheduler_and_gets_the_clusters_figures() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let set = Replicas::start(1, &["--metrics-listen", &metrics]);
    let _node = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("m-a", 4000, 8192, 100),
    );
    for name in ["fits-1", "fits-2"] {
        let args = cluster::create_args(name, "postgres", ["1", "1GiB", "10GiB"]);
        let mut args = args;
        args.push("--no-wait");
        let out = set.ctl(&args);
        assert!(out.success, "{}", out.stderr);
    }
    // Fits the node's capacity, not what the first two left of it: pending.
    let mut waits = cluster::create_args("waits", "postgres", ["3", "1GiB", "10GiB"]);
    waits.push("--no-wait");
    let out = set.ctl(&waits);
    assert!(out.success, "{}", out.stderr);

    let text = wait_until(Duration::from_secs(30), "the metrics endpoint", || {
        http_get(&metrics, "/metrics")
    });
    assert_eq!(
        sample(&text, r#"dormant_tenants{state="pending"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"dormant_tenants{state="starting"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"dormant_tenants{state="running"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"dormant_node_capacity_cpu_cores{node="m-a"}"#),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, r#"dormant_node_allocated_cpu_cores{node="m-a"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"dormant_node_capacity_memory_bytes{node="m-a"}"#),
        Some(8192.0 * 1024.0 * 1024.0)
    );
    assert_eq!(sample(&text, r#"dormant_nodes{status="ready"}"#), Some(1.0));
    assert_eq!(sample(&text, "dormant_raft_is_leader"), Some(1.0));
    assert_eq!(sample(&text, "dormant_placements_total"), Some(2.0));
    assert!(http_get(&metrics, "/").is_none(), "only /metrics is served");
    // Sampled each second: at least the entries behind the figures above are committed.
    wait_until(Duration::from_secs(30), "the commit index", || {
        let text = http_get(&metrics, "/metrics")?;
        (sample(&text, "dormant_raft_commit_index")? >= 3.0).then_some(())
    });

    promtool_check(&text);

    // A real Prometheus scraping it.
    let (_prometheus, prometheus) = start_prometheus(set.dir(), &[&metrics]);
    let pending = wait_until(
        Duration::from_secs(60),
        "Prometheus to have scraped the scheduler",
        || prom_value(&prometheus, r#"dormant_tenants{state="pending"}"#),
    );
    assert_eq!(pending, 1.0);
    assert_eq!(
        prom_value(
            &prometheus,
            r#"dormant_node_capacity_cpu_cores{node="m-a"}"#
        ),
        Some(4.0)
    );
    assert_eq!(
        prom_value(&prometheus, r#"sum(dormant_node_allocated_cpu_cores)"#),
        Some(2.0)
    );
}

#[test]
fn t181_prometheus_scrapes_a_scheduler_and_an_agent_and_a_deleted_tenants_series_go() {
    if !require_root("t181_prometheus_scrapes_a_scheduler_and_an_agent") {
        return;
    }
    let scheduler_metrics = format!("127.0.0.1:{}", free_port());
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let mut cluster = Cluster::start_with(
        "t181",
        ClusterOptions {
            scheduler_flags: vec!["--metrics-listen".into(), scheduler_metrics.clone()],
            ..ClusterOptions::default()
        },
    );
    cluster.add_agent_with("n1", &["--metrics-listen", &agent_metrics]);
    cluster.create_running("m1", "postgres", ["0.5", "256MiB", "256MiB"]);
    let text = wait_until(Duration::from_secs(30), "m1's series", || {
        let text = http_get(&agent_metrics, "/metrics")?;
        let memory = sample(&text, r#"dormant_tenant_memory_bytes{tenant="m1"}"#)?;
        (memory > 0.0).then_some(text)
    });
    let cpu = sample(&text, r#"dormant_tenant_cpu_seconds_total{tenant="m1"}"#).unwrap();
    assert!(cpu > 0.0, "PostgreSQL started and used no CPU? {cpu}");
    assert_eq!(
        sample(
            &text,
            r#"dormant_tenant_state{tenant="m1",state="running"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, r#"dormant_tenant_volume_used_bytes{tenant="m1"}"#).unwrap() > 0.0);
    assert!(sample(&text, r#"dormant_tenant_awake_seconds_total{tenant="m1"}"#).is_some());
    assert_eq!(
        sample(&text, r#"dormant_agent_tenants{node="n1"}"#),
        Some(1.0)
    );
    promtool_check(&text);
    let scheduler_text = wait_until(Duration::from_secs(30), "the scheduler's endpoint", || {
        http_get(&scheduler_metrics, "/metrics")
    });
    promtool_check(&scheduler_text);
    assert_eq!(
        sample(&scheduler_text, r#"dormant_node_tenants_awake{node="n1"}"#),
        Some(1.0),
        "{scheduler_text}"
    );
    assert!(sample(&text, r#"dormant_agent_heartbeats_sent_total"#).unwrap() > 0.0);

    // A real Prometheus scraping both.
    let (_prometheus, prometheus) =
        start_prometheus(cluster.dir(), &[&scheduler_metrics, &agent_metrics]);
    let running = wait_until(
        Duration::from_secs(60),
        "Prometheus to have scraped the scheduler",
        || prom_value(&prometheus, r#"dormant_tenants{state="running"}"#),
    );
    assert_eq!(running, 1.0);
    let node = cluster.ctl_json(&["node", "list"])[0].clone();
    let cores = node["capacity"]["cpu"].as_f64().unwrap();
    assert_eq!(
        prom_value(&prometheus, r#"dormant_node_capacity_cpu_cores{node="n1"}"#),
        Some(cores),
        "{node}"
    );
    let cpu = wait_until(
        Duration::from_secs(60),
        "Prometheus to have scraped the agent",
        || {
            prom_value(
                &prometheus,
                r#"dormant_tenant_cpu_seconds_total{tenant="m1"}"#,
            )
        },
    );
    let kernel = cluster.kernel_cpu_usec("n1", "m1") as f64 / 1e6;
    assert!(
        cpu > 0.0 && cpu <= kernel,
        "m1's CPU seconds in Prometheus: {cpu}, its cgroup's: {kernel}"
    );

    let agent_text = http_get(&agent_metrics, "/metrics").expect("agent metrics");
    let scheduler_text = http_get(&scheduler_metrics, "/metrics").expect("scheduler metrics");
    check_dashboard(&[&agent_text, &scheduler_text], &prometheus);

    let out = cluster.ctl(&["tenant", "delete", "m1"]);
    assert!(out.success, "{}", out.stderr);
    wait_until(Duration::from_secs(60), "m1's series to go", || {
        let text = http_get(&agent_metrics, "/metrics")?;
        (!text.contains(r#"tenant="m1""#)).then_some(())
    });
}

/// Usage for billing: a tenant kept busy shows the CPU seconds its cgroup counted (within 10 %),
/// and neither an agent killed with -9 and started again nor an engine restart resets or
/// doubles them.
#[test]
fn t182_billed_cpu_seconds_match_the_cgroup_and_survive_agent_and_engine_restarts() {
    if !require_root("t182_billed_cpu_seconds_match_the_cgroup") {
        return;
    }
    let mut cluster = Cluster::start("t182");
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent = cluster.add_agent_with("n1", &["--metrics-listen", &metrics]);
    let t = cluster.create_running("busy", "postgres", ["0.5", "256MiB", "256MiB"]);
    let uri = t["credentials"]["uri"].as_str().unwrap().to_string();
    let figure = |series: &str| {
        let text = http_get(&metrics, "/metrics")?;
        sample(&text, series)
    };
    let billed = || figure(r#"dormant_tenant_cpu_seconds_total{tenant="busy"}"#);
    let awake = || figure(r#"dormant_tenant_awake_seconds_total{tenant="busy"}"#);
    // Busy for 8 s at its quota of half a core.
    let busy = dormant_tests::psql(
        &uri,
        "SET statement_timeout = '8s'; DO $$ BEGIN LOOP END LOOP; END $$",
    );
    assert!(
        busy.as_ref()
            .is_err_and(|e| e.contains("statement timeout")),
        "{busy:?}"
    );
    let kernel_after_busy = cluster.kernel_cpu_usec("n1", "busy") as f64 / 1e6;
    assert!(kernel_after_busy > 2.0, "busy for 8 s: {kernel_after_busy}");
    // The next heartbeats sample the cgroup.
    let counted = wait_until(
        Duration::from_secs(30),
        "a sample after the busy query",
        || billed().filter(|b| *b >= kernel_after_busy * 0.9),
    );
    let kernel = cluster.kernel_cpu_usec("n1", "busy") as f64 / 1e6;
    assert!(
        counted <= kernel * 1.1,
        "billed {counted} s, the cgroup counted {kernel} s"
    );

    // Awake time is the agent's own count (the cgroup keeps none): it must survive too.
    let awake_before = awake().expect("awake seconds");
    assert!(
        awake_before >= 8.0,
        "running for the 8 s busy query: {awake_before}"
    );
    eprintln!("billed {counted} s of CPU, the cgroup counted {kernel} s; awake {awake_before} s");

    // kill -9 at any point: the next agent goes on from what was saved and shown.
    cluster.kill_agent(agent);
    let engine = cluster.engine_pid(agent, "busy");
    cluster.start_agent(agent);
    let after_restart = wait_until(Duration::from_secs(30), "the new agent's figures", billed);
    assert_eq!(
        cluster.engine_pid(agent, "busy"),
        engine,
        "the engine ran on"
    );
    let awake_after = awake().expect("awake seconds");
    assert!(
        awake_after >= awake_before,
        "awake {awake_after} s after the restart, {awake_before} s before"
    );
    let kernel = cluster.kernel_cpu_usec("n1", "busy") as f64 / 1e6;
    assert!(
        after_restart >= counted && after_restart <= kernel * 1.1,
        "after the agent's restart: billed {after_restart} s (was {counted} s), the cgroup \
         counted {kernel} s"
    );

    // The engine restarts in the same cgroup: its count goes on.
    let out = cluster.ctl(&["tenant", "restart", "busy"]);
    assert!(out.success, "{}", out.stderr);
    wait_until(Duration::from_secs(60), "the restarted engine", || {
        let pid = cluster.engine_pid_now(agent, "busy")?;
        (pid != engine && cluster.tenant("busy")["state"] == "running").then_some(())
    });
    let after_engine = wait_until(
        Duration::from_secs(30),
        "a sample of the new engine",
        || billed().filter(|b| *b > after_restart),
    );
    let kernel = cluster.kernel_cpu_usec("n1", "busy") as f64 / 1e6;
    assert!(
        after_engine <= kernel * 1.1,
        "after the engine's restart: billed {after_engine} s, the cgroup counted {kernel} s"
    );
}

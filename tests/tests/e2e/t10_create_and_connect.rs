//! Acceptance 1 and 5 (password): create a tenant with dormantctl, use it with psql, delete it,
//! and find nothing of it left: processes, cgroups, port, files.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use dormant_tests::process::{pid_alive, V1_CONTROLLERS};
use dormant_tests::{psql, require_root, wait_until, Cluster};

#[test]
fn create_connect_query_delete_leaves_nothing() {
    if !require_root("create_connect_query_delete_leaves_nothing") {
        return;
    }
    let mut cluster = Cluster::start("t10");
    cluster.add_agent("n1");

    let created = cluster.create_tenant("acme", "0.5", "256MiB", "256MiB");
    let uri = created["credentials"]["uri"]
        .as_str()
        .expect("uri")
        .to_string();
    let endpoint = created["endpoint"].as_str().expect("endpoint").to_string();
    assert_eq!(created["node"], "n1");

    // The same URI is shown again on request.
    let creds = cluster.ctl_json(&["tenant", "credentials", "acme"]);
    assert_eq!(creds["uri"].as_str(), Some(uri.as_str()));

    let out = psql(
        &uri,
        "CREATE TABLE orders(id int primary key, item text); \
         INSERT INTO orders VALUES (1, 'tea'), (2, 'cake'); \
         SELECT string_agg(item, ',' ORDER BY id) FROM orders;",
    )
    .expect("psql through the endpoint");
    assert!(out.ends_with("tea,cake"), "{out}");

    // Every connection authenticates: a wrong password is refused.
    let wrong = uri.replacen(creds["password"].as_str().unwrap(), "not-the-password", 1);
    let err = psql(&wrong, "SELECT 1").expect_err("wrong password must be refused");
    assert!(err.contains("password authentication failed"), "{err}");

    // What exists before the delete, to check it is all gone after.
    let pids_file = cluster
        .tenant_cgroup("n1", "acme", "pids")
        .join("cgroup.procs");
    let pids: Vec<i32> = std::fs::read_to_string(&pids_file)
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    assert!(!pids.is_empty(), "tenant cgroup has the engine's processes");
    let tenant_dir = cluster.agents[0].state_dir.join("tenants/acme");
    assert!(tenant_dir.join("data").is_dir());

    let out = cluster.ctl(&["tenant", "delete", "acme"]);
    assert!(out.success, "{}", out.stderr);
    let gone = cluster.ctl(&["tenant", "get", "acme"]);
    assert!(
        !gone.success && gone.stderr.contains("not found"),
        "{}",
        gone.stderr
    );

    wait_until(
        Duration::from_secs(10),
        "the engine's processes to exit",
        || pids.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
    for c in V1_CONTROLLERS {
        let dir = cluster.tenant_cgroup("n1", "acme", c);
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
    assert!(
        TcpStream::connect_timeout(&endpoint.parse().unwrap(), Duration::from_secs(1)).is_err()
    );
    assert!(!Path::new(&tenant_dir).exists(), "tenant files remain");
    let run_dir = cluster.agents[0].state_dir.join("run");
    assert_eq!(
        std::fs::read_dir(run_dir).unwrap().count(),
        0,
        "socket dir remains"
    );
}

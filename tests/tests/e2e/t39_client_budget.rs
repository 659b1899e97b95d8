//! One tenant's clients cannot take what the others need (issue 14): 5,000 idle connections to
//! one tenant leave its neighbour answering, the flooded tenant still serves a client that
//! speaks, and the agent's descriptors stay bounded.

use std::net::TcpStream;
use std::time::Duration;

use dormant_tests::{psql, require_root, wait_until, Cluster};

#[test]
fn a_flood_of_idle_connections_to_one_tenant_leaves_its_neighbour_answering() {
    if !require_root("a_flood_of_idle_connections_to_one_tenant_leaves_its_neighbour_answering") {
        return;
    }
    let mut cluster = Cluster::start("t39f");
    cluster.add_agent("n1");
    let noisy = cluster.create_tenant("noisy", "0.5", "256MiB", "256MiB");
    let calm = cluster.create_tenant("calm", "0.5", "256MiB", "256MiB");
    let noisy_uri = noisy["credentials"]["uri"].as_str().unwrap().to_string();
    let calm_uri = calm["credentials"]["uri"].as_str().unwrap().to_string();
    let endpoint = noisy["endpoint"].as_str().unwrap().to_string();
    let agent_pid = cluster.agents[0].proc.as_ref().unwrap().pid();
    let fds = || std::fs::read_dir(format!("/proc/{agent_pid}/fd")).map_or(0, Iterator::count);
    let fds_before = fds();

    // 5,000 connections that never send a byte. Past the tenant's budget the agent closes new
    // ones at once; the kernel still completes each connect, so every one of them succeeds here.
    let flood: Vec<TcpStream> = (0..5000)
        .map(|i| TcpStream::connect(&endpoint).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    // The neighbour answers as usual, and so does the flooded tenant to a client that speaks.
    assert_eq!(psql(&calm_uri, "SELECT 1"), Ok("1".into()));
    assert_eq!(psql(&noisy_uri, "SELECT 2"), Ok("2".into()));
    // The agent holds at most the tenant's budget of silent ones (half of 2 × max_connections
    // + 16: 40 for this tenant's 32 connections), the oldest closed for newer ones; not 5,000.
    let held = fds().saturating_sub(fds_before);
    assert!(held < 200, "the agent holds {held} more descriptors");
    let log = cluster.agent_log(0);
    assert!(log.contains("the oldest silent client closed"), "{log}");
    drop(flood);
    wait_until(Duration::from_secs(30), "the flood's sockets gone", || {
        (fds() <= fds_before + 10).then_some(())
    });
}

//! Tenant ports outlive the agent process (issue 14): the host's listener keeper holds them, so
//! connections made while the agent is down wait in the kernel's backlog and are served (woken if
//! need be) once it is back; a graceful restart hands the open connections over and cuts none.

use std::time::{Duration, Instant};

use dormant_tests::{psql, require_root, wait_until, Cluster, PsqlSession};

/// kill -9 the agent while clients connect in a loop: no connection is refused, and every
/// client that connected while the agent was down is served once it is back, a hibernated
/// tenant's too (woken by it).
#[test]
fn connections_made_while_the_agent_is_down_wait_and_are_served() {
    if !require_root("connections_made_while_the_agent_is_down_wait_and_are_served") {
        return;
    }
    let mut cluster = Cluster::start("t38k");
    cluster.add_agent("n1");
    let awake = cluster.create_tenant("awake", "0.5", "256MiB", "256MiB");
    let sleepy = cluster.create(
        "sleepy",
        "postgres",
        ["0.5", "256MiB", "256MiB"],
        &["--idle-after", "1s"],
    );
    assert!(sleepy.success, "{}", sleepy.stderr);
    let sleepy = sleepy.json();
    let awake_uri = awake["credentials"]["uri"].as_str().unwrap().to_string();
    let sleepy_uri = sleepy["credentials"]["uri"].as_str().unwrap().to_string();
    psql(
        &sleepy_uri,
        "CREATE TABLE kept(v int); INSERT INTO kept VALUES (5)",
    )
    .unwrap();
    cluster.wait_tenant_state("sleepy", "hibernated", Duration::from_secs(30));

    // Clients in a loop, before, during and after the agent's absence.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (uri, stop) = (awake_uri.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let began = Instant::now();
                results.push((began, psql(&uri, "SELECT 42")));
                std::thread::sleep(Duration::from_millis(50));
            }
            results
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_agent(0);
    let killed = Instant::now();
    // While it is down: one client per tenant, waiting in the backlog.
    let during: Vec<_> = [
        (awake_uri.clone(), "SELECT 42"),
        (sleepy_uri.clone(), "SELECT v FROM kept"),
    ]
    .into_iter()
    .map(|(uri, sql)| std::thread::spawn(move || psql(&uri, sql)))
    .collect();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.start_agent(0);
    let back = Instant::now();
    let answers: Vec<_> = during.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(answers[0], Ok("42".to_string()), "awake tenant's client");
    assert_eq!(
        answers[1],
        Ok("5".to_string()),
        "hibernated tenant's client"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = looping.join().unwrap();

    let refused: Vec<_> = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_err_and(|e| e.contains("refused")))
        .collect();
    assert!(refused.is_empty(), "connections refused: {refused:?}");
    // Only a connection the dying agent was carrying may be cut (a crash cuts what is in
    // flight); every one made after the kill is served.
    let after_kill: Vec<_> = results
        .iter()
        .filter(|(began, _)| *began > killed + Duration::from_millis(100))
        .collect();
    assert!(
        after_kill.iter().any(|(began, _)| *began > back),
        "the loop went on after the agent was back"
    );
    for (began, r) in &after_kill {
        assert_eq!(
            r.as_deref(),
            Ok("42"),
            "client started {:?} after the kill",
            began.duration_since(killed)
        );
    }
    assert!(cluster.agent_log(0).contains("took back the tenant ports"));
}

/// A graceful restart (SIGTERM, then the agent again) with 20 clients in the middle of a query:
/// each gets its answer; no connection is cut.
#[test]
fn a_graceful_agent_restart_cuts_no_connection_mid_query() {
    if !require_root("a_graceful_agent_restart_cuts_no_connection_mid_query") {
        return;
    }
    let mut cluster = Cluster::start("t38g");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("steady", "1", "512MiB", "256MiB");
    // Plaintext clients: a TLS session lives in the agent's process and is closed, not handed
    // over (its client reconnects; see the proxy's docs).
    let uri = format!(
        "{}?sslmode=disable",
        t["credentials"]["uri"].as_str().unwrap()
    );
    // The clients' queries wait on a lock this session holds: they stay mid-query for as long
    // as the test needs, however slow the host. The session itself is a client too.
    let mut holder = PsqlSession::connect(&uri);
    assert_eq!(
        holder.query(
            "SELECT 1 FROM (SELECT pg_advisory_lock(7)) AS held;",
            Duration::from_secs(30)
        ),
        Ok("1".into())
    );
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                psql(
                    &uri,
                    &format!("SELECT {i} FROM (SELECT pg_advisory_lock_shared(7)) AS waited"),
                )
            })
        })
        .collect();
    wait_until(Duration::from_secs(60), "20 clients mid-query", || {
        let n: u64 = psql(
            &uri,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_advisory_lock_shared(7)%' AND wait_event_type = 'Lock'",
        )
        .ok()?
        .parse()
        .ok()?;
        (n == 20).then_some(())
    });
    let pid = cluster.engine_pid(0, "steady");
    cluster.agents[0]
        .proc
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGTERM);
    cluster.wait_agent_exit(0, Duration::from_secs(30));
    cluster.start_agent(0);
    // The lock holder's connection was handed over too: it lets the clients finish.
    assert_eq!(
        holder.query("SELECT pg_advisory_unlock(7);", Duration::from_secs(30)),
        Ok("t".into())
    );
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap(), Ok(i.to_string()), "client {i}");
    }
    assert_eq!(
        cluster.engine_pid(0, "steady"),
        pid,
        "the engine kept running"
    );
    let log = cluster.agent_log(0);
    assert!(
        log.contains("client connections handed over to the next agent"),
        "{log}"
    );
    assert!(log.contains("taken over from the previous agent"), "{log}");
}

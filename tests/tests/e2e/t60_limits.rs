//! Limits hold as hard limits, read from the kernel's own counters, on the host's cgroup layout
//! (v1 here, v2 in the VM): memory past the limit is OOM-killed and reported while the neighbour
//! answers; a spinning tenant is held to its CPU quota; a fork bomb stops at pids.max; freeze and
//! thaw keep an open connection answering.

use std::time::{Duration, Instant};

use dormant_tests::{psql, require_root, wait_until, CgroupVersion, Cluster, PsqlSession};

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn keyed(content: &str, key: &str) -> u64 {
    content
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {content}"))
}

/// OOM kills in the tenant's cgroup, from the kernel's files.
fn kernel_oom_kills(cluster: &Cluster, tenant: &str) -> u64 {
    match CgroupVersion::of_host() {
        CgroupVersion::V1 => keyed(
            &read(
                &cluster
                    .tenant_cgroup("n1", tenant, "memory")
                    .join("memory.oom_control"),
            ),
            "oom_kill",
        ),
        CgroupVersion::V2 => keyed(
            &read(
                &cluster
                    .tenant_cgroup("n1", tenant, "")
                    .join("memory.events"),
            ),
            "oom_kill",
        ),
    }
}

/// Periods in which the kernel held the tenant back by its CPU quota.
fn kernel_nr_throttled(cluster: &Cluster, tenant: &str) -> u64 {
    let file = match CgroupVersion::of_host() {
        CgroupVersion::V1 => cluster.tenant_cgroup("n1", tenant, "cpu").join("cpu.stat"),
        CgroupVersion::V2 => cluster.tenant_cgroup("n1", tenant, "").join("cpu.stat"),
    };
    keyed(&read(&file), "nr_throttled")
}

fn uri(t: &serde_json::Value) -> String {
    t["credentials"]["uri"].as_str().unwrap().to_string()
}

#[test]
fn memory_past_the_limit_is_oom_killed_and_reported_while_the_neighbour_answers() {
    if !require_root("memory_past_the_limit_is_oom_killed_and_reported_while_the_neighbour_answers")
    {
        return;
    }
    let mut cluster = Cluster::start("t60m");
    cluster.add_agent("n1");
    let hog = uri(&cluster.create_tenant("hog", "0.5", "192MiB", "256MiB"));
    let calm = uri(&cluster.create_tenant("calm", "0.25", "256MiB", "256MiB"));
    assert_eq!(kernel_oom_kills(&cluster, "hog"), 0);

    // One backend builds a 400 MiB string in a 192 MiB cgroup.
    let hog_uri = hog.clone();
    let hog_query = std::thread::spawn(move || {
        psql(
            &hog_uri,
            "SELECT length(string_agg(repeat('x', 1024 * 1024), '')) FROM generate_series(1, 400)",
        )
    });
    // The neighbour keeps answering while it happens.
    let mut answered = 0;
    while !hog_query.is_finished() {
        assert_eq!(psql(&calm, "SELECT 1").expect("neighbour answers"), "1");
        answered += 1;
    }
    let err = hog_query
        .join()
        .unwrap()
        .expect_err("the hog's query must not succeed");
    assert!(
        err.contains("terminated")
            || err.contains("closed the connection")
            || err.contains("closed unexpectedly"),
        "{err}"
    );
    assert!(answered >= 1);
    assert!(kernel_oom_kills(&cluster, "hog") >= 1);

    // Reported as an OOM kill, and the engine recovers: the postmaster restarts its backends.
    let t = wait_until(Duration::from_secs(20), "oom_kills in tenant get", || {
        let t = cluster.tenant("hog");
        (t["usage"]["oom_kills"].as_u64().unwrap_or(0) >= 1).then_some(t)
    });
    assert_eq!(t["state"], "running", "{t}");
    let ok = wait_until(Duration::from_secs(60), "the hog to answer again", || {
        psql(&hog, "SELECT 2").ok()
    });
    assert_eq!(ok, "2");
    assert_eq!(psql(&calm, "SELECT 3").unwrap(), "3");
    assert_eq!(kernel_oom_kills(&cluster, "calm"), 0);
}

#[test]
fn a_spinning_tenant_is_held_to_its_cpu_quota() {
    if !require_root("a_spinning_tenant_is_held_to_its_cpu_quota") {
        return;
    }
    let mut cluster = Cluster::start("t60c");
    cluster.add_agent("n1");
    let spin = uri(&cluster.create_tenant("spin", "0.5", "256MiB", "256MiB"));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    // One busy loop per core, each ending itself after a while.
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            let uri = spin.clone();
            std::thread::spawn(move || {
                let _ = psql(
                    &uri,
                    "SET statement_timeout = '40s'; DO $$ BEGIN LOOP END LOOP; END $$",
                );
            })
        })
        .collect();
    // Measure only once every spinner runs: on a loaded host (the v2 VM beside a fork bomb)
    // connecting can take longer than any fixed pause.
    let spinning = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
         AND query LIKE '%LOOP END LOOP%' AND pid <> pg_backend_pid()";
    wait_until(Duration::from_secs(60), "every spinner to run", || {
        let n: usize = psql(&spin, spinning).ok()?.parse().ok()?;
        (n == cores).then_some(())
    });
    let (t0, u0) = (Instant::now(), cluster.kernel_cpu_usec("n1", "spin"));
    let throttled0 = kernel_nr_throttled(&cluster, "spin");
    std::thread::sleep(Duration::from_secs(10));
    let (t1, u1) = (Instant::now(), cluster.kernel_cpu_usec("n1", "spin"));
    let throttled1 = kernel_nr_throttled(&cluster, "spin");
    let cores_used = (u1 - u0) as f64 / (t1 - t0).as_micros() as f64;
    eprintln!(
        "spinning tenant with quota 0.5 used {cores_used:.3} cores on {cores} cores; \
         throttled in {} periods",
        throttled1 - throttled0
    );
    // The quota engaged: the kernel throttled the tenant in the window.
    assert!(throttled1 > throttled0, "never throttled");
    match CgroupVersion::of_host() {
        // Native: never more than the quota (10% for accounting); less only when the host's
        // two cores are busy with the rest of the suite, which runs beside it.
        CgroupVersion::V1 => assert!(
            cores_used > 0.05 && cores_used <= 0.55,
            "used {cores_used:.3} cores, quota 0.5"
        ),
        // Emulated (the v2 VM): the guest's vCPUs get what the host gives them, so the tenant may
        // get less than its quota; it must never get more (25% allowed for coarse accounting).
        CgroupVersion::V2 => assert!(
            cores_used > 0.05 && cores_used <= 0.625,
            "used {cores_used:.3} cores, quota 0.5"
        ),
    }

    // The throttling is reported.
    let t = wait_until(Duration::from_secs(10), "throttling in tenant get", || {
        let t = cluster.tenant("spin");
        (t["usage"]["cpu_throttled_usec"].as_u64().unwrap_or(0) > 0).then_some(t)
    });
    assert!(t["usage"]["cpu_nr_throttled"].as_u64().unwrap() > 0, "{t}");
    if CgroupVersion::of_host() == CgroupVersion::V2 {
        assert!(
            t["usage"]["pressure"]["cpu_some_usec"].as_u64().unwrap() > 0,
            "a throttled tenant shows CPU pressure: {t}"
        );
    }
    // Done measuring: end the loops now rather than at their timeout.
    let _ = psql(
        &spin,
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
         WHERE query LIKE '%LOOP END LOOP%' AND pid <> pg_backend_pid()",
    );
    for s in spinners {
        s.join().unwrap();
    }
}

#[test]
fn a_fork_bomb_stops_at_pids_max_and_the_neighbour_is_unaffected() {
    if !require_root("a_fork_bomb_stops_at_pids_max_and_the_neighbour_is_unaffected") {
        return;
    }
    let mut cluster = Cluster::start("t60p");
    cluster.add_agent("n1");
    let bomb = uri(&cluster.create_tenant("bomb", "0.5", "256MiB", "256MiB"));
    let calm = uri(&cluster.create_tenant("calm", "0.25", "256MiB", "256MiB"));
    let pids_dir = cluster.tenant_cgroup("n1", "bomb", "pids");
    let pids_max: u64 = read(&pids_dir.join("pids.max")).trim().parse().unwrap();

    // The tenant's superuser can run programs (COPY FROM PROGRAM), as its own OS user inside
    // its cgroup: fork far more sleepers than pids.max allows.
    let result = psql(
        &bomb,
        "CREATE TEMP TABLE o(l text); \
         COPY o FROM PROGRAM 'i=0; while [ $i -lt 3000 ]; do sleep 300 </dev/null >/dev/null 2>&1 & i=$((i+1)); done; echo done'",
    );
    eprintln!("fork bomb: {result:?}");
    let current: u64 = read(&pids_dir.join("pids.current")).trim().parse().unwrap();
    let refused = keyed(&read(&pids_dir.join("pids.events")), "max");
    assert!(current <= pids_max, "{current} > {pids_max}");
    // The shell stops at its first refused fork; a few of the tenant's own processes may have
    // exited since.
    assert!(
        current >= pids_max * 9 / 10,
        "the bomb stopped at {current}, well below {pids_max}: {result:?}"
    );
    assert!(refused > 0, "the kernel refused no fork");

    // The neighbour and the host can still start processes.
    assert_eq!(psql(&calm, "SELECT 1").unwrap(), "1");
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());

    // Delete ends every process of the tenant at once, sleepers included.
    let out = cluster.ctl(&["tenant", "delete", "bomb"]);
    assert!(out.success, "{}", out.stderr);
    wait_until(Duration::from_secs(30), "the bomb's cgroup to go", || {
        (!pids_dir.exists()).then_some(())
    });
    assert_eq!(psql(&calm, "SELECT 2").unwrap(), "2");
}

#[test]
fn freeze_and_thaw_keep_an_open_connection_answering() {
    if !require_root("freeze_and_thaw_keep_an_open_connection_answering") {
        return;
    }
    let mut cluster = Cluster::start("t60f");
    cluster.add_agent("n1");
    let ice = uri(&cluster.create_tenant("ice", "0.5", "256MiB", "256MiB"));
    let mut session = PsqlSession::connect(&ice);
    let backend = session.backend_pid();
    let cgroup = cluster.tenant_cgroup_handle("n1", "ice");

    cgroup.freeze().expect("freeze");
    match CgroupVersion::of_host() {
        CgroupVersion::V1 => assert_eq!(
            read(
                &cluster
                    .tenant_cgroup("n1", "ice", "freezer")
                    .join("freezer.state")
            )
            .trim(),
            "FROZEN"
        ),
        CgroupVersion::V2 => assert_eq!(
            keyed(
                &read(&cluster.tenant_cgroup("n1", "ice", "").join("cgroup.events")),
                "frozen"
            ),
            1
        ),
    }
    // Frozen means no answer, not an error.
    let stalled = session.query("SELECT 'thawed';", Duration::from_secs(2));
    assert!(stalled.is_err(), "a frozen engine answered: {stalled:?}");

    cgroup.thaw().expect("thaw");
    // The question asked while frozen is answered on the same connection.
    let answer = session.query("", Duration::from_secs(30));
    assert_eq!(answer.as_deref(), Ok("thawed"));
    assert_eq!(session.backend_pid(), backend);
    assert_eq!(
        session.query("SELECT 40 + 2;", Duration::from_secs(10)),
        Ok("42".to_string())
    );
}

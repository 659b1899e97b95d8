//! Issue 14, hibernation: a tenant with no open connection for `idle_after` hibernates (its engine
//! stopped, or its cgroup frozen) and the next connection wakes it; the client sees a delay, never
//! a refusal. Real PostgreSQL and Redis engines, real cgroups, as root.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;

use dormant_tests::process::{pid_alive, pids_under, start_time};
use dormant_tests::{psql, redis_cli, require_root, wait_until, Cluster, PsqlSession};

/// Long enough for a wake plus the connection; a hung wake fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(60);

/// `tenant create` with hibernation flags; the tenant may already have hibernated when the
/// command returns (idle_after is short), so both count as "it ran".
fn create(cluster: &Cluster, name: &str, engine: &str, sizes: [&str; 3], extra: &[&str]) -> Value {
    let out = cluster.create(name, engine, sizes, extra);
    assert!(out.success, "create {name} failed: {}", out.stderr);
    let v = out.json();
    assert!(
        v["state"] == "running" || v["state"] == "hibernated",
        "tenant {name} did not run: {v}"
    );
    v
}

fn uri_of(created: &Value) -> String {
    created["credentials"]["uri"].as_str().unwrap().to_string()
}

/// `tenant get NAME` usage field `key`, as a number (0 while the agent has not said yet).
fn usage(cluster: &Cluster, name: &str, key: &str) -> u64 {
    cluster.tenant(name)["usage"][key].as_u64().unwrap_or(0)
}

/// Waits until the tenant's usage field `key` is at least `min` (usage arrives with heartbeats).
fn wait_usage_at_least(cluster: &Cluster, name: &str, key: &str, min: u64) -> Value {
    wait_until(
        Duration::from_secs(20),
        &format!("{name}: usage.{key} >= {min}"),
        || {
            let t = cluster.tenant(name);
            (t["usage"][key].as_u64()? >= min).then_some(t)
        },
    )
}

/// PIDs in the tenant's cgroup for `controller` (v1) or its one cgroup (v2).
fn cgroup_pids(cluster: &Cluster, tenant: &str, controller: &str) -> Vec<i32> {
    pids_under(&cluster.tenant_cgroup("n1", tenant, controller))
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tenant's memory as the kernel charges it to its cgroup.
#[derive(Debug)]
struct Memory {
    /// `memory.usage_in_bytes` (v1) or `memory.current` (v2).
    usage: u64,
    /// Anonymous memory: `rss` (v1), `anon` (v2).
    anon: u64,
    /// Page cache, shared memory included: `cache` (v1), `file` (v2).
    file: u64,
    shmem: u64,
}

impl Memory {
    fn of(cluster: &Cluster, tenant: &str) -> Self {
        let dir = cluster.tenant_cgroup("n1", tenant, "memory");
        let v1 = dormant_tests::CgroupVersion::of_host() == dormant_tests::CgroupVersion::V1;
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
        let key = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} in memory.stat: {stat}"))
        };
        let (usage, anon, file) = if v1 {
            ("memory.usage_in_bytes", "rss", "cache")
        } else {
            ("memory.current", "anon", "file")
        };
        Self {
            usage: read_u64(&dir.join(usage)),
            anon: key(anon),
            file: key(file),
            shmem: key("shmem"),
        }
    }

    /// What is not page cache: the processes' own memory and the kernel's for them.
    fn not_page_cache(&self) -> u64 {
        self.usage.saturating_sub(self.file)
    }
}

/// How many times the agent's log says a tenant woke.
fn woke_lines(cluster: &Cluster, tenant: &str) -> usize {
    let span = format!("tenant_id={tenant} ");
    cluster
        .agent_log(0)
        .lines()
        .filter(|l| l.contains("tenant woke") && l.contains(&span))
        .count()
}

/// Waits until the agent's log says the tenant woke `n` times (it says so just after the
/// clients are let through), and not more.
fn wait_woke_lines(cluster: &Cluster, tenant: &str, n: usize) {
    wait_until(
        Duration::from_secs(20),
        &format!("{n} wakes of {tenant} in the agent's log"),
        || (woke_lines(cluster, tenant) >= n).then_some(()),
    );
    assert_eq!(woke_lines(cluster, tenant), n, "{tenant}: wakes in the log");
}

/// Runs `sql` with psql as `psql()` does, with extra environment.
fn psql_env(uri: &str, sql: &str, env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", uri, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "60")
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Stays `running` for `hold` (checked every 200 ms), with no further hibernation counted.
fn stays_running(cluster: &Cluster, name: &str, hold: Duration) {
    let hibernations = usage(cluster, name, "hibernations");
    let until = Instant::now() + hold;
    while Instant::now() < until {
        let t = cluster.tenant(name);
        assert_eq!(t["state"], "running", "{name} must stay awake: {t}");
        assert_eq!(
            t["usage"]["hibernations"].as_u64().unwrap_or(0),
            hibernations,
            "{t}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` lines of 1023 printable characters and a newline (1 KiB each), from a fixed seed.
fn write_lines(path: &Path, n: usize) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:-_+=()";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut line = [0u8; 1024];
    line[1023] = b'\n';
    for _ in 0..n {
        for b in &mut line[..1023] {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = alphabet[usize::try_from(x % alphabet.len() as u64).unwrap()];
        }
        w.write_all(&line).unwrap();
    }
    w.flush().unwrap();
}

fn md5sum(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// Points 1, 6, 8 and 9: a PostgreSQL and a Redis tenant hibernate (stop) after 2 s without a
/// connection: no engine process is left and the memory goes with it; a connection wakes them
/// and finds their data. An open, silent connection keeps a tenant awake, and 200 MiB cross the
/// proxy both ways byte for byte. With the scheduler gone, a connection still wakes a tenant.
#[test]
fn idle_tenants_stop_and_wake_on_a_connection_with_their_data() {
    if !require_root("idle_tenants_stop_and_wake_on_a_connection_with_their_data") {
        return;
    }
    let mut cluster = Cluster::start("t37s");
    cluster.add_agent("n1");
    let pg = create(
        &cluster,
        "sleepy",
        "postgres",
        ["0.5", "256MiB", "1GiB"],
        &["--idle-after", "2s"],
    );
    let uri = uri_of(&pg);
    let rd = create(
        &cluster,
        "cache",
        "redis",
        ["0.25", "128MiB", "256MiB"],
        &["--idle-after", "2s"],
    );
    let (endpoint, password) = (
        rd["endpoint"].as_str().unwrap().to_string(),
        rd["credentials"]["password"].as_str().unwrap().to_string(),
    );
    let t = cluster.tenant("sleepy");
    assert_eq!(t["idle_after"], "2s", "{t}");
    assert_eq!(t["hibernate"], "stop", "{t}");

    // An open connection that says nothing keeps the tenant awake well past idle_after.
    let mut session = PsqlSession::connect(&uri);
    assert_eq!(
        session.query(
            "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('written before'); SELECT 'ok';",
            WAIT
        ),
        Ok("ok".to_string())
    );
    let backend = session.backend_pid();
    assert_eq!(
        redis_cli(&endpoint, &password, &["SET", "k", "kept across"]),
        Ok("OK".into())
    );
    let engine = cluster.engine_pid(0, "sleepy");
    assert!(cgroup_pids(&cluster, "sleepy", "pids").contains(&engine));
    let running = Memory::of(&cluster, "sleepy");
    eprintln!("sleepy running: {running:?}");
    stays_running(&cluster, "sleepy", Duration::from_secs(7));
    let t = cluster.tenant("sleepy");
    assert_eq!(t["usage"]["open_connections"], 1, "{t}");
    assert_eq!(t["connections"].as_array().map(Vec::len), Some(1), "{t}");
    assert_eq!(
        session.backend_pid(),
        backend,
        "the same connection answers"
    );
    assert_eq!(cluster.engine_pid(0, "sleepy"), engine);

    // The last connection closes: 2 s later the engine is stopped.
    drop(session);
    let t = cluster.wait_tenant_state("sleepy", "hibernated", WAIT);
    assert!(t["usage"]["hibernations"].as_u64() >= Some(1), "{t}");
    let list = cluster.ctl_json(&["tenant", "list"]);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "sleepy");
    assert_eq!(
        listed.unwrap()["state"],
        "hibernated",
        "tenant list: {list}"
    );
    // The session's connect may have woken it already, had it gone idle after the create.
    let wakes = t["usage"]["wakes"].as_u64().unwrap_or(0);
    assert!(
        cgroup_pids(&cluster, "sleepy", "pids").is_empty(),
        "no engine process remains"
    );
    assert!(cgroup_pids(&cluster, "sleepy", "memory").is_empty());
    assert!(!pid_alive(engine));
    // The engine's memory is gone: no anonymous or shared memory, and the page cache of the
    // files it read is given back when it hibernates: the cgroup's charge drops to about zero.
    let hibernated = Memory::of(&cluster, "sleepy");
    eprintln!("sleepy hibernated: {hibernated:?}");
    let both = format!("running: {running:?}, hibernated: {hibernated:?}");
    assert_eq!((hibernated.anon, hibernated.shmem), (0, 0), "{both}");
    assert!(hibernated.usage < 4 << 20, "{both}");
    assert!(
        hibernated.not_page_cache() < 8 << 20
            && hibernated.not_page_cache() < running.not_page_cache(),
        "{both}"
    );
    // The cgroup, volume and port stay.
    assert!(cluster.tenant_cgroup("n1", "sleepy", "memory").is_dir());
    assert_eq!(t["endpoint"], pg["endpoint"]);

    // A new connection wakes it and reads what was written before.
    assert_eq!(
        psql(&uri, "SELECT v FROM kept"),
        Ok("written before".into())
    );
    let t = wait_usage_at_least(&cluster, "sleepy", "wakes", wakes + 1);
    assert!(t["usage"]["hibernations"].as_u64() >= Some(1), "{t}");
    let wake_usec = t["usage"]["last_wake_usec"].as_u64().unwrap_or(0);
    assert!(wake_usec > 0, "{t}");
    eprintln!("sleepy woke (stop mode, PostgreSQL) in {wake_usec} us");

    // Redis: hibernated, no process left; PING wakes it, the key is still there.
    let t = cluster.wait_tenant_state("cache", "hibernated", WAIT);
    let wakes = t["usage"]["wakes"].as_u64().unwrap_or(0);
    assert!(cgroup_pids(&cluster, "cache", "pids").is_empty());
    assert_eq!(
        redis_cli(&endpoint, &password, &["PING"]),
        Ok("PONG".into())
    );
    assert_eq!(
        redis_cli(&endpoint, &password, &["GET", "k"]),
        Ok("kept across".into())
    );
    let t = wait_usage_at_least(&cluster, "cache", "wakes", wakes + 1);
    eprintln!(
        "cache woke (stop mode, Redis) in {} us",
        t["usage"]["last_wake_usec"]
    );

    // 200 MiB in and out through the proxy, byte for byte.
    let sent = cluster.dir().join("sent.txt");
    let back = cluster.dir().join("back.txt");
    write_lines(&sent, 200 * 1024);
    let bytes_before = cluster.tenant("sleepy")["usage"].clone();
    let began = Instant::now();
    assert_eq!(
        psql_env(&uri, "CREATE TABLE blob(line text)", &[]),
        Ok("CREATE TABLE".into())
    );
    assert_eq!(
        psql_env(
            &uri,
            &format!("\\copy blob(line) FROM '{}'", sent.display()),
            &[]
        ),
        Ok("COPY 204800".into())
    );
    let copied_in = began.elapsed();
    // A sequential scan in the order the rows were loaded: no scan joins another midway.
    assert_eq!(
        psql_env(
            &uri,
            &format!("\\copy (SELECT line FROM blob) TO '{}'", back.display()),
            &[("PGOPTIONS", "-c synchronize_seqscans=off")]
        ),
        Ok("COPY 204800".into())
    );
    eprintln!(
        "200 MiB copied in in {copied_in:?}, out in {:?}",
        began.elapsed() - copied_in
    );
    let (sent_md5, back_md5) = (md5sum(&sent), md5sum(&back));
    assert_eq!(sent_md5, back_md5, "the data came back changed");
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 200 << 20);
    let t = wait_until(WAIT, "the proxy's byte counters", || {
        let t = cluster.tenant("sleepy");
        let grew = |k: &str| {
            t["usage"][k].as_u64().unwrap_or(0)
                >= bytes_before[k].as_u64().unwrap_or(0) + (200 << 20)
        };
        (grew("bytes_in") && grew("bytes_out")).then_some(t)
    });
    eprintln!("sleepy usage after the copies: {}", t["usage"]);
    std::fs::remove_file(&sent).unwrap();
    std::fs::remove_file(&back).unwrap();

    // Without a scheduler the agent still wakes its tenants.
    cluster.wait_tenant_state("sleepy", "hibernated", WAIT);
    cluster.wait_tenant_state("cache", "hibernated", WAIT);
    let (pg_woke, redis_woke) = (
        woke_lines(&cluster, "sleepy"),
        woke_lines(&cluster, "cache"),
    );
    cluster.kill_scheduler();
    assert!(cgroup_pids(&cluster, "sleepy", "pids").is_empty());
    assert_eq!(
        psql(&uri, "SELECT v FROM kept"),
        Ok("written before".into())
    );
    assert_eq!(
        redis_cli(&endpoint, &password, &["GET", "k"]),
        Ok("kept across".into())
    );
    wait_woke_lines(&cluster, "sleepy", pg_woke + 1);
    wait_woke_lines(&cluster, "cache", redis_woke + 1);
}

/// One client of the crowd: a psql connected to `uri` that answers `SELECT 40+2` and then holds
/// its connection until told to quit.
struct HeldClient {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl HeldClient {
    /// Connects (with a connect timeout that only stops a hung wake) and runs `SELECT 40+2`;
    /// returns the client and its first line of output, or psql's error.
    fn connect_and_ask(uri: &str) -> (Option<Self>, Result<String, String>) {
        let mut child = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", uri])
            .env("PGCONNECT_TIMEOUT", "120")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psql");
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let asked = writeln!(stdin, "SELECT 40+2;").and_then(|()| stdin.flush());
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        if asked.is_ok() && matches!(read, Ok(n) if n > 0) {
            let client = Self {
                child,
                stdin: Some(stdin),
            };
            return (Some(client), Ok(line.trim().to_string()));
        }
        // psql ended: its error is on stderr.
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (
            None,
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        )
    }

    fn quit(mut self) -> bool {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "\\q");
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        // Already reaped after `quit`; otherwise the test failed midway.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Point 2: 200 clients connect at once to a hibernated PostgreSQL. Its memory (1600 MiB) gives
/// it `max_connections` 200, all usable by the tenant's superuser: all 200 are served, correctly,
/// by one wake. With the 200 held, more clients get PostgreSQL's own "too many clients" error,
/// never a reset or refusal from the proxy.
#[test]
fn two_hundred_clients_at_once_share_one_wake() {
    if !require_root("two_hundred_clients_at_once_share_one_wake") {
        return;
    }
    const CLIENTS: usize = 200;
    let mut cluster = Cluster::start("t37c");
    cluster.add_agent("n1");
    let created = create(
        &cluster,
        "crowd",
        "postgres",
        ["0.5", "1600MiB", "256MiB"],
        &["--idle-after", "2s"],
    );
    let uri = uri_of(&created);
    // The agent sizes max_connections by memory (1 per 8 MiB): exactly as many as the clients.
    assert_eq!(psql(&uri, "SHOW max_connections"), Ok(CLIENTS.to_string()));
    let t = cluster.wait_tenant_state("crowd", "hibernated", WAIT);
    assert!(cgroup_pids(&cluster, "crowd", "pids").is_empty());
    let wakes_before = t["usage"]["wakes"].as_u64().unwrap_or(0);
    let woke_before = woke_lines(&cluster, "crowd");

    let start = Arc::new(Barrier::new(CLIENTS));
    let (tx, answers) = mpsc::channel();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (uri, start, tx) = (uri.clone(), start.clone(), tx.clone());
            std::thread::spawn(move || {
                start.wait();
                tx.send(HeldClient::connect_and_ask(&uri)).unwrap();
            })
        })
        .collect();
    drop(tx);
    let mut held = Vec::new();
    let mut failures = Vec::new();
    for (client, answer) in answers.iter() {
        match answer {
            Ok(a) if a == "42" => held.extend(client),
            other => failures.push(other),
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} clients failed: {failures:?}",
        failures.len()
    );
    assert_eq!(held.len(), CLIENTS);

    // All 200 are open at once, through the proxy (it lists the first 100).
    let t = wait_until(WAIT, "the 200 open connections in tenant get", || {
        let t = cluster.tenant("crowd");
        (t["usage"]["open_connections"] == CLIENTS).then_some(t)
    });
    assert_eq!(t["connections"].as_array().map(Vec::len), Some(100), "{t}");
    // The engine is full: more clients get PostgreSQL's own refusal, forwarded by the proxy.
    for _ in 0..3 {
        let err = psql(&uri, "SELECT 40+2").expect_err("beyond max_connections");
        assert!(
            err.contains("sorry, too many clients already"),
            "not PostgreSQL's refusal: {err}"
        );
    }

    for client in held {
        assert!(client.quit(), "a client's psql failed");
    }
    // One wake for all of them.
    let t = wait_usage_at_least(&cluster, "crowd", "wakes", wakes_before + 1);
    eprintln!(
        "crowd: one wake for {CLIENTS} clients in {} us",
        t["usage"]["last_wake_usec"]
    );
    wait_woke_lines(&cluster, "crowd", woke_before + 1);
    // Heartbeats later, still one.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(usage(&cluster, "crowd", "wakes"), wakes_before + 1);
    assert_eq!(woke_lines(&cluster, "crowd"), woke_before + 1);
}

/// The tenant's freezer as the kernel says: "FROZEN" or "THAWED" (v1's words; v2's
/// `cgroup.events` says `frozen 1` or `frozen 0`).
fn freezer_state(cluster: &Cluster, tenant: &str) -> String {
    match dormant_tests::CgroupVersion::of_host() {
        dormant_tests::CgroupVersion::V1 => {
            let file = cluster
                .tenant_cgroup("n1", tenant, "freezer")
                .join("freezer.state");
            std::fs::read_to_string(file).unwrap().trim().to_string()
        }
        dormant_tests::CgroupVersion::V2 => {
            let file = cluster
                .tenant_cgroup("n1", tenant, "")
                .join("cgroup.events");
            let events = std::fs::read_to_string(file).unwrap();
            if events.lines().any(|l| l == "frozen 1") {
                "FROZEN".into()
            } else {
                "THAWED".into()
            }
        }
    }
}

/// Point 3, point 4 and bad input. `--hibernate freeze`: after idle_after the cgroup is frozen
/// with the same engine process in it, and a connection thaws that same process. Then, with the
/// policy updated to `--idle-after never --hibernate stop`, the tenant stays awake without
/// clients, and `tenant hibernate` and `tenant wake` take it running → hibernated → running.
/// A bad idle_after or mode is refused naming the field and changes nothing (a mode that is not
/// one is refused by dormantctl itself, naming the flag; the scheduler's own refusal of it is
/// tested in its API's unit tests).
#[test]
fn freeze_keeps_the_engine_and_manual_hibernate_and_wake() {
    if !require_root("freeze_keeps_the_engine_and_manual_hibernate_and_wake") {
        return;
    }
    let mut cluster = Cluster::start("t37f");
    cluster.add_agent("n1");

    let sizes = ["0.5", "256MiB", "256MiB"];
    for (flags, expected) in [
        (
            ["--idle-after", "0s"],
            "idle_after: \"0s\" must be at least 1s",
        ),
        (
            ["--idle-after", "soon"],
            "idle_after: \"soon\" is not a duration",
        ),
        (
            ["--hibernate", "pause"],
            "invalid value 'pause' for '--hibernate <MODE>'",
        ),
    ] {
        let mut extra = flags.to_vec();
        extra.push("--no-wait");
        let out = cluster.create("refused", "postgres", sizes, &extra);
        assert!(!out.success, "{flags:?} accepted: {}", out.stdout);
        assert!(out.stderr.contains(expected), "{flags:?}: {}", out.stderr);
    }
    assert_eq!(cluster.ctl_json(&["tenant", "list"]), serde_json::json!([]));

    let created = create(
        &cluster,
        "icy",
        "postgres",
        sizes,
        &["--idle-after", "2s", "--hibernate", "freeze"],
    );
    let uri = uri_of(&created);
    assert_eq!(
        psql(
            &uri,
            "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('frozen with it')"
        ),
        Ok("CREATE TABLE\nINSERT 0 1".into())
    );
    let engine = cluster.engine_pid(0, "icy");
    let born = start_time(engine);
    let running = Memory::of(&cluster, "icy");

    // Idle: frozen, the engine still there, the same process.
    let t = cluster.wait_tenant_state("icy", "hibernated", WAIT);
    assert_eq!(t["hibernate"], "freeze", "{t}");
    assert_eq!(freezer_state(&cluster, "icy"), "FROZEN");
    assert!(cgroup_pids(&cluster, "icy", "pids").contains(&engine));
    assert_eq!(start_time(engine), born, "the same engine process");
    let frozen = Memory::of(&cluster, "icy");
    eprintln!("icy running: {running:?}; frozen: {frozen:?}");

    // A connection thaws it; the same engine answers.
    let mut session = PsqlSession::connect(&uri);
    assert_eq!(
        session.query("SELECT v FROM kept;", WAIT),
        Ok("frozen with it".into())
    );
    assert_eq!(freezer_state(&cluster, "icy"), "THAWED");
    assert_eq!(cluster.engine_pid(0, "icy"), engine);
    assert_eq!(start_time(engine), born, "the same engine process");
    let t = wait_usage_at_least(&cluster, "icy", "wakes", 1);
    assert_eq!(t["state"], "running", "{t}");
    eprintln!(
        "icy woke (freeze mode) in {} us",
        t["usage"]["last_wake_usec"]
    );

    // A bad update is refused naming the field, and changes nothing.
    for (flags, expected) in [
        (
            ["--hibernate", "pause"],
            "invalid value 'pause' for '--hibernate <MODE>'",
        ),
        (
            ["--idle-after", "soon"],
            "idle_after: \"soon\" is not a duration",
        ),
    ] {
        let mut args = vec!["tenant", "update", "icy"];
        args.extend(flags);
        let out = cluster.ctl(&args);
        assert!(!out.success, "{flags:?} accepted: {}", out.stdout);
        assert!(out.stderr.contains(expected), "{flags:?}: {}", out.stderr);
    }
    let t = cluster.tenant("icy");
    assert_eq!(
        (&t["idle_after"], &t["hibernate"]),
        (&"2s".into(), &"freeze".into())
    );

    // Never idle: with the session still holding it awake, the policy changes; once the agent
    // has it, the last client leaves and the tenant stays running.
    let out = cluster.ctl(&[
        "tenant",
        "update",
        "icy",
        "--idle-after",
        "never",
        "--hibernate",
        "stop",
    ]);
    assert!(out.success, "{}", out.stderr);
    let t = cluster.tenant("icy");
    assert_eq!(
        (&t["idle_after"], &t["hibernate"]),
        (&"never".into(), &"stop".into())
    );
    wait_until(WAIT, "the agent to take the new policy", || {
        cluster
            .agent_log(0)
            .lines()
            .any(|l| l.contains("hibernation policy in force") && l.contains("idle_after=never"))
            .then_some(())
    });
    drop(session);
    stays_running(&cluster, "icy", Duration::from_secs(7));
    assert_eq!(freezer_state(&cluster, "icy"), "THAWED");

    // By hand: running → hibernated (stopped now) → running, without any client.
    let total = usage(&cluster, "icy", "connections_total");
    let out = cluster.ctl(&["tenant", "hibernate", "icy"]);
    assert!(out.success, "{}", out.stderr);
    let t = cluster.wait_tenant_state("icy", "hibernated", WAIT);
    assert_eq!(t["hibernate_generation"], 1, "{t}");
    assert!(cgroup_pids(&cluster, "icy", "pids").is_empty());
    assert!(!pid_alive(engine));
    let out = cluster.ctl(&["tenant", "wake", "icy"]);
    assert!(out.success, "{}", out.stderr);
    let t = cluster.wait_tenant_state("icy", "running", WAIT);
    assert_eq!(t["wake_generation"], 1, "{t}");
    let t = wait_usage_at_least(&cluster, "icy", "wakes", 2);
    assert_eq!(
        t["usage"]["connections_total"], total,
        "woken with no client: {t}"
    );
    let woken = cluster.engine_pid(0, "icy");
    assert_ne!(woken, engine, "a new engine after a stop");
    assert!(cgroup_pids(&cluster, "icy", "pids").contains(&woken));
    assert_eq!(
        psql(&uri, "SELECT v FROM kept"),
        Ok("frozen with it".into())
    );
}

/// Point 5: a hibernated tenant whose engine cannot start (its postgresql.conf is garbage): a
/// client that wakes it waits while the agent retries, and is closed, not left hanging, when the
/// tenant goes `failed` with a reason naming the start failure. Repaired, `tenant restart`
/// brings it back with its data.
#[test]
fn a_wake_that_cannot_start_the_engine_fails_and_closes_its_clients() {
    if !require_root("a_wake_that_cannot_start_the_engine_fails_and_closes_its_clients") {
        return;
    }
    let mut cluster = Cluster::start("t37w");
    cluster.add_agent("n1");
    let created = create(
        &cluster,
        "broken",
        "postgres",
        ["0.5", "256MiB", "256MiB"],
        &["--idle-after", "2s"],
    );
    let uri = uri_of(&created);
    assert_eq!(
        psql(
            &uri,
            "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('survives')"
        ),
        Ok("CREATE TABLE\nINSERT 0 1".into())
    );
    cluster.wait_tenant_state("broken", "hibernated", WAIT);
    assert!(cgroup_pids(&cluster, "broken", "pids").is_empty());

    let conf = cluster.agents[0]
        .state_dir
        .join("tenants/broken/data/pgdata/postgresql.conf");
    let original = std::fs::read(&conf).unwrap();
    std::fs::write(&conf, "this line is not a setting\n").unwrap();

    // Two clients wake it; both must end, closed, well within the bound.
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let began = Instant::now();
                let out = Command::new("timeout")
                    .args(["120", "psql", "-X", "-A", "-t", &uri, "-c", "SELECT 1"])
                    .env("PGCONNECT_TIMEOUT", "120")
                    .output()
                    .unwrap();
                (out, began.elapsed())
            })
        })
        .collect();
    for c in clients {
        let (out, took) = c.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_ne!(out.status.code(), Some(124), "psql hung: {stderr}");
        assert!(!out.status.success(), "answered by a broken engine?");
        // Closed, in plaintext or inside the TLS session libpq prefers.
        assert!(
            stderr.contains("server closed the connection unexpectedly")
                || stderr.contains("SSL SYSCALL error: EOF detected"),
            "{stderr}"
        );
        eprintln!("broken: the waiting client was closed after {took:?}: {stderr}");
    }
    let t = cluster.wait_tenant_state("broken", "failed", WAIT);
    let reason = t["reason"].as_str().unwrap_or_default();
    eprintln!("broken: {reason}");
    assert!(reason.contains("before it was ready"), "{reason}");
    assert!(reason.contains("postgresql.conf"), "{reason}");
    assert!(reason.contains("5 failures in a row"), "{reason}");
    assert!(cgroup_pids(&cluster, "broken", "pids").is_empty());
    // A failed tenant's clients are closed at once.
    let err = psql(&uri, "SELECT 1").expect_err("a failed tenant answered");
    assert!(
        err.contains("server closed the connection unexpectedly")
            || err.contains("SSL SYSCALL error: EOF detected"),
        "{err}"
    );

    // Repaired, the way out of failed is a restart; the data is there.
    std::fs::write(&conf, original).unwrap();
    let out = cluster.ctl(&["tenant", "restart", "broken"]);
    assert!(out.success, "{}", out.stderr);
    cluster.wait_tenant_state("broken", "running", WAIT);
    assert_eq!(psql(&uri, "SELECT v FROM kept"), Ok("survives".into()));
}

/// Point 3 on either cgroup version (the v2 VM runs this one; Redis, so no initdb under the VM's
/// emulated CPU): a frozen Redis keeps its process and memory, and a client thaws that same
/// process, which answers with its data.
#[test]
fn freeze_keeps_a_redis_engine_frozen_until_a_client_comes() {
    if !require_root("freeze_keeps_a_redis_engine_frozen_until_a_client_comes") {
        return;
    }
    let mut cluster = Cluster::start("t37r");
    cluster.add_agent("n1");
    let out = cluster.create(
        "frosty",
        "redis",
        ["0.25", "128MiB", "128MiB"],
        &["--idle-after", "2s", "--hibernate", "freeze"],
    );
    assert!(out.success, "{}", out.stderr);
    let t = out.json();
    let password = t["credentials"]["password"].as_str().unwrap().to_string();
    let endpoint = t["endpoint"].as_str().unwrap().to_string();
    assert_eq!(
        redis_cli(&endpoint, &password, &["SET", "k", "cold"]),
        Ok("OK".into())
    );
    let pid = cluster.engine_pid(0, "frosty");
    let born = start_time(pid);
    cluster.wait_tenant_state("frosty", "hibernated", WAIT);
    assert_eq!(freezer_state(&cluster, "frosty"), "FROZEN");
    assert!(
        pid_alive(pid) && start_time(pid) == born,
        "the same engine, kept"
    );
    assert_eq!(
        redis_cli(&endpoint, &password, &["GET", "k"]),
        Ok("cold".into())
    );
    assert_eq!(freezer_state(&cluster, "frosty"), "THAWED");
    assert_eq!(cluster.engine_pid(0, "frosty"), pid);
    assert_eq!(start_time(pid), born);
}

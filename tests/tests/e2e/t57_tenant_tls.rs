//! TLS on tenant endpoints, terminated in the agent's proxy with the node's certificate from the
//! cluster's CA: `psql` with `sslmode=verify-full` and `redis-cli --tls --cacert` round-trip data;
//! plaintext clients are refused, in their own protocol, by a node that does not allow them; a
//! client that trusts another CA refuses the endpoint.

use std::process::Command;

use dormant_tests::{require_root, Cluster, ClusterOptions};

/// `psql` against the endpoint with `conninfo` extra settings; stdout or stderr.
fn psql_tls(endpoint: &str, password: &str, extra: &str, sql: &str) -> Result<String, String> {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let out = Command::new("psql")
        .arg(format!(
            "host={host} port={port} user=postgres dbname=postgres connect_timeout=10 {extra}"
        ))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn redis_tls(endpoint: &str, password: &str, tls: &[&str], args: &[&str]) -> String {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let out = Command::new("redis-cli")
        .args(["--no-auth-warning", "-h", host, "-p", port, "-a", password])
        .args(tls)
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[test]
fn tenants_speak_tls_verified_against_the_cluster_ca_and_plaintext_is_refused() {
    if !require_root("tenants_speak_tls_verified_against_the_cluster_ca_and_plaintext_is_refused") {
        return;
    }
    let mut cluster = Cluster::start_with(
        "t57",
        ClusterOptions {
            tenant_plaintext: false,
            ..Default::default()
        },
    );
    cluster.add_agent("n1");
    let ca = cluster.ca_file();
    let pg = cluster.create_tenant("secure", "0.25", "256MiB", "256MiB");
    let pg_endpoint = pg["endpoint"].as_str().unwrap().to_string();
    let pg_password = pg["credentials"]["password"].as_str().unwrap().to_string();
    let verify = format!("sslmode=verify-full sslrootcert={}", ca.display());

    // libpq verifies the chain and the endpoint's address against the node's certificate, and
    // data round-trips through the TLS tunnel.
    psql_tls(
        &pg_endpoint,
        &pg_password,
        &verify,
        "CREATE TABLE secrets(v text); INSERT INTO secrets VALUES ('over tls')",
    )
    .unwrap();
    assert_eq!(
        psql_tls(&pg_endpoint, &pg_password, &verify, "SELECT v FROM secrets").unwrap(),
        "over tls"
    );
    let info = psql_tls(&pg_endpoint, &pg_password, &verify, "\\conninfo").unwrap();
    assert!(info.contains("SSL connection"), "{info}");
    // Ctrl-C in psql: libpq sends its CancelRequest in the clear on a connection of its own,
    // which a TLS-only endpoint still takes; the query stops at once.
    let (host, port) = pg_endpoint.rsplit_once(':').unwrap();
    let began = std::time::Instant::now();
    let sleeper = Command::new("psql")
        .arg(format!(
            "host={host} port={port} user=postgres dbname=postgres {verify}"
        ))
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .env("PGPASSWORD", &pg_password)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(sleeper.id()).unwrap());
    dormant_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the query to run",
        || {
            psql_tls(
                &pg_endpoint,
                &pg_password,
                &verify,
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
            )
            .ok()
            .filter(|n| n == "1")
        },
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = sleeper.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(began.elapsed() < std::time::Duration::from_secs(50));
    // Plaintext: refused with a message libpq prints.
    let refused = psql_tls(&pg_endpoint, &pg_password, "sslmode=disable", "SELECT 1").unwrap_err();
    assert!(refused.contains("accepts TLS only"), "{refused}");
    // A client that trusts another CA does not trust the endpoint.
    let other = cluster.dir().join("other-ca.pem");
    let other_ca = dormant_common::tls::dev_ca::DevCa::new().unwrap();
    std::fs::write(&other, other_ca.cert_pem()).unwrap();
    let untrusted = psql_tls(
        &pg_endpoint,
        &pg_password,
        &format!("sslmode=verify-full sslrootcert={}", other.display()),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(
        untrusted.contains("certificate verify failed"),
        "{untrusted}"
    );

    // Redis: TLS from the first byte, on the same port.
    let kv = cluster.create_running("vault", "redis", ["0.25", "128MiB", "256MiB"]);
    let kv_endpoint = kv["endpoint"].as_str().unwrap().to_string();
    let kv_password = kv["credentials"]["password"].as_str().unwrap().to_string();
    let ca_arg = ca.display().to_string();
    let tls = ["--tls", "--cacert", ca_arg.as_str()];
    assert_eq!(
        redis_tls(&kv_endpoint, &kv_password, &tls, &["SET", "k", "over tls"]),
        "OK"
    );
    assert_eq!(
        redis_tls(&kv_endpoint, &kv_password, &tls, &["GET", "k"]),
        "over tls"
    );
    let plain = redis_tls(&kv_endpoint, &kv_password, &[], &["GET", "k"]);
    assert!(plain.contains("accepts TLS only"), "{plain}");
}

//! From inside a tenant (a program run by its engine), other tenants' processes are invisible,
//! their files out of reach, and no TCP connection leaves the tenant's own loopback: not to the
//! host's services on 127.0.0.1, not to any other address.

use std::collections::BTreeMap;

use dormant_tests::{require_root, run_in_postgres_tenant, Cluster};

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The host's own non-loopback IPv4 addresses, from /proc (none in the v2 VM).
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter(|a| a.contains('.') && !a.starts_with("127."))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_tenant_cannot_see_other_tenants_read_their_files_or_reach_the_network() {
    if !require_root("a_tenant_cannot_see_other_tenants_read_their_files_or_reach_the_network") {
        return;
    }
    let mut cluster = Cluster::start("t55");
    cluster.add_agent("n1");
    let alice = cluster.create_tenant("alice", "0.25", "256MiB", "256MiB")["credentials"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.create_tenant("bob", "0.25", "256MiB", "256MiB");
    let state = cluster.agents[0].state_dir.clone();
    let bob_dir = state.join("tenants/bob");
    let scheduler_port = cluster.url.rsplit(':').next().unwrap().to_string();

    let mut script = format!(
        "echo host=$(hostname)
         echo uid=$(id -u)
         echo user=$(id -un)
         echo cwd=$(pwd)
         echo srv_owner=$(stat -c %u /srv)
         echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline)
         echo visible_uids=$(cat /proc/[0-9]*/status 2>/dev/null | grep '^Uid:' | awk '{{print $2}}' | sort -u | tr '\\n' ,)
         echo read_bob=$(cat {bob}/data/pgdata/PG_VERSION 2>&1)
         echo list_bob=$(ls {bob}/data 2>&1)
         echo record_bob=$(cat {bob}/tenant.json 2>&1)
         echo image_bob=$(head -c 16 {bob}/volume.img 2>&1)
         echo list_tenants=$(ls {tenants} 2>&1)
         echo ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)
         if timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; then echo net_scheduler=open; else echo net_scheduler=closed; fi
         if timeout 5 bash -c 'exec 3<>/dev/tcp/1.1.1.1/53' 2>/dev/null; then echo net_internet=open; else echo net_internet=closed; fi
        ",
        bob = bob_dir.display(),
        tenants = state.join("tenants").display(),
        port = scheduler_port,
    );
    let host_addrs = host_addresses();
    for (i, addr) in host_addrs.iter().enumerate() {
        script.push_str(&format!(
            "if timeout 5 bash -c 'exec 3<>/dev/tcp/{addr}/{scheduler_port}' 2>/dev/null; then echo net_host{i}=open; else echo net_host{i}=closed; fi\n"
        ));
    }
    let out = run_in_postgres_tenant(&alice, &script).expect("script runs in the tenant");
    let seen: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| *seen.get(k).unwrap_or_else(|| panic!("no {k} in:\n{out}"));

    // Its own world: hostname, user, PID 1.
    assert_eq!(get("host"), "alice", "{out}");
    assert_eq!(get("user"), "alice", "{out}");
    assert!(get("pid1").contains("postgres"), "{out}");
    // Its volume at the fixed path, whatever the host's state directory: PGDATA is /srv/pgdata.
    assert_eq!(get("cwd"), "/srv/pgdata", "{out}");
    // Its own uid, not bob's, not root.
    let alice_uid: u32 = get("uid").parse().unwrap();
    let bob_uid = uid_of(cluster.engine_pid(0, "bob"));
    assert_ne!(alice_uid, 0);
    assert_ne!(alice_uid, bob_uid, "{out}");
    assert_eq!(alice_uid, uid_of(cluster.engine_pid(0, "alice")));
    assert_eq!(get("srv_owner"), alice_uid.to_string(), "{out}");
    // Every process it can see is its own: bob's (and the host's) are invisible. Bob's files and
    // the tenant list are out of reach.
    assert_eq!(get("visible_uids"), format!("{alice_uid},"), "{out}");
    for key in [
        "read_bob",
        "list_bob",
        "record_bob",
        "image_bob",
        "list_tenants",
    ] {
        // Not even there: the tenant's root has no path to the host's state directory.
        assert!(
            get(key).contains("No such file or directory"),
            "{key}: {out}"
        );
    }
    // Only loopback, and nothing of the host's behind it.
    assert_eq!(get("ifaces"), "lo,", "{out}");
    assert_eq!(get("net_scheduler"), "closed", "{out}");
    assert_eq!(get("net_internet"), "closed", "{out}");
    for i in 0..host_addrs.len() {
        assert_eq!(get(&format!("net_host{i}")), "closed", "{out}");
    }
    // The test can see the scheduler port from the host, so "closed" above is the namespace.
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{scheduler_port}")).is_ok());
}

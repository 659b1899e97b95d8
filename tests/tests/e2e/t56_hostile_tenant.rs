//! A tenant with a shell (a PostgreSQL tenant's admin is a superuser: `COPY ... FROM PROGRAM`),
//! on a host that also runs a scheduler replica and another tenant, tries what an attacker would:
//! read the Raft store (every tenant's password), another tenant's files and socket, the agent's
//! records; write anywhere but its volume and its private tmpfs; look at the host's cgroups in
//! `/sys`; make a user namespace; use the kernel keyring; fill its socket directory. Each fails,
//! and the other tenant's password appears in nothing the tenant can read.

use std::collections::BTreeMap;

use dormant_tests::{psql, require_root, run_in_postgres_tenant, Cluster};

/// Runs `script` in the tenant and returns its `key=value` lines (the last value of a key).
fn run(uri: &str, script: &str) -> (BTreeMap<String, String>, String) {
    let out = run_in_postgres_tenant(uri, script).expect("script runs in the tenant");
    let seen = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (seen, out)
}

#[test]
fn a_tenant_with_a_shell_reaches_nothing_outside_its_own_root() {
    if !require_root("a_tenant_with_a_shell_reaches_nothing_outside_its_own_root") {
        return;
    }
    let mut cluster = Cluster::start("t56");
    cluster.add_agent("n1");
    let mallory = cluster.create_tenant("mallory", "0.25", "256MiB", "256MiB");
    let uri = mallory["credentials"]["uri"].as_str().unwrap().to_string();
    let victim = cluster.create_tenant("victim", "0.25", "256MiB", "256MiB");
    let victim_password = victim["credentials"]["password"]
        .as_str()
        .unwrap()
        .to_string();
    let victim_uri = victim["credentials"]["uri"].as_str().unwrap().to_string();
    psql(&victim_uri, "SELECT 1").unwrap();

    let state = cluster.agents[0].state_dir.clone();
    let store = cluster.dir().join("scheduler");
    let victim_uid = std::fs::read_to_string(state.join("tenants/victim/uid")).unwrap();
    let victim_socket = state.join(format!("run/{}/.s.PGSQL.5432", victim_uid.trim()));
    // They are all there on the host, for the tenant to look for.
    for p in [cluster.dir(), store.as_path(), state.as_path()] {
        assert!(p.exists(), "{}", p.display());
    }
    let script = format!(
        r#"probe() {{ key=$1; shift; if out=$("$@" 2>&1); then echo "$key=ok $out" | head -c 300; else echo "$key=failed $out" | head -c 300; fi; echo; }}
probe store ls -la {store}
probe store_files cat {store}/raft/db
probe records cat {state}/tenants/mallory/tenant.json
probe victim_records cat {state}/tenants/victim/tenant.json
probe victim_data ls {state}/tenants/victim/data
probe victim_socket ls -la {victim_socket}
probe engine_dir ls -A /run/engine
for d in / /etc /usr /var /dev /run /proc /srv/.. ; do probe "write_$d" touch "$d/mallory-was-here"; done
probe write_volume touch /srv/mallory-was-here
probe write_tmp touch /tmp/x
probe write_run_lock touch /run/lock/mallory-was-here
probe fill_socket_dir sh -c "head -c 8M /dev/zero > /run/engine/fill"
rm -f /run/engine/fill
probe sys ls /sys
echo cgroup=$(cut -d: -f3 /proc/self/cgroup | sort -u | tr '\n' ,)
probe unshare_user unshare -U true
probe unshare_user_root unshare -Ur true
probe keyctl python3 -c "import ctypes,os,sys; l=ctypes.CDLL(None,use_errno=True); r=l.syscall({keyctl},0,-3,1); e=ctypes.get_errno(); print(r, os.strerror(e)); sys.exit(0 if r>=0 else 1)"
probe x32_unshare python3 -c "import ctypes,os,sys; l=ctypes.CDLL(None,use_errno=True); r=l.syscall(0x40000000|{unshare},0x10000000); e=ctypes.get_errno(); print(r, os.strerror(e)); sys.exit(0 if r>=0 else 1)"
probe ptrace python3 -c "import ctypes,os,sys; l=ctypes.CDLL(None,use_errno=True); r=l.syscall({ptrace},16,1,0,0); e=ctypes.get_errno(); print(r, os.strerror(e)); sys.exit(0 if r>=0 else 1)"
echo rw_mounts=$(awk '{{split($6,o,","); if (o[1]=="rw") print $5}}' /proc/self/mountinfo | sort | tr '\n' ,)
echo password_hits=$(for d in /*; do case $d in /proc|/usr|/dev) continue;; esac; [ -L "$d" ] && continue; grep -rlsF -D skip "{password}" "$d"; done | tr '\n' ,)
"#,
        store = store.display(),
        state = state.display(),
        victim_socket = victim_socket.display(),
        keyctl = libc::SYS_keyctl,
        ptrace = libc::SYS_ptrace,
        unshare = libc::SYS_unshare,
        password = victim_password,
    );
    let (seen, out) = run(&uri, &script);
    let get = |k: &str| {
        seen.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} in:\n{out}"))
    };

    // The scheduler's store, the agent's records (its own and the victim's), the victim's data
    // and socket: not there at all.
    for key in [
        "store",
        "store_files",
        "records",
        "victim_records",
        "victim_data",
        "victim_socket",
    ] {
        let v = get(key);
        assert!(v.starts_with("failed"), "{key}: {v}\n{out}");
        assert!(v.contains("No such file or directory"), "{key}: {v}");
    }
    // Its socket directory holds its own socket only.
    assert!(get("engine_dir").contains(".s.PGSQL.5432"), "{out}");
    // Nothing outside the volume and the private tmpfs is writable.
    for d in [
        "/", "/etc", "/usr", "/var", "/dev", "/run", "/proc", "/srv/..",
    ] {
        let v = get(&format!("write_{d}"));
        assert!(v.starts_with("failed"), "write to {d}: {v}\n{out}");
    }
    for key in ["write_volume", "write_tmp", "write_run_lock"] {
        assert!(get(key).starts_with("ok"), "{key}: {}\n{out}", get(key));
    }
    // Its /run/lock is its own, not the host's.
    assert!(!std::path::Path::new("/run/lock/mallory-was-here").exists());
    // The socket directory is a small tmpfs, not the host's disk.
    let fill = get("fill_socket_dir");
    assert!(
        fill.starts_with("failed") && fill.contains("No space left on device"),
        "{fill}"
    );
    // Every writable mount is the tenant's own: its volume, its socket directory, the private
    // tmpfs, its /proc and message queues, the five devices.
    let rw: Vec<String> = get("rw_mounts")
        .split(',')
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    let allowed = [
        "/srv",
        "/run/engine",
        "/tmp",
        "/var/tmp",
        "/run",
        "/dev/shm",
        "/dev/mqueue",
        "/proc",
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
    ];
    for m in &rw {
        assert!(allowed.contains(&m.as_str()), "writable mount {m}: {rw:?}");
    }
    // No /sys; its cgroup is the root of what it sees.
    assert!(get("sys").contains("No such file or directory"), "{out}");
    assert_eq!(get("cgroup"), "/,", "{out}");
    // No user namespace, no keyring, no tracing.
    // The same call by its x32 number (refused by the filter, whether or not the kernel has
    // x32: the filter runs first).
    for key in [
        "unshare_user",
        "unshare_user_root",
        "keyctl",
        "ptrace",
        "x32_unshare",
    ] {
        let v = get(key);
        assert!(v.starts_with("failed"), "{key}: {v}");
        assert!(v.contains("Operation not permitted"), "{key}: {v}");
    }
    // The victim's password is in nothing the tenant can read.
    assert_eq!(get("password_hits"), "", "{out}");
    // And the victim still answers.
    assert_eq!(psql(&victim_uri, "SELECT 1").unwrap(), "1");
}

/// An engine that prints terminal escape sequences (a window title, a screen clear, colours)
/// before it fails: its reason reaches the operator escaped, in `tenant list` and `tenant get`.
#[test]
fn a_reason_with_escape_sequences_prints_escaped() {
    if !require_root("a_reason_with_escape_sequences_prints_escaped") {
        return;
    }
    let mut cluster = Cluster::start("t56e");
    let config = cluster.dir().join("agent.toml");
    std::fs::write(
        &config,
        r#"
[engines.evil]
start = ["/bin/sh", "-c", "printf 'evil \\033]0;owned\\007\\033[2J\\033[31mred\\n' >&2; exit 3"]
socket = "{run}/evil.sock"
"#,
    )
    .unwrap();
    cluster.add_agent_with("n1", &["--config", config.to_str().unwrap()]);
    let out = cluster.create("prank", "evil", ["0.25", "64MiB", "256MiB"], &["--no-wait"]);
    assert!(out.success, "{}", out.stderr);
    let reason = dormant_tests::wait_until(
        std::time::Duration::from_secs(60),
        "the engine's log lines in the reason",
        || {
            let t = cluster.tenant("prank");
            let reason = t["reason"].as_str().unwrap_or("").to_string();
            reason.contains("evil").then_some(reason)
        },
    );
    // Stored escaped: the JSON carries the backslash form, not the control characters.
    assert!(
        !reason.contains('\u{1b}') && !reason.contains('\u{7}'),
        "{reason:?}"
    );
    assert!(reason.contains("\\x1b]0;owned\\x07"), "{reason:?}");
    for args in [&["tenant", "list"][..], &["tenant", "get", "prank"]] {
        let out = cluster.ctl(args);
        assert!(out.success, "{args:?}: {}", out.stderr);
        assert!(
            !out.stdout.contains('\u{1b}') && !out.stdout.contains('\u{7}'),
            "{args:?} printed a control character: {:?}",
            out.stdout
        );
        assert!(
            out.stdout.contains("\\x1b[31mred"),
            "{args:?}: {}",
            out.stdout
        );
    }
}

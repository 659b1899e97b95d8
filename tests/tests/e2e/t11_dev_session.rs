//! The README's two commands, the first one's part: `dormantctl dev` (what `scripts/dev` runs)
//! starts a scheduler and an agent on mutual TLS with a development CA, prints the operator's
//! `export` lines, and the README's session works with them: create a tenant, read its
//! credentials, connect with psql verifying the node's certificate against the dev CA, delete.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dormant_tests::cleanup::{remove_cgroup_subtree, remove_mounts_and_loops};
use dormant_tests::cluster::{bin_dir, free_port, free_port_range, stop_keeper, CGROUP_ROOT};
use dormant_tests::require_root;

/// `dormantctl dev` and what it started; stopped (SIGINT, as Ctrl-C) and cleaned up on drop,
/// also when the test fails.
struct Dev {
    child: Child,
    dir: PathBuf,
    cgroup_parent: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        // Its children, in case it does not stop them itself.
        let children: Vec<i32> =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for c in children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stop_keeper(&self.dir.join("agent"));
        let mut left = remove_cgroup_subtree(Path::new(CGROUP_ROOT), &self.cgroup_parent);
        left.extend(remove_mounts_and_loops(&self.dir));
        for item in left {
            eprintln!("LEFT BEHIND by the dev session: {item}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_readme_session_runs_on_dormantctl_dev_with_tls() {
    if !require_root("the_readme_session_runs_on_dormantctl_dev_with_tls") {
        return;
    }
    let root = Path::new(dormant_tests::cluster::TEST_ROOT);
    std::fs::create_dir_all(root).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("dev-")
        .tempdir_in(root)
        .unwrap()
        .keep();
    let unique = dir.file_name().unwrap().to_string_lossy().to_lowercase();
    let cgroup_parent =
        PathBuf::from(dormant_tests::cluster::CGROUP_TOP).join(format!("t11-{unique}"));
    let listen = format!("127.0.0.1:{}", free_port());
    let ports = free_port_range(4);
    let child = Command::new(bin_dir().join("dormantctl"))
        .args(["dev", "--dir", dir.to_str().unwrap(), "--listen", &listen])
        .args(["--ports", &format!("{}-{}", ports.0, ports.1)])
        .args(["--cgroup-parent", cgroup_parent.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dev = Dev {
        child,
        dir: dir.clone(),
        cgroup_parent,
    };
    // The operator's exports, as printed.
    let stdout = dev.child.stdout.take().unwrap();
    let mut exports = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(kv) = line.trim().strip_prefix("export ") {
            let (k, v) = kv.split_once('=').unwrap();
            exports.push((k.to_string(), v.to_string()));
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    let names: Vec<&str> = exports.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "DORMANT_SCHEDULER",
            "DORMANT_CA",
            "DORMANT_CERT",
            "DORMANT_KEY"
        ]
    );
    assert!(exports[0].1.starts_with("https://"), "{exports:?}");
    let ctl = |args: &[&str]| {
        let out = Command::new(bin_dir().join("dormantctl"))
            .args(args)
            .envs(exports.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dormantctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    ctl(&[
        "tenant",
        "create",
        "acme",
        "--engine",
        "postgres",
        "--cpu",
        "0.5",
        "--memory",
        "512MiB",
        "--storage",
        "1GiB",
    ]);
    let uri = ctl(&["tenant", "credentials", "acme"]);
    let ca = &exports[1].1;
    let verified = format!("{uri}?sslmode=verify-full&sslrootcert={ca}");
    let psql = |args: &[&str]| {
        let out = Command::new("psql")
            .arg(&verified)
            .args(["-X", "-A", "-t"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let out = psql(&[
        "-c",
        "CREATE TABLE t (x int)",
        "-c",
        "INSERT INTO t VALUES (42)",
        "-c",
        "SELECT * FROM t",
    ]);
    assert!(out.ends_with("42"), "{out}");
    assert!(psql(&["-c", "\\conninfo"]).contains("SSL connection"));
    assert!(ctl(&["tenant", "list"]).contains("acme"));
    ctl(&["tenant", "delete", "acme"]);
    drop(dev);
}

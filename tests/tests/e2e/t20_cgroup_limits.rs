//! The tenant's cgroup holds exactly its processes, with the CPU quota, memory limit (swap off)
//! and pids limit asked for, read back from the cgroup files of the host's layout: the v1
//! hierarchies here, the unified tree (`0::/...` in `/proc/PID/cgroup`) in the v2 VM.

use std::collections::BTreeSet;

use dormant_tests::{psql, require_root, CgroupVersion, Cluster};

/// PIDs of `root` and all its descendants, from /proc.
fn process_tree(root: i32) -> BTreeSet<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid: i32 = rest
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        parent_of.push((pid, ppid));
    }
    let mut tree = BTreeSet::from([root]);
    loop {
        let before = tree.len();
        for (pid, ppid) in &parent_of {
            if tree.contains(ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            return tree;
        }
    }
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn tenant_cgroup_holds_exactly_its_processes_with_the_limits_asked() {
    if !require_root("tenant_cgroup_holds_exactly_its_processes_with_the_limits_asked") {
        return;
    }
    let mut cluster = Cluster::start("t20");
    cluster.add_agent("n1");
    let t = cluster.create_tenant("limits", "250m", "300MiB", "256MiB");
    // A client connection adds a backend process; it must land in the cgroup too.
    let uri = t["credentials"]["uri"].as_str().unwrap();
    psql(uri, "SELECT 1").expect("query");

    let engine_pid = cluster.engine_pid(0, "limits");
    let version = CgroupVersion::of_host();
    let controllers: &[&str] = match version {
        CgroupVersion::V1 => &["cpu", "memory", "pids", "freezer", "cpuacct"],
        CgroupVersion::V2 => &["unified"],
    };
    for controller in controllers {
        let procs_file = cluster
            .tenant_cgroup("n1", "limits", controller)
            .join("cgroup.procs");
        // Backends come and go between two reads; the sets must agree once they hold still.
        dormant_tests::wait_until(
            std::time::Duration::from_secs(20),
            &format!("{controller} cgroup.procs to equal the engine's process tree"),
            || {
                let procs: BTreeSet<i32> = read(procs_file.clone())
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect();
                (procs == process_tree(engine_pid)).then_some(())
            },
        );
    }
    if version == CgroupVersion::V2 {
        // The kernel's view of where the postmaster lives.
        let own = read(format!("/proc/{engine_pid}/cgroup").into());
        let expected = format!("0::/{}", cluster.cgroup_parent.join("n1/limits").display());
        assert_eq!(own, expected);
    }
    // The postmaster runs as the unprivileged tenant user, not root.
    let status = read(format!("/proc/{engine_pid}/status").into());
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "{uid_line}"
    );

    let cg = |c: &str, f: &str| read(cluster.tenant_cgroup("n1", "limits", c).join(f));
    match version {
        CgroupVersion::V1 => {
            assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
            assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "25000");
            assert_eq!(
                cg("memory", "memory.limit_in_bytes"),
                (300u64 << 20).to_string()
            );
            assert_eq!(cg("pids", "pids.max"), "512");
        }
        CgroupVersion::V2 => {
            assert_eq!(cg("", "cpu.max"), "25000 100000");
            assert_eq!(cg("", "memory.max"), (300u64 << 20).to_string());
            assert_eq!(cg("", "memory.swap.max"), "0");
            assert_eq!(cg("", "pids.max"), "512");
        }
    }

    // A resize changes the limits in place: same engine, new numbers in the cgroup files.
    let out = cluster.ctl(&[
        "tenant", "update", "limits", "--cpu", "0.5", "--memory", "400MiB",
    ]);
    assert!(out.success, "{}", out.stderr);
    let (quota_file, quota, memory_file) = match version {
        CgroupVersion::V1 => (
            cluster
                .tenant_cgroup("n1", "limits", "cpu")
                .join("cpu.cfs_quota_us"),
            "50000",
            cluster
                .tenant_cgroup("n1", "limits", "memory")
                .join("memory.limit_in_bytes"),
        ),
        CgroupVersion::V2 => (
            cluster.tenant_cgroup("n1", "limits", "").join("cpu.max"),
            "50000 100000",
            cluster.tenant_cgroup("n1", "limits", "").join("memory.max"),
        ),
    };
    dormant_tests::wait_until(std::time::Duration::from_secs(20), "the new limits", || {
        (read(quota_file.clone()) == quota
            && read(memory_file.clone()) == (400u64 << 20).to_string())
        .then_some(())
    });
    assert_eq!(
        cluster.engine_pid(0, "limits"),
        engine_pid,
        "the engine restarted"
    );

    // Usage comes back through heartbeats.
    let t = dormant_tests::wait_until(
        std::time::Duration::from_secs(10),
        "usage in tenant get",
        || {
            let t = cluster.tenant("limits");
            (t["usage"]["memory_bytes"].as_u64().unwrap_or(0) > 0).then_some(t)
        },
    );
    assert!(t["usage"]["pids"].as_u64().unwrap() >= 1, "{t}");
    // And the node's own usage, from the same heartbeats.
    let node = &cluster.ctl_json(&["node", "list"])[0];
    assert!(node["used"]["memory_bytes"].as_u64().unwrap() > 0, "{node}");
    assert!(
        node["used"]["storage_bytes"].as_u64().unwrap() > 0,
        "{node}"
    );
}

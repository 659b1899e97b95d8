//! Acceptance 2: the tenant's cgroup holds exactly its processes, with the CPU quota, memory
//! limit and pids limit asked for, read back from the cgroup files.

use std::collections::BTreeSet;

use dormant_tests::{psql, require_root, Cluster};

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
    let t = cluster.create_tenant("limits", "250m", "300MiB", "1GiB");
    // A client connection adds a backend process; it must land in the cgroup too.
    let uri = t["credentials"]["uri"].as_str().unwrap();
    psql(uri, "SELECT 1").expect("query");

    let engine_pid: i32 = read(
        cluster.agents[0]
            .state_dir
            .join("tenants/limits/engine.pid"),
    )
    .parse()
    .unwrap();
    let tree = process_tree(engine_pid);
    for controller in ["cpu", "memory", "pids", "freezer", "cpuacct"] {
        let procs: BTreeSet<i32> = read(
            cluster
                .tenant_cgroup("n1", "limits", controller)
                .join("cgroup.procs"),
        )
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
        assert_eq!(
            procs, tree,
            "{controller} cgroup.procs vs the engine's process tree"
        );
    }
    // The postmaster runs as the unprivileged tenant user, not root.
    let status = read(format!("/proc/{engine_pid}/status").into());
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "{uid_line}"
    );

    let cg = |c: &str, f: &str| read(cluster.tenant_cgroup("n1", "limits", c).join(f));
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "25000");
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (300u64 << 20).to_string()
    );
    assert_eq!(cg("pids", "pids.max"), "512");

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
}

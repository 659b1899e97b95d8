//! The agent picks its cgroup driver from the host: `auto` picks v1 on the v1 host and v2 in the
//! v2 VM, `node list` shows it, and asking for the driver the host cannot provide stops the agent
//! at start with a message naming what is missing, having created nothing.

use dormant_tests::{require_root, CgroupVersion, Cluster};

#[test]
fn auto_picks_the_host_driver_and_the_other_driver_is_refused_at_start() {
    if !require_root("auto_picks_the_host_driver_and_the_other_driver_is_refused_at_start") {
        return;
    }
    let host = CgroupVersion::of_host();
    let mut cluster = Cluster::start("t70");
    cluster.add_agent("auto");
    let nodes = cluster.ctl_json(&["node", "list"]);
    assert_eq!(nodes[0]["cgroup_driver"], host.name(), "{nodes}");
    let log = cluster.agent_log(0);
    assert!(
        log.contains("cgroup driver") && log.contains("auto:"),
        "{log}"
    );

    // The same driver asked for explicitly works too.
    cluster.add_agent_with("explicit", &["--cgroup-driver", host.name()]);

    let (other, expected) = match host {
        CgroupVersion::V1 => ("v2", "v2 was asked for, but this host mounts cgroup v1"),
        CgroupVersion::V2 => ("v1", "v1 was asked for, but this host mounts cgroup2"),
    };
    let (status, log) = cluster.agent_refusing_to_start("wrong", &["--cgroup-driver", other]);
    assert!(!status.success(), "{log}");
    assert!(log.contains(expected), "{log}");
    assert!(
        log.contains("--cgroup-driver"),
        "the message says how to fix it: {log}"
    );
    // Nothing half-configured: no cgroup for that node, and it never registered.
    let node_cgroups = cluster.cgroup_parent.join("wrong");
    for base in ["", "memory", "cpu", "pids"] {
        let dir = std::path::Path::new(dormant_tests::cluster::CGROUP_ROOT)
            .join(base)
            .join(&node_cgroups);
        assert!(!dir.exists(), "{} was created", dir.display());
    }
    let nodes = cluster.ctl_json(&["node", "list"]);
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
}

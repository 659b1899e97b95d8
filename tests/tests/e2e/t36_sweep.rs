//! The sweep at start (issue 13): what an earlier run or an older agent left on the host and no
//! tenant owns — a tenant directory without a record with its volume still mounted and a process
//! in its cgroup, a loop device on a deleted image, a run directory, the trash — is removed when
//! the agent starts, each removal logged; a real tenant beside them is adopted untouched, a tenant
//! whose record is damaged is left exactly as it is, and a cgroup of no directory of ours (another
//! agent's) is not touched.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dormant_tests::{redis_cli, require_root, wait_until, Cluster};

fn losetup(args: &[&str]) -> String {
    let out = Command::new("losetup").args(args).output().unwrap();
    assert!(out.status.success(), "losetup {args:?}: {:?}", out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sparse_ext4(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn attached(device: &str) -> bool {
    let name = device.trim_start_matches("/dev/");
    Path::new("/sys/block")
        .join(name)
        .join("loop/backing_file")
        .exists()
}

#[test]
fn the_agent_sweeps_what_no_tenant_owns_and_keeps_what_one_does() {
    if !require_root("the_agent_sweeps_what_no_tenant_owns_and_keeps_what_one_does") {
        return;
    }
    let mut cluster = Cluster::start("t36");
    cluster.add_agent("n1");
    let t = cluster.create_running("keeper", "redis", ["0.25", "128MiB", "128MiB"]);
    let pid = cluster.engine_pid(0, "keeper");
    cluster.kill_agent(0);
    let state = cluster.agents[0].state_dir.clone();

    // A tenant directory without a record (a crash before it was written, by an older agent),
    // its volume attached and mounted.
    let orphan = state.join("tenants/orphan");
    std::fs::create_dir_all(orphan.join("data")).unwrap();
    sparse_ext4(&orphan.join("volume.img"));
    let orphan_dev = losetup(&[
        "--find",
        "--show",
        orphan.join("volume.img").to_str().unwrap(),
    ]);
    let out = Command::new("mount")
        .arg(&orphan_dev)
        .arg(orphan.join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A loop device whose image was deleted under it (what older agents and test runs left).
    std::fs::create_dir_all(state.join("tenants/ghost")).unwrap();
    let ghost = state.join("tenants/ghost/volume.img");
    sparse_ext4(&ghost);
    let ghost_dev = losetup(&["--find", "--show", ghost.to_str().unwrap()]);
    std::fs::remove_file(&ghost).unwrap();
    // A run directory and trash of tenants long gone.
    std::fs::create_dir_all(state.join("run/999999")).unwrap();
    std::fs::create_dir_all(state.join("tenants/.trash/old-1/data")).unwrap();
    // A damaged record: that tenant is quarantined, nothing of it is touched.
    let damaged = state.join("tenants/damaged");
    std::fs::create_dir_all(damaged.join("data")).unwrap();
    std::fs::write(damaged.join("tenant.json"), b"{\"name\": \"damag").unwrap();
    std::fs::write(damaged.join("initialized"), b"").unwrap();
    // A cgroup of no directory of this agent's (another agent's, under the same parent).
    let foreign = cluster.tenant_cgroup_handle("n1", "foreign");
    foreign.create().unwrap();
    // The unrecorded tenant's cgroup, with a process in it.
    let cgroup = cluster.tenant_cgroup_handle("n1", "orphan");
    cgroup.create().unwrap();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    let sleeper_pid = i32::try_from(sleeper.id()).unwrap();
    for procs in cgroup.procs_files() {
        std::fs::write(&procs, sleeper_pid.to_string()).unwrap();
    }

    cluster.start_agent(0);
    let log = wait_until(Duration::from_secs(30), "the sweep's summary", || {
        let log = cluster.agent_log(0);
        // The second start's (the log file carries both runs).
        (log.matches("swept the host at start").count() == 2).then_some(log)
    });
    let swept = log.rsplit("engines offered").next().unwrap().to_string();
    assert!(
        swept.contains("sweep: unmounted what no tenant owns"),
        "{swept}"
    );
    assert!(
        swept.contains("sweep: detached a loop device no tenant owns"),
        "{swept}"
    );
    assert!(
        swept.contains("sweep: removed a cgroup no tenant owns"),
        "{swept}"
    );
    // A device whose filesystem was still being let go (a lazy unmount) detaches itself when
    // the last reference goes: moments later.
    wait_until(
        Duration::from_secs(20),
        "the swept loop devices to go",
        || (!attached(&orphan_dev) && !attached(&ghost_dev)).then_some(()),
    );
    assert!(!orphan.exists());
    // While a quarantined tenant's uid is unknown, no run directory is taken for a leftover.
    assert!(state.join("run/999999").exists());
    assert!(!state.join("tenants/.trash/old-1").exists());
    // The process in the stray cgroup was killed and the cgroup removed.
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "{status}");
    assert!(!cgroup.display_path().exists());
    assert!(
        foreign.display_path().exists(),
        "another agent's cgroup was removed"
    );
    foreign.delete().unwrap();
    assert!(damaged.join("tenant.json").exists() && damaged.join("data").exists());
    assert!(swept.contains("tenant record unreadable"), "{swept}");

    // The tenant with a record was left alone and adopted.
    assert_eq!(cluster.engine_pid(0, "keeper"), pid);
    let password = t["credentials"]["password"].as_str().unwrap();
    let endpoint = t["endpoint"].as_str().unwrap();
    wait_until(Duration::from_secs(30), "the kept tenant to answer", || {
        (redis_cli(endpoint, password, &["PING"]).ok()? == "PONG").then_some(())
    });
    assert!(swept.contains("adopted running engine"), "{swept}");
}

//! Storage as a hard limit: each tenant's data directory is its own sparse ext4 volume on a loop
//! device. Filling it gets ENOSPC in that tenant only, the host gives up no more than the
//! tenant's size, the engine still serves reads, and the neighbour writes on.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use dormant_tests::{psql, require_root, wait_until, Cluster};

fn host_free_bytes(path: &std::path::Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks_available() * s.fragment_size()
}

#[test]
fn filling_the_volume_gets_enospc_in_that_tenant_only() {
    if !require_root("filling_the_volume_gets_enospc_in_that_tenant_only") {
        return;
    }
    let mut cluster = Cluster::start("t90");
    cluster.add_agent("n1");
    const SIZE: u64 = 128 << 20;
    let full = cluster.create_tenant("full", "0.5", "256MiB", "128MiB")["credentials"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    let calm = cluster.create_tenant("calm", "0.25", "256MiB", "256MiB")["credentials"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    psql(
        &full,
        "CREATE TABLE kept(v text); INSERT INTO kept VALUES ('still here')",
    )
    .unwrap();

    // The data directory is an ext4 mount of its own, on a sparse image.
    let tenant_dir = cluster.agents[0].state_dir.join("tenants/full");
    let data = tenant_dir.join("data").display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(data.as_str()))
        .unwrap_or_else(|| panic!("{data} is not a mount point"));
    assert!(line.contains(" - ext4 /dev/loop"), "{line}");
    assert!(
        line.contains("nosuid") && line.contains("nodev") && line.contains("noexec"),
        "{line}"
    );
    let image = tenant_dir.join("volume.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), SIZE);

    let free_before = host_free_bytes(cluster.dir());
    // A process of the tenant (its superuser can run programs) writes until the disk is full.
    let out = psql(
        &full,
        "CREATE TEMP TABLE o(l text); \
         COPY o FROM PROGRAM 'dd if=/dev/zero of=fill bs=1M 2>&1; echo exit=$?'; \
         SELECT string_agg(l, ' ') FROM o",
    )
    .expect("the fill itself runs");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.contains("exit=1"), "{out}");

    // The host gave up at most the tenant's size (the image is sparse and capped).
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(allocated <= SIZE, "image holds {allocated} bytes of {SIZE}");
    let dropped = free_before.saturating_sub(host_free_bytes(cluster.dir()));
    assert!(
        dropped <= SIZE + (64 << 20),
        "host free space dropped by {dropped} bytes for a {SIZE}-byte tenant"
    );

    // Reads still work on the full tenant; the neighbour writes on.
    assert_eq!(psql(&full, "SELECT v FROM kept").unwrap(), "still here");
    psql(
        &calm,
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g",
    )
    .unwrap();
    assert_eq!(psql(&calm, "SELECT count(*) FROM t").unwrap(), "10000");

    // Used bytes are reported (ext4 keeps some of the image for its journal and inode tables).
    let t = wait_until(Duration::from_secs(20), "storage use in tenant get", || {
        let t = cluster.tenant("full");
        (t["usage"]["storage_used_bytes"].as_u64().unwrap_or(0) > SIZE * 3 / 4).then_some(t)
    });
    assert!(
        t["usage"]["storage_used_bytes"].as_u64().unwrap() <= SIZE,
        "{t}"
    );

    // Freeing space makes writes work again.
    psql(
        &full,
        "CREATE TEMP TABLE o(l text); COPY o FROM PROGRAM 'rm -f fill; echo removed'",
    )
    .unwrap();
    psql(&full, "INSERT INTO kept VALUES ('after')").unwrap();

    // Delete removes the mount, the loop device and the image.
    assert!(cluster.ctl(&["tenant", "delete", "full"]).success);
    wait_until(Duration::from_secs(20), "the volume to go", || {
        (!image.exists()).then_some(())
    });
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&data), "still mounted");
    let losetup = std::process::Command::new("losetup")
        .arg("--list")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&losetup.stdout).contains(&image.display().to_string()),
        "loop device still attached"
    );
}

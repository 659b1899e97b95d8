//! The end-to-end harness: runs the real `dormant-scheduler`, `dormant-agent` and `dormantctl`
//! binaries as child processes, each test with its own state directory, ports and cgroup parent.
//! Guards own everything a test starts and clean it up in `Drop`, also when the test fails:
//! processes by PID (kill, then wait), tenant engines by the PIDs in the test's cgroups, cgroup
//! directories, mounts and loop devices (`cleanup`), temporary directories. A whole run leaves
//! the host as it found it; `scripts/host-leftovers` checks that around the suite.

pub mod cleanup;
pub mod cluster;
pub mod notify;
pub mod old_build;
pub mod process;
pub mod replicas;
pub mod session;
pub mod sim_node;
pub mod tls;
pub mod wait;

pub use cluster::{Cluster, ClusterOptions, CtlOutput};
pub use replicas::Replicas;
pub use session::PsqlSession;
pub use sim_node::{SimNode, SimNodeSpec};
pub use tls::Security;
pub use wait::wait_until;

/// Which cgroup layout this host (or the v2 VM) runs; tests assert on the files of that layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// From how `/sys/fs/cgroup` is mounted, independently of the agent's own detection code.
    pub fn of_host() -> Self {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
        match statfs(cluster::CGROUP_ROOT) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Self::V2,
            _ => Self::V1,
        }
    }

    /// As `node list` shows the driver.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// Whether the test can run: needs root. Under `CI=true` a missing root fails the test instead of
/// skipping it.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root (cgroups, tenant users) and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// Runs `psql` (a real PostgreSQL client) against `uri`; returns its trimmed output or stderr.
pub fn psql(uri: &str, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", uri, "-c", sql])
        .env("PGCONNECT_TIMEOUT", crate::wait::client_connect_timeout())
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Runs `script` with `/bin/sh` inside a PostgreSQL tenant, as the tenant's engine would run a
/// program (its superuser's `COPY ... FROM PROGRAM`): in its cgroup, its namespaces, as its uid.
/// Returns the script's output (stdout; redirect stderr into it where it matters).
pub fn run_in_postgres_tenant(uri: &str, script: &str) -> Result<String, String> {
    let sql = format!(
        "CREATE TEMP TABLE out(line text); \
         COPY out FROM PROGRAM '{}'; \
         SELECT string_agg(line, E'\\n') FROM out",
        script.replace('\'', "''")
    );
    psql(uri, &sql)
}

/// `redis-cli` against an endpoint `host:port` with a password; returns trimmed stdout, or the
/// server's error (redis-cli exits 0 for those) or stderr.
pub fn redis_cli(endpoint: &str, password: &str, args: &[&str]) -> Result<String, String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("{endpoint:?} is not host:port"))?;
    redis_cli_with(&["-h", host, "-p", port, "-a", password], args)
}

/// `redis-cli -u URI` (user and password from the URI, as a tenant's credentials give them).
pub fn redis_cli_uri(uri: &str, args: &[&str]) -> Result<String, String> {
    redis_cli_with(&["-u", uri], args)
}

fn redis_cli_with(target: &[&str], args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("redis-cli")
        .arg("--no-auth-warning")
        .args(target)
        .args(args)
        .output()
        .map_err(|e| format!("run redis-cli: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !stdout.contains("ERR") && !stdout.contains("NOAUTH") {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

//! A Dormant cluster of real processes for one test: a scheduler replica and agents on this host.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cleanup::{remove_cgroup_subtree, remove_mounts_and_loops};
use crate::process::ProcGuard;
use crate::tls::Security;
use crate::wait::wait_until;
use crate::CgroupVersion;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where each test's scheduler and agents keep their state.
pub const TEST_ROOT: &str = "/var/lib/dormant-test";

/// The first component of every test's cgroup parent, in every hierarchy.
pub const CGROUP_TOP: &str = "dormant-test";

/// Where cargo put the workspace's binaries: the test binary lives in `target/<profile>/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    for bin in ["dormant-scheduler", "dormant-agent", "dormantctl"] {
        assert!(
            dir.join(bin).exists(),
            "{} missing: build the binaries first (cargo build --workspace --bins)",
            dir.join(bin).display()
        );
    }
    dir
}

/// A port free right now (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind port 0")
}

/// A range of `n` consecutive ports that are all free right now.
pub fn free_port_range(n: u16) -> (u16, u16) {
    for _ in 0..200 {
        // Below the kernel's ephemeral range (32768-60999 by default): a client's outgoing
        // connection from another test must not take a tenant's port.
        let start = 10000 + (rand_u16() % 22000);
        let end = start + n - 1;
        let free = (start..=end).all(|p| TcpListener::bind(("0.0.0.0", p)).is_ok());
        if free {
            return (start, end);
        }
    }
    panic!("no free port range of {n}");
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((nanos ^ std::process::id().wrapping_mul(2654435761)) % 65521) as u16
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Heartbeat interval of agents.
    pub heartbeat_ms: u64,
    /// Extra flags for `dormant-scheduler`.
    pub scheduler_flags: Vec<String>,
    /// Plaintext gRPC (`--insecure`) instead of mutual TLS from the cluster's own CA: only for
    /// an agent binary that cannot speak TLS (the upgrade test's older build).
    pub insecure: bool,
    /// Agents serve tenants' plaintext clients too (`--tenant-plaintext`; with TLS on, tenant
    /// endpoints otherwise take TLS clients only). Most tests use plaintext clients.
    pub tenant_plaintext: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heartbeat_ms: 500,
            scheduler_flags: Vec::new(),
            insecure: false,
            tenant_plaintext: true,
        }
    }
}

#[derive(Debug)]
pub struct Agent {
    pub node_id: String,
    /// The `dormant-agent` binary `start_agent` runs: this workspace's, or another build (an
    /// older commit's, for upgrade tests). Changing it between a kill and a start upgrades the
    /// agent in place.
    pub bin: PathBuf,
    pub state_dir: PathBuf,
    pub ports: (u16, u16),
    pub proc: Option<ProcGuard>,
    args: Vec<String>,
    /// Extra environment for the agent's next start (`FAILPOINTS` in the crash tests).
    pub env: Vec<(String, String)>,
    log: PathBuf,
}

/// `tenant create NAME --engine E --cpu C --memory M --storage S -o json`, for `dormantctl`.
pub fn create_args<'a>(
    name: &'a str,
    engine: &'a str,
    [cpu, memory, storage]: [&'a str; 3],
) -> Vec<&'a str> {
    vec![
        "tenant",
        "create",
        name,
        "--engine",
        engine,
        "--cpu",
        cpu,
        "--memory",
        memory,
        "--storage",
        storage,
        "-o",
        "json",
    ]
}

/// Runs `dormantctl --scheduler <urls> ARGS` from `bins`, as the harness's operator.
pub fn run_ctl(bins: &Path, security: &Security, urls: &str, args: &[&str]) -> CtlOutput {
    let out = Command::new(bins.join("dormantctl"))
        .arg("--scheduler")
        .arg(urls)
        .args(security.operator_args())
        .args(args)
        .output()
        .expect("run dormantctl");
    CtlOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug)]
pub struct CtlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "dormantctl output is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Field order matters for Drop: processes first, then cgroups, then the directory.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub scheduler: Option<ProcGuard>,
    scheduler_args: Vec<String>,
    /// Extra environment for the scheduler's next start (`NOTIFY_SOCKET` in the systemd tests).
    pub scheduler_env: Vec<(String, String)>,
    pub url: String,
    pub cgroup_parent: PathBuf,
    /// The cluster's CA and certificates (or plaintext).
    pub security: Security,
    bins: PathBuf,
    opts: ClusterOptions,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts one bootstrapped scheduler replica and waits until it leads.
    pub fn start(test: &str) -> Self {
        Self::start_with(test, ClusterOptions::default())
    }

    pub fn start_with(test: &str, opts: ClusterOptions) -> Self {
        let bins = bin_dir();
        // Short paths: tenants' Unix sockets live under the state dir. Not /tmp or /var/tmp: every
        // tenant gets private ones, so the agent refuses a state dir there.
        std::fs::create_dir_all(TEST_ROOT).expect("create test root");
        let dir = tempfile::Builder::new()
            .prefix("dt-")
            .tempdir_in(TEST_ROOT)
            .expect("tempdir");
        let port = free_port();
        let security = if opts.insecure {
            Security::Insecure
        } else {
            Security::tls_in(&dir.path().join("tls"))
        };
        let url = security.url(&format!("127.0.0.1:{port}"));
        let unique = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("x")
            .to_lowercase();
        let cgroup_parent = PathBuf::from(CGROUP_TOP).join(format!("{test}-{unique}"));
        let mut scheduler_args = vec![
            "--id".into(),
            "1".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            dir.path().join("scheduler").display().to_string(),
            "--bootstrap".into(),
        ];
        scheduler_args.extend(security.replica_args(1));
        scheduler_args.extend(opts.scheduler_flags.iter().cloned());
        let mut cluster = Self {
            agents: Vec::new(),
            scheduler: None,
            scheduler_args,
            scheduler_env: Vec::new(),
            url,
            cgroup_parent,
            security,
            bins,
            opts,
            dir,
        };
        cluster.start_scheduler();
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// This workspace's build of `name` (`dormant-agent`, `dormant-scheduler`, `dormantctl`).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    pub fn start_scheduler(&mut self) {
        self.spawn_scheduler();
        wait_until(Duration::from_secs(30), "the scheduler to lead", || {
            let out = self.ctl(&["cluster", "status", "-o", "json"]);
            (out.success && out.json()["leader_id"] == 1).then_some(())
        });
    }

    /// Starts the scheduler without waiting for it.
    pub fn spawn_scheduler(&mut self) {
        let log = self.dir.path().join("scheduler.log");
        self.scheduler = Some(ProcGuard::spawn_with_env(
            &self.bins.join("dormant-scheduler"),
            &self.scheduler_args,
            &log,
            &self.scheduler_env,
        ));
    }

    pub fn kill_scheduler(&mut self) {
        if let Some(mut s) = self.scheduler.take() {
            s.kill();
        }
    }

    /// Adds an agent with its own state dir and port range; waits until its node is ready.
    pub fn add_agent(&mut self, node_id: &str) -> usize {
        self.add_agent_with(node_id, &[])
    }

    fn agent_args(&self, node_id: &str, state_dir: &Path, ports: (u16, u16)) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--scheduler".into(),
            self.url.clone(),
            "--node-id".into(),
            node_id.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--listen-host".into(),
            "127.0.0.1".into(),
            "--ports".into(),
            format!("{}-{}", ports.0, ports.1),
            "--heartbeat-interval-ms".into(),
            self.opts.heartbeat_ms.to_string(),
            "--cgroup-parent".into(),
            self.cgroup_parent.join(node_id).display().to_string(),
        ];
        args.extend(self.security.node_args(node_id));
        // Only with TLS on: without a certificate plaintext is all there is (and the upgrade
        // test's older agent knows no such flag).
        if self.opts.tenant_plaintext && self.security.pki().is_some() {
            args.push("--tenant-plaintext".into());
        }
        args
    }

    /// The cluster CA's certificate (PEM), which clients of tenant endpoints verify against.
    pub fn ca_file(&self) -> PathBuf {
        self.security
            .pki()
            .map(|p| p.dir().join("ca.pem"))
            .expect("a TLS cluster")
    }

    /// Starts an agent that is expected to refuse to start; returns its exit status and log.
    pub fn agent_refusing_to_start(
        &self,
        node_id: &str,
        extra: &[&str],
    ) -> (std::process::ExitStatus, String) {
        let state_dir = self.dir.path().join(format!("agent-{node_id}"));
        let mut args = self.agent_args(node_id, &state_dir, free_port_range(2));
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = self.dir.path().join(format!("agent-{node_id}.log"));
        // An agent that starts after all (the test fails) starts a listener keeper too: it goes
        // with the test, after the agent (declared first, dropped last).
        struct KeeperGuard<'a>(&'a Path);
        impl Drop for KeeperGuard<'_> {
            fn drop(&mut self) {
                stop_keeper(self.0);
            }
        }
        let _keeper = KeeperGuard(&state_dir);
        let mut agent = ProcGuard::spawn_with_env(
            &self.bins.join("dormant-agent"),
            &args,
            &log,
            &self.security.agent_env(),
        );
        let status = wait_until(Duration::from_secs(30), "the agent to exit", || {
            agent.try_wait()
        });
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// `add_agent` with extra flags for `dormant-agent`.
    pub fn add_agent_with(&mut self, node_id: &str, extra: &[&str]) -> usize {
        let bin = self.bin("dormant-agent");
        self.add_agent_from(node_id, &bin, extra)
    }

    /// `add_agent_with`, running the agent binary `bin` (another build than this workspace's,
    /// given the same flags: an older build must accept them).
    pub fn add_agent_from(&mut self, node_id: &str, bin: &Path, extra: &[&str]) -> usize {
        let i = self.add_agent_unstarted(node_id, bin, extra);
        self.start_agent(i);
        i
    }

    /// An agent as `add_agent_from` makes it, not started yet: set its `env`, then
    /// `start_agent` (or `spawn_agent`, which does not wait).
    pub fn add_agent_unstarted(&mut self, node_id: &str, bin: &Path, extra: &[&str]) -> usize {
        let state_dir = self.dir.path().join(format!("agent-{node_id}"));
        let ports = free_port_range(10);
        let mut args = self.agent_args(node_id, &state_dir, ports);
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = self.dir.path().join(format!("agent-{node_id}.log"));
        self.agents.push(Agent {
            node_id: node_id.into(),
            bin: bin.to_path_buf(),
            state_dir,
            ports,
            proc: None,
            args,
            env: Vec::new(),
            log,
        });
        self.agents.len() - 1
    }

    /// Starts agent `i` and waits until its node is ready.
    pub fn start_agent(&mut self, i: usize) {
        self.spawn_agent(i);
        let node_id = self.agents[i].node_id.clone();
        wait_until(Duration::from_secs(30), "the node to be ready", || {
            // An agent that refused to start fails the test now, with its reason.
            if let Some(status) = self.agents[i].proc.as_mut().and_then(ProcGuard::try_wait) {
                panic!(
                    "dormant-agent {node_id} exited at start ({status}):\n{}",
                    std::fs::read_to_string(&self.agents[i].log).unwrap_or_default()
                );
            }
            let nodes = self.ctl_json(&["node", "list"]);
            nodes
                .as_array()?
                .iter()
                .any(|n| n["id"] == node_id.as_str() && n["status"] == "ready")
                .then_some(())
        });
    }

    /// Starts agent `i` without waiting for it.
    pub fn spawn_agent(&mut self, i: usize) {
        let a = &mut self.agents[i];
        let env: Vec<(String, String)> = self
            .security
            .agent_env()
            .into_iter()
            .chain(a.env.iter().cloned())
            .collect();
        a.proc = Some(ProcGuard::spawn_with_env(&a.bin, &a.args, &a.log, &env));
    }

    /// kill -9 the agent (its tenants keep running, by design).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents[i].proc.take() {
            p.kill();
        }
    }

    /// Waits until agent `i` exits by itself (a crash point killed it); returns how it ended.
    pub fn wait_agent_exit(&mut self, i: usize, timeout: Duration) -> std::process::ExitStatus {
        let status = wait_until(timeout, "the agent to exit", || {
            self.agents[i].proc.as_mut().and_then(ProcGuard::try_wait)
        });
        self.agents[i].proc = None;
        status
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.agents[i].log).unwrap_or_default()
    }

    /// Runs `dormantctl --scheduler <url> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        run_ctl(&self.bins, &self.security, &self.url, args)
    }

    /// Runs a read command with `-o json` and parses it; panics if it fails.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let out = self.ctl(&full);
        assert!(out.success, "dormantctl {args:?} failed: {}", out.stderr);
        out.json()
    }

    /// Creates a tenant and waits for it to run; returns its JSON (with `credentials`).
    /// `dormantctl tenant create NAME --engine E --cpu C --memory M --storage S -o json EXTRA..`,
    /// as it came back (success or not).
    pub fn create(&self, name: &str, engine: &str, sizes: [&str; 3], extra: &[&str]) -> CtlOutput {
        let mut args = create_args(name, engine, sizes);
        args.extend_from_slice(extra);
        // dormantctl's own wait, stretched like every wait of the harness (an initdb under the
        // v2 VM's CPU emulation takes minutes).
        let timeout = format!("{}s", 120 * crate::wait::time_scale());
        if !extra.contains(&"--timeout") {
            args.extend(["--timeout", timeout.as_str()]);
        }
        self.ctl(&args)
    }

    /// Creates a PostgreSQL tenant and waits for it to run; returns its JSON (with `credentials`).
    pub fn create_tenant(&self, name: &str, cpu: &str, memory: &str, storage: &str) -> Value {
        self.create_running(name, "postgres", [cpu, memory, storage])
    }

    /// Creates a tenant of `engine` and waits for it to run; returns its JSON.
    pub fn create_running(&self, name: &str, engine: &str, sizes: [&str; 3]) -> Value {
        let out = self.create(name, engine, sizes, &[]);
        assert!(out.success, "create {name} failed: {}", out.stderr);
        let v = out.json();
        assert_eq!(v["state"], "running", "tenant {name}: {v}");
        v
    }

    pub fn tenant(&self, name: &str) -> Value {
        self.ctl_json(&["tenant", "get", name])
    }

    pub fn wait_tenant_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        wait_until(timeout, &format!("tenant {name} to be {state}"), || {
            let t = self.ctl(&["tenant", "get", name, "-o", "json"]);
            if !t.success {
                return None;
            }
            let v = t.json();
            (v["state"] == state).then_some(v)
        })
    }

    /// The tenant's cgroup directory: for `controller` on v1, the one directory on v2.
    pub fn tenant_cgroup(&self, node_id: &str, tenant: &str, controller: &str) -> PathBuf {
        let root = Path::new(CGROUP_ROOT);
        let base = match CgroupVersion::of_host() {
            CgroupVersion::V1 => root.join(controller),
            CgroupVersion::V2 => root.to_path_buf(),
        };
        base.join(&self.cgroup_parent).join(node_id).join(tenant)
    }

    /// CPU time the tenant's cgroup has used, in µs, from the kernel's own files.
    pub fn kernel_cpu_usec(&self, node_id: &str, tenant: &str) -> u64 {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        match CgroupVersion::of_host() {
            CgroupVersion::V1 => {
                let file = self
                    .tenant_cgroup(node_id, tenant, "cpuacct")
                    .join("cpuacct.usage");
                let ns: u64 = read(file).trim().parse().expect("cpuacct.usage");
                ns / 1000
            }
            CgroupVersion::V2 => {
                let stat = read(self.tenant_cgroup(node_id, tenant, "").join("cpu.stat"));
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no usage_usec in {stat}"))
            }
        }
    }

    /// The cgroup of `tenant` on `node_id` as the agent's driver sees it, for calling the agent's
    /// own cgroup code (freeze, thaw) from a test.
    pub fn tenant_cgroup_handle(
        &self,
        node_id: &str,
        tenant: &str,
    ) -> Box<dyn dormant_agent::cgroup::TenantCgroup> {
        use dormant_agent::cgroup::{v1::V1Driver, v2::V2Driver, CgroupDriver};
        let root = Path::new(CGROUP_ROOT);
        let parent = self.cgroup_parent.join(node_id);
        let name = dormant_common::TenantName::parse(tenant).expect("tenant name");
        match CgroupVersion::of_host() {
            CgroupVersion::V1 => V1Driver::new(root, &parent)
                .expect("v1 driver")
                .tenant(&name),
            // The parent exists and has its controllers already; the test process is not on its
            // path, so preparing again changes nothing.
            CgroupVersion::V2 => V2Driver::new(root, &parent)
                .expect("v2 driver")
                .tenant(&name),
        }
    }

    /// The tenant's engine PID as its pid file says now; `None` while there is none (the agent
    /// removes the previous engine's before it starts the next).
    pub fn engine_pid_now(&self, agent: usize, tenant: &str) -> Option<i32> {
        let path = self.agents[agent]
            .state_dir
            .join("tenants")
            .join(tenant)
            .join("engine.pid");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Reads the tenant's engine PID from the agent's state directory.
    pub fn engine_pid(&self, agent: usize, tenant: &str) -> i32 {
        let path = self.agents[agent]
            .state_dir
            .join("tenants")
            .join(tenant)
            .join("engine.pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// Ends the agent's listener keeper for `state_dir` through its socket, and by its pid if it
/// does not go. Nothing to do when none runs.
pub fn stop_keeper(state_dir: &Path) {
    let sock = state_dir.join("keeper/keeper.sock");
    let Ok(mut keeper) = dormant_agent::keeper::KeeperClient::connect(&sock) else {
        return;
    };
    let pid = keeper.pid().ok();
    let _ = keeper.exit();
    if let Some(pid) = pid {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while crate::process::pid_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if crate::process::pid_alive(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut p) = a.proc.take() {
                p.kill();
            }
            // The listener keeper outlives agents by design (it keeps tenant ports open).
            stop_keeper(&a.state_dir);
        }
        self.kill_scheduler();
        // Tenant engines outlive agents by design: kill them by the PIDs in the test's cgroups.
        // Then nothing of the test runs any more, and its volumes can go.
        let mut left = remove_cgroup_subtree(Path::new(CGROUP_ROOT), &self.cgroup_parent);
        left.extend(remove_mounts_and_loops(self.dir.path()));
        // Reported, not panicked on (a panic in drop while unwinding aborts): the suite's
        // before/after check (scripts/host-leftovers) fails the run; this says which test it was.
        for item in &left {
            eprintln!(
                "LEFT BEHIND by the test in {}: {item}",
                self.dir.path().display()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "test failed; logs under {} follow",
                self.dir.path().display()
            );
            for entry in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = entry.path();
                if p.extension().and_then(|e| e.to_str()) == Some("log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("--- {} (last 40 lines)", p.display());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/host-leftovers` looks where the harness puts things; it is a shell script, so it
    /// states the places again, and this keeps the two in step.
    #[test]
    fn host_leftovers_looks_where_the_harness_puts_things() {
        let script = include_str!("../../scripts/host-leftovers");
        assert!(
            script.contains(&format!("\ntest_root={TEST_ROOT}\n")),
            "scripts/host-leftovers: test_root is not {TEST_ROOT}"
        );
        assert!(
            script.contains(&format!("\ncgroup_top={CGROUP_TOP}\n")),
            "scripts/host-leftovers: cgroup_top is not {CGROUP_TOP}"
        );
        assert!(
            script.contains(&format!("\ncgroup_root={CGROUP_ROOT}\n")),
            "scripts/host-leftovers: cgroup_root is not {CGROUP_ROOT}"
        );
    }
}

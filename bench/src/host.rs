//! A real single-host Dormant: one `dormant-scheduler` replica and one `dormant-agent` (root:
//! cgroups, namespaces, loop devices) with a state directory and a cgroup parent of the bench's
//! own, and the tenants the agent benchmarks create on it through `dormantctl`.
//!
//! Tenant engines, their cgroups, volumes and the agent's listener keeper outlive the agent by
//! design, so killing the agent's PID is not enough: the run's [`Guard`] also stops the keeper,
//! kills what is left in the run's cgroups and removes them, and unmounts the volumes and detaches
//! their loop devices, with the test harness's own clean-up code (whatever the way out of the
//! run).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use dormant_tests::CgroupVersion;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::procs::{free_port_range, Guard, ProcId};

/// Where every cgroup hierarchy is mounted on the hosts the agent runs on.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The first component of every bench run's cgroup parent (the tests use `dormant-test`).
pub const CGROUP_TOP: &str = "dormant-bench";

/// The node id of the bench's one agent.
pub const NODE_ID: &str = "bench-1";

/// How long a tenant may take to reach a state the bench waits for.
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Flags of the benchmarks that run an agent.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Where dormant-scheduler, dormant-agent and dormantctl are (default: this executable's
    /// directory).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// State and logs of the run (default: /var/lib/dormant-bench/run-<random>). Must not exist or
    /// be empty; removed at the end unless --keep. Not under /tmp: the agent refuses it there.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the work dir (the agent's log, tenants' logs) after the run. Cgroups, mounts, loop
    /// devices and processes are removed all the same.
    #[arg(long)]
    pub keep: bool,
    /// The agent's heartbeat interval: hibernate requests reach the agent with its next heartbeat.
    #[arg(long, default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl HostArgs {
    pub fn bin_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.bin_dir {
            Some(d) => Ok(d.clone()),
            None => {
                let exe = std::env::current_exe().context("current exe")?;
                exe.parent()
                    .map(PathBuf::from)
                    .context("current exe has no directory")
            }
        }
    }
}

/// The 1, 5 and 15 minute load averages, for the report: the numbers mean little on a host that
/// was busy with something else.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The scheduler, the agent, and where the agent keeps things.
#[derive(Debug)]
pub struct Host {
    pub cluster: Cluster,
    pub agent: ProcId,
    pub agent_log: PathBuf,
    pub state_dir: PathBuf,
    /// Below each hierarchy's root: `dormant-bench/<run>`.
    pub cgroup_parent: PathBuf,
}

/// `tenant credentials NAME -o json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// The part of `tenant get NAME -o json` the benches read.
#[derive(Debug, Clone)]
pub struct TenantView {
    pub uid: u64,
    pub state: String,
    pub endpoint: Option<String>,
    pub wakes: u64,
    pub last_wake_usec: Option<u64>,
}

impl TenantView {
    fn of(v: &Value) -> anyhow::Result<Self> {
        Ok(Self {
            uid: v["uid"]
                .as_u64()
                .with_context(|| format!("tenant JSON without uid: {v}"))?,
            state: v["state"].as_str().unwrap_or_default().to_string(),
            endpoint: v["endpoint"].as_str().map(str::to_string),
            wakes: v["usage"]["wakes"].as_u64().unwrap_or(0),
            last_wake_usec: v["usage"]["last_wake_usec"].as_u64(),
        })
    }
}

/// What `create_tenant` asks for.
#[derive(Debug, Clone)]
pub struct TenantSpec<'a> {
    pub name: &'a str,
    pub engine: &'a str,
    pub cpu: &'a str,
    pub memory: &'a str,
    pub storage: &'a str,
    /// `stop` or `freeze`.
    pub hibernate: &'a str,
}

impl Host {
    /// Starts one scheduler replica and the agent, and waits until the node is ready. Everything
    /// the agent leaves on the host is undone by `guard`.
    pub async fn start(guard: &mut Guard, args: &HostArgs) -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the agent benchmarks need root (cgroups, namespaces, loop devices)");
        }
        let bin_dir = args.bin_dir()?;
        let agent_bin = bin_dir.join("dormant-agent");
        if !agent_bin.is_file() {
            bail!(
                "{} missing: build it first (cargo build --release --bins) or pass --bin-dir",
                agent_bin.display()
            );
        }
        let run_name = guard
            .dir()
            .file_name()
            .and_then(|n| n.to_str())
            .context("work dir has no name")?
            .to_string();
        let cgroup_parent = PathBuf::from(CGROUP_TOP).join(&run_name);
        let state_dir = guard.dir().join("agent");
        // Registered before anything runs: a failure from here on still cleans up. Runs after
        // the guard has killed the agent and the scheduler, so nothing recreates what it removes.
        {
            let (state_dir, parent, work_dir) = (
                state_dir.clone(),
                cgroup_parent.clone(),
                guard.dir().to_path_buf(),
            );
            guard.on_cleanup(Box::new(move || {
                // The keeper holds the tenant ports for the next agent; there is none.
                dormant_tests::cluster::stop_keeper(&state_dir);
                let mut left =
                    dormant_tests::cleanup::remove_cgroup_subtree(Path::new(CGROUP_ROOT), &parent);
                left.extend(dormant_tests::cleanup::remove_mounts_and_loops(&work_dir));
                for item in left {
                    eprintln!("LEFT BEHIND by the bench: {item}");
                }
            }));
        }

        let cluster = Cluster::start(guard, &bin_dir, 1).await?;
        let url = cluster.replica(1)?.url.clone();
        let ports = free_port_range(10)?;
        let agent_args = vec![
            "--scheduler".into(),
            url,
            "--node-id".into(),
            NODE_ID.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--listen-host".into(),
            "127.0.0.1".into(),
            "--ports".into(),
            format!("{}-{}", ports.0, ports.1),
            "--heartbeat-interval-ms".into(),
            args.heartbeat_ms.to_string(),
            "--cgroup-parent".into(),
            cgroup_parent.display().to_string(),
            // Benches compare plaintext and TLS clients on the same tenant.
            "--tenant-plaintext".into(),
        ];
        let agent_args: Vec<String> = agent_args
            .into_iter()
            .chain(cluster.security.node_args(NODE_ID))
            .collect();
        let agent = guard.spawn("agent", &agent_bin, &agent_args)?;
        let host = Self {
            cluster,
            agent,
            agent_log: guard.dir().join("agent.log"),
            state_dir,
            cgroup_parent,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        eprintln!("waiting for the agent's node to be ready");
        loop {
            guard.check_running()?;
            let nodes = host.ctl_json(&["node", "list"]).await?;
            let ready = nodes.as_array().into_iter().flatten().any(|n| {
                n["id"].as_str() == Some(NODE_ID) && n["status"].as_str() == Some("ready")
            });
            if ready {
                return Ok(host);
            }
            if Instant::now() > deadline {
                bail!("node {NODE_ID} was not ready within 60s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `dormantctl ARGS` against the replica; fails with its stderr.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let url = self.cluster.replica(1)?.url.clone();
        let (out, err, ok) = self.cluster.ctl_raw(Some(&url), args).await?;
        if !ok {
            bail!(
                "dormantctl {}: {}{}",
                args.join(" "),
                err.trim(),
                out.trim()
            );
        }
        Ok(out)
    }

    /// `dormantctl ARGS -o json`, parsed.
    pub async fn ctl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let out = self.ctl(&full).await?;
        serde_json::from_str(&out).with_context(|| format!("dormantctl {args:?}: not JSON: {out}"))
    }

    /// Creates a tenant that never hibernates by itself (the bench hibernates it when it wants)
    /// and waits until it runs.
    pub async fn create_tenant(&self, t: &TenantSpec<'_>) -> anyhow::Result<TenantView> {
        eprintln!("creating {} tenant {}", t.engine, t.name);
        let v = self
            .ctl_json(&[
                "tenant",
                "create",
                t.name,
                "--engine",
                t.engine,
                "--cpu",
                t.cpu,
                "--memory",
                t.memory,
                "--storage",
                t.storage,
                "--idle-after",
                "never",
                "--hibernate",
                t.hibernate,
                "--timeout",
                "300s",
            ])
            .await?;
        let view = TenantView::of(&v)?;
        if view.state != "running" {
            bail!("tenant {} is {} after create: {v}", t.name, view.state);
        }
        Ok(view)
    }

    /// Deletes a tenant and waits until it is gone, freeing its reservation for the next one.
    pub async fn delete_tenant(&self, name: &str) -> anyhow::Result<()> {
        self.ctl(&["tenant", "delete", name]).await.map(|_| ())
    }

    pub async fn tenant(&self, name: &str) -> anyhow::Result<TenantView> {
        TenantView::of(&self.ctl_json(&["tenant", "get", name]).await?)
    }

    pub async fn credentials(&self, name: &str) -> anyhow::Result<Credentials> {
        let v = self.ctl_json(&["tenant", "credentials", name]).await?;
        serde_json::from_value(v.clone()).with_context(|| format!("credentials JSON: {v}"))
    }

    /// Polls `tenant get` until `pred` holds, failing after a while or when the agent dies.
    pub async fn wait_tenant(
        &self,
        guard: &mut Guard,
        name: &str,
        what: &str,
        pred: impl Fn(&TenantView) -> bool,
    ) -> anyhow::Result<TenantView> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            guard.check_running()?;
            let t = self.tenant(name).await?;
            if pred(&t) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("tenant {name} not {what} within {STATE_TIMEOUT:?}: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Hibernates `name` and waits until the agent has finished: reported `hibernated`, and in
    /// its cgroup no process left (stop) or every process frozen (freeze). A wake measured any
    /// earlier would find the engine still running.
    pub async fn hibernate(
        &self,
        guard: &mut Guard,
        name: &str,
        freeze: bool,
    ) -> anyhow::Result<()> {
        self.ctl(&["tenant", "hibernate", name]).await?;
        self.wait_tenant(guard, name, "hibernated", |t| t.state == "hibernated")
            .await?;
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let done = if freeze {
                self.frozen(name)
            } else {
                self.engine_pids(name).is_empty()
            };
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "tenant {name} reported hibernated, but its cgroup is not {} after \
                     {STATE_TIMEOUT:?}: processes {:?}",
                    if freeze { "frozen" } else { "empty" },
                    self.engine_pids(name)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The tenant's cgroup directories: one per v1 hierarchy the agent uses, or the v2 one.
    fn tenant_cgroups(&self, name: &str) -> Vec<PathBuf> {
        let root = Path::new(CGROUP_ROOT);
        match CgroupVersion::of_host() {
            CgroupVersion::V1 => dormant_tests::process::V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(&self.cgroup_parent).join(name))
                .collect(),
            CgroupVersion::V2 => vec![root.join(&self.cgroup_parent).join(name)],
        }
    }

    /// Every process in the tenant's cgroups now.
    pub fn engine_pids(&self, name: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .tenant_cgroups(name)
            .iter()
            .flat_map(|d| dormant_tests::process::pids_under(d))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Whether the kernel says the tenant's cgroup is frozen (not merely freezing).
    pub fn frozen(&self, name: &str) -> bool {
        let root = Path::new(CGROUP_ROOT);
        match CgroupVersion::of_host() {
            CgroupVersion::V1 => {
                let f = root
                    .join("freezer")
                    .join(&self.cgroup_parent)
                    .join(name)
                    .join("freezer.state");
                std::fs::read_to_string(f).is_ok_and(|s| s.trim() == "FROZEN")
            }
            CgroupVersion::V2 => {
                let f = root
                    .join(&self.cgroup_parent)
                    .join(name)
                    .join("cgroup.events");
                std::fs::read_to_string(f).is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1"))
            }
        }
    }

    /// The directory of the tenant's engine socket: `<state dir>/run/<uid>`.
    pub fn run_dir(&self, uid: u64) -> PathBuf {
        self.state_dir.join("run").join(uid.to_string())
    }

    /// `took_ms` of every `tenant woke` line the agent logged for `name`, in order.
    pub fn logged_wakes(&self, name: &str) -> Vec<Duration> {
        wakes_in_log(
            &std::fs::read_to_string(&self.agent_log).unwrap_or_default(),
            name,
        )
    }
}

fn wakes_in_log(text: &str, name: &str) -> Vec<Duration> {
    text.lines()
        // The supervisor's span: `tenant{tenant_id=NAME uid=N}`.
        .filter(|l| l.contains("tenant woke") && l.contains(&format!("tenant_id={name} ")))
        .filter_map(|l| {
            let v = l.split("took_ms=").nth(1)?.split_whitespace().next()?;
            let ms: f64 = v.parse().ok()?;
            Some(Duration::from_secs_f64(ms / 1e3))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_are_read_from_the_agent_log_by_tenant() {
        let log = "\
2026-11-30T14:00:55.209171Z  INFO tenant{tenant_id=wake-pg uid=4}: dormant_agent::tenant::supervisor: tenant woke took_ms=34.5
2026-11-30T14:00:55.209171Z  INFO tenant{tenant_id=wake-pg-2 uid=5}: dormant_agent::tenant::supervisor: tenant woke took_ms=99
2026-11-30T14:00:55.361189Z  INFO dormant_agent::reconcile: hibernate requested tenant_id=wake-pg generation=33
2026-11-30T14:00:56.209171Z  INFO tenant{tenant_id=wake-pg uid=4}: dormant_agent::tenant::supervisor: tenant woke took_ms=0.25
";
        assert_eq!(
            wakes_in_log(log, "wake-pg"),
            vec![Duration::from_micros(34_500), Duration::from_micros(250)]
        );
    }
}

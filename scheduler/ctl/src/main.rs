//! `dormantctl`: the operator's command line for a Dormant cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dormant_common::TenantState;
use dormant_ctl::{self as ctl, output, CtlError};
use dormant_proto::v1 as pb;

/// `println!` that ends the process quietly once stdout is closed (`dormantctl ... | head -1`):
/// the reader has what it wanted. Any other write error is reported, with a failure status.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: write to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

#[derive(Debug, Parser)]
#[command(version, about = "Operate a Dormant cluster")]
struct Cli {
    /// Scheduler replicas to talk to, comma-separated; the first that answers is used (any
    /// replica will do: followers forward to the leader).
    #[arg(
        long,
        global = true,
        env = "DORMANT_SCHEDULER",
        default_value = "127.0.0.1:7400"
    )]
    scheduler: String,
    /// The cluster's CA certificate (PEM).
    #[arg(long, global = true, env = "DORMANT_CA")]
    ca: Option<PathBuf>,
    /// Your operator certificate (PEM), URI SAN dormant://operator/<name>.
    #[arg(long, global = true, env = "DORMANT_CERT")]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, env = "DORMANT_KEY")]
    key: Option<PathBuf>,
    /// Plaintext gRPC without certificates, to a scheduler started with --insecure.
    #[arg(
        long,
        global = true,
        env = "DORMANT_INSECURE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    insecure: bool,
    /// Output format of read commands.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Read from the replica answering, without asking the leader: fast, possibly behind.
    #[arg(long, global = true)]
    stale: bool,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Create, inspect and delete tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Inspect the hosts running dormant-agent.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Inspect the scheduler's Raft cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Make certificates: a development CA and replica, node and operator certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Run a single-host cluster (scheduler + agent) for trying Dormant, with mutual TLS.
    Dev {
        /// Directory for all state and logs.
        #[arg(long, default_value = "/var/lib/dormant-dev")]
        dir: PathBuf,
        /// Scheduler gRPC address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// Ports for tenant endpoints, START-END.
        #[arg(long, default_value = "15432-15531")]
        ports: String,
        /// The agent's cgroup subtree (never the production agent's `dormant/tenants`).
        #[arg(long, default_value = "dormant-dev/tenants")]
        cgroup_parent: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCmd {
    /// Create a tenant; prints its connection URI once.
    Create {
        name: String,
        #[arg(long)]
        engine: String,
        /// Cores: 0.5, 2, 250m.
        #[arg(long, allow_hyphen_values = true)]
        cpu: String,
        /// 512MiB, 2GiB.
        #[arg(long, allow_hyphen_values = true)]
        memory: String,
        /// 1GiB, 10GiB.
        #[arg(long, allow_hyphen_values = true)]
        storage: String,
        /// Only on nodes with this label, KEY=VALUE (repeatable).
        #[arg(long = "constraint", value_name = "KEY=VALUE")]
        constraints: Vec<String>,
        /// Hibernate after this long without a connection: 30s, 10m, 1h, or never [default: 10m].
        #[arg(long, value_name = "DUR|never")]
        idle_after: Option<String>,
        /// How to hibernate: stop the engine (memory freed) or freeze it (memory kept, resumes in
        /// milliseconds) [default: stop].
        #[arg(long, value_name = "MODE", value_parser = HIBERNATE_MODES)]
        hibernate: Option<String>,
        /// Return at once instead of waiting until the tenant runs.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the tenant to run.
        #[arg(long, default_value = "120s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// Change a tenant's CPU, memory or storage while it runs (storage only grows, online), or
    /// its hibernation policy.
    Update {
        name: String,
        #[arg(long, allow_hyphen_values = true)]
        cpu: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        memory: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        storage: Option<String>,
        /// Hibernate after this long without a connection: 30s, 10m, 1h, or never.
        #[arg(long, value_name = "DUR|never")]
        idle_after: Option<String>,
        /// How to hibernate: stop or freeze.
        #[arg(long, value_name = "MODE", value_parser = HIBERNATE_MODES)]
        hibernate: Option<String>,
    },
    /// Restart a tenant's engine once, keeping its data (a failed tenant's way back). Its node
    /// restarts the engine when its next heartbeat brings the new restart generation.
    Restart { name: String },
    /// Hibernate a tenant now, as if it were idle (its next client wakes it). Its node acts when
    /// its next heartbeat brings the new hibernate generation.
    Hibernate { name: String },
    /// Wake a hibernated tenant now, as if a client connected.
    Wake { name: String },
    /// Show one tenant.
    Get { name: String },
    /// List all tenants.
    List,
    /// Delete a tenant and all its data.
    Delete {
        name: String,
        /// Return at once instead of waiting until it is gone.
        #[arg(long)]
        no_wait: bool,
        /// For a tenant whose node is down or gone: delete it now (its name, port and
        /// reservation are free at once); if the node returns, its agent removes the data.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "120s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// Show a tenant's connection URI and credentials again.
    Credentials { name: String },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Write ca.pem/ca.key (made once, reused after) and, for each identity asked, NAME.pem and
    /// NAME.key (replica-ID, node-ID, operator-NAME) into DIR; files 0600, DIR 0700.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A replica certificate (server and client), dormant://replica/ID (repeatable).
        #[arg(long = "replica", value_name = "ID")]
        replicas: Vec<u64>,
        /// A node certificate, dormant://node/NODE-ID (repeatable).
        #[arg(long = "node", value_name = "NODE-ID")]
        nodes: Vec<String>,
        /// An operator certificate, dormant://operator/NAME (repeatable).
        #[arg(long = "operator", value_name = "NAME")]
        operators: Vec<String>,
        /// A DNS name or IP address the replicas are dialled at (repeatable).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List nodes with capacity and allocation.
    List,
    /// Place nothing new on a node; its tenants keep running.
    Cordon { id: String },
    /// Allow new placements on a node again.
    Uncordon { id: String },
    /// Forget a node that is gone for good. Refused while it is ready or holds tenants.
    Remove {
        id: String,
        /// Remove it anyway, deleting its tenants as `tenant delete --force` does.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Leader, term, indexes, members with their roles and lag.
    Status,
    /// Add a replica (started without --bootstrap, empty data dir) as a learner; waits until it
    /// has caught up.
    AddLearner {
        /// Its --id: never used by any replica before.
        id: u64,
        /// host:port the other replicas reach it at.
        address: String,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a learner or a voter (never the last voter).
    Remove { id: u64 },
}

/// `--hibernate`'s values; the scheduler parses them again (`dormant_common::hibernation`).
const HIBERNATE_MODES: [&str; 2] = ["stop", "freeze"];

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 2m or 500ms"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?} must be a positive duration"));
    }
    match Duration::try_from_secs_f64(v * mult) {
        Ok(d) if d <= LONGEST_WAIT => Ok(d),
        _ => Err(format!(
            "{s:?} is longer than the longest wait, {}s (a day)",
            LONGEST_WAIT.as_secs()
        )),
    }
}

/// The longest `--timeout` taken: waiting longer than a day for a tenant is a mistake.
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

fn print_json(v: &serde_json::Value) {
    out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    let json = cli.output == Output::Json;
    if let Top::Dev {
        dir,
        listen,
        ports,
        cgroup_parent,
    } = cli.command
    {
        return ctl::dev::run(ctl::dev::DevOptions {
            dir,
            listen,
            ports,
            cgroup_parent,
        })
        .await;
    }
    if let Top::Certs(CertsCmd::Init {
        dir,
        replicas,
        nodes,
        operators,
        hosts,
    }) = &cli.command
    {
        for f in ctl::certs::init(dir, replicas, nodes, operators, hosts)? {
            out!("{}", f.display());
        }
        return Ok(());
    }
    let transport = ctl::transport(cli.insecure, cli.ca, cli.cert, cli.key)?;
    let mut replicas = ctl::Replicas::connect(&cli.scheduler, transport).await?;
    let stale = cli.stale;
    match cli.command {
        Top::Dev { .. } | Top::Certs(_) => unreachable!("handled above"),
        Top::Tenant(TenantCmd::Create {
            name,
            engine,
            cpu,
            memory,
            storage,
            constraints,
            idle_after,
            hibernate,
            no_wait,
            timeout,
        }) => {
            let req = pb::CreateTenantRequest {
                name: name.clone(),
                engine,
                cpu,
                memory,
                storage,
                constraints,
                // Empty: the scheduler's defaults.
                idle_after: idle_after.unwrap_or_default(),
                hibernate: hibernate.unwrap_or_default(),
            };
            let created = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.create_tenant(r).await }
                })
                .await?;
            let creds = created.credentials.unwrap_or_default();
            let mut tenant = created.tenant.unwrap_or_default();
            if !no_wait && tenant.typed_state() != Ok(TenantState::Pending) {
                // A tenant with a short idle_after may have hibernated already: it ran.
                let done = |r: Result<&pb::Tenant, &tonic::Status>| {
                    matches!(
                        r.map(pb::Tenant::typed_state),
                        Ok(Ok(TenantState::Running
                            | TenantState::Hibernated
                            | TenantState::Waking
                            | TenantState::Failed
                            | TenantState::Pending))
                    )
                };
                if let Some(t) = ctl::wait_for_tenant(
                    &mut replicas.client(),
                    &name,
                    timeout,
                    "the tenant to run",
                    done,
                )
                .await?
                {
                    tenant = t;
                }
            }
            if json {
                let mut v = output::tenant_json(&tenant);
                v["credentials"] = output::credentials_json(&creds);
                print_json(&v);
            } else {
                out!("{}", output::tenants_table(std::slice::from_ref(&tenant)));
                if creds.uri.is_empty() {
                    out!(
                        "\npassword: {} (no endpoint yet: {})",
                        creds.password,
                        tenant.reason
                    );
                } else {
                    out!("\nconnect: {}", creds.uri);
                }
            }
            if tenant.typed_state() == Ok(TenantState::Failed) {
                return Err(CtlError::Other(format!(
                    "tenant {name} failed: {}",
                    tenant.reason
                )));
            }
        }
        Top::Tenant(TenantCmd::Get { name }) => {
            let req = pb::GetTenantRequest { name, stale };
            let t = replicas
                .call(true, |mut c| {
                    let r = req.clone();
                    async move { c.get_tenant(r).await }
                })
                .await?;
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                out!("{}", output::tenant_detail(&t));
            }
        }
        Top::Tenant(TenantCmd::List) => {
            let list = replicas
                .call(true, |mut c| async move {
                    c.list_tenants(pb::ListTenantsRequest { stale }).await
                })
                .await?;
            if json {
                let v: Vec<_> = list.tenants.iter().map(output::tenant_json).collect();
                print_json(&serde_json::Value::Array(v));
            } else {
                out!("{}", output::tenants_table(&list.tenants));
            }
        }
        Top::Tenant(TenantCmd::Update {
            name,
            cpu,
            memory,
            storage,
            idle_after,
            hibernate,
        }) => {
            // Empty: unchanged.
            let req = pb::UpdateTenantRequest {
                name,
                cpu: cpu.unwrap_or_default(),
                memory: memory.unwrap_or_default(),
                storage: storage.unwrap_or_default(),
                idle_after: idle_after.unwrap_or_default(),
                hibernate: hibernate.unwrap_or_default(),
            };
            let t = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.update_tenant(r).await }
                })
                .await?;
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                out!("{}", output::tenants_table(&[t]));
                out!("\n(the tenant's node applies the change with its next heartbeat)");
            }
        }
        Top::Tenant(TenantCmd::Delete {
            name,
            no_wait,
            force,
            timeout,
        }) => {
            let req = pb::DeleteTenantRequest {
                name: name.clone(),
                force,
            };
            // Resent only when nothing was proposed: a delete that may have been applied is not
            // sent again (it could remove a tenant created again under the same name).
            let t = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.delete_tenant(r).await }
                })
                .await?;
            if !no_wait && !t.removed {
                let gone = |r: Result<&pb::Tenant, &tonic::Status>| matches!(r, Err(s) if s.code() == tonic::Code::NotFound);
                ctl::wait_for_tenant(
                    &mut replicas.client(),
                    &name,
                    timeout,
                    "the tenant to be deleted",
                    gone,
                )
                .await?;
            }
            if json {
                print_json(&serde_json::json!({"name": name, "deleted": !no_wait}));
            } else if no_wait {
                out!("tenant {name} is being deleted");
            } else {
                out!("tenant {name} deleted");
            }
        }
        Top::Tenant(TenantCmd::Restart { name }) => {
            let req = pb::RestartTenantRequest { name };
            // Resent only when nothing was proposed: each restart that is applied restarts the
            // engine once more.
            let t = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.restart_tenant(r).await }
                })
                .await?;
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                out!("{}", output::tenants_table(std::slice::from_ref(&t)));
                out!(
                    "\nrestart generation {}: the tenant's node restarts its engine with its next \
                     heartbeat",
                    t.restart_generation
                );
            }
        }
        Top::Tenant(TenantCmd::Hibernate { name }) => {
            let req = pb::HibernateTenantRequest { name };
            // Resent only when nothing was proposed, as restart: each one applied asks again.
            let t = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.hibernate_tenant(r).await }
                })
                .await?;
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                out!("{}", output::tenants_table(std::slice::from_ref(&t)));
                out!(
                    "\nhibernate generation {}: the tenant's node hibernates it with its next \
                     heartbeat; its next client wakes it",
                    t.hibernate_generation
                );
            }
        }
        Top::Tenant(TenantCmd::Wake { name }) => {
            let req = pb::WakeTenantRequest { name };
            // Resent only when nothing was proposed, as restart.
            let t = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.wake_tenant(r).await }
                })
                .await?;
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                out!("{}", output::tenants_table(std::slice::from_ref(&t)));
                out!(
                    "\nwake generation {}: the tenant's node wakes it with its next heartbeat",
                    t.wake_generation
                );
            }
        }
        Top::Tenant(TenantCmd::Credentials { name }) => {
            let req = pb::GetCredentialsRequest { name };
            let c = replicas
                .call(true, |mut c| {
                    let r = req.clone();
                    async move { c.get_credentials(r).await }
                })
                .await?;
            if json {
                print_json(&output::credentials_json(&c));
            } else if c.uri.is_empty() {
                out!(
                    "user: {}\npassword: {}\n(no endpoint yet)",
                    c.user,
                    c.password
                );
            } else {
                out!("{}", c.uri);
            }
        }
        Top::Node(NodeCmd::List) => {
            let list = replicas
                .call(true, |mut c| async move {
                    c.list_nodes(pb::ListNodesRequest { stale }).await
                })
                .await?;
            if json {
                let v: Vec<_> = list.nodes.iter().map(output::node_json).collect();
                print_json(&serde_json::Value::Array(v));
            } else {
                out!("{}", output::nodes_table(&list.nodes));
            }
        }
        Top::Node(NodeCmd::Remove { id, force }) => {
            let req = pb::RemoveNodeRequest {
                id: id.clone(),
                force,
            };
            // Not resent once it may have been applied: the second would find no such node.
            let removed = replicas
                .call(false, |mut c| {
                    let r = req.clone();
                    async move { c.remove_node(r).await }
                })
                .await?;
            if json {
                print_json(&serde_json::json!({
                    "id": id,
                    "removed": true,
                    "deleted_tenants": removed.deleted_tenants,
                }));
            } else if removed.deleted_tenants.is_empty() {
                out!("node {id} removed");
            } else {
                out!(
                    "node {id} removed with its tenants: {}",
                    removed.deleted_tenants.join(", ")
                );
            }
        }
        Top::Node(cmd @ (NodeCmd::Cordon { .. } | NodeCmd::Uncordon { .. })) => {
            let (id, cordoned) = match cmd {
                NodeCmd::Cordon { id } => (id, true),
                NodeCmd::Uncordon { id } => (id, false),
                NodeCmd::List | NodeCmd::Remove { .. } => unreachable!("matched above"),
            };
            let req = pb::SetNodeCordonRequest { id, cordoned };
            let node = replicas
                .call(true, |mut c| {
                    let r = req.clone();
                    async move { c.set_node_cordon(r).await }
                })
                .await?;
            if json {
                print_json(&output::node_json(&node));
            } else {
                out!("{}", output::nodes_table(&[node]));
            }
        }
        Top::Cluster(cmd) => {
            let reply = match cmd {
                ClusterCmd::Status => {
                    replicas
                        .call(true, |mut c| async move {
                            c.cluster_status(pb::ClusterStatusRequest { stale }).await
                        })
                        .await?
                }
                // Membership changes retry only while no leader could take them.
                ClusterCmd::AddLearner { id, address } => {
                    let req = pb::AddLearnerRequest { id, address };
                    replicas
                        .call(false, |mut c| {
                            let r = req.clone();
                            async move { c.add_learner(r).await }
                        })
                        .await?
                }
                ClusterCmd::Promote { id } => {
                    replicas
                        .call(false, |mut c| async move {
                            c.promote_member(pb::PromoteMemberRequest { id }).await
                        })
                        .await?
                }
                ClusterCmd::Remove { id } => {
                    replicas
                        .call(false, |mut c| async move {
                            c.remove_member(pb::RemoveMemberRequest { id }).await
                        })
                        .await?
                }
            };
            let s = reply;
            let cluster_id = (!s.cluster_id.is_empty()).then_some(s.cluster_id.as_str());
            if json {
                print_json(&output::cluster_json(&s, cluster_id));
            } else {
                out!("{}", output::cluster_table(&s, cluster_id));
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_absurd_ones_are_refused_without_a_panic() {
        assert_eq!(humantime_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(humantime_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(humantime_duration("500ms"), Ok(Duration::from_millis(500)));
        for absurd in ["1e20s", "1e300m", "86401s"] {
            let err = humantime_duration(absurd).unwrap_err();
            assert!(err.contains("longest wait, 86400s"), "{absurd}: {err}");
        }
        for bad in ["-1s", "NaNs", "infs", "soon"] {
            assert!(humantime_duration(bad).is_err(), "{bad}");
        }
    }
}

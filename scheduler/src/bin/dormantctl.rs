//! `dormantctl`: the operator's command line for a Dormant cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dormant_proto::v1 as pb;
use dormant_scheduler::ctl::{self, output, CtlError};

#[derive(Debug, Parser)]
#[command(version, about = "Operate a Dormant cluster")]
struct Cli {
    /// Scheduler to talk to (any replica).
    #[arg(
        long,
        global = true,
        env = "DORMANT_SCHEDULER",
        default_value = "http://127.0.0.1:7400"
    )]
    scheduler: String,
    /// Output format of read commands.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
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
    /// Run a single-host cluster (scheduler + agent) for trying Dormant.
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
        /// Return at once instead of waiting until the tenant runs.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the tenant to run.
        #[arg(long, default_value = "120s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// Change a tenant's CPU, memory or storage while it runs (storage only grows, online).
    Update {
        name: String,
        #[arg(long, allow_hyphen_values = true)]
        cpu: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        memory: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        storage: Option<String>,
    },
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
        #[arg(long, default_value = "120s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// Show a tenant's connection URI and credentials again.
    Credentials { name: String },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List nodes with capacity and allocation.
    List,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Leader, term, indexes, members.
    Status,
}

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
    Ok(Duration::from_secs_f64(v * mult))
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    let json = cli.output == Output::Json;
    if let Top::Dev { dir, listen, ports } = cli.command {
        return ctl::dev::run(ctl::dev::DevOptions { dir, listen, ports }).await;
    }
    let mut client = ctl::connect(&cli.scheduler).await?;
    match cli.command {
        Top::Dev { .. } => unreachable!("handled above"),
        Top::Tenant(TenantCmd::Create {
            name,
            engine,
            cpu,
            memory,
            storage,
            no_wait,
            timeout,
        }) => {
            let created = client
                .create_tenant(pb::CreateTenantRequest {
                    name: name.clone(),
                    engine,
                    cpu,
                    memory,
                    storage,
                })
                .await?
                .into_inner();
            let creds = created.credentials.unwrap_or_default();
            let mut tenant = created.tenant.unwrap_or_default();
            if !no_wait && tenant.state != "pending" {
                let done = |r: Result<&pb::Tenant, &tonic::Status>| matches!(r, Ok(t) if t.state == "running" || t.state == "failed" || t.state == "pending");
                if let Some(t) =
                    ctl::wait_for_tenant(&mut client, &name, timeout, "the tenant to run", done)
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
                println!("{}", output::tenants_table(std::slice::from_ref(&tenant)));
                if creds.uri.is_empty() {
                    println!(
                        "\npassword: {} (no endpoint yet: {})",
                        creds.password, tenant.reason
                    );
                } else {
                    println!("\nconnect: {}", creds.uri);
                }
            }
            if tenant.state == "failed" {
                return Err(CtlError::Other(format!(
                    "tenant {name} failed: {}",
                    tenant.reason
                )));
            }
        }
        Top::Tenant(TenantCmd::Get { name }) => {
            let t = client
                .get_tenant(pb::GetTenantRequest { name })
                .await?
                .into_inner();
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                println!("{}", output::tenant_detail(&t));
            }
        }
        Top::Tenant(TenantCmd::List) => {
            let list = client
                .list_tenants(pb::ListTenantsRequest {})
                .await?
                .into_inner();
            if json {
                let v: Vec<_> = list.tenants.iter().map(output::tenant_json).collect();
                print_json(&serde_json::Value::Array(v));
            } else {
                println!("{}", output::tenants_table(&list.tenants));
            }
        }
        Top::Tenant(TenantCmd::Update {
            name,
            cpu,
            memory,
            storage,
        }) => {
            let t = client
                .update_tenant(pb::UpdateTenantRequest {
                    name,
                    cpu: cpu.unwrap_or_default(),
                    memory: memory.unwrap_or_default(),
                    storage: storage.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(&output::tenant_json(&t));
            } else {
                println!("{}", output::tenants_table(&[t]));
                println!("\n(the tenant's node applies the change with its next heartbeat)");
            }
        }
        Top::Tenant(TenantCmd::Delete {
            name,
            no_wait,
            timeout,
        }) => {
            let t = client
                .delete_tenant(pb::DeleteTenantRequest { name: name.clone() })
                .await?
                .into_inner();
            if !no_wait && t.state != "deleted" {
                let gone = |r: Result<&pb::Tenant, &tonic::Status>| matches!(r, Err(s) if s.code() == tonic::Code::NotFound);
                ctl::wait_for_tenant(
                    &mut client,
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
                println!("tenant {name} is being deleted");
            } else {
                println!("tenant {name} deleted");
            }
        }
        Top::Tenant(TenantCmd::Credentials { name }) => {
            let c = client
                .get_credentials(pb::GetCredentialsRequest { name })
                .await?
                .into_inner();
            if json {
                print_json(&output::credentials_json(&c));
            } else if c.uri.is_empty() {
                println!(
                    "user: {}\npassword: {}\n(no endpoint yet)",
                    c.user, c.password
                );
            } else {
                println!("{}", c.uri);
            }
        }
        Top::Node(NodeCmd::List) => {
            let list = client
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner();
            if json {
                let v: Vec<_> = list.nodes.iter().map(output::node_json).collect();
                print_json(&serde_json::Value::Array(v));
            } else {
                println!("{}", output::nodes_table(&list.nodes));
            }
        }
        Top::Cluster(ClusterCmd::Status) => {
            let s = client
                .cluster_status(pb::ClusterStatusRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&output::cluster_json(&s));
            } else {
                println!("{}", output::cluster_table(&s));
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

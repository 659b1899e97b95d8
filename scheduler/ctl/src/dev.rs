//! `dormantctl dev`: a working single-host cluster on the embedded defaults, for someone trying
//! Dormant. Starts `dormant-scheduler` and `dormant-agent` (found beside `dormantctl`) as child
//! processes with all state under one directory, prints how to connect, and stops both on Ctrl-C.
//! Mutual TLS as everywhere: a development CA and the certificates of replica 1, node `dev` and
//! operator `admin` under `<dir>/tls` (made at the first start, reused after).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dormant_common::tls::{dev_ca, PeerIdentity, Transport};
use dormant_common::NodeName;
use dormant_proto::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::CtlError;

pub struct DevOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub ports: String,
    pub cgroup_parent: PathBuf,
}

fn sibling(name: &str) -> Result<PathBuf, CtlError> {
    let exe = std::env::current_exe().map_err(|e| CtlError::Other(format!("current exe: {e}")))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(CtlError::Other(format!(
            "{} not found beside {}; build the workspace first (cargo build --release)",
            name,
            exe.display()
        )))
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, CtlError> {
    let file = std::fs::File::create(log)
        .map_err(|e| CtlError::Other(format!("create {}: {e}", log.display())))?;
    let err_file = file
        .try_clone()
        .map_err(|e| CtlError::Other(format!("log {}: {e}", log.display())))?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| CtlError::Other(format!("start {}: {e}", bin.display())))
}

async fn stop(child: &mut Child, what: &str) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        eprintln!("{what} did not stop within 30 s; killing it");
        let _ = child.kill().await;
    }
}

pub async fn run(opts: DevOptions) -> Result<(), CtlError> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| CtlError::Other(format!("create {}: {e}", dir.display())))?;
    let scheduler_bin = sibling("dormant-scheduler")?;
    let agent_bin = sibling("dormant-agent")?;
    let tls_dir = dir.join("tls");
    let replica = dev_ca::files_in(&tls_dir, &PeerIdentity::Replica(1));
    let node_id = NodeName::parse("dev").map_err(|e| CtlError::Other(e.to_string()))?;
    let node = dev_ca::files_in(&tls_dir, &PeerIdentity::Node(node_id));
    let operator = dev_ca::files_in(&tls_dir, &PeerIdentity::Operator("admin".into()));
    let complete = [&replica, &node, &operator]
        .iter()
        .all(|f| f.ca.exists() && f.cert.exists() && f.key.exists());
    if !complete {
        let mut hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        if let Some((host, _)) = opts.listen.rsplit_once(':') {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if !hosts.iter().any(|h| h == host) {
                hosts.push(host.to_string());
            }
        }
        super::certs::init(&tls_dir, &[1], &["dev".into()], &["admin".into()], &hosts)?;
    }
    let operator_transport = Transport::new(Some(&operator))?;
    let url = operator_transport.url(&opts.listen)?;

    let mut scheduler = spawn(
        &scheduler_bin,
        &[
            "--id".into(),
            "1".into(),
            "--listen".into(),
            opts.listen.clone(),
            "--data-dir".into(),
            dir.join("scheduler").display().to_string(),
            "--bootstrap".into(),
        ]
        .into_iter()
        .chain(replica.flags())
        .collect::<Vec<_>>(),
        &dir.join("scheduler.log"),
    )?;
    let mut agent = spawn(
        &agent_bin,
        &[
            "--scheduler".into(),
            url.clone(),
            "--node-id".into(),
            "dev".into(),
            "--state-dir".into(),
            dir.join("agent").display().to_string(),
            // Its own cgroup subtree: never the production agent's `dormant/tenants`.
            "--cgroup-parent".into(),
            opts.cgroup_parent.display().to_string(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--ports".into(),
            opts.ports.clone(),
            "--stop-tenants-on-exit".into(),
        ]
        .into_iter()
        .chain(node.flags())
        .collect::<Vec<_>>(),
        &dir.join("agent.log"),
    )?;

    let ready = wait_for_node(&url, &operator_transport, &mut scheduler, &mut agent).await;
    if let Err(e) = ready {
        stop(&mut agent, "dormant-agent").await;
        stop(&mut scheduler, "dormant-scheduler").await;
        return Err(CtlError::Other(format!(
            "{e}; see {} and {}",
            dir.join("scheduler.log").display(),
            dir.join("agent.log").display()
        )));
    }

    println!(
        "Dormant is running: one scheduler and one agent, state under {}",
        dir.display()
    );
    println!(
        "Logs: {}/scheduler.log, {}/agent.log",
        dir.display(),
        dir.display()
    );
    println!();
    let ctl = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "dormantctl".into());
    println!("In another terminal:");
    println!("  export DORMANT_SCHEDULER={url}");
    println!("  export DORMANT_CA={}", operator.ca.display());
    println!("  export DORMANT_CERT={}", operator.cert.display());
    println!("  export DORMANT_KEY={}", operator.key.display());
    println!(
        "  {ctl} tenant create acme --engine postgres --cpu 0.5 --memory 512MiB --storage 1GiB"
    );
    println!("  psql \"$({ctl} tenant credentials acme)\"");
    println!("  {ctl} tenant delete acme");
    println!();
    println!("Press Ctrl-C to stop (tenants stop too; their data stays for the next start).");

    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = scheduler.wait() => eprintln!("dormant-scheduler exited; stopping"),
        _ = agent.wait() => eprintln!("dormant-agent exited; stopping"),
    }
    stop(&mut agent, "dormant-agent").await;
    stop(&mut scheduler, "dormant-scheduler").await;
    Ok(())
}

async fn wait_for_node(
    url: &str,
    transport: &Transport,
    scheduler: &mut Child,
    agent: &mut Child,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = scheduler.try_wait() {
            return Err(format!("dormant-scheduler exited at start ({status})"));
        }
        if let Ok(Some(status)) = agent.try_wait() {
            return Err(format!("dormant-agent exited at start ({status})"));
        }
        if let Ok(mut client) = super::connect(url, transport).await {
            if let Ok(nodes) = client.list_nodes(pb::ListNodesRequest::default()).await {
                let ready =
                    |n: &pb::Node| n.typed_status() == Ok(dormant_common::NodeStatus::Ready);
                if nodes.into_inner().nodes.iter().any(ready) {
                    return Ok(());
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("the node did not become ready within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

//! Mutual TLS and identities on every gRPC service: calls without a certificate are refused and
//! logged (operator API, agent registration and heartbeat, Raft); a node certificate speaks only
//! for its own node, at the leader and at a follower (which checks before forwarding), and reads
//! no other node's tenants' secrets; certificates of another CA are refused at the handshake, a
//! replica's included. Needs no root (simulated nodes, no agents).

use std::time::Duration;

use dormant_common::tls::PeerIdentity;
use dormant_proto::v1 as pb;
use dormant_proto::v1::agent_api_client::AgentApiClient;
use dormant_proto::v1::operator_client::OperatorClient;
use dormant_proto::v1::raft_client::RaftClient;
use dormant_tests::cluster::{bin_dir, free_port, run_ctl};
use dormant_tests::process::ProcGuard;
use dormant_tests::sim_node::{heartbeat_via, heartbeat_with, register_via, registration};
use dormant_tests::tls::endpoint_with;
use dormant_tests::{wait_until, Replicas, Security, SimNode, SimNodeSpec};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn heartbeat(node_id: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        node_id: node_id.into(),
        usage: Some(pb::NodeUsage::default()),
        ..Default::default()
    }
}

/// Waits until replica `i`'s log has a line with every one of `parts`; returns it.
fn logged(set: &Replicas, i: usize, parts: &[&str]) -> String {
    wait_until(
        Duration::from_secs(10),
        &format!("replica {i} to log {parts:?}"),
        || {
            set.log(i)
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_string)
        },
    )
}

fn node_ids(set: &Replicas) -> Vec<String> {
    let out = set.ctl(&["node", "list", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    out.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn t160_calls_without_a_certificate_are_refused_and_logged() {
    let set = Replicas::start(1, &[]);
    let url = set.url(0);
    let ca = set.security.pki().unwrap().ca_pem().to_string();
    let anonymous = endpoint_with(&url, &ca, None);
    let spec = SimNodeSpec::new("a", 1000, 1024, 10);
    let (operator, register, beat, raft) = block_on(async {
        let ch = anonymous.connect_lazy();
        (
            OperatorClient::new(ch.clone())
                .list_tenants(pb::ListTenantsRequest::default())
                .await,
            AgentApiClient::new(ch.clone())
                .register(registration(&spec))
                .await,
            AgentApiClient::new(ch.clone())
                .heartbeat(heartbeat("a"))
                .await,
            RaftClient::new(ch)
                .vote(pb::RaftPayload {
                    payload: b"{}".to_vec(),
                })
                .await,
        )
    });
    for (what, code) in [
        ("operator call", operator.map(|_| ()).unwrap_err().code()),
        ("registration", register.map(|_| ()).unwrap_err().code()),
        ("heartbeat", beat.map(|_| ()).unwrap_err().code()),
        ("Raft vote", raft.map(|_| ()).unwrap_err().code()),
    ] {
        assert_eq!(code, tonic::Code::Unauthenticated, "{what}");
    }
    for api in ["operator API", "agent API", "Raft"] {
        let line = logged(
            &set,
            0,
            &["refused: no client certificate", &format!("api=\"{api}\"")],
        );
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        assert!(
            line.contains("identity=\"none\"") || line.contains("identity=none"),
            "{line}"
        );
    }
    // Nothing was recorded for the node.
    assert!(node_ids(&set).is_empty());

    // dormantctl without a certificate does not even try; with --insecure it gets no answer.
    let out = std::process::Command::new(bin_dir().join("dormantctl"))
        .args(["--scheduler", &url, "tenant", "list"])
        .env_remove("DORMANT_CA")
        .env_remove("DORMANT_CERT")
        .env_remove("DORMANT_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ca: required for TLS"), "{stderr}");
    let plain = run_ctl(
        &bin_dir(),
        &Security::Insecure,
        &format!(
            "127.0.0.1:{}",
            set.replicas[0].addr.rsplit(':').next().unwrap()
        ),
        &["tenant", "list"],
    );
    assert!(!plain.success, "{}", plain.stdout);
    logged(
        &set,
        0,
        &["refused: TLS handshake failed", "peer=127.0.0.1:"],
    );
}

#[test]
fn t161_a_node_certificate_speaks_only_for_its_own_node_and_reads_only_its_secrets() {
    let set = Replicas::start(2, &[]);
    let leader = set.leader();
    let follower = 1 - leader;
    let _a = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("a", 1000, 4096, 100).label("zone", "a"),
    );
    let _b = SimNode::start(
        &set.security,
        &set.urls(),
        SimNodeSpec::new("b", 1000, 4096, 100).label("zone", "b"),
    );
    let mut args =
        dormant_tests::cluster::create_args("tb", "postgres", ["0.25", "256MiB", "1GiB"]);
    args.extend(["--constraint", "zone=b", "--no-wait"]);
    let created = set.ctl(&args);
    assert!(created.success, "{}", created.stderr);
    let t = set.ctl(&["tenant", "get", "tb", "-o", "json"]).json();
    assert_eq!(t["node"], "b", "{t}");
    let creds = set.ctl(&["tenant", "credentials", "tb", "-o", "json"]);
    assert!(creds.success, "{}", creds.stderr);
    let password = creds.json()["password"].as_str().unwrap().to_string();
    assert!(!password.is_empty());

    // b's own heartbeat carries its tenant's password; a's carries nothing of b's.
    let b_answer = heartbeat_with(&set.security, &set.url(leader), "b", Vec::new()).unwrap();
    assert!(b_answer.tenants.iter().any(|t| t.password == password));
    let a_answer = heartbeat_with(&set.security, &set.url(leader), "a", Vec::new()).unwrap();
    assert!(a_answer.tenants.is_empty(), "{a_answer:?}");

    // a's certificate cannot heartbeat or register as b, neither at the leader nor at the
    // follower (which refuses before forwarding).
    let as_a = set.security.node_transport("a");
    for i in [leader, follower] {
        let refused = heartbeat_via(&as_a, &set.url(i), "b", Vec::new()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("dormant://node/a")
                && !refused.message().contains(&password),
            "{}",
            refused.message()
        );
        let refused =
            register_via(&as_a, &set.url(i), &SimNodeSpec::new("b", 1, 1, 1)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        logged(
            &set,
            i,
            &[
                "refused: a node may speak only as itself",
                "identity=dormant://node/a",
                "node_id=b",
                "rpc=\"Heartbeat\"",
            ],
        );
    }
    // b's registration stands as b made it.
    let nodes = set.ctl(&["node", "list", "-o", "json"]).json();
    let b = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "b")
        .unwrap()
        .clone();
    assert_eq!(b["capacity"]["cpu"].as_f64(), Some(1.0), "{b}");

    // A node certificate is no operator: no credentials, no operator call at all.
    let node_files = set.security.pki().unwrap().files(&PeerIdentity::Node(
        dormant_common::NodeName::parse("a").unwrap(),
    ));
    let out = std::process::Command::new(bin_dir().join("dormantctl"))
        .args(["--scheduler", &set.urls(), "tenant", "credentials", "tb"])
        .arg("--ca")
        .arg(&node_files.ca)
        .arg("--cert")
        .arg(&node_files.cert)
        .arg("--key")
        .arg(&node_files.key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dormant://node/a may not call the operator API"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&password));

    // Secrets go to operators, also through a follower (which forwards them with its replica
    // certificate), never to a replica asking for itself.
    let via_follower = set.ctl_at(follower, &["tenant", "credentials", "tb", "-o", "json"]);
    assert!(via_follower.success, "{}", via_follower.stderr);
    assert_eq!(via_follower.json()["password"], password.as_str());
    let as_replica = set.security.transport(&PeerIdentity::Replica(1));
    let refused = block_on(async {
        OperatorClient::new(
            as_replica
                .endpoint(&set.url(leader))
                .unwrap()
                .connect_lazy(),
        )
        .get_credentials(pb::GetCredentialsRequest { name: "tb".into() })
        .await
    })
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    logged(
        &set,
        leader,
        &[
            "refused: only an operator may read tenants' secrets",
            "identity=dormant://replica/1",
        ],
    );

    // A node with a valid certificate that never registered changes nothing.
    let unknown = heartbeat_with(&set.security, &set.url(leader), "c", Vec::new()).unwrap();
    assert!(
        unknown.register_again && unknown.tenants.is_empty(),
        "{unknown:?}"
    );
    let mut ids = node_ids(&set);
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn t162_certificates_of_another_ca_are_refused() {
    let set = Replicas::start(1, &[]);
    let url = set.url(0);
    let ca = set.security.pki().unwrap().ca_pem().to_string();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Security::tls_in(&other_dir.path().join("tls"));
    let other_pki = other.pki().unwrap();

    // A replica's and a node's certificate from another CA (the client trusts this cluster, so
    // only the server's check of the client is tested).
    let replica = endpoint_with(&url, &ca, Some(&other_pki.files(&PeerIdentity::Replica(2))));
    let node = endpoint_with(
        &url,
        &ca,
        Some(&other_pki.files(&PeerIdentity::Node(
            dormant_common::NodeName::parse("a").unwrap(),
        ))),
    );
    let (raft, register) = block_on(async {
        (
            RaftClient::new(replica.connect_lazy())
                .vote(pb::RaftPayload {
                    payload: b"{}".to_vec(),
                })
                .await,
            AgentApiClient::new(node.connect_lazy())
                .register(registration(&SimNodeSpec::new("a", 1000, 1024, 10)))
                .await,
        )
    });
    assert!(raft.is_err(), "{raft:?}");
    assert!(register.is_err(), "{register:?}");
    let line = logged(
        &set,
        0,
        &["refused: TLS handshake failed", "peer=127.0.0.1:"],
    );
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert!(node_ids(&set).is_empty());

    // A real replica of another CA cannot join: the leader does not trust it.
    let addr = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = [
        "--id",
        "2",
        "--listen",
        &addr,
        "--data-dir",
        &other_dir.path().join("s2").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(other.replica_args(2))
    .collect();
    let _foreign = ProcGuard::spawn(
        &bin_dir().join("dormant-scheduler"),
        &args,
        &other_dir.path().join("scheduler-2.log"),
    );
    wait_until(
        Duration::from_secs(30),
        "the foreign replica to listen",
        || std::net::TcpStream::connect(&addr).ok(),
    );
    let out = set.ctl(&["cluster", "add-learner", "2", &addr]);
    assert!(!out.success, "{}", out.stdout);
    assert!(out.stderr.contains("does not answer"), "{}", out.stderr);
    let status = set.ctl(&["cluster", "status", "-o", "json"]).json();
    assert_eq!(status["members"].as_array().unwrap().len(), 1, "{status}");
}

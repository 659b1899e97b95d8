//! Certificates for the harness: each test cluster gets its own development CA
//! (`dormant_common::tls::dev_ca`) under its temporary directory, and every process and
//! in-process client it starts gets a certificate of its own identity from it, made on first
//! use. TLS is the default; `Security::Insecure` is for the one test whose agent (an older
//! commit's build) cannot speak TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dormant_common::tls::dev_ca::{self, DevCa};
use dormant_common::tls::{PeerIdentity, TlsFiles, Transport};
use dormant_common::NodeName;

/// The operator identity of the harness's `dormantctl`.
pub const OPERATOR: &str = "admin";

/// A CA in a directory, issuing certificates on demand.
pub struct TestPki {
    dir: PathBuf,
    ca: DevCa,
    /// Serialises issuing, so two threads never write the same files at once.
    issuing: Mutex<()>,
}

impl TestPki {
    /// A new CA in `dir` (created 0700).
    pub fn new(dir: &Path) -> Self {
        let (ca, _) = dev_ca::init_dir(dir, &dev_ca::Request::default()).expect("make a test CA");
        Self {
            dir: dir.to_path_buf(),
            ca,
            issuing: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// `identity`'s files, issued now if they do not exist yet. Replicas are reached at
    /// 127.0.0.1 and localhost.
    pub fn files(&self, identity: &PeerIdentity) -> TlsFiles {
        let files = dev_ca::files_in(&self.dir, identity);
        let _one = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        if !files.cert.exists() {
            let issued = self
                .ca
                .issue(identity, &["127.0.0.1".into(), "localhost".into()])
                .expect("issue a test certificate");
            dev_ca::write_private(&files.key, &issued.key_pem).expect("write key");
            dev_ca::write_private(&files.cert, &issued.cert_pem).expect("write cert");
        }
        files
    }
}

/// How the processes of a test cluster talk: mutual TLS from the cluster's CA, or plaintext.
#[derive(Clone)]
pub enum Security {
    Tls(Arc<TestPki>),
    Insecure,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls(p) => write!(f, "Tls({})", p.dir.display()),
            Self::Insecure => f.write_str("Insecure"),
        }
    }
}

fn node(id: &str) -> PeerIdentity {
    PeerIdentity::Node(NodeName::parse(id).expect("a valid node id"))
}

impl Security {
    /// TLS with a new CA in `dir`.
    pub fn tls_in(dir: &Path) -> Self {
        Self::Tls(Arc::new(TestPki::new(dir)))
    }

    pub fn pki(&self) -> Option<&TestPki> {
        match self {
            Self::Tls(p) => Some(p),
            Self::Insecure => None,
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Tls(_) => "https",
            Self::Insecure => "http",
        }
    }

    /// `scheme://addr`.
    pub fn url(&self, addr: &str) -> String {
        format!("{}://{addr}", self.scheme())
    }

    /// `dormant-scheduler`'s flags for replica `id`.
    pub fn replica_args(&self, id: u64) -> Vec<String> {
        match self {
            Self::Tls(p) => p.files(&PeerIdentity::Replica(id)).flags(),
            Self::Insecure => vec!["--insecure".into()],
        }
    }

    /// `dormant-agent`'s flags for node `id` (none when insecure: see [`Security::agent_env`]).
    pub fn node_args(&self, id: &str) -> Vec<String> {
        match self {
            Self::Tls(p) => p.files(&node(id)).flags(),
            Self::Insecure => Vec::new(),
        }
    }

    /// `dormant-agent`'s environment: plaintext is asked for with `DORMANT_INSECURE=1` rather
    /// than a flag, because an older agent binary (the upgrade test's) must accept the same
    /// flags, and has no `--insecure`.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        match self {
            Self::Tls(_) => Vec::new(),
            Self::Insecure => vec![("DORMANT_INSECURE".into(), "1".into())],
        }
    }

    /// `dormantctl`'s flags, as operator [`OPERATOR`].
    pub fn operator_args(&self) -> Vec<String> {
        match self {
            Self::Tls(p) => p.files(&PeerIdentity::Operator(OPERATOR.into())).flags(),
            Self::Insecure => vec!["--insecure".into()],
        }
    }

    /// An in-process client's transport, as `identity`.
    pub fn transport(&self, identity: &PeerIdentity) -> Transport {
        match self {
            Self::Tls(p) => {
                Transport::new(Some(&p.files(identity))).expect("load test certificate")
            }
            Self::Insecure => Transport::Insecure,
        }
    }

    /// An in-process client's transport, as node `id`.
    pub fn node_transport(&self, id: &str) -> Transport {
        self.transport(&node(id))
    }
}

/// An endpoint at `url` that trusts `ca_pem` and presents `identity`'s certificate, or none:
/// for tests of what the scheduler refuses (no certificate, one from another CA).
pub fn endpoint_with(
    url: &str,
    ca_pem: &str,
    identity: Option<&TlsFiles>,
) -> tonic::transport::Endpoint {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(f) = identity {
        let cert = std::fs::read(&f.cert).expect("read cert");
        let key = std::fs::read(&f.key).expect("read key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(10))
        .tls_config(tls)
        .expect("tls config")
}

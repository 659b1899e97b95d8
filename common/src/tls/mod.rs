//! Mutual TLS for every gRPC connection: the certificate files a process is given (`--ca`,
//! `--cert`, `--key`, or the same keys in its config file), what they are loaded into, the
//! client side of a connection (`Transport`), the identities certificates carry (`identity`) and
//! a development CA that makes them (`dev_ca`). Plaintext exists only as an explicit
//! `Transport::Insecure` (`--insecure`). The server side (accepting, authorising) is the
//! scheduler's, in `dormant_scheduler::grpc::tls` and `grpc::authz`.

pub mod dev_ca;
pub mod identity;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

pub use identity::{IdentityError, PeerIdentity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: required for TLS (flags --ca, --cert and --key, or keys ca, cert and key in the config file); plaintext gRPC needs an explicit --insecure")]
    Missing(&'static str),
    #[error("--insecure and {0}: plaintext and TLS at once; choose one")]
    InsecureAndTls(&'static str),
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error("{path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("generate a certificate for {what}: {why}")]
    Generate { what: String, why: String },
    #[error("scheduler URL {url:?}: {why}")]
    Url { url: String, why: String },
}

/// How long a client waits for a server to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The three PEM files of a process: the CA that signs every certificate of the cluster, this
/// process's certificate, and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The command-line flags that name these files (`--ca`, `--cert`, `--key`), for a process
    /// started with them.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--ca".into(),
            self.ca.display().to_string(),
            "--cert".into(),
            self.cert.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
        ]
    }

    /// From flags or config keys: all three, or none together with `insecure`. The error names
    /// the missing one, or the conflict.
    pub fn resolve(
        insecure: bool,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        if insecure {
            return match (&ca, &cert, &key) {
                (None, None, None) => Ok(None),
                (Some(_), _, _) => Err(TlsError::InsecureAndTls("ca")),
                (_, Some(_), _) => Err(TlsError::InsecureAndTls("cert")),
                (_, _, Some(_)) => Err(TlsError::InsecureAndTls("key")),
            };
        }
        Ok(Some(Self {
            ca: ca.ok_or(TlsError::Missing("ca"))?,
            cert: cert.ok_or(TlsError::Missing("cert"))?,
            key: key.ok_or(TlsError::Missing("key"))?,
        }))
    }
}

/// The files read, and the identity the certificate carries.
#[derive(Clone)]
pub struct TlsMaterial {
    pub files: TlsFiles,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub identity: PeerIdentity,
}

impl std::fmt::Debug for TlsMaterial {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("files", &self.files)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The DER of the first certificate in a PEM file.
pub fn first_cert_der(pem: &[u8], path: &Path) -> Result<Vec<u8>, TlsError> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .ok_or_else(|| TlsError::NoCertificate {
            path: path.to_path_buf(),
        })
}

impl TlsMaterial {
    /// Reads the three files and the identity of the certificate.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca_pem = read(&files.ca)?;
        first_cert_der(&ca_pem, &files.ca)?;
        let cert_pem = read(&files.cert)?;
        let der = first_cert_der(&cert_pem, &files.cert)?;
        let identity = PeerIdentity::from_cert_der(&der).map_err(|source| TlsError::Identity {
            path: files.cert.clone(),
            source,
        })?;
        let key_pem = read(&files.key)?;
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
            return Err(TlsError::Key {
                path: files.key.clone(),
                why: "no PEM private key in it".into(),
            });
        }
        Ok(Self {
            files: files.clone(),
            ca_pem,
            cert_pem,
            key_pem,
            identity,
        })
    }

    /// Client side: trust only the cluster's CA, present this certificate. A server that takes
    /// the connection but never finishes the handshake (a stopped process) fails it after
    /// [`HANDSHAKE_TIMEOUT`] instead of holding the caller.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// How a process connects to scheduler replicas: mutual TLS with its certificate, or plaintext
/// when it was started with `--insecure`.
#[derive(Debug, Clone)]
pub enum Transport {
    Tls(Arc<TlsMaterial>),
    Insecure,
}

impl Transport {
    /// Loads `files`, or plaintext for `None`.
    pub fn new(files: Option<&TlsFiles>) -> Result<Self, TlsError> {
        Ok(match files {
            Some(f) => Self::Tls(Arc::new(TlsMaterial::load(f)?)),
            None => Self::Insecure,
        })
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Tls(_) => "https",
            Self::Insecure => "http",
        }
    }

    /// This process's own identity (`None` without TLS).
    pub fn identity(&self) -> Option<&PeerIdentity> {
        match self {
            Self::Tls(m) => Some(&m.identity),
            Self::Insecure => None,
        }
    }

    /// `host:port` or a URL, as a URL of this transport's scheme; the other scheme is refused
    /// with the reason.
    pub fn url(&self, given: &str) -> Result<String, TlsError> {
        let given = given.trim();
        let Some((scheme, _)) = given.split_once("://") else {
            return Ok(format!("{}://{given}", self.scheme()));
        };
        match (self, scheme) {
            (Self::Tls(_), "https") | (Self::Insecure, "http") => Ok(given.to_string()),
            (Self::Tls(_), "http") => Err(TlsError::Url {
                url: given.into(),
                why: "plaintext http:// needs --insecure (use https://, or host:port)".into(),
            }),
            (Self::Insecure, "https") => Err(TlsError::Url {
                url: given.into(),
                why: "https:// needs --ca, --cert and --key, not --insecure".into(),
            }),
            (_, other) => Err(TlsError::Url {
                url: given.into(),
                why: format!("unknown scheme {other:?}; use https:// or host:port"),
            }),
        }
    }

    /// An endpoint for `given` (see [`Transport::url`]), with TLS set up when it applies.
    pub fn endpoint(&self, given: &str) -> Result<Endpoint, TlsError> {
        let url = self.url(given)?;
        let bad = |e: tonic::transport::Error| TlsError::Url {
            url: url.clone(),
            why: e.to_string(),
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(3));
        match self {
            Self::Tls(m) => endpoint.tls_config(m.client_config()).map_err(bad),
            Self::Insecure => Ok(endpoint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_needs_all_three_files_or_an_explicit_insecure() {
        let p = |s: &str| Some(PathBuf::from(s));
        let err = TlsFiles::resolve(false, p("ca"), None, p("k")).unwrap_err();
        assert!(
            err.to_string().starts_with("cert: required for TLS"),
            "{err}"
        );
        assert!(err.to_string().contains("--insecure"), "{err}");
        assert_eq!(TlsFiles::resolve(true, None, None, None).unwrap(), None);
        let err = TlsFiles::resolve(true, p("ca"), None, None).unwrap_err();
        assert!(err.to_string().contains("choose one"), "{err}");
        let files = TlsFiles::resolve(false, p("a"), p("b"), p("c"))
            .unwrap()
            .unwrap();
        assert_eq!(files.key, PathBuf::from("c"));
    }

    #[test]
    fn urls_take_the_transport_scheme_and_refuse_the_other() {
        let t = Transport::Insecure;
        assert_eq!(t.url("127.0.0.1:1").unwrap(), "http://127.0.0.1:1");
        assert!(t
            .url("https://x:1")
            .unwrap_err()
            .to_string()
            .contains("--ca"));
        assert_eq!(t.url("http://x:1").unwrap(), "http://x:1");
    }
}

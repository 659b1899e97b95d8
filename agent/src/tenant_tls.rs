//! TLS on tenant endpoints, terminated in the agent's proxy (the engines stay on their Unix
//! sockets and never hold a key): the node's certificate, and telling how a client opens, from
//! its first bytes, on the tenant's one port: PostgreSQL's in-protocol `SSLRequest` (answered
//! `S`, then the handshake), a TLS ClientHello from the first byte (Redis' `--tls`, PostgreSQL 17's
//! direct TLS), or plaintext, which is served only where the operator allows it. PostgreSQL's
//! `CancelRequest` always passes in the clear (libpq sends it so on a connection of its own).
//!
//! A TLS session lives in this process: a graceful agent restart hands plaintext connections
//! over to the next agent, but closes TLS ones (their clients reconnect).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// PostgreSQL's `GSSENCRequest`: length 8, code 80877104.
const PG_GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// The head of PostgreSQL's `CancelRequest`: length 16, code 80877102 (then a pid and a key).
const PG_CANCEL_REQUEST: [u8; 8] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
/// ALPN of PostgreSQL's direct TLS (`sslnegotiation=direct`, PostgreSQL 17).
pub const POSTGRES_ALPN: &[u8] = b"postgresql";
/// The first byte of a TLS record carrying a handshake message (the ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Debug, thiserror::Error)]
pub enum TenantTlsError {
    #[error("tenant_tls_{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("tenant_tls_{what} {path}: {why}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("tenant_tls_cert {cert} and tenant_tls_key {key} do not go together: {why}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
}

/// What the proxy offers a tenant's clients.
#[derive(Clone)]
pub struct TenantTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Plaintext clients are served too (the operator allowed it).
    pub plaintext: bool,
}

impl TenantTls {
    /// The same certificate, offering `alpn` (an engine's protocol name; libpq's direct TLS
    /// insists on `postgresql`). Clients that offer no ALPN are served either way.
    pub fn with_alpn(&self, alpn: &[Vec<u8>]) -> Self {
        if alpn.is_empty() {
            return self.clone();
        }
        let mut config = rustls::ServerConfig::clone(self.acceptor.config());
        config.alpn_protocols = alpn.to_vec();
        Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            plaintext: self.plaintext,
        }
    }
}

impl std::fmt::Debug for TenantTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTls")
            .field("plaintext", &self.plaintext)
            .finish_non_exhaustive()
    }
}

impl TenantTls {
    /// A server certificate chain and its key, PEM; the chain's names must cover the tenants'
    /// endpoints (the node's advertised address) for clients that verify them.
    pub fn load(cert: &Path, key: &Path, plaintext: bool) -> Result<Self, TenantTlsError> {
        let chain = read_pem(cert, "cert", |bytes| {
            CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        })?;
        if chain.is_empty() {
            return Err(TenantTlsError::Pem {
                what: "cert",
                path: cert.to_path_buf(),
                why: "no certificate in the file".into(),
            });
        }
        let private = read_pem(key, "key", |bytes| {
            PrivateKeyDer::from_pem_slice(bytes).map_err(|e| e.to_string())
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
            .map_err(|e| TenantTlsError::Config {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                why: e.to_string(),
            })?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            plaintext,
        })
    }
}

fn read_pem<T>(
    path: &Path,
    what: &'static str,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, TenantTlsError> {
    let bytes = std::fs::read(path).map_err(|source| TenantTlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|why| TenantTlsError::Pem {
        what,
        path: path.to_path_buf(),
        why,
    })
}

/// How a client opened its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// PostgreSQL's `SSLRequest` (8 bytes, still unread).
    PostgresSslRequest,
    /// PostgreSQL's `GSSENCRequest` (8 bytes, still unread): answered `N`, then the client
    /// goes on (with an `SSLRequest`, or in the clear).
    PostgresGssEncRequest,
    /// PostgreSQL's `CancelRequest`: libpq sends it in the clear on a connection of its own,
    /// whatever the session's encryption; it carries only a backend pid and a secret key.
    PostgresCancelRequest,
    /// A TLS handshake from the first byte.
    ClientHello,
    /// Anything else: the engine's own protocol in the clear.
    Plaintext,
}

/// Looks at the client's first bytes (without reading them). `None`: it hung up first. The
/// caller bounds the wait.
pub async fn opening(client: &TcpStream) -> io::Result<Option<Opening>> {
    const HEADS: [(&[u8; 8], Opening); 3] = [
        (&PG_SSL_REQUEST, Opening::PostgresSslRequest),
        (&PG_GSSENC_REQUEST, Opening::PostgresGssEncRequest),
        (&PG_CANCEL_REQUEST, Opening::PostgresCancelRequest),
    ];
    let mut head = [0u8; 8];
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let n = client.peek(&mut head).await?;
        if n == 0 {
            return Ok(None);
        }
        if head[0] == TLS_HANDSHAKE {
            return Ok(Some(Opening::ClientHello));
        }
        if n == head.len() {
            let known = HEADS.iter().find(|(h, _)| **h == head).map(|(_, o)| *o);
            return Ok(Some(known.unwrap_or(Opening::Plaintext)));
        }
        // Only a prefix of one of PostgreSQL's requests so far: wait for the rest (it comes in
        // one packet, but a peek may see part of it). Readiness stays set while bytes wait
        // unread, so the wait is a sleep, growing so a client that stops there costs little.
        if !HEADS.iter().any(|(h, _)| h[..n] == head[..n]) {
            return Ok(Some(Opening::Plaintext));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(200));
    }
}

/// Consumes a `GSSENCRequest` and says no (`N`): the agent offers no GSSAPI encryption.
pub async fn refuse_gssenc_request(client: &mut TcpStream) -> io::Result<()> {
    let mut request = [0u8; 8];
    client.read_exact(&mut request).await?;
    client.write_all(b"N").await
}

/// Consumes the `SSLRequest` and says yes (`S`); the TLS handshake follows.
pub async fn accept_ssl_request(client: &mut TcpStream) -> io::Result<()> {
    let mut request = [0u8; 8];
    client.read_exact(&mut request).await?;
    client.write_all(b"S").await
}

/// A PostgreSQL `ErrorResponse` (FATAL, SQLSTATE 28000) for a client refused before its
/// startup message reached the engine: libpq prints the message.
pub fn postgres_error(message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "28000"),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut out = vec![b'E'];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn openings_are_told_apart_from_the_first_bytes() {
        for (bytes, expected) in [
            (&PG_SSL_REQUEST[..], Some(Opening::PostgresSslRequest)),
            (&[0x16, 0x03, 0x01][..], Some(Opening::ClientHello)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Opening::Plaintext)),
            // A PostgreSQL startup message: length, then protocol 3.0.
            (&[0, 0, 0, 40, 0, 3, 0, 0][..], Some(Opening::Plaintext)),
            (&PG_GSSENC_REQUEST[..], Some(Opening::PostgresGssEncRequest)),
            (
                &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 7, 1, 2, 3, 4][..],
                Some(Opening::PostgresCancelRequest),
            ),
        ] {
            let (mut client, server) = pair().await;
            client.write_all(bytes).await.unwrap();
            assert_eq!(opening(&server).await.unwrap(), expected, "{bytes:?}");
        }
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(opening(&server).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_split_ssl_request_is_waited_for() {
        let (mut client, server) = pair().await;
        client.write_all(&PG_SSL_REQUEST[..3]).await.unwrap();
        let seen = tokio::spawn(async move { opening(&server).await.unwrap() });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(&PG_SSL_REQUEST[3..]).await.unwrap();
        assert_eq!(seen.await.unwrap(), Some(Opening::PostgresSslRequest));
    }

    #[test]
    fn the_error_response_is_a_well_formed_message() {
        let msg = postgres_error("TLS is required");
        assert_eq!(msg[0], b'E');
        let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(len + 1, msg.len());
        assert!(msg.ends_with(b"MTLS is required\0\0"));
    }
}

//! The server side of mutual TLS: accepts TCP connections, runs the TLS handshake (the client's
//! certificate, if it shows one, must chain to the cluster's CA) and hands tonic the streams that
//! passed. A client may connect without a certificate, so that its call is refused by
//! `authz` with a reason it can read and a log line naming it; a certificate from another CA
//! fails the handshake, which is logged here with the peer's address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dormant_common::tls::{first_cert_der, TlsMaterial};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

/// How long a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("{path}: {why}")]
    Pem { path: String, why: String },
    #[error("TLS server configuration: {0}")]
    Config(String),
}

/// The rustls configuration: this replica's certificate, client certificates verified against
/// the CA when shown, HTTP/2 only.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let provider = Arc::new(ring::default_provider());
    let pem_err = |path: &std::path::Path, why: String| ServerTlsError::Pem {
        path: path.display().to_string(),
        why,
    };
    let mut roots = RootCertStore::empty();
    let ca =
        first_cert_der(&m.ca_pem, &m.files.ca).map_err(|e| pem_err(&m.files.ca, e.to_string()))?;
    roots
        .add(CertificateDer::from(ca))
        .map_err(|e| pem_err(&m.files.ca, e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServerTlsError::Config(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&m.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&m.files.cert, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&m.key_pem)
        .map_err(|e| pem_err(&m.files.key, e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerTlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ServerTlsError::Config(format!("{}: {e}", m.files.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS streams of `listener`'s connections, for `Server::serve_with_incoming_shutdown`.
/// Handshakes run concurrently; accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "accept");
                    // Out of descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(stream) = handshake(&acceptor, tcp, peer).await {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // A probe that connected and closed.
            debug!(peer = %peer, "connection closed before the TLS handshake");
            None
        }
        Ok(Err(e)) => {
            warn!(peer = %peer, identity = "none", error = %e, "refused: TLS handshake failed (a certificate not signed by this cluster's CA, or no TLS at all)");
            None
        }
        Err(_) => {
            warn!(peer = %peer, identity = "none", "refused: TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

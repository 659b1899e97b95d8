//! `dormantctl`: the operator's command line over the operator API. Tables for people, `-o json`
//! for scripts; every error names what was wrong. Any replica answers (followers forward to the
//! leader); while a leader is being elected, calls that were certainly not applied are retried.

pub mod certs;
pub mod dev;
pub mod output;

use std::path::PathBuf;
use std::time::Duration;

use dormant_common::tls::{TlsError, TlsFiles, Transport};
use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("--scheduler {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot reach the scheduler at {url}: {why}")]
    Connect { url: String, why: String },
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Other(String),
}

/// dormantctl's certificate files: flags `--ca`, `--cert`, `--key` or the environment
/// (`DORMANT_CA`, `DORMANT_CERT`, `DORMANT_KEY`); plaintext only with `--insecure`
/// (`DORMANT_INSECURE=1`), which warns on stderr.
pub fn transport(
    insecure: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Transport, CtlError> {
    let files = TlsFiles::resolve(insecure, ca, cert, key)?;
    if files.is_none() {
        eprintln!(
            "warning: --insecure: plaintext gRPC without certificates; the scheduler must run \
             with --insecure too"
        );
    }
    Ok(Transport::new(files.as_ref())?)
}

/// How long connecting to one replica (TCP, TLS and HTTP/2 handshakes) may take.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How long calls keep retrying while the cluster has no reachable leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(20);

/// Whether a failed write certainly changed nothing, so sending it again is safe: the replica
/// marked its refusal as made before proposing (`dormant_proto::refusal`), or the call never
/// reached a replica (its connection was refused).
pub fn refused_before_proposing(status: &tonic::Status) -> bool {
    use dormant_proto::refusal::{is_not_proposed, never_sent};
    status.code() == tonic::Code::Unavailable && (is_not_proposed(status) || never_sent(status))
}

/// The scheduler replicas dormantctl was given, and a client for the one in use. A replica that
/// cannot serve (gone, cut off from its majority, no leader known) is left for the next.
pub struct Replicas {
    transport: Transport,
    urls: Vec<String>,
    current: usize,
    client: OperatorClient<Channel>,
}

impl Replicas {
    /// Connects to the first replica in the comma-separated `urls` that answers.
    pub async fn connect(urls: &str, transport: Transport) -> Result<Self, CtlError> {
        let list: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        let mut last = None;
        for (i, url) in list.iter().enumerate() {
            match connect(url, &transport).await {
                Ok(client) => {
                    return Ok(Self {
                        transport,
                        urls: list,
                        current: i,
                        client,
                    })
                }
                Err(e @ CtlError::BadUrl { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| CtlError::BadUrl {
            url: urls.to_string(),
            why: "no address given".into(),
        }))
    }

    pub fn client(&self) -> OperatorClient<Channel> {
        self.client.clone()
    }

    /// Moves to the next replica that answers, if there is another.
    async fn next(&mut self) {
        for step in 1..self.urls.len() {
            let i = (self.current + step) % self.urls.len();
            if let Ok(client) = connect(&self.urls[i], &self.transport).await {
                self.current = i;
                self.client = client;
                return;
            }
        }
    }

    /// Runs `call` until it succeeds, fails for good, or [`LEADER_WAIT`] passes, moving to the
    /// next replica after each `Unavailable`. Reads (`idempotent`) retry on any `Unavailable`;
    /// writes only when nothing was proposed.
    pub async fn call<T, F, Fut>(&mut self, idempotent: bool, mut call: F) -> Result<T, CtlError>
    where
        F: FnMut(OperatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match call(self.client()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(s) => {
                    let retry = if idempotent {
                        s.code() == tonic::Code::Unavailable
                    } else {
                        refused_before_proposing(&s)
                    };
                    if !retry || tokio::time::Instant::now() >= deadline {
                        return Err(s.into());
                    }
                    if s.code() == tonic::Code::Unavailable {
                        self.next().await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

pub async fn connect(
    url: &str,
    transport: &Transport,
) -> Result<OperatorClient<Channel>, CtlError> {
    let endpoint = transport
        .endpoint(url)
        .map_err(|e| CtlError::BadUrl {
            url: url.to_string(),
            why: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let url = endpoint.uri().to_string();
    // tonic's connect timeout covers the TCP connect only: a replica that is stopped (SIGSTOP,
    // hung) accepts the connection in the kernel and never answers the TLS handshake.
    let connecting = tokio::time::timeout(CONNECT_WAIT, endpoint.connect());
    let connected = connecting.await.map_err(|_| CtlError::Connect {
        url: url.clone(),
        why: format!("no answer within {CONNECT_WAIT:?} (accepting but stopped or hung)"),
    })?;
    let channel = connected.map_err(|e| CtlError::Connect {
        url: url.clone(),
        why: root_cause(&e),
    })?;
    Ok(OperatorClient::new(channel))
}

/// The last error of a chain: "Connection refused", or the TLS reason ("invalid peer
/// certificate: UnknownIssuer"), rather than tonic's "transport error".
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = s.to_string();
        source = s.source();
    }
    why
}

/// Polls `get_tenant` until `done` says so, or the timeout passes.
pub async fn wait_for_tenant(
    client: &mut OperatorClient<Channel>,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(Result<&pb::Tenant, &tonic::Status>) -> bool,
) -> Result<Option<pb::Tenant>, CtlError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let reply = client
            .get_tenant(pb::GetTenantRequest {
                name: name.into(),
                stale: false,
            })
            .await
            .map(|r| r.into_inner());
        if done(reply.as_ref()) {
            return match reply {
                Ok(t) => Ok(Some(t)),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                Err(s) => Err(s.into()),
            };
        }
        if let Err(s) = &reply {
            if s.code() != tonic::Code::NotFound && s.code() != tonic::Code::Unavailable {
                return Err(s.clone().into());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CtlError::Timeout(timeout, what.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dormant_proto::refusal::not_proposed;
    use dormant_proto::v1 as pb;

    #[test]
    fn only_a_marked_or_unsent_write_is_resent() {
        assert!(refused_before_proposing(&not_proposed(
            tonic::Status::unavailable("no leader is elected yet; retry shortly")
        )));
        // The same words without the mark: the write may have been proposed.
        assert!(!refused_before_proposing(&tonic::Status::unavailable(
            "no leader is elected yet; retry shortly"
        )));
        // Marked, but not worth sending again as is (a full disk).
        assert!(!refused_before_proposing(&not_proposed(
            tonic::Status::resource_exhausted("disk")
        )));
    }

    #[tokio::test]
    async fn a_call_whose_connection_was_refused_was_never_sent() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let status = OperatorClient::new(channel)
            .list_nodes(pb::ListNodesRequest { stale: true })
            .await
            .unwrap_err();
        assert!(refused_before_proposing(&status), "{status:?}");
    }
}

//! `dormantctl`: the operator's command line over the operator API. Tables for people, `-o json`
//! for scripts; every error names what was wrong.

pub mod dev;
pub mod output;

use std::time::Duration;

use dormant_proto::v1 as pb;
use dormant_proto::v1::operator_client::OperatorClient;
use tonic::transport::{Channel, Endpoint};

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
    #[error("{0}")]
    Other(String),
}

/// Accepts `http://host:port`, `https://...` or a bare `host:port`.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

pub async fn connect(url: &str) -> Result<OperatorClient<Channel>, CtlError> {
    let url = normalize_url(url);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| CtlError::BadUrl {
            url: url.clone(),
            why: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let channel = endpoint.connect().await.map_err(|e| CtlError::Connect {
        url: url.clone(),
        why: std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string()),
    })?;
    Ok(OperatorClient::new(channel))
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
            .get_tenant(pb::GetTenantRequest { name: name.into() })
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

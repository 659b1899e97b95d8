//! Who may call what. Each service is behind a [`Gate`] (a tonic interceptor) that reads the
//! caller's identity from its TLS certificate (`dormant_common::tls::identity`) and refuses,
//! logging the peer's address and identity:
//! - `Raft`: replicas only;
//! - `Operator`: operators, and replicas (a follower forwarding an operator's call, which it
//!   authorised before forwarding; a leader probing a new replica); tenants' secrets
//!   (`GetCredentials`) only to operators, and to replicas forwarding ([`may_read_secrets`]);
//! - `AgentApi`: nodes and replicas; the handler then checks that a node speaks only as itself
//!   ([`node_may_act_as`]), before forwarding, so a leader can trust what a replica forwards.
//!
//! Health and reflection have no gate: they answer any TLS client, certificate or not (they
//! reveal no state). With `--insecure` no gate refuses anything: there is no identity to check.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex, PoisonError};

use dormant_common::tls::PeerIdentity;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::warn;

/// The service a gate guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Raft,
    Operator,
    Agent,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Self::Raft => "Raft",
            Self::Operator => "operator API",
            Self::Agent => "agent API",
        }
    }

    fn admits(self, who: &PeerIdentity) -> bool {
        matches!(
            (self, who),
            (_, PeerIdentity::Replica(_))
                | (Self::Operator, PeerIdentity::Operator(_))
                | (Self::Agent, PeerIdentity::Node(_))
        )
    }

    fn who_may(self) -> &'static str {
        match self {
            Self::Raft => "replicas only",
            Self::Operator => "operators and replicas only",
            Self::Agent => "nodes and replicas only",
        }
    }
}

/// The caller of a request that passed its gate, as the handler finds it in the extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` on an `--insecure` replica.
    pub identity: Option<PeerIdentity>,
    pub addr: Option<SocketAddr>,
}

impl Caller {
    fn describe(&self) -> (String, String) {
        (
            self.addr
                .map_or_else(|| "unknown".to_string(), |a| a.to_string()),
            self.identity
                .as_ref()
                .map_or_else(|| "none".to_string(), PeerIdentity::uri),
        )
    }
}

/// The identity of a request's client certificate: `Ok(None)` when it showed none.
fn identity_of<T>(req: &Request<T>) -> Result<Option<PeerIdentity>, String> {
    let Some(certs) = req.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    identity_cached(leaf).map(Some)
}

/// Certificates this process read an identity from, at most this many at once.
const IDENTITIES_KEPT: usize = 4096;

/// Identities read lately, by the certificate's exact bytes: parsing X.509 on every request
/// cost a few percent of a busy leader, while the callers' certificates are a few and repeat.
/// The TLS handshake verified the certificate; this only saves reading the name in it again.
static IDENTITIES: LazyLock<Mutex<HashMap<Vec<u8>, PeerIdentity>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn identity_cached(der: &[u8]) -> Result<PeerIdentity, String> {
    let lock = || IDENTITIES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = lock().get(der) {
        return Ok(known.clone());
    }
    let identity = PeerIdentity::from_cert_der(der).map_err(|e| e.to_string())?;
    let mut kept = lock();
    if kept.len() >= IDENTITIES_KEPT {
        // One out, whichever: with more certificates in use than kept (a fleet larger than
        // this), most requests still find theirs.
        if let Some(any) = kept.keys().next().cloned() {
            kept.remove(&any);
        }
    }
    kept.insert(der.to_vec(), identity.clone());
    Ok(identity)
}

/// Checks the caller of every request of one service.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    api: Api,
    /// False on an `--insecure` replica.
    enforce: bool,
}

impl Gate {
    pub fn new(api: Api, enforce: bool) -> Self {
        Self { api, enforce }
    }

    fn check(&self, req: &Request<()>) -> Result<Caller, Status> {
        let addr = req.remote_addr();
        if !self.enforce {
            return Ok(Caller {
                identity: None,
                addr,
            });
        }
        let api = self.api.name();
        let peer = addr.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let identity = match identity_of(req) {
            Ok(Some(identity)) => identity,
            Ok(None) => {
                warn!(peer = %peer, identity = "none", api, "refused: no client certificate");
                return Err(Status::unauthenticated(format!(
                    "the {api} needs a client certificate signed by this cluster's CA"
                )));
            }
            Err(why) => {
                warn!(peer = %peer, identity = "none", api, reason = %why, "refused: the client certificate carries no identity");
                return Err(Status::unauthenticated(format!(
                    "client certificate refused: {why}"
                )));
            }
        };
        if !self.api.admits(&identity) {
            warn!(peer = %peer, identity = %identity, api, "refused: identity not allowed on this API");
            return Err(Status::permission_denied(format!(
                "{identity} may not call the {api} ({})",
                self.api.who_may()
            )));
        }
        Ok(Caller {
            identity: Some(identity),
            addr,
        })
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.check(&req)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Whether the caller of an agent API request may speak for node `node_id`: the node itself, or
/// a replica forwarding (it checked). Refusals are logged with the peer and its identity.
pub fn node_may_act_as<T>(req: &Request<T>, node_id: &str, rpc: &str) -> Result<(), Status> {
    let Some(caller) = req.extensions().get::<Caller>() else {
        // Every agent API request passes the gate first; a missing caller is a wiring bug.
        return Err(Status::internal(
            "agent API request without a checked caller",
        ));
    };
    match &caller.identity {
        None | Some(PeerIdentity::Replica(_)) => Ok(()),
        Some(PeerIdentity::Node(n)) if n.as_str() == node_id => Ok(()),
        Some(other) => {
            let (peer, identity) = caller.describe();
            warn!(peer = %peer, identity = %identity, node_id = %node_id, rpc, "refused: a node may speak only as itself");
            Err(Status::permission_denied(format!(
                "{rpc}: {other} may not speak for node {node_id:?} (a node certificate speaks \
                 only for its own node id)"
            )))
        }
    }
}

/// Whether the caller may read a tenant's secrets (`GetCredentials`): an operator, or a replica
/// forwarding an operator's call (it carries `forward::FORWARDED_BY`; the follower checked the
/// operator before forwarding). A replica asking for itself is refused: nothing in a replica
/// needs tenants' passwords but the agent API's desired sets.
pub fn may_read_secrets<T>(req: &Request<T>, rpc: &str) -> Result<(), Status> {
    let Some(caller) = req.extensions().get::<Caller>() else {
        return Err(Status::internal(
            "operator API request without a checked caller",
        ));
    };
    let forwarded = req.metadata().contains_key(super::forward::FORWARDED_BY);
    match &caller.identity {
        None | Some(PeerIdentity::Operator(_)) => Ok(()),
        Some(PeerIdentity::Replica(_)) if forwarded => Ok(()),
        Some(other) => {
            let (peer, identity) = caller.describe();
            warn!(peer = %peer, identity = %identity, rpc, "refused: only an operator may read tenants' secrets");
            Err(Status::permission_denied(format!(
                "{rpc}: {other} may not read tenants' secrets (operators only)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use dormant_common::NodeName;

    use super::*;

    fn with_caller(identity: Option<PeerIdentity>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(Caller {
            identity,
            addr: None,
        });
        req
    }

    #[test]
    fn a_certificate_read_once_gives_the_same_identity_and_a_bad_one_is_not_kept() {
        use dormant_common::tls::dev_ca::DevCa;
        let ca = DevCa::new().unwrap();
        let der = |identity: &PeerIdentity| {
            let issued = ca.issue(identity, &[]).unwrap();
            dormant_common::tls::first_cert_der(
                issued.cert_pem.as_bytes(),
                std::path::Path::new("test"),
            )
            .unwrap()
        };
        let node = PeerIdentity::Node(NodeName::parse("n1").unwrap());
        let op = PeerIdentity::Operator("alice".into());
        let (node_der, op_der) = (der(&node), der(&op));
        for _ in 0..2 {
            assert_eq!(identity_cached(&node_der), Ok(node.clone()));
            assert_eq!(identity_cached(&op_der), Ok(op.clone()));
        }
        let bad = b"not a certificate".to_vec();
        assert!(identity_cached(&bad).is_err());
        assert!(!IDENTITIES.lock().unwrap().contains_key(&bad));
    }

    #[test]
    fn each_api_admits_its_own_kinds_and_replicas() {
        let node = PeerIdentity::Node(NodeName::parse("a").unwrap());
        let op = PeerIdentity::Operator("admin".into());
        let replica = PeerIdentity::Replica(2);
        assert!(Api::Raft.admits(&replica));
        assert!(!Api::Raft.admits(&node) && !Api::Raft.admits(&op));
        assert!(Api::Operator.admits(&op) && Api::Operator.admits(&replica));
        assert!(!Api::Operator.admits(&node));
        assert!(Api::Agent.admits(&node) && Api::Agent.admits(&replica));
        assert!(!Api::Agent.admits(&op));
    }

    #[test]
    fn a_node_speaks_only_as_itself() {
        let a = Some(PeerIdentity::Node(NodeName::parse("a").unwrap()));
        assert!(node_may_act_as(&with_caller(a.clone()), "a", "Heartbeat").is_ok());
        let err = node_may_act_as(&with_caller(a), "b", "Heartbeat").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("dormant://node/a"),
            "{}",
            err.message()
        );
        let forwarded = Some(PeerIdentity::Replica(1));
        assert!(node_may_act_as(&with_caller(forwarded), "b", "Heartbeat").is_ok());
        assert!(node_may_act_as(&with_caller(None), "b", "Heartbeat").is_ok());
    }

    #[test]
    fn secrets_go_to_operators_and_to_replicas_only_when_forwarding() {
        let op = Some(PeerIdentity::Operator("admin".into()));
        assert!(may_read_secrets(&with_caller(op), "GetCredentials").is_ok());
        let replica = Some(PeerIdentity::Replica(2));
        let err = may_read_secrets(&with_caller(replica.clone()), "GetCredentials").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let mut forwarded = with_caller(replica);
        forwarded.metadata_mut().insert(
            crate::grpc::forward::FORWARDED_BY,
            tonic::metadata::MetadataValue::from(1u64),
        );
        assert!(may_read_secrets(&forwarded, "GetCredentials").is_ok());
    }

    #[test]
    fn without_tls_the_gate_lets_everything_through() {
        let gate = Gate::new(Api::Raft, false);
        assert!(gate.check(&Request::new(())).is_ok());
        let gate = Gate::new(Api::Raft, true);
        let err = gate.check(&Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}

//! The Raft client side: openraft's RPCs to peer replicas over tonic (mutual TLS with the
//! replica's certificate), one cached channel per peer.
//! Transport failures map to *unreachable* (openraft backs off), bad replies to *network error*,
//! and an error the peer's Raft returned to *remote error*.
//!
//! Payloads go in `codec`'s current format. A peer of an older version answers that with
//! `InvalidArgument` (it reads JSON only): the call is sent again in JSON, and so is every later
//! one to that peer, until a reply carries the header saying it reads the current format (it was
//! upgraded and restarted).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormant_common::tls::{TlsError, Transport};
use dormant_proto::v1::raft_client::RaftClient;
use dormant_proto::v1::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::codec::{self, Format, CODEC_HEADER, CODEC_MSGPACK_V1};
use crate::store::StateMachineData;
use crate::TypeConfig;

/// Hands out peer clients; channels are cached by address and shared between clients. Every
/// channel presents this replica's certificate (mutual TLS), unless the replica is `--insecure`.
#[derive(Debug, Clone)]
pub struct PeerNetwork {
    transport: Transport,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Per peer address: whether it reads only JSON (an older version).
    json_only: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
}

impl PeerNetwork {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            channels: Arc::default(),
            json_only: Arc::default(),
        }
    }

    /// Whether no peer is known to read JSON only: then entries may use what older versions
    /// cannot read (a `Command::Batch`).
    pub fn every_peer_reads_current(&self) -> bool {
        let peers = self.json_only.lock().unwrap_or_else(|p| p.into_inner());
        !peers
            .values()
            .any(|json_only| json_only.load(Ordering::Relaxed))
    }

    fn json_only(&self, addr: &str) -> Arc<AtomicBool> {
        let mut peers = self.json_only.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry(addr.to_string()).or_default().clone()
    }

    /// How this replica connects to others (also to a replica about to join).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, TlsError> {
        let mut cache = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = cache.get(addr) {
            return Ok(ch.clone());
        }
        let ch = self
            .transport
            .endpoint(addr)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        cache.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            node: node.clone(),
            channel: self.channel(&node.addr),
            json_only: self.json_only(&node.addr),
        }
    }
}

pub struct PeerClient {
    target: u64,
    node: BasicNode,
    channel: Result<Channel, TlsError>,
    json_only: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Vote,
    Append,
    Snapshot,
}

impl PeerClient {
    /// Sends `req`, encoded in the peer's format by `encode`.
    async fn call<Resp, E>(
        &mut self,
        rpc: Rpc,
        encode: impl Fn(Format) -> Result<Vec<u8>, String>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = match &self.channel {
            Ok(ch) => ch.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let mut format = if self.json_only.load(Ordering::Relaxed) {
            Format::LegacyJson
        } else {
            Format::MsgpackV1
        };
        let reply = loop {
            let payload = encode(format).map_err(|e| {
                RPCError::Network(NetworkError::new(&AnyError::error(format!(
                    "encode for replica {}: {e}",
                    self.target
                ))))
            })?;
            let mut request = tonic::Request::new(RaftPayload { payload });
            request.set_timeout(option.hard_ttl());
            let mut client = RaftClient::new(channel.clone());
            let reply = match rpc {
                Rpc::Vote => client.vote(request).await,
                Rpc::Append => client.append_entries(request).await,
                Rpc::Snapshot => client.install_snapshot(request).await,
            };
            match reply {
                Err(status)
                    if status.code() == tonic::Code::InvalidArgument
                        && format == Format::MsgpackV1 =>
                {
                    tracing::warn!(
                        peer = self.target,
                        addr = %self.node.addr,
                        error = %status.message(),
                        "the peer did not read the current format (an older version?): \
                         sending it JSON until it says it reads the current one"
                    );
                    self.json_only.store(true, Ordering::Relaxed);
                    format = Format::LegacyJson;
                }
                other => break other,
            }
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let reads_current = reply
            .metadata()
            .get(CODEC_HEADER)
            .is_some_and(|v| v.as_bytes() == CODEC_MSGPACK_V1.as_bytes());
        if reads_current && format == Format::LegacyJson {
            tracing::info!(peer = self.target, addr = %self.node.addr, "the peer reads the current format again");
            self.json_only.store(false, Ordering::Relaxed);
        }
        let result: Result<Resp, RaftError<u64, E>> = codec::decode(&reply.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

fn encoded<T: Serialize>(format: Format, req: &T) -> Result<Vec<u8>, String> {
    codec::encode_as(format, req).map_err(|e| e.to_string())
}

/// A snapshot for `format`. Its state is bytes inside the request, in this replica's format: a
/// peer that reads only JSON gets it re-encoded in JSON, which only works for a snapshot sent
/// whole (one chunk, up to openraft's `snapshot_max_chunk_size`, 3 MiB); a larger one is refused
/// with the way out.
fn snapshot_encoded(
    format: Format,
    req: &InstallSnapshotRequest<TypeConfig>,
) -> Result<Vec<u8>, String> {
    if format == Format::MsgpackV1 {
        return encoded(format, req);
    }
    if req.offset != 0 || !req.done {
        return Err(format!(
            "a replica of an older version (JSON only) needs snapshot {} larger than one chunk; \
             upgrade that replica to this version",
            req.meta.snapshot_id
        ));
    }
    let state: StateMachineData = codec::decode(&req.data).map_err(|e| e.to_string())?;
    let json = codec::encode_as(Format::LegacyJson, &state).map_err(|e| e.to_string())?;
    encoded(
        format,
        &InstallSnapshotRequest {
            data: json,
            ..req.clone()
        },
    )
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, |f| encoded(f, &req), &option).await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, |f| snapshot_encoded(f, &req), &option)
            .await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, |f| encoded(f, &req), &option).await
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership, Vote};

    use super::*;
    use crate::state::test_utils::{node, res};
    use crate::state::Command;

    fn snapshot_request(offset: u64, done: bool) -> InstallSnapshotRequest<TypeConfig> {
        let mut state = StateMachineData::default();
        state
            .cluster
            .apply(3, Command::RegisterNode(node("a", res(1000, 1024, 10))))
            .unwrap();
        InstallSnapshotRequest {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 3)),
                last_membership: StoredMembership::new(None, Membership::new(vec![], None)),
                snapshot_id: "s".into(),
            },
            offset,
            data: codec::encode(&state).unwrap(),
            done,
        }
    }

    #[test]
    fn a_peer_reading_json_only_gets_the_snapshot_state_in_json_too() {
        let req = snapshot_request(0, true);
        let current = snapshot_encoded(Format::MsgpackV1, &req).unwrap();
        let back: InstallSnapshotRequest<TypeConfig> = codec::decode(&current).unwrap();
        assert_eq!(back, req, "the current format carries the state as it is");

        let legacy = snapshot_encoded(Format::LegacyJson, &req).unwrap();
        // What a JSON-only replica does with it: the request, then the state inside, in JSON.
        let old: InstallSnapshotRequest<TypeConfig> = serde_json::from_slice(&legacy).unwrap();
        let state: StateMachineData = serde_json::from_slice(&old.data).unwrap();
        assert!(state
            .cluster
            .nodes
            .contains_key(&dormant_common::NodeName::parse("a").unwrap()));
        assert_eq!(old.meta, req.meta);
    }

    #[test]
    fn a_snapshot_in_chunks_is_refused_for_a_json_only_peer_with_the_way_out() {
        let err = snapshot_encoded(Format::LegacyJson, &snapshot_request(0, false)).unwrap_err();
        assert!(err.contains("upgrade that replica"), "{err}");
        let err = snapshot_encoded(Format::LegacyJson, &snapshot_request(7, true)).unwrap_err();
        assert!(err.contains("larger than one chunk"), "{err}");
    }
}

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
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::codec::{self, Format, CODEC_HEADER, CODEC_MSGPACK_V1};
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
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
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
            let payload = codec::encode_as(format, req)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
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

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, &req, &option).await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &req, &option).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, &req, &option).await
    }
}

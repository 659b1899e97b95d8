//! The Raft client side: openraft's RPCs to peer replicas over tonic (mutual TLS with the
//! replica's certificate), one cached channel per peer.
//! Transport failures map to *unreachable* (openraft backs off), bad replies to *network error*,
//! and an error the peer's Raft returned to *remote error*.

use std::collections::HashMap;
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

use crate::TypeConfig;

/// Hands out peer clients; channels are cached by address and shared between clients. Every
/// channel presents this replica's certificate (mutual TLS), unless the replica is `--insecure`.
#[derive(Debug, Clone)]
pub struct PeerNetwork {
    transport: Transport,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerNetwork {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            channels: Arc::default(),
        }
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
        }
    }
}

pub struct PeerClient {
    target: u64,
    node: BasicNode,
    channel: Result<Channel, TlsError>,
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
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { json });
        request.set_timeout(option.hard_ttl());
        let mut client = RaftClient::new(channel);
        let reply = match rpc {
            Rpc::Vote => client.vote(request).await,
            Rpc::Append => client.append_entries(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<u64, E>> =
            serde_json::from_slice(&reply.into_inner().json)
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

//! The Raft client side: openraft's RPCs to peer replicas over tonic (mutual TLS with the
//! replica's certificate), one cached channel per peer.
//! Transport failures map to *unreachable* (openraft backs off), bad replies to *network error*,
//! and an error the peer's Raft returned to *remote error*.
//!
//! Payloads go in `codec`'s current format. A peer of an older version answers that with
//! `InvalidArgument` (it reads JSON only): the call is sent again in JSON, and so is every later
//! one to that peer, until a reply carries the header saying it reads the current format (it was
//! upgraded and restarted). What each peer was last heard to read is kept by address: a peer not
//! heard from since this process started counts as not reading the current format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// Per peer address: what it was last heard to read (a [`PeerReads`] as a byte).
    reads: Arc<Mutex<HashMap<String, Arc<AtomicU8>>>>,
}

/// What a peer was last heard to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum PeerReads {
    /// Not heard from since this process started.
    Unknown = 0,
    /// A reply carried [`CODEC_HEADER`].
    Current = 1,
    /// It refused the current format: an older version.
    JsonOnly = 2,
}

impl PeerReads {
    fn of(cell: &AtomicU8) -> Self {
        match cell.load(Ordering::Relaxed) {
            1 => Self::Current,
            2 => Self::JsonOnly,
            _ => Self::Unknown,
        }
    }
}

impl PeerNetwork {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            channels: Arc::default(),
            reads: Arc::default(),
        }
    }

    /// Whether every one of `addrs` (the other members) answered in a way that shows it reads
    /// the current format: then entries may use what older versions cannot read (a
    /// `Command::Batch`). A member not heard from yet, or one that refused the format, does not.
    pub fn all_read_current<'a>(&self, mut addrs: impl Iterator<Item = &'a str>) -> bool {
        let peers = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        addrs.all(|addr| {
            peers
                .get(addr)
                .is_some_and(|cell| PeerReads::of(cell) == PeerReads::Current)
        })
    }

    fn reads(&self, addr: &str) -> Arc<AtomicU8> {
        let mut peers = self.reads.lock().unwrap_or_else(|p| p.into_inner());
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
            reads: self.reads(&node.addr),
        }
    }
}

pub struct PeerClient {
    target: u64,
    node: BasicNode,
    channel: Result<Channel, TlsError>,
    reads: Arc<AtomicU8>,
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
        let mut format = match PeerReads::of(&self.reads) {
            PeerReads::JsonOnly => Format::LegacyJson,
            PeerReads::Unknown | PeerReads::Current => Format::MsgpackV1,
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
                    self.reads
                        .store(PeerReads::JsonOnly as u8, Ordering::Relaxed);
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
        if reads_current {
            let was = PeerReads::of(&self.reads);
            if was == PeerReads::JsonOnly {
                tracing::info!(peer = self.target, addr = %self.node.addr, "the peer reads the current format again");
            }
            if was != PeerReads::Current {
                self.reads
                    .store(PeerReads::Current as u8, Ordering::Relaxed);
            }
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

/// `InstallSnapshotRequest` on the wire: the chunk as bytes. openraft's own type serializes its
/// `Vec<u8>` as a sequence of numbers, which in MessagePack takes up to twice the bytes and a
/// value per byte to write and read. Same field names, so a JSON-era request (numbers)
/// decodes as this too (`serde_bytes` reads both).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SnapshotChunk {
    vote: openraft::Vote<u64>,
    meta: openraft::SnapshotMeta<u64, BasicNode>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    done: bool,
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        Self {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        }
    }
}

/// [`SnapshotChunk`] as it is written: borrowed, so a chunk (up to 3 MiB) is not copied to be
/// encoded.
#[derive(Serialize)]
struct SnapshotChunkOut<'a> {
    vote: &'a openraft::Vote<u64>,
    meta: &'a openraft::SnapshotMeta<u64, BasicNode>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
    done: bool,
}

impl<'a> From<&'a InstallSnapshotRequest<TypeConfig>> for SnapshotChunkOut<'a> {
    fn from(r: &'a InstallSnapshotRequest<TypeConfig>) -> Self {
        Self {
            vote: &r.vote,
            meta: &r.meta,
            offset: r.offset,
            data: &r.data,
            done: r.done,
        }
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
        return encoded(format, &SnapshotChunkOut::from(req));
    }
    if req.offset != 0 || !req.done {
        return Err(format!(
            "a replica of an older version (JSON only) needs snapshot {} larger than one chunk; \
             upgrade that replica to this version",
            req.meta.snapshot_id
        ));
    }
    let state: StateMachineData = codec::decode(&req.data).map_err(|e| e.to_string())?;
    // Batched creates give uids past the log index; an older version gives the log index, so
    // from this state on it would give uids the others gave already.
    let last_index = req.meta.last_log_id.map_or(0, |l| l.index);
    if state.cluster.next_uid_after_batches(last_index) {
        return Err(format!(
            "a replica of an older version (JSON only) cannot continue snapshot {}: it holds \
             tenants created in batches, which that version would number differently; upgrade \
             that replica to this version",
            req.meta.snapshot_id
        ));
    }
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
    fn a_snapshot_chunk_travels_as_bytes_and_a_json_era_request_still_reads() {
        let mut req = snapshot_request(0, true);
        // Bytes of every value: as numbers, half of them would take two bytes each.
        req.data = (0..=255u8).cycle().take(1 << 20).collect();
        let wire = snapshot_encoded(Format::MsgpackV1, &req).unwrap();
        assert!(wire.len() < req.data.len() + 1024, "{} bytes", wire.len());
        let back: SnapshotChunk = codec::decode(&wire).unwrap();
        assert_eq!(InstallSnapshotRequest::from(back), req);
        // Between this and the build before it (which wrote openraft's type, the chunk as
        // numbers), both ways: rmp-serde reads bytes as a sequence and a sequence as bytes.
        let older_reads: InstallSnapshotRequest<TypeConfig> = codec::decode(&wire).unwrap();
        assert_eq!(older_reads, req);
        let older_wrote = codec::encode_as(Format::MsgpackV1, &req).unwrap();
        let back: SnapshotChunk = codec::decode(&older_wrote).unwrap();
        assert_eq!(InstallSnapshotRequest::from(back), req);
        // A request as a JSON-era replica sends it (openraft's type, data as numbers).
        let json = serde_json::to_vec(&snapshot_request(0, true)).unwrap();
        let back: SnapshotChunk = codec::decode(&json).unwrap();
        assert_eq!(
            InstallSnapshotRequest::from(back),
            snapshot_request(0, true)
        );
    }

    #[test]
    fn a_peer_reading_json_only_gets_the_snapshot_state_in_json_too() {
        let req = snapshot_request(0, true);
        let current = snapshot_encoded(Format::MsgpackV1, &req).unwrap();
        let back: SnapshotChunk = codec::decode(&current).unwrap();
        let back = InstallSnapshotRequest::from(back);
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
    fn a_snapshot_holding_batched_creates_is_refused_for_a_json_only_peer() {
        let mut req = snapshot_request(0, true);
        let mut state: StateMachineData = codec::decode(&req.data).unwrap();
        let create = |name: &str| Command::CreateTenant {
            spec: crate::state::test_utils::spec(name, res(100, 64, 1)),
            password: "pw".into(),
            node: None,
            pending_reason: None,
            overcommit: 1.0,
        };
        // Three creates in the entry at index 4: uids 4, 5 and 6, past the index.
        state
            .cluster
            .apply(
                4,
                Command::Batch(vec![create("x"), create("y"), create("z")]),
            )
            .unwrap();
        req.data = codec::encode(&state).unwrap();
        req.meta.last_log_id = Some(LogId::new(CommittedLeaderId::new(2, 1), 4));
        let err = snapshot_encoded(Format::LegacyJson, &req).unwrap_err();
        assert!(err.contains("created in batches"), "{err}");
        // The current format is not affected, and a later index is a log index again.
        assert!(snapshot_encoded(Format::MsgpackV1, &req).is_ok());
        req.meta.last_log_id = Some(LogId::new(CommittedLeaderId::new(2, 1), 6));
        assert!(snapshot_encoded(Format::LegacyJson, &req).is_ok());
    }

    #[test]
    fn only_peers_heard_in_the_current_format_count_as_reading_it() {
        let network = PeerNetwork::new(Transport::Insecure);
        let addrs = ["10.0.0.2:7400", "10.0.0.3:7400"];
        assert!(
            !network.all_read_current(addrs.into_iter()),
            "never heard from"
        );
        network
            .reads(addrs[0])
            .store(PeerReads::Current as u8, Ordering::Relaxed);
        assert!(
            !network.all_read_current(addrs.into_iter()),
            "one never heard from"
        );
        network
            .reads(addrs[1])
            .store(PeerReads::JsonOnly as u8, Ordering::Relaxed);
        assert!(
            !network.all_read_current(addrs.into_iter()),
            "one older version"
        );
        network
            .reads(addrs[1])
            .store(PeerReads::Current as u8, Ordering::Relaxed);
        assert!(network.all_read_current(addrs.into_iter()));
        // A departed member is not asked about.
        network
            .reads("10.0.0.9:7400")
            .store(PeerReads::JsonOnly as u8, Ordering::Relaxed);
        assert!(network.all_read_current(addrs.into_iter()));
    }

    #[test]
    fn a_snapshot_in_chunks_is_refused_for_a_json_only_peer_with_the_way_out() {
        let err = snapshot_encoded(Format::LegacyJson, &snapshot_request(0, false)).unwrap_err();
        assert!(err.contains("upgrade that replica"), "{err}");
        let err = snapshot_encoded(Format::LegacyJson, &snapshot_request(7, true)).unwrap_err();
        assert!(err.contains("larger than one chunk"), "{err}");
    }
}

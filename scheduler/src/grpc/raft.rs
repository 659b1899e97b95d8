//! Serves openraft's RPCs to peer replicas (peers only: operators and agents use other services).
//! A request in either of `codec`'s formats is understood and answered in the same format, so a
//! replica of an older version (JSON only) can still replicate to this one. Every reply carries
//! [`CODEC_HEADER`]: a peer that had fallen back to JSON for this replica (it ran an older
//! version before a restart) sees it and goes back to the current format.

use dormant_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use dormant_proto::v1::RaftPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::codec::{self, Format, CODEC_HEADER, CODEC_MSGPACK_V1};
use crate::network::SnapshotChunk;
use crate::Raft;

pub struct RaftService {
    raft: Raft,
}

pub fn server(raft: Raft) -> RaftServer<RaftService> {
    RaftServer::new(RaftService { raft })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<(T, Format), Status> {
    let bytes = req.into_inner().payload;
    let format = codec::format_of(&bytes)
        .map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))?;
    let value = codec::decode(&bytes)
        .map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))?;
    Ok((value, format))
}

/// The reply carries openraft's own `Result`, so the caller can tell a Raft error from a transport one.
fn encode<T: Serialize>(format: Format, result: &T) -> Result<Response<RaftPayload>, Status> {
    let payload = codec::encode_as(format, result)
        .map_err(|e| Status::internal(format!("encode raft reply: {e}")))?;
    let mut reply = Response::new(RaftPayload { payload });
    reply
        .metadata_mut()
        .insert(CODEC_HEADER, MetadataValue::from_static(CODEC_MSGPACK_V1));
    Ok(reply)
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (vote, format) = decode(req)?;
        encode(format, &self.raft.vote(vote).await)
    }

    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let (append, format) = decode(req)?;
        encode(format, &self.raft.append_entries(append).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let (chunk, format): (SnapshotChunk, _) = decode(req)?;
        encode(format, &self.raft.install_snapshot(chunk.into()).await)
    }
}

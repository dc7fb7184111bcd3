//! `RaftService`: peers' AppendEntries, Vote and InstallSnapshot calls, handed to the
//! local openraft instance. Payloads are codec bytes; the reply carries openraft's own
//! `Result`, so a remote Raft error reaches the caller as such.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::raft::Raft;
use dispatcher_core::codec;
use dispatcher_proto::v1::raft_service_server::RaftService;
use dispatcher_proto::v1::RaftMessage;

/// Serves the Raft RPCs of one replica.
pub struct RaftServer {
    raft: Raft,
}

impl RaftServer {
    /// A server for `raft`.
    pub fn new(raft: Raft) -> Self {
        RaftServer { raft }
    }
}

fn decode<T: DeserializeOwned>(req: Request<RaftMessage>) -> Result<T, Status> {
    codec::decode(&req.into_inner().payload)
        .map_err(|e| Status::invalid_argument(format!("payload: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = codec::encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { payload }))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}

//! The `dispatcher.v1` gRPC contract, generated from `proto/dispatcher/v1/dispatcher.proto`
//! by `build.rs` (protox + tonic-prost-build; no system `protoc`), and what both sides
//! of the wire share: the metadata keys, the wire clock, and [`convert`] between
//! protobuf messages and the domain types of `dispatcher-core`.
//!
//! Must never hold client or server behaviour: it is the contract, nothing more.
#![deny(missing_docs)]

pub mod convert;

/// Generated messages, clients and servers of package `dispatcher.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)] // generated code
pub mod v1 {
    tonic::include_proto!("dispatcher.v1");
}

/// The encoded `FileDescriptorSet` of the protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dispatcher_descriptor");

/// The user-facing name of a `JobState` value (`RUNNING`), `UNKNOWN` for values this
/// build does not know.
pub fn job_state_name(raw: i32) -> &'static str {
    use v1::JobState;
    match JobState::try_from(raw) {
        Ok(JobState::Created) => "CREATED",
        Ok(JobState::Running) => "RUNNING",
        Ok(JobState::Failing) => "FAILING",
        Ok(JobState::Failed) => "FAILED",
        Ok(JobState::Cancelling) => "CANCELLING",
        Ok(JobState::Canceled) => "CANCELED",
        Ok(JobState::Finished) => "FINISHED",
        Ok(JobState::Restarting) => "RESTARTING",
        _ => "UNKNOWN",
    }
}

/// Metadata keys the dispatcher sets or reads, shared by the server and the clients.
pub mod headers {
    /// On UNAVAILABLE ("not the leader") and on forwarded answers: the leader's address,
    /// which the client library follows.
    pub const LEADER_ADDRESS: &str = "x-dispatcher-leader";
    /// On UNAVAILABLE ("not the leader"): the leader's node id.
    pub const LEADER_ID: &str = "x-dispatcher-leader-id";
    /// With a leader hint: the Raft term in which the hinting replica knows that leader.
    /// A client that has seen a hint of a newer term ignores it (the replica has not yet
    /// heard of the election that deposed the leader it names).
    pub const LEADER_TERM: &str = "x-dispatcher-leader-term";
    /// Marks a request a replica already forwarded once; it is never forwarded again.
    pub const FORWARDED: &str = "x-dispatcher-forwarded";
}

/// The wire's clock: milliseconds since the Unix epoch, as timestamps in messages and
/// commands carry them (0 if the system clock is before the epoch).
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

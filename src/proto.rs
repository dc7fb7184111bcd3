//! The `dispatcher.v1` gRPC contract, generated from `proto/dispatcher/v1/dispatcher.proto`
//! by `build.rs` (protox + tonic-prost-build; no system `protoc`).

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

//! The one place where errors become `tonic::Status`.
//!
//! "Not the leader" becomes UNAVAILABLE with the leader's address in the
//! `x-dispatcher-leader` metadata (and its id in `x-dispatcher-leader-id`), which the
//! client library follows; rejections map to the codes the proto documents.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::raft::replica::WriteError;
use dispatcher_core::state::Rejection;

pub use dispatcher_proto::headers::{
    LEADER_ADDRESS as LEADER_ADDRESS_KEY, LEADER_ID as LEADER_ID_KEY,
};

/// Maps a Raft write (or read-barrier) failure.
pub fn write_error(e: WriteError) -> Status {
    match e {
        WriteError::NotLeader { leader } => {
            let msg = match &leader {
                Some((id, addr)) => {
                    format!("this replica is not the leader; the leader is {id} at {addr}")
                }
                None => "no leader is known yet (an election may be running); retry".to_string(),
            };
            let mut status = Status::unavailable(msg);
            if let Some((id, addr)) = leader {
                if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
                    status.metadata_mut().insert(LEADER_ADDRESS_KEY, v);
                }
                if let Ok(v) = MetadataValue::try_from(id.to_string().as_str()) {
                    status.metadata_mut().insert(LEADER_ID_KEY, v);
                }
            }
            status
        }
        WriteError::Fatal(m) => Status::unavailable(format!("replica cannot serve: {m}")),
        WriteError::Membership(m) => Status::failed_precondition(m),
    }
}

/// Maps a state-machine rejection.
pub fn rejection(r: &Rejection) -> Status {
    let code = match r {
        Rejection::Invalid { .. } => Code::InvalidArgument,
        Rejection::AlreadyExists { .. } => Code::AlreadyExists,
        Rejection::UnknownJob { .. } | Rejection::UnknownTaskManager { .. } => Code::NotFound,
        Rejection::IllegalJobTransition { .. }
        | Rejection::IllegalTaskTransition { .. }
        | Rejection::StaleAttempt { .. }
        | Rejection::NotAssigned { .. }
        | Rejection::RestartNotDue { .. }
        | Rejection::JobNotActive { .. }
        | Rejection::CheckpointOutOfOrder { .. } => Code::FailedPrecondition,
    };
    Status::new(code, r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_leader_hint() {
        let s = write_error(WriteError::NotLeader {
            leader: Some((2, "127.0.0.1:7002".into())),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.metadata()
                .get(LEADER_ADDRESS_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:7002")
        );
        assert_eq!(
            s.metadata()
                .get(LEADER_ID_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("2")
        );
    }

    #[test]
    fn invalid_input_names_the_field() {
        let s = rejection(&Rejection::invalid(
            "spec.vertices[0].parallelism",
            "must be at least 1",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("spec.vertices[0].parallelism"));
    }
}

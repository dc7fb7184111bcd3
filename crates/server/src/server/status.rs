//! The one place where errors become `tonic::Status`.
//!
//! Handlers and the edge return [`ApiError`] (`crate::error`); only `From<ApiError> for Status` here
//! picks codes and metadata. "Not the leader" and a follower's failure to reach the
//! leader it forwards to become UNAVAILABLE with the leader's address in the
//! `x-dispatcher-leader` metadata (and its id in `x-dispatcher-leader-id`), which the
//! client library follows; a passed deadline is DEADLINE_EXCEEDED; rejections map to the
//! codes the proto documents. The edge then adds the hint's term
//! (`x-dispatcher-leader-term`, [`stamp_hint_term`]) to every answer that names a leader.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

pub use crate::error::ApiError;
use crate::raft::error::WriteError;
use crate::raft::NodeId;
use dispatcher_core::state::Rejection;
pub use dispatcher_proto::headers::{
    LEADER_ADDRESS as LEADER_ADDRESS_KEY, LEADER_ID as LEADER_ID_KEY,
    LEADER_TERM as LEADER_TERM_KEY,
};

/// Adds the term to the leader hint in `metadata`, if it names `known`'s leader (the
/// leader this replica knows now, and the term it knows it in). A hint naming another
/// replica (the leader changed since the hint was made) goes without a term rather than
/// with one it does not belong to; one that already has a term (a leader's own answer,
/// passed through by a forward) keeps it.
pub fn stamp_hint_term(
    metadata: &mut tonic::metadata::MetadataMap,
    known: Option<(NodeId, String, u64)>,
) {
    if metadata.contains_key(LEADER_TERM_KEY) {
        return;
    }
    let hinted = metadata
        .get(LEADER_ADDRESS_KEY)
        .and_then(|v| v.to_str().ok());
    let Some((_, addr, term)) = known else {
        return;
    };
    if hinted != Some(addr.as_str()) {
        return;
    }
    if let Ok(v) = MetadataValue::try_from(term.to_string().as_str()) {
        metadata.insert(LEADER_TERM_KEY, v);
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Rejected(r) => rejection(&r),
            ApiError::Write(w) => write_error(w),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::ForwardFailed { leader, cause } => {
                with_leader_hint(Status::unavailable(cause), leader)
            }
            ApiError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

/// Maps a Raft write (or read-barrier) failure.
fn write_error(e: WriteError) -> Status {
    match e {
        WriteError::NotLeader { leader } => {
            let msg = match &leader {
                Some((id, addr)) => {
                    format!("this replica is not the leader; the leader is {id} at {addr}")
                }
                None => "no leader is known yet (an election may be running); retry".to_string(),
            };
            with_leader_hint(Status::unavailable(msg), leader)
        }
        WriteError::Fatal(m) => Status::unavailable(format!("replica cannot serve: {m}")),
        WriteError::Internal(m) => Status::internal(m),
        WriteError::Membership(m) => Status::failed_precondition(m),
    }
}

/// Adds the leader hint (address and id) to a status, when a leader is known.
fn with_leader_hint(mut status: Status, leader: Option<(NodeId, String)>) -> Status {
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

/// Maps a state-machine rejection.
fn rejection(r: &Rejection) -> Status {
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
        | Rejection::CheckpointOutOfOrder { .. }
        | Rejection::LastAdminToken { .. } => Code::FailedPrecondition,
        Rejection::TokenExists { .. } => Code::AlreadyExists,
        Rejection::UnknownToken { .. } => Code::NotFound,
        Rejection::TaskManagerOwned { .. } => Code::PermissionDenied,
        Rejection::QuotaExceeded { .. } => Code::ResourceExhausted,
    };
    Status::new(code, r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_leader_hint() {
        let s = Status::from(ApiError::Write(WriteError::NotLeader {
            leader: Some((2, "127.0.0.1:7002".into())),
        }));
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
    fn a_failed_forward_is_unavailable_with_the_leader_hint_when_one_is_known() {
        let s = Status::from(ApiError::ForwardFailed {
            leader: Some((1, "127.0.0.1:7001".into())),
            cause: "the leader did not answer".into(),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "the leader did not answer");
        assert_eq!(
            s.metadata()
                .get(LEADER_ADDRESS_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:7001")
        );
        assert_eq!(
            s.metadata()
                .get(LEADER_ID_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let s = Status::from(ApiError::ForwardFailed {
            leader: None,
            cause: "no leader".into(),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.metadata().get(LEADER_ADDRESS_KEY).is_none());
        assert!(s.metadata().get(LEADER_ID_KEY).is_none());
    }

    #[test]
    fn a_hint_gets_the_term_only_when_it_names_the_leader_known_now() {
        let term = |s: &Status| {
            s.metadata()
                .get(LEADER_TERM_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let hinted = || {
            Status::from(ApiError::Write(WriteError::NotLeader {
                leader: Some((2, "127.0.0.1:7002".into())),
            }))
        };
        let mut s = hinted();
        stamp_hint_term(s.metadata_mut(), Some((2, "127.0.0.1:7002".into(), 7)));
        assert_eq!(term(&s).as_deref(), Some("7"));
        // The leader changed between the hint and the stamp: no term to vouch for it.
        let mut s = hinted();
        stamp_hint_term(s.metadata_mut(), Some((3, "127.0.0.1:7003".into(), 8)));
        assert_eq!(term(&s), None);
        let mut s = hinted();
        stamp_hint_term(s.metadata_mut(), None);
        assert_eq!(term(&s), None);
        // No hint, no term.
        let mut s = Status::unavailable("no leader");
        stamp_hint_term(s.metadata_mut(), Some((2, "127.0.0.1:7002".into(), 7)));
        assert_eq!(term(&s), None);
    }

    #[test]
    fn a_passed_deadline_is_deadline_exceeded() {
        let s = Status::from(ApiError::DeadlineExceeded("too late".into()));
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert_eq!(s.message(), "too late");
    }

    #[test]
    fn invalid_input_names_the_field() {
        let s = Status::from(ApiError::invalid(
            "spec.vertices[0].parallelism",
            "must be at least 1",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("spec.vertices[0].parallelism"));
    }

    #[test]
    fn rejections_map_to_the_documented_codes() {
        let unknown = Rejection::UnknownJob {
            job_id: dispatcher_core::state::JobId::parse("00000000-0000-4000-8000-000000000001")
                .expect("a uuid"),
        };
        assert_eq!(Status::from(ApiError::from(unknown)).code(), Code::NotFound);
        let membership = WriteError::Membership("last voter".into());
        assert_eq!(
            Status::from(ApiError::from(membership)).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            Status::from(ApiError::Unavailable("shutting down".into())).code(),
            Code::Unavailable
        );
        // A fault of the replica itself is not retried elsewhere as if Raft had stopped.
        let internal = WriteError::Internal("wrong shape".into());
        assert_eq!(
            Status::from(ApiError::from(internal)).code(),
            Code::Internal
        );
        assert_eq!(
            Status::from(ApiError::PermissionDenied("not a member".into())).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            Status::from(ApiError::Unauthenticated("no token".into())).code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn a_job_past_a_resource_limit_is_resource_exhausted_naming_the_limit_and_the_use() {
        let s = Status::from(ApiError::from(Rejection::QuotaExceeded {
            limit: "max_spec_bytes".into(),
            max: 1 << 30,
            unit: "bytes".into(),
            in_use: 1_073_000_000,
            needs: 4_194_330,
        }));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("max_spec_bytes = 1073741824 bytes"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("use 1073000000"), "{}", s.message());
        assert!(s.message().contains("needs 4194330"), "{}", s.message());
    }

    #[test]
    fn guard_refusals_map_to_permission_denied_or_invalid_argument() {
        use crate::raft::guard::Refusal;
        let not_member = Refusal::NotMember {
            sender: 99,
            members: [1, 2, 3].into(),
        };
        let s = Status::from(ApiError::from(not_member));
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("99"), "{}", s.message());
        let term = Refusal::Term {
            field: "vote".into(),
            term: u64::MAX,
        };
        let s = Status::from(ApiError::from(term));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("vote"), "{}", s.message());
    }
}

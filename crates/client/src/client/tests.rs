//! The client library's choices (endpoints, leader hints, retries), without a network.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

fn endpoints() -> Vec<String> {
    ["a:1", "b:2", "c:3"].map(String::from).to_vec()
}

fn hinting(status: Status, leader: &str) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(v) = leader.parse() {
        metadata.insert(LEADER_ADDRESS_KEY, v);
    }
    Status::with_metadata(status.code(), status.message(), metadata)
}

/// A client whose calls give up quickly; no call in these tests touches the network.
fn quick_client() -> Client {
    let mut config = ClientConfig::new(endpoints());
    config.timeout = Duration::from_millis(300);
    config.per_try_timeout = Duration::from_millis(100);
    config.min_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(5);
    match Client::new(config) {
        Ok(c) => c,
        Err(e) => panic!("a valid config was refused: {e}"),
    }
}

#[test]
fn only_transient_failures_are_retried() {
    let cases = [
        (Code::Unavailable, true),
        (Code::DeadlineExceeded, true),
        (Code::Unknown, true),
        (Code::Cancelled, true),
        (Code::Aborted, true),
        (Code::InvalidArgument, false),
        (Code::NotFound, false),
        (Code::AlreadyExists, false),
        (Code::FailedPrecondition, false),
        (Code::PermissionDenied, false),
        (Code::Unauthenticated, false),
        (Code::ResourceExhausted, false),
        (Code::Internal, false),
        (Code::Unimplemented, false),
    ];
    for (code, want) in cases {
        assert_eq!(retryable(&Status::new(code, "x")), want, "{code:?}");
    }
}

#[test]
fn without_a_known_leader_the_endpoints_are_tried_in_turn() {
    let mut choice = EndpointChoice::default();
    let eps = endpoints();
    let picked: Vec<Option<String>> = (0..4).map(|_| choice.pick(&eps)).collect();
    assert_eq!(
        picked,
        ["a:1", "b:2", "c:3", "a:1"].map(|s| Some(s.to_string()))
    );
    assert_eq!(choice.pick(&[]), None, "no endpoint, no pick, no panic");
}

#[test]
fn the_replica_that_answered_is_tried_first_next_time() {
    let mut choice = EndpointChoice::default();
    choice.learn("b:2", Ok(None));
    for _ in 0..3 {
        assert_eq!(choice.pick(&endpoints()).as_deref(), Some("b:2"));
    }
}

#[test]
fn a_forwarded_answer_sends_the_next_call_to_the_leader_it_names() {
    let mut choice = EndpointChoice::default();
    choice.learn("a:1", Ok(Some("c:3")));
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("c:3"));
}

#[test]
fn a_failure_naming_the_leader_sends_the_retry_there() {
    let mut choice = EndpointChoice::default();
    choice.learn("a:1", Ok(None));
    choice.learn(
        "a:1",
        Err(&hinting(Status::unavailable("not leader"), "b:2")),
    );
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("b:2"));
}

#[test]
fn a_failure_without_a_useful_hint_falls_back_to_rotation() {
    let eps = endpoints();
    let cases = [
        Status::unavailable("down"),
        hinting(Status::unavailable("no leader"), ""),
        // A replica that names itself while failing would be retried forever.
        hinting(Status::unavailable("stepping down"), "a:1"),
    ];
    for status in cases {
        let mut choice = EndpointChoice::default();
        choice.learn("a:1", Ok(None));
        choice.learn("a:1", Err(&status));
        // Rotation resumes where it stood before a replica answered.
        let next: Vec<Option<String>> = (0..2).map(|_| choice.pick(&eps)).collect();
        assert_eq!(
            next,
            vec![Some("a:1".into()), Some("b:2".into())],
            "{status:?}"
        );
    }
}

#[test]
fn the_leader_hint_is_read_from_the_metadata_and_empty_means_none() {
    assert_eq!(
        leader_hint(hinting(Status::ok(""), "b:2").metadata()).as_deref(),
        Some("b:2")
    );
    assert_eq!(leader_hint(hinting(Status::ok(""), "").metadata()), None);
    assert_eq!(leader_hint(&tonic::metadata::MetadataMap::new()), None);
}

#[tokio::test]
async fn a_client_needs_at_least_one_usable_endpoint() {
    let empty = Client::new(ClientConfig::new(vec![]));
    assert!(matches!(empty, Err(ClientError::Endpoint { .. })));
    let bad = Client::new(ClientConfig::new(vec!["a:1".into(), "not a host".into()]));
    assert!(
        matches!(&bad, Err(ClientError::Endpoint { endpoint, .. }) if endpoint == "not a host")
    );
}

#[tokio::test]
async fn a_refusal_is_returned_at_once_without_a_retry() {
    let client = quick_client();
    let tries = AtomicUsize::new(0);
    let result: Result<(), _> = client
        .call(|_, _| {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::already_exists("job j1 has another spec")) }
        })
        .await;
    assert!(
        matches!(&result, Err(ClientError::Rejected(s)) if s.code() == Code::AlreadyExists),
        "{result:?}"
    );
    assert_eq!(
        result.err().and_then(|e| e.code()),
        Some(Code::AlreadyExists)
    );
    assert_eq!(tries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn transient_failures_are_retried_until_a_replica_answers() {
    let client = quick_client();
    let tries = AtomicUsize::new(0);
    let result = client
        .call(|_, _| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err(Status::unavailable("replica down")),
                    1 => Err(Status::deadline_exceeded("slow")),
                    _ => Ok(n),
                }
            }
        })
        .await;
    assert_eq!(result.ok(), Some(2));
}

#[tokio::test]
async fn a_try_that_hangs_is_cut_short_and_retried() {
    let client = quick_client();
    let tries = AtomicUsize::new(0);
    let result = client
        .call(|_, _| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                Ok(n)
            }
        })
        .await;
    assert_eq!(result.ok(), Some(1));
}

#[tokio::test]
async fn a_call_sends_the_next_one_to_the_leader_its_answer_names() {
    let client = quick_client();
    let result = client
        .call_unary(|_, _| async {
            let mut r = tonic::Response::new(());
            if let Ok(v) = "c:3".parse() {
                r.metadata_mut().insert(LEADER_ADDRESS_KEY, v);
            }
            Ok(r)
        })
        .await;
    assert!(result.is_ok());
    assert_eq!(
        client.choice().pick(&client.config.endpoints).as_deref(),
        Some("c:3")
    );
}

#[tokio::test]
async fn a_cluster_that_never_answers_is_unavailable_at_the_deadline() {
    let client = quick_client();
    let started = Instant::now();
    let result: Result<(), _> = client
        .call(|_, _| async { Err(Status::unavailable("no leader")) })
        .await;
    match result {
        Err(ClientError::Unavailable { attempts, last, .. }) => {
            assert!(attempts > 1, "retried: {attempts}");
            assert_eq!(last.message(), "no leader");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "gave up after {waited:?}"
    );
}

#[test]
fn only_finished_failed_and_canceled_jobs_are_terminal() {
    let cases = [
        (pb::JobState::Created, false),
        (pb::JobState::Running, false),
        (pb::JobState::Restarting, false),
        (pb::JobState::Failing, false),
        (pb::JobState::Cancelling, false),
        (pb::JobState::Finished, true),
        (pb::JobState::Failed, true),
        (pb::JobState::Canceled, true),
    ];
    for (state, want) in cases {
        let status = pb::JobStatus {
            state: state as i32,
            ..Default::default()
        };
        assert_eq!(is_terminal(&status), want, "{state:?}");
    }
}

#[test]
fn job_ids_are_fresh_uuids() {
    let (a, b) = (new_job_id(), new_job_id());
    assert_ne!(a, b);
    assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
}

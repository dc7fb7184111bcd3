//! The client library's choices (endpoints, leader hints, retries), without a network.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::attempts::*;
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
    choice.learn("a:1", Ok(Some(("c:3", None))));
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("c:3"));
}

fn hinting_in(status: Status, leader: &str, term: u64) -> Status {
    let mut status = hinting(status, leader);
    if let Ok(v) = term.to_string().parse() {
        status.metadata_mut().insert(LEADER_TERM_KEY, v);
    }
    status
}

#[test]
fn a_hint_from_an_older_term_than_one_followed_is_ignored() {
    let mut choice = EndpointChoice::default();
    choice.learn(
        "a:1",
        Err(&hinting_in(Status::unavailable("not leader"), "b:2", 5)),
    );
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("b:2"));
    // c:3 restarted and still believes a:1 leads, in term 4: not followed.
    choice.learn(
        "c:3",
        Err(&hinting_in(Status::unavailable("not leader"), "a:1", 4)),
    );
    // (back to rotation, as for a failure without a hint)
    assert_eq!(choice.preferred, None);
    // Nor in a forwarded answer: the replica that answered is preferred instead.
    choice.learn("c:3", Ok(Some(("a:1", Some(4)))));
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("c:3"));
    // The same or a newer term is followed, and a hint without a term (an older
    // replica) too.
    choice.learn("c:3", Ok(Some(("b:2", Some(5)))));
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("b:2"));
    choice.learn(
        "b:2",
        Err(&hinting_in(Status::unavailable("not leader"), "c:3", 6)),
    );
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("c:3"));
    choice.learn("a:1", Ok(Some(("b:2", None))));
    assert_eq!(choice.pick(&endpoints()).as_deref(), Some("b:2"));
    assert_eq!(choice.term, 6);
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
    match &result {
        Err(ClientError::Unavailable {
            gave_up,
            attempts,
            endpoints,
            last,
            ..
        }) => {
            assert_eq!(*gave_up, GaveUp::Deadline);
            assert!(*attempts > 1, "retried: {attempts}");
            assert_eq!(last.message(), "no leader");
            let named: Vec<&str> = endpoints.iter().map(|e| e.address.as_str()).collect();
            assert_eq!(named, ["a:1", "b:2", "c:3"], "every replica tried is named");
            assert!(endpoints.iter().all(|e| e.cause == "no leader"));
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "gave up after {waited:?}"
    );
    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.starts_with("cluster unavailable after 0.")
            && message.ends_with("a:1: no leader; b:2: no leader; c:3: no leader"),
        "{message}"
    );
}

fn refused(cause: &str) -> TryFailure {
    TryFailure {
        cause: cause.into(),
        not_listening: true,
    }
}

fn answered(cause: &str) -> TryFailure {
    TryFailure {
        cause: cause.into(),
        not_listening: false,
    }
}

const WINDOW: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn nothing_is_listening_once_every_endpoint_refused_twice_for_the_window() {
    let eps = endpoints();
    let mut h = CallHistory::default();
    // Two full rounds, but within 100 ms: a replica may be restarting.
    for (i, at) in [0, 20, 40, 60, 80, 100].into_iter().enumerate() {
        h.failed(ms(at), &eps[i % 3], refused("connection refused"));
    }
    assert!(!h.nothing_listening(ms(100), &eps, WINDOW), "too soon");
    // The window passed, but c:3 was tried once in it.
    let mut once = CallHistory::default();
    for (addr, at) in [("a:1", 0), ("b:2", 300), ("c:3", 600), ("a:1", 900)] {
        once.failed(ms(at), addr, refused("connection refused"));
    }
    once.failed(ms(1200), "b:2", refused("connection refused"));
    assert!(!once.nothing_listening(ms(1200), &eps, WINDOW), "c:3 once");
    // Both: give up.
    h.failed(ms(1000), "a:1", refused("connection refused"));
    assert!(h.nothing_listening(ms(1000), &eps, WINDOW));
}

#[test]
fn a_replica_that_answers_or_hangs_means_an_election_may_be_running() {
    let eps = endpoints();
    for other in [
        answered("no leader is known yet"),
        answered("connect timed out"),
    ] {
        let mut h = CallHistory::default();
        for (i, at) in (0..12u64).map(|i| (i, i * 200)) {
            let addr = &eps[i as usize % 3];
            // b:2 is up (answering UNAVAILABLE, or not answering); a:1 and c:3 are down.
            let failure = if addr == "b:2" {
                other.clone()
            } else {
                refused("connection refused")
            };
            h.failed(ms(at), addr, failure);
            assert!(
                !h.nothing_listening(ms(at), &eps, WINDOW),
                "{other:?} at {at} ms"
            );
        }
    }
}

#[test]
fn the_count_starts_again_after_any_answer() {
    let eps = endpoints();
    let mut h = CallHistory::default();
    for (i, at) in [0, 100, 200, 300, 400, 500].into_iter().enumerate() {
        h.failed(ms(at), &eps[i % 3], refused("connection refused"));
    }
    h.failed(ms(600), "a:1", answered("not leader"));
    // The cluster went away after answering: a fresh window from its first refusal.
    for (i, at) in [700, 800, 900, 1000, 1100, 1200].into_iter().enumerate() {
        h.failed(ms(at), &eps[i % 3], refused("connection refused"));
    }
    assert!(!h.nothing_listening(ms(1200), &eps, WINDOW));
    h.failed(ms(1700), "a:1", refused("connection refused"));
    assert!(h.nothing_listening(ms(1700), &eps, WINDOW));
}

#[test]
fn each_address_is_reported_once_with_its_last_cause_in_the_order_first_tried() {
    let mut h = CallHistory::default();
    for addr in ["b:2", "a:1", "b:2", "hinted:9"] {
        h.started(addr);
    }
    h.failed(ms(0), "b:2", answered("no leader is known yet"));
    h.failed(ms(10), "a:1", refused("connection refused"));
    h.failed(ms(20), "b:2", refused("connection refused"));
    let got: Vec<(&str, &str)> = h
        .causes
        .iter()
        .map(|c| (c.address.as_str(), c.cause.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("b:2", "connection refused"),
            ("a:1", "connection refused"),
            // Its try was still running when the deadline came.
            ("hinted:9", "no answer before the deadline"),
        ]
    );
    assert_eq!(h.attempts, 4);
}

#[test]
fn the_error_names_each_address_with_its_cause_and_the_time_in_milliseconds() {
    let endpoints = vec![
        EndpointFailure {
            address: "127.0.0.1:7001".into(),
            cause: "no leader is known yet".into(),
        },
        EndpointFailure {
            address: "127.0.0.1:7002".into(),
            cause: "connection refused".into(),
        },
    ];
    let e = ClientError::Unavailable {
        gave_up: GaveUp::Deadline,
        attempts: 42,
        elapsed: Duration::from_nanos(15_001_683_480),
        endpoints,
        last: Status::unavailable("tcp connect error"),
    };
    assert_eq!(
        e.to_string(),
        "cluster unavailable after 15.002s (42 attempts): 127.0.0.1:7001: no leader is known \
         yet; 127.0.0.1:7002: connection refused"
    );
    let e = ClientError::Unavailable {
        gave_up: GaveUp::NothingListening,
        attempts: 1,
        elapsed: Duration::from_micros(1_049_600),
        endpoints: vec![EndpointFailure {
            address: "127.0.0.1:9999".into(),
            cause: "connection refused".into(),
        }],
        last: Status::unavailable("tcp connect error"),
    };
    assert_eq!(
        e.to_string(),
        "no replica reachable after 1.050s (1 attempt): 127.0.0.1:9999: connection refused"
    );
    assert_eq!(e.code(), Some(Code::Unavailable), "still exit 5 in the CLI");
}

/// An address where nothing listens: bound, then released.
fn closed_address() -> String {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => panic!("bind: {e}"),
    };
    match listener.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => panic!("local_addr: {e}"),
    }
}

#[tokio::test]
async fn a_refused_connection_is_recognised_through_tonic() {
    let client = quick_client();
    let channel = match client.connection(&closed_address()) {
        Ok(c) => c,
        Err(e) => panic!("channel: {e}"),
    };
    let status = match ClusterServiceClient::new(channel)
        .status(pb::StatusRequest {
            local_only: true,
            with_digest: true,
        })
        .await
    {
        Ok(_) => panic!("nothing listens there"),
        Err(s) => s,
    };
    assert!(retryable(&status), "{status:?}");
    assert_eq!(classify(&status, TRY), refused("connection refused"));
}

const TRY: Duration = Duration::from_secs(3);

#[test]
fn a_replica_refusal_is_described_by_its_own_message() {
    assert_eq!(
        classify(&Status::unavailable("no leader is known yet"), TRY),
        answered("no leader is known yet")
    );
    assert_eq!(
        classify(&Status::new(Code::Unknown, ""), TRY),
        answered(Code::Unknown.description())
    );
}

#[test]
fn a_try_cut_short_by_its_grpc_timeout_says_so_like_one_cut_by_the_client() {
    // What tonic returns when the request's own `grpc-timeout` runs out first.
    let status = Status::from_error(Box::new(tonic::TimeoutExpired(())));
    assert!(retryable(&status), "{status:?}");
    assert_eq!(classify(&status, TRY), answered("no answer within 3.000s"));
}

#[tokio::test]
async fn a_call_where_nothing_listens_gives_up_long_before_its_deadline() {
    let (a, b) = (closed_address(), closed_address());
    let mut config = ClientConfig::new(vec![a.clone(), b.clone()]);
    config.timeout = Duration::from_secs(30);
    config.unreachable_timeout = Duration::from_millis(200);
    config.min_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(20);
    let client = match Client::new(config) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    };
    let started = Instant::now();
    let result = client.cluster_status().await;
    let waited = started.elapsed();
    match &result {
        Err(ClientError::Unavailable {
            gave_up, endpoints, ..
        }) => {
            assert_eq!(*gave_up, GaveUp::NothingListening);
            assert_eq!(
                *endpoints,
                [a, b].map(|address| EndpointFailure {
                    address,
                    cause: "connection refused".into()
                })
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(10),
        "gave up after {waited:?}"
    );
}

/// Something accepts TCP but never speaks HTTP/2: like a replica that hangs.
#[tokio::test]
async fn a_call_keeps_trying_until_its_deadline_while_any_endpoint_accepts() {
    let silent = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => panic!("bind: {e}"),
    };
    let silent_addr = match silent.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => panic!("local_addr: {e}"),
    };
    let mut config = ClientConfig::new(vec![closed_address(), silent_addr]);
    config.timeout = Duration::from_millis(1500);
    config.per_try_timeout = Duration::from_millis(100);
    config.unreachable_timeout = Duration::from_millis(200);
    config.min_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(20);
    let client = match Client::new(config) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    };
    let started = Instant::now();
    let result = client.cluster_status().await;
    assert!(
        matches!(
            &result,
            Err(ClientError::Unavailable {
                gave_up: GaveUp::Deadline,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    drop(silent);
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

//! Every row of the error table in docs/api.md ("Errors"), provoked on a real secured
//! cluster with a plain tonic client (no retries, no leader following), so that each
//! code is the one a replica sent. A status that tonic made in this process (its own
//! deadline timer, a broken connection) carries a transport `source`; every assertion
//! here also checks that there is none, i.e. that the replica answered.
//!
//! INTERNAL (a bug, such as a state that cannot be encoded) cannot be provoked from
//! outside; `server::status`'s unit tests check its mapping.

use std::time::Duration;

use dispatcher_proto::headers::{FORWARDED, LEADER_ADDRESS, LEADER_ID};
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::{spec, wait_for, ProcCluster};
use pb::cluster_service_client::ClusterServiceClient;
use pb::job_service_client::JobServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

const STARTUP: Duration = Duration::from_secs(30);

/// The caller's deadline in the calls that are meant to run out of time.
const SHORT: Duration = Duration::from_millis(500);

/// A raw TLS channel to `addr` trusting the cluster's CA.
fn channel(c: &ProcCluster, addr: &str) -> Channel {
    let sec = c.security.as_ref().expect("a secured cluster");
    let ca = std::fs::read(sec.ca()).expect("ca");
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy()
}

fn jobs(c: &ProcCluster, addr: &str) -> JobServiceClient<Channel> {
    JobServiceClient::new(channel(c, addr))
}

/// A request with `token` (if any) and the caller's deadline `timeout` (if any).
fn call<T>(message: T, token: Option<&str>, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(token) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    if let Some(t) = timeout {
        r.set_timeout(t);
    }
    r
}

/// The error of a call that must fail with `code`, sent by the replica (not made here
/// by tonic, whose statuses carry the transport error as their source).
fn refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>, code: Code) -> Status {
    let status = match result {
        Ok(answer) => panic!("expected {code:?}, got an answer: {answer:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        std::error::Error::source(&status).is_none(),
        "the replica must have sent this status, not tonic in this process: {status:?}"
    );
    status
}

fn hint(status: &Status) -> (Option<String>, Option<String>) {
    let get = |key| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    (get(LEADER_ADDRESS), get(LEADER_ID))
}

fn submit(job_id: &str, name: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        job_id: job_id.into(),
        spec: Some(spec::sleep_job(name, 1)),
    }
}

/// The leader replica `id` itself knows of (0: none), if it answers.
async fn leader_seen_by(c: &ProcCluster, id: u64, admin: &str) -> Option<u64> {
    let answer = ClusterServiceClient::new(channel(c, &c.procs[&id].addr))
        .status(call(
            pb::StatusRequest {
                local_only: true,
                with_digest: false,
            },
            Some(admin),
            Some(Duration::from_secs(2)),
        ))
        .await
        .ok()?
        .into_inner();
    answer
        .replicas
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.leader_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_error_table_is_what_a_replica_answers() {
    // Elections take seconds here (a follower waits the lease, 2 s, plus 1.5-2 s), so
    // that a follower keeps naming a stopped leader while the calls below run.
    let mut c = ProcCluster::start_with(
        3,
        &[
            "--election-timeout-min-ms",
            "1500",
            "--election-timeout-max-ms",
            "2000",
        ],
    );
    let client = c.client();
    let leader = c.leader(&client, STARTUP, "startup").await;
    let admin_secret = c.security.as_ref().expect("secured").admin_secret();
    let admin = Some(admin_secret.as_str());
    let leader_addr = c.procs[&leader].addr.clone();
    let follower = c.follower_addr(leader);
    let at_follower = jobs(&c, &follower);

    // INVALID_ARGUMENT, named field; the leader's answer passes the follower unchanged.
    let s = refused(
        at_follower
            .clone()
            .submit_job(call(submit("not-a-uuid", "bad"), admin, None))
            .await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("job_id"), "{s:?}");

    // UNAUTHENTICATED: no token, or one nobody issued.
    let list = || pb::ListJobsRequest::default();
    refused(
        at_follower
            .clone()
            .list_jobs(call(list(), None, None))
            .await,
        Code::Unauthenticated,
    );
    let stranger = "0".repeat(64);
    refused(
        at_follower
            .clone()
            .list_jobs(call(list(), Some(&stranger), None))
            .await,
        Code::Unauthenticated,
    );

    // PERMISSION_DENIED: a read token cannot submit.
    let reader = client
        .create_token("reader", pb::TokenRole::Read, vec![])
        .await
        .expect("a read token")
        .secret;
    let id = uuid::Uuid::new_v4().to_string();
    refused(
        at_follower
            .clone()
            .submit_job(call(submit(&id, "denied"), Some(&reader), None))
            .await,
        Code::PermissionDenied,
    );

    // NOT_FOUND: an unknown job.
    refused(
        at_follower
            .clone()
            .get_job(call(
                pb::GetJobRequest {
                    job_id: id.clone(),
                    stale: false,
                },
                admin,
                None,
            ))
            .await,
        Code::NotFound,
    );

    // ALREADY_EXISTS: the same job id with another spec.
    at_follower
        .clone()
        .submit_job(call(submit(&id, "first"), admin, None))
        .await
        .expect("the first submission");
    refused(
        at_follower
            .clone()
            .submit_job(call(submit(&id, "second"), admin, None))
            .await,
        Code::AlreadyExists,
    );

    // FAILED_PRECONDITION: revoking the last admin token.
    refused(
        ClusterServiceClient::new(channel(&c, &follower))
            .revoke_token(call(
                pb::RevokeTokenRequest {
                    name: "admin".into(),
                },
                admin,
                None,
            ))
            .await,
        Code::FailedPrecondition,
    );

    // OUT_OF_RANGE: a request above the 4 MiB decoding limit.
    let mut huge = submit(&uuid::Uuid::new_v4().to_string(), "huge");
    if let Some(spec) = huge.spec.as_mut() {
        spec.name = "x".repeat(5 << 20);
    }
    refused(
        at_follower
            .clone()
            .submit_job(call(huge, admin, None))
            .await,
        Code::OutOfRange,
    );

    // UNAVAILABLE with the leader hint: a call another replica already forwarded, which
    // a follower does not forward again.
    let mut forwarded = call(list(), admin, None);
    forwarded
        .metadata_mut()
        .insert(FORWARDED, "1".parse().expect("ascii"));
    let s = refused(
        at_follower.clone().list_jobs(forwarded).await,
        Code::Unavailable,
    );
    assert_eq!(
        hint(&s),
        (Some(leader_addr.clone()), Some(leader.to_string())),
        "{s:?}"
    );

    // DEADLINE_EXCEEDED: a leader cut off from its followers cannot commit a write
    // before the caller's deadline, and says so in time (not CANCELLED, which is what
    // tonic itself answers when the deadline passes first). A linearizable read learns
    // at once that no quorum confirms the leader: UNAVAILABLE, without waiting.
    let followers: Vec<u64> = c.procs.keys().copied().filter(|&id| id != leader).collect();
    for &id in &followers {
        c.signal(id, "STOP");
    }
    let at_leader = jobs(&c, &leader_addr);
    let s = refused(
        at_leader
            .clone()
            .submit_job(call(
                submit(&uuid::Uuid::new_v4().to_string(), "no-quorum"),
                admin,
                Some(SHORT),
            ))
            .await,
        Code::DeadlineExceeded,
    );
    assert!(s.message().contains("deadline"), "{s:?}");
    let s = refused(
        at_leader
            .clone()
            .get_job(call(
                pb::GetJobRequest {
                    job_id: id.clone(),
                    stale: false,
                },
                admin,
                Some(Duration::from_secs(10)),
            ))
            .await,
        Code::Unavailable,
    );
    assert!(s.message().contains("quorum"), "{s:?}");
    for &id in &followers {
        c.signal(id, "CONT");
    }
    let leader = c.leader(&client, STARTUP, "followers resumed").await;
    let leader_addr = c.procs[&leader].addr.clone();
    let follower = c.follower_addr(leader);
    let at_follower = jobs(&c, &follower);
    // The follower has a connection to this leader, as it would in service.
    at_follower
        .clone()
        .list_jobs(call(list(), admin, Some(Duration::from_secs(10))))
        .await
        .expect("a forwarded read");

    // UNAVAILABLE with the hint when the follower cannot get the leader's answer: a
    // stopped leader never answers...
    c.signal(leader, "STOP");
    let s = refused(
        at_follower
            .clone()
            .submit_job(call(
                submit(&uuid::Uuid::new_v4().to_string(), "leader-stopped"),
                admin,
                Some(SHORT),
            ))
            .await,
        Code::Unavailable,
    );
    assert_eq!(
        hint(&s),
        (Some(leader_addr.clone()), Some(leader.to_string())),
        "{s:?}"
    );
    assert!(s.message().contains("forwarding to the leader"), "{s:?}");
    // A dead one is not pointed at: its closed connections and refused port tell the
    // follower at once that its process is gone (raft::succession), so the follower
    // knows no leader, stands, and answers as without one. The third replica is stopped
    // first, so that no new leader can be elected meanwhile.
    let third = c
        .procs
        .keys()
        .copied()
        .find(|&id| id != leader && c.procs[&id].addr != follower)
        .expect("a third replica");
    c.signal(third, "STOP");
    c.kill(leader);
    let s = refused(
        at_follower
            .clone()
            .submit_job(call(
                submit(&uuid::Uuid::new_v4().to_string(), "leader-dead"),
                admin,
                Some(SHORT),
            ))
            .await,
        Code::DeadlineExceeded,
    );
    assert!(s.message().contains("no leader was known"), "{s:?}");
    assert_eq!(hint(&s), (None, None), "a dead leader is not named: {s:?}");
    c.signal(third, "CONT");

    // With no leader at all: DEADLINE_EXCEEDED when the caller's deadline passes while
    // the replica waits for one, UNAVAILABLE without a hint after 5 s without a deadline.
    let dead = leader;
    let leader = c.leader(&client, STARTUP, "the survivors elect").await;
    c.signal(leader, "STOP");
    let alone = c
        .procs
        .keys()
        .copied()
        .find(|&id| id != leader && id != dead)
        .expect("a third replica");
    wait_for(
        Duration::from_secs(30),
        "the last replica to know no leader",
        || async { (leader_seen_by(&c, alone, &admin_secret).await == Some(0)).then_some(()) },
    )
    .await;
    let at_alone = jobs(&c, &c.procs[&alone].addr);
    let s = refused(
        at_alone
            .clone()
            .submit_job(call(
                submit(&uuid::Uuid::new_v4().to_string(), "no-leader"),
                admin,
                Some(SHORT),
            ))
            .await,
        Code::DeadlineExceeded,
    );
    assert!(s.message().contains("no leader"), "{s:?}");
    let s = refused(
        at_alone
            .clone()
            .submit_job(call(
                submit(&uuid::Uuid::new_v4().to_string(), "no-leader-no-deadline"),
                admin,
                None,
            ))
            .await,
        Code::Unavailable,
    );
    assert_eq!(hint(&s), (None, None), "{s:?}");
    assert!(s.message().contains("no leader"), "{s:?}");
}

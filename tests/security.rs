//! The trust boundaries of a secured cluster (TLS, tokens with roles, replica
//! certificates), tried the way a hostile client would: each attack is refused with its
//! documented code, and the cluster serves normally right after.

use std::time::Duration;

use dispatcher_client::{Client, ClientError};
use dispatcher_core::codec;
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::{spec, ProcCluster};
use pb::cluster_service_client::ClusterServiceClient;
use pb::job_service_client::JobServiceClient;
use pb::raft_service_client::RaftServiceClient;
use pb::task_manager_service_client::TaskManagerServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const STARTUP: Duration = Duration::from_secs(30);

fn code(e: &ClientError) -> Option<Code> {
    e.code()
}

/// A raw TLS channel to `addr` trusting the cluster's CA, presenting `identity`
/// (`client`, `replica-3`, ...) if given.
fn channel(c: &ProcCluster, addr: &str, identity: Option<&str>) -> Channel {
    let sec = c.security.as_ref().expect("a secured cluster");
    let ca = std::fs::read(sec.ca()).expect("ca");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(name) = identity {
        let cert = std::fs::read(sec.dir.join(format!("{name}.crt"))).expect("cert");
        let key = std::fs::read(sec.dir.join(format!("{name}.key"))).expect("key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy()
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r.set_timeout(Duration::from_secs(10));
    r
}

/// A vote request as openraft encodes it, from `node` at `term`.
fn vote_payload(term: u64, node: u64) -> Vec<u8> {
    let req: openraft::raft::VoteRequest<u64> =
        openraft::raft::VoteRequest::new(openraft::Vote::new(term, node), None);
    codec::encode(&req).expect("encode")
}

async fn healthy(c: &ProcCluster, client: &Client, why: &str) {
    let resp = client
        .submit_job(None, spec::sleep_job(why, 1))
        .await
        .unwrap_or_else(|e| panic!("{why}: the cluster no longer accepts a submission: {e}"));
    assert!(resp.created);
    c.converged(client, STARTUP, why).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_wrong_roles_and_forged_peers_are_refused_and_the_cluster_serves_on() {
    let (mut c, admin, leader) = ProcCluster::start_elected(3, STARTUP).await;
    let follower = c.follower_addr(leader);
    c.start_tm("tm-1", 2, &[]);

    // Plain text to a TLS port: no answer at all.
    let plain = Endpoint::from_shared(format!("http://{follower}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut req = tonic::Request::new(pb::ListJobsRequest::default());
    req.set_timeout(Duration::from_secs(3));
    let err = JobServiceClient::new(plain)
        .list_jobs(req)
        .await
        .expect_err("a plain-text call to a TLS port must fail");
    assert_ne!(err.code(), Code::Ok);

    // TLS without a token, and with a token nobody issued.
    let tls = channel(&c, &follower, None);
    let mut req = tonic::Request::new(pb::ListJobsRequest::default());
    req.set_timeout(Duration::from_secs(10));
    let err = JobServiceClient::new(tls.clone())
        .list_jobs(req)
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("read"), "names the role: {err}");
    let err = JobServiceClient::new(tls.clone())
        .list_jobs(with_token(pb::ListJobsRequest::default(), &"0".repeat(64)))
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // A read token may read, not submit; its reads hide env values.
    let read = admin
        .create_token("reader", pb::TokenRole::Read, vec![])
        .await
        .expect("create a read token")
        .secret;
    let reader = c.client_with_token(Some(&read));
    let err = reader
        .submit_job(None, spec::sleep_job("refused", 1))
        .await
        .expect_err("a read token cannot submit");
    assert_eq!(code(&err), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("admin or submit"), "{err}");
    let job = spec::JobBuilder::new("secret-env")
        .vertex(
            "v",
            1,
            spec::command_with_env(&["sleep", "600"], [("API_KEY", "hunter2")]),
        )
        .build();
    let submitted = admin.submit_job(None, job).await.expect("admin submits");
    let env_of = |s: &pb::JobStatus| -> String {
        let task = s.spec.as_ref().expect("spec").vertices[0]
            .task
            .clone()
            .expect("task");
        match task.kind.expect("kind") {
            pb::task::Kind::Command(cmd) => cmd.env["API_KEY"].clone(),
            other => panic!("unexpected task {other:?}"),
        }
    };
    let seen_by_reader = reader
        .get_job(&submitted.job_id, false)
        .await
        .expect("read");
    assert_eq!(env_of(&seen_by_reader), "<redacted>");
    let seen_by_admin = admin.get_job(&submitted.job_id, false).await.expect("read");
    assert_eq!(env_of(&seen_by_admin), "hunter2");
    // Nor through the TaskManagers' list of what they run.
    let job_id = submitted.job_id.clone();
    let as_reader = dispatcher_testkit::wait_for(STARTUP, "the job runs on tm-1", || {
        listed_env(reader.clone(), job_id.clone())
    })
    .await;
    assert_eq!(as_reader, "<redacted>");
    assert_eq!(
        listed_env(admin.clone(), job_id.clone()).await.as_deref(),
        Some("hunter2")
    );

    // A submit token cannot change membership or take a backup.
    let submit = admin
        .create_token("ci", pb::TokenRole::Submit, vec![])
        .await
        .expect("create a submit token")
        .secret;
    // Nor guess env values by resubmitting a job: a right and a wrong guess get the same
    // answer (an admin, who may see the values, is told the spec differs).
    let guess = |value: &str| {
        spec::JobBuilder::new("secret-env")
            .vertex(
                "v",
                1,
                spec::command_with_env(&["sleep", "600"], [("API_KEY", value)]),
            )
            .build()
    };
    let submitter = c.client_with_token(Some(&submit));
    for value in ["hunter2", "wrong-guess"] {
        let again = submitter
            .submit_job(Some(submitted.job_id.clone()), guess(value))
            .await
            .expect("the same answer whatever the guess");
        assert!(!again.created);
    }
    let err = admin
        .submit_job(Some(submitted.job_id.clone()), guess("wrong-guess"))
        .await
        .expect_err("an admin learns the spec differs");
    assert_eq!(code(&err), Some(Code::AlreadyExists), "{err}");
    let err = ClusterServiceClient::new(tls.clone())
        .remove_node(with_token(pb::RemoveNodeRequest { node_id: 3 }, &submit))
        .await
        .expect_err("membership needs admin");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = ClusterServiceClient::new(tls.clone())
        .add_node(with_token(
            pb::AddNodeRequest {
                node_id: 99,
                address: "127.0.0.1:1".into(),
                promote: true,
            },
            &submit,
        ))
        .await
        .expect_err("membership needs admin");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = ClusterServiceClient::new(tls.clone())
        .snapshot(with_token(pb::SnapshotRequest {}, &submit))
        .await
        .expect_err("a backup needs admin");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // Raft traffic from outside: without a certificate, with a client certificate, and
    // with another replica's certificate claiming a non-member's id, at an absurd term.
    for (identity, sender) in [(None, 1), (Some("client"), 1), (Some("replica-3"), 99)] {
        let mut raft = RaftServiceClient::new(channel(&c, &follower, identity));
        let err = raft
            .vote(pb::RaftMessage {
                payload: vote_payload(u64::MAX, sender),
                cluster_id: String::new(),
            })
            .await
            .expect_err("a forged vote must be refused");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{identity:?} as {sender}: {err}"
        );
    }

    // A revoked token is refused at once.
    admin.revoke_token("reader").await.expect("revoke");
    let err = reader
        .get_job(&submitted.job_id, false)
        .await
        .expect_err("revoked");
    assert_eq!(code(&err), Some(Code::Unauthenticated), "{err}");

    healthy(&c, &admin, "after the attacks").await;
    let term_after = c
        .statuses(&admin)
        .await
        .values()
        .map(|s| s.term)
        .max()
        .unwrap_or(0);
    assert!(
        term_after < 1000,
        "no forged term reached a replica: {term_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_manager_token_acts_only_for_its_own_ids_and_registrations() {
    let (c, admin, leader) = ProcCluster::start_elected(3, STARTUP).await;
    let leader_addr = c.procs[&leader].addr.clone();
    let tls = channel(&c, &leader_addr, None);
    let mine = admin
        .create_token(
            "tm-a-token",
            pb::TokenRole::TaskManager,
            vec!["tm-a".into()],
        )
        .await
        .expect("token")
        .secret;
    let other = admin
        .create_token(
            "pool-token",
            pb::TokenRole::TaskManager,
            vec!["tm-*".into()],
        )
        .await
        .expect("token")
        .secret;
    let register = |id: &str, instance: &str| pb::RegisterRequest {
        task_manager_id: id.into(),
        instance_id: instance.into(),
        address: "fake:1".into(),
        slots: 1024,
        ..Default::default()
    };
    let mut tms = TaskManagerServiceClient::new(tls);
    // A client token cannot pose as a TaskManager to receive other jobs' tasks.
    let err = tms
        .register(with_token(
            register("tm-fake", "i1"),
            &read_token(&admin).await,
        ))
        .await
        .expect_err("a read token is no TaskManager");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = tms
        .register(with_token(register("tm-b", "i1"), &mine))
        .await
        .expect_err("not bound to tm-b");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    tms.register(with_token(register("tm-a", "i1"), &mine))
        .await
        .expect("its own id");

    // Another TaskManager token cannot take the live id over, heartbeat for it or
    // unregister it, although its binding covers the id.
    let err = tms
        .register(with_token(register("tm-a", "i2"), &other))
        .await
        .expect_err("the id is taken");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let hb = pb::HeartbeatRequest {
        task_manager_id: "tm-a".into(),
        instance_id: "i1".into(),
        ..Default::default()
    };
    let err = tms
        .heartbeat(with_token(hb.clone(), &other))
        .await
        .expect_err("not its registration");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let unregister = pb::UnregisterRequest {
        task_manager_id: "tm-a".into(),
        instance_id: "i1".into(),
    };
    let err = tms
        .unregister(with_token(unregister.clone(), &other))
        .await
        .expect_err("not its registration");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // The owner's own calls work, and the registration is intact.
    let answer = tms
        .heartbeat(with_token(hb, &mine))
        .await
        .expect("the owner heartbeats")
        .into_inner();
    assert!(answer.registered, "the intruders changed nothing");
    tms.unregister(with_token(unregister, &mine))
        .await
        .expect("the owner leaves");
    healthy(&c, &admin, "after the TaskManager attacks").await;
}

/// The `API_KEY` env value of `job_id`'s running task as ListTaskManagers shows it to
/// `client`, once a TaskManager runs it.
async fn listed_env(client: Client, job_id: String) -> Option<String> {
    let tms = client.list_task_managers(false).await.ok()?;
    let task = tms
        .iter()
        .flat_map(|tm| tm.running.iter())
        .find(|a| a.job_id == job_id)?
        .task
        .clone()?;
    match task.kind? {
        pb::task::Kind::Command(cmd) => cmd.env.get("API_KEY").cloned(),
        _ => None,
    }
}

async fn read_token(admin: &Client) -> String {
    admin
        .create_token("read-for-tm-test", pb::TokenRole::Read, vec![])
        .await
        .expect("token")
        .secret
}

#[test]
fn a_replica_refuses_a_non_loopback_plain_text_listener_unless_told_insecure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = dispatcher_testkit::free_ports(1).expect("port")[0];
    let out = std::process::Command::new(dispatcher_testkit::cluster::dispatcher_bin())
        .args(["--id", "1", "--listen", &format!("0.0.0.0:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .output()
        .expect("run dispatcher");
    assert_eq!(
        out.status.code(),
        Some(2),
        "refused as a configuration error"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen")
            && stderr.contains("--insecure")
            && stderr.contains("--tls-cert"),
        "the message names the way out: {stderr}"
    );
    assert!(!dir.path().join("d").exists(), "nothing was created");
}

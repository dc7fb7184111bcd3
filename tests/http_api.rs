//! The HTTP listener on real replicas: Flink's REST routes answer in Flink's shapes
//! (ids as 32 hex digits, either id form accepted), a follower answers as the leader
//! would, cancel goes through, unknown and unsupported routes get Flink's error body,
//! `/metrics` exposes the documented metrics, the dashboard is served; and on a secured
//! cluster HTTPS with the cluster's CA, 401 without a token, 403 for a role that may not.

use std::time::Duration;

use dispatcher_client::Client;
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::http::{call, Answer};
use dispatcher_testkit::spec::{sleep, JobBuilder};
use dispatcher_testkit::{wait_for, ProcCluster};

const T: Duration = Duration::from_secs(40);

async fn get(c: &ProcCluster, id: u64, path: &str, token: Option<&str>) -> Answer {
    let ca = c.security.as_ref().map(|s| s.ca());
    call(
        "GET",
        &format!("{}{path}", c.http_url(id)),
        token,
        ca.as_deref(),
    )
    .await
}

async fn patch(c: &ProcCluster, id: u64, path: &str, token: Option<&str>) -> Answer {
    let ca = c.security.as_ref().map(|s| s.ca());
    call(
        "PATCH",
        &format!("{}{path}", c.http_url(id)),
        token,
        ca.as_deref(),
    )
    .await
}

async fn job_state(client: &Client, id: &str, want: pb::JobState) {
    wait_for(T, &format!("job {id} reaches {want:?}"), || async {
        let job = client.get_job(id, false).await.ok()?;
        (job.state == want as i32).then_some(())
    })
    .await;
}

fn errors(a: &Answer) -> String {
    let body = a.json();
    let list = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("Flink's error shape, got {}", a.body));
    assert!(!list.is_empty(), "at least one error");
    list.iter()
        .filter_map(|e| e.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test(flavor = "multi_thread")]
async fn flink_routes_answer_in_flinks_shapes_on_every_replica() {
    let mut c = ProcCluster::start_http(3, false);
    let client = c.client();
    let leader = c.leader(&client, T, "startup").await;
    let follower = c
        .procs
        .keys()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    c.start_tm("tm-1", 4, &[]);
    wait_for(T, "the TaskManager registers", || async {
        let tms = client.list_task_managers(false).await.ok()?;
        (!tms.is_empty()).then_some(())
    })
    .await;

    let spec = JobBuilder::new("etl")
        .vertex("source", 2, sleep(60_000))
        .vertex("sink", 1, sleep(60_000))
        .edge("source", "sink")
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    job_state(&client, &id, pb::JobState::Running).await;
    let jid = id.replace('-', "");

    // A follower answers what the leader holds (it forwards the linearizable reads).
    let overview = get(&c, follower, "/jobs/overview", None).await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.content_type.starts_with("application/json"));
    let jobs = overview.json();
    let job = &jobs["jobs"][0];
    assert_eq!(job["jid"], jid.as_str(), "32 hex digits: {job}");
    assert_eq!(job["name"], "etl");
    assert_eq!(job["state"], "RUNNING");
    assert_eq!(job["end-time"], -1);
    assert_eq!(job["tasks"]["total"], 3);
    for key in [
        "created",
        "scheduled",
        "deploying",
        "running",
        "finished",
        "canceling",
        "canceled",
        "failed",
        "reconciling",
        "initializing",
    ] {
        assert!(job["tasks"][key].is_u64(), "tasks.{key} in {job}");
    }

    // Under /v1 too, where Flink's own clients send their calls.
    let list = get(&c, leader, "/v1/jobs", None).await.json();
    assert_eq!(list["jobs"][0]["id"], jid.as_str());
    assert_eq!(list["jobs"][0]["status"], "RUNNING");

    // A job by either id form.
    for form in [jid.as_str(), id.as_str()] {
        let details = get(&c, follower, &format!("/jobs/{form}"), None).await;
        assert_eq!(details.status, 200, "{}", details.body);
        let d = details.json();
        assert_eq!(d["jid"], jid.as_str());
        assert_eq!(d["vertices"].as_array().map(Vec::len), Some(2));
        assert_eq!(d["vertices"][0]["parallelism"], 2);
        assert_eq!(d["vertices"][0]["id"].as_str().map(str::len), Some(32));
        assert_eq!(
            d["plan"]["nodes"][1]["inputs"][0]["id"],
            d["vertices"][0]["id"]
        );
        let sub = &d["vertices"][0]["subtasks"][0];
        assert_eq!(sub["taskmanager-id"], "tm-1", "{sub}");
        assert!(sub["slot"].is_u64(), "{sub}");
    }
    let checkpoints = get(&c, leader, &format!("/jobs/{jid}/checkpoints"), None)
        .await
        .json();
    assert_eq!(checkpoints["counts"]["completed"], 0);
    let exceptions = get(&c, leader, &format!("/jobs/{jid}/exceptions"), None)
        .await
        .json();
    assert!(exceptions["exceptionHistory"]["entries"].is_array());

    let tms = get(&c, follower, "/taskmanagers", None).await.json();
    assert_eq!(tms["taskmanagers"][0]["id"], "tm-1");
    assert_eq!(tms["taskmanagers"][0]["slotsNumber"], 4);
    assert_eq!(tms["taskmanagers"][0]["freeSlots"], 1);
    let tm = get(&c, follower, "/taskmanagers/tm-1", None).await.json();
    assert_eq!(tm["assignedTasks"], 3);
    let overview = get(&c, follower, "/overview", None).await.json();
    assert_eq!(overview["taskmanagers"], 1);
    assert_eq!(overview["slots-total"], 4);
    assert_eq!(overview["jobs-running"], 1);
    let config = get(&c, follower, "/config", None).await.json();
    assert_eq!(config["features"]["web-submit"], false);
    let cluster = get(&c, follower, "/dispatcher/cluster", None).await.json();
    assert_eq!(cluster["leader-id"], leader);
    assert_eq!(cluster["replicas"].as_array().map(Vec::len), Some(3));

    // Unknown things get Flink's error shape, never a success.
    let unknown = get(&c, leader, "/jobs/00000000000000000000000000000000", None).await;
    assert_eq!(unknown.status, 404);
    assert!(errors(&unknown).contains("not found"), "{}", unknown.body);
    let bad = get(&c, leader, "/jobs/not-an-id", None).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    errors(&bad);
    // Refusals axum makes before any handler runs have the same shape.
    let undecodable = get(&c, leader, "/jobs/%FF%FE/checkpoints", None).await;
    assert_eq!(undecodable.status, 400, "{}", undecodable.body);
    errors(&undecodable);
    let method = call(
        "DELETE",
        &format!("{}/jobs/{jid}", c.http_url(leader)),
        None,
        None,
    )
    .await;
    assert_eq!(method.status, 405, "{}", method.body);
    errors(&method);
    let nowhere = get(&c, leader, "/no/such/route", None).await;
    assert_eq!(nowhere.status, 404);
    assert!(errors(&nowhere).contains("Not found"));
    let savepoint = call(
        "POST",
        &format!("{}/jobs/{jid}/savepoints", c.http_url(leader)),
        None,
        None,
    )
    .await;
    assert_eq!(savepoint.status, 501);
    assert!(errors(&savepoint).contains("savepoints are not supported"));
    let stop = patch(&c, leader, &format!("/jobs/{jid}?mode=stop"), None).await;
    assert_eq!(stop.status, 501, "{}", stop.body);
    job_state(&client, &id, pb::JobState::Running).await;

    // Cancel, through a follower, as Flink's CLI does it.
    let cancel = patch(&c, follower, &format!("/jobs/{jid}?mode=cancel"), None).await;
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    assert_eq!(cancel.json(), serde_json::json!({}));
    job_state(&client, &id, pb::JobState::Canceled).await;
    let again = patch(&c, follower, &format!("/jobs/{jid}?mode=cancel"), None).await;
    assert_eq!(
        again.status, 202,
        "cancelling a cancelled job is idempotent: {}",
        again.body
    );

    // Metrics on every replica.
    for r in [leader, follower] {
        let m = get(&c, r, "/metrics", None).await;
        assert_eq!(m.status, 200);
        for name in [
            "dispatcher_raft_term ",
            "dispatcher_raft_role{state=\"leader\"}",
            "dispatcher_raft_commit_index ",
            "dispatcher_raft_log_sync_seconds_bucket",
            "dispatcher_jobs{state=\"CANCELED\"} 1",
            "dispatcher_slots_total 4",
            "dispatcher_taskmanagers_alive 1",
            "# EOF",
        ] {
            assert!(
                m.body.contains(name),
                "replica {r}: {name} missing from\n{}",
                m.body
            );
        }
    }
    let m = get(&c, follower, "/metrics", None).await;
    assert!(
        m.body
            .contains("dispatcher_requests_forwarded_total{rpc=\"list_jobs\"}"),
        "{}",
        m.body
    );
    let m = get(&c, leader, "/metrics", None).await;
    assert!(
        m.body
            .contains("dispatcher_requests_rejected_total{rpc=\"get_job\",code=\"NotFound\"}"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("dispatcher_raft_replication_lag_entries{peer="),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("dispatcher_taskmanager_heartbeat_age_seconds{task_manager=\"tm-1\"}"),
        "{}",
        m.body
    );

    // The dashboard.
    let page = get(&c, follower, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page.body.contains("/assets/app.js"));
    let js = get(&c, follower, "/assets/app.js", None).await;
    assert_eq!(js.status, 200);
    assert!(js.content_type.starts_with("text/javascript"));
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_the_cluster_ca_and_the_same_tokens_and_roles_as_grpc() {
    let c = ProcCluster::start_http(3, true);
    let admin = c.client();
    let leader = c.leader(&admin, T, "startup").await;
    let follower = c
        .procs
        .keys()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    let secret = c.security.as_ref().expect("secured").admin_secret();
    let read = admin
        .create_token("http-reader", pb::TokenRole::Read, vec![])
        .await
        .expect("a read token")
        .secret;
    let submit = admin
        .create_token("http-submitter", pb::TokenRole::Submit, vec![])
        .await
        .expect("a submit token")
        .secret;
    // No TaskManager: the job waits in the queue (CREATED), which is enough to cancel.
    let id = admin
        .submit_job(
            None,
            JobBuilder::new("queued")
                .vertex("v", 1, sleep(1000))
                .build(),
        )
        .await
        .expect("submit")
        .job_id;
    let jid = id.replace('-', "");

    for r in [leader, follower] {
        let none = get(&c, r, "/jobs/overview", None).await;
        assert_eq!(none.status, 401, "{}", none.body);
        assert!(errors(&none).contains("needs a token"), "{}", none.body);
        let wrong = get(
            &c,
            r,
            "/jobs/overview",
            Some("not-a-token-of-this-cluster-0123456789"),
        )
        .await;
        assert_eq!(wrong.status, 401, "{}", wrong.body);
        for path in [
            "/metrics",
            "/config",
            "/overview",
            "/taskmanagers",
            "/dispatcher/cluster",
        ] {
            assert_eq!(
                get(&c, r, path, None).await.status,
                401,
                "{path} needs a token"
            );
            assert_eq!(
                get(&c, r, path, Some(&read)).await.status,
                200,
                "{path} with a read token"
            );
        }
        let ok = get(&c, r, "/jobs/overview", Some(&read)).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(ok.json()["jobs"][0]["jid"], jid.as_str());
        // The page itself holds no data: served without a token.
        assert_eq!(get(&c, r, "/", None).await.status, 200);
    }

    let denied = patch(
        &c,
        follower,
        &format!("/jobs/{jid}?mode=cancel"),
        Some(&read),
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(
        errors(&denied).contains("admin or submit"),
        "{}",
        denied.body
    );
    job_state(&admin, &id, pb::JobState::Created).await;
    let cancelled = patch(
        &c,
        follower,
        &format!("/jobs/{jid}?mode=cancel"),
        Some(&submit),
    )
    .await;
    assert_eq!(cancelled.status, 202, "{}", cancelled.body);
    job_state(&admin, &id, pb::JobState::Canceled).await;
    // The follower refused it itself: it knows the token and its role.
    let m = get(&c, follower, "/metrics", Some(&secret)).await;
    assert!(
        m.body.contains(
            "dispatcher_requests_rejected_total{rpc=\"cancel_job\",code=\"PermissionDenied\"}"
        ),
        "{}",
        m.body
    );
}

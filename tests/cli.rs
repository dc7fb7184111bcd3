//! End-to-end tests of `dispatchctl` and the client library against a real three-replica
//! cluster of `dispatcher` processes on loopback.

use std::process::Command;
use std::time::Duration;

use dispatcher_client::new_job_id;
use dispatcher_testkit::spec::sleep_job;
use dispatcher_testkit::ProcCluster;

const T: Duration = Duration::from_secs(30);

fn ctl(endpoints: &str, args: &[&str]) -> (i32, String, String) {
    ctl_within("20", endpoints, args)
}

fn ctl_within(timeout: &str, endpoints: &str, args: &[&str]) -> (i32, String, String) {
    dispatcher_testkit::dispatchctl(endpoints, timeout, args)
}

fn write_spec(dir: &std::path::Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write spec");
    path.to_str().expect("utf-8").to_string()
}

const SPEC: &str = "name = \"cli-test\"\n[[vertices]]\nname = \"a\"\nparallelism = 2\ntask = { sleep = { duration_ms = 60000 } }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_through_a_follower_then_list_status_and_cancel_on_every_replica() {
    let (c, _, leader) = ProcCluster::start_elected(3, T).await;
    let follower = c.follower_addr(leader);
    let spec = write_spec(c.dir.path(), "job.toml", SPEC);

    let (code, out, err) = ctl(&follower, &["job", "submit", &spec]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "submit prints the job id: {out:?}"
    );

    for p in c.procs.values() {
        // Linearizable (forwarded to the leader) and local reads, through each replica.
        let (code, out, err) = ctl(&p.addr, &["job", "status", &id]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("CREATED") && out.contains("SCHEDULED"),
            "{out}"
        );
        let listed = dispatcher_testkit::wait_for(T, "the replica applied the job", || async {
            let (code, out, _) = ctl(&p.addr, &["-o", "json", "job", "list", "--stale"]);
            (code == 0 && out.contains(&id)).then_some(out)
        })
        .await;
        let v: serde_json::Value = serde_json::from_str(&listed).expect("json list");
        assert_eq!(v.as_array().map(|a| a.len()), Some(1));
        assert_eq!(v[0]["state"], "CREATED");
    }
    let (code, out, _) = ctl(&follower, &["job", "list", "--state", "running"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&id), "the state filter applies");

    let (code, out, err) = ctl(&follower, &["job", "cancel", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CANCELED"), "{out}");
    let (code, _, _) = ctl(&follower, &["job", "cancel", &id]);
    assert_eq!(code, 0, "cancel is idempotent");
    let (code, out, _) = ctl(&follower, &["-o", "json", "job", "status", &id]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json status");
    assert_eq!(v["state"], "CANCELED");
    assert_eq!(v["tasks"][0]["state"], "CANCELED");

    let (code, out, _) = ctl(
        &c.endpoints().join(","),
        &["-o", "json", "cluster", "status"],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json cluster status");
    assert_eq!(v["replicas"].as_array().map(|a| a.len()), Some(3));
    assert_eq!(v["leader_id"], leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_submission_retried_three_times_is_one_job() {
    let (c, client, _) = ProcCluster::start_elected(3, T).await;
    let spec = write_spec(c.dir.path(), "job.toml", SPEC);
    let id = new_job_id();
    let mut created = vec![];
    for endpoint in c.endpoints() {
        let (code, out, err) = ctl(
            &endpoint,
            &["-o", "json", "job", "submit", &spec, "--id", &id],
        );
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["job_id"], id.as_str());
        created.push(v["created"].as_bool().expect("created flag"));
    }
    assert_eq!(created, vec![true, false, false]);
    let jobs = client
        .list_all_jobs(Default::default())
        .await
        .expect("list");
    assert_eq!(jobs.len(), 1);

    // The same id with another spec is refused, naming the file.
    let other = write_spec(
        c.dir.path(),
        "other.toml",
        &SPEC.replace("parallelism = 2", "parallelism = 3"),
    );
    let (code, _, err) = ctl(&c.endpoints()[0], &["job", "submit", &other, "--id", &id]);
    assert_eq!(code, 4);
    assert!(
        err.contains("other.toml") && err.contains("already exists"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_file_field_and_reason_and_changes_nothing() {
    let (c, client, _) = ProcCluster::start_elected(3, T).await;
    let endpoints = c.endpoints().join(",");

    let syntax = write_spec(c.dir.path(), "syntax.toml", "name = \"x\"\nvertices = 3\n");
    let (code, _, err) = ctl(&endpoints, &["job", "submit", &syntax]);
    assert_eq!(code, 4);
    assert!(
        err.contains("syntax.toml") && err.contains("line 2"),
        "{err}"
    );

    let cycle = write_spec(
        c.dir.path(),
        "cycle.json",
        r#"{"name": "x", "vertices": [{"name": "a", "parallelism": 1, "task": {"sleep": {"duration_ms": 1}}}, {"name": "b", "parallelism": 1, "task": {"sleep": {"duration_ms": 1}}}], "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]}"#,
    );
    let (code, _, err) = ctl(&endpoints, &["job", "submit", &cycle]);
    assert_eq!(code, 4);
    assert!(
        err.contains("cycle.json") && err.contains("spec.edges") && err.contains("cycle"),
        "{err}"
    );

    let (code, _, err) = ctl(&endpoints, &["job", "status", &new_job_id()]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = ctl(&endpoints, &["job", "status", "not-a-uuid"]);
    assert_eq!(code, 4);
    assert!(err.contains("job_id"), "{err}");

    assert!(
        client
            .list_all_jobs(Default::default())
            .await
            .expect("list")
            .is_empty(),
        "nothing invalid was stored"
    );
    let out = Command::new(dispatcher_testkit::bin("dispatchctl"))
        .args([
            "--endpoints",
            "127.0.0.1:9",
            "--timeout",
            "1",
            "job",
            "list",
        ])
        .output()
        .expect("run dispatchctl");
    assert_eq!(
        out.status.code(),
        Some(5),
        "an unreachable cluster is exit 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_until_the_job_is_terminal() {
    let (c, client, _) = ProcCluster::start_elected(3, T).await;
    let endpoints = c.endpoints().join(",");
    let spec = write_spec(c.dir.path(), "job.toml", SPEC);
    let (code, out, _) = ctl(&endpoints, &["job", "submit", &spec]);
    assert_eq!(code, 0);
    let id = out.trim().to_string();
    let watcher = {
        let (endpoints, id) = (endpoints.clone(), id.clone());
        std::thread::spawn(move || ctl(&endpoints, &["-o", "json", "job", "watch", &id]))
    };
    // Let the watch attach (its first event is the current state), then cancel.
    let mut events = client.watch_job(&id);
    use tokio_stream::StreamExt;
    let first = events.next().await.expect("an event").expect("ok");
    assert_eq!(
        first.job.expect("job").state,
        dispatcher_proto::v1::JobState::Created as i32
    );
    client.cancel_job(&id).await.expect("cancel");
    let (code, out, err) = watcher.join().expect("watcher");
    assert_eq!(code, 6, "a canceled job ends the watch with exit 6: {err}");
    let states: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["job"]["state"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        states.last().map(String::as_str),
        Some("CANCELED"),
        "{states:?}"
    );
}

/// "Why is my job waiting?": the example GPU job under a TaskManager without a GPU says
/// why in `job status` and `job list`, and stops saying it once a GPU TaskManager joins
/// and the job is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_task_manager_can_host_says_why_it_waits() {
    let (mut c, _, _) = ProcCluster::start_elected(3, T).await;
    c.start_tm("tm-1", 4, &["--label", "rack=r1"]);
    let endpoints = c.endpoints().join(",");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gpu-only.json");
    let (code, out, err) = ctl(&endpoints, &["job", "submit", example]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let reason = "vertex 'trainer' needs 2 slots with gpu=true; 0 TaskManagers match";
    // Before tm-1 registers, the reason is that no TaskManager is registered at all.
    let status = dispatcher_testkit::wait_for(T, "job status names the selector", || async {
        let (code, out, _) = ctl(&endpoints, &["job", "status", &id]);
        (code == 0 && out.contains(&format!("pending:   {reason}\n"))).then_some(out)
    })
    .await;
    assert!(status.contains("CREATED"), "{status}");
    let (code, list, err) = ctl(&endpoints, &["job", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        list.lines().any(|l| l.contains(&id) && l.contains(reason)),
        "{list}"
    );
    let (code, json, err) = ctl(&endpoints, &["-o", "json", "job", "list"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json list");
    assert_eq!(v[0]["pending_reason"], reason);

    c.start_tm("tm-gpu", 2, &["--label", "gpu=true"]);
    let placed = dispatcher_testkit::wait_for(T, "the job is placed on tm-gpu", || async {
        let (code, out, _) = ctl(&endpoints, &["job", "status", &id]);
        (code == 0 && out.contains("RUNNING")).then_some(out)
    })
    .await;
    assert!(!placed.contains("pending:"), "{placed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_in_flight_while_the_leader_is_killed_succeeds_exactly_once() {
    let mut c = ProcCluster::start(3);
    let client = c.client();
    for round in 0..3 {
        let leader = c.leader(&client, T, "before the kill").await;
        let id = new_job_id();
        let submit = {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(
                async move { client.submit_job(Some(id), sleep_job("in-flight", 1)).await },
            )
        };
        c.kill(leader);
        let resp = submit
            .await
            .expect("task")
            .expect("the library retries the submission through the failover");
        assert_eq!(resp.job_id, id);
        let jobs = client
            .list_all_jobs(Default::default())
            .await
            .expect("list");
        assert_eq!(
            jobs.iter().filter(|j| j.job_id == id).count(),
            1,
            "round {round}: exactly one job"
        );
        c.spawn(leader);
        c.converged(&client, T, "the killed replica is back").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_pids_and_without_a_leader_says_so_and_exits_5() {
    let (mut c, _, leader) = ProcCluster::start_elected(3, T).await;
    let (code, out, err) = ctl(&c.endpoints().join(","), &["cluster", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("PID") && out.contains("(pid "), "{out}");

    // Without a quorum no election can succeed: the survivor, a follower, answers but
    // knows no leader.
    let survivor = c.follower_addr(leader);
    let other = c
        .procs
        .values()
        .find(|p| p.id != leader && p.addr != survivor)
        .map(|p| p.id)
        .expect("a third replica");
    c.kill(leader);
    c.kill(other);
    let (code, out, err) = ctl(&survivor, &["-o", "json", "cluster", "status"]);
    assert_eq!(code, 5, "no leader is exit 5: {out}");
    assert!(
        err.contains("no leader: an election may be running"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json cluster status");
    let replicas = v["replicas"].as_array().expect("replicas");
    let me = replicas
        .iter()
        .find(|r| r["address"] == survivor.as_str())
        .expect("the survivor");
    let pid = me["pid"].as_u64().expect("the survivor's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&survivor),
        "pid {pid} is the survivor's dispatcher process"
    );
    assert!(
        replicas
            .iter()
            .filter(|r| r["reachable"] == false)
            .all(|r| r["pid"].is_null()),
        "a replica that did not answer has no pid: {out}"
    );
}

/// The seconds in `... after 1.052s (...`, if printed with exactly three decimals.
fn printed_seconds(message: &str) -> Option<f64> {
    let rest = message.split_once(" after ")?.1;
    let secs = rest.split_once("s (")?.0;
    let decimals = secs.split_once('.')?.1;
    (decimals.len() == 3).then(|| secs.parse().ok()).flatten()
}

#[test]
fn with_nothing_listening_anywhere_the_cli_fails_in_about_a_second_naming_each_address() {
    let ports = dispatcher_testkit::free_ports(2).expect("free ports");
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let started = std::time::Instant::now();
    let (code, _, err) = ctl(&addrs.join(","), &["cluster", "status"]);
    let took = started.elapsed();
    assert_eq!(code, 5, "unavailable: {err}");
    assert!(
        took < Duration::from_secs(5),
        "gave up after {took:?}, not at the 20 s deadline: {err}"
    );
    assert!(
        err.starts_with("dispatchctl: no replica reachable after "),
        "{err}"
    );
    for a in &addrs {
        assert!(err.contains(&format!("{a}: connection refused")), "{err}");
    }
    let secs = printed_seconds(&err).expect("the time, to the millisecond");
    assert!((0.5..5.0).contains(&secs), "{err}");

    for bad in ["0", "3601"] {
        let (code, _, err) = ctl_within(bad, &addrs.join(","), &["cluster", "status"]);
        assert_eq!(code, 2, "--timeout {bad} is bad usage: {err}");
        assert!(err.contains("1..=3600"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_one_replica_answers_the_cli_keeps_trying_until_its_timeout() {
    let mut c = ProcCluster::start(3);
    // Replica 1 alone can elect no leader: it answers, but cannot serve.
    c.kill(2);
    c.kill(3);
    let addr = |id: u64| c.procs[&id].addr.clone();
    let survivor = addr(1);
    dispatcher_testkit::wait_for(T, "replica 1 accepts connections", || {
        let survivor = survivor.clone();
        async move { std::net::TcpStream::connect(&survivor).ok().map(|_| ()) }
    })
    .await;
    // The dead replicas first, so that each is tried before the survivor's try ends.
    let endpoints = [addr(2), addr(3), addr(1)].join(",");
    let started = std::time::Instant::now();
    let (code, _, err) = ctl_within("4", &endpoints, &["job", "list"]);
    let took = started.elapsed();
    assert_eq!(code, 5, "unavailable: {err}");
    assert!(
        took >= Duration::from_secs(4),
        "gave up after {took:?}: {err}"
    );
    assert!(
        err.starts_with("dispatchctl: cluster unavailable after 4."),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}: connection refused", addr(2))),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}: connection refused", addr(3))),
        "{err}"
    );
    assert!(err.contains(&format!("{survivor}: ")), "{err}");
    assert!(printed_seconds(&err).is_some(), "{err}");
}

//! End-to-end tests of TaskManagers on real processes: jobs run to completion across
//! TaskManagers, failures restart per strategy, cancel kills processes, a dead
//! TaskManager's tasks move, a dead leader restarts nothing, an expired TaskManager that
//! comes back stops its stale attempts, a job too big waits for capacity, and a
//! TaskManager's work directory stays bounded without losing an attempt record.

use std::time::{Duration, Instant};

use dispatcher_client::taskmanager::runner::AttemptKey;
use dispatcher_client::Client;
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::signal::alive;
use dispatcher_testkit::spec::{shell, sleep, JobBuilder};
use dispatcher_testkit::{wait_for, ProcCluster};

const T: Duration = Duration::from_secs(40);

async fn job_where(
    client: &Client,
    id: &str,
    why: &str,
    pred: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    wait_for(T, why, || async {
        let job = client.get_job(id, false).await.ok()?;
        pred(&job).then_some(job)
    })
    .await
}

fn state_is(job: &pb::JobStatus, s: pb::JobState) -> bool {
    job.state == s as i32
}

fn all_running(job: &pb::JobStatus) -> bool {
    state_is(job, pb::JobState::Running)
        && job
            .tasks
            .iter()
            .all(|t| t.state == pb::TaskState::Running as i32)
}

async fn cluster_with_tms(tms: &[(&str, u32)]) -> (ProcCluster, Client) {
    let (mut c, client, _) = ProcCluster::start_elected(3, T).await;
    for (id, slots) in tms {
        c.start_tm(id, *slots, &[]);
    }
    wait_for(T, "TaskManagers registered", || async {
        let listed = client.list_task_managers(false).await.ok()?;
        (listed.len() == tms.len()).then_some(())
    })
    .await;
    (c, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_vertex_job_runs_to_finished_across_two_task_managers() {
    let (c, client) = cluster_with_tms(&[("tm-1", 2), ("tm-2", 2)]).await;
    let spec = JobBuilder::new("pipeline")
        .vertex("produce", 2, shell("echo produced > out.txt; sleep 1"))
        .vertex("consume", 2, sleep(1500))
        .edge("produce", "consume")
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let done = job_where(&client, &id, "the job finishes", |j| {
        state_is(j, pb::JobState::Finished)
    })
    .await;
    let hosts: std::collections::BTreeSet<&str> = done
        .tasks
        .iter()
        .map(|t| t.task_manager_id.as_str())
        .collect();
    assert_eq!(hosts.len(), 2, "spread over both TaskManagers: {hosts:?}");
    assert!(done
        .tasks
        .iter()
        .all(|t| t.state == pb::TaskState::Finished as i32
            && t.attempt == 1
            && t.exit_code == Some(0)));
    // The command tasks ran in their own directories.
    let outputs = ["tm-1", "tm-2"]
        .iter()
        .flat_map(|tm| {
            std::fs::read_dir(c.tms[*tm].work_dir.join("tasks"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| e.path().join("out.txt").exists())
        .count();
    assert_eq!(outputs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retried_per_its_strategy_then_the_job_fails() {
    let (_c, client) = cluster_with_tms(&[("tm-1", 2)]).await;
    let spec = JobBuilder::new("flaky")
        .vertex("fails", 1, shell("sleep 0.2; exit 7"))
        .fixed_delay_restarts(2, 200)
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let failed = job_where(&client, &id, "the job fails", |j| {
        state_is(j, pb::JobState::Failed)
    })
    .await;
    assert_eq!(failed.restarts, 2);
    assert_eq!(
        failed.tasks[0].attempt, 3,
        "the first attempt and two restarts"
    );
    assert_eq!(failed.tasks[0].exit_code, Some(7));
    assert!(
        failed.failure_reason.contains("exited with code 7"),
        "{}",
        failed.failure_reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_processes() {
    let (c, client) = cluster_with_tms(&[("tm-1", 2)]).await;
    let spec = JobBuilder::new("long")
        .vertex("long", 2, shell("sleep 600"))
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    job_where(&client, &id, "tasks running", all_running).await;
    let pids: Vec<u32> = c
        .tm_pids("tm-1")
        .iter()
        .filter(|p| p.0 == id)
        .map(|p| p.4)
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));
    client.cancel_job(&id).await.expect("cancel");
    job_where(&client, &id, "the job is canceled", |j| {
        state_is(j, pb::JobState::Canceled)
    })
    .await;
    wait_for(T, "the processes are gone", || async {
        pids.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
    let listed = client.list_task_managers(false).await.expect("list");
    assert_eq!(listed[0].free_slots, 2, "slots are free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_task_manager_moves_its_tasks_to_the_other() {
    let (mut c, client) = cluster_with_tms(&[("tm-1", 2), ("tm-2", 2)]).await;
    let spec = JobBuilder::new("movable")
        .vertex("work", 2, sleep(600_000))
        .fixed_delay_restarts(3, 100)
        .placement(pb::PlacementStrategy::BinPack)
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let running = job_where(&client, &id, "tasks running", all_running).await;
    let victim = running.tasks[0].task_manager_id.clone();
    assert!(
        running.tasks.iter().all(|t| t.task_manager_id == victim),
        "bin-pack put both on one TaskManager"
    );
    let survivor = if victim == "tm-1" { "tm-2" } else { "tm-1" };
    c.kill_tm(&victim);
    let moved = job_where(&client, &id, "tasks running on the survivor", |j| {
        all_running(j) && j.tasks.iter().all(|t| t.task_manager_id == survivor)
    })
    .await;
    assert!(moved.tasks.iter().all(|t| t.attempt == 2));
    assert_eq!(moved.restarts, 1);
    assert!(
        moved.failure_reason.contains("lease expired"),
        "{}",
        moved.failure_reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_changes_no_attempt_and_no_process() {
    let (mut c, client) = cluster_with_tms(&[("tm-1", 2), ("tm-2", 2)]).await;
    let spec = JobBuilder::new("steady")
        .vertex("long", 4, shell("sleep 600"))
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    job_where(&client, &id, "tasks running", all_running).await;
    let before: Vec<_> = ["tm-1", "tm-2"]
        .iter()
        .flat_map(|tm| c.tm_pids(tm))
        .collect();
    assert_eq!(before.len(), 4);

    let leader = c.leader(&client, T, "before the kill").await;
    c.kill(leader);
    c.leader(&client, T, "after the kill").await;
    // Watch for longer than a TaskManager lease (4 s) plus the new leader's grace
    // period: had any TaskManager been expired, its tasks would restart in that window.
    let window_end = Instant::now() + Duration::from_secs(9);
    wait_for(T, "an observation window of two leases", || async {
        let job = client.get_job(&id, false).await.ok()?;
        assert!(
            all_running(&job) && job.tasks.iter().all(|t| t.attempt == 1),
            "a task was restarted: {job:?}"
        );
        (Instant::now() >= window_end).then_some(())
    })
    .await;
    let after: Vec<_> = ["tm-1", "tm-2"]
        .iter()
        .flat_map(|tm| c.tm_pids(tm))
        .collect();
    assert_eq!(before, after, "no task process was started again");
    assert!(
        after.iter().all(|p| alive(p.4)),
        "every task process still runs"
    );
    c.spawn(leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_task_manager_that_comes_back_stops_its_stale_attempts() {
    let (c, client) = cluster_with_tms(&[("tm-1", 2), ("tm-2", 2)]).await;
    let spec = JobBuilder::new("blip")
        .vertex("work", 1, shell("sleep 600"))
        .fixed_delay_restarts(3, 100)
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let running = job_where(&client, &id, "the task runs", all_running).await;
    let frozen = running.tasks[0].task_manager_id.clone();
    let old_pid = c
        .tm_pids(&frozen)
        .iter()
        .find(|p| p.0 == id)
        .expect("started")
        .4;
    // A network blip: the TaskManager is silent for longer than its lease.
    c.signal_tm(&frozen, "STOP");
    let moved = job_where(&client, &id, "the task restarted elsewhere", |j| {
        all_running(j) && j.tasks[0].attempt == 2
    })
    .await;
    assert_ne!(moved.tasks[0].task_manager_id, frozen);
    c.signal_tm(&frozen, "CONT");
    wait_for(T, "the stale attempt's process is killed", || async {
        (!alive(old_pid)).then_some(())
    })
    .await;
    wait_for(T, "the TaskManager registered afresh", || async {
        let tms = client.list_task_managers(false).await.ok()?;
        tms.iter()
            .any(|t| t.task_manager_id == frozen)
            .then_some(())
    })
    .await;
    let job = client.get_job(&id, false).await.expect("job");
    assert!(
        all_running(&job) && job.tasks[0].attempt == 2,
        "the late TaskManager's reports were ignored: {job:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_too_big_waits_and_starts_when_a_task_manager_joins() {
    let (mut c, client) = cluster_with_tms(&[("tm-1", 2)]).await;
    let spec = JobBuilder::new("big")
        .vertex("wide", 3, sleep(600_000))
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let waiting = client.get_job(&id, false).await.expect("job");
    assert!(
        state_is(&waiting, pb::JobState::Created),
        "3 tasks cannot fit in 2 slots"
    );
    c.start_tm("tm-2", 2, &[]);
    job_where(&client, &id, "the job starts once tm-2 joins", all_running).await;
}

/// A subtask that fails at once takes the job out of RUNNING while siblings on the other
/// TaskManager may not have started yet (a race with that TaskManager's heartbeat); the
/// job must still reach FAILED with every slot freed. The deterministic regression test
/// of the stop list is `attempts_of_a_winding_down_job_are_listed_to_stop_not_to_run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_before_its_siblings_start_still_ends() {
    let (_c, client) = cluster_with_tms(&[("tm-1", 2), ("tm-2", 2)]).await;
    for round in 0..3 {
        let spec = JobBuilder::new(&format!("fail-fast-{round}"))
            .vertex(
                "v",
                4,
                shell("if [ \"$DISPATCHER_SUBTASK\" = 0 ]; then exit 3; fi; sleep 600"),
            )
            .build();
        let id = client.submit_job(None, spec).await.expect("submit").job_id;
        let failed = job_where(&client, &id, "the job fails and every sibling stops", |j| {
            state_is(j, pb::JobState::Failed)
        })
        .await;
        assert!(
            failed.tasks.iter().all(|t| t.slot.is_none()),
            "no slot stays held: {failed:?}"
        );
    }
    let tms = client.list_task_managers(false).await.expect("list");
    assert!(
        tms.iter().all(|t| t.free_slots == t.slots),
        "every slot is free again"
    );
}

/// Vertices `a.b` and `a/b` read alike once made file-name-safe; each still gets its own
/// directory and output. Past `--retain-finished-count` the oldest ended directories go,
/// and the attempt records survive rotation: every start and stop is still read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_directories_stay_apart_and_bounded_and_every_attempt_record_is_kept() {
    let (mut c, client, _) = ProcCluster::start_elected(3, T).await;
    c.start_tm(
        "tm-1",
        16,
        &[
            "--attempts-max-bytes",
            "4096",
            "--attempts-keep",
            "100",
            "--retain-finished-count",
            "2",
        ],
    );
    wait_for(T, "the TaskManager registered", || async {
        let listed = client.list_task_managers(false).await.ok()?;
        (listed.len() == 1).then_some(())
    })
    .await;
    let echo = shell("echo \"$DISPATCHER_VERTEX\"");
    let spec = JobBuilder::new("alike")
        .vertex("a.b", 1, echo.clone())
        .vertex("a/b", 1, echo)
        .build();
    let first = client.submit_job(None, spec).await.expect("submit").job_id;
    job_where(&client, &first, "the job finishes", |j| {
        state_is(j, pb::JobState::Finished)
    })
    .await;
    let tasks = c.tms["tm-1"].work_dir.join("tasks");
    let dir_of = |job: &str, vertex: &str| {
        AttemptKey {
            job: job.into(),
            vertex: vertex.into(),
            subtask: 0,
            attempt: 1,
        }
        .task_dir(&tasks)
    };
    for vertex in ["a.b", "a/b"] {
        let out =
            std::fs::read_to_string(dir_of(&first, vertex).join("stdout.log")).expect("stdout.log");
        assert_eq!(out, format!("{vertex}\n"));
    }

    let spec = JobBuilder::new("many")
        .vertex("v", 16, shell("true"))
        .build();
    let second = client.submit_job(None, spec).await.expect("submit").job_id;
    job_where(&client, &second, "the job finishes", |j| {
        state_is(j, pb::JobState::Finished)
    })
    .await;
    let count = || std::fs::read_dir(&tasks).map_or(0, |d| d.count());
    wait_for(T, "two ended directories are left", || async {
        (count() == 2).then_some(())
    })
    .await;
    assert!(!dir_of(&first, "a.b").exists() && !dir_of(&first, "a/b").exists());

    let work = &c.tms["tm-1"].work_dir;
    assert!(
        work.join("attempts.jsonl.1").exists(),
        "18 attempts make more than 4096 bytes of records"
    );
    let history = c.tm_history("tm-1");
    for event in ["start", "stop"] {
        let mut seen: Vec<(String, String, u64)> = history
            .iter()
            .filter(|e| e["event"] == event)
            .map(|e| {
                (
                    e["job_id"].as_str().unwrap_or_default().to_string(),
                    e["vertex"].as_str().unwrap_or_default().to_string(),
                    e["subtask"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect();
        seen.sort();
        let mut want: Vec<(String, String, u64)> = vec![
            (first.clone(), "a.b".into(), 0),
            (first.clone(), "a/b".into(), 0),
        ];
        want.extend((0..16).map(|s| (second.clone(), "v".to_string(), s)));
        want.sort();
        assert_eq!(seen, want, "every {event} recorded once");
    }
}

//! The agent around the reconcile core, driven by events as the main loop drives it
//! (no dispatcher): where command tasks run, what the history records, and which task
//! directories the retention removes.

use super::*;
use std::path::Path;
use std::time::Instant;

fn config(work_dir: &Path, retain: Duration, count: usize) -> Config {
    Config {
        id: "tm-test".into(),
        slots: 4,
        // Never called: the tests feed the answers themselves.
        dispatchers: vec!["127.0.0.1:9".into()],
        labels: BTreeMap::new(),
        work_dir: work_dir.to_path_buf(),
        address: "test".into(),
        kill_grace: Duration::from_millis(500),
        attempts_max_bytes: DEFAULT_ATTEMPTS_MAX_BYTES,
        attempts_keep: 4,
        retain_finished: retain,
        retain_finished_count: count,
        sandbox: Sandbox {
            user: sandbox::TaskUser {
                name: "me".into(),
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                home: None,
                switch: false,
            },
            commands: sandbox::Commands::Any,
        },
        tls: None,
        token: None,
    }
}

fn shell(job: &str, vertex: &str, slot: u32, script: &str) -> pb::TaskAssignment {
    pb::TaskAssignment {
        job_id: job.into(),
        vertex: vertex.into(),
        subtask: 0,
        attempt: 1,
        slot,
        task: Some(pb::Task {
            kind: Some(pb::task::Kind::Command(pb::CommandTask {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: BTreeMap::new(),
            })),
        }),
    }
}

/// Feeds the next exit to the agent, as the main loop does.
async fn next_exit(agent: &mut Agent, exits: &mut mpsc::UnboundedReceiver<Exit>) -> AttemptKey {
    let exit = tokio::time::timeout(Duration::from_secs(10), exits.recv())
        .await
        .expect("an attempt ends within 10 s")
        .expect("exits open");
    let key = exit.key.clone();
    agent.step(Event::Exited {
        key: exit.key,
        outcome: exit.outcome,
    });
    key
}

#[tokio::test]
async fn vertices_named_alike_after_sanitising_run_in_their_own_directories() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut agent, mut exits) =
        Agent::open(config(tmp.path(), Duration::from_secs(3600), 1000)).expect("agent");
    let script = r#"echo "$DISPATCHER_VERTEX"; sleep 0.2"#;
    let assignments = vec![shell("j1", "a.b", 0, script), shell("j1", "a/b", 1, script)];
    agent.step(Event::Registered { assignments });
    next_exit(&mut agent, &mut exits).await;
    next_exit(&mut agent, &mut exits).await;
    let tasks = tmp.path().join("tasks");
    for vertex in ["a.b", "a/b"] {
        let key = AttemptKey {
            job: "j1".into(),
            vertex: vertex.into(),
            subtask: 0,
            attempt: 1,
        };
        let out =
            std::fs::read_to_string(key.task_dir(&tasks).join("stdout.log")).expect("stdout.log");
        assert_eq!(out, format!("{vertex}\n"));
    }
    assert_eq!(std::fs::read_dir(&tasks).expect("tasks").count(), 2);
    let records = history::records(tmp.path());
    let events: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap_or_default().to_string(),
                r["vertex"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(events.len(), 4, "{events:?}");
    for vertex in ["a.b", "a/b"] {
        for event in ["start", "stop"] {
            assert!(events.contains(&(event.to_string(), vertex.to_string())));
        }
    }
}

/// Waits until `dir` is gone (removal runs off the agent's task).
async fn gone(dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test]
async fn ended_task_directories_are_removed_and_running_ones_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Left by a previous life of this TaskManager.
    let stale = tmp.path().join("tasks/j0-v-0-a1");
    std::fs::create_dir_all(&stale).expect("stale dir");
    // Keep nothing that ended.
    let (mut agent, mut exits) =
        Agent::open(config(tmp.path(), Duration::from_secs(3600), 0)).expect("agent");
    assert!(
        gone(&stale).await,
        "a directory of a previous life is removed at start"
    );

    let quick = shell("j1", "quick", 0, "echo done");
    let long = shell("j1", "long", 1, "sleep 30");
    agent.step(Event::Registered {
        assignments: vec![quick.clone(), long.clone()],
    });
    let tasks = tmp.path().join("tasks");
    let (quick_dir, long_dir) = (
        AttemptKey::of(&quick).task_dir(&tasks),
        AttemptKey::of(&long).task_dir(&tasks),
    );
    assert_eq!(
        next_exit(&mut agent, &mut exits).await,
        AttemptKey::of(&quick)
    );
    assert!(
        gone(&quick_dir).await,
        "the ended attempt's directory is removed"
    );
    assert!(long_dir.is_dir(), "the running attempt's directory stays");

    agent.step(Event::Shutdown);
    assert_eq!(
        next_exit(&mut agent, &mut exits).await,
        AttemptKey::of(&long)
    );
    assert!(gone(&long_dir).await, "removed once it ended");
}

#[tokio::test]
async fn ended_task_directories_stay_within_the_retention() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut agent, mut exits) =
        Agent::open(config(tmp.path(), Duration::from_secs(3600), 1)).expect("agent");
    let (a, b) = (
        shell("j1", "a", 0, "true"),
        shell("j2", "b", 1, "sleep 0.3"),
    );
    agent.step(Event::Registered {
        assignments: vec![a.clone()],
    });
    next_exit(&mut agent, &mut exits).await;
    let tasks = tmp.path().join("tasks");
    let a_dir = AttemptKey::of(&a).task_dir(&tasks);
    assert!(a_dir.is_dir(), "one ended directory is within the count");
    // A second ended attempt: past the count of 1, the older directory goes.
    let ev = Event::Heartbeat {
        acked: agent.core.pending().len(),
        assignments: vec![b.clone()],
        stop: vec![],
    };
    agent.step(ev);
    next_exit(&mut agent, &mut exits).await;
    assert!(gone(&a_dir).await, "the oldest ended directory is removed");
    assert!(AttemptKey::of(&b).task_dir(&tasks).is_dir());
}

fn parse(flags: &[&str]) -> Args {
    let argv = [
        "taskmanager",
        "--id",
        "tm-1",
        "--dispatchers",
        "127.0.0.1:9",
    ];
    Args::try_parse_from(argv.iter().chain(flags)).expect("flags parse")
}

#[test]
fn bounds_of_the_work_directory_have_defaults_and_flags() {
    let a = parse(&[]);
    assert_eq!(
        (
            a.attempts_max_bytes,
            a.attempts_keep,
            a.retain_finished_secs,
            a.retain_finished_count
        ),
        (64 << 20, 4, 3600, 1000)
    );
    let a = parse(&[
        "--attempts-max-bytes",
        "8192",
        "--attempts-keep",
        "0",
        "--retain-finished-secs",
        "0",
        "--retain-finished-count",
        "7",
    ]);
    assert_eq!(
        (
            a.attempts_max_bytes,
            a.attempts_keep,
            a.retain_finished_secs,
            a.retain_finished_count
        ),
        (8192, 0, 0, 7)
    );
    let err = parse(&["--attempts-max-bytes", "100"])
        .into_config()
        .expect_err("too small");
    assert_eq!(
        err,
        "--attempts-max-bytes 100 is less than the minimum of 4096"
    );
}

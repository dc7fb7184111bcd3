//! End-to-end tests of what command tasks may do, on real `taskmanager` processes: a
//! TaskManager started as root runs tasks as `nobody` with a clean environment,
//! `--allow-command` and `--builtin-tasks-only` refuse tasks with a reason `dispatchctl
//! job status` shows, and flags that would run tasks as root stop the TaskManager at
//! start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dispatcher_client::taskmanager::runner::AttemptKey;
use dispatcher_client::taskmanager::sandbox::{DEFAULT_LANG, DEFAULT_PATH};
use dispatcher_client::Client;
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::signal::kill_child;
use dispatcher_testkit::spec::{command, command_with_env, shell, sleep, JobBuilder};
use dispatcher_testkit::{bin, dispatchctl, wait_blocking, wait_for, ProcCluster};

const T: Duration = Duration::from_secs(40);

/// The variables the agent sets on every task (docs/operations.md lists them).
const IDENTITY: [&str; 6] = [
    "DISPATCHER_JOB_ID",
    "DISPATCHER_VERTEX",
    "DISPATCHER_SUBTASK",
    "DISPATCHER_ATTEMPT",
    "DISPATCHER_SLOT",
    "DISPATCHER_TASK_MANAGER",
];

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// One TaskManager `tm-1` with these flags and environment, registered.
async fn cluster_with_tm(flags: &[&str], env: &[(&str, &str)]) -> (ProcCluster, Client) {
    let (mut c, client, _) = ProcCluster::start_elected(3, T).await;
    c.start_tm_with_env("tm-1", 2, flags, env);
    wait_for(T, "the TaskManager registered", || async {
        let listed = client.list_task_managers(false).await.ok()?;
        (listed.len() == 1).then_some(())
    })
    .await;
    (c, client)
}

async fn ended(client: &Client, id: &str) -> pb::JobStatus {
    wait_for(T, "the job ends", || async {
        let job = client.get_job(id, false).await.ok()?;
        matches!(
            pb::JobState::try_from(job.state),
            Ok(pb::JobState::Finished | pb::JobState::Failed | pb::JobState::Canceled)
        )
        .then_some(job)
    })
    .await
}

/// The working directory of attempt 1 of subtask 0 of `vertex`.
fn task_dir(c: &ProcCluster, job: &str, vertex: &str) -> PathBuf {
    let key = AttemptKey {
        job: job.into(),
        vertex: vertex.into(),
        subtask: 0,
        attempt: 1,
    };
    key.task_dir(&c.tms["tm-1"].work_dir.join("tasks"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `dispatchctl job status ID` as a user runs it.
fn job_status(c: &ProcCluster, id: &str) -> String {
    let (code, out, err) = dispatchctl(&c.endpoints().join(","), "10", &["job", "status", id]);
    assert_eq!(code, 0, "job status: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_task_manager_runs_tasks_as_nobody_with_a_clean_environment() {
    if !is_root() {
        eprintln!("skipped: the TaskManager must start as root to switch tasks to nobody");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("password database")
        .expect("a nobody user");
    let (c, client) = cluster_with_tm(&[], &[("AGENT_SECRET", "x")]).await;
    let spec = JobBuilder::new("sandboxed")
        .vertex(
            "env",
            1,
            command_with_env(&["env"], [("JOB_VAR", "from the job")]),
        )
        .vertex(
            "id",
            1,
            shell("id -u; id -g; id -G; echo written > out.txt"),
        )
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let job = ended(&client, &id).await;
    assert_eq!(job.state, pb::JobState::Finished as i32, "{job:?}");

    let id_dir = task_dir(&c, &id, "id");
    let ids: Vec<String> = read(&id_dir.join("stdout.log"))
        .lines()
        .map(str::to_string)
        .collect();
    let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
    assert_eq!(ids, [uid.clone(), gid.clone(), gid], "uid, gid, groups");
    let written = std::fs::metadata(id_dir.join("out.txt")).expect("the task wrote a file");
    assert_eq!(written.uid(), nobody.uid.as_raw(), "in its own directory");

    let env_dir = task_dir(&c, &id, "env");
    let env: BTreeMap<String, String> = read(&env_dir.join("stdout.log"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let keys: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = ["JOB_VAR", "PATH", "HOME", "LANG"]
        .into_iter()
        .chain(IDENTITY)
        .collect();
    assert_eq!(
        keys, expected,
        "exactly the job's, the defaults and the identity"
    );
    assert!(!env.contains_key("AGENT_SECRET"));
    assert_eq!(env["JOB_VAR"], "from the job");
    assert_eq!(env["PATH"], DEFAULT_PATH);
    assert_eq!(env["LANG"], DEFAULT_LANG);
    let home = if nobody.dir.is_dir() {
        nobody.dir.clone()
    } else {
        env_dir.clone()
    };
    assert_eq!(Path::new(&env["HOME"]), home);
    assert_eq!(env["DISPATCHER_JOB_ID"], id);
    assert_eq!(env["DISPATCHER_VERTEX"], "env");
    assert_eq!(env["DISPATCHER_TASK_MANAGER"], "tm-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_command_refuses_other_programs_with_a_reason_job_status_shows() {
    let allowed = std::fs::canonicalize("/usr/bin/true").expect("true is installed");
    let refused = std::fs::canonicalize("/usr/bin/id").expect("id is installed");
    let pattern = allowed.to_str().expect("utf-8");
    let (c, client) = cluster_with_tm(&["--allow-command", pattern], &[]).await;

    // The allowed program runs: the restriction is not a blanket refusal.
    let ok = JobBuilder::new("allowed")
        .vertex("run", 1, command(&["true"]))
        .build();
    let ok = client.submit_job(None, ok).await.expect("submit").job_id;
    let job = ended(&client, &ok).await;
    assert_eq!(job.state, pb::JobState::Finished as i32, "{job:?}");

    let spec = JobBuilder::new("refused")
        .vertex("run", 1, command(&[refused.to_str().expect("utf-8")]))
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let job = ended(&client, &id).await;
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    let reason = format!(
        "command {} is not allowed on this TaskManager (--allow-command)",
        refused.display()
    );
    assert_eq!(job.tasks[0].failure_reason, reason);
    assert!(job.tasks[0].exit_code.is_none(), "it never ran");
    let status = job_status(&c, &id);
    assert!(status.contains(&reason), "job status shows why:\n{status}");
    assert!(
        !task_dir(&c, &id, "run").exists(),
        "a refused task leaves no directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_tasks_only_refuses_commands_and_runs_sleep_tasks() {
    // Set through the environment variable, as a deployment's env file would.
    let (c, client) = cluster_with_tm(&[], &[("TASKMANAGER_BUILTIN_TASKS_ONLY", "true")]).await;
    let spec = JobBuilder::new("command")
        .vertex("run", 1, shell("exit 0"))
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let job = ended(&client, &id).await;
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    let status = job_status(&c, &id);
    assert!(
        status.contains(
            "command tasks are not allowed on this TaskManager, only built-in tasks \
             (--builtin-tasks-only)"
        ),
        "job status shows why:\n{status}"
    );

    let spec = JobBuilder::new("builtin")
        .vertex("nap", 1, sleep(200))
        .build();
    let id = client.submit_job(None, spec).await.expect("submit").job_id;
    let job = ended(&client, &id).await;
    assert_eq!(job.state, pb::JobState::Finished as i32, "{job:?}");
}

/// Runs `taskmanager` with these flags and environment until it exits or logs that it
/// starts: its exit code and stderr, or `None` if it started (it is killed then).
fn start_up(flags: &[&str], env: &[(&str, &str)]) -> Option<(i32, String)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(bin("taskmanager"))
        .args(["--id", "tm-x", "--dispatchers", "127.0.0.1:9", "--work-dir"])
        .arg(dir.path().join("work"))
        .args(flags)
        // Only the variables a case sets: none inherited from the test's environment.
        .env_remove("TASKMANAGER_RUN_AS")
        .env_remove("TASKMANAGER_ALLOW_ROOT_TASKS")
        .env_remove("TASKMANAGER_ALLOW_COMMANDS")
        .env_remove("TASKMANAGER_BUILTIN_TASKS_ONLY")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("spawn taskmanager");
    let mut status = None;
    let settled = wait_blocking(T, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
            || std::fs::read_to_string(&stderr).is_ok_and(|e| e.contains("taskmanager starting"))
    });
    assert!(settled, "taskmanager {flags:?} neither exited nor started");
    if status.is_none() {
        kill_child(&mut child);
        return None;
    }
    let code = status.and_then(|s| s.code()).unwrap_or(-1);
    Some((code, std::fs::read_to_string(&stderr).unwrap_or_default()))
}

#[test]
fn flags_that_would_run_tasks_as_root_or_as_nobody_known_stop_the_start() {
    let refused = |flags: &[&str], env: &[(&str, &str)], names: &str| {
        let (code, err) =
            start_up(flags, env).unwrap_or_else(|| panic!("{flags:?} {env:?} must not start"));
        assert_eq!(code, 2, "bad flags exit with 2: {err}");
        assert!(err.contains(names), "{flags:?} {env:?}: {err}");
    };
    if is_root() {
        refused(&["--run-as", "root"], &[], "--allow-root-tasks");
        refused(&[], &[("TASKMANAGER_RUN_AS", "root")], "--allow-root-tasks");
        // The same flags with --allow-root-tasks start (the refusal above is that one).
        assert!(
            start_up(&["--run-as", "root", "--allow-root-tasks"], &[]).is_none(),
            "--allow-root-tasks lets it start"
        );
    } else {
        eprintln!("not root: checking that --run-as another user is refused instead");
        refused(
            &["--run-as", "root"],
            &[],
            "cannot switch tasks to another user",
        );
    }
    refused(
        &["--run-as", "no-such-user-zq"],
        &[],
        "--run-as \"no-such-user-zq\": no such user",
    );
    refused(
        &["--allow-command", "bin/*"],
        &[],
        "--allow-command \"bin/*\"",
    );
    refused(
        &["--builtin-tasks-only", "--allow-command", "/bin/*"],
        &[],
        "--builtin-tasks-only",
    );
}

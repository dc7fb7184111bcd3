//! The README's Quick start, run the way the README tells it: `scripts/cluster.sh` (what
//! `make cluster` runs) supervises three replicas and two TaskManagers, with TLS and
//! tokens, and prints the `export DISPATCHER_CA=… DISPATCHER_TOKEN_FILE=…` line;
//! `dispatchctl` with exactly those variables submits a job (and without them is
//! refused); the leader's pid comes from `dispatchctl cluster status`; `kill -9` of that
//! pid elects a new leader without restarting a task; the script starts the killed
//! replica again and it rejoins; SIGTERM to the script (Ctrl-C) leaves no process behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatcher_testkit::signal::{self, Signal};
use dispatcher_testkit::{bin, bin_dir, free_ports, wait_blocking, wait_for};
use serde_json::Value;

/// Deadline of each step: generous, as the machine is shared and the binaries are debug
/// builds.
const T: Duration = Duration::from_secs(60);

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e package lives in the repository")
        .to_path_buf()
}

/// Three consecutive free loopback ports (the script numbers its replicas' ports from
/// one base); returns the first. Checked by binding all three at once, then released.
fn consecutive_free_ports() -> u16 {
    for _ in 0..200 {
        let base = free_ports(1).expect("a free loopback port")[0];
        if base > u16::MAX - 2 {
            continue;
        }
        let held: std::io::Result<Vec<_>> = (base..=base + 2)
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if held.is_ok() {
            return base;
        }
    }
    panic!("no three consecutive free loopback ports");
}

/// The live (non-zombie) processes in process group `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command name: state, ppid, pgrp.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().take(3).collect())
                .unwrap_or_default();
            fields.len() == 3 && fields[0] != "Z" && fields[2] == pgid.to_string()
        })
        .collect()
}

/// The command line of a process, or empty.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `scripts/cluster.sh` running in its own process group, on its own ports and data.
struct Supervisor {
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
    log: PathBuf,
    endpoints: String,
    /// Replica 1's HTTPS address (dashboard, REST, metrics).
    http: String,
    /// The variables of the `export` line the script printed, once it has.
    exports: Vec<(String, String)>,
}

impl Supervisor {
    fn start() -> Supervisor {
        // Fail early, saying how to build them, rather than wait for a cluster that the
        // script cannot start.
        bin("dispatcher");
        bin("taskmanager");
        bin("dispatchctl");
        let dir = tempfile::tempdir().expect("tempdir");
        let base = consecutive_free_ports();
        let http_base = loop {
            let p = consecutive_free_ports();
            if p.abs_diff(base) > 2 {
                break p;
            }
        };
        let log = dir.path().join("cluster.log");
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(repo_dir().join("scripts/cluster.sh"))
            .env("CLUSTER_BASE_PORT", base.to_string())
            .env("CLUSTER_HTTP_BASE_PORT", http_base.to_string())
            .env("CLUSTER_DATA", dir.path().join("data"))
            .env("CLUSTER_BIN", bin_dir())
            .env_remove("DISPATCHER_LOG")
            // As a user's shell may have them, from the README: the script must pass its
            // own TLS files and tokens whatever these say.
            .env("DISPATCHER_TOKEN", "a-token-of-some-other-cluster")
            .env("DISPATCHER_CA", "/nonexistent/ca.crt")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own group: everything it starts (bar task processes, which their
            // TaskManager puts in groups of their own) can be found, and in the worst
            // case killed, by this group's id.
            .process_group(0)
            .spawn()
            .expect("run scripts/cluster.sh");
        let pid = child.id();
        Supervisor {
            child,
            pid,
            log,
            endpoints: (base..=base + 2)
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            http: format!("127.0.0.1:{http_base}"),
            dir,
            exports: vec![],
        }
    }

    fn certs(&self) -> PathBuf {
        self.data().join("certs")
    }

    /// The `export A=B C=D` lines the script printed (once the cluster is up), as
    /// variables.
    fn printed_exports(&self) -> Vec<(String, String)> {
        self.log()
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .flat_map(|l| l.split_whitespace())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The supervisor's own lines (the processes' logs are prefixed by their names).
    fn supervisor_lines(&self) -> String {
        self.log()
            .lines()
            .filter(|l| l.starts_with("[cluster]"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `dispatchctl` against this cluster, in an environment holding only the variables
    /// the script told the user to export (none of the test's own).
    fn ctl_command(&self) -> Command {
        let mut cmd = Command::new(bin("dispatchctl"));
        for var in [
            "DISPATCHER_CA",
            "DISPATCHER_CERT",
            "DISPATCHER_KEY",
            "DISPATCHER_TOKEN",
            "DISPATCHER_TOKEN_FILE",
            "DISPATCHCTL_ENDPOINTS",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(self.exports.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `dispatchctl` against this cluster with the exported variables: exit code,
    /// stdout, stderr.
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        self.ctl_without(&[], args)
    }

    /// Same, without some of the exported variables.
    fn ctl_without(&self, unset: &[&str], args: &[&str]) -> (i32, String, String) {
        let mut cmd = self.ctl_command();
        for var in unset {
            cmd.env_remove(var);
        }
        let out = cmd
            .args(["--endpoints", &self.endpoints, "--timeout", "5"])
            .args(args)
            .output()
            .expect("run dispatchctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `cluster status --digest --output json` when it exits 0 (a leader is known).
    fn status(&self) -> Option<Value> {
        let (code, out, _) = self.ctl(&["--output", "json", "cluster", "status", "--digest"]);
        (code == 0).then(|| serde_json::from_str(&out).ok())?
    }

    fn job(&self, id: &str) -> Option<Value> {
        let (code, out, _) = self.ctl(&["-o", "json", "job", "status", id]);
        (code == 0).then(|| serde_json::from_str(&out).ok())?
    }

    /// Every task process the TaskManagers started (`attempts.jsonl`), with the work
    /// directory it runs under.
    fn task_pids(&self) -> Vec<(u32, PathBuf)> {
        let mut out = vec![];
        for tm in ["tm-1", "tm-2"] {
            let work = self.data().join(tm);
            for e in dispatcher_client::taskmanager::history::records(&work) {
                let pid = e["detail"]
                    .as_str()
                    .and_then(|d| d.strip_prefix("pid "))
                    .and_then(|p| p.parse().ok());
                if let (Some("start"), Some(pid)) = (e["event"].as_str(), pid) {
                    out.push((pid, work.clone()));
                }
            }
        }
        out
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Not yet exited (so the pid is still ours): ask it to stop what it started.
        if matches!(self.child.try_wait(), Ok(None)) {
            signal::send(self.pid, Signal::SIGTERM);
            wait_blocking(Duration::from_secs(40), || {
                !matches!(self.child.try_wait(), Ok(None))
            });
        }
        // Last resort: whatever is left in its group. A group lives on while it has a
        // member, so while there is one its id cannot have been given to anyone else.
        if !group_members(self.pid).is_empty() {
            signal::send_group(self.pid, Signal::SIGKILL);
        }
        signal::kill_child(&mut self.child);
        for (pid, work) in self.task_pids() {
            if signal::is_task_group_under(pid, &work) {
                signal::send_group(pid, Signal::SIGKILL);
            }
        }
        if let Ok(keep) = std::env::var("TEST_KEEP_LOGS") {
            let _ = std::fs::copy(&self.log, format!("{keep}/quickstart-cluster.log"));
        }
    }
}

/// Each task's (vertex, subtask) -> (attempt, TaskManager, slot, state).
fn tasks(job: &Value) -> BTreeMap<(String, u64), (u64, String, u64, String)> {
    job["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        (
                            t["vertex"].as_str().unwrap_or("").to_string(),
                            t["subtask"].as_u64().unwrap_or(u64::MAX),
                        ),
                        (
                            t["attempt"].as_u64().unwrap_or(0),
                            t["task_manager"].as_str().unwrap_or("").to_string(),
                            t["slot"].as_u64().unwrap_or(u64::MAX),
                            t["state"].as_str().unwrap_or("").to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The leader's (id, pid) in a `cluster status` JSON document.
fn leader(status: &Value) -> Option<(u64, u32)> {
    let r = status["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["role"] == "leader")?;
    Some((r["id"].as_u64()?, u32::try_from(r["pid"].as_u64()?).ok()?))
}

/// A `cluster status` JSON document in which all three replicas answer, with pids.
fn all_answer(status: &Value) -> bool {
    status["replicas"].as_array().is_some_and(|rs| {
        rs.len() == 3
            && rs
                .iter()
                .all(|r| r["reachable"] == true && r["pid"].as_u64().is_some_and(|p| p > 1))
    })
}

/// Submits a job spec from `examples/` and waits until all its tasks run.
async fn submit_running(
    s: &Supervisor,
    file: &str,
) -> (String, BTreeMap<(String, u64), (u64, String, u64, String)>) {
    let spec = repo_dir().join("examples").join(file);
    let (code, out, err) = s.ctl(&["job", "submit", spec.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "submit {file}: {err}");
    let id = out.trim().to_string();
    let running = wait_for(T, "every task of the job to run", || async {
        let job = s.job(&id)?;
        let ts = tasks(&job);
        (job["state"] == "RUNNING" && !ts.is_empty() && ts.values().all(|t| t.3 == "RUNNING"))
            .then_some(ts)
    })
    .await;
    (id, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_failover_demo_under_make_cluster() {
    let mut s = Supervisor::start();

    // The script prints the line to export once the cluster is up: the CA and the admin
    // token it wrote under the data directory, as the README says.
    s.exports = wait_for(T, "the script to print the export line", || async {
        // Exited (a zombie until reaped): it will print nothing more.
        assert!(
            group_members(s.pid).contains(&s.pid),
            "the script stopped before the cluster was up:\n{}",
            s.supervisor_lines()
        );
        let exports = s.printed_exports();
        exports
            .iter()
            .any(|(k, _)| k == "DISPATCHER_TOKEN_FILE")
            .then_some(exports)
    })
    .await;
    let certs = s.certs();
    let exported = |name: &str| {
        s.exports
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| PathBuf::from(v))
    };
    assert_eq!(exported("DISPATCHER_CA"), Some(certs.join("ca.crt")));
    assert_eq!(
        exported("DISPATCHER_TOKEN_FILE"),
        Some(certs.join("admin.token"))
    );
    assert_eq!(
        exported("DISPATCHCTL_ENDPOINTS").as_deref(),
        Some(Path::new(&s.endpoints)),
        "a cluster on other ports than 7001-7003 also exports its endpoints"
    );
    for secret in [
        "admin.token",
        "taskmanager.token",
        "replica-1.key",
        "ca.key",
    ] {
        let mode = std::fs::metadata(certs.join(secret))
            .unwrap_or_else(|e| panic!("{secret} in {}: {e}", certs.display()))
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{secret} is readable by its owner only"
        );
    }

    // `dispatchctl cluster status`: a leader, and every replica's pid, which is a
    // `dispatcher` process the script started.
    let status = wait_for(T, "the cluster to come up with a leader", || async {
        s.status().filter(all_answer)
    })
    .await;
    for r in status["replicas"].as_array().expect("replicas") {
        let pid = r["pid"].as_u64().expect("pid") as u32;
        assert!(
            group_members(s.pid).contains(&pid),
            "replica {} reports pid {pid}, which the script did not start:\n{}",
            r["id"],
            s.supervisor_lines()
        );
    }
    wait_for(T, "both TaskManagers to register", || async {
        let (code, out, _) = s.ctl(&["-o", "json", "taskmanager", "list"]);
        let tms: Value = serde_json::from_str(&out).ok()?;
        (code == 0 && tms.as_array()?.len() == 2).then_some(())
    })
    .await;

    // The dashboard and REST API the script announces, over HTTPS with the same CA and
    // token.
    let url = format!("https://{}/", s.http);
    assert!(
        s.supervisor_lines().contains(&url),
        "the script names the dashboard:\n{}",
        s.supervisor_lines()
    );
    let token = std::fs::read_to_string(certs.join("admin.token")).expect("admin token");
    let overview = dispatcher_testkit::http::call(
        "GET",
        &format!("{url}overview"),
        Some(token.trim()),
        Some(&certs.join("ca.crt")),
    )
    .await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert_eq!(overview.json()["taskmanagers"], 2);

    // Security is on: without the token the call is refused (exit 7), without the CA the
    // TLS port cannot be talked to; the TaskManagers registered with a `taskmanager`
    // token of their own, not the admin one.
    let (code, _, err) = s.ctl_without(&["DISPATCHER_TOKEN_FILE"], &["job", "list"]);
    assert_eq!(code, 7, "a call without a token is refused: {err}");
    let (code, _, err) = s.ctl_without(&["DISPATCHER_CA"], &["job", "list"]);
    assert_ne!(code, 0, "a plain-text call to the TLS port fails: {err}");
    let (code, out, err) = s.ctl(&["-o", "json", "token", "list"]);
    assert_eq!(code, 0, "token list: {err}");
    let tokens: Value = serde_json::from_str(&out).expect("token list JSON");
    let roles: BTreeMap<String, String> = tokens
        .as_array()
        .expect("token array")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("").to_string(),
                t["role"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        BTreeMap::from([
            ("admin".to_string(), "admin".to_string()),
            ("taskmanagers".to_string(), "taskmanager".to_string()),
        ]),
        "{out}"
    );

    // A job that runs until cancelled, watched from "another shell".
    let (id, before) = submit_running(&s, "streaming.toml").await;
    assert!(
        before.values().all(|t| t.0 == 1),
        "first attempts: {before:?}"
    );
    let starts_before = s.task_pids().len();
    let watch_out = s.dir.path().join("watch.out");
    let mut watch = s
        .ctl_command()
        .args(["--endpoints", &s.endpoints, "job", "watch", &id])
        .stdout(File::create(&watch_out).expect("watch output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("run dispatchctl job watch");

    // Find the leader's pid as the README says, check that it is the `dispatcher` the
    // script started for that replica, and `kill -9` it.
    let status = s.status().expect("cluster status");
    let (old_leader, old_pid) = leader(&status).expect("a leader with a pid");
    let leader_addr = status["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == old_leader))
        .and_then(|r| r["address"].as_str())
        .expect("the leader's address")
        .to_string();
    let argv = cmdline(old_pid);
    assert!(
        argv.first()
            .is_some_and(|a| Path::new(a).file_name() == Some("dispatcher".as_ref()))
            && argv
                .windows(2)
                .any(|w| w[0] == "--listen" && w[1] == leader_addr),
        "pid {old_pid} is not replica {old_leader}'s dispatcher: {argv:?}"
    );
    assert!(
        group_members(s.pid).contains(&old_pid),
        "pid {old_pid} is not in the script's process group"
    );
    signal::send(old_pid, Signal::SIGKILL);

    // A new leader: until then `cluster status` says there is none and exits 5.
    let mut saw_no_leader = false;
    let new_leader = wait_for(T, "a new leader after kill -9 of the old one", || {
        let (code, out, err) = s.ctl(&["--output", "json", "cluster", "status"]);
        if code == 5 && err.contains("no leader: an election may be running") {
            saw_no_leader = true;
        } else {
            assert!(code == 0 || code == 5, "cluster status exit {code}: {err}");
        }
        let found = serde_json::from_str(&out)
            .ok()
            .filter(|_| code == 0)
            .and_then(|v| leader(&v))
            .filter(|(_, pid)| *pid != old_pid);
        async move { found }
    })
    .await;
    eprintln!(
        "new leader {new_leader:?} after killing replica {old_leader} (pid {old_pid}); \
         `cluster status` reported no leader meanwhile: {saw_no_leader}"
    );

    // The supervisor said which process died and how, and started it again; it rejoins
    // and every replica converges on the same state.
    let converged = wait_for(T, "the killed replica to rejoin and converge", || async {
        let st = s.status().filter(all_answer)?;
        let rs = st["replicas"].as_array()?;
        let back = rs
            .iter()
            .find(|r| r["id"] == old_leader)
            .is_some_and(|r| r["pid"] != old_pid);
        let same = rs.iter().all(|r| {
            r["applied_index"] == rs[0]["applied_index"]
                && r["state_digest"] == rs[0]["state_digest"]
        });
        (back && same).then_some(st)
    })
    .await;
    let lines = s.supervisor_lines();
    assert!(
        lines.contains(&format!(
            "replica {old_leader} (pid {old_pid}) was killed by signal 9 (SIGKILL)"
        )),
        "the supervisor names the dead replica and its status:\n{lines}"
    );
    let new_pid = converged["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == old_leader))
        .and_then(|r| r["pid"].as_u64())
        .expect("the restarted replica's pid");
    assert!(
        lines.contains(&format!("replica {old_leader}: pid {new_pid}")),
        "the supervisor started the replica again:\n{lines}"
    );

    // No task restarted: same attempt, TaskManager and slot, still running, and no
    // TaskManager started a process since.
    let job = s.job(&id).expect("job status");
    assert_eq!(tasks(&job), before, "no task changed through the failover");
    assert_eq!(job["restarts"], 0);
    assert_eq!(
        s.task_pids().len(),
        starts_before,
        "no task process started"
    );
    assert!(
        matches!(watch.try_wait(), Ok(None)),
        "`job watch` follows the failover: {}",
        std::fs::read_to_string(&watch_out).unwrap_or_default()
    );

    // Cancelling ends the watch with exit 6, as the README says.
    let (code, _, err) = s.ctl(&["job", "cancel", &id]);
    assert_eq!(code, 0, "{err}");
    let mut watch_status = None;
    wait_blocking(T, || {
        watch_status = watch.try_wait().ok().flatten();
        watch_status.is_some()
    });
    if watch_status.is_none() {
        signal::kill_child(&mut watch);
    }
    assert_eq!(
        watch_status.and_then(|st| st.code()),
        Some(6),
        "job watch of a canceled job: {}",
        std::fs::read_to_string(&watch_out).unwrap_or_default()
    );

    // Ctrl-C with a job running: SIGTERM to the script stops everything it started,
    // task processes included.
    let (_, running) = submit_running(&s, "streaming.toml").await;
    assert!(!running.is_empty());
    let mut started: Vec<u32> = group_members(s.pid);
    started.retain(|p| *p != s.pid);
    let tasks_started = s.task_pids();
    signal::send(s.pid, Signal::SIGTERM);
    let mut exit = None;
    wait_blocking(T, || {
        exit = s.child.try_wait().ok().flatten();
        exit.is_some()
    });
    let log = s.supervisor_lines();
    assert_eq!(
        exit.and_then(|st| st.code()),
        Some(0),
        "the script stops cleanly on SIGTERM:\n{log}"
    );
    assert!(
        wait_blocking(Duration::from_secs(10), || group_members(s.pid).is_empty()),
        "left running in the script's group: {:?} (of {started:?})\n{log}",
        group_members(s.pid)
    );
    let left: Vec<u32> = tasks_started
        .iter()
        .filter(|(pid, work)| signal::is_task_group_under(*pid, work))
        .map(|(pid, _)| *pid)
        .collect();
    assert!(left.is_empty(), "task processes left running: {left:?}");
}

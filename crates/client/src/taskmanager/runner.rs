//! Running one task attempt: a child process in its own process group and working
//! directory (stdout and stderr to files there), started only as the [`Sandbox`] allows
//! and as its task user, or a built-in test task (sleep, fail).
//! Cancel sends SIGTERM to the process group, then SIGKILL after a grace period.
//!
//! Each running process has a pid file under `<work-dir>/pids/`, holding its pid and its
//! start time (from `/proc`), so that a restarted TaskManager can kill the orphans of its
//! previous life without killing an unrelated process that reused the pid. Directories
//! and pid files are named by [`AttemptKey::file_name`], unique per attempt; the orphan
//! sweep reads every pid file whatever its name, so those of earlier versions (named
//! without the hash) are still killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};

use super::sandbox::{self, Sandbox};

/// Identifies one attempt of one subtask.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptKey {
    /// Job id.
    pub job: String,
    /// Vertex name.
    pub vertex: String,
    /// Subtask index.
    pub subtask: u32,
    /// Attempt number.
    pub attempt: u32,
}

impl AttemptKey {
    /// The attempt an assignment names.
    pub fn of(a: &dispatcher_proto::v1::TaskAssignment) -> Self {
        AttemptKey {
            job: a.job_id.clone(),
            vertex: a.vertex.clone(),
            subtask: a.subtask,
            attempt: a.attempt,
        }
    }

    /// The name of this attempt's task directory and pid file: a readable part (the job
    /// id and the vertex, every byte outside `[A-Za-z0-9_-]` replaced by `_` and each cut
    /// to [`READABLE_LEN`] characters, then the subtask and attempt) and a hash of the
    /// exact identity. The readable part alone is not injective (vertices `a.b` and `a/b`
    /// both read `a_b`, and `-` separates fields that may contain it); the hash is what
    /// keeps two attempts of one TaskManager from sharing a directory or a pid file.
    /// Only `[A-Za-z0-9_-]` appear, so the name is never `.`, `..`, hidden or a path, and
    /// it stays far below the 255-byte file name limit whatever the vertex name.
    pub fn file_name(&self) -> String {
        let readable = |s: &str| -> String {
            s.chars()
                .take(READABLE_LEN)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        // Length-prefixed, so that no two identities encode alike.
        let identity = format!(
            "{}:{}{}:{}{}:{}",
            self.job.len(),
            self.job,
            self.vertex.len(),
            self.vertex,
            self.subtask,
            self.attempt
        );
        let hash = dispatcher_core::codec::digest_hex(identity.as_bytes());
        format!(
            "{}-{}-{}-a{}-{}",
            readable(&self.job),
            readable(&self.vertex),
            self.subtask,
            self.attempt,
            &hash[..HASH_LEN]
        )
    }

    /// The attempt's working directory under `tasks_dir` (`<work-dir>/tasks`).
    pub fn task_dir(&self, tasks_dir: &Path) -> PathBuf {
        tasks_dir.join(self.file_name())
    }

    /// The attempt's pid file under `pid_dir` (`<work-dir>/pids`).
    pub fn pid_file(&self, pid_dir: &Path) -> PathBuf {
        pid_dir.join(format!("{}.pid", self.file_name()))
    }
}

/// Characters of the job id and of the vertex name kept in [`AttemptKey::file_name`].
pub const READABLE_LEN: usize = 64;

/// Hex digits of the identity's SHA-256 in [`AttemptKey::file_name`]: 64 bits, so that a
/// collision among the attempts of one TaskManager is out of reach.
const HASH_LEN: usize = 16;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    /// A child process.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// The job's environment variables (the task's environment is these, PATH,
        /// HOME, LANG and the task identity; see [`sandbox::task_env`]).
        env: BTreeMap<String, String>,
    },
    /// Built-in: succeed after a duration.
    Sleep(Duration),
    /// Built-in: fail with `code` after a duration.
    Fail(Duration, i32),
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Finished,
    /// Non-zero exit, a signal, or a failure to start.
    Failed {
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// Human-readable reason.
        reason: String,
    },
    /// Stopped because we cancelled it.
    Canceled,
}

/// A report that an attempt ended.
#[derive(Debug)]
pub struct Exit {
    /// Which attempt.
    pub key: AttemptKey,
    /// How it ended.
    pub outcome: Outcome,
}

/// A running attempt.
pub struct Running {
    /// Process id, for command tasks.
    pub pid: Option<u32>,
    cancel: Option<oneshot::Sender<()>>,
}

impl Running {
    /// Asks the attempt to stop (SIGTERM now, SIGKILL after the grace period).
    pub fn cancel(&mut self) {
        if let Some(tx) = self.cancel.take() {
            let _ = tx.send(());
        }
    }

    /// Whether a cancel was already requested.
    pub fn cancelling(&self) -> bool {
        self.cancel.is_none()
    }
}

/// Starts an attempt; its end is sent on `exits`. A command task runs only if `sandbox`
/// allows it, as the sandbox's task user, with `identity` (the `DISPATCHER_*` variables)
/// in its clean environment; a refusal fails the attempt with the sandbox's reason.
#[allow(clippy::too_many_arguments)]
pub fn start(
    key: AttemptKey,
    work: Work,
    task_dir: PathBuf,
    pid_dir: &Path,
    identity: BTreeMap<String, String>,
    sandbox: &Sandbox,
    kill_grace: Duration,
    exits: mpsc::UnboundedSender<Exit>,
) -> Running {
    let (cancel_tx, cancel_rx) = oneshot::channel();
    match work {
        Work::Command { argv, env } => {
            match spawn_process(&argv, &env, &identity, sandbox, &task_dir) {
                Ok(child) => {
                    let pid = child.id();
                    let pid_file = key.pid_file(pid_dir);
                    if let Some(pid) = pid {
                        if let Err(e) = write_pid_file(&pid_file, pid) {
                            tracing::warn!(error = %e, pid, "cannot record the pid");
                        }
                    }
                    tokio::spawn(watch_process(
                        key, child, cancel_rx, kill_grace, pid_file, exits,
                    ));
                    Running {
                        pid,
                        cancel: Some(cancel_tx),
                    }
                }
                Err(reason) => {
                    tracing::warn!(
                        job_id = %key.job, vertex = %key.vertex, subtask = key.subtask,
                        attempt = key.attempt, %reason, "command task refused or not started"
                    );
                    let _ = exits.send(Exit {
                        key,
                        outcome: Outcome::Failed {
                            exit_code: None,
                            reason,
                        },
                    });
                    Running {
                        pid: None,
                        cancel: Some(cancel_tx),
                    }
                }
            }
        }
        Work::Sleep(d) | Work::Fail(d, _) => {
            let fail = match work {
                Work::Fail(_, code) => Some(code),
                _ => None,
            };
            tokio::spawn(async move {
                let outcome = tokio::select! {
                    _ = tokio::time::sleep(d) => match fail {
                        None => Outcome::Finished,
                        Some(code) => Outcome::Failed { exit_code: Some(code), reason: format!("built-in fail task exited with {code}") },
                    },
                    _ = cancel_rx => Outcome::Canceled,
                };
                let _ = exits.send(Exit { key, outcome });
            });
            Running {
                pid: None,
                cancel: Some(cancel_tx),
            }
        }
    }
}

fn spawn_process(
    argv: &[String],
    job_env: &BTreeMap<String, String>,
    identity: &BTreeMap<String, String>,
    sandbox: &Sandbox,
    dir: &Path,
) -> Result<tokio::process::Child, String> {
    let launch = sandbox.launch(argv, job_env, identity, dir)?;
    let mut cmd = tokio::process::Command::new(&launch.program);
    if let Some(arg0) = argv.first() {
        cmd.arg0(arg0);
    }
    cmd.args(argv.iter().skip(1))
        .env_clear()
        .envs(&launch.env)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(launch.stdout))
        .stderr(Stdio::from(launch.stderr))
        // Its own process group, so cancel reaches everything it started.
        .process_group(0);
    let user = &sandbox.user;
    if user.switch {
        let (uid, gid) = (user.uid, user.gid);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setgroups, setgid, setuid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || sandbox::drop_privileges(uid, gid));
        }
    }
    cmd.spawn().map_err(|e| {
        if user.switch {
            format!(
                "cannot start {} as user {} (uid {}, --run-as): {e}",
                launch.program.display(),
                user.name,
                user.uid
            )
        } else {
            format!("cannot start {}: {e}", launch.program.display())
        }
    })
}

async fn watch_process(
    key: AttemptKey,
    mut child: tokio::process::Child,
    cancel: oneshot::Receiver<()>,
    grace: Duration,
    pid_file: PathBuf,
    exits: mpsc::UnboundedSender<Exit>,
) {
    let pid = child.id();
    let mut cancelled = false;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = cancel => {
            cancelled = true;
            signal_group(pid, Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    signal_group(pid, Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // No group kill here: the leader has been reaped, so its pid (the group id) may
    // already belong to an unrelated process group. Cancellation signals the group while
    // the leader still lives.
    let _ = std::fs::remove_file(&pid_file);
    let outcome = match status {
        _ if cancelled => Outcome::Canceled,
        Ok(s) if s.success() => Outcome::Finished,
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (Some(code), _) => Outcome::Failed {
                    exit_code: Some(code),
                    reason: format!("exited with code {code}"),
                },
                (None, Some(sig)) => Outcome::Failed {
                    exit_code: None,
                    reason: format!("killed by signal {sig}"),
                },
                _ => Outcome::Failed {
                    exit_code: None,
                    reason: "ended without an exit status".into(),
                },
            }
        }
        Err(e) => Outcome::Failed {
            exit_code: None,
            reason: format!("cannot wait for the process: {e}"),
        },
    };
    let _ = exits.send(Exit { key, outcome });
}

/// Signals the process group a task leads. A group id of 0 or 1 is never signalled:
/// `killpg(1)` is `kill(-1)`, every process the TaskManager may signal.
fn signal_group(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1) {
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// The start time of a process (clock ticks since boot, field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let started = start_time(pid).unwrap_or(0);
    std::fs::write(path, format!("{pid} {started}\n"))
}

/// Kills the process groups recorded in `pid_dir` by a previous life of this
/// TaskManager, if they are still the same processes, and removes the pid files.
/// Every file counts, whatever its name: the content, not the name, says what to kill,
/// so pid files named by an earlier version are handled alike. Returns how many were
/// killed.
pub fn kill_orphans(pid_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(pid_dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parts = text.split_whitespace();
        let pid: Option<u32> = parts.next().and_then(|p| p.parse().ok());
        let recorded: Option<u64> = parts.next().and_then(|s| s.parse().ok());
        if let (Some(pid), Some(recorded)) = (pid, recorded) {
            if start_time(pid) == Some(recorded) {
                tracing::warn!(pid, file = %path.display(), "killing an orphan of a previous run");
                signal_group(Some(pid), Signal::SIGKILL);
                killed += 1;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

#[cfg(test)]
mod tests;

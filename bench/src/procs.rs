//! Server processes the benchmark launches: dispatcher replicas, etcd members and
//! ZooKeeper servers. It owns their lifecycle (spawn, kill -9, pause, resume, restart) and
//! records every pid it starts in `pids` under the work directory, so that nothing it
//! launched outlives it: dropping a [`Node`] kills its process, and `cleanup` kills what
//! a crashed earlier run left behind. Every signal goes through
//! [`dispatcher_testkit::signal`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use dispatcher_testkit::signal::{self, Signal};

/// One server process and how to start it again.
pub struct Node {
    /// A name for logs and tables (`dispatcher-1`, `etcd-2`).
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// A node that runs `program args...` with its output in `work/NAME.log`.
    pub fn new(name: &str, program: impl Into<PathBuf>, args: Vec<String>, work: &Path) -> Self {
        Node {
            name: name.to_string(),
            program: program.into(),
            args,
            env: Vec::new(),
            log: work.join(format!("{name}.log")),
            pid_file: work.join("pids"),
            child: None,
        }
    }

    /// Adds an environment variable for every start.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the process (again), appending to its log.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        let mut pids = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.pid_file)?;
        writeln!(pids, "{} {}", child.id(), self.program.display())?;
        self.child = Some(child);
        Ok(())
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal::kill_child(&mut c);
        }
    }

    /// SIGSTOP: a hung host.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal::send(pid, Signal::SIGSTOP);
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            signal::send(pid, Signal::SIGCONT);
        }
    }

    /// Resident memory in KiB, from `/proc/PID/status`.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Resident memory of process `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Kills the processes a previous run recorded in `work/pids` that still run the same
/// program, then forgets them.
pub fn cleanup(work: &Path) {
    let file = work.join("pids");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return;
    };
    for line in text.lines() {
        let mut parts = line.splitn(2, ' ');
        let (Some(pid), Some(program)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        // The pid may have been recycled since that run: only a process that still runs
        // the recorded program is ours.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let same = Path::new(program)
            .canonicalize()
            .map(|p| p == exe)
            .unwrap_or(false);
        if same {
            signal::send(pid, Signal::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(file);
}

/// Where a program is: `dir/name` if `dir` is given, else the first match on PATH.
pub fn find_program(dir: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(d) = dir {
        let p = d.join(name);
        anyhow::ensure!(p.is_file(), "{} not found", p.display());
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not on PATH"))
}

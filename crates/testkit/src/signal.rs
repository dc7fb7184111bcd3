//! Signalling processes that a test started: only by a positive pid (never 0 or 1, never
//! negative), through kill(2) and killpg(2). Never through the `kill` program: procps-ng
//! 4.0.2 misreads some negative pids and signals every process on the machine
//! (`kill -9 -12` became `kill(-1, SIGKILL)`).

use std::path::Path;

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A pid that may be signalled: above 1 and representable.
fn target(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .map(Pid::from_raw)
}

/// Sends `sig` to one process; a pid of 0 or 1 is ignored.
pub fn send(pid: u32, sig: Signal) {
    if let Some(pid) = target(pid) {
        let _ = nix::sys::signal::kill(pid, sig);
    }
}

/// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`) to one process. Panics on a
/// name that is not a signal: that is a bug in the test.
pub fn send_named(pid: u32, name: &str) {
    let sig: Signal = format!("SIG{name}")
        .parse()
        .unwrap_or_else(|_| panic!("{name:?} is not a signal name"));
    send(pid, sig);
}

/// Sends `sig` to the process group that `leader` leads; a leader of 0 or 1 is ignored
/// (`killpg(1)` would be `kill(-1)`: every process).
pub fn send_group(leader: u32, sig: Signal) {
    if let Some(pgrp) = target(leader) {
        let _ = nix::sys::signal::killpg(pgrp, sig);
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Whether `pid` is alive, leads its own process group, and works in a directory under
/// `work_dir` (every command task a TaskManager starts does). Only then may a test kill
/// its group: pid 1 and pids an unrelated program has since taken never pass.
pub fn is_task_group_under(pid: u32, work_dir: &Path) -> bool {
    if pid <= 1 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let pgrp = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(str::to_string));
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let work_dir = work_dir
        .canonicalize()
        .unwrap_or_else(|_| work_dir.to_path_buf());
    alive(pid) && pgrp.as_deref() == Some(pid.to_string().as_str()) && cwd.starts_with(&work_dir)
}

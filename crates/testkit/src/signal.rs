//! Signalling processes that a test or tool started: the one place in the test packages
//! that sends signals. Only by a positive pid (never 0 or 1, never negative), through
//! kill(2) and killpg(2). Never through the `kill` program: procps-ng 4.0.2 misreads some
//! negative pids and signals every process on the machine (`kill -9 -12` became
//! `kill(-1, SIGKILL)`).

use std::path::Path;
use std::process::Child;

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

/// Kills a child we spawned with SIGKILL and reaps it, so that no zombie is left and its
/// ports and files are free once this returns. A stopped (SIGSTOP) child needs no
/// SIGCONT first: SIGKILL ends a stopped process too. Goes through [`Child::kill`],
/// which cannot hit a recycled pid, as the child is not reaped before it returns.
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pids_above_1_that_fit_a_pid_t_are_targets() {
        // 0 is our own process group, 1 is init, and a u32 above i32::MAX would wrap to
        // a negative pid, which kill(2) reads as a group (or, for -1, every process).
        for refused in [0, 1, u32::MAX, i32::MAX as u32 + 1] {
            assert_eq!(target(refused), None, "{refused}");
        }
        assert_eq!(target(2), Some(Pid::from_raw(2)));
        assert_eq!(target(i32::MAX as u32), Some(Pid::from_raw(i32::MAX)));
    }

    #[test]
    fn pid_1_never_counts_as_a_task_group() {
        assert!(!is_task_group_under(1, Path::new("/")));
        assert!(!is_task_group_under(0, Path::new("/")));
    }

    #[test]
    fn kill_child_reaps_a_stopped_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        send(child.id(), Signal::SIGSTOP);
        kill_child(&mut child);
        let status = child.try_wait().expect("status").expect("reaped");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }
}

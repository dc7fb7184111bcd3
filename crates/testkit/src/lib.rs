//! Test support shared by every test package: the end-to-end tests (`tests/`),
//! `raft-tests`, `chaos` and `bench`.
//!
//! - [`wait_for`]: wait on a condition with a deadline, never a fixed sleep.
//! - [`free_ports`]: loopback ports for processes under test.
//! - [`signal`]: signal a process by a positive pid we started, through kill(2) and
//!   killpg(2), never through the `kill` program.
//! - [`bin`]: where the workspace's binaries are.
//! - [`spec`]: job-spec builders.
//! - [`cluster`]: a cluster of real `dispatcher` and `taskmanager` processes.
//!
//! Must never be a dependency of a shipped crate.

pub mod cluster;
pub mod signal;
pub mod spec;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use cluster::ProcCluster;

/// Waits until `cond` returns `Some`, or panics after `timeout` saying `why`.
///
/// Runs on the caller's clock: under tokio's paused clock the 20 ms poll interval
/// auto-advances, so a deadline counts simulated time there.
pub async fn wait_for<T, F, Fut>(timeout: Duration, why: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {why}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (blocking the thread) until `cond` holds or `timeout` passes; returns whether
/// it held. For synchronous fixtures such as waiting for a child to exit.
pub fn wait_blocking(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` distinct free loopback ports (bound together, then released: good enough on a
/// test machine, where nothing else races for them).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// The directory holding the workspace's binaries (`dispatcher`, `taskmanager`,
/// `dispatchctl`): `DISPATCHER_BIN_DIR` if set, else the profile directory this
/// executable was built into (a test runs from `target/<profile>/deps`, a tool such as
/// `chaos` from `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DISPATCHER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of one of the workspace's binaries. Panics, saying how to build it, when it
/// is missing: the test packages cannot ask cargo for another package's binary.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         `make test` does)",
        path.display()
    );
    path
}

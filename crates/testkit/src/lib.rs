//! Test support shared by every test package: the end-to-end tests (`tests/`),
//! `raft-tests`, `chaos` and `bench`. A helper two of them need lives here, not in each:
//!
//! - [`wait_for`], [`wait_blocking`]: wait on a condition with a deadline, never a fixed
//!   sleep.
//! - [`free_ports`]: loopback ports for processes under test.
//! - [`bin_dir`], [`bin`]: where the workspace's binaries are.
//! - [`signal`]: every signal sent to a process, by a positive pid through kill(2) and
//!   killpg(2), never through the `kill` program; killing and reaping a child.
//! - [`spec`]: job-spec builders, so no test writes the proto messages by hand.
//! - [`cluster`]: a cluster of real `dispatcher` and `taskmanager` processes.
//! - [`http`]: calls to a replica's HTTP listener (plain or HTTPS with the cluster's CA).
//!
//! Must never be a dependency of a shipped crate.

pub mod cluster;
pub mod http;
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
pub async fn wait_for<T, F, Fut>(timeout: Duration, why: &str, cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_every(Duration::from_millis(20), timeout, why, cond).await
}

/// [`wait_for`], polling every `poll`.
pub async fn wait_for_every<T, F, Fut>(
    poll: Duration,
    timeout: Duration,
    why: &str,
    mut cond: F,
) -> T
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
        tokio::time::sleep(poll).await;
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
/// executable was built into. Tools with their own override (`CHAOS_BIN_DIR`,
/// `dispatch-bench --bin-dir`) consult it first and fall back to this.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DISPATCHER_BIN_DIR") {
        return PathBuf::from(d);
    }
    profile_dir(&std::env::current_exe().unwrap_or_default())
}

/// The profile directory (`target/<profile>`) of an executable cargo built: a test runs
/// from `target/<profile>/deps`, a tool such as `chaos` from `target/<profile>` itself,
/// and the binaries under test are always in the latter.
fn profile_dir(exe: &Path) -> PathBuf {
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

/// Secured clusters by replica address, so that [`dispatchctl`] finds the CA and token
/// of the cluster its endpoints belong to (every cluster has its own ports).
static SECURITY: std::sync::Mutex<Vec<(String, cluster::Security)>> =
    std::sync::Mutex::new(Vec::new());

pub(crate) fn register_security(addr: &str, security: cluster::Security) {
    let mut all = SECURITY.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(a, _)| a != addr);
    all.push((addr.to_string(), security));
}

pub(crate) fn unregister_security(addr: &str) {
    let mut all = SECURITY.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(a, _)| a != addr);
}

/// The security of the cluster `endpoints` (comma-separated) belong to, if secured.
pub fn security_of(endpoints: &str) -> Option<cluster::Security> {
    let all = SECURITY.lock().unwrap_or_else(|p| p.into_inner());
    endpoints.split(',').find_map(|e| {
        let e = e
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        all.iter().find(|(a, _)| a == e).map(|(_, s)| s.clone())
    })
}

/// Runs the `dispatchctl` binary against `endpoints` with a `--timeout` of `timeout`
/// seconds: its exit code (-1 if a signal ended it), stdout and stderr. Against a secured
/// [`ProcCluster`] it passes the cluster's `--ca`, and its admin `--token-file` unless
/// `args` name a token themselves. The test process's `DISPATCHER_*` variables do not
/// reach it.
pub fn dispatchctl(endpoints: &str, timeout: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(bin("dispatchctl"));
    for (key, _) in std::env::vars() {
        if key.starts_with("DISPATCHER_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(["--endpoints", endpoints, "--timeout", timeout]);
    if let Some(sec) = security_of(endpoints) {
        if !args.contains(&"--ca") {
            cmd.arg("--ca").arg(sec.ca());
        }
        if !args.iter().any(|a| a.starts_with("--token")) {
            cmd.arg("--token-file").arg(sec.admin_token());
        }
    }
    let out = cmd.args(args).output().expect("run dispatchctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_is_the_same_for_a_test_and_a_tool() {
        let test = Path::new("/w/target/debug/deps/cli-0123abcd");
        let tool = Path::new("/w/target/debug/chaos");
        assert_eq!(profile_dir(test), Path::new("/w/target/debug"));
        assert_eq!(profile_dir(tool), Path::new("/w/target/debug"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(8).expect("ports");
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), 8, "{ports:?}");
        assert!(ports.iter().all(|p| *p != 0));
    }
}

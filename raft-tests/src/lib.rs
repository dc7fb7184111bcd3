//! In-process Raft clusters of dispatcher replicas with a network whose links each test
//! controls (cut, heal, isolate, drop a share of messages, delay), for the tests of
//! election, replication, snapshots, membership and restarts in `tests/`.
//!
//! Each replica is the real thing (`Replica` over the sled log store and the
//! state-machine store in its own temporary directory); only the transport is replaced
//! ([`network`]).
//!
//! # What the harness owns
//!
//! - **The runtime and the clock.** Every test runs its body through [`simulate`]: one
//!   thread and tokio's paused clock ([`Cluster::start`] refuses to run elsewhere).
//!   openraft's heartbeats, election timers and backoffs, the link delays and every
//!   deadline here are tokio timers, so they run in simulated time: whenever no task can
//!   run, the clock jumps to the next timer. A 4-second window costs what the work in
//!   it costs, not 4 seconds. Deadlines are simulated too; the generous ones (15-20 s)
//!   cost nothing when met.
//! - **Disk I/O: real, but outside simulated time.** The stores sync on tokio's blocking
//!   pool with the production durability (flush + fdatasync). While a job is queued or
//!   running the clock does not move, so a slow fsync cannot fire an election timeout;
//!   and the pool only runs while the runtime thread is idle, so when a job finishes
//!   cannot reorder tasks ([`simulate`] explains how).
//! - **Randomness.** One seed per test ([`seed`]) drives every random choice:
//!   - which messages a lossy link drops: one stream per conversation (initiator,
//!     target, RPC), see [`network`];
//!   - each replica's election timeout, drawn per boot within the configured range.
//!     openraft draws its timeout with its runtime's `thread_rng()`, which the
//!     dispatcher's `TypeConfig` (`TokioRuntime`) leaves unseeded, so the harness hands
//!     each boot the one-value range `[t, t + 1)`, where openraft's draw can only be `t`.
//!     openraft also takes the leader lease (max) and the smaller-log timeout (2 × max)
//!     from that range, so a replica's lease is its own `t + 1` rather than the
//!     configured max. A seedable `AsyncRuntime` in dispatcher-server's `TypeConfig`
//!     would keep both and make this workaround unnecessary.
//! - **The trace** ([`trace`]): the fate of every message, each change of a replica's
//!   term, role or leader, and each harness action, in simulated milliseconds.
//!   [`Cluster::shutdown`] checks it for two leaders in one term.
//!
//! # Replaying a failure
//!
//! Every test prints `seed N (replay with RAFT_TEST_SEED=N)`. Rerun the failing test
//! with that variable, for example
//! `RAFT_TEST_SEED=N cargo test -p raft-tests --test election -- one_leader`: the same
//! drops, timeouts, elections and commit indexes, at the same simulated times.
//! `RUST_LOG=raft_tests=info` prints the harness's actions as they happen;
//! `Cluster::trace` has the rest. `tests/replay.rs` holds the harness to this: a run with
//! losses, a leader kill and a restart, twice, must give equal traces.
//!
//! # What the seed does not reach
//!
//! tokio seeds its own RNG from the OS per runtime (a seed is settable only with
//! `--cfg tokio_unstable`). It picks the branch of an unbiased `select!` when several are
//! ready (openraft's replication backoff, where either order ends in the same state) and
//! the wake-up order of several receivers of one `watch` channel (openraft's shutdown
//! path). The trace samples roles instead of watching the metrics channels for this
//! reason. Neither has shown up as a difference between runs; if a replay ever
//! diverges, `tests/replay.rs` prints the first events where the two runs part.

pub mod cluster;
pub mod network;
mod sim;
pub mod trace;

use std::future::Future;
use std::time::Duration;

use dispatcher_core::state::{JobSpec, TaskSpec};

pub use cluster::{Cluster, ClusterOptions};
pub use network::{Router, Rpc};
pub use sim::simulate;
pub(crate) use sim::simulated;
pub use trace::{Event, Fate, Leg, Trace};

/// The seed of a test: `RAFT_TEST_SEED` if set, else the test's default. Printed.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("RAFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed {seed} (replay with RAFT_TEST_SEED={seed})");
    seed
}

/// Initialises test logging once (`RUST_LOG` to see it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Waits until `cond` returns `Some`, polling every 10 ms of simulated time, or panics
/// after `timeout` (simulated) with `why`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, why: &str, cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    dispatcher_testkit::wait_for_every(Duration::from_millis(10), timeout, why, cond).await
}

/// A job spec for writes.
pub fn small_job(name: &str) -> JobSpec {
    JobSpec::single_vertex(name, "v", 1, TaskSpec::Sleep { duration_ms: 1 })
}

//! Stage timings of the write path, for the latency breakdown in docs/benchmarks.md
//! ("Where the time goes").
//!
//! Each stage a submission passes through on a replica reports how long it took as one
//! DEBUG event of target [`TARGET`] with the fields `stage`, `us` (microseconds) and,
//! where it helps, `entries` or `rpc`. They are off unless the level filter asks for them
//! (`DISPATCHER_LOG=info,dispatcher::timing=debug`); when off, a report costs one
//! `Instant::now()` and a cached level check, so they stay in release builds and the
//! breakdown measures the binaries that are deployed. `dispatch-bench breakdown` reads
//! them from the replicas' logs and prints the table.
//!
//! This module only reports: nothing may ever read these events back to decide anything.

use std::time::Instant;

/// The tracing target of every stage timing.
pub const TARGET: &str = "dispatcher::timing";

/// Reports that `stage` took from `start` until now.
pub fn since(stage: &'static str, start: Instant) {
    tracing::debug!(target: TARGET, stage, us = micros(start));
}

/// Reports that `stage`, which handled `entries` log entries, took from `start` until now.
pub fn entries_since(stage: &'static str, entries: usize, start: Instant) {
    tracing::debug!(target: TARGET, stage, entries, us = micros(start));
}

/// Reports that `stage` of the call `rpc` took from `start` until now.
pub fn rpc_since(stage: &'static str, rpc: &'static str, start: Instant) {
    tracing::debug!(target: TARGET, stage, rpc, us = micros(start));
}

fn micros(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

//! What durable appends cost: one Raft log append (one ~2 KiB SubmitJob entry) acknowledged
//! after sled's flush alone (`sync_file_range`, not power-loss safe) and after flush plus
//! `fdatasync` of sled's files (what the log store does).
//!
//! Run with `make bench` (or `cargo bench --bench storage`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dispatcher_core::state::{Command, JobId, JobSpec, TaskSpec};
use dispatcher_server::raft::log_store::{Durability, Identity, LogStore};
use dispatcher_server::raft::{LogId, TypeConfig};
use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, EntryPayload};

fn entry(index: u64) -> openraft::Entry<TypeConfig> {
    let task = TaskSpec::Command {
        argv: vec!["/bin/sh".into(), "-c".into(), "x".repeat(1800)],
        env: BTreeMap::new(),
    };
    let spec = JobSpec::single_vertex("bench", "map", 4, task);
    openraft::Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::SubmitJob {
            job_id: JobId::parse(&format!("00000000-0000-4000-8000-{index:012}")).expect("uuid"),
            spec,
            now: 1,
        }),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(durability: Durability, n: u64) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity {
        cluster: "bench".into(),
        node_id: 1,
    };
    let (mut store, _) = LogStore::open(dir.path(), &identity).expect("open");
    store.set_durability(durability);
    let mut times = Vec::with_capacity(n as usize);
    for i in 1..=n {
        let start = Instant::now();
        store.blocking_append_one(entry(i)).await;
        times.push(start.elapsed());
    }
    times.sort();
    times
}

trait AppendOne {
    async fn blocking_append_one(&mut self, e: openraft::Entry<TypeConfig>);
}

impl AppendOne for LogStore {
    async fn blocking_append_one(&mut self, e: openraft::Entry<TypeConfig>) {
        use openraft::storage::RaftLogStorageExt;
        self.blocking_append([e]).await.expect("append");
        let _ = RaftLogStorage::get_log_state(self).await;
    }
}

fn main() {
    let n: u64 = std::env::var("BENCH_APPENDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!("storage: {n} sequential appends of one ~2 KiB entry, acknowledged when durable");
    let mut medians = vec![];
    for (name, d) in [
        ("flush only (sled alone)", Durability::FlushOnly),
        ("flush + fdatasync", Durability::Fsync),
    ] {
        let t = rt.block_on(run(d, n));
        let total: Duration = t.iter().sum();
        println!(
            "  {name:<24} p50 {:>8.3} ms  p99 {:>8.3} ms  p99.9 {:>8.3} ms  {:>6.0} appends/s",
            percentile(&t, 0.5).as_secs_f64() * 1e3,
            percentile(&t, 0.99).as_secs_f64() * 1e3,
            percentile(&t, 0.999).as_secs_f64() * 1e3,
            n as f64 / total.as_secs_f64()
        );
        medians.push(percentile(&t, 0.5));
    }
    println!(
        "  fdatasync adds {:.3} ms per append at the median ({:.2}x)",
        (medians[1].as_secs_f64() - medians[0].as_secs_f64()) * 1e3,
        medians[1].as_secs_f64() / medians[0].as_secs_f64()
    );
}

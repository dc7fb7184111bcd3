//! The systems a benchmark drives: our dispatcher, and etcd and ZooKeeper for comparison.
//! Each launches a 3-member cluster on loopback as real processes (see [`crate::procs`]),
//! hands out a client that makes one durable 2 KiB write per call (a job submission for
//! the dispatcher, a key put for etcd, a znode create for ZooKeeper), and says which
//! member leads, so the failover workload can kill or freeze it.

pub mod dispatcher;
pub mod etcd;
pub mod zookeeper;

use std::time::Duration;

use crate::procs::Node;

/// Size of the record every write carries, as the comparison fixes it.
pub const RECORD_BYTES: usize = 2048;

/// A client of one system. Shared by all concurrent writers of a run.
#[tonic::async_trait]
pub trait Writer: Send + Sync {
    /// One write of a new record keyed by `key` (unique within the run), acknowledged
    /// only once durable on a majority. One try, bounded by `timeout`: the workload
    /// retries a failed write with the same key, and a retry that finds the record
    /// already there counts as success.
    async fn write(&self, key: &str, timeout: Duration) -> anyhow::Result<()>;
}

/// A running 3-member cluster of one system.
#[tonic::async_trait]
pub trait System: Send {
    /// `dispatcher`, `etcd` or `zookeeper`.
    fn name(&self) -> &'static str;
    /// Its member processes, in member order.
    fn nodes(&mut self) -> &mut Vec<Node>;
    /// A new client over every member.
    async fn writer(&self) -> anyhow::Result<Box<dyn Writer>>;
    /// The index in [`System::nodes`] of the member that leads now, asking each running
    /// member; an error while there is none.
    async fn leader(&self) -> anyhow::Result<usize>;
}

/// Waits until `sys` has a leader and accepts a write, or fails after `timeout`.
pub async fn wait_ready(sys: &dyn System, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = anyhow::anyhow!("not tried");
    while tokio::time::Instant::now() < deadline {
        match sys.leader().await {
            Ok(_) => match sys.writer().await {
                Ok(w) => match w
                    .write(&uuid::Uuid::new_v4().to_string(), Duration::from_secs(2))
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.context(format!("{} was not ready within {timeout:?}", sys.name())))
}

/// A payload of exactly `RECORD_BYTES` bytes that names its key.
pub fn record(key: &str) -> Vec<u8> {
    let mut v = format!("{{\"job\":\"{key}\",\"spec\":\"").into_bytes();
    v.resize(RECORD_BYTES - 2, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// A manual check of a system's launcher and client (the `#[ignore]` tests of each
/// system): it gets ready, takes writes, elects another leader when its leader is
/// killed, and takes writes again with the old leader restarted.
#[cfg(test)]
pub async fn kill_leader_smoke(sys: &mut dyn System, ready_within: Duration) -> anyhow::Result<()> {
    use std::time::Instant;
    let started = Instant::now();
    wait_ready(&*sys, ready_within).await?;
    let leader = sys.leader().await?;
    println!(
        "{} ready after {:?}, leader {}",
        sys.name(),
        started.elapsed(),
        leader + 1
    );
    let w = sys.writer().await?;
    let mut lat = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        w.write(&uuid::Uuid::new_v4().to_string(), Duration::from_secs(2))
            .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "100 sequential writes: p50 {:?}, p99 {:?}",
        lat[49], lat[98]
    );
    sys.nodes()[leader].kill9();
    let killed = Instant::now();
    let key = uuid::Uuid::new_v4().to_string();
    crate::workload::write_until_acked(&*w, &key, killed + Duration::from_secs(15)).await?;
    println!(
        "first write {:?} after kill -9 of the leader",
        killed.elapsed()
    );
    let new_leader = loop {
        match sys.leader().await {
            Ok(l) => break l,
            Err(e) if killed.elapsed() > Duration::from_secs(15) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    anyhow::ensure!(
        new_leader != leader,
        "the killed member is still reported as leader"
    );
    sys.nodes()[leader].spawn()?;
    for _ in 0..10 {
        let key = uuid::Uuid::new_v4().to_string();
        crate::workload::write_until_acked(&*w, &key, Instant::now() + Duration::from_secs(15))
            .await?;
    }
    Ok(())
}

//! Our own cluster: three `dispatcher` replicas on loopback, driven through the client
//! library. A write is a job submission whose spec is about 2 KiB (the same record the
//! other systems store), acknowledged once committed on a majority and applied.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use dispatcher_client::{Client, ClientConfig};
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::spec::{self, JobBuilder};

use super::{record, System, Writer};
use crate::procs::Node;

/// A running dispatcher cluster.
pub struct Dispatcher {
    nodes: Vec<Node>,
    /// Client addresses, in node order.
    pub endpoints: Vec<String>,
    /// Data directories, in node order.
    pub data_dirs: Vec<PathBuf>,
}

impl Dispatcher {
    /// Starts `members` replicas of `bin_dir/dispatcher` with data under `work`, plus
    /// any `extra` flags for every replica.
    pub fn start(
        work: &Path,
        bin_dir: &Path,
        members: usize,
        extra: &[String],
    ) -> anyhow::Result<Dispatcher> {
        let program = bin_dir.join("dispatcher");
        anyhow::ensure!(
            program.is_file(),
            "{} not found (build with `cargo build --release`)",
            program.display()
        );
        let ports = dispatcher_testkit::free_ports(members).context("free loopback ports")?;
        let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let initial = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{}={e}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        let mut data_dirs = Vec::new();
        for (i, addr) in endpoints.iter().enumerate() {
            let data = work.join(format!("dispatcher-{}", i + 1));
            let mut args = vec![
                "--id".to_string(),
                (i + 1).to_string(),
                "--listen".into(),
                addr.clone(),
                "--initial-cluster".into(),
                initial.clone(),
                "--data-dir".into(),
                data.display().to_string(),
            ];
            args.extend(extra.iter().cloned());
            let mut node = Node::new(&format!("dispatcher-{}", i + 1), &program, args, work)
                .env("DISPATCHER_LOG", "warn");
            node.spawn()?;
            nodes.push(node);
            data_dirs.push(data);
        }
        Ok(Dispatcher {
            nodes,
            endpoints,
            data_dirs,
        })
    }

    /// A client library handle tuned for benchmarking: short tries and backoff, so
    /// that a failover costs the cluster's time, not the client's.
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut cfg = ClientConfig::new(self.endpoints.clone());
        cfg.timeout = Duration::from_secs(30);
        cfg.per_try_timeout = Duration::from_millis(250);
        cfg.connect_timeout = Duration::from_millis(100);
        cfg.min_backoff = Duration::from_millis(2);
        cfg.max_backoff = Duration::from_millis(20);
        Client::new(cfg).context("dispatcher client")
    }
}

/// A job spec of about 2 KiB: one vertex of a command task whose environment carries
/// the record, so its encoded size matches the other systems' values.
pub fn job_spec(key: &str) -> pb::JobSpec {
    let rec = String::from_utf8_lossy(&record(key)).into_owned();
    // The record's own framing takes a few bytes; 1,900 keeps the encoded spec ~2 KiB.
    let payload = [("PAYLOAD", &rec[..1900])];
    JobBuilder::new(&format!("bench-{key}"))
        .vertex("work", 1, spec::command_with_env(&["/bin/true"], payload))
        // No TaskManager has this label: a benchmark's submissions wait in the queue
        // and never take the slots of the TaskManagers a failover run watches.
        .selector("pool", "dispatch-bench-none")
        .build()
}

struct DispatcherWriter {
    client: Client,
}

#[tonic::async_trait]
impl Writer for DispatcherWriter {
    async fn write(&self, key: &str, timeout: Duration) -> anyhow::Result<()> {
        let submit = self.client.submit_job(Some(key.to_string()), job_spec(key));
        match tokio::time::timeout(timeout, submit).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(_) => anyhow::bail!("no answer within {timeout:?}"),
        }
    }
}

#[tonic::async_trait]
impl System for Dispatcher {
    fn name(&self) -> &'static str {
        "dispatcher"
    }

    fn nodes(&mut self) -> &mut Vec<Node> {
        &mut self.nodes
    }

    async fn writer(&self) -> anyhow::Result<Box<dyn Writer>> {
        Ok(Box::new(DispatcherWriter {
            client: self.client()?,
        }))
    }

    async fn leader(&self) -> anyhow::Result<usize> {
        let client = self.client()?;
        for (i, e) in self.endpoints.iter().enumerate() {
            if !self.nodes[i].running() {
                continue;
            }
            let Ok(status) = client.replica_status(e).await else {
                continue;
            };
            let leads = status
                .replicas
                .first()
                .is_some_and(|r| r.role == pb::ReplicaRole::Leader as i32);
            if leads {
                return Ok(i);
            }
        }
        anyhow::bail!("no dispatcher replica leads")
    }
}

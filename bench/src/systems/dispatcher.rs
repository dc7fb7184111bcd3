//! Our own cluster: three `dispatcher` replicas on loopback, driven through the client
//! library. A write is a job submission whose spec is about 2 KiB (the same record the
//! other systems store), acknowledged once committed on a majority and applied.
//!
//! Secured by default, as users deploy it: development certificates
//! (`dispatchctl dev-certs`) under the work directory, TLS for clients and peers, the
//! bootstrap admin token for the benchmark's clients and a `taskmanager` token for its
//! simulated TaskManagers. [`Security::Plain`] measures the same cluster without them,
//! so that `compare` can state what TLS and tokens cost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use dispatcher_client::cli::dev_certs::{self, DevCertsArgs};
use dispatcher_client::{Client, ClientConfig, TlsConfig, Token};
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::spec::{self, JobBuilder};

use super::{record, System, Writer};
use crate::procs::Node;

/// How the cluster's clients, TaskManagers and peers talk to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// TLS everywhere and bearer tokens (the default deployment).
    Tls,
    /// Plain text, no tokens.
    Plain,
}

/// A running dispatcher cluster.
pub struct Dispatcher {
    nodes: Vec<Node>,
    /// Client addresses, in node order.
    pub endpoints: Vec<String>,
    /// Data directories, in node order.
    pub data_dirs: Vec<PathBuf>,
    /// The `dev-certs` directory (CA, replica certificates, admin token), when secured.
    certs: Option<PathBuf>,
    /// For [`System::leader`]: one client for the cluster's life, so that its
    /// connections (and TLS sessions) outlive each question, with tries long enough for
    /// a handshake on a busy machine (the answer is never on a measured path).
    status: Client,
}

impl Dispatcher {
    /// Starts `members` replicas of `bin_dir/dispatcher` with data under `work`, plus
    /// any `extra` flags for every replica; with [`Security::Tls`], development
    /// certificates and the admin token go to `work/certs`.
    pub fn start(
        work: &Path,
        bin_dir: &Path,
        members: usize,
        extra: &[String],
        security: Security,
    ) -> anyhow::Result<Dispatcher> {
        // Quiet by default; `DISPATCH_BENCH_REPLICA_LOG=info` to see why a run
        // misbehaved (elections, slow storage).
        let log = std::env::var("DISPATCH_BENCH_REPLICA_LOG").unwrap_or_else(|_| "warn".into());
        Self::start_logged(work, bin_dir, members, extra, security, &log)
    }

    /// As [`Dispatcher::start`], with the replicas' log filter (`DISPATCHER_LOG`) given.
    pub fn start_logged(
        work: &Path,
        bin_dir: &Path,
        members: usize,
        extra: &[String],
        security: Security,
        log: &str,
    ) -> anyhow::Result<Dispatcher> {
        let program = bin_dir.join("dispatcher");
        anyhow::ensure!(
            program.is_file(),
            "{} not found (build with `cargo build --release`)",
            program.display()
        );
        let certs = match security {
            Security::Plain => None,
            Security::Tls => {
                let certs = work.join("certs");
                dev_certs::run(&DevCertsArgs {
                    out: certs.clone(),
                    replicas: members as u32,
                    hosts: vec![],
                    force: false,
                })
                .with_context(|| format!("development certificates in {}", certs.display()))?;
                Some(certs)
            }
        };
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
            if let Some(certs) = &certs {
                let file = |name: &str| certs.join(name).display().to_string();
                // Every replica gets the bootstrap token: whichever leads first creates
                // it, and it is a no-op once the cluster holds a token.
                args.extend([
                    "--tls-cert".into(),
                    file(&format!("replica-{}.crt", i + 1)),
                    "--tls-key".into(),
                    file(&format!("replica-{}.key", i + 1)),
                    "--tls-ca".into(),
                    file("ca.crt"),
                    "--bootstrap-token-file".into(),
                    file("admin.token"),
                ]);
            }
            // Benchmarks fill the state past the production default of 100k jobs (the
            // recover and 1m workloads); the limits are not what they measure.
            args.extend(["--max-jobs".into(), "100000000".into()]);
            args.extend(extra.iter().cloned());
            let mut node = Node::new(&format!("dispatcher-{}", i + 1), &program, args, work)
                .env("DISPATCHER_LOG", log);
            node.spawn()?;
            nodes.push(node);
            data_dirs.push(data);
        }
        let mut cfg = config(certs.as_deref(), &endpoints)?;
        cfg.per_try_timeout = Duration::from_secs(1);
        cfg.connect_timeout = Duration::from_secs(1);
        Ok(Dispatcher {
            nodes,
            endpoints,
            data_dirs,
            certs,
            status: Client::new(cfg).context("dispatcher status client")?,
        })
    }

    /// Whether it runs with TLS and tokens.
    pub fn security(&self) -> Security {
        if self.certs.is_some() {
            Security::Tls
        } else {
            Security::Plain
        }
    }

    /// Client settings for `endpoints` of this cluster with the library's defaults:
    /// when secured, trusting its CA and sending the admin token.
    pub fn client_config(&self, endpoints: &[String]) -> anyhow::Result<ClientConfig> {
        config(self.certs.as_deref(), endpoints)
    }

    /// Client settings for simulated TaskManagers: as [`Dispatcher::client_config`] over
    /// every replica, but when secured with a new `taskmanager` token (bound to every
    /// id), as an operator gives real TaskManagers. The cluster must be ready.
    pub async fn task_manager_config(&self) -> anyhow::Result<ClientConfig> {
        let cfg = self.client_config(&self.endpoints)?;
        if self.certs.is_none() {
            return Ok(cfg);
        }
        let name = format!("bench-taskmanagers-{}", uuid::Uuid::new_v4());
        let secret = self
            .client()?
            .create_token(&name, pb::TokenRole::TaskManager, vec!["*".into()])
            .await
            .context("creating the simulated TaskManagers' token")?
            .secret;
        Ok(cfg.with_token(Token::new(&secret)?))
    }

    /// A client library handle tuned for benchmarking: short tries and backoff, so
    /// that a failover costs the cluster's time, not the client's.
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut cfg = self.client_config(&self.endpoints)?;
        cfg.timeout = Duration::from_secs(30);
        cfg.per_try_timeout = Duration::from_millis(250);
        cfg.connect_timeout = Duration::from_millis(100);
        cfg.min_backoff = Duration::from_millis(2);
        cfg.max_backoff = Duration::from_millis(20);
        Client::new(cfg).context("dispatcher client")
    }
}

/// Client settings for `endpoints`: with `certs` (a `dev-certs` directory), trusting its
/// CA and sending its admin token.
fn config(certs: Option<&Path>, endpoints: &[String]) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::new(endpoints.to_vec());
    if let Some(certs) = certs {
        cfg = cfg
            .with_tls(TlsConfig::from_ca_file(&certs.join("ca.crt"))?)
            .with_token(Token::from_file(&certs.join("admin.token"))?);
    }
    Ok(cfg)
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
        match self.security() {
            Security::Tls => "dispatcher",
            Security::Plain => "dispatcher-plain",
        }
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
        for (i, e) in self.endpoints.iter().enumerate() {
            if !self.nodes[i].running() {
                continue;
            }
            let Ok(status) = self.status.replica_status(e).await else {
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

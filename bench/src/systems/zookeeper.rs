//! ZooKeeper for comparison: a 3-server ZooKeeper 3.8 ensemble on loopback, each server a
//! `java ... QuorumPeerMain zoo.cfg` [`Node`] run straight from Debian's jars (package
//! `zookeeper`, installed by scripts/bench-deps.sh) with its config, `myid` and data in
//! `work/zk-N` and default durability (`forceSync=yes`: every transaction fsynced). This
//! module owns the servers' configs and command lines, the `zookeeper-client` session it
//! writes through (a persistent 2 KiB znode `/jobs/<key>` per write), and leader detection
//! with the `srvr` four-letter word.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;
use zookeeper_client as zk;

use super::{record, System, Writer};
use crate::procs::{find_program, Node};

/// Debian's ZooKeeper server jar; its manifest's Class-Path names the other jars it needs
/// in /usr/share/java (netty, slf4j-api, jute, metrics, ...).
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
/// An SLF4J binding and log4j 1.2, so that the servers' logs reach their log files; without
/// them ZooKeeper still runs but logs nothing (SLF4J falls back to its no-op logger).
const LOG_JARS: [&str; 2] = [
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
];
/// Session timeout the client asks for: the least the servers grant (2 x tickTime).
const SESSION_TIMEOUT: Duration = Duration::from_secs(4);
/// How long `leader` waits for one server's `srvr` answer.
const SRVR_TIMEOUT: Duration = Duration::from_millis(300);

const LOG4J: &str = "\
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.Threshold=INFO
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} - %-5p [%t:%C{1}@%L] - %m%n
";

/// A running 3-server ZooKeeper ensemble.
pub struct ZooKeeper {
    nodes: Vec<Node>,
    /// Client ports on 127.0.0.1, in server order.
    client_ports: Vec<u16>,
    /// `127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`.
    connect: String,
}

/// The classpath for a server: the ZooKeeper jar, plus log4j if installed.
fn classpath() -> anyhow::Result<String> {
    anyhow::ensure!(
        Path::new(ZOOKEEPER_JAR).is_file(),
        "{ZOOKEEPER_JAR} not found (install ZooKeeper with scripts/bench-deps.sh)"
    );
    let mut cp = vec![ZOOKEEPER_JAR];
    if LOG_JARS.iter().all(|j| Path::new(j).is_file()) {
        cp.extend(LOG_JARS);
    }
    Ok(cp.join(":"))
}

impl ZooKeeper {
    /// Starts servers 1..3 with configs and data under `work`. Returns once the JVMs run;
    /// [`super::wait_ready`] waits for a quorum.
    pub async fn start(work: &Path) -> anyhow::Result<ZooKeeper> {
        const SERVERS: usize = 3;
        let java = find_program(None, "java")
            .context("java not found (install a JRE with scripts/bench-deps.sh)")?;
        let cp = classpath()?;
        std::fs::create_dir_all(work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        // Absolute paths: zoo.cfg's dataDir is read by the JVM, not relative to `work`.
        let work = work
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", work.display()))?;
        let ports = dispatcher_testkit::free_ports(3 * SERVERS).context("free loopback ports")?;
        let mut client_ports = Vec::with_capacity(SERVERS);
        let mut quorum = String::new();
        for (i, three) in ports.chunks(3).enumerate() {
            let (client, peer, election) = (three[0], three[1], three[2]);
            client_ports.push(client);
            quorum.push_str(&format!("server.{}=127.0.0.1:{peer}:{election}\n", i + 1));
        }
        let mut nodes = Vec::with_capacity(SERVERS);
        for (i, port) in client_ports.iter().enumerate() {
            let id = i + 1;
            let dir = work.join(format!("zk-{id}"));
            let data = dir.join("data");
            std::fs::create_dir_all(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            write_file(&data.join("myid"), &format!("{id}\n"))?;
            // forceSync is left at its default (yes). maxClientCnxns=0 lifts the limit of
            // 60 connections per address: every client here comes from 127.0.0.1.
            let cfg = format!(
                "tickTime=2000\n\
                 initLimit=10\n\
                 syncLimit=5\n\
                 dataDir={data}\n\
                 clientPort={port}\n\
                 clientPortAddress=127.0.0.1\n\
                 maxClientCnxns=0\n\
                 admin.enableServer=false\n\
                 4lw.commands.whitelist=srvr,ruok\n\
                 {quorum}",
                data = data.display(),
            );
            let cfg_path = dir.join("zoo.cfg");
            write_file(&cfg_path, &cfg)?;
            let log4j = dir.join("log4j.properties");
            write_file(&log4j, LOG4J)?;
            let args = vec![
                "-Xmx256m".to_string(),
                format!("-Dzookeeper.log.dir={}", dir.display()),
                format!("-Dlog4j.configuration=file:{}", log4j.display()),
                "-cp".into(),
                cp.clone(),
                "org.apache.zookeeper.server.quorum.QuorumPeerMain".into(),
                cfg_path.display().to_string(),
            ];
            let mut node = Node::new(&format!("zookeeper-{id}"), &java, args, &work);
            node.spawn()
                .with_context(|| format!("cannot start ZooKeeper server {id}"))?;
            nodes.push(node);
        }
        let connect = client_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(ZooKeeper {
            nodes,
            client_ports,
            connect,
        })
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A new session over all servers, bounded by `timeout`.
async fn connect(cluster: &str, timeout: Duration) -> anyhow::Result<zk::Client> {
    let connecting = zk::Client::connector()
        .with_session_timeout(SESSION_TIMEOUT)
        .connect(cluster);
    tokio::time::timeout(timeout, connecting)
        .await
        .with_context(|| format!("no ZooKeeper session within {timeout:?}"))?
        .with_context(|| format!("cannot connect to ZooKeeper at {cluster}"))
}

/// The `srvr` answer of the server on `port`.
async fn srvr(port: u16) -> anyhow::Result<String> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"srvr").await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    tokio::time::timeout(SRVR_TIMEOUT, ask)
        .await
        .context("no srvr answer in time")?
        .with_context(|| format!("srvr to 127.0.0.1:{port}"))
}

/// One session shared by every caller, replaced when it expires or closes.
struct ZkWriter {
    cluster: String,
    client: RwLock<Option<zk::Client>>,
}

impl ZkWriter {
    /// The live session, connecting a new one (within `timeout`) if there is none.
    async fn client(&self, timeout: Duration) -> anyhow::Result<zk::Client> {
        if let Some(c) = &*self.client.read().await {
            if !c.state().is_terminated() {
                return Ok(c.clone());
            }
        }
        let mut slot = self.client.write().await;
        if let Some(c) = &*slot {
            if !c.state().is_terminated() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let c = connect(&self.cluster, timeout).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops `failed` so that the next call reconnects, unless it was already replaced.
    async fn forget(&self, failed: &zk::Client) {
        let mut slot = self.client.write().await;
        if slot
            .as_ref()
            .is_some_and(|c| c.session_id() == failed.session_id())
        {
            *slot = None;
        }
    }
}

#[tonic::async_trait]
impl Writer for ZkWriter {
    async fn write(&self, key: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let client = self.client(timeout).await?;
        let path = format!("/jobs/{key}");
        let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let data = record(key);
        let create = client.create(&path, &data, &options);
        match tokio::time::timeout_at(deadline, create).await {
            // NodeExists: an earlier try of this write went through.
            Ok(Ok(_)) | Ok(Err(zk::Error::NodeExists)) => Ok(()),
            Ok(Err(e)) => {
                if matches!(
                    e,
                    zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
                ) || client.state().is_terminated()
                {
                    self.forget(&client).await;
                }
                Err(anyhow::Error::new(e).context(format!("ZooKeeper create {path}")))
            }
            Err(_) => anyhow::bail!("ZooKeeper create {path}: no answer within {timeout:?}"),
        }
    }
}

#[tonic::async_trait]
impl System for ZooKeeper {
    fn name(&self) -> &'static str {
        "zookeeper"
    }

    fn nodes(&mut self) -> &mut Vec<Node> {
        &mut self.nodes
    }

    async fn writer(&self) -> anyhow::Result<Box<dyn Writer>> {
        let client = connect(&self.connect, SESSION_TIMEOUT + Duration::from_secs(1)).await?;
        let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let made = tokio::time::timeout(SESSION_TIMEOUT, client.create("/jobs", &[], &options))
            .await
            .context("ZooKeeper create /jobs: no answer in time")?;
        match made {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(anyhow::Error::new(e).context("ZooKeeper create /jobs")),
        }
        Ok(Box::new(ZkWriter {
            cluster: self.connect.clone(),
            client: RwLock::new(Some(client)),
        }))
    }

    async fn leader(&self) -> anyhow::Result<usize> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .collect();
        let answers =
            futures::future::join_all(running.iter().map(|&i| srvr(self.client_ports[i]))).await;
        let mut seen = Vec::new();
        for (&i, answer) in running.iter().zip(answers) {
            match answer {
                Ok(text) => {
                    let mode = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Mode:"))
                        .map(str::trim)
                        .unwrap_or("?");
                    if mode == "leader" {
                        return Ok(i);
                    }
                    let mode = if text.contains("not currently serving") {
                        "not serving"
                    } else {
                        mode
                    };
                    seen.push(format!("{}: {mode}", i + 1));
                }
                Err(e) => seen.push(format!("{}: {e:#}", i + 1)),
            }
        }
        anyhow::bail!("no ZooKeeper server leads ({})", seen.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs Debian's zookeeper and a JRE (scripts/bench-deps.sh). Run with
    /// `cargo test -p dispatch-bench --bin dispatch-bench -- --ignored --nocapture zookeeper`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn zookeeper_failover() -> anyhow::Result<()> {
        let work = tempfile::tempdir()?;
        let mut sys = ZooKeeper::start(work.path()).await?;
        crate::systems::kill_leader_smoke(&mut sys, Duration::from_secs(90)).await
    }
}

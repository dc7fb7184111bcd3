//! A real cluster of `dispatcher` replicas and `taskmanager` agents as processes on
//! loopback, for the end-to-end tests: it owns their ports, data and work directories,
//! logs and lifetimes (nothing it started outlives it).
//!
//! Secured by default, as a user deploys it: development certificates
//! (`dispatchctl dev-certs`) in `<dir>/certs`, TLS on every replica and to peers, the
//! bootstrap admin token, TaskManagers with a `taskmanager` token. [`ProcCluster::client`]
//! and the [`crate::dispatchctl`] runner use the admin token and the CA; a test that
//! needs plain text starts with [`ProcCluster::start_plain`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatcher_client::cli::dev_certs::{self, DevCertsArgs};
use dispatcher_client::{Client, ClientConfig, TlsConfig, Token};
use dispatcher_proto::v1 as pb;

use crate::signal::{self, Signal};
use crate::{bin, free_ports, wait_for};

/// One replica process.
pub struct Proc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// One TaskManager process.
pub struct Tm {
    pub work_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// Environment variables set on the process, besides the test's own.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

/// A cluster of replica processes.
pub struct ProcCluster {
    pub first_only: Vec<String>,
    pub dir: tempfile::TempDir,
    pub procs: BTreeMap<u64, Proc>,
    pub tms: BTreeMap<String, Tm>,
    pub initial: String,
    pub extra_args: Vec<String>,
    /// The certificates and tokens, when the cluster is secured.
    pub security: Option<Security>,
    /// Each replica's `--http-listen` address, when HTTP is on.
    pub http: BTreeMap<u64, String>,
}

/// Where a secured cluster's certificates and tokens are.
#[derive(Clone, Debug)]
pub struct Security {
    /// The directory `dispatchctl dev-certs` wrote.
    pub dir: PathBuf,
}

impl Security {
    /// The CA certificate clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The bootstrap admin token's file.
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join("admin.token")
    }
    /// The TaskManagers' token file (created on the first TaskManager's start).
    pub fn task_manager_token(&self) -> PathBuf {
        self.dir.join("taskmanager.token")
    }
    /// The admin token's secret.
    pub fn admin_secret(&self) -> String {
        std::fs::read_to_string(self.admin_token())
            .expect("admin token file")
            .trim()
            .to_string()
    }
}

/// The `dispatcher` binary.
pub fn dispatcher_bin() -> PathBuf {
    bin("dispatcher")
}

impl ProcCluster {
    /// Starts `n` replicas with the binary's default settings.
    pub fn start(n: u64) -> ProcCluster {
        Self::start_with(n, &[])
    }

    /// Starts `n` replicas with the binary's defaults and waits until they agree on a
    /// leader: the opening of most end-to-end tests. Returns the cluster, a client over
    /// every replica and the leader's id.
    pub async fn start_elected(n: u64, timeout: Duration) -> (ProcCluster, Client, u64) {
        let c = Self::start(n);
        let client = c.client();
        let leader = c.leader(&client, timeout, "startup").await;
        (c, client, leader)
    }

    /// Starts `n` replicas with these extra flags (none: the binary's defaults).
    pub fn start_with(n: u64, flags: &[&str]) -> ProcCluster {
        Self::start_custom(n, flags, &[])
    }

    /// Starts `n` replicas in plain text without tokens (flags as [`Self::start_with`]).
    pub fn start_plain(n: u64, flags: &[&str]) -> ProcCluster {
        Self::start_inner(n, flags, &[], false)
    }

    /// Starts `n` replicas that also serve HTTP (`--http-listen` on a port of their
    /// own, see [`Self::http`]): HTTPS with tokens when `secure`, plain otherwise.
    pub fn start_http(n: u64, secure: bool) -> ProcCluster {
        Self::start_full(n, &[], &[], secure, true)
    }

    /// The base URL of replica `id`'s HTTP listener (`http://` or `https://`).
    pub fn http_url(&self, id: u64) -> String {
        let scheme = if self.security.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.http.get(&id).expect("HTTP is on"))
    }

    /// [`Self::start_custom`] in plain text without tokens.
    pub fn start_plain_custom(n: u64, flags: &[&str], first_only: &[&str]) -> ProcCluster {
        Self::start_inner(n, flags, first_only, false)
    }

    /// Starts `n` replicas with common flags and flags for replica 1 only.
    pub fn start_custom(n: u64, flags: &[&str], first_only: &[&str]) -> ProcCluster {
        Self::start_inner(n, flags, first_only, true)
    }

    fn start_inner(n: u64, flags: &[&str], first_only: &[&str], secure: bool) -> ProcCluster {
        Self::start_full(n, flags, first_only, secure, false)
    }

    fn start_full(
        n: u64,
        flags: &[&str],
        first_only: &[&str],
        secure: bool,
        http: bool,
    ) -> ProcCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let security = secure.then(|| {
            let certs = dir.path().join("certs");
            dev_certs::run(&DevCertsArgs {
                out: certs.clone(),
                replicas: n as u32,
                hosts: vec![],
                force: false,
            })
            .expect("development certificates");
            Security { dir: certs }
        });
        let ports = free_ports(if http { 2 * n as usize } else { n as usize })
            .expect("free loopback ports");
        let initial = (1..=n)
            .map(|id| format!("{id}=127.0.0.1:{}", ports[(id - 1) as usize]))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = ProcCluster {
            first_only: first_only.iter().map(|s| s.to_string()).collect(),
            procs: BTreeMap::new(),
            tms: BTreeMap::new(),
            initial,
            extra_args: flags.iter().map(|s| s.to_string()).collect(),
            dir,
            security,
            http: if http {
                (1..=n)
                    .map(|id| (id, format!("127.0.0.1:{}", ports[(n + id - 1) as usize])))
                    .collect()
            } else {
                BTreeMap::new()
            },
        };
        for id in 1..=n {
            let addr = format!("127.0.0.1:{}", ports[(id - 1) as usize]);
            let data_dir = c.dir.path().join(format!("data/{id}"));
            let log = c.dir.path().join(format!("replica-{id}.log"));
            if let Some(sec) = &c.security {
                crate::register_security(&addr, sec.clone());
            }
            c.procs.insert(
                id,
                Proc {
                    id,
                    addr,
                    data_dir,
                    log,
                    child: None,
                },
            );
            c.spawn(id);
        }
        c
    }

    /// The client address of a replica other than `leader`, to show that a follower
    /// forwards (or answers) a call.
    pub fn follower_addr(&self, leader: u64) -> String {
        self.procs
            .values()
            .find(|p| p.id != leader)
            .expect("a replica other than the leader")
            .addr
            .clone()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.procs.values().map(|p| p.addr.clone()).collect()
    }

    /// A client over every replica, with the admin token when secured.
    pub fn client(&self) -> Client {
        self.client_with_token(
            self.security
                .as_ref()
                .map(Security::admin_secret)
                .as_deref(),
        )
    }

    /// A client over only these replicas, as [`Self::client`] otherwise.
    pub fn client_for(&self, endpoints: &[&str]) -> Client {
        self.client_inner(
            endpoints.iter().map(|e| e.to_string()).collect(),
            self.security
                .as_ref()
                .map(Security::admin_secret)
                .as_deref(),
        )
    }

    /// A client over every replica with this token (`None`: no token), trusting the
    /// cluster's CA when secured.
    pub fn client_with_token(&self, token: Option<&str>) -> Client {
        self.client_inner(self.endpoints(), token)
    }

    fn client_inner(&self, endpoints: Vec<String>, token: Option<&str>) -> Client {
        let mut cfg = ClientConfig::new(endpoints);
        cfg.timeout = Duration::from_secs(20);
        cfg.per_try_timeout = Duration::from_secs(2);
        if let Some(sec) = &self.security {
            cfg.tls = Some(TlsConfig::from_ca_file(&sec.ca()).expect("the cluster's CA"));
        }
        cfg.token = token.map(|t| Token::new(t).expect("a token"));
        Client::new(cfg).expect("client")
    }

    /// Starts (or restarts) replica `id`.
    pub fn spawn(&mut self, id: u64) {
        let initial = self.initial.clone();
        let mut extra = self.extra_args.clone();
        if id == 1 {
            extra.extend(self.first_only.iter().cloned());
        }
        if let Some(sec) = &self.security {
            let file = |name: String| sec.dir.join(name).to_str().expect("utf-8").to_string();
            extra.extend([
                "--tls-cert".into(),
                file(format!("replica-{id}.crt")),
                "--tls-key".into(),
                file(format!("replica-{id}.key")),
                "--tls-ca".into(),
                file("ca.crt".into()),
                "--bootstrap-token-file".into(),
                file("admin.token".into()),
            ]);
        }
        if let Some(http) = self.http.get(&id) {
            extra.extend(["--http-listen".into(), http.clone()]);
        }
        let p = self.procs.get_mut(&id).expect("known replica");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .expect("log file");
        let child = Command::new(dispatcher_bin())
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &p.addr,
                "--initial-cluster",
                &initial,
            ])
            .arg("--data-dir")
            .arg(&p.data_dir)
            .args(&extra)
            .env(
                "DISPATCHER_LOG",
                std::env::var("TEST_DISPATCHER_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            // Tests restart jobs after 100-200 ms to stay fast, below the production floor
            // of 1 s; a test that wants the floor passes --min-restart-delay-ms.
            .env("DISPATCHER_MIN_RESTART_DELAY_MS", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dispatcher");
        p.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.procs.get_mut(&id).and_then(|p| p.child.take()) {
            signal::kill_child(&mut child);
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, id: u64, sig: &str) {
        if let Some(child) = self.procs.get(&id).and_then(|p| p.child.as_ref()) {
            signal::send_named(child.id(), sig);
        }
    }

    /// Waits for a replica's exit and returns its status.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.procs.get_mut(&id)?.child.as_mut()?;
        let mut status = None;
        crate::wait_blocking(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// The local status of each running replica that answers (without digests).
    pub async fn statuses(&self, client: &Client) -> BTreeMap<u64, pb::ReplicaStatus> {
        self.statuses_with(client, false).await
    }

    /// The local status of each running replica that answers; with `digest`, each
    /// with its state digest.
    pub async fn statuses_with(
        &self,
        client: &Client,
        digest: bool,
    ) -> BTreeMap<u64, pb::ReplicaStatus> {
        let mut out = BTreeMap::new();
        for p in self.procs.values().filter(|p| p.child.is_some()) {
            if let Ok(resp) = client.replica_status_with(&p.addr, digest).await {
                if let Some(r) = resp.replicas.into_iter().find(|r| r.id == p.id) {
                    out.insert(p.id, r);
                }
            }
        }
        out
    }

    /// Waits until the running replicas agree on one leader, and returns it.
    pub async fn leader(&self, client: &Client, timeout: Duration, why: &str) -> u64 {
        wait_for(timeout, &format!("an agreed leader ({why})"), || async {
            let s = self.statuses(client).await;
            let running = self.procs.values().filter(|p| p.child.is_some()).count();
            if s.len() < running {
                return None;
            }
            let leader = s
                .values()
                .find(|r| r.role == pb::ReplicaRole::Leader as i32)?
                .id;
            s.values().all(|r| r.leader_id == leader).then_some(leader)
        })
        .await
    }

    /// Waits until every running replica reports the same applied index and digest.
    pub async fn converged(&self, client: &Client, timeout: Duration, why: &str) -> (u64, String) {
        wait_for(
            timeout,
            &format!("replicas to converge ({why})"),
            || async {
                let s = self.statuses_with(client, true).await;
                let running = self.procs.values().filter(|p| p.child.is_some()).count();
                if s.len() < running {
                    return None;
                }
                let first = s.values().next()?;
                s.values()
                    .all(|r| {
                        r.applied_index == first.applied_index
                            && r.state_digest == first.state_digest
                    })
                    .then(|| (first.applied_index, first.state_digest.clone()))
            },
        )
        .await
    }

    pub fn log_of(&self, id: u64) -> String {
        self.procs
            .get(&id)
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn data_dir(&self, id: u64) -> &Path {
        &self.procs[&id].data_dir
    }
}

impl ProcCluster {
    /// Starts a TaskManager `id` with `slots` slots (and extra flags).
    pub fn start_tm(&mut self, id: &str, slots: u32, extra: &[&str]) {
        self.start_tm_with_env(id, slots, extra, &[]);
    }

    /// Creates, once, the `taskmanager` token every TaskManager of a secured cluster
    /// uses (bound to every id), as an operator would with `dispatchctl token create`.
    fn ensure_task_manager_token(&self, sec: &Security) {
        if sec.task_manager_token().exists() {
            return;
        }
        let (code, out, err) = crate::dispatchctl(
            &self.endpoints().join(","),
            "30",
            &[
                "token",
                "create",
                "--role",
                "taskmanager",
                "--name",
                "taskmanagers",
                "--task-manager",
                "*",
            ],
        );
        assert_eq!(code, 0, "create the TaskManagers' token: {err}");
        std::fs::write(sec.task_manager_token(), out.trim()).expect("write the token file");
    }

    /// Starts a TaskManager `id` with extra flags and environment variables.
    pub fn start_tm_with_env(
        &mut self,
        id: &str,
        slots: u32,
        extra: &[&str],
        env: &[(&str, &str)],
    ) {
        let work_dir = self.dir.path().join(format!("tm/{id}"));
        let log = self.dir.path().join(format!("{id}.log"));
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.into(),
            "--slots".into(),
            slots.to_string(),
            "--dispatchers".into(),
            self.endpoints().join(","),
            "--kill-grace-ms".into(),
            "1000".into(),
        ];
        args.push("--work-dir".into());
        args.push(work_dir.to_str().expect("utf-8").into());
        if let Some(sec) = self.security.clone() {
            let own_token = extra.iter().any(|a| a.starts_with("--token"));
            args.extend(["--ca".into(), sec.ca().to_str().expect("utf-8").into()]);
            if !own_token {
                self.ensure_task_manager_token(&sec);
                args.extend([
                    "--token-file".into(),
                    sec.task_manager_token().to_str().expect("utf-8").into(),
                ]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.tms.insert(
            id.to_string(),
            Tm {
                work_dir,
                log,
                args,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                child: None,
            },
        );
        self.respawn_tm(id);
    }

    /// Starts a TaskManager again with the same flags and work directory.
    pub fn respawn_tm(&mut self, id: &str) {
        let tm = self.tms.get_mut(id).expect("known TaskManager");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tm.log)
            .expect("log");
        let child = Command::new(bin("taskmanager"))
            .args(&tm.args)
            .env("TASKMANAGER_LOG", "info")
            .envs(tm.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn taskmanager");
        tm.child = Some(child);
    }

    /// `kill -9` of a TaskManager (its task processes are orphaned, as in real life).
    pub fn kill_tm(&mut self, id: &str) {
        if let Some(mut child) = self.tms.get_mut(id).and_then(|t| t.child.take()) {
            signal::kill_child(&mut child);
        }
    }

    /// Sends a signal to a TaskManager.
    pub fn signal_tm(&self, id: &str, sig: &str) {
        if let Some(child) = self.tms.get(id).and_then(|t| t.child.as_ref()) {
            signal::send_named(child.id(), sig);
        }
    }

    /// The TaskManager's attempt history (`attempts.jsonl` and its rotated files),
    /// oldest first.
    pub fn tm_history(&self, id: &str) -> Vec<serde_json::Value> {
        dispatcher_client::taskmanager::history::records(&self.tms[id].work_dir)
    }

    /// Pids of command tasks started on a TaskManager, by (job, vertex, subtask, attempt).
    pub fn tm_pids(&self, id: &str) -> Vec<(String, String, u64, u64, u32)> {
        self.tm_history(id)
            .iter()
            .filter(|e| e["event"] == "start")
            .filter_map(|e| {
                let pid = e["detail"].as_str()?.strip_prefix("pid ")?.parse().ok()?;
                Some((
                    e["job_id"].as_str()?.to_string(),
                    e["vertex"].as_str()?.to_string(),
                    e["subtask"].as_u64()?,
                    e["attempt"].as_u64()?,
                    pid,
                ))
            })
            .collect()
    }
}

/// A line of a Rust backtrace: `  12: some::function` or `             at src/x.rs:3:4`.
fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        // A failing test shows how each replica ended and the end of its log: a replica
        // that exited (crash-only on a dead Raft core) is otherwise invisible.
        if std::thread::panicking() {
            for (id, p) in self.procs.iter_mut() {
                let exit = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                // Without backtrace frames, which would push a panic's message (the one
                // line that says what happened) out of the tail.
                let lines: Vec<&str> = log.lines().filter(|l| !is_backtrace_frame(l)).collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                eprintln!("--- replica {id} (exited: {exit:?}), last log lines:\n{tail}");
            }
        }
        // Its ports may be handed to another test next: they no longer mean this cluster.
        for p in self.procs.values() {
            crate::unregister_security(&p.addr);
        }
        let tms: Vec<String> = self.tms.keys().cloned().collect();
        for id in tms {
            self.kill_tm(&id);
            // Leave no task process behind, but only kill a group whose leader still
            // works in this TaskManager's directory: a pid that exited long ago may now
            // lead an unrelated process group (this test's own runner, say).
            let work_dir = self.tms[&id].work_dir.clone();
            for (.., pid) in self.tm_pids(&id) {
                if signal::is_task_group_under(pid, &work_dir) {
                    signal::send_group(pid, Signal::SIGKILL);
                }
            }
        }
        if let Ok(keep) = std::env::var("TEST_KEEP_LOGS") {
            for p in self.procs.values() {
                let _ = std::fs::copy(&p.log, format!("{keep}/replica-{}.log", p.id));
            }
        }
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

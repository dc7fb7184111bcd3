//! The cluster under test: `dispatcher` replicas and `taskmanager` agents as real
//! processes on loopback, each replica with its own data directory, and a proxy on every
//! directed replica-to-replica link.
//!
//! Secured unless asked otherwise, as users deploy it: development certificates
//! (`dispatchctl dev-certs`) in `<dir>/certs`, TLS for clients and peers, the bootstrap
//! admin token, and one `taskmanager` token for every TaskManager. The link proxies copy
//! bytes, so TLS passes through them unchanged; a replica checks its peer's certificate
//! by the name `replica-<id>`, not by the address it dialled, so a proxy in between is
//! no impostor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use dispatcher_client::cli::dev_certs::{self, DevCertsArgs};
use dispatcher_client::{Client, ClientConfig, TlsConfig, Token};
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::signal::{self, Signal};

use crate::proxy::{LinkMode, Proxy};

/// Where the binaries are: `CHAOS_BIN_DIR`, else [`dispatcher_testkit::bin_dir`].
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CHAOS_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(dispatcher_testkit::bin_dir)
}

/// The connection bound the replicas run with (`--max-connections`): low, so that a
/// connection flood reaches it without exhausting the harness's own descriptors.
pub const MAX_CONNECTIONS: usize = 128;

/// The replicas' snapshot interval (`--snapshot-after-logs`): low, so that a run of a
/// few minutes builds, sends, installs and purges snapshots (the production default
/// of 10,000 entries is an hour of the workload), and a corrupted file can be one.
pub const SNAPSHOT_AFTER_LOGS: u64 = 500;

/// A background fault that runs until the heal: busy threads, or a throttling loop.
struct Background {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Background {
    fn spawn(n: usize, body: impl Fn(&AtomicBool) + Send + Sync + 'static) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let body = Arc::new(body);
        let threads = (0..n)
            .map(|_| {
                let (stop, body) = (stop.clone(), body.clone());
                std::thread::spawn(move || body(&stop))
            })
            .collect();
        Background { stop, threads }
    }

    fn end(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A process we started.
pub struct Proc {
    /// Arguments to start it again.
    pub args: Vec<String>,
    /// Its log file.
    pub log: PathBuf,
    child: Option<Child>,
    /// Whether it is stopped with SIGSTOP.
    pub paused: bool,
}

impl Proc {
    /// Starts `program` with `args` (kept for restarts), its stderr appended to `log`.
    fn start(program: &Path, args: Vec<String>, log: PathBuf) -> anyhow::Result<Proc> {
        let mut p = Proc {
            args,
            log,
            child: None,
            paused: false,
        };
        p.spawn(program)?;
        Ok(p)
    }

    fn spawn(&mut self, program: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(program)
            .args(&self.args)
            .env("DISPATCHER_LOG", "info,openraft=warn")
            // The workload restarts jobs 100 ms after a failure, below the production
            // floor of 1 s, to see many restarts per run.
            .env("DISPATCHER_MIN_RESTART_DELAY_MS", "100")
            .env("TASKMANAGER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// Whether it runs (a process that exited by itself, as a replica does on a fatal
    /// storage error, is reaped here and counts as stopped).
    pub fn running(&mut self) -> bool {
        if let Some(c) = &mut self.child {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
            }
        }
        self.child.is_some()
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its resident set in MiB, from /proc (None if it is not running or /proc cannot
    /// tell).
    pub fn rss_mib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }

    fn signal(&self, sig: Signal) {
        if let Some(c) = &self.child {
            signal::send(c.id(), sig);
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal::kill_child(&mut c);
        }
        self.paused = false;
    }
}

/// The whole system under test.
pub struct Cluster {
    /// Working directory (data, logs, TaskManager work directories).
    pub dir: PathBuf,
    /// Replica id -> client address.
    pub addrs: BTreeMap<u64, String>,
    /// Replicas.
    pub replicas: BTreeMap<u64, Proc>,
    /// TaskManagers.
    pub task_managers: BTreeMap<String, Proc>,
    /// Directed link (from, to) -> its proxy.
    pub links: BTreeMap<(u64, u64), Proxy>,
    /// The certificates and tokens directory, when secured.
    pub certs: Option<PathBuf>,
    /// Busy threads or a throttling loop, until the heal.
    background: Vec<Background>,
    /// Idle connections of a flood, until the heal.
    flood: Vec<std::net::TcpStream>,
    /// The replica whose data is on a small tmpfs of its own, and that mount, when the
    /// harness may mount (root): the one a disk-full fault fills.
    pub disk: Option<(u64, PathBuf)>,
}

/// The size of the tmpfs under the last replica's data.
const DISK_MIB: u64 = 256;

/// Mounts a tmpfs of [`DISK_MIB`] at `at`; false if this process may not mount.
fn mount_tmpfs(at: &Path) -> bool {
    unmount(at);
    if std::fs::create_dir_all(at).is_err() {
        return false;
    }
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={DISK_MIB}m"), "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts `at` if something is mounted there (a mount left by an aborted run too).
pub fn unmount(at: &Path) {
    let _ = Command::new("umount")
        .arg(at)
        .stderr(Stdio::null())
        .status();
}

impl Cluster {
    /// Starts `replicas` replicas (behind link proxies) and `tms` TaskManagers, secured
    /// unless `plain`.
    pub async fn start(
        dir: &Path,
        replicas: u64,
        tms: usize,
        seed: u64,
        plain: bool,
    ) -> anyhow::Result<Cluster> {
        let certs = if plain {
            None
        } else {
            let certs = dir.join("certs");
            dev_certs::run(&DevCertsArgs {
                out: certs.clone(),
                replicas: replicas as u32,
                hosts: vec![],
                force: false,
            })
            .with_context(|| format!("development certificates in {}", certs.display()))?;
            Some(certs)
        };
        let ports = dispatcher_testkit::free_ports(replicas as usize)?;
        let addrs: BTreeMap<u64, String> = (1..=replicas)
            .map(|id| (id, format!("127.0.0.1:{}", ports[(id - 1) as usize])))
            .collect();
        let mut links = BTreeMap::new();
        for from in 1..=replicas {
            for to in 1..=replicas {
                if from != to {
                    let proxy = Proxy::start(addrs[&to].clone(), seed ^ (from << 8) ^ to).await?;
                    links.insert((from, to), proxy);
                }
            }
        }
        let initial = addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            addrs: addrs.clone(),
            replicas: BTreeMap::new(),
            task_managers: BTreeMap::new(),
            links,
            certs,
            background: Vec::new(),
            flood: Vec::new(),
            disk: None,
        };
        let disk_mount = dir.join(format!("disk-{replicas}"));
        if mount_tmpfs(&disk_mount) {
            c.disk = Some((replicas, disk_mount));
        }
        for id in 1..=replicas {
            let peers = (1..=replicas)
                .filter(|p| *p != id)
                .map(|p| format!("{p}=127.0.0.1:{}", c.links[&(id, p)].port))
                .collect::<Vec<_>>()
                .join(",");
            let mut args = vec![
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                addrs[&id].clone(),
                "--data-dir".into(),
                c.data_dir(id).display().to_string(),
                "--initial-cluster".into(),
                initial.clone(),
                "--peer-addresses".into(),
                peers,
                "--max-connections".into(),
                MAX_CONNECTIONS.to_string(),
                "--snapshot-after-logs".into(),
                SNAPSHOT_AFTER_LOGS.to_string(),
            ];
            if let Some(certs) = &c.certs {
                let file = |name: &str| certs.join(name).display().to_string();
                // Every replica gets the bootstrap token: whichever leads first creates
                // it, and it is a no-op once the cluster holds a token.
                args.extend([
                    "--tls-cert".into(),
                    file(&format!("replica-{id}.crt")),
                    "--tls-key".into(),
                    file(&format!("replica-{id}.key")),
                    "--tls-ca".into(),
                    file("ca.crt"),
                    "--bootstrap-token-file".into(),
                    file("admin.token"),
                ]);
            }
            let log = dir.join(format!("replica-{id}.log"));
            let p = Proc::start(&bin_dir().join("dispatcher"), args, log)?;
            c.replicas.insert(id, p);
        }
        let endpoints = addrs.values().cloned().collect::<Vec<_>>().join(",");
        let tm_security = match &c.certs {
            None => vec![],
            Some(certs) => {
                let token = certs.join("taskmanager.token");
                c.create_task_manager_token(&token).await?;
                vec![
                    "--ca".into(),
                    certs.join("ca.crt").display().to_string(),
                    "--token-file".into(),
                    token.display().to_string(),
                ]
            }
        };
        for n in 1..=tms {
            let id = format!("tm-{n}");
            let args = vec![
                "--id".into(),
                id.clone(),
                "--slots".into(),
                "8".into(),
                "--dispatchers".into(),
                endpoints.clone(),
                "--work-dir".into(),
                dir.join(format!("tm/{id}")).display().to_string(),
                "--kill-grace-ms".into(),
                "500".into(),
                // The checker needs every attempt record: keep all rotated files.
                "--attempts-keep".into(),
                "100000".into(),
            ]
            .into_iter()
            .chain(tm_security.iter().cloned())
            .collect();
            let log = dir.join(format!("{id}.log"));
            let p = Proc::start(&bin_dir().join("taskmanager"), args, log)?;
            c.task_managers.insert(id, p);
        }
        Ok(c)
    }

    /// Settings for a client of this cluster: its endpoints and, when secured, its CA
    /// and the admin token.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let mut cfg = ClientConfig::new(self.endpoints());
        if let Some(certs) = &self.certs {
            cfg = cfg
                .with_tls(TlsConfig::from_ca_file(&certs.join("ca.crt"))?)
                .with_token(Token::from_file(&certs.join("admin.token"))?);
        }
        Ok(cfg)
    }

    /// Creates the `taskmanager` token every TaskManager uses (bound to every id), as an
    /// operator would with `dispatchctl token create`, and writes its secret to `file`.
    /// Waits for the bootstrap admin token, which commits once a leader is elected.
    async fn create_task_manager_token(&self, file: &Path) -> anyhow::Result<()> {
        let mut cfg = self.client_config()?;
        cfg.timeout = Duration::from_secs(10);
        let admin = Client::new(cfg)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A fresh name each try: a try whose answer was lost may have created the
            // token, and its secret is then lost with the answer.
            let name = format!("taskmanagers-{attempt}");
            match admin
                .create_token(&name, pb::TokenRole::TaskManager, vec!["*".into()])
                .await
            {
                Ok(resp) => {
                    std::fs::write(file, &resp.secret)
                        .with_context(|| format!("write {}", file.display()))?;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    anyhow::bail!("no taskmanager token within 60 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// kill -9 of a replica.
    pub fn kill_replica(&mut self, id: u64) {
        if let Some(p) = self.replicas.get_mut(&id) {
            p.kill();
        }
    }

    /// Where replica `id` logs.
    pub fn replica_log(&self, id: u64) -> PathBuf {
        self.replicas.get(&id).map_or_else(
            || self.dir.join(format!("replica-{id}.log")),
            |p| p.log.clone(),
        )
    }

    /// Whether replica `id` runs (one that exited by itself is reaped).
    pub fn replica_running(&mut self, id: u64) -> bool {
        self.replicas.get_mut(&id).is_some_and(Proc::running)
    }

    /// Restarts a replica from its data directory.
    pub fn start_replica(&mut self, id: u64) -> anyhow::Result<()> {
        match self.replicas.get_mut(&id) {
            Some(p) => {
                if p.running() {
                    return Ok(());
                }
                p.spawn(&bin_dir().join("dispatcher"))
            }
            None => Ok(()),
        }
    }

    /// Where replica `id` keeps its data: on the tmpfs for the disk replica.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        match &self.disk {
            Some((d, mount)) if *d == id => mount.join("data"),
            _ => self.dir.join(format!("data/{id}")),
        }
    }

    /// Fills the disk replica's tmpfs with a file until the disk is full; returns the
    /// replica and the MiB written, or None if no tmpfs could be mounted.
    pub fn fill_disk(&mut self) -> Option<(u64, u64)> {
        use std::io::Write;
        let (id, mount) = self.disk.clone()?;
        let mut written = 0u64;
        if let Ok(mut f) = std::fs::File::create(mount.join("fill")) {
            let chunk = vec![0u8; 1 << 20];
            while f.write_all(&chunk).is_ok() {
                written += 1;
            }
        }
        Some((id, written))
    }

    /// Deletes a stopped replica's data directory.
    pub fn wipe_replica(&mut self, id: u64) -> anyhow::Result<()> {
        let dir = self.data_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    }

    /// Starts a replica on an empty directory as a new member: without
    /// `--initial-cluster`, so it waits to be added instead of bootstrapping.
    pub fn start_fresh_replica(&mut self, id: u64) -> anyhow::Result<()> {
        let Some(p) = self.replicas.get_mut(&id) else {
            return Ok(());
        };
        if let Some(i) = p.args.iter().position(|a| a == "--initial-cluster") {
            p.args.drain(i..i + 2);
        }
        // As docs/operations.md says to start a replacement.
        if !p.args.iter().any(|a| a == "--initial-cluster-state") {
            p.args
                .extend(["--initial-cluster-state".into(), "existing".into()]);
        }
        p.spawn(&bin_dir().join("dispatcher"))
    }

    /// SIGSTOP / SIGCONT of a replica.
    pub fn pause_replica(&mut self, id: u64, paused: bool) {
        if let Some(p) = self.replicas.get_mut(&id) {
            p.signal(if paused {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            });
            p.paused = paused;
        }
    }

    /// `threads` threads spinning until the heal.
    pub fn start_cpu_hog(&mut self, threads: usize) {
        self.background.push(Background::spawn(threads, |stop| {
            let mut x: u64 = 1;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
        }));
    }

    /// Replica `id` stopped for `stopped_ms` of every 100 ms until the heal, as the
    /// kernel throttles a cgroup over its CPU quota (CFS periods are 100 ms).
    pub fn throttle_replica(&mut self, id: u64, stopped_ms: u64) {
        let Some(pid) = self.replicas.get(&id).and_then(Proc::pid) else {
            return;
        };
        let stopped = Duration::from_millis(stopped_ms.min(99));
        let running = Duration::from_millis(100) - stopped;
        self.background.push(Background::spawn(1, move |stop| {
            while !stop.load(Ordering::Relaxed) {
                signal::send(pid, Signal::SIGSTOP);
                std::thread::sleep(stopped);
                signal::send(pid, Signal::SIGCONT);
                std::thread::sleep(running);
            }
        }));
    }

    /// Opens up to `n` idle TCP connections to replica `id`'s client port, held until the
    /// heal; returns how many connected (a replica past its bound accepts and closes).
    pub fn flood_connections(&mut self, id: u64, n: usize) -> usize {
        let Some(addr) = self.addrs.get(&id).and_then(|a| a.parse().ok()) else {
            return 0;
        };
        for _ in 0..n {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => self.flood.push(s),
                Err(_) => break,
            }
        }
        self.flood.len()
    }

    /// The largest resident set of a running replica, MiB.
    pub fn max_replica_rss_mib(&self) -> u64 {
        self.replicas
            .values()
            .filter_map(Proc::rss_mib)
            .max()
            .unwrap_or(0)
    }

    /// kill -9 of a TaskManager.
    pub fn kill_tm(&mut self, id: &str) {
        if let Some(p) = self.task_managers.get_mut(id) {
            p.kill();
        }
    }

    /// Restarts a TaskManager.
    pub fn start_tm(&mut self, id: &str) -> anyhow::Result<()> {
        match self.task_managers.get_mut(id) {
            Some(p) => {
                if p.running() {
                    return Ok(());
                }
                p.spawn(&bin_dir().join("taskmanager"))
            }
            None => Ok(()),
        }
    }

    /// Sets both directions between `a` and `b`.
    pub fn set_link(&self, a: u64, b: u64, mode: LinkMode) {
        for key in [(a, b), (b, a)] {
            if let Some(p) = self.links.get(&key) {
                p.set(mode);
            }
        }
    }

    /// Every link back to normal, every process resumed and running.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        // Background faults end first: a throttling loop must not stop a replica again
        // after the resume below.
        for b in self.background.drain(..) {
            b.end();
        }
        self.flood.clear();
        if let Some((_, mount)) = &self.disk {
            let _ = std::fs::remove_file(mount.join("fill"));
        }
        for p in self.links.values() {
            p.set(LinkMode::Pass);
        }
        let ids: Vec<u64> = self.replicas.keys().copied().collect();
        for id in ids {
            self.pause_replica(id, false);
            self.start_replica(id)?;
        }
        let tms: Vec<String> = self.task_managers.keys().cloned().collect();
        for id in tms {
            self.start_tm(&id)?;
        }
        Ok(())
    }

    /// Client endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.addrs.values().cloned().collect()
    }

    /// Stops everything.
    pub fn stop_all(&mut self) {
        for b in self.background.drain(..) {
            b.end();
        }
        self.flood.clear();
        for p in self.task_managers.values_mut() {
            p.kill();
        }
        for p in self.replicas.values_mut() {
            p.kill();
        }
    }

    /// The TaskManager work directory of `id`.
    pub fn tm_dir(&self, id: &str) -> PathBuf {
        self.dir.join(format!("tm/{id}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        if let Some((_, mount)) = &self.disk {
            unmount(mount);
        }
    }
}

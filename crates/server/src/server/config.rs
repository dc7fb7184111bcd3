//! The replica's configuration: command-line flags, `DISPATCHER_*` environment variables
//! and an optional TOML file, in that order of precedence, validated at start-up with
//! messages that name the bad setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use dispatcher_core::state::ResourceLimits;

use crate::leader::LivenessSettings;
pub use crate::raft::identity::InitialClusterState;
use crate::raft::replica::RaftSettings;
use crate::raft::NodeId;
pub use crate::tls::TlsFiles;

/// A configuration problem, naming the setting or the file and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (TOML errors name the line and column).
        message: String,
    },
    /// A setting is missing or invalid.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The setting, as a flag name.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of the `dispatcher` binary. Every flag can also come from a `DISPATCHER_*`
/// environment variable or from the `--config` file (flag > environment > file).
#[derive(Debug, Default, Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "A Raft-replicated job dispatcher replica"
)]
pub struct Args {
    /// TOML configuration file; its keys are the flag names with underscores.
    #[arg(long, env = "DISPATCHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This replica's id (a positive integer, unique in the cluster).
    #[arg(long, env = "DISPATCHER_ID")]
    pub id: Option<NodeId>,
    /// Address to listen on for gRPC (clients, TaskManagers and peers).
    #[arg(long, env = "DISPATCHER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address to serve HTTP on: Flink's REST API, Prometheus `/metrics` and the
    /// dashboard at `/` (off by default). HTTPS with this replica's certificate when TLS
    /// is configured; the same tokens and roles as gRPC.
    #[arg(long, env = "DISPATCHER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Address peers and clients reach this replica at (default: its --initial-cluster
    /// entry, else --listen).
    #[arg(long, env = "DISPATCHER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Data directory (sled log and snapshots).
    #[arg(long, env = "DISPATCHER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Members of a new cluster: `1=host:port,2=host:port,3=host:port`. Used only when
    /// the data directory is new; a replica with data never re-initialises.
    #[arg(long, env = "DISPATCHER_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// `new` (default): an empty data directory may bootstrap the cluster (only the
    /// lowest id of --initial-cluster, and only if no peer answers with an existing
    /// cluster). `existing`: never bootstrap; wait to be added. See docs/operations.md.
    #[arg(long, env = "DISPATCHER_INITIAL_CLUSTER_STATE", value_enum)]
    pub initial_cluster_state: Option<InitialClusterState>,
    /// Cluster name, recorded in the data directory; a directory of another cluster is
    /// refused.
    #[arg(long, env = "DISPATCHER_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Leader heartbeat period in milliseconds.
    #[arg(long, env = "DISPATCHER_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Lower bound of the election timeout in milliseconds.
    #[arg(long, env = "DISPATCHER_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the election timeout in milliseconds.
    #[arg(long, env = "DISPATCHER_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Build a snapshot after this many log entries (replica N after this many plus N
    /// mod 4 eighths of it, so that replicas do not all build at once).
    #[arg(long, env = "DISPATCHER_SNAPSHOT_AFTER_LOGS")]
    pub snapshot_after_logs: Option<u64>,
    /// Log format.
    #[arg(long, env = "DISPATCHER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Reach replica ID at HOST:PORT instead of its advertised address (a NAT or port
    /// forward between replicas): `2=10.0.0.7:17002,3=...`.
    #[arg(long, env = "DISPATCHER_PEER_ADDRESSES")]
    pub peer_addresses: Option<String>,
    /// How often TaskManagers heartbeat, in milliseconds (told to them at registration).
    #[arg(long, env = "DISPATCHER_TM_HEARTBEAT_MS")]
    pub tm_heartbeat_ms: Option<u64>,
    /// How long the leader waits for a TaskManager's heartbeat before it expires it and
    /// reschedules its tasks, in milliseconds.
    #[arg(long, env = "DISPATCHER_TM_LEASE_MS")]
    pub tm_lease_ms: Option<u64>,
    /// Disaster recovery: seed a NEW cluster with this backup (`dispatchctl cluster
    /// snapshot save`). Only on the bootstrapping replica (lowest id of
    /// --initial-cluster) with an empty data directory.
    #[arg(long, env = "DISPATCHER_RESTORE")]
    pub restore: Option<PathBuf>,
    /// This replica's TLS certificate (PEM). With --tls-key and --tls-ca, every port
    /// serves TLS only, peers are dialed over TLS, and tokens are required. The
    /// certificate must carry the DNS name `replica-<id>` (see docs/security.md).
    #[arg(long, env = "DISPATCHER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DISPATCHER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM): peers' and clients' certificates must chain to it.
    #[arg(long, env = "DISPATCHER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A file holding the first admin token's secret (32-512 printable characters; see
    /// `dispatchctl dev-certs`). Read once at start, only its hash is kept; this replica
    /// creates the token once it leads and the cluster has no token yet, so restarts
    /// with it change nothing. Also makes this replica require tokens from its start.
    #[arg(long, env = "DISPATCHER_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Allow a --listen address reachable from other hosts without TLS (and so without
    /// protected tokens). Logs a warning at every start.
    #[arg(long, env = "DISPATCHER_INSECURE")]
    pub insecure: bool,
    /// Most client and peer connections open at once (default 10000); further ones are
    /// closed as soon as they are accepted. Lowered at start so that 512 file
    /// descriptors stay free under the open-file limit.
    #[arg(long, env = "DISPATCHER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most concurrent calls (HTTP/2 streams) on one connection (default 256).
    #[arg(long, env = "DISPATCHER_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,
    /// Resource limit of a new cluster: most jobs in the registry that have not ended
    /// (default 100000). Like the three below, it seeds the replicated limits once, when
    /// the first leader finds none; later starts with other values change nothing.
    #[arg(long, env = "DISPATCHER_MAX_JOBS")]
    pub max_jobs: Option<u64>,
    /// Resource limit of a new cluster: most bytes of job specs (encoded) that jobs which
    /// have not ended hold (default 1073741824, 1 GiB).
    #[arg(long, env = "DISPATCHER_MAX_SPEC_BYTES")]
    pub max_spec_bytes: Option<u64>,
    /// Resource limit of a new cluster: smallest restart delay a job may ask for, in
    /// milliseconds (default 1000).
    #[arg(long, env = "DISPATCHER_MIN_RESTART_DELAY_MS")]
    pub min_restart_delay_ms: Option<u64>,
    /// Resource limit of a new cluster: most restart attempts a job may ask for
    /// (default 1000).
    #[arg(long, env = "DISPATCHER_MAX_RESTART_ATTEMPTS")]
    pub max_restart_attempts: Option<u32>,
    /// Most open WatchJob streams of one job on this replica (default 1000); past it a
    /// watch is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "DISPATCHER_MAX_WATCHERS_PER_JOB")]
    pub max_watchers_per_job: Option<usize>,
    /// Most open WatchJob streams on this replica (default 10000); past it a watch is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "DISPATCHER_MAX_WATCHERS")]
    pub max_watchers: Option<usize>,
}

/// The `--config` file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<NodeId>,
    listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    initial_cluster: Option<String>,
    initial_cluster_state: Option<InitialClusterState>,
    cluster_name: Option<String>,
    heartbeat_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    snapshot_after_logs: Option<u64>,
    log_format: Option<LogFormat>,
    peer_addresses: Option<String>,
    tm_heartbeat_ms: Option<u64>,
    tm_lease_ms: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    bootstrap_token_file: Option<PathBuf>,
    insecure: Option<bool>,
    max_connections: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_jobs: Option<u64>,
    max_spec_bytes: Option<u64>,
    min_restart_delay_ms: Option<u64>,
    max_restart_attempts: Option<u32>,
    max_watchers_per_job: Option<usize>,
    max_watchers: Option<usize>,
}

/// A validated replica configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Replica id.
    pub id: NodeId,
    /// Listen address.
    pub listen: SocketAddr,
    /// HTTP listen address (REST, metrics, dashboard), when enabled.
    pub http_listen: Option<SocketAddr>,
    /// Address others reach this replica at.
    pub advertise: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Members of a new cluster.
    pub initial_cluster: BTreeMap<NodeId, String>,
    /// Whether an empty data directory may bootstrap.
    pub initial_cluster_state: InitialClusterState,
    /// Cluster name.
    pub cluster_name: String,
    /// Raft timing and snapshots.
    pub raft: RaftSettings,
    /// Log format.
    pub log_format: LogFormat,
    /// A backup to seed a new cluster with.
    pub restore: Option<PathBuf>,
    /// Per-peer address overrides.
    pub peer_addresses: BTreeMap<NodeId, String>,
    /// TaskManager heartbeats and leases.
    pub liveness: LivenessSettings,
    /// TLS files, when the replica serves TLS.
    pub tls: Option<TlsFiles>,
    /// SHA-256 (hex) of the bootstrap admin token, never the secret itself.
    pub bootstrap_token_hash: Option<String>,
    /// Plain text on a non-loopback address was explicitly allowed.
    pub insecure: bool,
    /// Most connections open at once (before the file-descriptor reserve).
    pub max_connections: usize,
    /// Most concurrent calls on one connection.
    pub max_streams_per_connection: u32,
    /// The resource limits this replica proposes when it leads a cluster that has none
    /// yet (a new cluster, or one from before limits existed).
    pub resource_limits: ResourceLimits,
    /// Bounds on open job watches.
    pub watch: crate::watch::Limits,
}

/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of `--max-streams-per-connection`.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Reads the bootstrap token file: one secret of 32-512 printable ASCII characters
/// (surrounding whitespace ignored). Returns its hash; the secret is dropped here.
pub fn read_bootstrap_token(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let secret = text.trim();
    let printable = secret.chars().all(|c| c.is_ascii_graphic());
    if !(32..=512).contains(&secret.len()) || !printable {
        return Err(ConfigError::File {
            path: path.to_path_buf(),
            message: "must hold one token of 32-512 printable characters without spaces (dispatchctl dev-certs writes one)".into(),
        });
    }
    Ok(dispatcher_core::state::hash_secret(secret))
}

fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key, ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
        (cert, key, _) => {
            let missing = if cert.is_none() {
                "--tls-cert"
            } else if key.is_none() {
                "--tls-key"
            } else {
                "--tls-ca"
            };
            Err(invalid(
                missing,
                "TLS needs all three of --tls-cert, --tls-key and --tls-ca",
            ))
        }
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(raw: &str) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut members = BTreeMap::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| invalid("--initial-cluster", format!("{item:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id.trim().parse().map_err(|_| {
            invalid(
                "--initial-cluster",
                format!("{id:?} in {item:?} is not a replica id"),
            )
        })?;
        if id == 0 {
            return Err(invalid("--initial-cluster", "replica ids start at 1"));
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(invalid(
                "--initial-cluster",
                format!("{addr:?} (replica {id}) is not HOST:PORT"),
            ));
        }
        if members.insert(id, addr.to_string()).is_some() {
            return Err(invalid(
                "--initial-cluster",
                format!("replica {id} is listed twice"),
            ));
        }
    }
    Ok(members)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Args {
    /// Merges flags (and environment) over the config file and defaults, and validates.
    pub fn into_config(self) -> Result<ServerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let defaults = RaftSettings::default();
        let id = self
            .id
            .or(file.id)
            .ok_or_else(|| invalid("--id", "is required"))?;
        let listen = self
            .listen
            .or(file.listen)
            .ok_or_else(|| invalid("--listen", "is required"))?;
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .ok_or_else(|| invalid("--data-dir", "is required"))?;
        let initial_cluster = match self.initial_cluster.or(file.initial_cluster) {
            Some(raw) => parse_initial_cluster(&raw)?,
            None => BTreeMap::new(),
        };
        let advertise = self
            .advertise
            .or(file.advertise)
            .or_else(|| initial_cluster.get(&id).cloned())
            .unwrap_or_else(|| listen.to_string());
        let config = ServerConfig {
            id,
            listen,
            http_listen: self.http_listen.or(file.http_listen),
            advertise,
            data_dir,
            initial_cluster,
            initial_cluster_state: self
                .initial_cluster_state
                .or(file.initial_cluster_state)
                .unwrap_or_default(),
            cluster_name: self
                .cluster_name
                .or(file.cluster_name)
                .unwrap_or_else(|| "dispatcher".into()),
            raft: RaftSettings {
                heartbeat_ms: self
                    .heartbeat_ms
                    .or(file.heartbeat_ms)
                    .unwrap_or(defaults.heartbeat_ms),
                election_timeout_min_ms: self
                    .election_timeout_min_ms
                    .or(file.election_timeout_min_ms)
                    .unwrap_or(defaults.election_timeout_min_ms),
                election_timeout_max_ms: self
                    .election_timeout_max_ms
                    .or(file.election_timeout_max_ms)
                    .unwrap_or(defaults.election_timeout_max_ms),
                snapshot_after_logs: self
                    .snapshot_after_logs
                    .or(file.snapshot_after_logs)
                    .unwrap_or(defaults.snapshot_after_logs),
                ..defaults
            },
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            restore: self.restore,
            peer_addresses: match self.peer_addresses.or(file.peer_addresses) {
                Some(raw) => parse_initial_cluster(&raw).map_err(|_| {
                    invalid(
                        "--peer-addresses",
                        format!("{raw:?} is not ID=HOST:PORT,..."),
                    )
                })?,
                None => BTreeMap::new(),
            },
            tls: tls_files(
                self.tls_cert.or(file.tls_cert),
                self.tls_key.or(file.tls_key),
                self.tls_ca.or(file.tls_ca),
            )?,
            bootstrap_token_hash: match self.bootstrap_token_file.or(file.bootstrap_token_file) {
                Some(path) => Some(read_bootstrap_token(&path)?),
                None => None,
            },
            insecure: self.insecure || file.insecure.unwrap_or(false),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_streams_per_connection: self
                .max_streams_per_connection
                .or(file.max_streams_per_connection)
                .unwrap_or(DEFAULT_MAX_STREAMS_PER_CONNECTION),
            resource_limits: {
                let d = ResourceLimits::default();
                ResourceLimits {
                    max_jobs: self.max_jobs.or(file.max_jobs).unwrap_or(d.max_jobs),
                    max_spec_bytes: self
                        .max_spec_bytes
                        .or(file.max_spec_bytes)
                        .unwrap_or(d.max_spec_bytes),
                    min_restart_delay_ms: self
                        .min_restart_delay_ms
                        .or(file.min_restart_delay_ms)
                        .unwrap_or(d.min_restart_delay_ms),
                    max_restart_attempts: self
                        .max_restart_attempts
                        .or(file.max_restart_attempts)
                        .unwrap_or(d.max_restart_attempts),
                }
            },
            watch: {
                let d = crate::watch::Limits::default();
                crate::watch::Limits {
                    per_job: self
                        .max_watchers_per_job
                        .or(file.max_watchers_per_job)
                        .unwrap_or(d.per_job),
                    total: self.max_watchers.or(file.max_watchers).unwrap_or(d.total),
                }
            },
            liveness: {
                let d = LivenessSettings::default();
                LivenessSettings {
                    heartbeat_interval: self
                        .tm_heartbeat_ms
                        .or(file.tm_heartbeat_ms)
                        .map_or(d.heartbeat_interval, Duration::from_millis),
                    lease_timeout: self
                        .tm_lease_ms
                        .or(file.tm_lease_ms)
                        .map_or(d.lease_timeout, Duration::from_millis),
                    ..d
                }
            },
        };
        config.validate()?;
        Ok(config)
    }
}

impl ServerConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("--id", "replica ids start at 1"));
        }
        if self.max_connections < 16 {
            return Err(invalid("--max-connections", "must be at least 16"));
        }
        if self.max_streams_per_connection == 0 {
            return Err(invalid(
                "--max-streams-per-connection",
                "must be at least 1",
            ));
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() && !self.insecure {
            return Err(invalid(
                "--listen",
                format!(
                    "{} is reachable from other hosts, and without TLS its tokens and job secrets travel in clear text: give --tls-cert, --tls-key and --tls-ca (and --bootstrap-token-file on a new cluster; `dispatchctl dev-certs` writes development ones), or --insecure to accept the risk",
                    self.listen
                ),
            ));
        }
        if let Some(http) = self.http_listen {
            if !http.ip().is_loopback() && self.tls.is_none() && !self.insecure {
                return Err(invalid(
                    "--http-listen",
                    format!(
                        "{http} is reachable from other hosts, and without TLS its tokens travel in clear text: configure TLS (--tls-cert, --tls-key, --tls-ca), or --insecure to accept the risk"
                    ),
                ));
            }
            if http == self.listen {
                return Err(invalid(
                    "--http-listen",
                    "must differ from --listen (gRPC keeps its own port)",
                ));
            }
        }
        if !self.initial_cluster.is_empty() && !self.initial_cluster.contains_key(&self.id) {
            return Err(invalid(
                "--initial-cluster",
                format!("does not list this replica's id {}", self.id),
            ));
        }
        if let Some(listed) = self.initial_cluster.get(&self.id) {
            if *listed != self.advertise {
                return Err(invalid(
                    "--advertise",
                    format!(
                        "{} differs from this replica's --initial-cluster entry {listed}; peers and clients use the latter",
                        self.advertise
                    ),
                ));
            }
        }
        let l = &self.liveness;
        if l.heartbeat_interval.is_zero() {
            return Err(invalid("--tm-heartbeat-ms", "must be positive"));
        }
        if l.lease_timeout < 2 * l.heartbeat_interval {
            return Err(invalid(
                "--tm-lease-ms",
                format!(
                    "{} ms must be at least twice --tm-heartbeat-ms ({} ms), or one late heartbeat expires a healthy TaskManager",
                    l.lease_timeout.as_millis(),
                    l.heartbeat_interval.as_millis()
                ),
            ));
        }
        if let Err(dispatcher_core::state::Rejection::Invalid { field, reason }) =
            dispatcher_core::state::validate_resource_limits(&self.resource_limits)
        {
            let setting = match field.as_str() {
                "limits.max_jobs" => "--max-jobs",
                "limits.max_spec_bytes" => "--max-spec-bytes",
                "limits.min_restart_delay_ms" => "--min-restart-delay-ms",
                _ => "--max-restart-attempts",
            };
            return Err(invalid(setting, reason));
        }
        if self.watch.per_job == 0 {
            return Err(invalid("--max-watchers-per-job", "must be positive"));
        }
        if self.watch.total == 0 {
            return Err(invalid("--max-watchers", "must be positive"));
        }
        if self.cluster_name.trim().is_empty() {
            return Err(invalid("--cluster-name", "must not be empty"));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(invalid("--heartbeat-ms", "must be positive"));
        }
        if r.election_timeout_min_ms < 2 * r.heartbeat_ms {
            return Err(invalid(
                "--election-timeout-min-ms",
                format!(
                    "{} must be at least twice the heartbeat ({} ms), or followers start elections under a live leader",
                    r.election_timeout_min_ms, r.heartbeat_ms
                ),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "--election-timeout-max-ms",
                "must be greater than --election-timeout-min-ms",
            ));
        }
        if r.snapshot_after_logs == 0 {
            return Err(invalid("--snapshot-after-logs", "must be positive"));
        }
        r.to_openraft(&self.cluster_name, self.id)
            .map_err(|e| invalid("raft settings", e))?;
        if self.restore.is_some() {
            if self.initial_cluster.keys().next() != Some(&self.id) {
                return Err(invalid(
                    "--restore",
                    "only the replica that bootstraps the new cluster (the lowest id of --initial-cluster) restores",
                ));
            }
            if self.data_dir.join("raft").exists() {
                return Err(invalid(
                    "--restore",
                    format!(
                        "{} already holds data; a backup only seeds a new cluster",
                        self.data_dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            id: Some(1),
            listen: Some("127.0.0.1:7001".parse().expect("addr")),
            data_dir: Some("data/1".into()),
            initial_cluster: Some("1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003".into()),
            ..Args::default()
        }
    }

    #[test]
    fn flags_make_a_config_with_defaults_and_the_advertised_address_from_the_cluster() {
        let c = args().into_config().expect("valid");
        assert_eq!(c.initial_cluster.len(), 3);
        assert_eq!(c.advertise, "127.0.0.1:7001");
        assert_eq!(c.raft, RaftSettings::default());
        assert_eq!(c.watch, crate::watch::Limits::default());
    }

    #[test]
    fn http_is_off_by_default_and_guarded_like_grpc() {
        assert_eq!(args().into_config().expect("valid").http_listen, None);
        let on = Args {
            http_listen: Some("127.0.0.1:8081".parse().expect("addr")),
            ..args()
        };
        assert_eq!(
            on.into_config().expect("valid").http_listen,
            Some("127.0.0.1:8081".parse().expect("addr"))
        );
        let msg = |a: Args| a.into_config().expect_err("invalid").to_string();
        let m = msg(Args {
            http_listen: Some("0.0.0.0:8081".parse().expect("addr")),
            ..args()
        });
        assert!(m.contains("--http-listen") && m.contains("TLS"), "{m}");
        let m = msg(Args {
            http_listen: Some("127.0.0.1:7001".parse().expect("addr")),
            ..args()
        });
        assert!(m.contains("--http-listen") && m.contains("--listen"), "{m}");
        let open = Args {
            http_listen: Some("0.0.0.0:8081".parse().expect("addr")),
            insecure: true,
            ..args()
        };
        assert!(
            open.into_config().is_ok(),
            "--insecure allows it, as for --listen"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let msg = |a: Args| a.into_config().expect_err("invalid").to_string();
        assert!(msg(Args { id: None, ..args() }).contains("--id"));
        assert!(msg(Args {
            id: Some(4),
            ..args()
        })
        .contains("--initial-cluster"));
        let m = msg(Args {
            initial_cluster: Some("1=127.0.0.1:7001,x=y".into()),
            ..args()
        });
        assert!(m.contains("--initial-cluster") && m.contains("x=y"), "{m}");
        let m = msg(Args {
            election_timeout_min_ms: Some(80),
            ..args()
        });
        assert!(m.contains("--election-timeout-min-ms"), "{m}");
        let m = msg(Args {
            advertise: Some("10.0.0.9:7001".into()),
            ..args()
        });
        assert!(m.contains("--advertise"), "{m}");
        let m = msg(Args {
            max_watchers: Some(0),
            ..args()
        });
        assert!(
            m.contains("--max-watchers") && m.contains("positive"),
            "{m}"
        );
    }

    #[test]
    fn resource_limits_default_to_production_values_and_come_from_flags_or_the_file() {
        assert_eq!(
            args().into_config().expect("valid").resource_limits,
            ResourceLimits::default()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.toml");
        std::fs::write(
            &path,
            "max_jobs = 50
min_restart_delay_ms = 10
",
        )
        .expect("write");
        let c = Args {
            config: Some(path),
            max_jobs: Some(7),
            max_restart_attempts: Some(3),
            ..args()
        }
        .into_config()
        .expect("valid");
        assert_eq!(
            c.resource_limits,
            ResourceLimits {
                max_jobs: 7,
                min_restart_delay_ms: 10,
                max_restart_attempts: 3,
                ..ResourceLimits::default()
            }
        );
        let m = Args {
            max_jobs: Some(0),
            ..args()
        }
        .into_config()
        .expect_err("no job could ever be submitted")
        .to_string();
        assert!(m.contains("--max-jobs") && m.contains("at least 1"), "{m}");
    }

    #[test]
    fn a_config_file_fills_in_and_flags_win_and_errors_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.toml");
        std::fs::write(
            &path,
            "id = 2\nheartbeat_ms = 50\nelection_timeout_min_ms = 120\n",
        )
        .expect("write");
        let c = Args {
            id: None,
            config: Some(path.clone()),
            initial_cluster: None,
            ..args()
        }
        .into_config()
        .expect("valid");
        assert_eq!((c.id, c.raft.heartbeat_ms), (2, 50));
        let c = Args {
            config: Some(path.clone()),
            initial_cluster: None,
            ..args()
        }
        .into_config()
        .expect("valid");
        assert_eq!(c.id, 1, "the flag wins over the file");
        std::fs::write(&path, "id = 2\nheartbeat = 50\n").expect("write");
        let m = Args {
            config: Some(path),
            ..args()
        }
        .into_config()
        .expect_err("unknown key")
        .to_string();
        assert!(m.contains("replica.toml") && m.contains("line 2"), "{m}");
    }
}

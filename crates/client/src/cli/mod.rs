//! `dispatchctl`: the command-line client, on the client library.
//!
//! Exit status (stable, for scripts):
//! - 0: success (`job watch`: the job FINISHED);
//! - 1: an unexpected error;
//! - 2: bad usage (unknown command or flag);
//! - 3: not found (unknown job id or replica);
//! - 4: refused: invalid input (a spec file that does not parse or validate), an id
//!   reused with another spec, an illegal transition (cancel of a finished job);
//! - 5: the cluster is unavailable (no replica answered, no leader before the deadline;
//!   `cluster status`: no replica is leader);
//! - 6: `job watch` only: the job ended FAILED or CANCELED.

pub mod output;
pub mod spec_file;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::client::{transport_cause, Client, ClientConfig, ClientError};
use dispatcher_core::state::JobState;
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;
use output::Output;

/// Exit codes (see the module docs).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Unexpected error.
    pub const ERROR: u8 = 1;
    /// Not found.
    pub const NOT_FOUND: u8 = 3;
    /// Refused: invalid input, conflict, illegal transition.
    pub const REFUSED: u8 = 4;
    /// Cluster unavailable.
    pub const UNAVAILABLE: u8 = 5;
    /// A watched job ended FAILED or CANCELED.
    pub const JOB_FAILED: u8 = 6;
}

/// The `--timeout` values accepted, in seconds: a call needs at least a second to find a
/// leader, and an hour outlasts any election.
pub const TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=3600;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON (one document, or one line per event for `job watch`).
    Json,
}

/// The dispatcher's command-line client.
#[derive(Debug, Parser)]
#[command(
    name = "dispatchctl",
    version,
    about = "Submit and manage jobs on a dispatcher cluster"
)]
pub struct Cli {
    /// Replica addresses, comma-separated.
    #[arg(
        long,
        env = "DISPATCHCTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        global = true
    )]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    /// Deadline of each call, retries included, in seconds (1 to 3600).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 15,
        global = true,
        value_parser = clap::value_parser!(u64).range(TIMEOUT_SECS)
    )]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// The replicas.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// TaskManagers.
    #[command(subcommand)]
    Taskmanager(TaskManagerCmd),
    /// Checks one replica's gRPC health (the first endpoint): exit 0 when SERVING (it
    /// knows a leader), 5 otherwise. For container health checks and probes.
    Health {
        /// A service name to check (default: the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Prints a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Job commands.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Submits a job spec file (TOML, or JSON for `.json`); prints the job id.
    Submit {
        /// The spec file.
        file: PathBuf,
        /// Job id to use (a UUID); by default the file's `id`, else a new one.
        #[arg(long)]
        id: Option<String>,
    },
    /// Lists jobs.
    List {
        /// Only jobs in these states (e.g. RUNNING, FAILED); repeatable.
        #[arg(long = "state", value_name = "STATE")]
        states: Vec<String>,
        /// Only jobs whose name starts with this.
        #[arg(long)]
        name: Option<String>,
        /// Let any replica answer from its local state.
        #[arg(long)]
        stale: bool,
    },
    /// A job's state and every task's state, attempt, TaskManager and slot.
    Status {
        /// The job id.
        id: String,
        /// Let any replica answer from its local state.
        #[arg(long)]
        stale: bool,
    },
    /// Cancels a job.
    Cancel {
        /// The job id.
        id: String,
    },
    /// Streams a job's changes until it is terminal.
    Watch {
        /// The job id.
        id: String,
    },
}

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Every replica: id, address, process id, role, term, last log index, applied
    /// index, lag. Exits with 5 when no replica is leader (an election may be running).
    Status,
    /// Adds a replica (started with an empty data directory) and makes it a voter.
    AddNode {
        /// Its id.
        id: u64,
        /// Its address (host:port).
        addr: String,
        /// Leave it a learner (non-voting).
        #[arg(long)]
        learner: bool,
    },
    /// Removes a replica from the cluster.
    RemoveNode {
        /// Its id.
        id: u64,
    },
    /// Backups of the replicated state.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

/// Snapshot commands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Writes a consistent snapshot of the replicated state, taken on the leader, to FILE
    /// (restore it into a new cluster with `dispatcher --restore FILE`).
    Save {
        /// The backup file to write.
        file: PathBuf,
    },
}

/// TaskManager commands.
#[derive(Debug, Subcommand)]
pub enum TaskManagerCmd {
    /// Registered TaskManagers, their slots and what runs in them.
    List {
        /// Let any replica answer from its local state.
        #[arg(long)]
        stale: bool,
    },
}

/// A failure with its exit code and message.
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e.code() {
            Some(Code::NotFound) => exit::NOT_FOUND,
            Some(
                Code::InvalidArgument
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::OutOfRange,
            ) => exit::REFUSED,
            Some(Code::Unavailable | Code::DeadlineExceeded) => exit::UNAVAILABLE,
            Some(Code::ResourceExhausted) => exit::REFUSED,
            _ => exit::ERROR,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// Runs the CLI and returns its exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("dispatchctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn execute(cli: Cli) -> Result<u8, Failure> {
    let out = Output::new(cli.output);
    if let Cmd::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "dispatchctl", &mut std::io::stdout());
        return Ok(exit::OK);
    }
    if let Cmd::Health { service } = &cli.command {
        return health(&cli.endpoints[0], service, Duration::from_secs(cli.timeout)).await;
    }
    let mut config = ClientConfig::new(cli.endpoints.clone());
    config.timeout = Duration::from_secs(cli.timeout);
    let client = Client::new(config)?;
    match cli.command {
        Cmd::Job(cmd) => job(&client, &out, cmd).await,
        Cmd::Cluster(cmd) => cluster(&client, &out, cmd).await,
        Cmd::Taskmanager(TaskManagerCmd::List { stale }) => {
            let tms = client.list_task_managers(stale).await?;
            out.task_managers(&tms);
            Ok(exit::OK)
        }
        Cmd::Completions { .. } | Cmd::Health { .. } => Ok(exit::OK),
    }
}

async fn health(endpoint: &str, service: &str, timeout: Duration) -> Result<u8, Failure> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| failure(exit::REFUSED, format!("endpoint {endpoint:?}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| {
            let cause = transport_cause(&e);
            failure(exit::UNAVAILABLE, format!("{endpoint}: {cause}"))
        })?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|e| failure(exit::UNAVAILABLE, format!("{endpoint}: {}", e.message())))?;
    match resp.into_inner().status() {
        ServingStatus::Serving => {
            println!("SERVING");
            Ok(exit::OK)
        }
        other => Err(failure(
            exit::UNAVAILABLE,
            format!("{endpoint}: {}", other.as_str_name()),
        )),
    }
}

fn parse_state(raw: &str) -> Result<i32, Failure> {
    let upper = raw.to_ascii_uppercase();
    JobState::ALL
        .iter()
        .find(|s| s.name() == upper)
        .map(|s| convert::job_state_to_pb(*s) as i32)
        .ok_or_else(|| {
            let names: Vec<&str> = JobState::ALL.iter().map(|s| s.name()).collect();
            failure(
                exit::REFUSED,
                format!("unknown state {raw:?}; one of {}", names.join(", ")),
            )
        })
}

async fn job(client: &Client, out: &Output, cmd: JobCmd) -> Result<u8, Failure> {
    match cmd {
        JobCmd::Submit { file, id } => {
            let loaded =
                spec_file::load(&file).map_err(|e| failure(exit::REFUSED, e.to_string()))?;
            let id = id.or(loaded.id);
            let resp = client.submit_job(id, loaded.spec).await.map_err(|e| {
                let mut f = Failure::from(e);
                // Server-side validation names the field; the user needs the file too.
                if f.code == exit::REFUSED {
                    f.message = format!("{}: {}", file.display(), f.message);
                }
                f
            })?;
            out.submitted(&resp);
            Ok(exit::OK)
        }
        JobCmd::List {
            states,
            name,
            stale,
        } => {
            let states = states
                .iter()
                .map(|s| parse_state(s))
                .collect::<Result<Vec<_>, _>>()?;
            let jobs = client
                .list_all_jobs(pb::ListJobsRequest {
                    states,
                    name_prefix: name.unwrap_or_default(),
                    page_size: 500,
                    page_token: String::new(),
                    stale,
                })
                .await?;
            out.jobs(&jobs);
            Ok(exit::OK)
        }
        JobCmd::Status { id, stale } => {
            let job = client.get_job(&id, stale).await?;
            out.job(&job);
            Ok(exit::OK)
        }
        JobCmd::Cancel { id } => {
            let job = client.cancel_job(&id).await?;
            out.job_line(&job);
            Ok(exit::OK)
        }
        JobCmd::Watch { id } => {
            let mut events = client.watch_job(&id);
            let mut last: Option<pb::JobStatus> = None;
            while let Some(ev) = events.next().await {
                let ev = ev?;
                if let Some(job) = ev.job.clone() {
                    out.event(&ev, &job, last.as_ref());
                    last = Some(job);
                }
            }
            Ok(
                match last.and_then(|j| pb::JobState::try_from(j.state).ok()) {
                    Some(pb::JobState::Finished) => exit::OK,
                    Some(pb::JobState::Failed | pb::JobState::Canceled) => exit::JOB_FAILED,
                    _ => exit::UNAVAILABLE,
                },
            )
        }
    }
}

async fn cluster(client: &Client, out: &Output, cmd: ClusterCmd) -> Result<u8, Failure> {
    match cmd {
        ClusterCmd::Status => {
            let status = client.cluster_status().await?;
            out.cluster(&status);
            // The table is still worth printing (which replicas answer, their terms),
            // but a script or an operator checking on a failover must not read
            // "no leader" as success.
            if output::leader(&status).is_none() {
                let answered = status.replicas.iter().filter(|r| r.reachable).count();
                return Err(failure(
                    exit::UNAVAILABLE,
                    format!(
                        "no leader: an election may be running ({answered} of {} replicas \
                         answered)",
                        status.replicas.len()
                    ),
                ));
            }
            Ok(exit::OK)
        }
        ClusterCmd::AddNode { id, addr, learner } => {
            let resp = client.add_node(id, &addr, !learner).await?;
            out.members(&resp.membership);
            Ok(exit::OK)
        }
        ClusterCmd::RemoveNode { id } => {
            let resp = client.remove_node(id).await?;
            out.members(&resp.membership);
            Ok(exit::OK)
        }
        ClusterCmd::Snapshot(SnapshotCmd::Save { file }) => {
            let backup = client.snapshot().await?;
            backup
                .write(&file)
                .map_err(|e| failure(exit::ERROR, e.to_string()))?;
            out.saved(&file, &backup);
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(timeout: &str) -> Result<Cli, clap::Error> {
        let flag = format!("--timeout={timeout}");
        Cli::try_parse_from(["dispatchctl", flag.as_str(), "cluster", "status"])
    }

    #[test]
    fn the_timeout_is_refused_outside_its_documented_bounds() {
        for ok in ["1", "15", "3600"] {
            assert!(parse(ok).is_ok(), "--timeout {ok}");
        }
        for bad in ["0", "3601", "-1", "1.5"] {
            match parse(bad) {
                Ok(cli) => panic!("--timeout {bad} accepted as {}", cli.timeout),
                Err(e) => assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}"),
            }
        }
        let message = parse("0").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("1..=3600"), "{message}");
    }
}

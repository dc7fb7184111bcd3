//! `dispatchctl`: the command-line client, on the client library.
//!
//! Exit status (stable, for scripts):
//! - 0: success (`job watch`: the job FINISHED);
//! - 1: an unexpected error;
//! - 2: bad usage (unknown command or flag, flags that do not go together, a certificate,
//!   key or token file that cannot be read or used);
//! - 3: not found (unknown job id or replica);
//! - 4: refused: invalid input (a spec file that does not parse or validate), an id
//!   reused with another spec, an illegal transition (cancel of a finished job);
//! - 5: the cluster is unavailable (no replica answered, no leader before the deadline;
//!   `cluster status`: no replica is leader);
//! - 6: `job watch` only: the job ended FAILED or CANCELED;
//! - 7: not allowed: no token or an unknown or revoked one (UNAUTHENTICATED), or a token
//!   whose role does not allow the call (PERMISSION_DENIED).
//!
//! Connection flags (TLS, token) are [`ConnectArgs`], shared with the `taskmanager`.

pub mod dev_certs;
pub mod output;
pub mod spec_file;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::client::{transport_cause, Client, ClientConfig, ClientError, ConnectArgs};
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
    /// Bad usage: flags, or files they name that cannot be used.
    pub const USAGE: u8 = 2;
    /// Not found.
    pub const NOT_FOUND: u8 = 3;
    /// Refused: invalid input, conflict, illegal transition.
    pub const REFUSED: u8 = 4;
    /// Cluster unavailable.
    pub const UNAVAILABLE: u8 = 5;
    /// A watched job ended FAILED or CANCELED.
    pub const JOB_FAILED: u8 = 6;
    /// UNAUTHENTICATED or PERMISSION_DENIED.
    pub const DENIED: u8 = 7;
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
    /// TLS and token.
    #[command(flatten)]
    pub connect: ConnectArgs,
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
    /// Bearer tokens and their roles (admin only).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Writes a development CA, replica, TaskManager and client certificates, and an
    /// admin token (for development and tests, not production).
    #[command(long_about = DEV_CERTS_ABOUT)]
    DevCerts(dev_certs::DevCertsArgs),
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
    Status {
        /// Also each replica's state digest (replicas at the same applied index have the
        /// same digest). Hashes the whole state on every replica: for checks, not for
        /// polling.
        #[arg(long)]
        digest: bool,
    },
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
    /// Replaces a replica whose data is lost (a wiped or new disk) by a fresh one with
    /// the same id: removes it if it is a voter, adds it back as a learner, waits until
    /// the replica (started with an empty data directory, before or during this command)
    /// has caught up, and makes it a voter. Safe to run again after an interruption.
    ReplaceNode {
        /// Its id.
        id: u64,
        /// Its address (host:port); default: its address in the membership.
        addr: Option<String>,
        /// How long to wait for the replica to start and catch up, in seconds.
        #[arg(long, default_value_t = 300)]
        wait: u64,
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

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Creates a token and prints its secret: the only time it is shown.
    Create {
        /// What it may do.
        #[arg(long, value_enum)]
        role: Role,
        /// Its unique name (1-64 characters of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// For --role taskmanager: a TaskManager id the token may act for (`tm-*` for every
        /// id starting with `tm-`); repeatable, at least one.
        #[arg(long = "task-manager", value_name = "ID")]
        task_managers: Vec<String>,
    },
    /// Lists the tokens: name, role, TaskManagers, creation time (never secrets).
    List,
    /// Revokes a token: it is refused as soon as this returns.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// A token's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Everything: membership, backups, tokens, jobs, TaskManagers.
    Admin,
    /// Submit and cancel jobs, and read.
    Submit,
    /// Read jobs (env values redacted), TaskManagers, cluster status.
    Read,
    /// Register, heartbeat and unregister the TaskManager ids given.
    Taskmanager,
}

impl Role {
    /// The role in the protocol.
    pub fn to_pb(self) -> pb::TokenRole {
        match self {
            Role::Admin => pb::TokenRole::Admin,
            Role::Submit => pb::TokenRole::Submit,
            Role::Read => pb::TokenRole::Read,
            Role::Taskmanager => pb::TokenRole::TaskManager,
        }
    }
}

const DEV_CERTS_ABOUT: &str = "\
Writes into DIR a development CA and what it signs, as PEM files:

  ca.crt, ca.key                the CA (--ca for clients, --tls-ca for replicas)
  replica-<i>.crt, .key         one per replica, i = 1..N (--tls-cert, --tls-key)
  taskmanager.crt, .key         a TaskManager client certificate (--cert, --key)
  client.crt, .key              a client certificate for dispatchctl (--cert, --key)
  admin.token                   a random 256-bit admin token (--token-file; the
                                bootstrapping replica's --bootstrap-token-file)

A replica certificate's Subject CN and first DNS name are `replica-<i>`: that name is
how replicas recognise a peer, so replica <i>'s certificate must name `replica-<i>`
where <i> is its --id. It also names localhost, dispatcher-<i> and
dispatcher-<i>.dispatcher (compose and Kubernetes), every --host, and the IP addresses
127.0.0.1 and ::1, and it is valid for both server and client authentication (replicas
dial each other with it). The TaskManager certificate names `taskmanager`.

Keys and the token are written with mode 0600. Existing files are not overwritten
without --force. The CA is valid for 10 years, the other certificates for 825 days.

Prints what it wrote on stderr, and on stdout the lines to export, so that
`eval \"$(dispatchctl dev-certs --out DIR)\"` sets them:

  export DISPATCHER_CA=DIR/ca.crt
  export DISPATCHER_TOKEN_FILE=DIR/admin.token

For development and tests only: the CA key lies next to what it signed.";

/// A failure with its exit code and message.
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let message = match e.code() {
            Some(Code::Unauthenticated) => format!("not authenticated: {e}"),
            Some(Code::PermissionDenied) => format!("permission denied: {e}"),
            _ => e.to_string(),
        };
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
            Some(Code::Unauthenticated | Code::PermissionDenied) => exit::DENIED,
            _ => exit::ERROR,
        };
        Failure { code, message }
    }
}

impl From<crate::client::SecurityError> for Failure {
    fn from(e: crate::client::SecurityError) -> Self {
        failure(exit::USAGE, e.to_string())
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
    match cli.command {
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "dispatchctl", &mut std::io::stdout());
            return Ok(exit::OK);
        }
        Cmd::DevCerts(args) => {
            let written = dev_certs::run(&args).map_err(|e| {
                let code = match e {
                    dev_certs::DevCertsError::Host { .. } | dev_certs::DevCertsError::Exists(_) => {
                        exit::USAGE
                    }
                    _ => exit::ERROR,
                };
                failure(code, e.to_string())
            })?;
            out.dev_certs(&written);
            return Ok(exit::OK);
        }
        _ => {}
    }
    let mut config = ClientConfig::new(cli.endpoints.clone());
    config.timeout = Duration::from_secs(cli.timeout);
    cli.connect.configure(&mut config)?;
    if let Cmd::Health { service } = &cli.command {
        return health(&config, &cli.endpoints[0], service).await;
    }
    let without_token = config.token.is_none();
    let client = Client::new(config)?;
    let result = match cli.command {
        Cmd::Job(cmd) => job(&client, &out, cmd).await,
        Cmd::Cluster(cmd) => cluster(&client, &out, cmd).await,
        Cmd::Taskmanager(TaskManagerCmd::List { stale }) => client
            .list_task_managers(stale)
            .await
            .map(|tms| {
                out.task_managers(&tms);
                exit::OK
            })
            .map_err(Failure::from),
        Cmd::Token(cmd) => token(&client, &out, cmd).await,
        Cmd::Completions { .. } | Cmd::Health { .. } | Cmd::DevCerts(_) => Ok(exit::OK),
    };
    result.map_err(|mut f| {
        if f.code == exit::DENIED && without_token {
            f.message.push_str(
                " (no token was given: --token-file FILE, --token SECRET, or DISPATCHER_TOKEN_FILE \
                 / DISPATCHER_TOKEN)",
            );
        }
        f
    })
}

async fn token(client: &Client, out: &Output, cmd: TokenCmd) -> Result<u8, Failure> {
    match cmd {
        TokenCmd::Create {
            role,
            name,
            task_managers,
        } => {
            match (role, task_managers.is_empty()) {
                (Role::Taskmanager, true) => {
                    return Err(failure(
                        exit::USAGE,
                        "--role taskmanager needs at least one --task-manager ID (the \
                         TaskManager ids the token may act for)",
                    ))
                }
                (Role::Admin | Role::Submit | Role::Read, false) => {
                    return Err(failure(
                        exit::USAGE,
                        "--task-manager is only for --role taskmanager",
                    ))
                }
                _ => {}
            }
            let created = client
                .create_token(&name, role.to_pb(), task_managers)
                .await?;
            out.token_created(&created);
            Ok(exit::OK)
        }
        TokenCmd::List => {
            let tokens = client.list_tokens().await?;
            out.tokens(&tokens);
            Ok(exit::OK)
        }
        TokenCmd::Revoke { name } => {
            client.revoke_token(&name).await?;
            out.token_revoked(&name);
            Ok(exit::OK)
        }
    }
}

async fn health(config: &ClientConfig, endpoint: &str, service: &str) -> Result<u8, Failure> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let timeout = config.timeout;
    // Health is open to everyone: no token is sent, but TLS applies as to any call.
    let channel = config
        .endpoint(endpoint)
        .map_err(|e| failure(exit::REFUSED, e.to_string()))?
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
            // On a terminal, a table watch is a live progress bar; in a pipe or a file,
            // one plain line per event.
            let mut bar = out.watch_bar();
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        if let Some(b) = bar.as_mut() {
                            b.abandon();
                        }
                        return Err(e.into());
                    }
                };
                if let Some(job) = ev.job.clone() {
                    match bar.as_mut() {
                        Some(b) => b.update(&job, last.as_ref()),
                        None => out.event(&ev, &job, last.as_ref()),
                    }
                    last = Some(job);
                }
            }
            if let (Some(b), Some(job)) = (bar.as_mut(), last.as_ref()) {
                b.finish(job);
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
        ClusterCmd::Status { digest } => {
            let status = client.cluster_status_with(digest).await?;
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
        ClusterCmd::ReplaceNode { id, addr, wait } => {
            let members = client.cluster_status().await?.membership;
            let current = members.iter().find(|m| m.id == id);
            let addr = match (addr, current) {
                (Some(a), _) => a,
                (None, Some(m)) => m.address.clone(),
                (None, None) => {
                    return Err(failure(
                        exit::USAGE,
                        format!("replica {id} is not a member: give its address (replace-node {id} HOST:PORT)"),
                    ))
                }
            };
            if current.is_some_and(|m| m.voter) {
                client.remove_node(id).await?;
                eprintln!("removed voter {id}");
            }
            eprintln!(
                "waiting up to {wait}s for replica {id} at {addr} to start with an empty data directory and catch up"
            );
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            let resp = loop {
                match client.add_node(id, &addr, true).await {
                    Ok(resp) => break resp,
                    // Not caught up yet (FAILED_PRECONDITION) or no leader for now: try
                    // again; any other refusal (a bad address, no permission) is final.
                    Err(e) if catching_up(&e) && tokio::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, "replica not caught up yet");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            eprintln!("replica {id} is a voter again");
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

/// Whether a failed promotion in `replace-node` is worth another try: the learner has
/// not caught up yet, or no replica could serve the call for now.
fn catching_up(e: &ClientError) -> bool {
    match e {
        ClientError::Rejected(s) => s.code() == Code::FailedPrecondition,
        ClientError::Unavailable { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_node_retries_only_a_learner_not_caught_up_or_no_leader() {
        let rejected = |code| ClientError::Rejected(tonic::Status::new(code, "x"));
        assert!(catching_up(&rejected(Code::FailedPrecondition)));
        assert!(!catching_up(&rejected(Code::PermissionDenied)));
        assert!(!catching_up(&rejected(Code::InvalidArgument)));
    }

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

    /// Parses as dispatchctl does, but blind to the environment: a developer who exported
    /// `DISPATCHER_CA` as the README says must not change what these tests see.
    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let mut argv = vec!["dispatchctl"];
        argv.extend_from_slice(args);
        let matches = Cli::command()
            .mut_args(|a| a.env(None::<&str>))
            .try_get_matches_from(argv)?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn connection_flags_are_accepted_before_and_after_the_command() {
        for args in [
            &["--ca", "c.crt", "--token-file", "t", "job", "list"][..],
            &["job", "list", "--ca", "c.crt", "--token-file", "t"][..],
            &["cluster", "--ca", "c.crt", "status", "--token-file", "t"][..],
        ] {
            let parsed = cli(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(parsed.connect.ca, Some(PathBuf::from("c.crt")), "{args:?}");
            assert_eq!(
                parsed.connect.token_file,
                Some(PathBuf::from("t")),
                "{args:?}"
            );
        }
    }

    #[test]
    fn token_commands_take_a_role_of_four_and_repeated_task_managers() {
        let parsed = cli(&[
            "token",
            "create",
            "--role",
            "taskmanager",
            "--name",
            "tm-pool",
            "--task-manager",
            "tm-1",
            "--task-manager",
            "tm-2*",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        match parsed.command {
            Cmd::Token(TokenCmd::Create {
                role,
                name,
                task_managers,
            }) => {
                assert_eq!(role, Role::Taskmanager);
                assert_eq!(name, "tm-pool");
                assert_eq!(task_managers, ["tm-1", "tm-2*"]);
            }
            other => panic!("{other:?}"),
        }
        let roles = [
            ("admin", pb::TokenRole::Admin),
            ("submit", pb::TokenRole::Submit),
            ("read", pb::TokenRole::Read),
            ("taskmanager", pb::TokenRole::TaskManager),
        ];
        for (flag, want) in roles {
            match cli(&["token", "create", "--role", flag, "--name", "n"]).map(|c| c.command) {
                Ok(Cmd::Token(TokenCmd::Create { role, .. })) => assert_eq!(role.to_pb(), want),
                other => panic!("--role {flag}: {other:?}"),
            }
            assert_eq!(output::role_name(want as i32), flag, "listed as given");
        }
        for bad in [
            &["token", "create", "--role", "root", "--name", "n"][..],
            &["token", "create", "--role", "admin"][..],
            &["token", "revoke"][..],
        ] {
            assert!(cli(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn task_manager_bindings_go_with_the_taskmanager_role_only() {
        // Refused before any call: nothing listens at this endpoint.
        for (args, needle) in [
            (
                &["token", "create", "--role", "taskmanager", "--name", "n"][..],
                "needs at least one --task-manager",
            ),
            (
                &[
                    "token",
                    "create",
                    "--role",
                    "read",
                    "--name",
                    "n",
                    "--task-manager",
                    "t",
                ][..],
                "only for --role taskmanager",
            ),
        ] {
            let mut argv = vec!["--endpoints", "127.0.0.1:9"];
            argv.extend_from_slice(args);
            let parsed = cli(&argv).unwrap_or_else(|e| panic!("{e}"));
            match execute(parsed).await {
                Err(f) => {
                    assert_eq!(f.code, exit::USAGE, "{}", f.message);
                    assert!(f.message.contains(needle), "{}", f.message);
                }
                Ok(code) => panic!("{args:?} ran: {code}"),
            }
        }
    }

    #[tokio::test]
    async fn unusable_connection_flags_are_bad_usage() {
        let parsed = cli(&["--cert", "c.crt", "--ca", "ca.crt", "job", "list"])
            .unwrap_or_else(|e| panic!("{e}"));
        match execute(parsed).await {
            Err(f) => {
                assert_eq!(f.code, exit::USAGE);
                assert!(
                    f.message.contains("--cert (DISPATCHER_CERT) needs --key"),
                    "{}",
                    f.message
                );
            }
            Ok(code) => panic!("ran: {code}"),
        }
    }

    #[test]
    fn refusals_for_want_of_a_token_or_role_have_their_own_exit_code() {
        let f = Failure::from(ClientError::Rejected(tonic::Status::unauthenticated(
            "SubmitJob needs a token with role submit or admin",
        )));
        assert_eq!(f.code, exit::DENIED);
        assert_eq!(
            f.message,
            "not authenticated: SubmitJob needs a token with role submit or admin"
        );
        let f = Failure::from(ClientError::Rejected(tonic::Status::permission_denied(
            "SubmitJob needs role submit or admin; this token has role read",
        )));
        assert_eq!(f.code, exit::DENIED);
        assert!(
            f.message.starts_with("permission denied: SubmitJob"),
            "{}",
            f.message
        );
    }

    #[test]
    fn dev_certs_makes_one_to_99_replicas_three_by_default() {
        match cli(&["dev-certs", "--out", "d"]).map(|c| c.command) {
            Ok(Cmd::DevCerts(a)) => {
                assert_eq!(a.replicas, 3);
                assert!(!a.force && a.hosts.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match cli(&[
            "dev-certs",
            "--out",
            "d",
            "--host",
            "a.example",
            "--host",
            "10.0.0.5",
        ])
        .map(|c| c.command)
        {
            Ok(Cmd::DevCerts(a)) => assert_eq!(a.hosts, ["a.example", "10.0.0.5"]),
            other => panic!("{other:?}"),
        }
        for bad in ["0", "100", "x"] {
            assert!(
                cli(&["dev-certs", "--out", "d", "--replicas", bad]).is_err(),
                "--replicas {bad}"
            );
        }
        assert!(cli(&["dev-certs"]).is_err(), "--out is required");
    }

    #[test]
    fn shell_words_survive_eval() {
        assert_eq!(output::shell_word("/tmp/certs/ca.crt"), "/tmp/certs/ca.crt");
        assert_eq!(
            output::shell_word("/tmp/my certs/ca.crt"),
            "'/tmp/my certs/ca.crt'"
        );
        assert_eq!(output::shell_word("/tmp/it's"), r"'/tmp/it'\''s'");
    }

    #[test]
    fn token_creation_times_read_as_utc() {
        assert_eq!(output::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(output::utc(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}

//! The gRPC edge of a replica: the services it serves, error mapping, forwarding to the
//! leader, configuration, and `run`, which the `dispatcher` binary calls.
//!
//! Architecture invariant: every RPC passes through the [`edge`], which alone decides
//! where it is served (from the consistency its service declares) and opens its trace
//! span; handlers translate between protobuf and domain types and delegate, and hold no
//! dispatcher logic. Errors become `Status` in `status` only.

#[macro_use]
pub mod edge;
pub mod auth;
pub mod cluster_service;
pub mod config;
pub mod forward;
pub mod health;
pub mod job_service;
pub mod listener;
pub mod raft_service;
pub mod status;
pub mod taskmanager_service;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::raft::network::MAX_RAFT_MESSAGE;
use crate::raft::replica::{Replica, ReplicaOptions, StartError};
use config::ServerConfig;
use dispatcher_core::state::ClusterConfig;
use dispatcher_proto::v1::cluster_service_server::ClusterServiceServer;
use dispatcher_proto::v1::job_service_server::JobServiceServer;
use dispatcher_proto::v1::raft_service_server::RaftServiceServer;
use dispatcher_proto::v1::task_manager_service_server::TaskManagerServiceServer;
use dispatcher_proto::FILE_DESCRIPTOR_SET;

/// How long a shutting-down replica waits for open connections to close.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// Why a replica stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// It could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Raft or storage could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The backup to restore is unusable.
    #[error(transparent)]
    Restore(#[from] dispatcher_core::backup::BackupError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP listener could not start.
    #[error(transparent)]
    Http(#[from] crate::http::HttpStartError),
    /// Reflection could not be set up (a build problem).
    #[error("reflection: {0}")]
    Reflection(String),
    /// The Raft core stopped (a storage error, a full disk, no file descriptors left):
    /// this replica cannot serve again until it is restarted.
    #[error("the Raft core stopped: {0}; exiting so that the supervisor restarts this replica")]
    Fatal(String),
}

/// The services whose health is reported besides the overall one.
const HEALTH_SERVICES: &[&str] = &[
    <JobServiceServer<job_service::JobServer> as tonic::server::NamedService>::NAME,
    <TaskManagerServiceServer<taskmanager_service::TaskManagerServer> as tonic::server::NamedService>::NAME,
    <ClusterServiceServer<cluster_service::ClusterServer> as tonic::server::NamedService>::NAME,
    <RaftServiceServer<raft_service::RaftServer> as tonic::server::NamedService>::NAME,
];

/// Longest a stop of Raft may take before the replica gives up on it (a core stuck in
/// a write to a full disk must not keep the process alive).
const RAFT_STOP: Duration = Duration::from_secs(5);

/// Binds the listen address, then runs the replica until `shutdown` completes.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
    serve(config, listener, shutdown).await
}

/// Runs a replica on an already bound listener until `shutdown` completes, then stops
/// Raft. Tests bind port 0 and pass the listener in.
pub async fn serve(
    config: ServerConfig,
    tcp: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let fd_limit = listener::raise_fd_limit();
    let backup = match &config.restore {
        Some(path) => Some(dispatcher_core::backup::Backup::read(path)?),
        None => None,
    };
    let tls = config.tls.as_ref().map(crate::tls::load).transpose()?;
    let http_tls = match (&config.tls, config.http_listen) {
        (Some(files), Some(_)) => Some(crate::tls::http_server_config(files)?),
        _ => None,
    };
    // Bound before Raft starts, so that a taken port fails the start at once.
    let http_listener = match config.http_listen {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    if config.insecure {
        tracing::warn!(
            listen = %config.listen,
            "--insecure: serving plain text; anyone who can reach this port can read tokens and job secrets on the wire and, without tokens, do anything"
        );
    }
    let replica = Replica::start(ReplicaOptions {
        id: config.id,
        data_dir: config.data_dir.clone(),
        cluster: config.cluster_name.clone(),
        initial_cluster: config.initial_cluster.clone(),
        initial_cluster_state: config.initial_cluster_state,
        raft: config.raft.clone(),
        state_config: ClusterConfig::default(),
        peer_addresses: config.peer_addresses.clone(),
        peer_tls: tls.as_ref().map(|t| t.peer.clone()),
    })
    .await?;
    tracing::info!(
        id = config.id,
        listen = %config.listen,
        advertise = %config.advertise,
        tls = tls.is_some(),
        open_file_limit = fd_limit,
        max_connections = listener::effective_max_connections(config.max_connections, fd_limit),
        heartbeat_ms = config.raft.heartbeat_ms,
        election_timeout_min_ms = config.raft.election_timeout_min_ms,
        election_timeout_max_ms = config.raft.election_timeout_max_ms,
        "replica started"
    );

    if let Some(backup) = backup {
        tokio::spawn(restore(replica.clone(), backup));
    }
    if let Some(hash) = config.bootstrap_token_hash.clone() {
        tokio::spawn(bootstrap_token(replica.clone(), hash));
    }
    tokio::spawn(bootstrap_limits(
        replica.clone(),
        config.resource_limits.clone(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    // tonic-health starts the server as SERVING; nothing is served before a leader is known.
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let mut health_task = tokio::spawn(health::run(replica.clone(), health, HEALTH_SERVICES));
    // Both reflection versions: grpcurl asks v1 first, many clients still speak v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    tokio::spawn(crate::metrics::count_leader_changes(
        replica.clone(),
        metrics.clone(),
    ));
    let edge = edge::Edge {
        replica: replica.clone(),
        forwarder: match &tls {
            Some(t) => forward::Forwarder::with_tls(t.peer.clone()),
            None => forward::Forwarder::default(),
        },
        // A replica with TLS or a bootstrap token never serves a call without a token,
        // not even in the moments before the first token commits.
        auth: auth::Authenticator::new(
            replica.state.clone(),
            tls.is_some() || config.bootstrap_token_hash.is_some(),
            tls.is_some(),
        ),
        metrics: metrics.clone(),
    };
    let raft_service = RaftServiceServer::new(raft_service::RaftServer::new(edge.clone()))
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let cluster_server = std::sync::Arc::new(cluster_service::ClusterServer::new(edge.clone()));
    let cluster_service = ClusterServiceServer::from_arc(cluster_server.clone());
    let liveness = crate::leader::Liveness::new(config.liveness.clone());
    let duties = tokio::spawn(crate::leader::run(replica.clone(), liveness.clone()));
    let tm_server = std::sync::Arc::new(taskmanager_service::TaskManagerServer::new(
        edge.clone(),
        crate::taskmanagers::TaskManagers::new(replica.clone(), liveness.clone()),
    ));
    let task_managers = TaskManagerServiceServer::from_arc(tm_server.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let job_server = std::sync::Arc::new(job_service::JobServer::new(
        edge.clone(),
        stop_rx.clone(),
        config.watch.clone(),
    ));
    let jobs = JobServiceServer::from_arc(job_server.clone());
    // HTTP calls the same service implementations, so every route passes the edge.
    let http_task = http_listener.map(|listener| {
        let router = crate::http::router(crate::http::Services {
            jobs: job_server,
            task_managers: tm_server,
            cluster: cluster_server,
            edge,
            liveness,
            metrics,
        });
        tokio::spawn(crate::http::serve(
            listener,
            crate::http::MAX_HTTP_CONNECTIONS.min(listener::effective_max_connections(
                config.max_connections,
                fd_limit,
            )),
            router,
            http_tls,
            stop_rx.clone(),
        ))
    });

    let max_connections = listener::effective_max_connections(config.max_connections, fd_limit);
    let succession = replica.succession.clone();
    let on_close: listener::OnClose = std::sync::Arc::new(move |remote| succession.closed(remote));
    let incoming = listener::incoming(
        tcp,
        max_connections,
        listener::FIRST_BYTES_WITHIN,
        Some(on_close),
    );
    let mut builder = Server::builder();
    if let Some(t) = &tls {
        builder = builder.tls_config(t.server.clone())?;
    }
    let result = builder
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        // h2 closes a connection whose client reset more than this many streams it had
        // not yet accepted (rapid-reset protection; hyper's default is 20). One
        // connection carries the heartbeats of thousands of TaskManagers, and a burst of
        // their timed-out calls crossed 20 and failed every heartbeat on it at once
        // (`make bench-1m`). A client may reset as many streams as it may open.
        .http2_max_pending_accept_reset_streams(Some(config.max_streams_per_connection as usize))
        // Inside tonic's deadline timer: the edge counts the caller's deadline from here.
        .layer(tonic::service::InterceptorLayer::new(edge::stamp_arrival))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(raft_service)
        .add_service(cluster_service)
        .add_service(jobs)
        .add_service(task_managers)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    tokio::pin!(result);
    // Graceful shutdown waits for open connections; do not let a client that keeps one
    // open (a health Watch, say) keep this replica's Raft running behind a closed port.
    let mut stopping = stop_rx;
    let result = tokio::select! {
        r = &mut result => r.map_err(ServerError::from),
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_DRAIN).await;
        } => {
            tracing::warn!(drain = ?SHUTDOWN_DRAIN, "connections still open after the drain; stopping anyway");
            Ok(())
        }
        cause = &mut health_task => {
            let cause = cause.unwrap_or_else(|e| format!("the health task failed: {e}"));
            tracing::error!(cause = %cause, "the Raft core stopped; this replica cannot serve until it is restarted");
            Err(ServerError::Fatal(cause))
        }
    };
    tracing::info!(id = config.id, "shutting down");
    health_task.abort();
    duties.abort();
    if let Some(task) = http_task {
        task.abort();
    }
    if tokio::time::timeout(RAFT_STOP, replica.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(after = ?RAFT_STOP, "Raft did not stop in time; leaving it");
    }
    result
}

/// Seeds a new cluster with a backup: once this replica leads, it proposes RestoreState,
/// so the restored state reaches every replica through the log.
async fn restore(replica: Replica, backup: dispatcher_core::backup::Backup) {
    use dispatcher_core::state::{Command, Response};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match replica.leader() {
            Some((id, _)) if id == replica.id => {
                let cmd = Command::RestoreState {
                    state: backup.state.clone(),
                };
                match replica.propose_indexed(cmd).await {
                    Ok((
                        Ok(Response::Restored {
                            jobs,
                            task_managers,
                        }),
                        index,
                    )) => {
                        tracing::info!(jobs, task_managers, index, digest = %backup.digest, "restored the backup");
                        return;
                    }
                    Ok((other, _)) => {
                        tracing::error!(outcome = ?other, "the backup was not restored");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "restore not committed yet; retrying"),
                }
            }
            // A new cluster: make this replica the leader so that it can propose.
            Some(_) => {
                let _ = replica.raft.trigger().elect().await;
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::error!("gave up restoring the backup: this replica never led");
}

/// Creates the first admin token from `--bootstrap-token-file` once this replica leads,
/// unless the cluster already has tokens (then the command is a no-op in the state
/// machine, so any replica may be given the file and restarts change nothing).
async fn bootstrap_token(replica: Replica, hash: String) {
    use dispatcher_core::state::{Command, Response, Role, Token};
    loop {
        if replica.state.read().state.has_tokens() {
            return;
        }
        if replica.leader().is_some_and(|(id, _)| id == replica.id) {
            let token = Token {
                name: "admin".into(),
                role: Role::Admin,
                hash: hash.clone(),
                task_managers: vec![],
                created_at: crate::leader::wall_clock_ms(),
            };
            match replica
                .propose(Command::CreateToken {
                    token,
                    bootstrap: true,
                })
                .await
            {
                Ok(Ok(Response::TokenCreated { created: true, .. })) => {
                    tracing::info!("created the bootstrap admin token \"admin\"");
                    return;
                }
                Ok(Ok(_)) => return,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the bootstrap token was refused");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "bootstrap token not committed yet; retrying")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if replica.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
    }
}

/// Sets the cluster's resource limits from this replica's flags once it leads, unless
/// the cluster has limits already (then the command is a no-op in the state machine, so
/// a restart or another replica's different flags change nothing). A cluster whose log
/// predates limits gets them this way too, from its first leader after the upgrade.
async fn bootstrap_limits(replica: Replica, limits: dispatcher_core::state::ResourceLimits) {
    use dispatcher_core::state::{Command, Response};
    loop {
        if replica.state.read().state.resource_limits().is_some() {
            return;
        }
        if replica.leader().is_some_and(|(id, _)| id == replica.id) {
            let cmd = Command::SetResourceLimits {
                limits: limits.clone(),
                bootstrap: true,
            };
            match replica.propose(cmd).await {
                Ok(Ok(Response::LimitsSet { applied })) => {
                    if applied {
                        tracing::info!(?limits, "set the cluster's resource limits");
                    }
                    return;
                }
                Ok(other) => {
                    tracing::error!(outcome = ?other, "the resource limits were refused");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "resource limits not committed yet; retrying")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if replica.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
    }
}

//! The Rust client library, used by `dispatchctl`, the TaskManager, the tests and the
//! benchmarks.
//!
//! It takes several endpoints, finds the leader (following the `x-dispatcher-leader`
//! hint a follower returns), retries on another replica with jittered exponential
//! backoff when a replica is down, not the leader or slow, and gives up at the call's
//! deadline, or after about a second when nothing listens at any endpoint (waiting out
//! an election helps; waiting for a cluster that is not running does not, and neither does
//! a TLS handshake that fails everywhere). Every write
//! it sends is idempotent: a submission's job id is chosen before the first try and
//! reused on every retry, so one submission never becomes two.
//!
//! Security ([`security`]): with [`ClientConfig::tls`] every address, configured or
//! hinted, is dialed as `https://host:port` and the replica's certificate must chain to
//! the configured CA; with [`ClientConfig::token`] every request carries
//! `authorization: Bearer <secret>`. UNAUTHENTICATED and PERMISSION_DENIED are answers,
//! not outages: they are never retried and surface with the replica's message.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use dispatcher_proto::headers::LEADER_ADDRESS as LEADER_ADDRESS_KEY;
use dispatcher_proto::headers::LEADER_TERM as LEADER_TERM_KEY;
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::cluster_service_client::ClusterServiceClient;
use dispatcher_proto::v1::job_service_client::JobServiceClient;
use dispatcher_proto::v1::task_manager_service_client::TaskManagerServiceClient;

mod attempts;
pub mod security;
pub(crate) use attempts::transport_cause;
use attempts::{
    classify, connection_dropped, hint_term, leader_hint, no_answer_within, retryable, CallHistory,
    EndpointChoice, PLAIN_TEXT_HINT,
};
pub use security::{BearerAuth, ConnectArgs, SecurityError, TlsConfig, Token};

/// The shortest try of an `add_node` that promotes: more than the leader's 10 s wait
/// for the learner to catch up.
pub const ADD_NODE_TRY: Duration = Duration::from_secs(15);

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Replica addresses (`host:port`), tried in turn.
    pub endpoints: Vec<String>,
    /// Deadline of one call, retries included.
    pub timeout: Duration,
    /// Deadline of one try.
    pub per_try_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// First retry delay (doubled each retry, with jitter).
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// How long every endpoint must refuse the connection (each at least twice) before a
    /// call gives up ahead of its deadline: nothing is listening, so no election is
    /// running that waiting could outlast.
    pub unreachable_timeout: Duration,
    /// TLS settings: `Some` dials every replica over TLS, trusting only their CA.
    pub tls: Option<TlsConfig>,
    /// Bearer token sent with every request. Its `Debug` is `<redacted>`.
    pub token: Option<Token>,
}

impl ClientConfig {
    /// Defaults for the given endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        ClientConfig {
            endpoints,
            timeout: Duration::from_secs(15),
            per_try_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(250),
            unreachable_timeout: Duration::from_secs(1),
            tls: None,
            token: None,
        }
    }

    /// With TLS settings.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// With a bearer token.
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// The tonic endpoint for `addr` (`host:port`, or a URI whose scheme matches the TLS
    /// settings), with these TLS settings and the connect timeout. For calls the client
    /// does not make itself (a health check); it carries no token.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, ClientError> {
        let invalid = |reason: String| ClientError::Endpoint {
            endpoint: addr.to_string(),
            reason,
        };
        let uri = security::endpoint_uri(addr, self.tls.is_some()).map_err(invalid)?;
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.client_tls_config())
                .map_err(|e| invalid(format!("TLS settings: {}", transport_cause(&e))))?;
        }
        Ok(endpoint)
    }
}

/// A connection to one replica, as [`Client::call`] hands it to a call: a lazily
/// connected channel (TLS if configured) whose requests carry the bearer token.
pub type Connection = InterceptedService<Channel, BearerAuth>;

/// The largest answer this client decodes. gRPC's default of 4 MiB is one job spec at
/// the server's request limit, yet one answer may carry several: a heartbeat answer
/// lists every assignment of a TaskManager with its task, and a TaskManager running two
/// 3 MB tasks could then never read an answer again (it kept its lease, since the
/// server saw its heartbeats, and its jobs stayed RUNNING forever: chaos seed 8).
pub const MAX_ANSWER_BYTES: usize = 256 << 20;

fn jobs(ch: Connection) -> JobServiceClient<Connection> {
    JobServiceClient::new(ch).max_decoding_message_size(MAX_ANSWER_BYTES)
}

fn task_managers(ch: Connection) -> TaskManagerServiceClient<Connection> {
    TaskManagerServiceClient::new(ch).max_decoding_message_size(MAX_ANSWER_BYTES)
}

fn cluster(ch: Connection) -> ClusterServiceClient<Connection> {
    ClusterServiceClient::new(ch).max_decoding_message_size(MAX_ANSWER_BYTES)
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No usable endpoint was given.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The cluster answered and refused (invalid input, not found, already exists,
    /// illegal transition). Retrying would not help.
    #[error("{}", .0.message())]
    Rejected(Status),
    /// No replica could serve the call: the deadline passed, or nothing was listening.
    #[error("{}", unavailable_message(*.gave_up, *.attempts, *.elapsed, .endpoints, .last))]
    Unavailable {
        /// Why the call stopped retrying.
        gave_up: GaveUp,
        /// Tries made.
        attempts: usize,
        /// Time spent.
        elapsed: Duration,
        /// Every address tried, in the order first tried, with the cause of its last
        /// failure.
        endpoints: Vec<EndpointFailure>,
        /// The last error seen.
        last: Status,
    },
}

/// Why a call that could not be served stopped retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// The call's deadline passed: replicas may have answered (no leader yet) or not.
    Deadline,
    /// Every endpoint refused the connection (or had no route) for
    /// [`ClientConfig::unreachable_timeout`].
    NothingListening,
}

/// The last failure at one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointFailure {
    /// The address (`host:port`), as configured or hinted.
    pub address: String,
    /// The cause in a few words (`connection refused`, a replica's own message).
    pub cause: String,
}

fn unavailable_message(
    gave_up: GaveUp,
    attempts: usize,
    elapsed: Duration,
    endpoints: &[EndpointFailure],
    last: &Status,
) -> String {
    let what = match gave_up {
        GaveUp::Deadline => "cluster unavailable",
        GaveUp::NothingListening => "no replica reachable",
    };
    let causes = if endpoints.is_empty() {
        last.message().to_string()
    } else {
        let each: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{}: {}", e.address, e.cause))
            .collect();
        each.join("; ")
    };
    let tries = if attempts == 1 { "attempt" } else { "attempts" };
    format!(
        "{what} after {} ({attempts} {tries}): {causes}",
        seconds(elapsed)
    )
}

/// A duration for people: seconds with millisecond precision (`15.002s`), since the
/// nanoseconds of `Debug` are noise in a message.
pub fn seconds(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

impl ClientError {
    /// The gRPC code behind the error, if any.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rejected(s) => Some(s.code()),
            ClientError::Unavailable { .. } => Some(Code::Unavailable),
            ClientError::Endpoint { .. } => None,
        }
    }

    /// Whether the cluster refused the caller: no token, an unknown or revoked one
    /// (UNAUTHENTICATED), or a role that does not allow the call (PERMISSION_DENIED).
    pub fn is_auth(&self) -> bool {
        matches!(
            self.code(),
            Some(Code::Unauthenticated | Code::PermissionDenied)
        )
    }
}

/// Why a try ended the retry loop, or may not.
enum TryError {
    /// The try failed; retried if [`retryable`].
    Failed(Status),
    /// The try failed and nothing listens anywhere: stop.
    NothingListening(Status),
}

/// A client of a dispatcher cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    channels: Arc<Mutex<HashMap<String, Connection>>>,
    choice: Arc<Mutex<EndpointChoice>>,
}

impl Client {
    /// A client over the configured endpoints. Connects lazily.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Endpoint {
                endpoint: String::new(),
                reason: "no endpoints given".into(),
            });
        }
        let client = Client {
            config: Arc::new(config),
            channels: Arc::new(Mutex::new(HashMap::new())),
            choice: Arc::new(Mutex::new(EndpointChoice::default())),
        };
        for e in &client.config.endpoints {
            client.connection(e)?;
        }
        Ok(client)
    }

    /// The settings this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A client with default settings.
    pub fn connect(endpoints: &[&str]) -> Result<Self, ClientError> {
        Self::new(ClientConfig::new(
            endpoints.iter().map(|s| s.to_string()).collect(),
        ))
    }

    /// The (cached, lazily connected) connection to one address, configured or not:
    /// for calls to one replica in particular, with no retry elsewhere.
    pub fn connection(&self, addr: &str) -> Result<Connection, ClientError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self.config.endpoint(addr)?.connect_lazy();
        let connection =
            InterceptedService::new(channel, BearerAuth::new(self.config.token.clone()));
        channels.insert(addr.to_string(), connection.clone());
        Ok(connection)
    }

    fn choice(&self) -> std::sync::MutexGuard<'_, EndpointChoice> {
        self.choice.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` against the cluster with retries until the call's deadline.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Connection, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_hinted(|ch, t| {
            let fut = op(ch, t);
            async move { fut.await.map(|v| (v, None)) }
        })
        .await
    }

    /// As [`Client::call`] for a unary RPC whose answer may name the leader (a replica
    /// that forwarded the call says where it went).
    pub async fn call_unary<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Connection, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_hinted(|ch, t| {
            let fut = op(ch, t);
            async move {
                fut.await.map(|r| {
                    let hint = leader_hint(r.metadata()).map(|h| (h, hint_term(r.metadata())));
                    (r.into_inner(), hint)
                })
            }
        })
        .await
    }

    /// Runs `op`, whose answer may carry a leader hint (address, and its term if given).
    async fn call_hinted<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Connection, Duration) -> Fut,
        Fut: Future<Output = Result<(T, Option<(String, Option<u64>)>), Status>>,
    {
        let started = Instant::now();
        let tries = Mutex::new(CallHistory::default());
        let history = || tries.lock().unwrap_or_else(|p| p.into_inner());
        let last = Mutex::new(Status::unavailable("no attempt made"));
        let per_try = self.config.per_try_timeout.min(self.config.timeout);
        let attempt = || async {
            let addr = self
                .choice()
                .pick(&self.config.endpoints)
                .ok_or_else(|| TryError::Failed(Status::invalid_argument("no endpoints given")))?;
            history().started(&addr);
            let channel = self
                .connection(&addr)
                .map_err(|e| TryError::Failed(Status::invalid_argument(e.to_string())))?;
            let result = match tokio::time::timeout(per_try, op(channel, per_try)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(no_answer_within(per_try))),
            };
            match &result {
                Ok((_, hint)) => {
                    let hint = hint.as_ref().map(|(h, t)| (h.as_str(), *t));
                    self.choice().learn(&addr, Ok(hint))
                }
                Err(s) if retryable(s) => {
                    self.choice().learn(&addr, Err(s));
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
                    let at = started.elapsed();
                    let mut h = history();
                    let mut failure = classify(s, per_try);
                    if self.config.tls.is_none() && connection_dropped(s) {
                        failure.cause.push_str(PLAIN_TEXT_HINT);
                    }
                    h.failed(at, &addr, failure);
                    let window = self.config.unreachable_timeout;
                    if h.nothing_listening(at, &self.config.endpoints, window) {
                        return Err(TryError::NothingListening(s.clone()));
                    }
                }
                Err(_) => {}
            }
            result.map_err(TryError::Failed)
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.min_backoff)
            .with_max_delay(self.config.max_backoff)
            .with_jitter()
            .without_max_times();
        let retried = attempt
            .retry(backoff)
            .when(|e| matches!(e, TryError::Failed(s) if retryable(s)));
        let outcome = tokio::time::timeout(self.config.timeout, retried).await;
        let unavailable = |gave_up, last: Status| {
            let h = history();
            ClientError::Unavailable {
                gave_up,
                attempts: h.attempts,
                elapsed: started.elapsed(),
                endpoints: h.causes.clone(),
                last,
            }
        };
        match outcome {
            Ok(Ok((v, _))) => Ok(v),
            Ok(Err(TryError::Failed(s))) if !retryable(&s) => {
                // A plain-text HTTP/2 client reading a TLS server's bytes sees a protocol
                // error, not a dropped connection: say what probably happened.
                if self.config.tls.is_none() && s.message().contains("h2 protocol error") {
                    let hinted = format!("{}{PLAIN_TEXT_HINT}", s.message());
                    return Err(ClientError::Rejected(Status::new(s.code(), hinted)));
                }
                Err(ClientError::Rejected(s))
            }
            // Not reached: with no limit on tries, a retryable failure ends the loop only
            // through the deadline above.
            Ok(Err(TryError::Failed(s))) => Err(unavailable(GaveUp::Deadline, s)),
            Ok(Err(TryError::NothingListening(s))) => Err(unavailable(GaveUp::NothingListening, s)),
            Err(_) => {
                let last = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Err(unavailable(GaveUp::Deadline, last))
            }
        }
    }

    /// Submits a job under `job_id` (a new random UUID if `None`). The id is fixed before
    /// the first try, so retries across failover create the job exactly once.
    pub async fn submit_job(
        &self,
        job_id: Option<String>,
        spec: pb::JobSpec,
    ) -> Result<pb::SubmitJobResponse, ClientError> {
        let job_id = job_id.unwrap_or_else(new_job_id);
        self.call_unary(|ch, t| {
            let req = request(
                pb::SubmitJobRequest {
                    job_id: job_id.clone(),
                    spec: Some(spec.clone()),
                },
                t,
            );
            async move { jobs(ch).submit_job(req).await }
        })
        .await
    }

    /// A job's status; `stale` lets any replica answer from its local state.
    pub async fn get_job(&self, job_id: &str, stale: bool) -> Result<pb::JobStatus, ClientError> {
        let resp = self
            .call(|ch, t| {
                let req = request(
                    pb::GetJobRequest {
                        job_id: job_id.to_string(),
                        stale,
                    },
                    t,
                );
                async move { jobs(ch).get_job(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        resp.job
            .ok_or_else(|| ClientError::Rejected(Status::internal("GetJob returned no job")))
    }

    /// One page of jobs.
    pub async fn list_jobs(
        &self,
        req: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(req.clone(), t);
            async move { jobs(ch).list_jobs(req).await }
        })
        .await
    }

    /// Every job matching the filter, following pages.
    pub async fn list_all_jobs(
        &self,
        mut req: pb::ListJobsRequest,
    ) -> Result<Vec<pb::JobSummary>, ClientError> {
        let mut all = Vec::new();
        loop {
            let page = self.list_jobs(req.clone()).await?;
            all.extend(page.jobs);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Cancels a job (idempotent).
    pub async fn cancel_job(&self, job_id: &str) -> Result<pb::JobStatus, ClientError> {
        let resp = self
            .call(|ch, t| {
                let req = request(
                    pb::CancelJobRequest {
                        job_id: job_id.to_string(),
                    },
                    t,
                );
                async move { jobs(ch).cancel_job(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        resp.job
            .ok_or_else(|| ClientError::Rejected(Status::internal("CancelJob returned no job")))
    }

    /// Streams a job's status changes until it is terminal, re-attaching to another
    /// replica if the one streaming goes away. Repeated states are not sent twice.
    pub fn watch_job(
        &self,
        job_id: &str,
    ) -> Pin<Box<dyn Stream<Item = Result<pb::JobEvent, ClientError>> + Send>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let client = self.clone();
        let job_id = job_id.to_string();
        tokio::spawn(async move {
            let mut last: Option<pb::JobStatus> = None;
            // Highest applied index seen: after re-attaching to a lagging replica, older
            // states are not sent again.
            let mut seen_index = 0u64;
            loop {
                let stream = client
                    .call(|ch, _| {
                        let req = tonic::Request::new(pb::WatchJobRequest {
                            job_id: job_id.clone(),
                        });
                        async move { jobs(ch).watch_job(req).await.map(|r| r.into_inner()) }
                    })
                    .await;
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(ev) => {
                            if ev.applied_index < seen_index {
                                continue;
                            }
                            seen_index = ev.applied_index;
                            if ev.job.is_some() && ev.job != last {
                                last = ev.job.clone();
                                let terminal = ev.job.as_ref().is_some_and(is_terminal);
                                if tx.send(Ok(ev)).await.is_err() || terminal {
                                    return;
                                }
                            }
                        }
                        Err(s) if retryable(&s) => break,
                        Err(s) => {
                            let _ = tx.send(Err(ClientError::Rejected(s))).await;
                            return;
                        }
                    }
                }
                if last.as_ref().is_some_and(is_terminal) {
                    return;
                }
                // The stream ended early (replica stopped): attach again.
                tokio::time::sleep(client.config.min_backoff).await;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Registered TaskManagers.
    pub async fn list_task_managers(
        &self,
        stale: bool,
    ) -> Result<Vec<pb::TaskManagerInfo>, ClientError> {
        let resp = self
            .call(|ch, t| {
                let req = request(pb::ListTaskManagersRequest { stale }, t);
                async move {
                    task_managers(ch)
                        .list_task_managers(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(resp.task_managers)
    }

    /// Registers a TaskManager (through the leader).
    pub async fn register_task_manager(
        &self,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(req.clone(), t);
            async move { task_managers(ch).register(req).await }
        })
        .await
    }

    /// Sends a TaskManager heartbeat (through the leader).
    pub async fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(req.clone(), t);
            async move { task_managers(ch).heartbeat(req).await }
        })
        .await
    }

    /// Unregisters a TaskManager.
    pub async fn unregister_task_manager(
        &self,
        req: pb::UnregisterRequest,
    ) -> Result<(), ClientError> {
        self.call(|ch, t| {
            let req = request(req.clone(), t);
            async move { task_managers(ch).unregister(req).await.map(|_| ()) }
        })
        .await
    }

    /// A consistent snapshot of the replicated state, from the leader.
    pub async fn snapshot(&self) -> Result<dispatcher_core::backup::Backup, ClientError> {
        self.call(|ch, t| {
            let req = request(pb::SnapshotRequest {}, t);
            async move {
                let mut stream = cluster(ch).snapshot(req).await?.into_inner();
                let (mut data, mut index, mut term) = (Vec::new(), 0, 0);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    data.extend_from_slice(&chunk.data);
                    index = chunk.last_log_index;
                    term = chunk.last_log_term;
                }
                Ok(dispatcher_core::backup::Backup::new(data, index, term))
            }
        })
        .await
    }

    /// Every replica's view, as one replica gathers it, without state digests (cheap).
    pub async fn cluster_status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.cluster_status_with(false).await
    }

    /// Every replica's view; with `digest`, each replica also hashes its whole state
    /// (O(state): for convergence checks, not for polling).
    pub async fn cluster_status_with(
        &self,
        digest: bool,
    ) -> Result<pb::StatusResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(
                pb::StatusRequest {
                    local_only: false,
                    with_digest: digest,
                },
                t,
            );
            async move { cluster(ch).status(req).await }
        })
        .await
    }

    /// The status of one endpoint only (no retry elsewhere), without its digest.
    pub async fn replica_status(&self, endpoint: &str) -> Result<pb::StatusResponse, ClientError> {
        self.replica_status_with(endpoint, false).await
    }

    /// The status of one endpoint only; with `digest`, its state digest too.
    pub async fn replica_status_with(
        &self,
        endpoint: &str,
        digest: bool,
    ) -> Result<pb::StatusResponse, ClientError> {
        let ch = self.connection(endpoint)?;
        let req = request(
            pb::StatusRequest {
                local_only: true,
                with_digest: digest,
            },
            self.config.per_try_timeout,
        );
        cluster(ch)
            .status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Rejected)
    }

    /// Adds a replica (as a learner, then a voter if `promote`). With `promote`, each
    /// try may last [`ADD_NODE_TRY`]: the leader waits up to 10 s for the learner to
    /// catch up before it promotes it, and a shorter try (the default is 3 s) gave up
    /// and asked again, every time, while a learner installed a snapshot.
    pub async fn add_node(
        &self,
        node_id: u64,
        address: &str,
        promote: bool,
    ) -> Result<pb::AddNodeResponse, ClientError> {
        let patient;
        let client = if promote && self.config.per_try_timeout < ADD_NODE_TRY {
            let mut config = (*self.config).clone();
            config.per_try_timeout = ADD_NODE_TRY;
            config.timeout = config.timeout.max(ADD_NODE_TRY);
            patient = Client {
                config: Arc::new(config),
                channels: self.channels.clone(),
                choice: self.choice.clone(),
            };
            &patient
        } else {
            self
        };
        client
            .call_unary(|ch, t| {
                let req = request(
                    pb::AddNodeRequest {
                        node_id,
                        address: address.to_string(),
                        promote,
                    },
                    t,
                );
                async move { cluster(ch).add_node(req).await }
            })
            .await
    }

    /// Removes a replica.
    pub async fn remove_node(&self, node_id: u64) -> Result<pb::RemoveNodeResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(pb::RemoveNodeRequest { node_id }, t);
            async move { cluster(ch).remove_node(req).await }
        })
        .await
    }
}

impl Client {
    /// Creates a bearer token (needs an admin token). The response holds its secret, the
    /// only time the cluster shows it.
    ///
    /// Not idempotent the way submissions are: the secret is drawn by the leader, so a
    /// try whose answer was lost may have created the token, and the retry then finds the
    /// name taken. That ALREADY_EXISTS says so (the secret is lost: revoke and create
    /// again).
    pub async fn create_token(
        &self,
        name: &str,
        role: pb::TokenRole,
        task_managers: Vec<String>,
    ) -> Result<pb::CreateTokenResponse, ClientError> {
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let result = self
            .call_unary(|ch, t| {
                tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req = request(
                    pb::CreateTokenRequest {
                        name: name.to_string(),
                        role: role as i32,
                        task_managers: task_managers.clone(),
                    },
                    t,
                );
                async move { cluster(ch).create_token(req).await }
            })
            .await;
        match result {
            Err(ClientError::Rejected(s))
                if s.code() == Code::AlreadyExists
                    && tries.load(std::sync::atomic::Ordering::Relaxed) > 1 =>
            {
                Err(ClientError::Rejected(Status::already_exists(format!(
                    "{} (an earlier try of this call, whose answer was lost, may have created \
                     it: its secret is lost; revoke it and create it again)",
                    s.message()
                ))))
            }
            other => other,
        }
    }

    /// Every token (names, roles, bindings, creation times; never secrets). Admin only.
    pub async fn list_tokens(&self) -> Result<Vec<pb::TokenInfo>, ClientError> {
        let resp = self
            .call_unary(|ch, t| {
                let req = request(pb::ListTokensRequest {}, t);
                async move { cluster(ch).list_tokens(req).await }
            })
            .await?;
        Ok(resp.tokens)
    }

    /// Revokes the token `name` (admin only); it is refused as soon as this returns.
    /// Idempotent across retries: NOT_FOUND after a try that may have revoked it counts
    /// as done.
    pub async fn revoke_token(&self, name: &str) -> Result<(), ClientError> {
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let result = self
            .call_unary(|ch, t| {
                tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req = request(
                    pb::RevokeTokenRequest {
                        name: name.to_string(),
                    },
                    t,
                );
                async move { cluster(ch).revoke_token(req).await }
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(ClientError::Rejected(s))
                if s.code() == Code::NotFound
                    && tries.load(std::sync::atomic::Ordering::Relaxed) > 1 =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// A fresh random job id.
pub fn new_job_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// Whether a job status is terminal.
pub fn is_terminal(s: &pb::JobStatus) -> bool {
    matches!(
        pb::JobState::try_from(s.state),
        Ok(pb::JobState::Finished | pb::JobState::Failed | pb::JobState::Canceled)
    )
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_tests;

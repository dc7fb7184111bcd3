//! The Rust client library, used by `dispatchctl`, the TaskManager, the tests and the
//! benchmarks.
//!
//! It takes several endpoints, finds the leader (following the `x-dispatcher-leader`
//! hint a follower returns), retries on another replica with jittered exponential
//! backoff when a replica is down, not the leader or slow, and gives up at the call's
//! deadline. Every write it sends is idempotent: a submission's job id is chosen before
//! the first try and reused on every retry, so one submission never becomes two.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use dispatcher_proto::headers::LEADER_ADDRESS as LEADER_ADDRESS_KEY;
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::cluster_service_client::ClusterServiceClient;
use dispatcher_proto::v1::job_service_client::JobServiceClient;
use dispatcher_proto::v1::task_manager_service_client::TaskManagerServiceClient;

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
        }
    }
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
    /// No replica could serve the call before the deadline.
    #[error("cluster unavailable after {attempts} attempts in {elapsed:?}: {}", .last.message())]
    Unavailable {
        /// Tries made.
        attempts: usize,
        /// Time spent.
        elapsed: Duration,
        /// The last error seen.
        last: Status,
    },
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
}

/// Whether another try (on another replica, or after an election) may succeed.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

/// The leader a replica names in a reply's metadata, if it names one.
fn leader_hint(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(LEADER_ADDRESS_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// Which replica the next try goes to: the last leader seen or hinted, else the
/// endpoints in turn. Kept apart from the network so that the rules can be tested.
#[derive(Debug, Default)]
struct EndpointChoice {
    preferred: Option<String>,
    rotation: usize,
}

impl EndpointChoice {
    /// The address to try next; `None` only without endpoints.
    fn pick(&mut self, endpoints: &[String]) -> Option<String> {
        if let Some(p) = &self.preferred {
            return Some(p.clone());
        }
        let addr = endpoints
            .get(self.rotation % endpoints.len().max(1))?
            .clone();
        self.rotation += 1;
        Some(addr)
    }

    /// Learns from a try at `addr`: its answer (with the leader it was forwarded to, if
    /// it says) or the retryable error it failed with.
    fn learn(&mut self, addr: &str, outcome: Result<Option<&str>, &Status>) {
        self.preferred = match outcome {
            // A forwarded answer names the leader: go there directly next time.
            Ok(Some(leader)) => Some(leader.to_string()),
            Ok(None) => Some(addr.to_string()),
            // A hint naming the replica that just failed would pin us to it.
            Err(status) => leader_hint(status.metadata()).filter(|h| h != addr),
        };
    }
}

/// A client of a dispatcher cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
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
            client.channel(e)?;
        }
        Ok(client)
    }

    /// A client with default settings.
    pub fn connect(endpoints: &[&str]) -> Result<Self, ClientError> {
        Self::new(ClientConfig::new(
            endpoints.iter().map(|s| s.to_string()).collect(),
        ))
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| ClientError::Endpoint {
                endpoint: addr.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn choice(&self) -> std::sync::MutexGuard<'_, EndpointChoice> {
        self.choice.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` against the cluster with retries until the call's deadline.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Channel, Duration) -> Fut,
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
        F: Fn(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_hinted(|ch, t| {
            let fut = op(ch, t);
            async move {
                fut.await.map(|r| {
                    let hint = leader_hint(r.metadata());
                    (r.into_inner(), hint)
                })
            }
        })
        .await
    }

    async fn call_hinted<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<(T, Option<String>), Status>>,
    {
        let started = Instant::now();
        let attempts = Mutex::new(0usize);
        let last = Mutex::new(Status::unavailable("no attempt made"));
        let per_try = self.config.per_try_timeout.min(self.config.timeout);
        let attempt = || async {
            *attempts.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            let addr = self
                .choice()
                .pick(&self.config.endpoints)
                .ok_or_else(|| Status::invalid_argument("no endpoints given"))?;
            let channel = self
                .channel(&addr)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let result = match tokio::time::timeout(per_try, op(channel, per_try)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{addr} did not answer within {per_try:?}"
                ))),
            };
            match &result {
                Ok((_, hint)) => self.choice().learn(&addr, Ok(hint.as_deref())),
                Err(s) if retryable(s) => {
                    self.choice().learn(&addr, Err(s));
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
                }
                Err(_) => {}
            }
            result
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.min_backoff)
            .with_max_delay(self.config.max_backoff)
            .with_jitter()
            .without_max_times();
        let retried = attempt.retry(backoff).when(retryable);
        match tokio::time::timeout(self.config.timeout, retried).await {
            Ok(Ok((v, _))) => Ok(v),
            Ok(Err(s)) if !retryable(&s) => Err(ClientError::Rejected(s)),
            Ok(Err(s)) => Err(ClientError::Unavailable {
                attempts: *attempts.lock().unwrap_or_else(|p| p.into_inner()),
                elapsed: started.elapsed(),
                last: s,
            }),
            Err(_) => Err(ClientError::Unavailable {
                attempts: *attempts.lock().unwrap_or_else(|p| p.into_inner()),
                elapsed: started.elapsed(),
                last: last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            }),
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
            async move { JobServiceClient::new(ch).submit_job(req).await }
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
                async move {
                    JobServiceClient::new(ch)
                        .get_job(req)
                        .await
                        .map(|r| r.into_inner())
                }
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
            async move { JobServiceClient::new(ch).list_jobs(req).await }
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
                async move {
                    JobServiceClient::new(ch)
                        .cancel_job(req)
                        .await
                        .map(|r| r.into_inner())
                }
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
                        async move {
                            JobServiceClient::new(ch)
                                .watch_job(req)
                                .await
                                .map(|r| r.into_inner())
                        }
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
                    TaskManagerServiceClient::new(ch)
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
            async move { TaskManagerServiceClient::new(ch).register(req).await }
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
            async move { TaskManagerServiceClient::new(ch).heartbeat(req).await }
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
            async move {
                TaskManagerServiceClient::new(ch)
                    .unregister(req)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    /// A consistent snapshot of the replicated state, from the leader.
    pub async fn snapshot(&self) -> Result<dispatcher_core::backup::Backup, ClientError> {
        self.call(|ch, t| {
            let req = request(pb::SnapshotRequest {}, t);
            async move {
                let mut stream = ClusterServiceClient::new(ch)
                    .snapshot(req)
                    .await?
                    .into_inner();
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

    /// Every replica's view, as one replica gathers it.
    pub async fn cluster_status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(pb::StatusRequest { local_only: false }, t);
            async move { ClusterServiceClient::new(ch).status(req).await }
        })
        .await
    }

    /// The status of one endpoint only (no retry elsewhere).
    pub async fn replica_status(&self, endpoint: &str) -> Result<pb::StatusResponse, ClientError> {
        let ch = self.channel(endpoint)?;
        let req = request(
            pb::StatusRequest { local_only: true },
            self.config.per_try_timeout,
        );
        ClusterServiceClient::new(ch)
            .status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Rejected)
    }

    /// Adds a replica (as a learner, then a voter if `promote`).
    pub async fn add_node(
        &self,
        node_id: u64,
        address: &str,
        promote: bool,
    ) -> Result<pb::AddNodeResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(
                pb::AddNodeRequest {
                    node_id,
                    address: address.to_string(),
                    promote,
                },
                t,
            );
            async move { ClusterServiceClient::new(ch).add_node(req).await }
        })
        .await
    }

    /// Removes a replica.
    pub async fn remove_node(&self, node_id: u64) -> Result<pb::RemoveNodeResponse, ClientError> {
        self.call_unary(|ch, t| {
            let req = request(pb::RemoveNodeRequest { node_id }, t);
            async move { ClusterServiceClient::new(ch).remove_node(req).await }
        })
        .await
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

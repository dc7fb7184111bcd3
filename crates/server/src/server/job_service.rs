//! `JobService`: submit, get, list, cancel and watch jobs on any replica. Writes and
//! linearizable reads are served by the leader (the edge forwards them); stale reads
//! and watches by the local replica. Handlers translate and delegate.

use std::sync::Arc;

use super::edge::{BoxStream, Caller, Edge};
use super::status::ApiError;
use crate::watch;
use dispatcher_core::state::{self, Command, JobState, Response};
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::job_service_client::JobServiceClient;
use dispatcher_proto::v1::job_service_server::JobService;

/// Default and largest ListJobs page.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Serves `JobService` for one replica.
pub struct JobServer {
    edge: Edge,
    /// Becomes true when the replica shuts down: open watch streams end.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The watched jobs and their shared views.
    watches: Arc<watch::Registry>,
}

edge_service! {
    JobService for JobServer, forward with JobServiceClient {
        type WatchJobStream = BoxStream<pb::JobEvent>;
        rpc submit_job(SubmitJobRequest) -> pb::SubmitJobResponse: Leader, Submit => submit(caller);
        rpc get_job(GetJobRequest) -> pb::GetJobResponse: Linearizable, Read => get(caller);
        rpc list_jobs(ListJobsRequest) -> pb::ListJobsResponse: Linearizable, Read => list;
        rpc cancel_job(CancelJobRequest) -> pb::CancelJobResponse: Leader, Submit => cancel(caller);
        rpc watch_job(WatchJobRequest) -> Self::WatchJobStream: Local, Read => watch(caller) [stream];
    }
}

/// The spec with every env value blanked (keys kept).
fn without_env_values(spec: &state::JobSpec) -> state::JobSpec {
    let mut spec = spec.clone();
    for vertex in &mut spec.vertices {
        if let state::TaskSpec::Command { env, .. } = &mut vertex.task {
            env.values_mut().for_each(String::clear);
        }
    }
    spec
}

impl JobServer {
    /// A server over `edge`, with watches bounded by `limits`; watches end when
    /// `stopping` turns true. Starts the task that keeps the watched jobs' views current.
    pub fn new(
        edge: Edge,
        stopping: tokio::sync::watch::Receiver<bool>,
        limits: watch::Limits,
    ) -> Self {
        let watches = watch::Registry::new(edge.replica.state.clone(), limits);
        tokio::spawn(watches.clone().run(stopping.clone()));
        tokio::spawn(
            watches
                .clone()
                .trim_after_bursts(watch::TRIM_QUIET, stopping.clone()),
        );
        JobServer {
            edge,
            stopping,
            watches,
        }
    }

    /// Jobs watched and open watch streams on this replica (for metrics).
    pub fn watch_counts(&self) -> (usize, usize) {
        self.watches.counts()
    }

    /// The job's status, its env values redacted unless `secrets`.
    fn status_of(&self, id: &state::JobId, secrets: bool) -> Result<pb::JobStatus, ApiError> {
        let g = self.edge.replica.state.read();
        let mut status = watch::job_status(&g.state, id)
            .ok_or_else(|| ApiError::from(state::Rejection::UnknownJob { job_id: id.clone() }))?;
        if !secrets {
            convert::redact_secrets(&mut status);
        }
        Ok(status)
    }

    async fn submit(
        &self,
        caller: Caller,
        req: pb::SubmitJobRequest,
    ) -> Result<pb::SubmitJobResponse, ApiError> {
        let job_id = convert::job_id("job_id", &req.job_id)?;
        let spec = convert::job_spec(req.spec)?;
        // Nothing invalid reaches the log: check before proposing.
        {
            let g = self.edge.replica.state.read();
            match g.state.job(&job_id) {
                // Validity, restart limits and room in the registry, as apply decides.
                None => {
                    g.state.check_new_job(&spec)?;
                }
                // A caller who may not see env values must not learn them either: the
                // answer to a resubmission cannot depend on whether a guessed value is
                // right, so it is decided on the specs without their env values.
                Some(existing) if !caller.sees_secrets() => {
                    if without_env_values(&existing.spec) != without_env_values(&spec) {
                        return Err(state::Rejection::AlreadyExists { job_id }.into());
                    }
                    drop(g);
                    return Ok(pb::SubmitJobResponse {
                        job_id: job_id.to_string(),
                        created: false,
                        job: Some(self.status_of(&job_id, false)?),
                    });
                }
                Some(_) => {}
            }
        }
        let outcome = self
            .edge
            .replica
            .propose(Command::SubmitJob {
                job_id: job_id.clone(),
                spec,
                now: crate::leader::wall_clock_ms(),
            })
            .await?;
        let created = match outcome? {
            Response::Submitted { created, .. } => created,
            other => return Err(ApiError::Internal(format!("unexpected response {other:?}"))),
        };
        tracing::info!(created, "job submitted");
        Ok(pb::SubmitJobResponse {
            job_id: job_id.to_string(),
            created,
            job: Some(self.status_of(&job_id, caller.sees_secrets())?),
        })
    }

    async fn get(
        &self,
        caller: Caller,
        req: pb::GetJobRequest,
    ) -> Result<pb::GetJobResponse, ApiError> {
        let id = convert::job_id("job_id", &req.job_id)?;
        Ok(pb::GetJobResponse {
            job: Some(self.status_of(&id, caller.sees_secrets())?),
        })
    }

    async fn list(&self, req: pb::ListJobsRequest) -> Result<pb::ListJobsResponse, ApiError> {
        let states: Vec<JobState> = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::job_state_from_pb(&format!("states[{i}]"), *s))
            .collect::<Result<_, _>>()?;
        let after = match req.page_token.as_str() {
            "" => None,
            t => Some(convert::job_id("page_token", t)?),
        };
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let g = self.edge.replica.state.read();
        let (page, next) = g.state.list_jobs(after.as_ref(), limit, |j| {
            (states.is_empty() || states.contains(&j.state))
                && j.spec.name.starts_with(&req.name_prefix)
        });
        let mut pending = g.state.pending_reasons();
        Ok(pb::ListJobsResponse {
            jobs: page
                .into_iter()
                .map(|j| convert::job_summary(j, pending.of(&j.id).as_ref()))
                .collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn cancel(
        &self,
        caller: Caller,
        req: pb::CancelJobRequest,
    ) -> Result<pb::CancelJobResponse, ApiError> {
        let job_id = convert::job_id("job_id", &req.job_id)?;
        self.edge
            .replica
            .propose(Command::CancelJob {
                job_id: job_id.clone(),
                now: crate::leader::wall_clock_ms(),
            })
            .await??;
        Ok(pb::CancelJobResponse {
            job: Some(self.status_of(&job_id, caller.sees_secrets())?),
        })
    }

    async fn watch(
        &self,
        caller: Caller,
        req: pb::WatchJobRequest,
    ) -> Result<BoxStream<pb::JobEvent>, ApiError> {
        let secrets = caller.sees_secrets();
        let id = convert::job_id("job_id", &req.job_id)?;
        let refused = |r: watch::Refused| match r {
            watch::Refused::Unknown(job_id) => {
                ApiError::from(state::Rejection::UnknownJob { job_id })
            }
            bound => ApiError::ResourceExhausted(bound.to_string()),
        };
        let permit = self.watches.reserve().map_err(refused)?;
        let sub = self
            .watches
            .subscribe_within(&permit, &id, watch::JOB_APPEAR_WAIT)
            .await
            .map_err(refused)?;
        let watcher = watch::Watcher::new(permit, sub, self.stopping.clone());
        // A watch outlives its first check: each event re-checks that the token is still
        // there, so a revocation ends the stream at the next change.
        let token = caller.token_hash().map(str::to_string);
        let tokens = self.edge.replica.state.clone();
        let stream = futures::stream::unfold(Some(watcher), move |watcher| {
            let (token, tokens, id) = (token.clone(), tokens.clone(), id.clone());
            async move {
                let mut watcher = watcher?;
                let item = watcher.next().await?;
                if let Some(hash) = &token {
                    if tokens.read().state.token_by_hash(hash).is_none() {
                        let revoked =
                            ApiError::Unauthenticated("the token of this watch was revoked".into());
                        return Some((Err(tonic::Status::from(revoked)), None));
                    }
                }
                let item = match item {
                    Ok(view) => Ok(view.event(secrets)),
                    Err(watch::End::Purged) => Err(tonic::Status::from(ApiError::NotFound(
                        format!("job {id} was purged"),
                    ))),
                    // The client library re-attaches to another replica.
                    Err(watch::End::ShuttingDown) => Err(tonic::Status::from(
                        ApiError::Unavailable("replica is shutting down".into()),
                    )),
                };
                Some((item, Some(watcher)))
            }
        });
        Ok(Box::pin(stream))
    }
}

//! `JobService`: submit, get, list, cancel and watch jobs on any replica. Writes and
//! linearizable reads are served by the leader (forwarded if need be); stale reads and
//! watches by the local replica.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::route::{now_ms, Edge};
use super::status;
use dispatcher_core::state::{self, Command, JobState, Response as Applied};
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::job_service_client::JobServiceClient;
use dispatcher_proto::v1::job_service_server::JobService;

/// Default and largest ListJobs page.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// How long WatchJob waits for an unknown job to be applied locally.
const JOB_APPEAR_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `JobService` for one replica.
pub struct JobServer {
    edge: Edge,
    /// Becomes true when the replica shuts down: open watch streams end.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl JobServer {
    /// A server over `edge`; watches end when `stopping` turns true.
    pub fn new(edge: Edge, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        JobServer { edge, stopping }
    }

    fn status_of(&self, id: &state::JobId) -> Result<pb::JobStatus, Status> {
        let g = self.edge.replica.state.read();
        g.state
            .job(id)
            .map(convert::job_status)
            .ok_or_else(|| status::rejection(&state::Rejection::UnknownJob { job_id: id.clone() }))
    }
}

fn rej(r: state::Rejection) -> Status {
    status::rejection(&r)
}

#[tonic::async_trait]
impl JobService for JobServer {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let forwarded = self
            .edge
            .forward_or_local(&request, |ch, req| async move {
                JobServiceClient::new(ch).submit_job(req).await
            })
            .await?;
        if let Some(resp) = forwarded {
            return Ok(resp);
        }
        let req = request.into_inner();
        let job_id = convert::job_id("job_id", &req.job_id).map_err(rej)?;
        let spec = convert::job_spec(req.spec).map_err(rej)?;
        // Nothing invalid reaches the log: check before proposing.
        {
            let g = self.edge.replica.state.read();
            if g.state.job(&job_id).is_none() {
                state::validate_job_spec(&spec, g.state.config()).map_err(rej)?;
            }
        }
        let (result, _) = self
            .edge
            .propose(Command::SubmitJob {
                job_id: job_id.clone(),
                spec,
                now: now_ms(),
            })
            .await?;
        let created = match result.map_err(rej)? {
            Applied::Submitted { created, .. } => created,
            other => return Err(Status::internal(format!("unexpected response {other:?}"))),
        };
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: job_id.to_string(),
            created,
            job: Some(self.status_of(&job_id)?),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        if !request.get_ref().stale {
            let forwarded = self
                .edge
                .forward_or_local(&request, |ch, req| async move {
                    JobServiceClient::new(ch).get_job(req).await
                })
                .await?;
            if let Some(resp) = forwarded {
                return Ok(resp);
            }
            self.edge.read_barrier().await?;
        }
        let id = convert::job_id("job_id", &request.get_ref().job_id).map_err(rej)?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(self.status_of(&id)?),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        if !request.get_ref().stale {
            let forwarded = self
                .edge
                .forward_or_local(&request, |ch, req| async move {
                    JobServiceClient::new(ch).list_jobs(req).await
                })
                .await?;
            if let Some(resp) = forwarded {
                return Ok(resp);
            }
            self.edge.read_barrier().await?;
        }
        let req = request.into_inner();
        let states: Vec<JobState> = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::job_state_from_pb(&format!("states[{i}]"), *s))
            .collect::<Result<_, _>>()
            .map_err(rej)?;
        let after = match req.page_token.as_str() {
            "" => None,
            t => Some(convert::job_id("page_token", t).map_err(rej)?),
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
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page.into_iter().map(convert::job_summary).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let forwarded = self
            .edge
            .forward_or_local(&request, |ch, req| async move {
                JobServiceClient::new(ch).cancel_job(req).await
            })
            .await?;
        if let Some(resp) = forwarded {
            return Ok(resp);
        }
        let job_id = convert::job_id("job_id", &request.get_ref().job_id).map_err(rej)?;
        let (result, _) = self
            .edge
            .propose(Command::CancelJob {
                job_id: job_id.clone(),
                now: now_ms(),
            })
            .await?;
        result.map_err(rej)?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(self.status_of(&job_id)?),
        }))
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = convert::job_id("job_id", &request.get_ref().job_id).map_err(rej)?;
        let shared = self.edge.replica.state.clone();
        let mut applied = shared.subscribe();
        // A follower may not have applied a job that was just submitted: wait a little
        // (bounded) for it to appear before answering NOT_FOUND.
        let wait = Edge::deadline_of(&request).min(tokio::time::Instant::now() + JOB_APPEAR_WAIT);
        let (first, index) = loop {
            applied.borrow_and_update();
            // Status and index read under one lock, so the index is the one the status
            // reflects and no change applied in between can be missed.
            let snapshot = {
                let g = shared.read();
                (
                    g.state.job(&id).map(convert::job_status),
                    g.last_applied.map_or(0, |l| l.index),
                )
            };
            match snapshot {
                (Some(status), index) => break (status, index),
                (None, _) => {
                    if tokio::time::timeout_at(wait, applied.changed())
                        .await
                        .is_err()
                    {
                        return Err(status::rejection(&state::Rejection::UnknownJob {
                            job_id: id,
                        }));
                    }
                }
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx
                .send(Ok(pb::JobEvent {
                    job: Some(first),
                    applied_index: index,
                }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                if is_terminal(&last) {
                    return;
                }
                let shutting_down = tokio::select! {
                    changed = applied.changed() => changed.is_err(),
                    _ = stopping.wait_for(|s| *s) => true,
                };
                if shutting_down {
                    // The client library re-attaches to another replica.
                    let _ = tx
                        .send(Err(Status::unavailable("replica is shutting down")))
                        .await;
                    return;
                }
                let index = *applied.borrow_and_update();
                let current = {
                    let g = shared.read();
                    g.state.job(&id).map(convert::job_status)
                };
                match current {
                    Some(s) if s != last => {
                        last = s.clone();
                        if tx
                            .send(Ok(pb::JobEvent {
                                job: Some(s),
                                applied_index: index,
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Some(_) => {}
                    None => {
                        let _ = tx
                            .send(Err(Status::not_found(format!("job {id} was purged"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn is_terminal(s: &pb::JobStatus) -> bool {
    matches!(
        pb::JobState::try_from(s.state),
        Ok(pb::JobState::Finished | pb::JobState::Failed | pb::JobState::Canceled)
    )
}

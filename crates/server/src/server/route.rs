//! Where a request is served: here (this replica leads) or at the leader (forwarded).
//! A request that arrives during an election waits for the new leader, within its
//! deadline, instead of failing at once.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::forward::{self, Forwarder};
use super::status;
use crate::raft::replica::{Replica, WriteError};
use crate::raft::{Applied, NodeId};
use dispatcher_core::state::{Command, Rejection, Response};

/// How long a request without a deadline waits for a leader to be elected.
pub const DEFAULT_LEADER_WAIT: Duration = Duration::from_secs(5);
/// How long a write waits to commit on this leader before it gives up.
pub const DEFAULT_WRITE_WAIT: Duration = Duration::from_secs(10);

/// Where to serve a request.
pub enum Route {
    /// This replica leads.
    Local,
    /// Forward to the leader (its id) over this channel.
    Forward(Channel, NodeId),
}

/// The replica and the means to reach its leader, shared by the services.
#[derive(Clone)]
pub struct Edge {
    /// This replica.
    pub replica: Replica,
    /// Channels to leaders.
    pub forwarder: Forwarder,
}

impl Edge {
    /// The instant by which a request must be answered.
    pub fn deadline_of<T>(request: &Request<T>) -> Instant {
        let now = Instant::now();
        let wait = forward::deadline(request).unwrap_or(DEFAULT_LEADER_WAIT);
        // A far-future deadline saturates at an hour rather than overflowing.
        now.checked_add(wait)
            .unwrap_or(now + Duration::from_secs(3600))
    }

    /// Serves the request at the leader if this replica does not lead: returns the
    /// leader's answer, or `None` when the caller should serve it here. A forward that
    /// fails because the leader just died waits for the next leader (within the
    /// request's deadline) and goes there, so one request rides through an election.
    pub async fn forward_or_local<Req, Resp, F, Fut>(
        &self,
        request: &Request<Req>,
        call: F,
    ) -> Result<Option<tonic::Response<Resp>>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let deadline = Self::deadline_of(request);
        loop {
            let (channel, leader) = match self.route_until(request, deadline).await? {
                Route::Local => return Ok(None),
                Route::Forward(channel, leader) => (channel, leader),
            };
            let leader_addr = self.replica.leader().map(|(_, a)| a);
            let left = deadline.saturating_duration_since(Instant::now());
            match call(
                channel,
                forward::forwarded(request.get_ref().clone(), Some(left)),
            )
            .await
            {
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tracing::debug!(leader, error = %s, "forward failed; waiting for a leader");
                    self.wait_leader_change(leader, deadline).await;
                }
                Ok(mut resp) => {
                    // Tell the client where the leader is, so that its next call skips
                    // this hop.
                    if let Some(v) = leader_addr.and_then(|a| a.parse().ok()) {
                        resp.metadata_mut().insert(status::LEADER_ADDRESS_KEY, v);
                    }
                    return Ok(Some(resp));
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// Waits until the known leader is no longer `old` (or a short while passed, in case
    /// the old one recovers), bounded by `deadline`.
    async fn wait_leader_change(&self, old: NodeId, deadline: Instant) {
        let mut metrics = self.replica.raft.metrics();
        let until = deadline.min(Instant::now() + Duration::from_millis(100));
        while metrics.borrow_and_update().current_leader == Some(old) {
            if tokio::time::timeout_at(until, metrics.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Decides where the request is served, waiting (until `deadline`) for a leader if
    /// none is known.
    async fn route_until<T>(
        &self,
        request: &Request<T>,
        deadline: Instant,
    ) -> Result<Route, Status> {
        let mut metrics = self.replica.raft.metrics();
        loop {
            match self.replica.leader() {
                Some((id, _)) if id == self.replica.id => return Ok(Route::Local),
                Some((id, addr)) if !addr.is_empty() => {
                    if forward::was_forwarded(request) {
                        // Already forwarded once by a replica with an older view.
                        return Err(status::write_error(WriteError::NotLeader {
                            leader: Some((id, addr)),
                        }));
                    }
                    return Ok(Route::Forward(self.forwarder.channel(&addr)?, id));
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Status::unavailable("replica is shutting down")),
                Err(_) => return Err(status::write_error(WriteError::NotLeader { leader: None })),
            }
        }
    }

    /// Proposes a command on this (leading) replica and returns the state machine's
    /// answer and the log index it was applied at.
    pub async fn propose(
        &self,
        cmd: Command,
    ) -> Result<(Result<Response, Rejection>, u64), Status> {
        let (applied, index) = self
            .replica
            .propose(cmd)
            .await
            .map_err(status::write_error)?;
        match applied {
            Applied::Command(r) => Ok((r, index)),
            Applied::Internal => Err(Status::internal(
                "a command was applied as an internal entry",
            )),
        }
    }

    /// Waits until a linearizable read may be served here.
    pub async fn read_barrier(&self) -> Result<(), Status> {
        self.replica
            .read_barrier()
            .await
            .map_err(status::write_error)
    }
}

pub use crate::leader::wall_clock_ms as now_ms;

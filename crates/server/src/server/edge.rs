//! The edge: the one layer every RPC of every service passes through.
//!
//! A service declares each RPC's [`Consistency`] in its `edge_service!` table;
//! the edge alone decides from it whether the call is served here, forwarded to the
//! leader, or served here after a read barrier, and opens the trace span that carries
//! the job and TaskManager ids through forwarding, proposing and applying. Handlers get
//! the decoded message, return `Result<_, ApiError>`, and never build a `Status` or
//! decide where they run; `status` turns their errors into `Status`.
//!
//! A request that arrives during an election waits for the new leader, within its
//! deadline, instead of failing at once.
//!
//! Authentication and authorization happen here first, before a request is forwarded or
//! a handler runs: each RPC's table entry names the [`Access`] it needs, and the handler
//! receives the established [`Caller`] (see `auth`). A forwarded call carries the
//! caller's token, and the leader checks it again.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tracing::Instrument as _;

use super::auth::Authenticator;
pub use super::auth::{Access, Caller};
use super::forward::{self, Forwarder};
use super::status::{ApiError, LEADER_ADDRESS_KEY};
use crate::raft::error::WriteError;
use crate::raft::replica::Replica;
use crate::raft::NodeId;
use dispatcher_proto::v1 as pb;

/// How long a request without a deadline waits for a leader to be elected.
pub const DEFAULT_LEADER_WAIT: Duration = Duration::from_secs(5);

/// Where an RPC is served, as its service declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// By the leader; a follower forwards the call (writes, the TaskManager protocol).
    Leader,
    /// By the leader after a read barrier (linearizable reads). A request that sets its
    /// `stale` flag is served [`Consistency::Local`] instead.
    Linearizable,
    /// By this replica from its applied state, as it is (stale reads, watches, this
    /// replica's own status, peers' Raft messages).
    Local,
}

impl Consistency {
    /// The consistency one request gets: a linearizable read whose caller accepts a stale
    /// answer is served locally; nothing else can be weakened by the caller.
    pub fn for_request(self, stale: bool) -> Consistency {
        match self {
            Consistency::Linearizable if stale => Consistency::Local,
            c => c,
        }
    }
}

/// One RPC as the edge sees it: its name (for traces), its consistency and what the
/// caller needs.
#[derive(Clone, Copy, Debug)]
pub struct Rpc {
    /// The method's name, e.g. `SubmitJob`.
    pub name: &'static str,
    /// Where it is served.
    pub consistency: Consistency,
    /// What the caller needs.
    pub access: Access,
}

/// What the edge reads from a request message: whether the caller accepts a stale
/// answer, and the ids a trace should carry. Every request type implements it.
pub trait EdgeRequest {
    /// The caller accepts an answer from this replica's applied state.
    fn stale(&self) -> bool {
        false
    }
    /// The job the request is about.
    fn job_id(&self) -> Option<&str> {
        None
    }
    /// The TaskManager the request is from or about.
    fn task_manager_id(&self) -> Option<&str> {
        None
    }
}

macro_rules! edge_request {
    ($($ty:ident $({ $($m:ident: $field:ident),* })?;)*) => {$(
        impl EdgeRequest for pb::$ty {
            $($(edge_request!(@method $m $field);)*)?
        }
    )*};
    (@method stale $f:ident) => { fn stale(&self) -> bool { self.$f } };
    (@method job $f:ident) => { fn job_id(&self) -> Option<&str> { Some(&self.$f) } };
    (@method tm $f:ident) => { fn task_manager_id(&self) -> Option<&str> { Some(&self.$f) } };
}

edge_request! {
    SubmitJobRequest { job: job_id };
    GetJobRequest { job: job_id, stale: stale };
    ListJobsRequest { stale: stale };
    CancelJobRequest { job: job_id };
    WatchJobRequest { job: job_id };
    RegisterRequest { tm: task_manager_id };
    HeartbeatRequest { tm: task_manager_id };
    UnregisterRequest { tm: task_manager_id };
    ListTaskManagersRequest { stale: stale };
    StatusRequest;
    AddNodeRequest;
    RemoveNodeRequest;
    SnapshotRequest;
    CreateTokenRequest;
    ListTokensRequest;
    RevokeTokenRequest;
    RaftMessage;
}

/// The replica and the means to reach its leader, shared by the services.
#[derive(Clone)]
pub struct Edge {
    /// This replica.
    pub replica: Replica,
    /// Channels to leaders (and peers).
    pub forwarder: Forwarder,
    /// Who may call.
    pub auth: Authenticator,
}

impl Edge {
    /// Serves one call: authenticates the caller, decides where (from `rpc` and the
    /// request), forwards with `forward` or runs `local` on the caller and the message
    /// here, and maps errors to `Status`.
    pub async fn serve<Req, Resp, F, FF, L, LF>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        forward: F,
        local: L,
    ) -> Result<tonic::Response<Resp>, Status>
    where
        Req: EdgeRequest + Clone,
        F: Fn(Channel, Request<Req>) -> FF,
        FF: Future<Output = Result<tonic::Response<Resp>, Status>>,
        L: FnOnce(Caller, Req) -> LF,
        LF: Future<Output = Result<Resp, ApiError>>,
    {
        let span = span(rpc, &request);
        async move {
            let consistency = rpc.consistency.for_request(request.get_ref().stale());
            let authenticate = |forwardable: bool| {
                self.auth
                    .authenticate(
                        rpc.name,
                        rpc.access,
                        request.metadata(),
                        request.peer_certs(),
                        forwardable,
                    )
                    .map_err(|e| {
                        tracing::info!(error = %e, "refused at the edge");
                        Status::from(e)
                    })
            };
            let mut caller = authenticate(consistency != Consistency::Local)?;
            if consistency != Consistency::Local {
                if let Some(answer) = self.forward_or_local(&request, &caller, forward).await? {
                    return Ok(answer);
                }
                // A leader elected a moment ago may not have applied everything committed
                // before its term (a token's revocation, say): a read barrier brings it up
                // to date, and the caller is decided on that state. Once the leader has
                // applied an entry of its own term, its state holds every committed token
                // change, and writes need no barrier.
                let stale_leader = {
                    let metrics = self.replica.raft.metrics();
                    let m = metrics.borrow();
                    m.last_applied.map(|l| l.leader_id.term) < Some(m.current_term)
                };
                if consistency == Consistency::Linearizable || stale_leader {
                    self.replica
                        .read_barrier()
                        .await
                        .map_err(|e| Status::from(ApiError::from(e)))?;
                }
                if caller.is_deferred() || stale_leader || consistency == Consistency::Linearizable
                {
                    // Served here: decide on the state the barrier brought up to date.
                    caller = authenticate(false)?;
                }
            }
            match local(caller, request.into_inner()).await {
                Ok(answer) => Ok(tonic::Response::new(answer)),
                Err(e) => {
                    tracing::debug!(error = %e, "refused");
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The instant by which a request must be answered.
    fn deadline_of<T>(request: &Request<T>) -> Instant {
        let now = Instant::now();
        let wait = forward::deadline(request).unwrap_or(DEFAULT_LEADER_WAIT);
        // A far-future deadline saturates at an hour rather than overflowing.
        now.checked_add(wait)
            .unwrap_or(now + Duration::from_secs(3600))
    }

    /// Serves the request at the leader if this replica does not lead: returns the
    /// leader's answer, or `None` when it is to be served here. A forward that fails
    /// because the leader just died waits for the next leader (within the request's
    /// deadline) and goes there, so one request rides through an election.
    async fn forward_or_local<Req, Resp, F, Fut>(
        &self,
        request: &Request<Req>,
        caller: &Caller,
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
                None => return Ok(None),
                Some(route) => route,
            };
            let leader_addr = self.replica.leader().map(|(_, a)| a);
            let left = deadline.saturating_duration_since(Instant::now());
            tracing::debug!(leader, "forwarding to the leader");
            match call(
                channel,
                forward::forwarded(
                    request.get_ref().clone(),
                    Some(left),
                    caller.authorization(),
                ),
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
                        resp.metadata_mut().insert(LEADER_ADDRESS_KEY, v);
                    }
                    return Ok(Some(resp));
                }
                // The leader's own answer (its Status, codes and metadata) passes through.
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

    /// Decides where the request is served: `None` here (this replica leads), or a
    /// channel to the leader; waits (until `deadline`) for a leader if none is known.
    async fn route_until<T>(
        &self,
        request: &Request<T>,
        deadline: Instant,
    ) -> Result<Option<(Channel, NodeId)>, Status> {
        let mut metrics = self.replica.raft.metrics();
        loop {
            match self.replica.leader() {
                Some((id, _)) if id == self.replica.id => return Ok(None),
                Some((id, addr)) if !addr.is_empty() => {
                    if forward::was_forwarded(request) {
                        // Already forwarded once by a replica with an older view.
                        return Err(ApiError::from(WriteError::NotLeader {
                            leader: Some((id, addr)),
                        })
                        .into());
                    }
                    let channel = self.forwarder.channel(id, &addr).map_err(Status::from)?;
                    return Ok(Some((channel, id)));
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(ApiError::Unavailable("replica is shutting down".into()).into())
                }
                Err(_) => return Err(ApiError::from(WriteError::NotLeader { leader: None }).into()),
            }
        }
    }
}

/// RPCs that arrive many times a second on a healthy cluster (peers' Raft traffic,
/// TaskManager heartbeats): their spans are at debug level, so that the default log
/// level pays nothing for them.
const HIGH_VOLUME: [&str; 4] = ["append_entries", "vote", "install_snapshot", "heartbeat"];

/// The span of one call: the RPC, whether another replica forwarded it, and the job and
/// TaskManager it concerns, so that one job can be followed from the edge to `apply`.
fn span<Req: EdgeRequest>(rpc: Rpc, request: &Request<Req>) -> tracing::Span {
    let message = request.get_ref();
    let forwarded = forward::was_forwarded(request);
    let job_id = message.job_id().unwrap_or_default();
    let task_manager = message.task_manager_id().unwrap_or_default();
    if HIGH_VOLUME.contains(&rpc.name) {
        tracing::debug_span!("rpc", rpc = rpc.name, forwarded, job_id, task_manager)
    } else {
        tracing::info_span!("rpc", rpc = rpc.name, forwarded, job_id, task_manager)
    }
}

/// A server stream as a service trait declares it: forwarded streams and local ones have
/// the same type.
pub type BoxStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Implements a tonic service trait from a table: each RPC's consistency and access, the
/// client method that forwards it, and the handler method that serves it here
/// (`handler(caller)` hands it the [`Caller`] too; `[stream]` marks a server-streaming
/// RPC, whose forwarded stream is relayed). A service written this way cannot skip the
/// edge: there is no other body to write.
///
/// ```ignore
/// edge_service! {
///     JobService for JobServer, forward with JobServiceClient {
///         type WatchJobStream = BoxStream<pb::JobEvent>;
///         rpc submit_job(SubmitJobRequest) -> pb::SubmitJobResponse: Leader, Submit => submit;
///         rpc get_job(GetJobRequest) -> pb::GetJobResponse: Linearizable, Read => get(caller);
///         rpc watch_job(WatchJobRequest) -> Self::WatchJobStream: Local, Read => watch(caller) [stream];
///     }
/// }
/// ```
macro_rules! edge_service {
    (
        $service:ident for $server:ty, forward with $client:ident {
            $( type $assoc:ident = $assoc_ty:ty; )*
            $( rpc $method:ident ($req:ident) -> $resp:ty : $consistency:ident, $access:ident => $handler:ident $(($caller:ident))? $([$stream:ident])? ; )*
        }
    ) => {
        #[tonic::async_trait]
        impl $service for $server {
            $( type $assoc = $assoc_ty; )*
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<dispatcher_proto::v1::$req>,
                ) -> Result<tonic::Response<$resp>, tonic::Status> {
                    let rpc = $crate::server::edge::Rpc {
                        name: stringify!($method),
                        consistency: $crate::server::edge::Consistency::$consistency,
                        access: $crate::server::edge::Access::$access,
                    };
                    self.edge
                        .serve(
                            rpc,
                            request,
                            |channel, request| async move {
                                edge_service!(@forward $client, $method, channel, request $(, $stream)?)
                            },
                            |caller, message| edge_service!(@call self, $handler, caller, message $(, $caller)?),
                        )
                        .await
                }
            )*
        }
    };
    (@call $self:ident, $handler:ident, $c:ident, $message:ident) => {{
        let _ = $c;
        $self.$handler($message)
    }};
    (@call $self:ident, $handler:ident, $c:ident, $message:ident, caller) => {
        $self.$handler($c, $message)
    };
    (@forward $client:ident, $method:ident, $channel:ident, $request:ident) => {
        $client::new($channel).$method($request).await
    };
    (@forward $client:ident, $method:ident, $channel:ident, $request:ident, stream) => {
        $client::new($channel)
            .$method($request)
            .await
            .map(|answer| answer.map(|s| Box::pin(s) as _))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_linearizable_read_can_be_made_stale_by_its_caller() {
        use Consistency::*;
        assert_eq!(Linearizable.for_request(true), Local);
        assert_eq!(Linearizable.for_request(false), Linearizable);
        assert_eq!(
            Leader.for_request(true),
            Leader,
            "a write is never served locally"
        );
        assert_eq!(Local.for_request(false), Local);
    }

    #[test]
    fn requests_name_their_job_task_manager_and_staleness() {
        let get = pb::GetJobRequest {
            job_id: "j".into(),
            stale: true,
        };
        assert_eq!((get.job_id(), get.stale()), (Some("j"), true));
        let hb = pb::HeartbeatRequest {
            task_manager_id: "tm-1".into(),
            ..Default::default()
        };
        assert_eq!((hb.task_manager_id(), hb.stale()), (Some("tm-1"), false));
        let submit = pb::SubmitJobRequest::default();
        assert!(
            !submit.stale(),
            "a submission cannot ask to be served stale"
        );
    }
}

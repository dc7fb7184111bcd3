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
//! The edge also owns a call's deadline and its honest failure codes: it answers before
//! the caller's deadline (`grpc-timeout`) passes, with DEADLINE_EXCEEDED when the work
//! was not done in time, and a follower answers its own failure to reach the leader
//! (refused, reset, no answer in time) as UNAVAILABLE with the leader hint, while the
//! leader's own answer passes through unchanged.
//!
//! Authentication and authorization happen here first, before a request is forwarded or
//! a handler runs: each RPC's table entry names the [`Access`] it needs, and the handler
//! receives the established [`Caller`] (see `auth`). A forwarded call carries the
//! caller's token, and the leader checks it again.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, Request, Status};
use tracing::Instrument as _;

use super::auth::Authenticator;
pub use super::auth::{Access, Caller};
use super::forward::{self, Forwarder, Route};
use super::status::{stamp_hint_term, ApiError, LEADER_ADDRESS_KEY};
use crate::raft::error::WriteError;
use crate::raft::replica::Replica;
use crate::raft::NodeId;
use crate::timing;
use dispatcher_proto::v1 as pb;

/// How long a request without a deadline waits for a leader to be elected (and a
/// follower for the leader's answer to a forwarded one).
pub const DEFAULT_LEADER_WAIT: Duration = Duration::from_secs(5);

/// When a request arrived, stamped by [`stamp_arrival`] as the server hands it to the
/// services: tonic starts its own timer for the caller's deadline then, before the
/// message is decoded, and the edge must count from the same moment to answer first.
#[derive(Clone, Copy, Debug)]
pub struct Arrival(Instant);

/// The interceptor that stamps every request with its [`Arrival`].
pub fn stamp_arrival(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.extensions_mut().insert(Arrival(Instant::now()));
    Ok(request)
}

/// How long before the caller's deadline the edge gives up and answers. tonic ends a
/// call whose deadline passed as CANCELLED, on the server and in a tonic client alike;
/// an answer sent this much earlier reaches the caller first, with a code that says
/// what happened. A tenth of the timeout, between 1 ms and 50 ms.
pub fn answer_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

/// By when the edge answers one request.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    /// The instant it gives up waiting and answers.
    at: Instant,
    /// The timeout the caller set (`grpc-timeout`), if it set one.
    caller: Option<Duration>,
}

impl Deadline {
    /// The caller's deadline less [`answer_margin`], counted from the request's
    /// arrival; [`DEFAULT_LEADER_WAIT`] for a request without one.
    fn of<T>(request: &Request<T>) -> Deadline {
        let arrived = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        let caller = forward::deadline(request);
        let wait = match caller {
            Some(t) => t.saturating_sub(answer_margin(t)),
            None => DEFAULT_LEADER_WAIT,
        };
        Deadline {
            // A far-future deadline saturates at an hour rather than overflowing.
            at: arrived
                .checked_add(wait)
                .unwrap_or(arrived + Duration::from_secs(3600)),
            caller,
        }
    }

    fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// DEADLINE_EXCEEDED, saying what the replica was doing when the deadline passed.
    fn exceeded(&self, doing: &str) -> Status {
        let timeout = self.caller.unwrap_or(DEFAULT_LEADER_WAIT);
        ApiError::DeadlineExceeded(format!(
            "the request's deadline ({} ms) passed {doing}; a write may or may not have \
             taken effect: retry with the same ids",
            timeout.as_millis()
        ))
        .into()
    }

    /// Runs `work` within the caller's deadline: DEADLINE_EXCEEDED when it passes first.
    /// Without a caller deadline, `work` runs to its end (as tonic would let it).
    async fn within<T>(
        &self,
        doing: &str,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        if self.caller.is_none() {
            return work.await;
        }
        match tokio::time::timeout_at(self.at, work).await {
            Ok(result) => result,
            Err(_) => Err(self.exceeded(doing)),
        }
    }
}

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
    IdentifyRequest;
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
    /// What the edge counts: rejections, forwards, submission latency.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
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
        F: Fn(Route, Request<Req>) -> FF,
        FF: Future<Output = Result<tonic::Response<Resp>, Status>>,
        L: FnOnce(Caller, Req) -> LF,
        LF: Future<Output = Result<Resp, ApiError>>,
    {
        let started = std::time::Instant::now();
        let span = span(rpc, &request);
        let mut answer = async move {
            let deadline = Deadline::of(&request);
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
                    .map(|caller| caller.from_address(request.remote_addr()))
                    .map_err(|e| {
                        tracing::info!(error = %e, "refused at the edge");
                        Status::from(e)
                    })
            };
            let mut caller = authenticate(consistency != Consistency::Local)?;
            if consistency != Consistency::Local {
                if let Some(answer) = self
                    .forward_or_local(&request, &caller, forward, deadline)
                    .await?
                {
                    self.metrics.forward(rpc.name);
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
                    let barrier = async {
                        self.replica
                            .read_barrier()
                            .await
                            .map_err(|e| Status::from(ApiError::from(e)))
                    };
                    deadline
                        .within("while confirming the leadership (read barrier)", barrier)
                        .await?;
                }
                if caller.is_deferred() || stale_leader || consistency == Consistency::Linearizable
                {
                    // Served here: decide on the state the barrier brought up to date.
                    caller = authenticate(false)?;
                }
            }
            let served = async {
                match local(caller, request.into_inner()).await {
                    Ok(answer) => Ok(tonic::Response::new(answer)),
                    Err(e) => {
                        tracing::debug!(error = %e, "refused");
                        Err(e.into())
                    }
                }
            };
            if rpc.access == Access::Peer {
                // Peers' Raft calls keep tonic's timing: the Raft network times them out
                // itself and reads either code as a timeout.
                return served.await;
            }
            deadline
                .within("before this replica had served it", served)
                .await
        }
        .instrument(span)
        .await;
        timing::rpc_since("edge", rpc.name, started);
        if rpc.name == "submit_job" {
            self.metrics
                .submit_latency
                .observe(started.elapsed().as_secs_f64());
        }
        if let Err(status) = &answer {
            self.metrics.reject(rpc.name, status.code());
        }
        // Any answer naming a leader says in which term (clients ignore older ones).
        let metadata = match &mut answer {
            Ok(resp) => resp.metadata_mut(),
            Err(status) => status.metadata_mut(),
        };
        if metadata.contains_key(LEADER_ADDRESS_KEY) {
            stamp_hint_term(metadata, self.replica.leader_in_term());
        }
        answer
    }

    /// Serves the request at the leader if this replica does not lead: returns the
    /// leader's answer, or `None` when it is to be served here. A forward that fails
    /// because the leader just died waits for the next leader (within the request's
    /// deadline) and goes there, so one request rides through an election.
    ///
    /// A forward that fails here (the leader refused or reset the connection, or gave no
    /// answer in the time left) is retried at the next leader while time remains; when
    /// the deadline comes, the caller gets UNAVAILABLE with the leader hint, not tonic's
    /// transport error. Each forward carries the time left as its deadline, so a live
    /// leader that cannot finish in time answers DEADLINE_EXCEEDED itself, before this
    /// replica would give up on it.
    async fn forward_or_local<Req, Resp, F, Fut>(
        &self,
        request: &Request<Req>,
        caller: &Caller,
        call: F,
        deadline: Deadline,
    ) -> Result<Option<tonic::Response<Resp>>, Status>
    where
        Req: Clone,
        F: Fn(Route, Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        loop {
            let route = match self.route_until(request, deadline).await? {
                None => return Ok(None),
                Some(route) => route,
            };
            let leader = route.leader.clone();
            let left = deadline.at.saturating_duration_since(Instant::now());
            tracing::debug!(leader = leader.0, "forwarding to the leader");
            let forwarded = forward::forwarded(
                request.get_ref().clone(),
                Some(left),
                caller.authorization(),
            );
            // Why this try failed, if the deadline comes before another one succeeds.
            let failed = match tokio::time::timeout_at(deadline.at, call(route, forwarded)).await {
                Ok(Ok(mut resp)) => {
                    // Tell the client where the leader is, so that its next call skips
                    // this hop.
                    if let Ok(v) = leader.1.parse() {
                        resp.metadata_mut().insert(LEADER_ADDRESS_KEY, v);
                    }
                    return Ok(Some(resp));
                }
                Ok(Err(s)) if forward::failed_here(&s) => Failed::Here(forward::describe(&s)),
                // A leader that cannot serve now (it just lost leadership, say): the next
                // one may. Its answer stands if none comes in time.
                Ok(Err(s)) if s.code() == Code::Unavailable => Failed::Leader(s),
                // The leader's own answer (its Status, codes and metadata) passes through.
                Ok(Err(s)) => return Err(s),
                Err(_) => Failed::Here(format!("no answer within {} ms", left.as_millis())),
            };
            if let Failed::Here(failure) = &failed {
                tracing::debug!(leader = leader.0, %failure, "forward failed");
            }
            if !deadline.passed() {
                self.wait_leader_change(leader.0, deadline.at).await;
            }
            if deadline.passed() {
                return Err(match failed {
                    Failed::Leader(answer) => answer,
                    // The hint names the leader known now, which may have changed.
                    Failed::Here(failure) => {
                        forward::failure(&leader, &failure, self.replica.leader()).into()
                    }
                });
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
    /// A caller whose own deadline passes first gets DEADLINE_EXCEEDED; one without a
    /// deadline gets UNAVAILABLE (no leader known) after [`DEFAULT_LEADER_WAIT`].
    async fn route_until<T>(
        &self,
        request: &Request<T>,
        deadline: Deadline,
    ) -> Result<Option<Route>, Status> {
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
                    return Ok(Some(Route {
                        channel,
                        leader: (id, addr),
                    }));
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline.at, metrics.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(ApiError::Unavailable("replica is shutting down".into()).into())
                }
                Err(_) if deadline.caller.is_some() => {
                    return Err(
                        deadline.exceeded("while no leader was known (an election may be running)")
                    )
                }
                Err(_) => return Err(ApiError::from(WriteError::NotLeader { leader: None }).into()),
            }
        }
    }
}

/// Why one forward failed.
enum Failed {
    /// The leader answered UNAVAILABLE (it cannot serve now; another may).
    Leader(Status),
    /// The forward failed here: refused, reset, or no answer in time.
    Here(String),
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
                            |route, request| async move {
                                edge_service!(@forward $client, $method, route, request $(, $stream)?)
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
    (@forward $client:ident, $method:ident, $route:ident, $request:ident) => {
        $client::new($route.channel).$method($request).await
    };
    (@forward $client:ident, $method:ident, $route:ident, $request:ident, stream) => {
        $client::new($route.channel)
            .$method($request)
            .await
            .map(|answer| {
                answer.map(|s| Box::pin($crate::server::forward::relay(s, $route.leader)) as _)
            })
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
    fn the_edge_answers_a_tenth_of_the_deadline_early_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(answer_margin(ms(100)), ms(10));
        assert_eq!(answer_margin(ms(5)), ms(1), "at least 1 ms");
        assert_eq!(answer_margin(Duration::ZERO), ms(1));
        assert_eq!(
            answer_margin(Duration::from_secs(10)),
            ms(50),
            "at most 50 ms"
        );
    }

    #[test]
    fn the_deadline_counts_from_the_arrival_less_the_margin() {
        let arrived = Instant::now();
        let mut r = Request::new(());
        r.extensions_mut().insert(Arrival(arrived));
        r.metadata_mut()
            .insert("grpc-timeout", "100m".parse().expect("ascii"));
        let d = Deadline::of(&r);
        assert_eq!(d.at, arrived + Duration::from_millis(90));
        assert_eq!(d.caller, Some(Duration::from_millis(100)));

        let mut r = Request::new(());
        r.extensions_mut().insert(Arrival(arrived));
        let d = Deadline::of(&r);
        assert_eq!(
            d.at,
            arrived + DEFAULT_LEADER_WAIT,
            "no deadline: the leader wait"
        );
        assert_eq!(d.caller, None);
    }

    #[tokio::test]
    async fn work_past_the_callers_deadline_ends_as_deadline_exceeded() {
        let d = Deadline {
            at: Instant::now() + Duration::from_millis(20),
            caller: Some(Duration::from_millis(22)),
        };
        let slow = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, Status>(())
        };
        let s = d.within("doing it", slow).await.expect_err("too slow");
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(s.message().contains("22 ms") && s.message().contains("doing it"));
        let quick = async { Ok::<_, Status>(7) };
        assert_eq!(d.within("doing it", quick).await.expect("in time"), 7);
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

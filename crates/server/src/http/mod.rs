//! The replica's HTTP side, on `--http-listen` (off by default): Flink's REST API for
//! what the dispatcher holds ([`flink`]), Prometheus metrics at `/metrics`, our own
//! cluster view at `/dispatcher/cluster`, and the web dashboard at `/` ([`dashboard`],
//! plain HTML, CSS and JavaScript embedded in the binary).
//!
//! Architecture invariant: no dispatcher logic here. Every route that reads or changes
//! jobs, TaskManagers or the cluster calls the gRPC service implementation in-process
//! ([`Services`]), so it passes through the same edge as a gRPC call: the same bearer
//! tokens and roles (`Authorization: Bearer <token>`), the same local-or-forward decision,
//! the same deadlines, the same counters. Handlers only translate protobuf to JSON and
//! gRPC codes to HTTP statuses ([`call`]). `/config` and `/metrics`, which read no job,
//! check the token through the same `Authenticator` (role `read`). Only the dashboard's
//! static files are served without a token: they hold no data. With TLS configured the
//! listener speaks HTTPS only, with the replica's own certificate. Nothing here writes
//! the state except through `CancelJob`.

pub mod call;
pub mod dashboard;
pub mod flink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

use crate::leader::Liveness;
use crate::metrics::{Metrics, ScrapeSources};
use crate::server::cluster_service::ClusterServer;
use crate::server::edge::{Access, Edge};
use crate::server::job_service::JobServer;
use crate::server::listener::{self, Counted};
use crate::server::taskmanager_service::TaskManagerServer;
use call::HttpError;

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// The gRPC service implementations the routes call, and what `/metrics` reads.
#[derive(Clone)]
pub struct Services {
    /// JobService.
    pub jobs: Arc<JobServer>,
    /// TaskManagerService.
    pub task_managers: Arc<TaskManagerServer>,
    /// ClusterService.
    pub cluster: Arc<ClusterServer>,
    /// The edge (for the token checks of routes that call no RPC).
    pub edge: Edge,
    /// The leader's heartbeat memory (for metrics).
    pub liveness: Liveness,
    /// The replica's metrics.
    pub metrics: Arc<Metrics>,
}

impl Services {
    /// Checks the caller of a route that calls no RPC, as the edge would for `access`.
    pub fn authorize(
        &self,
        route: &str,
        access: Access,
        headers: &HeaderMap,
    ) -> Result<(), HttpError> {
        let request = call::request(headers, ());
        self.edge
            .auth
            .authenticate(route, access, request.metadata(), None, false)
            .map(|_| ())
            .map_err(|e| HttpError::from(tonic::Status::from(e)))
    }
}

/// Every route: Flink's (also under `/v1`, where Flink's own clients send them), ours,
/// the metrics and the dashboard; anything else gets Flink's error shape.
pub fn router(services: Services) -> Router {
    Router::new()
        .merge(flink::routes())
        .nest("/v1", flink::routes())
        .route("/metrics", get(metrics))
        .route("/dispatcher/cluster", get(flink::cluster))
        .merge(dashboard::routes())
        .fallback(call::not_found)
        .layer(axum::middleware::map_response(call::flink_error_shape))
        .with_state(services)
}

async fn metrics(
    State(s): State<Services>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HttpError> {
    s.authorize("metrics", Access::Read, &headers)?;
    let (watched, watchers) = s.jobs.watch_counts();
    let text = s
        .metrics
        .scrape(
            &s.edge.replica,
            ScrapeSources {
                heartbeat_ages: s.liveness.heartbeat_ages(),
                watches: (watched, watchers),
                expired: s
                    .liveness
                    .expired_counter()
                    .load(std::sync::atomic::Ordering::Relaxed),
            },
        )
        .await;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    /// The address could not be bound.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS files are unusable for HTTPS.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Binds `addr` (so that a taken port fails the start), then serves `router` on it
/// until `stopping` turns true: HTTPS with `tls`, plain HTTP without.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpStartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpStartError::Listen { addr, source })
}

/// Most HTTP connections open at once (besides gRPC's own bound): the dashboard, Flink
/// clients and scrapers need few; the rest of the descriptors stay for gRPC and Raft.
pub const MAX_HTTP_CONNECTIONS: usize = 1024;

/// Serves `router` on `tcp` until `stopping` turns true: at most `max` connections open
/// at once, each closed if it sends nothing within 10 s (the gRPC listener's rules,
/// `server::listener`), HTTPS when `tls` is given.
pub async fn serve(
    tcp: TcpListener,
    max: usize,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let addr = tcp.local_addr().ok();
    tracing::info!(addr = ?addr, https = tls.is_some(), max_connections = max, "serving HTTP (Flink REST, /metrics, dashboard)");
    let local = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    // No close hook: HTTP clients are never peers, whose closes succession watches.
    let incoming = listener::incoming(tcp, max, listener::FIRST_BYTES_WITHIN, None);
    let shutdown = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let result = match tls {
        None => {
            axum::serve(Plain { incoming, local }, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            axum::serve(TlsListener::new(incoming, local, config), router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}

/// The peer of an accepted connection (`local` when the socket cannot say).
fn peer_of(conn: &Counted, local: SocketAddr) -> SocketAddr {
    use tonic::transport::server::Connected as _;
    conn.connect_info().remote_addr().unwrap_or(local)
}

/// Plain HTTP over the bounded accept loop.
struct Plain {
    incoming: ReceiverStream<std::io::Result<Counted>>,
    local: SocketAddr,
}

impl axum::serve::Listener for Plain {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = peer_of(&conn, self.local);
                    return (conn, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop never ends while this listener lives.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A listener that hands axum only connections whose TLS handshake completed; each
/// handshake runs in a task of its own, so a slow client holds up no other.
struct TlsListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<Counted>, SocketAddr)>,
}

impl TlsListener {
    fn new(
        mut incoming: ReceiverStream<std::io::Result<Counted>>,
        local: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> Self {
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = incoming.next() => accepted,
                    // axum dropped the listener: stop accepting (and free the port).
                    _ = tx.closed() => return,
                };
                let conn = match accepted {
                    Some(Ok(conn)) => conn,
                    Some(Err(_)) => continue,
                    None => return,
                };
                let peer = peer_of(&conn, local);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_WITHIN, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<Counted>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop never ends while this listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

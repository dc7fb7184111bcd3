//! A dispatcher replica: Raft replication of the state machine over sled, the gRPC edge
//! and its services, and the leader's time-based duties. The `dispatcher` binary is a
//! thin `main` over [`server::run`].
//!
//! Module map (see `docs/architecture.md` for the whole picture):
//!
//! - [`leader`]: the leader's time-based duties (TaskManager leases, due restarts,
//!   retention purge), turned into commands.
//! - [`logging`]: the binary's log setup, and the filter that rate-limits openraft's
//!   failure reports.
//! - [`raft`]: replication: openraft types, the sled log store, the state-machine store,
//!   the peer transport and the replica.
//! - [`server`]: the gRPC edge (every RPC passes through `server::edge`), services,
//!   error mapping, forwarding, configuration, `run`.
//! - [`tls`]: the replica's TLS material and how it dials peers (`replica-<id>` names).
//! - [`taskmanagers`]: the leader's side of the TaskManager protocol, in domain terms.
//! - [`watch`]: job watches, from the applied state.
//! - [`http`]: the HTTP listener (`--http-listen`): Flink's REST API, `/metrics` and the
//!   dashboard, all through the gRPC services and so through the edge.
//! - [`metrics`]: the Prometheus metrics the edge, the log store and scrapes fill.
//! - [`error`]: what can go wrong serving a request.
//! - [`memory`]: giving freed heap memory back to the system after a burst.
//!
//! The state machine, codec and backups are `dispatcher-core`; the contract is
//! `dispatcher-proto`. Architecture invariant: `raft` knows nothing of gRPC services,
//! and nothing here is used by the client crate.
#![deny(missing_docs)]

pub mod error;
pub mod http;
pub mod leader;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod taskmanagers;
pub mod timing;
pub mod tls;
pub mod watch;

//! A Raft-replicated dispatcher: the job-submission and scheduling control plane of a
//! Flink-style cluster whose own replicas are its high-availability store.
//!
//! Module map (see `docs/architecture.md` for the whole picture):
//!
//! - [`state`]: the pure, deterministic replicated state machine (jobs, TaskManagers,
//!   slots, placement). No I/O, no clock, no randomness.
//! - [`client`]: the Rust client library (leader finding, retries, deadlines).
//! - [`leader`]: the leader's time-based duties (TaskManager leases, due restarts,
//!   retention purge), turned into commands.
//! - [`backup`]: backup files of the replicated state (save and restore).
//! - [`cli`]: the `dispatchctl` command-line client.
//! - [`codec`]: the one encoding of everything that is persisted or sent between
//!   replicas (a format-version byte, then bincode).
//! - [`raft`]: replication: openraft types, the sled log store, the state-machine store,
//!   the peer transport and the replica.
//! - [`server`]: the gRPC edge: services, error mapping, forwarding, configuration, `run`.
//! - [`taskmanager`]: the TaskManager agent (registration, heartbeats, reconciliation,
//!   task processes).
//! - [`proto`]: the generated `dispatcher.v1` gRPC messages, clients and servers.
#![deny(missing_docs)]

pub mod backup;
pub mod cli;
pub mod client;
pub mod codec;
pub mod leader;
pub mod proto;
pub mod raft;
pub mod server;
pub mod state;
pub mod taskmanager;

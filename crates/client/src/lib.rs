//! The client side of the dispatcher: everything that talks to a cluster over gRPC and
//! never is a replica.
//!
//! - [`client`]: the Rust client library (leader finding, retries, deadlines), also
//!   re-exported at the crate root.
//! - [`cli`]: the `dispatchctl` command-line client.
//! - [`taskmanager`]: the TaskManager agent (registration, heartbeats, reconciliation,
//!   task processes).
//!
//! Architecture invariant: links neither sled nor openraft (see its `Cargo.toml`); it
//! knows the cluster only through the `dispatcher.v1` contract.
#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod taskmanager;

pub use client::{
    new_job_id, BearerAuth, Client, ClientConfig, ClientError, ConnectArgs, Connection,
    SecurityError, TlsConfig, Token,
};

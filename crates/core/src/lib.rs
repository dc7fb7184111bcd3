//! The dispatcher's core: what every replica computes the same way, and what is written
//! to disk or sent between replicas.
//!
//! - [`state`]: the pure, deterministic replicated state machine (jobs, TaskManagers,
//!   slots, placement). No I/O, no clock, no randomness.
//! - [`codec`]: the one encoding of everything persisted or sent between replicas (a
//!   format-version byte, then bincode).
//! - [`backup`]: backup files of the replicated state (save and restore).
//!
//! Architecture invariant: this crate depends on no async runtime, no RPC framework and
//! no Raft library (see its `Cargo.toml`), so the state machine cannot reach any of them.
#![deny(missing_docs)]

pub mod backup;
pub mod codec;
pub mod state;

//! The replicated state machine: the job registry, TaskManagers and their slots, gang
//! placement, job and task lifecycles, restart accounting and checkpoint bookkeeping.
//!
//! Architecture invariant: this module does no I/O, reads no clock and draws no random
//! number. It knows nothing of Raft or gRPC. Time enters only as the `now` that the
//! leader stamps into commands; `apply` is a pure function of the state and the command,
//! so every replica that applies the same log reaches the same state (and digest).

pub mod access;
mod command;
pub mod invariants;
mod machine;
mod placement;
mod types;
mod validate;

#[cfg(test)]
mod access_tests;
#[cfg(test)]
mod limits_tests;
#[cfg(test)]
mod tests;

pub use access::{hash_secret, Permission, Role, Token};
pub use command::{
    ClusterConfig, Command, Counters, Rejection, ReportOutcome, ResourceLimits, Response,
    TaskReport,
};
pub use machine::{Assignment, DispatcherState, PendingReason, PendingReasons, StateView};
pub use placement::{Capacity, SlotIndex};
pub use types::*;
pub use validate::{
    validate_cluster_config, validate_job_spec, validate_resource_limits, validate_task_manager,
    validate_token,
};

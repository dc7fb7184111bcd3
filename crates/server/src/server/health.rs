//! Health that tells the truth, and crash-only exit when the Raft core dies.
//!
//! A replica is SERVING (overall and per service) only while its Raft core runs and it
//! knows the leader of its current term. When the core stops on its own (a storage
//! error such as a full disk or `Too many open files`, a panic inside openraft), the
//! replica turns NOT_SERVING at once, logs the cause, and [`run`] returns it so that the
//! process exits non-zero and its supervisor (systemd, compose, Kubernetes) restarts it:
//! a replica whose core is gone can never serve again, and staying up only hides it.
//!
//! Must never report SERVING from anything but the Raft metrics, and never decide
//! anything about the cluster: it only observes this replica.

use std::time::Duration;

use openraft::ServerState;
use tonic_health::ServingStatus;

use crate::raft::replica::Replica;
use crate::raft::RaftMetrics;

/// What the metrics say about this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// The core runs and a leader of the current term is known.
    Serving,
    /// The core runs, but no leader is known (an election, a minority side).
    NoLeader,
    /// The core stopped; the cause.
    Dead(String),
}

/// This replica's health from its Raft metrics.
/// This replica leading counts only once a quorum confirmed it in its term
/// (`replica::reported_leader`).
pub fn of(m: &RaftMetrics) -> Health {
    if let Err(fatal) = &m.running_state {
        return Health::Dead(fatal.to_string());
    }
    if m.state == ServerState::Shutdown {
        return Health::Dead("the Raft core stopped".into());
    }
    match crate::raft::replica::reported_leader(m, m.id) {
        Some(_) => Health::Serving,
        None => Health::NoLeader,
    }
}

/// Keeps the health service in line with the Raft metrics until the core dies, and
/// returns the cause. Never returns while the core runs.
pub async fn run(
    replica: Replica,
    health: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
) -> String {
    let mut metrics = replica.raft.metrics();
    let mut last: Option<bool> = None;
    loop {
        let now = of(&metrics.borrow_and_update());
        let serving = now == Health::Serving;
        if last != Some(serving) || matches!(now, Health::Dead(_)) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            for name in services {
                health.set_service_status(*name, status).await;
            }
            last = Some(serving);
        }
        if let Health::Dead(cause) = now {
            return cause;
        }
        if metrics.changed().await.is_err() {
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for name in services {
                health
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            return "the Raft core stopped without a report".into();
        }
        // Metrics change on every commit; health needs no finer grain than this.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::Fatal;

    fn metrics() -> RaftMetrics {
        RaftMetrics::new_initial(1)
    }

    #[test]
    fn serving_needs_a_running_core_and_a_known_leader() {
        let mut m = metrics();
        assert_eq!(of(&m), Health::NoLeader);
        m.current_leader = Some(2);
        m.state = ServerState::Follower;
        assert_eq!(of(&m), Health::Serving);
        m.state = ServerState::Shutdown;
        assert!(matches!(of(&m), Health::Dead(_)));
        // A restarted leader at its old term, before any quorum answered it.
        m.state = ServerState::Leader;
        m.current_leader = Some(1);
        assert_eq!(of(&m), Health::NoLeader);
        m.millis_since_quorum_ack = Some(0);
        assert_eq!(of(&m), Health::Serving);
        m.millis_since_quorum_ack = None;
        m.state = ServerState::Follower;
        m.running_state = Err(Fatal::Panicked);
        assert!(matches!(of(&m), Health::Dead(cause) if cause.contains("panic")));
    }
}

//! Leader election (Raft §5.2): one leader is elected, at most one per term, and a new
//! one after the leader dies.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::ServerState;
use raft_tests::{seed, simulate, wait_for, Cluster, ClusterOptions};

const T: Duration = Duration::from_secs(15);

#[test]
fn one_leader_is_elected_and_a_new_one_after_it_dies() {
    simulate(async {
        let c = Cluster::start(ClusterOptions::voters(3), seed(1)).await;
        let first = c.leader(T, "initial election").await;
        let term = c.replica(first).metrics().current_term;
        let (_, index) = c.submit(T).await;
        c.wait_applied(index, T, "a write before the failure").await;

        c.stop(first).await;
        let second = c.leader(T, "after the leader stopped").await;
        assert_ne!(second, first);
        assert!(
            c.replica(second).metrics().current_term > term,
            "a new leader has a newer term"
        );
        c.submit(T).await;

        c.restart(first).await;
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "the old leader rejoined").await;
        assert_eq!(
            c.replica(first).metrics().current_leader,
            Some(second),
            "the restarted replica follows the new leader"
        );
        c.assert_converged(T, "after re-election").await;
        c.shutdown().await;
    })
}

#[test]
fn at_most_one_leader_per_term_under_message_loss() {
    simulate(async {
        let c = Cluster::start(ClusterOptions::voters(5), seed(2)).await;
        c.set_loss(30);
        let mut leaders_by_term: BTreeMap<u64, u64> = BTreeMap::new();
        // Observe for a while under heavy loss: elections come and go, but never two
        // leaders in one term.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < deadline {
            for id in c.running() {
                let m = c.replica(id).metrics();
                if m.state == ServerState::Leader {
                    let prev = leaders_by_term.insert(m.current_term, id);
                    assert!(
                        prev.is_none() || prev == Some(id),
                        "two leaders in term {}: {prev:?} and {id}",
                        m.current_term
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.heal();
        let (job, index) = c.submit(T).await;
        c.wait_applied(index, T, "after the loss stopped").await;
        wait_for(T, "every replica has the job", || async {
            c.running()
                .iter()
                .all(|id| c.has_job(*id, &job))
                .then_some(())
        })
        .await;
        c.assert_converged(T, "after lossy elections").await;
        assert!(
            c.trace().leaders_by_term().len() > 1,
            "the loss caused no new election: the window tested nothing"
        );
        c.shutdown().await;
    })
}

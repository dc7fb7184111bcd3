//! Log replication and safety (Raft §5.3, §5.4): committed writes survive the loss of any
//! minority; a minority cannot commit, and its old leader steps down when the partition
//! heals.

use std::time::Duration;

use openraft::ServerState;
use raft_tests::{seed, simulate, wait_for, Cluster, ClusterOptions};

const T: Duration = Duration::from_secs(15);

#[test]
fn committed_writes_survive_the_loss_of_any_minority() {
    simulate(async {
        let c = Cluster::start(ClusterOptions::voters(5), seed(3)).await;
        let mut acked = vec![];
        for _ in 0..10 {
            acked.push(c.submit(T).await.0);
        }
        // Lose two of five, the leader among them.
        let leader = c.leader(T, "before the loss").await;
        let other = c
            .running()
            .into_iter()
            .find(|id| *id != leader)
            .expect("a follower");
        c.stop(leader).await;
        c.stop(other).await;
        for _ in 0..10 {
            acked.push(c.submit(T).await.0);
        }
        for id in c.running() {
            for job in &acked {
                assert!(
                    c.has_job(id, job) || {
                        // A follower may still be applying the last entries.
                        wait_for(T, "the follower to apply", || async {
                            c.has_job(id, job).then_some(())
                        })
                        .await;
                        true
                    }
                );
            }
        }
        c.restart(leader).await;
        c.restart(other).await;
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "the restarted minority caught up")
            .await;
        for id in c.running() {
            for job in &acked {
                assert!(
                    c.has_job(id, job),
                    "replica {id} lost acknowledged job {job}"
                );
            }
        }
        c.assert_converged(T, "after the minority returned").await;
        c.shutdown().await;
    })
}

#[test]
fn a_minority_cannot_commit_and_its_old_leader_steps_down() {
    simulate(async {
        let c = Cluster::start(ClusterOptions::voters(3), seed(4)).await;
        let old = c.leader(T, "before the partition").await;
        let before = c.submit(T).await.0;
        c.isolate(old);

        let refused = c.try_submit_via(old, Duration::from_millis(1500)).await;
        assert!(
            refused.is_err(),
            "an isolated leader committed a write: {refused:?}"
        );

        let new = c.leader(T, "the majority side elects").await;
        assert_ne!(new, old);
        let during = c.submit(T).await.0;

        c.heal();
        wait_for(T, "the old leader steps down and follows", || async {
            let m = c.replica(old).metrics();
            (m.state == ServerState::Follower && m.current_leader == Some(new)).then_some(())
        })
        .await;
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "after healing").await;
        for id in c.running() {
            assert!(c.has_job(id, &before) && c.has_job(id, &during));
        }
        c.assert_converged(T, "after the partition healed").await;
        c.shutdown().await;
    })
}

#[test]
fn writes_commit_through_a_slow_link_and_lossy_network() {
    simulate(async {
        let c = Cluster::start(ClusterOptions::voters(3), seed(5)).await;
        let leader = c.leader(T, "start").await;
        for id in c.running() {
            if id != leader {
                c.set_delay(leader, id, Duration::from_millis(20));
            }
        }
        c.set_loss(10);
        let mut acked = vec![];
        for _ in 0..15 {
            acked.push(c.submit(T).await.0);
        }
        c.heal();
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "after the faults stopped").await;
        for id in c.running() {
            for job in &acked {
                assert!(c.has_job(id, job));
            }
        }
        c.assert_converged(T, "after a lossy run").await;
        c.shutdown().await;
    })
}

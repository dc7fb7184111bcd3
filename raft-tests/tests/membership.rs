//! Membership changes (Raft §6, joint consensus): add a learner, promote it to voter,
//! remove a replica, and keep committing throughout.

use std::time::Duration;

use raft_tests::{seed, simulate, wait_for, Cluster, ClusterOptions};

const T: Duration = Duration::from_secs(20);

#[test]
fn add_promote_and_remove_replicas() {
    simulate(async {
        let mut c = Cluster::start(ClusterOptions::voters(3), seed(9)).await;
        for _ in 0..5 {
            c.submit(T).await;
        }
        c.spawn_new(4).await;
        let leader = c.leader(T, "before adding").await;
        c.replica(leader)
            .add_node(4, "node-4".into(), true)
            .await
            .expect("add and promote 4");
        let voters: Vec<u64> = c
            .replica(leader)
            .metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        assert_eq!(voters, vec![1, 2, 3, 4]);
        let (job, index) = c.submit(T).await;
        c.wait_applied(index, T, "the new voter has the log").await;
        assert!(c.has_job(4, &job));

        // Remove the current leader: the others carry on with a new one.
        let leader = c.leader(T, "before removing").await;
        c.replica(leader)
            .remove_node(leader)
            .await
            .expect("remove the leader");
        c.stop(leader).await;
        let new = c.leader(T, "after removing the old leader").await;
        assert_ne!(new, leader);
        let voters: Vec<u64> = c
            .replica(new)
            .metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        assert_eq!(voters.len(), 3);
        assert!(!voters.contains(&leader));
        let (job, index) = c.submit(T).await;
        c.wait_applied(index, T, "after the removal").await;
        wait_for(T, "every member has the job", || async {
            c.running()
                .iter()
                .all(|id| c.has_job(*id, &job))
                .then_some(())
        })
        .await;
        c.assert_converged(T, "after membership changes").await;
        c.shutdown().await;
    })
}

//! Log compaction (Raft §7) and restarts: a replica that fell behind the leader's
//! purged log catches up through a snapshot; a replica restarted from its sled directory
//! rejoins with the same state; a whole cluster restarted keeps every committed write.

use std::time::Duration;

use raft_tests::{seed, simulate, wait_for, Cluster, ClusterOptions};

const T: Duration = Duration::from_secs(20);

fn compacting(n: u64) -> ClusterOptions {
    let mut o = ClusterOptions::voters(n);
    o.raft.snapshot_after_logs = 20;
    o.raft.logs_kept_after_snapshot = 5;
    o.raft.snapshot_chunk_bytes = 512;
    o
}

/// A replica that joins from nothing after the leader compacted its log cannot be brought
/// up to date from the log: it receives the snapshot (in 512-byte chunks here), then the
/// rest of the log.
#[test]
fn a_new_replica_catches_up_through_a_chunked_snapshot() {
    simulate(async {
        let mut c = Cluster::start(compacting(3), seed(6)).await;
        let mut acked = vec![];
        for _ in 0..80 {
            acked.push(c.submit(T).await.0);
        }
        let leader = c.leader(T, "after the writes").await;
        wait_for(T, "the leader to purge its log", || async {
            let m = c.replica(leader).metrics();
            m.purged
                .map(|p| p.index > 20)
                .unwrap_or(false)
                .then_some(())
        })
        .await;
        c.spawn_new(4).await;
        c.replica(leader)
            .add_node(4, "node-4".into(), true)
            .await
            .expect("add 4");
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "the new replica caught up").await;
        let m = c.replica(4).metrics();
        assert!(m.snapshot.is_some(), "the new replica installed a snapshot");
        for job in &acked {
            assert!(c.has_job(4, job));
        }
        c.assert_converged(T, "after snapshot catch-up").await;
        c.shutdown().await;
    })
}

#[test]
fn a_restarted_replica_rejoins_with_the_same_state() {
    simulate(async {
        let c = Cluster::start(compacting(3), seed(7)).await;
        for _ in 0..30 {
            c.submit(T).await;
        }
        let index = c.assert_converged(T, "before the restart").await;
        let leader = c.leader(T, "before the restart").await;
        let follower = c
            .running()
            .into_iter()
            .find(|id| *id != leader)
            .expect("follower");
        let (_, digest) = c.replica(follower).state.digest().await;
        c.stop(follower).await;
        c.restart(follower).await;
        // Right after restart, the replica has its snapshot plus the replayed log.
        wait_for(
            T,
            "the restarted replica to re-apply its own log",
            || async {
                let (applied, d) = c.replica(follower).state.digest().await;
                (applied == Some(index) && d == digest).then_some(())
            },
        )
        .await;
        c.submit(T).await;
        c.assert_converged(T, "after the restart").await;
        c.shutdown().await;
    })
}

#[test]
fn a_whole_cluster_restart_keeps_every_committed_write() {
    simulate(async {
        let c = Cluster::start(compacting(3), seed(8)).await;
        let mut acked = vec![];
        for _ in 0..45 {
            acked.push(c.submit(T).await.0);
        }
        let ids = c.running();
        for id in &ids {
            c.stop(*id).await;
        }
        for id in &ids {
            c.restart(*id).await;
        }
        c.leader(T, "after a full restart").await;
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "after a full restart").await;
        for id in c.running() {
            for job in &acked {
                assert!(
                    c.has_job(id, job),
                    "replica {id} lost {job} across a full restart"
                );
            }
        }
        c.assert_converged(T, "after a full restart").await;
        c.shutdown().await;
    })
}

/// A follower cut off while the others write and compact: when the link heals, the
/// entries it misses are gone from the leader's log, so it catches up from a snapshot.
#[test]
fn a_follower_cut_off_during_compaction_catches_up_by_snapshot() {
    simulate(async {
        let c = Cluster::start(compacting(3), seed(10)).await;
        let leader = c.leader(T, "start").await;
        let lagging = c
            .running()
            .into_iter()
            .find(|id| *id != leader)
            .expect("follower");
        c.isolate(lagging);
        let mut acked = vec![];
        for _ in 0..80 {
            acked.push(c.submit(T).await.0);
        }
        let leader = c.leader(T, "while one replica is cut off").await;
        wait_for(
            T,
            "the leader to purge past the cut-off follower",
            || async {
                let m = c.replica(leader).metrics();
                m.purged
                    .map(|p| p.index > 20)
                    .unwrap_or(false)
                    .then_some(())
            },
        )
        .await;
        c.heal();
        let index = c.submit(T).await.1;
        c.wait_applied(index, T, "the cut-off follower caught up")
            .await;
        assert!(
            c.replica(lagging).metrics().snapshot.is_some(),
            "it installed a snapshot"
        );
        for job in &acked {
            assert!(c.has_job(lagging, job));
        }
        c.assert_converged(T, "after the heal").await;
        c.shutdown().await;
    })
}

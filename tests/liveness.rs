//! Liveness under load, end to end: replication that fits its timeouts whatever the
//! size of the entries.

use std::time::Duration;

use dispatcher_testkit::spec::{big_job, sleep_job};
use dispatcher_testkit::ProcCluster;

const T: Duration = Duration::from_secs(30);
/// Each spec is about this long; a few of them exceed any one AppendEntries budget.
const SPEC_BYTES: usize = 3_200_000;

/// A follower killed while big entries are written, restarted behind by tens of
/// megabytes, catches up by itself with default flags and the leader keeps leading:
/// the leader sends one big entry per call instead of retrying the whole lag as one
/// call that never fits in the 50 ms AppendEntries timeout (the livelock of issue 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_by_big_entries_catches_up_without_elections() {
    let (mut c, client, leader) = ProcCluster::start_elected(3, T).await;
    for i in 0..3 {
        client
            .submit_job(None, big_job(&format!("before-{i}"), SPEC_BYTES))
            .await
            .expect("submit a big job");
    }
    let follower = if leader == 1 { 2 } else { 1 };
    c.kill(follower);
    for i in 0..8 {
        client
            .submit_job(None, big_job(&format!("behind-{i}"), SPEC_BYTES))
            .await
            .expect("submit a big job with a follower down");
    }
    let term_before = c.statuses(&client).await[&leader].term;

    c.spawn(follower);
    c.converged(&client, T, "the restarted follower caught up")
        .await;
    client
        .submit_job(None, sleep_job("after", 1))
        .await
        .expect("a submission after the catch-up");
    let statuses = c.statuses(&client).await;
    let now = statuses[&leader].clone();
    assert_eq!(
        now.leader_id, leader,
        "leadership moved while a follower caught up (term {term_before} -> {})",
        now.term
    );
    assert_eq!(
        now.term, term_before,
        "an election happened during the catch-up"
    );
}

/// Idle connections past `--max-connections` are closed as soon as they are accepted,
/// while the calls on connections already open (the client's, the peers') go on: a flood
/// of connections cannot exhaust the leader's file descriptors, which once made its Raft
/// core quit for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_bound_are_closed_and_the_leader_keeps_serving() {
    use tokio::io::AsyncReadExt;
    let c = ProcCluster::start_with(3, &["--max-connections", "64"]);
    let client = c.client();
    let leader = c.leader(&client, T, "a first leader").await;
    client
        .submit_job(None, sleep_job("before", 1))
        .await
        .expect("submit before the flood");
    let addr = c.endpoints()[(leader - 1) as usize].clone();
    let mut flood = vec![];
    for _ in 0..200 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            flood.push(s);
        }
    }
    // The newest ones are past the bound: the replica closed them.
    let mut closed = 0;
    for s in flood.iter_mut().rev().take(50) {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed > 0, "no connection past the bound of 64 was closed");
    // Writes through the connections opened before the flood go on.
    for i in 0..5 {
        client
            .submit_job(None, sleep_job(&format!("during-{i}"), 1))
            .await
            .expect("a submission during the flood");
    }
    drop(flood);
    c.converged(&client, T, "after the flood").await;
    assert_eq!(
        c.leader(&client, T, "after the flood").await,
        leader,
        "leadership moved during a connection flood"
    );
    assert!(
        c.log_of(leader).contains("refusing connections"),
        "the refusals were not logged"
    );
}

/// A TaskManager whose assignments add up to more than gRPC's default 4 MiB answer
/// still reads its heartbeat answers and runs them: two jobs of 3.2 MB queued before it
/// registers reach it in one answer of about 6.4 MB. Before, it failed to decode every
/// answer while the server, which saw its heartbeats, kept its lease: the jobs stayed
/// RUNNING forever (chaos seed 8 of the 2026-11-28 campaign).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_manager_reads_answers_larger_than_four_mebibytes() {
    use dispatcher_proto::v1::JobState;
    let (mut c, client, _) = ProcCluster::start_elected(3, T).await;
    let mut ids = Vec::new();
    for n in 0..2 {
        let job = client
            .submit_job(None, big_job(&format!("big-{n}"), SPEC_BYTES))
            .await
            .expect("a big submission");
        ids.push(job.job_id);
    }
    c.start_tm("tm-1", 8, &[]);
    for id in &ids {
        dispatcher_testkit::wait_for(T, "the big job finishes", || async {
            let job = client.get_job(id, false).await.ok()?;
            (job.state == JobState::Finished as i32).then_some(())
        })
        .await;
    }
}

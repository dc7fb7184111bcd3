//! End-to-end checks of what a replica writes to its log: a failure that Raft rides out
//! is a warning per peer, not a flood of errors; a clean stop logs no error.

use std::time::Duration;

use dispatcher_testkit::{wait_for, ProcCluster};

const T: Duration = Duration::from_secs(30);

/// The lines a replica logged after the first `skip`.
fn lines_after(c: &ProcCluster, id: u64, skip: usize) -> Vec<String> {
    c.log_of(id)
        .lines()
        .skip(skip)
        .map(str::to_string)
        .collect()
}

/// Whether a line is at ERROR, coloured or not (so that the check also holds against a
/// binary that writes colour codes to files).
fn is_error(line: &str) -> bool {
    line.contains(" ERROR ") || line.contains("\u{1b}[31mERROR")
}

/// With a follower killed, the leader logs it once as a WARN ("cannot reach peer"), and
/// calls that each meet the dead follower add no line. Before: every heartbeat retry
/// (2 a second) logged five openraft lines, one an ERROR, and every linearizable read
/// an ERROR "timeout while confirming leadership for read request"; ~14 lines a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_follower_costs_the_leader_one_warning_not_an_error_per_call() {
    let (mut c, _, leader) = ProcCluster::start_elected(3, T).await;
    let victim = *c
        .procs
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    let skip = c.log_of(leader).lines().count();
    c.kill(victim);

    wait_for(T, "the leader reacts to the dead follower", || async {
        (!lines_after(&c, leader, skip).is_empty()).then_some(())
    })
    .await;
    // Linearizable reads through the leader: each one asks every follower to confirm
    // the leadership, the dead one included.
    let addr = c.procs[&leader].addr.clone();
    let to_leader = c.client_for(&[&addr]);
    for _ in 0..20 {
        to_leader
            .list_task_managers(false)
            .await
            .expect("a read with a quorum of two");
    }

    let logged = lines_after(&c, leader, skip);
    let errors: Vec<&String> = logged.iter().filter(|l| is_error(l)).collect();
    assert!(errors.is_empty(), "errors: {errors:#?}");
    let peer = format!("peer={victim} ");
    assert!(
        logged
            .iter()
            .any(|l| l.contains("WARN") && l.contains("cannot reach peer") && l.contains(&peer)),
        "a warning names the dead follower: {logged:#?}"
    );
    // The warning about the dead follower; on a loaded machine perhaps one about a slow
    // live peer, or an election's lines. Not one line per call.
    assert!(logged.len() <= 5, "{} lines: {logged:#?}", logged.len());
    assert!(
        logged.iter().all(|l| !l.contains('\u{1b}')),
        "no colour codes in a file: {logged:#?}"
    );
}

/// SIGTERM to each replica in turn (a follower, then the leader, then the last one):
/// each exits 0, and no replica logs an ERROR, neither the one stopping nor the peers
/// that lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_logs_no_error_anywhere() {
    let (mut c, client, leader) = ProcCluster::start_elected(3, T).await;
    client
        .submit_job(None, dispatcher_testkit::spec::sleep_job("j", 1))
        .await
        .expect("submit");
    let mut order: Vec<u64> = c.procs.keys().copied().filter(|id| *id != leader).collect();
    order.insert(1, leader);
    for id in order {
        c.signal(id, "TERM");
        let status = c.wait_exit(id, T).expect("the replica exits after SIGTERM");
        assert!(status.success(), "replica {id}: {status:?}");
    }
    for id in c.procs.keys() {
        let log = c.log_of(*id);
        let errors: Vec<&str> = log.lines().filter(|l| is_error(l)).collect();
        assert!(errors.is_empty(), "replica {id}: {errors:#?}");
    }
}

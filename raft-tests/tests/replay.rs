//! The harness's promise: a seed replays a run. One seeded scenario (lossy links, a
//! leader killed and restarted) runs twice, each on a fresh runtime with fresh data
//! directories, as a rerun with `RAFT_TEST_SEED` would; the two traces must be equal,
//! message by message, role change by role change, down to the simulated millisecond.

use std::time::Duration;

use openraft::ServerState;
use raft_tests::{seed, simulate, Cluster, ClusterOptions, Event, Fate};

const T: Duration = Duration::from_secs(20);

/// What one run leaves behind: its trace and each replica's (id, applied index, digest).
type Run = (Vec<Event>, Vec<(u64, Option<u64>, String)>);

async fn scenario(seed: u64) -> Run {
    let c = Cluster::start(ClusterOptions::voters(5), seed).await;
    c.set_loss(20);
    for _ in 0..5 {
        c.submit(T).await;
    }
    let leader = c.leader(T, "before the kill").await;
    c.stop(leader).await;
    for _ in 0..5 {
        c.submit(T).await;
    }
    c.heal();
    c.restart(leader).await;
    let index = c.submit(T).await.1;
    c.wait_applied(index, T, "the killed leader is back").await;
    c.assert_converged(T, "end of the scenario").await;
    let mut digests = vec![];
    for id in c.running() {
        let (applied, digest) = c.replica(id).state.digest().await;
        digests.push((id, applied, digest));
    }
    c.shutdown().await;
    (c.trace().events(), digests)
}

#[test]
fn a_seed_replays_the_same_run() {
    let seed = seed(11);
    let (first, first_digests) = simulate(scenario(seed));
    let (second, second_digests) = simulate(scenario(seed));

    // The scenario must exercise what it claims to replay.
    assert!(
        first.iter().any(|e| matches!(
            e,
            Event::Message {
                fate: Fate::Dropped,
                ..
            }
        )),
        "the lossy links dropped nothing"
    );
    let leaders = first
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Role {
                    state: ServerState::Leader,
                    ..
                }
            )
        })
        .count();
    assert!(leaders >= 2, "the scenario elected {leaders} leader(s)");

    if let Some(i) = (0..first.len().max(second.len())).find(|i| first.get(*i) != second.get(*i)) {
        let around = |t: &[Event]| {
            let end = (i + 5).min(t.len());
            t[i.saturating_sub(5).min(end)..end].to_vec()
        };
        panic!(
            "seed {seed}: the runs diverge at event {i} of {}/{}:\nfirst:  {:#?}\nsecond: {:#?}",
            first.len(),
            second.len(),
            around(&first),
            around(&second)
        );
    }
    assert_eq!(
        first_digests, second_digests,
        "the runs end in other states"
    );
}

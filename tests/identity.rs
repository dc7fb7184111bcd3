//! End-to-end tests of who a replica is (issue 15): a wiped replica never starts a
//! second cluster nor rejoins with a lost log, `dispatchctl cluster replace-node` brings
//! it back, and a replica of another cluster is refused by the peers. Each test runs
//! the procedure of docs/operations.md, "Replace a replica".

use std::time::Duration;

use dispatcher_client::Client;
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::spec::sleep_job;
use dispatcher_testkit::{wait_for, ProcCluster};

const T: Duration = Duration::from_secs(30);

fn cluster_id(c: &ProcCluster, id: u64) -> String {
    let text = std::fs::read_to_string(c.data_dir(id).join("cluster-id")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("cluster-id "))
        .unwrap_or_default()
        .to_string()
}

async fn submit(client: &Client, prefix: &str, n: usize) {
    for i in 0..n {
        client
            .submit_job(None, sleep_job(&format!("{prefix}{i}"), 1))
            .await
            .expect("submit");
    }
}

/// Voters of the membership as `client` sees it; `None` when no replica answers (which
/// must not pass for "removed").
async fn voters(client: &Client) -> Option<Vec<u64>> {
    let status = client.cluster_status().await.ok()?;
    Some(
        status
            .membership
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect(),
    )
}

/// Kills replica `id`, empties its data directory and starts it again: it must refuse
/// with exit code 1 and an ERROR naming `replace-node`, without starting a cluster.
async fn wipe_and_expect_refusal(c: &mut ProcCluster, id: u64) {
    c.kill(id);
    std::fs::remove_dir_all(c.data_dir(id)).expect("wipe");
    let before = c.log_of(id).len();
    c.spawn(id);
    let status = c.wait_exit(id, T).expect("the wiped replica exits");
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = c.log_of(id)[before..].to_string();
    assert!(
        log.contains(&format!("dispatchctl cluster replace-node {id} ")),
        "{log}"
    );
    assert!(log.contains("ERROR"), "{log}");
    assert!(!log.contains("initialised a new cluster"), "{log}");
    assert!(
        cluster_id(c, id).is_empty(),
        "the refused replica drew no id"
    );
}

/// Runs the documented procedure: `dispatchctl cluster replace-node ID ADDR`, starting
/// the empty replica once its old voter is gone; ends with three voters and equal
/// digests.
async fn replace(c: &mut ProcCluster, id: u64, client: &Client) {
    let others: Vec<String> = c
        .procs
        .values()
        .filter(|p| p.id != id)
        .map(|p| p.addr.clone())
        .collect();
    let endpoints = others.join(",");
    let addr = c.procs[&id].addr.clone();
    let ctl = std::thread::spawn(move || {
        dispatcher_testkit::dispatchctl(
            &endpoints,
            "10",
            &[
                "cluster",
                "replace-node",
                &id.to_string(),
                &addr,
                "--wait",
                "60",
            ],
        )
    });
    let others_client = c.client_for(&others.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for(T, "the wiped voter to be removed", || async {
        voters(&others_client)
            .await
            .filter(|v| !v.contains(&id))
            .map(|_| ())
    })
    .await;
    // As an operator would: the same flags, and `existing`, since the cluster exists.
    let flags = c.extra_args.clone();
    c.extra_args.extend([
        "--initial-cluster-state".to_string(),
        "existing".to_string(),
    ]);
    c.spawn(id);
    c.extra_args = flags;
    let (code, out, err) = tokio::task::spawn_blocking(move || ctl.join().expect("dispatchctl"))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(&format!("replica {id} is a voter again")),
        "{err}"
    );
    wait_for(T, "three voters", || async {
        voters(client).await.filter(|v| v.len() == 3).map(|_| ())
    })
    .await;
    c.converged(client, T, "after replace-node").await;
}

/// A wiped follower restarted with its old id is refused with the replace command;
/// replace-node brings the cluster back to three voters with equal digests, and the
/// replica joins the cluster's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_is_refused_and_replace_node_brings_it_back() {
    let (mut c, client, leader) = ProcCluster::start_elected(3, T).await;
    submit(&client, "before", 5).await;
    c.converged(&client, T, "before the wipe").await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let id = cluster_id(&c, leader);
    assert_eq!(id.len(), 32, "the cluster has an id");

    wipe_and_expect_refusal(&mut c, follower).await;
    replace(&mut c, follower, &client).await;
    submit(&client, "after", 3).await;
    c.converged(&client, T, "after new writes").await;
    assert_one_cluster_id(&c, &id);
}

/// Every replica still holds the cluster id `id`.
fn assert_one_cluster_id(c: &ProcCluster, id: &str) {
    for r in 1..=3 {
        assert_eq!(cluster_id(c, r), id, "replica {r} keeps the one cluster id");
    }
}

/// A wiped bootstrapper (replica 1, the lowest id of the same --initial-cluster) never
/// starts a second cluster: it refuses with the replace command while the others keep
/// their one cluster id, and replace-node brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_bootstrapper_never_starts_a_second_cluster() {
    let (mut c, client, _) = ProcCluster::start_elected(3, T).await;
    submit(&client, "before", 5).await;
    c.converged(&client, T, "before the wipe").await;
    let id = cluster_id(&c, 1);
    assert_eq!(id.len(), 32);

    wipe_and_expect_refusal(&mut c, 1).await;
    assert_eq!(cluster_id(&c, 2), id);
    assert_eq!(cluster_id(&c, 3), id);
    replace(&mut c, 1, &client).await;
    assert_one_cluster_id(&c, &id);
}

/// A replica started on another cluster's data directory (same cluster name, same id)
/// is refused by the peers, and refuses them: both sides log the mismatch, the cluster
/// keeps serving and its digest never changes through that replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_cluster_is_refused_by_the_peers() {
    let mut a = ProcCluster::start_plain(3, &[]);
    let mut b = ProcCluster::start_plain(3, &[]);
    let (client_a, client_b) = (a.client(), b.client());
    a.leader(&client_a, T, "cluster a").await;
    b.leader(&client_b, T, "cluster b").await;
    submit(&client_a, "a", 3).await;
    submit(&client_b, "b", 1).await;
    b.converged(&client_b, T, "cluster b").await;
    let (id_a, id_b) = (cluster_id(&a, 1), cluster_id(&b, 1));
    assert!(id_a.len() == 32 && id_b.len() == 32 && id_a != id_b);
    for r in 1..=3 {
        b.kill(r);
    }

    // Replica 3 of cluster a restarts on cluster b's replica 3's data, reaching a's
    // replicas 1 and 2 at b's ids.
    a.kill(3);
    std::fs::remove_dir_all(a.data_dir(3)).expect("remove");
    copy_dir(b.data_dir(3), a.data_dir(3));
    let peers = format!("1={},2={}", a.procs[&1].addr, a.procs[&2].addr);
    a.extra_args.extend(["--peer-addresses".to_string(), peers]);
    a.spawn(3);

    let leader = leader_among(&a, &client_a, &[1, 2]).await;
    let refused = format!("replica 3 belongs to cluster {id_b}, this replica to cluster {id_a}");
    wait_for(T, "the peers to refuse the stranger", || async {
        (a.log_of(1).contains(&refused) || a.log_of(2).contains(&refused)).then_some(())
    })
    .await;
    let refusing = format!("belongs to cluster {id_a}, this replica to cluster {id_b}");
    wait_for(T, "the stranger to refuse the cluster", || async {
        a.log_of(3).contains(&refusing).then_some(())
    })
    .await;
    // Cluster a goes on with its two replicas; the stranger keeps b's id and data.
    submit(&client_a, "more", 2).await;
    assert_eq!(cluster_id(&a, 3), id_b);
    assert_eq!((cluster_id(&a, 1), cluster_id(&a, 2)), (id_a.clone(), id_a));
    let statuses = a.statuses_with(&client_a, true).await;
    let (one, two) = (&statuses[&1], &statuses[&2]);
    assert_eq!(one.leader_id, leader);
    if one.applied_index == two.applied_index {
        assert_eq!(one.state_digest, two.state_digest);
    }
    if let Some(stranger) = statuses.get(&3) {
        assert_ne!(stranger.leader_id, leader, "{stranger:?}");
    }
}

async fn leader_among(c: &ProcCluster, client: &Client, ids: &[u64]) -> u64 {
    wait_for(T, "a leader among the cluster's own replicas", || async {
        let s = c.statuses(client).await;
        ids.iter()
            .filter_map(|id| s.get(id))
            .find(|r| r.role == pb::ReplicaRole::Leader as i32)
            .map(|r| r.id)
    })
    .await
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

//! End-to-end tests of the `dispatcher` binary: three replica processes on loopback,
//! killed with SIGKILL and restarted from their data directories.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_client::{new_job_id, Client};
use dispatcher_testkit::cluster::dispatcher_bin;
use dispatcher_testkit::signal::kill_child;
use dispatcher_testkit::spec::sleep_job;
use dispatcher_testkit::{wait_blocking, ProcCluster};

const T: Duration = Duration::from_secs(30);

/// Submits `n` one-task sleep jobs `j0`, `j1`, ... and returns their ids.
async fn submit_sleep_jobs(client: &Client, n: usize) -> Vec<String> {
    let mut ids = vec![];
    for i in 0..n {
        let job = sleep_job(&format!("j{i}"), 1);
        ids.push(client.submit_job(None, job).await.expect("submit").job_id);
    }
    ids
}

/// A new cluster takes its resource limits from its first leader's flags: a job past
/// `--max-jobs` is RESOURCE_EXHAUSTED naming the limit and the use, a restart delay below
/// `--min-restart-delay-ms` is INVALID_ARGUMENT naming the field, and a job that ends
/// makes room for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_enforces_the_resource_limits_of_its_flags() {
    use dispatcher_testkit::spec::{sleep, JobBuilder};
    let c = ProcCluster::start_plain(1, &["--max-jobs", "2", "--min-restart-delay-ms", "1000"]);
    let client = c.client();
    c.leader(&client, T, "startup").await;
    let too_fast = || {
        JobBuilder::new("too-fast")
            .vertex("work", 1, sleep(60_000))
            .fixed_delay_restarts(3, 999)
            .build()
    };
    // The limits commit just after the first election; a probe admitted before that is
    // cancelled again, and an ended job does not count.
    let refusal = dispatcher_testkit::wait_for(T, "the limits to apply", || async {
        match client.submit_job(None, too_fast()).await {
            Ok(r) => {
                client
                    .cancel_job(&r.job_id)
                    .await
                    .expect("cancel the probe");
                None
            }
            Err(e) => Some(e),
        }
    })
    .await;
    assert_eq!(
        refusal.code(),
        Some(tonic::Code::InvalidArgument),
        "{refusal}"
    );
    assert!(
        refusal.to_string().contains(
            "spec.restart_strategy.fixed_delay.delay_ms: must be at least 1000 (cluster limit min_restart_delay_ms)"
        ),
        "{refusal}"
    );

    let first = client
        .submit_job(None, sleep_job("a", 1))
        .await
        .expect("first job");
    client
        .submit_job(None, sleep_job("b", 1))
        .await
        .expect("second job");
    let full = client
        .submit_job(None, sleep_job("c", 1))
        .await
        .expect_err("a third job is past --max-jobs 2");
    assert_eq!(full.code(), Some(tonic::Code::ResourceExhausted), "{full}");
    let msg = full.to_string();
    assert!(
        msg.contains("max_jobs = 2 jobs") && msg.contains("use 2"),
        "{msg}"
    );

    client.cancel_job(&first.job_id).await.expect("cancel");
    client
        .submit_job(None, sleep_job("c", 1))
        .await
        .expect("an ended job makes room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_elects_another_and_the_old_one_rejoins() {
    let (mut c, client, first) = ProcCluster::start_elected(3, T).await;
    let before = client
        .submit_job(None, sleep_job("before", 1))
        .await
        .expect("submit");

    c.kill(first);
    let second = c.leader(&client, T, "after kill -9 of the leader").await;
    assert_ne!(first, second);
    // The followers saw the leader's process die (its connection closed, its port
    // refused) and stood at once, not after the lease and an election timeout.
    assert!(
        c.log_of(second).contains("port refuses connections"),
        "the new leader stood because the leader's process died:\n{}",
        c.log_of(second)
    );
    let after = client
        .submit_job(None, sleep_job("after", 1))
        .await
        .expect("submit after failover");

    c.spawn(first);
    c.leader(&client, T, "after the old leader restarted").await;
    let (index, _) = c.converged(&client, T, "the old leader caught up").await;
    assert!(index > 0);
    for id in [&before.job_id, &after.job_id] {
        let job = client.get_job(id, false).await.expect("job survives");
        assert_eq!(&job.job_id, id);
    }
    assert!(
        c.log_of(first).contains("restarting from existing data"),
        "a restart must not re-initialise"
    );
}

/// Every submission acknowledged before, during and after a `kill -9` of the leader in
/// the middle of a stream of writes is present afterwards, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_loses_no_acknowledged_write() {
    let (mut c, client, leader) = ProcCluster::start_elected(3, T).await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = new_job_id();
                let r = client
                    .submit_job(Some(id.clone()), sleep_job("stream", 1))
                    .await;
                let r = r.expect("the client library retries through the failover");
                assert_eq!(r.job_id, id);
                acked.lock().expect("acked").push(id);
            }
        })
    };
    dispatcher_testkit::wait_for(T, "some writes before the kill", || async {
        (acked.lock().expect("acked").len() >= 20).then_some(())
    })
    .await;
    c.kill(leader);
    let at_kill = acked.lock().expect("acked").len();
    dispatcher_testkit::wait_for(T, "writes after the kill", || async {
        (acked.lock().expect("acked").len() >= at_kill + 20).then_some(())
    })
    .await;
    c.spawn(leader);
    c.leader(&client, T, "the killed replica is back").await;
    dispatcher_testkit::wait_for(T, "writes after the restart", || async {
        (acked.lock().expect("acked").len() >= at_kill + 40).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    c.converged(&client, T, "after the stream").await;

    let acked = acked.lock().expect("acked").clone();
    let listed = client
        .list_all_jobs(Default::default())
        .await
        .expect("list");
    let listed_ids: std::collections::BTreeSet<&str> =
        listed.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(listed.len(), listed_ids.len(), "no job listed twice");
    for id in &acked {
        assert!(
            listed_ids.contains(id.as_str()),
            "acknowledged job {id} was lost"
        );
    }
    // Every replica, read locally, has every acknowledged job.
    for p in c.procs.values() {
        let one = c.client_for(&[&p.addr]);
        for id in acked.iter().step_by(7) {
            one.get_job(id, true)
                .await
                .unwrap_or_else(|e| panic!("replica {} lost {id}: {e}", p.id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_keeps_every_job() {
    let (mut c, client, _) = ProcCluster::start_elected(3, T).await;
    let ids = submit_sleep_jobs(&client, 10).await;
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.leader(&client, T, "after a full restart").await;
    for id in &ids {
        client
            .get_job(id, false)
            .await
            .expect("job survived a full restart");
    }
    c.converged(&client, T, "after a full restart").await;
}

fn run_dispatcher(args: &[&str]) -> std::process::Output {
    std::process::Command::new(dispatcher_bin())
        .args(args)
        .env("DISPATCHER_LOG", "error")
        .output()
        .expect("run dispatcher")
}

#[test]
fn bad_configuration_exits_non_zero_with_a_clear_message() {
    let out = run_dispatcher(&["--listen", "127.0.0.1:1", "--data-dir", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run_dispatcher(&[
        "--id",
        "1",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
        "/tmp/x",
        "--initial-cluster",
        "1=nohostport",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--initial-cluster"));

    let out = run_dispatcher(&[
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "/proc/forbidden/data",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/proc/forbidden/data") && err.contains("not writable"),
        "{err}"
    );
}

#[test]
fn a_data_directory_of_another_cluster_or_replica_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let data = data.to_str().expect("utf-8 path");
    let port = dispatcher_testkit::free_ports(1).expect("a free port")[0].to_string();
    let listen = format!("127.0.0.1:{port}");
    let log = dir.path().join("alpha.log");
    let mut child = std::process::Command::new(dispatcher_bin())
        .args([
            "--id",
            "1",
            "--listen",
            &listen,
            "--data-dir",
            data,
            "--cluster-name",
            "alpha",
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    // Wait until the replica has started on its new directory, then stop it.
    let started = wait_blocking(T, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("replica started")
    });
    assert!(started, "the replica never started");
    kill_child(&mut child);

    let out = run_dispatcher(&[
        "--id",
        "1",
        "--listen",
        &listen,
        "--data-dir",
        data,
        "--cluster-name",
        "beta",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alpha") && err.contains("beta"), "{err}");

    let out = run_dispatcher(&[
        "--id",
        "2",
        "--listen",
        &listen,
        "--data-dir",
        data,
        "--cluster-name",
        "alpha",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node 1"));
}

/// Disaster recovery: a backup saved from one cluster seeds a new cluster with the same
/// state (same digest), and the restored cluster takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_new_cluster() {
    // In plain text: the point is the digest, and secured clusters each have their own
    // bootstrap token, which a restore keeps beside the backup's (see the state tests).
    let a = ProcCluster::start_plain(3, &[]);
    let client = a.client();
    a.leader(&client, T, "cluster a").await;
    let ids = submit_sleep_jobs(&client, 5).await;
    client.cancel_job(&ids[0]).await.expect("cancel");
    // The first leader sets the resource limits from its flags once it leads; a backup
    // taken before that lacks them, and the restored cluster would then add its own,
    // giving another digest. Back up the state with its limits.
    dispatcher_testkit::wait_for(T, "the resource limits to be set", || async {
        (1..=3)
            .any(|id| a.log_of(id).contains("set the cluster's resource limits"))
            .then_some(())
    })
    .await;
    let keep = tempfile::tempdir().expect("tempdir");
    let backup_file = keep.path().join("backup.bin");
    let follower = a.follower_addr(a.leader(&client, T, "before the backup").await);
    let out = std::process::Command::new(dispatcher_testkit::bin("dispatchctl"))
        .args(["--endpoints", &follower, "cluster", "snapshot", "save"])
        .arg(&backup_file)
        .output()
        .expect("dispatchctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backup = dispatcher_core::backup::Backup::read(&backup_file).expect("a valid backup");
    drop(a);

    // A damaged copy is refused before anything starts: exit 1, naming the file.
    let damaged = keep.path().join("damaged.bin");
    let mut bytes = std::fs::read(&backup_file).expect("backup");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x08;
    std::fs::write(&damaged, &bytes).expect("write");
    let fresh = keep.path().join("fresh");
    let out = run_dispatcher(&[
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        fresh.to_str().expect("utf-8"),
        "--initial-cluster",
        "1=127.0.0.1:1",
        "--restore",
        damaged.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(damaged.to_str().expect("utf-8")) && err.contains("checksum mismatch"),
        "{err}"
    );

    let file = backup_file.to_str().expect("utf-8");
    let b = ProcCluster::start_plain_custom(3, &[], &["--restore", file]);
    let client = b.client();
    b.leader(&client, T, "the restored cluster").await;
    for id in &ids {
        dispatcher_testkit::wait_for(T, "the restored job", || async {
            client.get_job(id, false).await.ok()
        })
        .await;
    }
    assert_eq!(
        client.get_job(&ids[0], false).await.expect("job").state,
        dispatcher_proto::v1::JobState::Canceled as i32
    );
    let (_, digest) = b.converged(&client, T, "the restored cluster").await;
    assert_eq!(
        digest, backup.digest,
        "the restored state is the backed-up state"
    );
    client
        .submit_job(None, sleep_job("after-restore", 1))
        .await
        .expect("the restored cluster takes writes");
}

#[test]
fn restore_is_refused_on_a_non_bootstrapping_replica() {
    let out = run_dispatcher(&[
        "--id",
        "2",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
        "/tmp/never",
        "--initial-cluster",
        "1=127.0.0.1:1,2=127.0.0.1:2",
        "--restore",
        "/tmp/x.bin",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--restore"));
}

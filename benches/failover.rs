//! Failover time of a three-replica cluster of real `dispatcher` processes on loopback,
//! with the default timeouts (heartbeat 50 ms, election timeout 150-300 ms).
//!
//! Each trial runs four concurrent submitters through the client library, kills the
//! leader with SIGKILL, and measures (a) the time until the survivors agree on a new
//! leader and (b) the time until the first submission *started after the kill* is
//! acknowledged. The killed replica is restarted and caught up between trials.
//!
//! A second series measures TaskManager failover: two TaskManagers, a job of four
//! long-running tasks bin-packed onto one of them (fixed-delay restart, no delay), SIGKILL
//! of that TaskManager, and the time until every task is RUNNING on the other one. That
//! time is dominated by the TaskManager lease (4 s): the leader must first conclude the
//! TaskManager is gone.
//!
//! Run with `make bench` (or `cargo bench --bench failover`); `FAILOVER_TRIALS` sets the
//! number of trials (default 7).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{sleep_job, ProcCluster};
use dispatcher::client::new_job_id;

const T: Duration = Duration::from_secs(30);

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let trials: usize = std::env::var("FAILOVER_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut c = ProcCluster::start_with(3, &[]);
        let client = c.client();
        c.leader(&client, T, "startup").await;
        let mut elected = vec![];
        let mut acked = vec![];
        for trial in 0..trials {
            let leader = c.leader(&client, T, "before the trial").await;
            // (start, end) of every acknowledged submission.
            let log: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writers: Vec<_> = (0..4)
                .map(|_| {
                    let (client, log, stop) = (client.clone(), log.clone(), stop.clone());
                    tokio::spawn(async move {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let start = Instant::now();
                            if client.submit_job(Some(new_job_id()), sleep_job("failover", 1)).await.is_ok() {
                                log.lock().expect("log").push((start, Instant::now()));
                            }
                        }
                    })
                })
                .collect();
            common::wait_for(T, "a steady stream", || async { (log.lock().expect("log").len() > 50).then_some(()) }).await;
            let t0 = Instant::now();
            c.kill(leader);
            let new_leader = common::wait_for(T, "a new agreed leader", || async {
                let s = c.statuses(&client).await;
                let l = s.values().find(|r| r.role == dispatcher::proto::v1::ReplicaRole::Leader as i32)?.id;
                (l != leader && s.values().all(|r| r.leader_id == l)).then_some(Instant::now())
            })
            .await;
            let first_ack = common::wait_for(T, "a submission started after the kill to be acknowledged", || async {
                log.lock().expect("log").iter().filter(|(s, _)| *s >= t0).map(|(_, e)| *e).min()
            })
            .await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for w in writers {
                let _ = w.await;
            }
            let (e, a) = (new_leader - t0, first_ack - t0);
            println!("trial {trial}: new leader agreed after {:>7.1} ms, next acknowledged submission after {:>7.1} ms", ms(e), ms(a));
            elected.push(e);
            acked.push(a);
            c.spawn(leader);
            c.converged(&client, T, "the killed replica caught up").await;
        }
        println!(
            "failover over {trials} trials (kill -9 of the leader): new leader median {:.1} ms (min {:.1}, max {:.1}); next acknowledged submission median {:.1} ms (min {:.1}, max {:.1})",
            ms(median(&mut elected)), ms(elected[0]), ms(elected[elected.len() - 1]),
            ms(median(&mut acked)), ms(acked[0]), ms(acked[acked.len() - 1]),
        );

        // TaskManager failover, on a fresh cluster (the one above is full of queued jobs).
        drop(c);
        let mut c = ProcCluster::start_with(3, &[]);
        let client = c.client();
        c.leader(&client, T, "startup").await;
        c.start_tm("tm-a", 4, &[]);
        c.start_tm("tm-b", 4, &[]);
        common::wait_for(T, "both TaskManagers registered", || async {
            (client.list_task_managers(false).await.ok()?.len() == 2).then_some(())
        })
        .await;
        let mut moved = vec![];
        for trial in 0..trials {
            let spec = dispatcher::proto::v1::JobSpec {
                name: "tm-failover".into(),
                vertices: vec![dispatcher::proto::v1::Vertex {
                    name: "work".into(),
                    parallelism: 4,
                    task: Some(dispatcher::proto::v1::Task {
                        kind: Some(dispatcher::proto::v1::task::Kind::Sleep(dispatcher::proto::v1::SleepTask { duration_ms: 600_000 })),
                    }),
                    node_selector: Default::default(),
                }],
                restart_strategy: Some(dispatcher::proto::v1::RestartStrategy {
                    kind: Some(dispatcher::proto::v1::restart_strategy::Kind::FixedDelay(
                        dispatcher::proto::v1::FixedDelayRestart { attempts: 10, delay_ms: 0 },
                    )),
                }),
                placement_strategy: dispatcher::proto::v1::PlacementStrategy::BinPack as i32,
                ..Default::default()
            };
            let id = client.submit_job(None, spec).await.expect("submit").job_id;
            let running = |j: &dispatcher::proto::v1::JobStatus| {
                j.tasks.iter().all(|t| t.state == dispatcher::proto::v1::TaskState::Running as i32)
            };
            let job = common::wait_for(T, "tasks running", || async {
                let j = client.get_job(&id, false).await.ok()?;
                running(&j).then_some(j)
            })
            .await;
            let victim = job.tasks[0].task_manager_id.clone();
            let t0 = Instant::now();
            c.kill_tm(&victim);
            common::wait_for(T, "tasks running on the other TaskManager", || async {
                let j = client.get_job(&id, false).await.ok()?;
                (running(&j) && j.tasks.iter().all(|t| t.task_manager_id != victim)).then_some(())
            })
            .await;
            let d = t0.elapsed();
            println!("tm trial {trial}: tasks of the killed TaskManager RUNNING elsewhere after {:>7.1} ms", ms(d));
            moved.push(d);
            client.cancel_job(&id).await.expect("cancel");
            c.respawn_tm(&victim);
            common::wait_for(T, "the TaskManager is back", || async {
                (client.list_task_managers(false).await.ok()?.len() == 2).then_some(())
            })
            .await;
        }
        println!(
            "TaskManager failover over {trials} trials (kill -9, 4 s lease): tasks RUNNING elsewhere median {:.1} ms (min {:.1}, max {:.1})",
            ms(median(&mut moved)), ms(moved[0]), ms(moved[moved.len() - 1]),
        );
    });
}

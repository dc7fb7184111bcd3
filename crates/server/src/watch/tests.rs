//! The registry against a real state-machine store: commands go through `apply` (which
//! notes the changed jobs) and snapshots through `install_snapshot`, as on a replica.

use std::io::Cursor;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};

use super::*;
use crate::raft::sm_store::StateMachineStore;
use crate::raft::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use dispatcher_core::state::{ClusterConfig, Command, JobSpec, TaskManagerSpec, TaskSpec};

struct Fixture {
    sm: StateMachineStore,
    index: u64,
    _dir: tempfile::TempDir,
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn job(n: u8) -> JobId {
    JobId::parse(&format!("00000000-0000-4000-8000-0000000000{n:02}")).expect("uuid")
}

fn submit(id: &JobId, slots: u32) -> Command {
    Command::SubmitJob {
        job_id: id.clone(),
        spec: JobSpec::single_vertex("j", "v", slots, TaskSpec::Sleep { duration_ms: 1 }),
        now: 1,
    }
}

fn cancel(id: &JobId) -> Command {
    Command::CancelJob {
        job_id: id.clone(),
        now: 2,
    }
}

fn register(id: &str, slots: u32, labels: &[(&str, &str)]) -> Command {
    Command::RegisterTaskManager {
        spec: TaskManagerSpec {
            id: id.into(),
            instance: "i1".into(),
            address: String::new(),
            slots,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        },
        now: 1,
    }
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm = StateMachineStore::open(dir.path(), ClusterConfig::default())
            .await
            .expect("open");
        Fixture {
            sm,
            index: 0,
            _dir: dir,
        }
    }

    /// Applies `commands` as one batch of entries.
    async fn apply(&mut self, commands: Vec<Command>) {
        let entries: Vec<openraft::Entry<TypeConfig>> = commands
            .into_iter()
            .map(|cmd| {
                self.index += 1;
                openraft::Entry {
                    log_id: log_id(self.index),
                    payload: EntryPayload::Normal(cmd),
                }
            })
            .collect();
        for applied in self.sm.apply(entries).await.expect("apply") {
            if let crate::raft::Applied::Command(r) = applied {
                r.expect("accepted");
            }
        }
    }

    fn registry(&self, limits: Limits) -> Arc<Registry> {
        Registry::new(self.sm.shared(), limits)
    }
}

fn watch_job(r: &Arc<Registry>, id: &JobId) -> (Permit, Subscription) {
    let permit = r.reserve().expect("within the total bound");
    let sub = r.subscribe(&permit, id).expect("subscribed");
    (permit, sub)
}

fn view(sub: &Subscription) -> Arc<JobView> {
    match &*sub.rx.borrow() {
        View::Job(v) => v.clone(),
        View::Purged => panic!("the job is there"),
    }
}

/// The watcher's next item, failing the test instead of hanging when none comes.
async fn next(w: &mut Watcher) -> Option<Result<Arc<JobView>, End>> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the watcher is sent something within 10 s")
}

fn state_of(v: &JobView) -> pb::JobState {
    pb::JobState::try_from(v.status().state).expect("a state")
}

#[tokio::test]
async fn all_watchers_of_a_job_share_one_conversion_per_change() {
    let mut f = Fixture::new().await;
    let a = job(1);
    f.apply(vec![submit(&a, 2)]).await;
    let r = f.registry(Limits::default());
    let watchers: Vec<_> = (0..5).map(|_| watch_job(&r, &a)).collect();
    assert_eq!(r.conversions(), 1, "the first view is converted once");
    let first = view(&watchers[0].1);
    assert!(watchers.iter().all(|(_, s)| Arc::ptr_eq(&view(s), &first)));
    assert_eq!(state_of(&first), pb::JobState::Created);

    f.apply(vec![cancel(&a)]).await;
    r.refresh();
    assert_eq!(
        r.conversions(),
        2,
        "one conversion for the change, not one per watcher"
    );
    let changed = view(&watchers[0].1);
    assert_eq!(state_of(&changed), pb::JobState::Canceled);
    assert_eq!(changed.index(), 2);
    for (_, s) in &watchers {
        assert!(s.rx.has_changed().expect("open"), "every watcher is woken");
        assert!(Arc::ptr_eq(&view(s), &changed), "and shares the same view");
    }
    // The event carries the spec converted when the entry was made.
    let event = changed.event(true);
    assert_eq!(event.applied_index, 2);
    let spec = event.job.and_then(|j| j.spec).expect("a spec");
    assert_eq!(spec.vertices.len(), 1);
}

#[tokio::test]
async fn a_change_of_another_job_converts_nothing_and_wakes_no_watcher() {
    let mut f = Fixture::new().await;
    let (placed, queued, other) = (job(1), job(2), job(3));
    // `placed` runs; `queued` waits for slots (its reason cannot change while the
    // cluster stays this small); `other` is not watched.
    f.apply(vec![
        register("tm-1", 4, &[]),
        submit(&placed, 2),
        submit(&queued, 100),
        submit(&other, 2),
    ])
    .await;
    let r = f.registry(Limits::default());
    let w_placed = watch_job(&r, &placed);
    let w_queued = watch_job(&r, &queued);
    assert_eq!(
        state_of(&view(&w_placed.1)),
        pb::JobState::Running,
        "placed"
    );
    assert!(!view(&w_queued.1).status().pending_reason.is_empty());
    assert_eq!(r.conversions(), 2);

    f.apply(vec![cancel(&other)]).await;
    f.apply(vec![submit(&job(4), 1)]).await;
    r.refresh();
    assert_eq!(
        r.conversions(),
        2,
        "no watched job changed: nothing converted"
    );
    assert!(!w_placed.1.rx.has_changed().expect("open"));
    assert!(!w_queued.1.rx.has_changed().expect("open"));

    f.apply(vec![cancel(&placed)]).await;
    r.refresh();
    assert_eq!(r.conversions(), 3, "only the changed job is converted");
    assert!(w_placed.1.rx.has_changed().expect("open"));
    assert!(!w_queued.1.rx.has_changed().expect("open"));
}

#[tokio::test]
async fn watchers_of_a_queued_job_see_its_reason_change_without_a_change_of_the_job() {
    let mut f = Fixture::new().await;
    let id = job(1);
    let mut spec = JobSpec::single_vertex("gpu", "trainer", 2, TaskSpec::Sleep { duration_ms: 1 });
    spec.vertices[0]
        .node_selector
        .insert("gpu".into(), "true".into());
    f.apply(vec![Command::SubmitJob {
        job_id: id.clone(),
        spec,
        now: 2,
    }])
    .await;
    let r = f.registry(Limits::default());
    let (_p, mut sub) = watch_job(&r, &id);
    assert_eq!(
        view(&sub).status().pending_reason,
        "needs 2 slots; no TaskManager is registered"
    );
    sub.rx.borrow_and_update();
    // Only the reason changes: still a change the watcher is sent.
    f.apply(vec![register("tm-1", 2, &[])]).await;
    r.refresh();
    assert!(sub.rx.has_changed().expect("open"));
    let waiting = view(&sub);
    sub.rx.borrow_and_update();
    assert_eq!(state_of(&waiting), pb::JobState::Created);
    assert_eq!(
        waiting.status().pending_reason,
        "vertex 'trainer' needs 2 slots with gpu=true; 0 TaskManagers match"
    );
    f.apply(vec![register("tm-gpu", 2, &[("gpu", "true")])])
        .await;
    r.refresh();
    let placed = view(&sub);
    assert_eq!(state_of(&placed), pb::JobState::Running);
    assert_eq!(placed.status().pending_reason, "");
    // Placed: no longer looked at after every batch.
    let before = r.conversions();
    f.apply(vec![register("tm-2", 2, &[])]).await;
    r.refresh();
    assert_eq!(r.conversions(), before);
}

#[tokio::test]
async fn watchers_are_bounded_per_job_and_in_total_and_the_bounds_are_named() {
    let mut f = Fixture::new().await;
    let (a, b) = (job(1), job(2));
    f.apply(vec![submit(&a, 1), submit(&b, 1)]).await;
    let r = f.registry(Limits {
        per_job: 2,
        total: 3,
    });
    let w1 = watch_job(&r, &a);
    let _w2 = watch_job(&r, &a);
    let permit = r.reserve().expect("a third place in all");
    let refused = r
        .subscribe(&permit, &a)
        .err()
        .expect("a third watcher of a");
    assert_eq!(
        refused,
        Refused::PerJob {
            job: a.clone(),
            limit: 2
        }
    );
    assert!(refused.to_string().contains("--max-watchers-per-job"));
    let _w3 = r
        .subscribe(&permit, &b)
        .expect("another job is within its bound");
    let refused = r.reserve().err().expect("a fourth watcher in all");
    assert_eq!(refused, Refused::Total { limit: 3 });
    assert!(refused.to_string().contains("--max-watchers "));
    drop(w1);
    let _again = watch_job(&r, &a);
}

#[tokio::test]
async fn the_entry_goes_with_its_last_watcher_and_the_job_is_no_longer_noted() {
    let mut f = Fixture::new().await;
    let a = job(1);
    f.apply(vec![submit(&a, 1)]).await;
    let r = f.registry(Limits::default());
    let watchers: Vec<_> = (0..3).map(|_| watch_job(&r, &a)).collect();
    assert_eq!(r.counts(), (1, 3));
    drop(watchers);
    assert_eq!(r.counts(), (0, 0));
    f.apply(vec![cancel(&a)]).await;
    assert_eq!(
        f.sm.shared().take_watched_changes(),
        crate::raft::sm_store::JobChanges::default(),
        "an unwatched job's changes are not kept"
    );
    // A new watcher reads the job afresh.
    let (_p, sub) = watch_job(&r, &a);
    assert_eq!(state_of(&view(&sub)), pb::JobState::Canceled);
}

#[tokio::test]
async fn a_watch_sends_the_current_status_then_each_change_and_ends_after_a_terminal_one() {
    let mut f = Fixture::new().await;
    let a = job(1);
    f.apply(vec![register("tm-1", 1, &[]), submit(&a, 1)]).await;
    let r = f.registry(Limits::default());
    let (_stop_tx, stop) = watch::channel(false);
    let (permit, sub) = watch_job(&r, &a);
    let mut w = Watcher::new(permit, sub, stop);
    let first = next(&mut w).await.expect("a first view").expect("the job");
    assert_eq!(state_of(&first), pb::JobState::Running);
    f.apply(vec![cancel(&a)]).await;
    r.refresh();
    let change = next(&mut w).await.expect("a change").expect("the job");
    assert_eq!(state_of(&change), pb::JobState::Cancelling);
    assert!(change.index() > first.index());
    f.apply(vec![Command::ReportTaskState {
        task_manager: "tm-1".into(),
        instance: "i1".into(),
        reports: vec![dispatcher_core::state::TaskReport {
            job: a.clone(),
            key: dispatcher_core::state::TaskKey {
                vertex: 0,
                subtask: 0,
            },
            attempt: 1,
            state: dispatcher_core::state::TaskState::Canceled,
            exit_code: None,
            reason: String::new(),
        }],
        now: 3,
    }])
    .await;
    r.refresh();
    let last = next(&mut w).await.expect("a change").expect("the job");
    assert_eq!(state_of(&last), pb::JobState::Canceled);
    assert!(
        next(&mut w).await.is_none(),
        "the watch ends after a terminal view"
    );
    drop(w);
    assert_eq!(r.counts(), (0, 0));
}

#[tokio::test]
async fn a_purged_job_ends_its_watches_and_cannot_be_watched_again() {
    let mut f = Fixture::new().await;
    let a = job(1);
    f.apply(vec![submit(&a, 1)]).await;
    let r = f.registry(Limits::default());
    let (_stop_tx, stop) = watch::channel(false);
    let (permit, sub) = watch_job(&r, &a);
    let (_p2, sub2) = watch_job(&r, &a);
    let mut w = Watcher::new(permit, sub, stop);
    next(&mut w).await.expect("a first view").expect("the job");
    // Canceled and purged before the registry looked: the watcher sees it gone.
    let retention = ClusterConfig::default().finished_job_retention_ms;
    f.apply(vec![
        cancel(&a),
        Command::PurgeFinishedJobs {
            now: 10 + retention,
        },
    ])
    .await;
    r.refresh();
    assert_eq!(next(&mut w).await.expect("an end").err(), Some(End::Purged));
    assert!(next(&mut w).await.is_none());
    let permit = r.reserve().expect("a place");
    assert_eq!(
        r.subscribe(&permit, &a).err(),
        Some(Refused::Unknown(a.clone()))
    );
    drop(sub2);
}

#[tokio::test]
async fn an_installed_snapshot_reaches_the_watchers() {
    let mut f = Fixture::new().await;
    let a = job(1);
    // Placed, so that only the install can make the registry look at it.
    f.apply(vec![register("tm-1", 1, &[]), submit(&a, 1)]).await;
    let r = f.registry(Limits::default());
    let (_p, sub) = watch_job(&r, &a);
    assert_eq!(state_of(&view(&sub)), pb::JobState::Running);
    // A leader's state further on: the job was canceled there.
    let mut ahead = DispatcherState::new(ClusterConfig::default());
    ahead.apply(register("tm-1", 1, &[])).expect("register");
    ahead.apply(submit(&a, 1)).expect("submit");
    ahead.apply(cancel(&a)).expect("cancel");
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(7)),
        last_membership: StoredMembership::default(),
        snapshot_id: "ahead".into(),
    };
    f.sm.install_snapshot(
        &meta,
        Box::new(Cursor::new(ahead.encode().expect("encode"))),
    )
    .await
    .expect("install");
    r.refresh();
    assert!(sub.rx.has_changed().expect("open"));
    let v = view(&sub);
    assert_eq!(state_of(&v), pb::JobState::Cancelling);
    assert_eq!(v.index(), 7);
}

#[tokio::test]
async fn the_refresh_task_follows_applied_batches_and_shutdown_ends_the_watch() {
    let mut f = Fixture::new().await;
    let a = job(1);
    f.apply(vec![submit(&a, 1)]).await;
    let r = f.registry(Limits::default());
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(r.clone().run(stop.clone()));
    let (permit, sub) = watch_job(&r, &a);
    let mut w = Watcher::new(permit, sub, stop);
    next(&mut w).await.expect("a first view").expect("the job");
    f.apply(vec![cancel(&a)]).await;
    let change = next(&mut w).await.expect("a view").expect("the job");
    assert_eq!(state_of(&change), pb::JobState::Canceled);

    f.apply(vec![submit(&job(2), 1)]).await;
    let (permit, sub) = watch_job(&r, &job(2));
    let mut w = Watcher::new(permit, sub, stop_tx.subscribe());
    next(&mut w).await.expect("a first view").expect("the job");
    stop_tx.send_replace(true);
    let end = next(&mut w).await.expect("an end");
    assert_eq!(end.err(), Some(End::ShuttingDown));
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the task ends")
        .expect("no panic");
}

const QUIET: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_burst_of_events_is_followed_by_one_heap_trim() {
    let f = Fixture::new().await;
    let r = f.registry(Limits::default());
    let (stop_tx, stop) = watch::channel(false);
    let trimmer = tokio::spawn(r.clone().trim_after_bursts(QUIET, stop));
    // Sends below the threshold never wake the trimmer.
    r.note_churn(TRIM_AFTER_BYTES / 2);
    tokio::time::sleep(QUIET * 3).await;
    assert_eq!(r.trims(), 0, "no burst, no trim");
    // Past it: one trim once sends pause.
    for _ in 0..4 {
        r.note_churn(TRIM_AFTER_BYTES / 4);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.trims() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no trim after the burst"
        );
        tokio::time::sleep(QUIET / 10).await;
    }
    tokio::time::sleep(QUIET * 3).await;
    assert_eq!(r.trims(), 1, "one trim per burst");
    stop_tx.send_replace(true);
    trimmer.await.expect("the trimmer ends");
}

//! The batcher without Raft: proposals go to the real state machine (or to a gate that
//! holds them), so the tests see exactly what callers would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::*;
use dispatcher_core::state::{DispatcherState, JobId, JobSpec, TaskSpec};

fn job_id(n: u32) -> JobId {
    JobId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("valid uuid")
}

fn spec(name: &str) -> JobSpec {
    JobSpec::single_vertex(name, "work", 1, TaskSpec::Sleep { duration_ms: 1000 })
}

fn submit(n: u32) -> Command {
    Command::SubmitJob {
        job_id: job_id(n),
        spec: spec(&format!("job-{n}")),
        now: 1,
    }
}

/// A proposer that applies to a real state machine, one log index per entry, after
/// the gate opens (so that commands pile up and batch).
struct Machine {
    state: Mutex<(DispatcherState, u64)>,
    entries: Mutex<Vec<usize>>,
    gate: Notify,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Machine {
    fn new() -> Arc<Self> {
        Arc::new(Machine {
            state: Mutex::new((DispatcherState::default(), 0)),
            entries: Mutex::new(Vec::new()),
            gate: Notify::new(),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        })
    }

    fn batcher(self: &Arc<Self>, gated: bool) -> Batcher {
        let m = self.clone();
        Batcher::spawn_with(move |command: Command| {
            let m = m.clone();
            async move {
                let now = m.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                m.most_in_flight.fetch_max(now, Ordering::SeqCst);
                if gated {
                    m.gate.notified().await;
                }
                m.in_flight.fetch_sub(1, Ordering::SeqCst);
                let size = match &command {
                    Command::Batch(c) => c.len(),
                    _ => 1,
                };
                m.entries.lock().expect("lock").push(size);
                let mut g = m.state.lock().expect("lock");
                g.1 += 1;
                let index = g.1;
                Ok((Applied::Command(g.0.apply(command)), index))
            }
        })
    }
}

#[tokio::test]
async fn a_lone_command_goes_as_itself() {
    let m = Machine::new();
    let b = m.batcher(false);
    let (outcome, index) = b.propose(submit(1)).await.expect("committed");
    assert!(matches!(
        outcome,
        Ok(Response::Submitted { created: true, .. })
    ));
    assert_eq!(index, 1);
    assert_eq!(*m.entries.lock().expect("lock"), vec![1]);
}

#[tokio::test]
async fn one_rejection_does_not_affect_the_others_in_a_batch() {
    let m = Machine::new();
    let b = m.batcher(true);
    // The first proposal holds an in-flight slot; fill the other so the rest queue up.
    let first = tokio::spawn({
        let b = b.clone();
        async move { b.propose(submit(1)).await }
    });
    wait_in_flight(&m, 1).await;
    let second = tokio::spawn({
        let b = b.clone();
        async move { b.propose(submit(2)).await }
    });
    wait_in_flight(&m, 2).await;
    let mut queued = Vec::new();
    for n in 3..=6 {
        let b = b.clone();
        // Job 5 cancels a job that does not exist: rejected on its own.
        let cmd = if n == 5 {
            Command::CancelJob {
                job_id: job_id(999),
                now: 1,
            }
        } else {
            submit(n)
        };
        queued.push(tokio::spawn(async move { b.propose(cmd).await }));
    }
    tokio::task::yield_now().await;
    // Release everything, one entry at a time, until all answered.
    let opener = open_until_done(m.clone());
    for h in [first, second] {
        assert!(matches!(h.await.expect("task"), Ok((Ok(_), _))));
    }
    let mut outcomes = Vec::new();
    for h in queued {
        outcomes.push(h.await.expect("task").expect("committed"));
    }
    opener.abort();
    let index = outcomes[0].1;
    assert!(
        outcomes.iter().all(|(_, i)| *i == index),
        "one entry: {outcomes:?}"
    );
    for (n, (o, _)) in (3..=6).zip(&outcomes) {
        if n == 5 {
            assert!(matches!(o, Err(Rejection::UnknownJob { .. })), "{o:?}");
        } else {
            assert!(
                matches!(o, Ok(Response::Submitted { created: true, .. })),
                "{o:?}"
            );
        }
    }
    assert_eq!(*m.entries.lock().expect("lock"), vec![1, 1, 4]);
    let g = m.state.lock().expect("lock");
    assert_eq!(
        g.0.jobs().count(),
        5,
        "every accepted submission applied once"
    );
}

#[tokio::test]
async fn never_more_than_the_in_flight_bound() {
    let m = Machine::new();
    let b = m.batcher(true);
    let spawn = |range: std::ops::RangeInclusive<u32>| {
        range
            .map(|n| {
                let b = b.clone();
                tokio::spawn(async move { b.propose(submit(n)).await })
            })
            .collect::<Vec<_>>()
    };
    // One proposal in flight, then everything that queued behind it as the second.
    let mut handles = spawn(1..=1);
    wait_in_flight(&m, 1).await;
    handles.extend(spawn(2..=30));
    wait_in_flight(&m, MAX_IN_FLIGHT).await;
    // A third wave must wait for a slot, however long the first two take.
    handles.extend(spawn(31..=40));
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(m.in_flight.load(Ordering::SeqCst), MAX_IN_FLIGHT);
    let opener = open_until_done(m.clone());
    for h in handles {
        assert!(matches!(h.await.expect("task"), Ok((Ok(_), _))));
    }
    opener.abort();
    assert_eq!(m.most_in_flight.load(Ordering::SeqCst), MAX_IN_FLIGHT);
    let entries = m.entries.lock().expect("lock").clone();
    assert_eq!(entries.iter().sum::<usize>(), 40);
    assert!(
        entries.len() <= 4,
        "commands that waited were batched: {entries:?}"
    );
}

#[test]
fn gathering_stops_at_the_count_and_byte_limits_and_carries_the_rest() {
    // By count.
    let mut ready = 1..;
    let (batch, rest) = gather(0usize, |_| 1, || ready.next());
    assert_eq!(batch.len(), MAX_BATCH_COMMANDS);
    assert!(rest.is_none(), "a full batch leaves the queue alone");

    // By bytes: the item that would overflow starts the next batch.
    let sizes = [
        MAX_BATCH_BYTES / 2,
        MAX_BATCH_BYTES / 4,
        MAX_BATCH_BYTES / 2,
        1,
    ];
    let mut it = sizes.iter().copied();
    let first = it.next().expect("one");
    let (batch, rest) = gather(first, |s| *s, || it.next());
    assert_eq!(batch, vec![MAX_BATCH_BYTES / 2, MAX_BATCH_BYTES / 4]);
    assert_eq!(rest, Some(MAX_BATCH_BYTES / 2));
    assert_eq!(it.next(), Some(1), "nothing taken past the carried item");

    // A command as large as a batch travels alone.
    let mut it = [1usize].into_iter();
    let (batch, rest) = gather(MAX_BATCH_BYTES, |s| *s, || it.next());
    assert_eq!((batch, rest), (vec![MAX_BATCH_BYTES], None));
    assert_eq!(it.next(), Some(1));
}

#[test]
fn a_malformed_batch_answer_fails_every_caller() {
    let ok = split(
        2,
        Applied::Command(Ok(Response::Batch(vec![
            Ok(Response::Purged { jobs: vec![] }),
            Err(Rejection::invalid("x", "y")),
        ]))),
    )
    .expect("well formed");
    assert_eq!(ok.len(), 2);
    assert!(ok[1].is_err());
    assert!(split(3, Applied::Command(Ok(Response::Batch(vec![])))).is_err());
    assert!(split(1, Applied::Internal).is_err());
    assert!(matches!(
        single(Applied::Internal),
        Err(WriteError::Internal(_))
    ));
}

async fn wait_in_flight(m: &Machine, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while m.in_flight.load(Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} proposals in flight"
        );
        tokio::task::yield_now().await;
    }
}

/// Opens the gate for one waiting proposal at a time, until aborted.
fn open_until_done(m: Arc<Machine>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            m.gate.notify_one();
            tokio::task::yield_now().await;
        }
    })
}

//! The runtime every raft test runs on: one thread, tokio's paused clock, and blocking
//! I/O that cannot reorder anything.
//!
//! On a current-thread runtime the only work that happens elsewhere is the blocking pool
//! (the sled log store's flush and fdatasync, the snapshot store's file I/O). Two things
//! about it would otherwise depend on real thread timing:
//!
//! - A job can finish before the task that spawned it first polls its handle (measured:
//!   3% of small jobs here). That task then runs on without yielding, ahead of tasks
//!   that were ready before it: another order in the same simulated instant, and from
//!   there other message batches and other timer alignments.
//! - A job finishing while the runtime thread runs other tasks wakes its task at a point
//!   that depends on when it finished.
//!
//! So the blocking pool runs only while the runtime thread is idle: its one thread
//! starts each batch of jobs at a gate that opens when the runtime parks (nothing left
//! to run), and the runtime, once woken, waits until that thread drained the queue and
//! exited before it runs anything. Every job then finishes before its task's first poll
//! would have a chance to see it, and all wake-ups of one idle period land together in
//! job order. tokio's `test-util` keeps the paused clock from jumping while a job is
//! queued or running, so disk I/O takes no simulated time, however slow the machine.
//! The price: a thread start per idle period with jobs (about 0.35 ms), and a job must
//! never wait for the runtime thread (the stores' jobs do not), or the test hangs.
//!
//! Left to chance: tokio's own RNG (seeded per runtime from the OS unless the
//! `tokio_unstable` `rng_seed` is used) picks the branch of an unbiased `select!` when
//! several are ready (openraft's replication backoff) and which of eight lists a
//! `watch` receiver waits in (the wake-up order of several receivers of one channel).

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

thread_local! {
    /// Set on the thread that [`simulate`] runs a test on.
    static SIMULATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the caller runs inside [`simulate`].
pub(crate) fn simulated() -> bool {
    SIMULATED.with(|s| s.get())
}

#[derive(Default)]
struct GateState {
    /// The runtime thread is parked, or the runtime is being dropped.
    open: bool,
    /// The runtime is being dropped: the gate stays open.
    done: bool,
    /// Blocking threads past the gate that have not exited yet.
    running: usize,
}

/// Synchronises the blocking pool's thread with the runtime thread's idle periods.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A blocking thread starts: waits for the runtime to idle.
    fn enter(&self) {
        let mut s = self.lock();
        while !s.open {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.running += 1;
    }

    /// A blocking thread exits.
    fn leave(&self) {
        self.lock().running -= 1;
        self.changed.notify_all();
    }

    /// The runtime thread goes idle: the queued jobs may run.
    fn open(&self) {
        self.lock().open = true;
        self.changed.notify_all();
    }

    /// The runtime thread woke: no new batch starts, and the current one finishes first.
    fn close(&self) {
        let mut s = self.lock();
        s.open = s.done;
        while s.running > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Opens the gate for good when dropped, so the runtime's shutdown can join a blocking
/// thread that waits at it (also when the test panics).
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.done = true;
        s.open = true;
        drop(s);
        self.0.changed.notify_all();
    }
}

/// Runs a test body on the harness's runtime (see the module docs) and returns its
/// output; a panic in the body fails the test with the body's own message.
///
/// The body runs as a task, not as the `block_on` future, which tokio polls on a flag
/// rather than in queue order.
pub fn simulate<F>(test: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let gate = Arc::new(Gate::default());
    let (enter, leave, open, close) = (gate.clone(), gate.clone(), gate.clone(), gate.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        // One blocking thread, which exits as soon as the queue is empty, so that each
        // batch of jobs starts on a new thread, at the gate.
        .max_blocking_threads(1)
        .thread_keep_alive(Duration::ZERO)
        .on_thread_start(move || enter.enter())
        .on_thread_stop(move || leave.leave())
        .on_thread_park(move || open.open())
        .on_thread_unpark(move || close.close())
        // Wake-ups from the blocking thread wait until no local task is ready.
        .global_queue_interval(u32::MAX)
        .build()
        .expect("a runtime");
    let _open_on_drop = OpenOnDrop(gate);
    SIMULATED.with(|s| s.set(true));
    let outcome = runtime.block_on(async { tokio::spawn(test).await });
    SIMULATED.with(|s| s.set(false));
    match outcome {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::simulate;

    #[test]
    fn blocking_io_takes_no_simulated_time_and_fires_no_timer() {
        simulate(async {
            let start = Instant::now();
            let timer = tokio::spawn(tokio::time::sleep(Duration::from_millis(1)));
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(50)))
                .await
                .expect("the job ran");
            assert_eq!(start.elapsed(), Duration::ZERO);
            assert!(!timer.is_finished(), "a timer fired during blocking I/O");
        })
    }

    #[test]
    fn a_blocking_job_never_finishes_before_its_task_yields() {
        simulate(async {
            for _ in 0..20 {
                let mut job = tokio::task::spawn_blocking(|| std::fs::metadata("."));
                // Ample time for an ungated pool to finish the job before the poll.
                std::thread::sleep(Duration::from_millis(2));
                let first =
                    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut job).poll(cx))).await;
                assert!(first.is_pending(), "a job finished before its first poll");
                job.await.expect("the job ran").expect("metadata");
            }
        })
    }

    #[test]
    #[should_panic(expected = "the body's own panic")]
    fn a_panicking_body_with_a_job_at_the_gate_fails_instead_of_hanging() {
        simulate(async {
            let _queued = tokio::task::spawn_blocking(|| ());
            panic!("the body's own panic");
        })
    }
}

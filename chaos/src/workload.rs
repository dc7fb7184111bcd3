//! Concurrent clients through the client library: submissions with client-chosen ids
//! (retried under the same id, never a new one), cancels and linearizable status reads,
//! recorded as a history of invocations and completions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_client::{Client, ClientConfig, ClientError};
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::spec::{self, JobBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Refused definitely (it did not happen).
    Fail,
    /// Unknown: it may or may not have happened.
    Unknown,
}

/// One operation of the history.
#[derive(Clone, Debug, Serialize)]
pub struct Op {
    /// Which client.
    pub client: usize,
    /// `submit`, `cancel` or `read`.
    pub kind: &'static str,
    /// The job.
    pub job_id: String,
    /// The job's unique name (for submissions).
    pub name: String,
    /// Invocation, ms since the run started.
    pub invoke_ms: u64,
    /// Completion, ms since the run started.
    pub complete_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// For reads: the observed state, restarts and whether it was NOT_FOUND.
    pub state: Option<String>,
    /// Restarts observed (reads).
    pub restarts: Option<u32>,
    /// NOT_FOUND observed (reads).
    pub not_found: bool,
}

/// The shared history.
pub type History = Arc<Mutex<Vec<Op>>>;

fn outcome_of<T>(r: &Result<T, ClientError>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => classify(e),
    }
}

fn classify(e: &ClientError) -> Outcome {
    match e {
        ClientError::Rejected(_) => Outcome::Fail,
        _ => Outcome::Unknown,
    }
}

fn spec(name: &str, rng: &mut StdRng) -> pb::JobSpec {
    // Drawn in this order, parallelism then duration, so a seed replays the same history.
    let parallelism = rng.gen_range(1..=2);
    let duration_ms = rng.gen_range(200..1500);
    JobBuilder::new(name)
        .vertex("work", parallelism, spec::sleep(duration_ms))
        .fixed_delay_restarts(50, 100)
        .build()
}

/// Runs one client until `stop` with the cluster's client settings `cfg` (endpoints, and
/// its CA and token when secured); appends to `history`.
pub async fn client(
    n: usize,
    mut cfg: ClientConfig,
    seed: u64,
    started: Instant,
    history: History,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    cfg.timeout = Duration::from_secs(5);
    cfg.per_try_timeout = Duration::from_secs(2);
    let Ok(client) = Client::new(cfg) else { return };
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9e37_79b9));
    let ms = || started.elapsed().as_millis() as u64;
    let mut acked: Vec<String> = Vec::new();
    let mut i = 0;
    while !*stop.borrow() {
        i += 1;
        let roll: u32 = rng.gen_range(0..100);
        let invoke_ms = ms();
        // An operation that completes now; a submit adds its name, a read what it saw.
        let done = |kind, job_id, outcome| Op {
            client: n,
            kind,
            job_id,
            name: String::new(),
            invoke_ms,
            complete_ms: ms(),
            outcome,
            state: None,
            restarts: None,
            not_found: false,
        };
        let op = if roll < 30 || acked.is_empty() {
            // The id is drawn from the seeded RNG before the first try and reused on every
            // retry inside the client library.
            let id = format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                rng.gen::<u32>(),
                rng.gen::<u16>(),
                rng.gen::<u16>() & 0xfff,
                rng.gen::<u16>() & 0xfff,
                rng.gen::<u64>() & 0xffff_ffff_ffff
            );
            let name = format!("c{n}-op{i}");
            let r = client
                .submit_job(Some(id.clone()), spec(&name, &mut rng))
                .await;
            let outcome = outcome_of(&r);
            if outcome == Outcome::Ok {
                acked.push(id.clone());
            }
            Op {
                name,
                ..done("submit", id, outcome)
            }
        } else if roll < 40 {
            let id = acked[rng.gen_range(0..acked.len())].clone();
            let r = client.cancel_job(&id).await;
            done("cancel", id, outcome_of(&r))
        } else {
            let id = acked[rng.gen_range(0..acked.len())].clone();
            let r = client.get_job(&id, false).await;
            let (outcome, state, restarts, not_found) = match r {
                Ok(j) => (
                    Outcome::Ok,
                    Some(state_name(j.state).to_string()),
                    Some(j.restarts),
                    false,
                ),
                Err(ClientError::Rejected(s)) if s.code() == tonic::Code::NotFound => {
                    (Outcome::Ok, None, None, true)
                }
                Err(e) => (classify(&e), None, None, false),
            };
            Op {
                state,
                restarts,
                not_found,
                ..done("read", id, outcome)
            }
        };
        if let Ok(mut h) = history.lock() {
            h.push(op);
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..120))).await;
    }
}

pub use dispatcher_proto::job_state_name as state_name;

//! Faults, scheduled from the seed: which fault, on which replica or link, when and for
//! how long are all drawn from one RNG, so a seed replays the same schedule.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::Cluster;
use crate::proxy::LinkMode;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    /// kill -9 of the leader, restarted at the heal.
    KillLeader,
    /// kill -9 of a random replica.
    KillReplica,
    /// SIGSTOP of the leader (a hung host), SIGCONT at the heal.
    PauseLeader,
    /// SIGSTOP of a random replica.
    PauseReplica,
    /// The leader cut off from every other replica.
    IsolateLeader,
    /// A minority cut off from the majority.
    SplitMinority,
    /// One replica sees both sides; the two sides do not see each other.
    Bridge,
    /// Every link slowed down.
    SlowLinks,
    /// Every link drops connections at random.
    FlakyLinks,
    /// Links to one replica stall without closing.
    StallReplica,
    /// kill -9 of a TaskManager, restarted at the heal.
    KillTaskManager,
    /// kill -9 of every replica at once, then all restart.
    CrashAll,
    /// Membership churn: a replica is removed from the cluster, wiped, started afresh
    /// and added back as a learner, then promoted to voter.
    Churn,
    /// kill -9 of a follower, then jobs of megabytes submitted while it is down; it
    /// restarts at the heal and must catch up without an election.
    BigEntries,
    /// Busy threads on every core beside the cluster, as a build or a noisy neighbour.
    CpuHog,
    /// A replica stopped for part of every 100 ms, as a container over its CPU quota is
    /// throttled by the kernel.
    Throttle,
    /// Hundreds of idle TCP connections to the leader, past its connection bound.
    ConnectionFlood,
    /// The last replica's disk (a small tmpfs) filled up: it must stop serving and exit,
    /// and come back when the space is.
    DiskFull,
    /// kill -9 of a follower, one bit flipped in one of its files (snapshot, sled's
    /// data file or a blob), restart: it must refuse to start (and is then replaced as
    /// the docs say) or come back with the right state, never serve a wrong one.
    CorruptFollower,
    /// kill -9 of a follower, its data directory wiped, restarted with its old id and
    /// flags: it must refuse to start (exit 1, naming `replace-node`), and is then
    /// replaced as docs/operations.md says.
    WipeReplace,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 20] = [
        Kind::KillLeader,
        Kind::KillReplica,
        Kind::PauseLeader,
        Kind::PauseReplica,
        Kind::IsolateLeader,
        Kind::SplitMinority,
        Kind::Bridge,
        Kind::SlowLinks,
        Kind::FlakyLinks,
        Kind::StallReplica,
        Kind::KillTaskManager,
        Kind::CrashAll,
        Kind::Churn,
        Kind::BigEntries,
        Kind::CpuHog,
        Kind::Throttle,
        Kind::ConnectionFlood,
        Kind::DiskFull,
        Kind::CorruptFollower,
        Kind::WipeReplace,
    ];

    /// Faults that leave the leader able to lead: an election while one is held is a
    /// liveness bug (the leader was deposed by load, not by a failure).
    pub fn leader_stays_healthy(self) -> bool {
        matches!(
            self,
            Kind::BigEntries
                | Kind::CpuHog
                | Kind::Throttle
                | Kind::ConnectionFlood
                | Kind::KillTaskManager
        )
    }

    /// Parses `kill`, `pause`, `partition`, `links`, `taskmanager`, `crash`,
    /// `membership`, `load`, `disk`, `corrupt`, `all`, or a kind's name in snake case.
    pub fn parse_list(raw: &str) -> Result<Vec<Kind>, String> {
        let mut out = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let kinds: &[Kind] = match part {
                "all" => &Kind::ALL,
                "kill" => &[Kind::KillLeader, Kind::KillReplica],
                "pause" => &[Kind::PauseLeader, Kind::PauseReplica],
                "partition" => &[Kind::IsolateLeader, Kind::SplitMinority, Kind::Bridge],
                "links" => &[Kind::SlowLinks, Kind::FlakyLinks, Kind::StallReplica],
                "taskmanager" => &[Kind::KillTaskManager],
                "crash" => &[Kind::CrashAll],
                "membership" => &[Kind::Churn],
                "load" => &[
                    Kind::BigEntries,
                    Kind::CpuHog,
                    Kind::Throttle,
                    Kind::ConnectionFlood,
                ],
                "disk" => &[Kind::DiskFull],
                "corrupt" => &[Kind::CorruptFollower, Kind::WipeReplace],
                other => {
                    let k = Kind::ALL
                        .iter()
                        .find(|k| snake(&format!("{k:?}")) == other)
                        .ok_or_else(|| format!("unknown nemesis {other:?}"))?;
                    std::slice::from_ref(k)
                }
            };
            out.extend_from_slice(kinds);
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err("no nemesis selected".into());
        }
        Ok(out)
    }
}

fn snake(camel: &str) -> String {
    let mut s = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

/// Idle connections a flood opens: past the replicas' bound
/// ([`crate::cluster::MAX_CONNECTIONS`]), so that some are refused.
pub const FLOOD_CONNECTIONS: usize = 400;

/// Jobs submitted while a follower is down, and their size range in bytes.
pub const BIG_JOBS: std::ops::Range<usize> = 3..6;
pub const BIG_JOB_BYTES: std::ops::Range<usize> = 1 << 20..3 << 20;

/// One injected fault, for the history.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fault {
    /// Milliseconds since the run started.
    pub at_ms: u64,
    /// Which fault.
    pub kind: Kind,
    /// On what (replica ids, TaskManager id).
    pub target: String,
    /// How long it was held.
    pub held_ms: u64,
}

/// The next fault's kind, drawn from `kinds`.
pub fn draw(rng: &mut StdRng, kinds: &[Kind]) -> Kind {
    *kinds.choose(rng).unwrap_or(&Kind::KillReplica)
}

/// A replica other than `leader`, drawn from the seed.
fn follower(ids: &[u64], leader: Option<u64>, rng: &mut StdRng) -> Option<u64> {
    let followers: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| Some(*id) != leader)
        .collect();
    followers.choose(rng).copied()
}

/// Applies a fault of `kind`; returns what it did. `leader` is the current leader, if
/// known.
pub fn inject(
    c: &mut Cluster,
    rng: &mut StdRng,
    kind: Kind,
    leader: Option<u64>,
) -> anyhow::Result<(Kind, String)> {
    let ids: Vec<u64> = c.replicas.keys().copied().collect();
    let random = *ids.choose(rng).unwrap_or(&1);
    let leader_or_random = leader.unwrap_or(random);
    let target = match kind {
        Kind::KillLeader => {
            c.kill_replica(leader_or_random);
            leader_or_random.to_string()
        }
        Kind::KillReplica => {
            c.kill_replica(random);
            random.to_string()
        }
        Kind::PauseLeader => {
            c.pause_replica(leader_or_random, true);
            leader_or_random.to_string()
        }
        Kind::PauseReplica => {
            c.pause_replica(random, true);
            random.to_string()
        }
        Kind::IsolateLeader => {
            for other in ids.iter().filter(|o| **o != leader_or_random) {
                c.set_link(leader_or_random, *other, LinkMode::Cut);
            }
            leader_or_random.to_string()
        }
        Kind::SplitMinority => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(rng);
            let minority = &shuffled[..(ids.len() - 1) / 2];
            for a in minority {
                for b in shuffled.iter().filter(|b| !minority.contains(b)) {
                    c.set_link(*a, *b, LinkMode::Cut);
                }
            }
            format!("{minority:?}")
        }
        Kind::Bridge => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(rng);
            let bridge = shuffled[0];
            let rest = &shuffled[1..];
            let (left, right) = rest.split_at(rest.len() / 2);
            for a in left {
                for b in right {
                    c.set_link(*a, *b, LinkMode::Cut);
                }
            }
            format!("bridge {bridge}: {left:?} | {right:?}")
        }
        Kind::SlowLinks => {
            let ms = rng.gen_range(5..60);
            for p in c.links.values() {
                p.set(LinkMode::Slow(ms));
            }
            format!("{ms} ms")
        }
        Kind::FlakyLinks => {
            let pct = rng.gen_range(2..20);
            for p in c.links.values() {
                p.set(LinkMode::Flaky(pct));
            }
            format!("{pct}%")
        }
        Kind::StallReplica => {
            for other in ids.iter().filter(|o| **o != random) {
                c.set_link(random, *other, LinkMode::Stall);
            }
            random.to_string()
        }
        Kind::KillTaskManager => {
            let tms: Vec<String> = c.task_managers.keys().cloned().collect();
            let tm = tms.choose(rng).cloned().unwrap_or_default();
            c.kill_tm(&tm);
            tm
        }
        Kind::CrashAll => {
            for id in &ids {
                c.kill_replica(*id);
            }
            "all".into()
        }
        // Done by the runner, which talks to the cluster (see `churn`).
        Kind::Churn => random.to_string(),
        Kind::BigEntries => {
            // A follower: the point is the catch-up, with the leader left to serve.
            let victim = follower(&ids, leader, rng).unwrap_or(random);
            c.kill_replica(victim);
            victim.to_string()
        }
        Kind::CpuHog => {
            let threads = rng.gen_range(2..6);
            c.start_cpu_hog(threads);
            format!("{threads} busy threads")
        }
        Kind::Throttle => {
            let stopped_ms = rng.gen_range(20..60);
            c.throttle_replica(leader_or_random, stopped_ms);
            format!("{leader_or_random}: stopped {stopped_ms} ms of every 100 ms")
        }
        Kind::ConnectionFlood => {
            let n = FLOOD_CONNECTIONS;
            let opened = c.flood_connections(leader_or_random, n);
            format!("{leader_or_random}: {opened} of {n} connections opened")
        }
        Kind::DiskFull => match c.fill_disk() {
            Some((id, mib)) => format!("{id}: disk filled with {mib} MiB"),
            None => "skipped: no tmpfs could be mounted (needs root)".into(),
        },
        Kind::WipeReplace => {
            let victim = follower(&ids, leader, rng).unwrap_or(random);
            c.kill_replica(victim);
            c.wipe_replica(victim)?;
            victim.to_string()
        }
        Kind::CorruptFollower => {
            let victim = follower(&ids, leader, rng).unwrap_or(random);
            c.kill_replica(victim);
            let flipped = flip_a_bit(&c.data_dir(victim), rng)
                .unwrap_or_else(|e| format!("no bit flipped: {e}"));
            format!("{victim}: {flipped}")
        }
    };
    Ok((kind, target))
}

/// Membership churn of replica `id`: remove it, wipe it, start it afresh (never
/// bootstrapping) and add it back as a voter. Returns what happened.
pub async fn churn(c: &mut Cluster, client: &dispatcher_client::Client, id: u64) -> String {
    if let Err(e) = client.remove_node(id).await {
        return format!("remove {id} refused: {e}");
    }
    c.kill_replica(id);
    if let Err(e) = c.wipe_replica(id) {
        return format!("wipe {id}: {e}");
    }
    if let Err(e) = c.start_fresh_replica(id) {
        return format!("restart {id}: {e}");
    }
    let addr = c.addrs[&id].clone();
    // A learner is promoted only once caught up (FAILED_PRECONDITION until then), as
    // `dispatchctl cluster replace-node` retries.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.add_node(id, &addr, true).await {
            Ok(_) => return format!("replica {id} removed, wiped and added back"),
            Err(e) if std::time::Instant::now() < deadline && not_yet(&e) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return format!("replica {id} removed; add back failed: {e}"),
        }
    }
}

/// Whether a promotion is worth another try: the learner has not caught up yet, or no
/// replica could serve the call for now.
fn not_yet(e: &dispatcher_client::ClientError) -> bool {
    match e {
        dispatcher_client::ClientError::Rejected(s) => s.code() == tonic::Code::FailedPrecondition,
        dispatcher_client::ClientError::Unavailable { .. } => true,
        _ => false,
    }
}

/// Flips one bit of one of a stopped replica's files: its snapshot, sled's data file or
/// one of sled's blob files, drawn from the seed. Returns what it flipped.
pub fn flip_a_bit(data_dir: &std::path::Path, rng: &mut StdRng) -> anyhow::Result<String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut files = Vec::new();
    for f in [
        data_dir.join("snapshot/current.snap"),
        data_dir.join("raft/db"),
    ] {
        if f.is_file() {
            files.push(f);
        }
    }
    if let Ok(blobs) = std::fs::read_dir(data_dir.join("raft/blobs")) {
        files.extend(blobs.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    let file = files
        .choose(rng)
        .ok_or_else(|| anyhow::anyhow!("no file in {}", data_dir.display()))?;
    let len = std::fs::metadata(file)?.len();
    anyhow::ensure!(len > 0, "{} is empty", file.display());
    let at = rng.gen_range(0..len);
    let bit = rng.gen_range(0..8u8);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)?;
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut byte)?;
    byte[0] ^= 1 << bit;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&byte)?;
    f.sync_all()?;
    let name = file.strip_prefix(data_dir).unwrap_or(file);
    Ok(format!(
        "bit {bit} of byte {at} of {} ({len} bytes)",
        name.display()
    ))
}

/// How long a fault is held, and the pause before the next.
pub fn timings(rng: &mut StdRng) -> (Duration, Duration) {
    (
        Duration::from_millis(rng.gen_range(800..4000)),
        Duration::from_millis(rng.gen_range(500..2500)),
    )
}

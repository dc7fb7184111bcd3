//! Logging of the `dispatcher` binary: one `fmt` layer on stderr (text or JSON), colour
//! only on a terminal, the level from `DISPATCHER_LOG`, and a filter that keeps
//! openraft's failure reports from flooding the log.
//!
//! openraft reports one failed RPC to a peer several times over, some of it at ERROR:
//! with one replica down the leader printed ~14 lines a second ("timeout while
//! confirming leadership for read request", "RPCError", "error replication to
//! target=2", "backoff mode", "update progress error", "heartbeat error"), and every
//! election leaves a WARN "A message will be ignored because vote changed". Their levels
//! are openraft's, so [`RaftNoise`] decides per event, in three ways ([`judge`]):
//!
//! - **dropped, known benign**: "A message will be ignored because vote changed", a
//!   stale notification openraft rightly ignores, at every election on every replica
//!   (a replica's own vote comes back to it as a `VoteResponse` after the candidacy is
//!   over; a deposed leader's replication streams report a `HigherVote` it has seen);
//! - **dropped, reported by us**: reports of an RPC that found its peer unreachable or
//!   timed out, and the backoff that follows. `raft::network` sees every such call
//!   and logs it once per peer per interval, as WARN with counts ("cannot reach peer");
//! - **rate-limited**: any other openraft WARN or ERROR is shown at most once per
//!   [`REPEAT_INTERVAL`] per call site and peer (openraft's `target` field); what was
//!   held back is counted, and [`Suppressed::report`] logs the counts once per interval.
//!
//! Everything else (our own events, openraft below WARN when asked for) passes as the
//! level filter says.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::server::config::LogFormat;

/// The environment variable with the level filter (`EnvFilter` syntax).
pub const LOG_ENV: &str = "DISPATCHER_LOG";

/// The filter when [`LOG_ENV`] is unset: our INFO, the libraries' warnings.
pub const DEFAULT_FILTER: &str = "info,openraft=warn,sled=warn,h2=warn,tower=warn";

/// At most one line per interval for a repeated openraft message (per call site and
/// peer), and how often the held-back ones are counted in a summary.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Installs the global subscriber: `format` lines on stderr, coloured only when stderr
/// is a terminal (and `NO_COLOR` is unset), filtered by [`LOG_ENV`] (else
/// [`DEFAULT_FILTER`]) and by [`RaftNoise`]. Returns the handle that reports what was
/// held back; spawn [`Suppressed::report`].
pub fn init(format: LogFormat) -> Suppressed {
    let levels =
        EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let noise = RaftNoise::new(REPEAT_INTERVAL);
    let suppressed = noise.suppressed();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour(std::io::stderr().is_terminal()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(levels.and(noise)))
        .try_init();
    if let Err(e) = installed {
        eprintln!("dispatcher: logging not set up: {e}");
    }
    suppressed
}

/// Colour codes only on a terminal: in a file or a pipe they are noise. `NO_COLOR`
/// (no-color.org) turns them off on a terminal too.
fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// What [`RaftNoise`] does with one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Not openraft's, or below WARN: the level filter alone decides.
    Pass,
    /// Not shown: known benign, or reported per peer by `raft::network`.
    Drop,
    /// Shown at most once per interval for its call site and this peer.
    Limit {
        /// The peer the event is about (openraft's `target` field), if it names one.
        peer: Option<String>,
    },
}

/// Decides what to do with an event of `target` at `level` with these recorded fields
/// (`message` included), as described in the module documentation.
pub fn judge(target: &str, level: Level, fields: &[(&str, &str)]) -> Judgement {
    if !is_judged(target, level) {
        return Judgement::Pass;
    }
    let message = field(fields, "message").unwrap_or("");
    // openraft 0.9's `RaftCore::does_vote_match`: a notification from an earlier vote
    // (term, candidacy or leadership) arrived after the vote changed, and is ignored
    // "as it should be" (its own comment). Every election leaves some: each replica's
    // own vote comes back to it as a VoteResponse when its candidacy (or the
    // follower's no-candidacy) is already over, and a deposed leader's replication
    // streams report the HigherVote it has already seen.
    if target == "openraft::core::raft_core"
        && message.starts_with("A message will be ignored because vote changed: ")
    {
        return Judgement::Drop;
    }
    // Entered only after an Unreachable error, which the network has reported.
    if message.contains("backoff mode: drain events without processing them") {
        return Judgement::Drop;
    }
    if fields.iter().any(|(_, v)| restates_peer_failure(v)) {
        return Judgement::Drop;
    }
    Judgement::Limit {
        peer: field(fields, "target").map(str::to_string),
    }
}

/// openraft's WARN and ERROR events are judged; everything else passes.
fn is_judged(target: &str, level: Level) -> bool {
    (target == "openraft" || target.starts_with("openraft::"))
        && (level == Level::WARN || level == Level::ERROR)
}

fn field<'a>(fields: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Whether a field's text is openraft's rendering of an RPC error that
/// `raft::network` reports itself: `Unreachable` ("Unreachable node: ...") or
/// `Timeout` ("timeout after 50ms when AppendEntries 1->2").
fn restates_peer_failure(text: &str) -> bool {
    text.contains("Unreachable node: ")
        || (text.contains("timeout after ")
            && [
                " when AppendEntries ",
                " when Vote ",
                " when InstallSnapshot ",
            ]
            .iter()
            .any(|rpc| text.contains(rpc)))
}

/// Per key, at most one event per interval: the first event of a key is shown, and so
/// is the first one at least `interval` after the last shown one; the others are
/// counted until [`RateLimiter::take_suppressed`]. Pure: the caller passes the time.
#[derive(Debug)]
pub struct RateLimiter<K> {
    interval: Duration,
    keys: HashMap<K, Window>,
}

#[derive(Debug)]
struct Window {
    shown_at: Instant,
    suppressed: u64,
}

impl<K: Clone + Eq + Hash + Ord> RateLimiter<K> {
    /// A limiter that shows one event per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimiter {
            interval,
            keys: HashMap::new(),
        }
    }

    /// Whether an event of `key` at `now` is shown (otherwise it is counted).
    pub fn admit(&mut self, key: &K, now: Instant) -> bool {
        match self.keys.get_mut(key) {
            Some(w) if now.saturating_duration_since(w.shown_at) < self.interval => {
                w.suppressed += 1;
                false
            }
            Some(w) => {
                w.shown_at = now;
                true
            }
            None => {
                self.keys.insert(
                    key.clone(),
                    Window {
                        shown_at: now,
                        suppressed: 0,
                    },
                );
                true
            }
        }
    }

    /// The events held back since the last call, by key (in key order), and resets
    /// the counts. Forgets keys quiet for a whole interval, so the map stays as small
    /// as the set of currently repeating messages.
    pub fn take_suppressed(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut out: Vec<(K, u64)> = self
            .keys
            .iter_mut()
            .filter(|(_, w)| w.suppressed > 0)
            .map(|(k, w)| (k.clone(), std::mem::take(&mut w.suppressed)))
            .collect();
        let interval = self.interval;
        self.keys
            .retain(|_, w| now.saturating_duration_since(w.shown_at) < interval);
        out.sort();
        out
    }
}

/// Where a rate-limited event comes from: its call site and the peer it is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    /// The event's target (an openraft module path).
    pub target: &'static str,
    /// Source file and line of the call site.
    pub file: &'static str,
    /// Line of the call site.
    pub line: u32,
    /// The peer the event names, if any.
    pub peer: Option<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}:{})", self.target, self.file, self.line)?;
        if let Some(peer) = &self.peer {
            write!(f, " peer {peer}")?;
        }
        Ok(())
    }
}

/// The per-layer filter that applies [`judge`] to the `fmt` layer's events.
#[derive(Clone)]
pub struct RaftNoise {
    limiter: Arc<Mutex<RateLimiter<Source>>>,
}

impl RaftNoise {
    /// A filter that shows a repeated openraft message once per `interval`.
    pub fn new(interval: Duration) -> Self {
        RaftNoise {
            limiter: Arc::new(Mutex::new(RateLimiter::new(interval))),
        }
    }

    /// The handle that reports what this filter held back.
    pub fn suppressed(&self) -> Suppressed {
        Suppressed {
            limiter: self.limiter.clone(),
        }
    }
}

impl<S: Subscriber> Filter<S> for RaftNoise {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        // Levels are the EnvFilter's business; this filter judges events one by one.
        true
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // "Sometimes" for the call sites judged event by event: an "always" would let
        // the registry skip `enabled` for them, and tracing-subscriber (0.3.23, debug
        // builds) asserts that an event a per-layer filter disables went through it.
        if is_judged(meta.target(), *meta.level()) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // "No limit of ours", so that combined with `and` the EnvFilter's hint stands
        // (a `None` here would erase it).
        Some(LevelFilter::TRACE)
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        if !is_judged(meta.target(), *meta.level()) {
            return true;
        }
        let mut fields = FieldText::default();
        event.record(&mut fields);
        let pairs: Vec<(&str, &str)> = fields.0.iter().map(|(n, v)| (*n, v.as_str())).collect();
        match judge(meta.target(), *meta.level(), &pairs) {
            Judgement::Pass => true,
            Judgement::Drop => false,
            Judgement::Limit { peer } => {
                let source = Source {
                    target: meta.target(),
                    file: meta.file().unwrap_or("?"),
                    line: meta.line().unwrap_or(0),
                    peer,
                };
                self.limiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(&source, Instant::now())
            }
        }
    }
}

/// An event's fields as text, as the `fmt` layer would print them.
#[derive(Default)]
struct FieldText(Vec<(&'static str, String)>);

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name(), value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` and `display(x)` fields, and the message, print their Display here.
        self.0.push((field.name(), format!("{value:?}")));
    }
}

/// Reports what [`RaftNoise`] held back.
#[derive(Clone)]
pub struct Suppressed {
    limiter: Arc<Mutex<RateLimiter<Source>>>,
}

impl Suppressed {
    /// Every [`REPEAT_INTERVAL`], one WARN with the number of openraft lines held back
    /// in it, by call site and peer (nothing when none were). Runs until the runtime
    /// stops.
    pub async fn report(self) {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + REPEAT_INTERVAL,
            REPEAT_INTERVAL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some((total, by_source)) = self.take(Instant::now()) {
                tracing::warn!(
                    suppressed = total,
                    by_source = %by_source,
                    interval = ?REPEAT_INTERVAL,
                    "repeated openraft messages held back"
                );
            }
        }
    }

    /// The number of lines held back since the last call and a summary by source, or
    /// `None` if there were none.
    pub fn take(&self, now: Instant) -> Option<(u64, String)> {
        let counts = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_suppressed(now);
        if counts.is_empty() {
            return None;
        }
        let total = counts.iter().map(|(_, n)| n).sum();
        let by_source = counts
            .iter()
            .map(|(source, n)| format!("{source}: {n}"))
            .collect::<Vec<_>>()
            .join("; ");
        Some((total, by_source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(30);

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// One line per key per interval; repeats are counted, reported once, and counted
    /// again from zero; keys do not share windows.
    #[test]
    fn the_rate_limiter_shows_one_event_per_key_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(INTERVAL);
        // Peer 2 fails every 500 ms for 65 s; peer 3 once, at 10 s.
        let mut shown = vec![];
        let mut reports = vec![];
        for ms in (0..=65_000).step_by(500) {
            if limiter.admit(&"peer 2", at(t0, ms)) {
                shown.push(("peer 2", ms));
            }
            if ms == 10_000 && limiter.admit(&"peer 3", at(t0, ms)) {
                shown.push(("peer 3", ms));
            }
            if ms > 0 && ms % 30_000 == 0 {
                reports.push((ms, limiter.take_suppressed(at(t0, ms))));
            }
        }
        assert_eq!(
            shown,
            vec![
                ("peer 2", 0),
                ("peer 3", 10_000),
                ("peer 2", 30_000),
                ("peer 2", 60_000)
            ]
        );
        // At 30 s: the 59 repeats between 0.5 s and 29.5 s (the 30 s event was shown
        // before the report). At 60 s: the 59 between 30.5 s and 59.5 s.
        assert_eq!(
            reports,
            vec![
                (30_000, vec![("peer 2", 59)]),
                (60_000, vec![("peer 2", 59)])
            ]
        );
        assert_eq!(
            limiter.take_suppressed(at(t0, 65_000)),
            vec![("peer 2", 10)]
        );
        assert_eq!(limiter.take_suppressed(at(t0, 65_000)), vec![]);
    }

    #[test]
    fn a_key_quiet_for_an_interval_is_forgotten_and_shown_again_at_once() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(INTERVAL);
        assert!(limiter.admit(&1, at(t0, 0)));
        assert!(!limiter.admit(&1, at(t0, 29_999)));
        assert_eq!(limiter.take_suppressed(at(t0, 31_000)), vec![(1, 1)]);
        assert!(limiter.keys.is_empty(), "quiet keys are dropped");
        assert!(limiter.admit(&1, at(t0, 31_001)));
        // A clock that went backwards (it cannot with Instant, but saturating keeps it
        // harmless) counts as "within the interval".
        assert!(!limiter.admit(&1, at(t0, 0)));
    }

    // The exact lines openraft 0.9.25 printed on a leader with one follower killed, and
    // on every replica at start-up (fields as the fmt layer prints them).
    const UNREACHABLE: &str = "Unreachable node: code: 'The service is currently unavailable', message: \"tcp connect error\", source: tonic::transport::Error(Transport, ConnectError(ConnectError(\"tcp connect error\", 127.0.0.1:17402, Os { code: 111, kind: ConnectionRefused, message: \"Connection refused\" })))";

    /// An event: its target, level and fields.
    type Case<'a> = (&'a str, Level, Vec<(&'a str, &'a str)>);

    #[test]
    fn openraft_restatements_of_an_unreachable_or_timed_out_peer_are_dropped() {
        let heartbeat = format!("heartbeat error: {UNREACHABLE}, no update to inflight data");
        let cases: Vec<Case> = vec![
            (
                "openraft::core::raft_core",
                Level::ERROR,
                vec![
                    ("message", "timeout while confirming leadership for read request"),
                    ("target", "2"),
                    ("error", UNREACHABLE),
                ],
            ),
            (
                "openraft::replication",
                Level::WARN,
                vec![
                    ("message", "error replication to target=2"),
                    ("error", UNREACHABLE),
                ],
            ),
            (
                "openraft::replication",
                Level::ERROR,
                vec![("message", "RPCError"), ("err", UNREACHABLE)],
            ),
            (
                "openraft::replication",
                Level::WARN,
                vec![
                    ("message", "openraft::replication::ReplicationCore<_, _, _>::backoff_drain_events backoff mode: drain events without processing them"),
                    ("interval", "499.998928ms"),
                ],
            ),
            (
                "openraft::engine::handler::replication_handler",
                Level::WARN,
                vec![
                    ("message", "update progress error"),
                    ("request_id", "HeartBeat"),
                    ("result", UNREACHABLE),
                ],
            ),
            (
                "openraft::engine::handler::replication_handler",
                Level::WARN,
                vec![("message", heartbeat.as_str())],
            ),
            (
                "openraft::core::raft_core",
                Level::ERROR,
                vec![
                    ("message", "while requesting vote"),
                    ("error", UNREACHABLE),
                    ("target", "1"),
                ],
            ),
            (
                "openraft::replication",
                Level::ERROR,
                vec![
                    ("message", "RPCError"),
                    ("err", "timeout after 50ms when AppendEntries 2->3"),
                ],
            ),
            (
                "openraft::core::raft_core",
                Level::WARN,
                vec![("message", "A message will be ignored because vote changed: msg sent by vote: T1-N1:uncommitted; current my vote: None; when (VoteResponse)")],
            ),
            (
                "openraft::core::raft_core",
                Level::WARN,
                vec![("message", "A message will be ignored because vote changed: msg sent by vote: T1-N1:committed; current my vote: None; when (HigherVote)")],
            ),
        ];
        for (target, level, fields) in cases {
            assert_eq!(
                judge(target, level, &fields),
                Judgement::Drop,
                "{target} {level} {fields:?}"
            );
        }
    }

    #[test]
    fn other_openraft_warnings_and_errors_are_rate_limited_per_peer_and_the_rest_passes() {
        let remote = [
            (
                "message",
                "timeout while confirming leadership for read request",
            ),
            ("target", "3"),
            ("error", "NetworkError: status: Internal, message: \"boom\""),
        ];
        assert_eq!(
            judge("openraft::core::raft_core", Level::ERROR, &remote),
            Judgement::Limit {
                peer: Some("3".into())
            }
        );
        // A deposed leader's "seen a higher vote" is news: shown (once per interval).
        let deposed = [
            ("message", "error replication to target=2"),
            (
                "error",
                "seen a higher vote: T2-N2:committed GT mine: T1-N1:committed",
            ),
        ];
        assert_eq!(
            judge("openraft::replication", Level::WARN, &deposed),
            Judgement::Limit { peer: None }
        );
        // Below WARN, or not openraft's: the level filter decides.
        let info = [("message", "RPCError"), ("err", UNREACHABLE)];
        assert_eq!(
            judge("openraft::replication", Level::INFO, &info),
            Judgement::Pass
        );
        assert_eq!(
            judge("dispatcher_server::raft::network", Level::WARN, &info),
            Judgement::Pass
        );
        assert_eq!(judge("openraftish", Level::ERROR, &info), Judgement::Pass);
    }

    #[test]
    fn colour_only_on_a_terminal() {
        assert!(!colour(false));
        // NO_COLOR is read from the environment; only check the terminal case when the
        // test runner's environment leaves it unset.
        if std::env::var_os("NO_COLOR").is_none() {
            assert!(colour(true));
        }
    }

    /// The filter wired into a real subscriber: what reaches the output.
    #[test]
    fn the_filter_drops_benign_lines_and_shows_a_repeated_one_once() {
        let out = Capture::default();
        let noise = RaftNoise::new(INTERVAL);
        let suppressed = noise.suppressed();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(out.clone())
                .with_ansi(false)
                .with_filter(EnvFilter::new("info,openraft=warn").and(noise)),
        );
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..5 {
                tracing::error!(target: "openraft::replication", err = %UNREACHABLE, "RPCError");
                tracing::error!(target: "openraft::core::raft_core", target = 3, error = "NetworkError: boom", "timeout while confirming leadership for read request");
            }
            tracing::error!(target: "openraft::core::raft_core", target = 2, error = "NetworkError: boom", "timeout while confirming leadership for read request");
            tracing::info!(target: "openraft::core::raft_core", "below the EnvFilter's level");
            tracing::info!("ours");
        });
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("ERROR") && lines[0].contains("target=3"),
            "{text}"
        );
        assert!(lines[1].contains("target=2"), "{text}");
        assert!(lines[2].contains("ours"), "{text}");
        assert!(!text.contains("RPCError"), "{text}");
        let (total, by_source) = suppressed.take(Instant::now()).expect("counts");
        assert_eq!(total, 4);
        assert!(
            by_source.contains("openraft::core::raft_core"),
            "{by_source}"
        );
        assert!(by_source.contains("peer 3: 4"), "{by_source}");
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("capture")).into_owned()
        }
    }

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }
}

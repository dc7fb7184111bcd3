//! Latency samples, percentiles and medians, the progress bar every workload shows, and
//! the figure/value table of the one-shot workloads (`place`, `recover`).

use std::time::Duration;

use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentile of sorted samples; `q` in [0, 1].
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Milliseconds with microsecond precision.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl Latency {
    /// Summarises samples (in any order).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Latency {
            count: samples.len(),
            p50_ms: ms(percentile(&samples, 0.50)),
            p99_ms: ms(percentile(&samples, 0.99)),
            p999_ms: ms(percentile(&samples, 0.999)),
            max_ms: ms(samples.last().copied().unwrap_or_default()),
        }
    }
}

/// The median of some figures (0 if none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A progress bar on stderr (hidden when `quiet`, e.g. with `--output json` piped).
pub fn progress(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A two-column table of named figures, one row each.
pub fn figures<const N: usize>(rows: [(String, String); N]) -> Table {
    let mut t = Table::new();
    t.set_header(["figure", "value"]);
    for row in rows {
        t.add_row([row.0, row.1]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        let l = Latency::of(s);
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_ms, 500.0);
        assert_eq!(l.p99_ms, 990.0);
        assert_eq!(l.p999_ms, 999.0);
        assert_eq!(l.max_ms, 1000.0);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(Latency::of(vec![]).p50_ms, 0.0);
    }
}

//! Timing shared by the publish benchmarks (ScopeHold's and SSCSD's side of the
//! side-by-side), so both report the same percentiles from the same loop.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;

/// Latency summary in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentiles in milliseconds.
pub fn stats(samples: &[Duration]) -> Stats {
    let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let at = |q: f64| {
        if n == 0 {
            f64::NAN
        } else {
            v[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
        }
    };
    Stats {
        n,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: v.last().copied().unwrap_or(f64::NAN),
        mean: v.iter().sum::<f64>() / n.max(1) as f64,
    }
}

/// The outcome of one timed batch.
pub struct Batch {
    /// Latencies of the successful calls, in completion order.
    pub latencies: Vec<Duration>,
    pub errors: Vec<String>,
    pub wall: Duration,
}

impl Batch {
    /// Successful calls per second of wall time.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    /// Prints how many calls of `what` failed, and the first error.
    pub fn check(&self, what: &str) {
        if !self.errors.is_empty() {
            eprintln!(
                "  {what}: {} of {} failed; first: {}",
                self.errors.len(),
                self.errors.len() + self.latencies.len(),
                self.errors[0]
            );
        }
    }
}

/// Runs `call` for every item with at most `concurrency` in flight; each call
/// returns its own latency (so set-up outside the timed part is excluded).
pub async fn timed<'a, T, F, Fut>(items: &'a [T], concurrency: usize, call: F) -> Batch
where
    F: Fn(&'a T) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    let started = Instant::now();
    let results: Vec<Result<Duration, String>> = futures::stream::iter(items)
        .map(call)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut batch = Batch {
        latencies: Vec::new(),
        errors: Vec::new(),
        wall: started.elapsed(),
    };
    for r in results {
        match r {
            Ok(d) => batch.latencies.push(d),
            Err(e) => batch.errors.push(e),
        }
    }
    batch
}

//! Whether every watch is up, and how a watch recovers.
//!
//! While a watch is down, custody answers from state that may be stale: that
//! must be loud (a warning per failed attempt, a gauge, `/readyz` failing), and
//! short. A watch told `410 Gone` (its resourceVersion fell out of the API
//! server's window) relists at once instead of after the watcher's error
//! backoff: kube's default waits 0.8 s doubling to 30 s with jitter, so a 410
//! after a cut left stale state in force for 30–55 s. Other errors back off
//! from 0.5 s to at most 5 s.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

/// The health of the controller's watches, shared with `/readyz`.
#[derive(Default)]
pub struct WatchHealth {
    /// Watches that are failing, and since when.
    down_since: Mutex<BTreeMap<&'static str, Instant>>,
    /// 1 while the watch of `resource` is down.
    down: Family<ResourceLabel, Gauge>,
    /// Relists after `410 Gone`.
    relists: Family<ResourceLabel, Counter>,
}

impl WatchHealth {
    pub fn register(registry: &mut Registry) -> Self {
        let health = WatchHealth::default();
        registry.register(
            "scopehold_watch_down",
            "1 while the watch of a resource is failing (custody answers from the last known state)",
            health.down.clone(),
        );
        registry.register(
            "scopehold_watch_relists",
            "Relists after the API server answered 410 Gone",
            health.relists.clone(),
        );
        health
    }

    fn failed(&self, resource: &'static str, error: &watcher::Error) {
        let now = Instant::now();
        let since = match self.down_since.lock() {
            Ok(mut down) => *down.entry(resource).or_insert(now),
            Err(_) => now,
        };
        self.down.get_or_create(&ResourceLabel { resource }).set(1);
        tracing::warn!(
            resource,
            down_for_seconds = now.duration_since(since).as_secs(),
            %error,
            "watch failing: answers come from the last known state until it recovers"
        );
    }

    fn succeeded(&self, resource: &'static str) {
        let since = self
            .down_since
            .lock()
            .ok()
            .and_then(|mut down| down.remove(resource));
        if let Some(since) = since {
            self.down.get_or_create(&ResourceLabel { resource }).set(0);
            tracing::info!(
                resource,
                down_for_seconds = since.elapsed().as_secs(),
                "watch recovered"
            );
        }
    }

    /// `Err` naming the failing watches, for `/readyz`.
    pub fn check(&self) -> Result<(), String> {
        let down = self
            .down_since
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        if down.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = down
            .iter()
            .map(|(resource, since)| format!("{resource} ({}s)", since.elapsed().as_secs()))
            .collect();
        Err(format!("watches down: {}", names.join(", ")))
    }
}

/// Whether the API server said the watch's resourceVersion is gone: the
/// watcher has already dropped back to a fresh list.
fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// For the kube `Controller`s fed by [`watch_with_health`] streams: no
/// backoff of their own. A Controller backs off its trigger stream after
/// every error it sees (kube's default: 0.8 s doubling to 30 s, plus
/// jitter), on top of the backoff [`watch_with_health`] already applied, so
/// after an outage the grant and identity watches came back up to a minute
/// late, while the Secret watch (not in a Controller) was back at once; the
/// changes made meanwhile stayed unannounced all that time.
pub struct NoExtraBackoff;

impl Iterator for NoExtraBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // `None` would end the stream: "retry at once" is a zero delay.
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoExtraBackoff {
    fn reset(&mut self) {}
}

/// Checks that the API server answers for the watched resource (a one-item
/// list): how a watch that was failing is known to be back when the
/// resumed watch has nothing to deliver.
pub type Probe = Box<dyn Fn() -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// Backoff between failed watch attempts: doubling from the first, capped at
/// the last. Capped low on purpose: kube's default (0.8 s doubling to 30 s,
/// plus up to as much again in jitter) left a controller on stale state for
/// a minute and more after its API server came back. A few watches of one
/// Deployment retrying every 5 s cost the API server nothing.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a failing watch's stream must stay quiet (no error) before the
/// probe is asked whether the API server is back.
const QUIET_BEFORE_PROBE: Duration = Duration::from_secs(2);

/// How often a backoff wait asks whether the API server is back.
const PROBE_DURING_BACKOFF: Duration = Duration::from_secs(1);

/// Waits `delay`, or less: the wait ends as soon as `probe` says the API
/// server answers again, so that a watch whose backoff grew during an
/// outage does not sleep up to [`BACKOFF_MAX`] past its end (a change made
/// right after an API server restart used to land 4-7 s later).
async fn wait_unless_back(delay: Duration, probe: &Probe) {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep((deadline - now).min(PROBE_DURING_BACKOFF)).await;
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        if tokio::time::timeout(PROBE_DURING_BACKOFF, probe()).await == Ok(true) {
            return;
        }
    }
}

/// Backs off after errors (0.5 s doubling to 5 s), except that the first
/// `410 Gone` in a row relists at once, and reports every error and recovery
/// to `health`. A recovery is an event from the stream, or, when a resumed
/// watch stays quiet, a successful `probe`.
pub fn watch_with_health<S, T>(
    resource: &'static str,
    health: std::sync::Arc<WatchHealth>,
    probe: Probe,
    stream: S,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    T: Send + 'static,
{
    struct State<T> {
        stream: futures::stream::BoxStream<'static, Result<T, watcher::Error>>,
        /// The next delay after an error.
        backoff: Duration,
        /// Wait this long before polling again (the watcher only issues its
        /// next request when polled).
        delay: Option<Duration>,
        /// The last error was a 410: another one at once would be a loop.
        after_gone: bool,
        /// The watch failed and has not been seen working since.
        down: bool,
    }
    let state = State {
        stream: stream.boxed(),
        backoff: BACKOFF_FIRST,
        delay: None,
        after_gone: false,
        down: false,
    };
    let probe = std::sync::Arc::new(probe);
    futures::stream::unfold(state, move |mut state| {
        let (health, probe) = (health.clone(), probe.clone());
        async move {
            if let Some(delay) = state.delay.take() {
                wait_unless_back(delay, probe.as_ref()).await;
            }
            // `next()` is cancel-safe: the watcher keeps its request in the
            // stream, so racing it against the probe loses nothing.
            let item = loop {
                if !state.down {
                    break state.stream.next().await?;
                }
                tokio::select! {
                    item = state.stream.next() => break item?,
                    _ = tokio::time::sleep(QUIET_BEFORE_PROBE) => {
                        let answered = tokio::time::timeout(QUIET_BEFORE_PROBE, probe()).await;
                        if answered == Ok(true) {
                            state.down = false;
                            health.succeeded(resource);
                        }
                    }
                }
            };
            match &item {
                Ok(_) => {
                    state.backoff = BACKOFF_FIRST;
                    state.after_gone = false;
                    state.down = false;
                    health.succeeded(resource);
                }
                Err(error) if is_gone(error) && !state.after_gone => {
                    state.after_gone = true;
                    health
                        .relists
                        .get_or_create(&ResourceLabel { resource })
                        .inc();
                    tracing::info!(resource, "resourceVersion gone (410): relisting now");
                }
                Err(error) => {
                    state.after_gone = false;
                    state.down = true;
                    health.failed(resource, error);
                    state.delay = Some(state.backoff);
                    state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
                }
            }
            Some((item, state))
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn probe_answering_from(call: usize, calls: Arc<AtomicUsize>) -> Probe {
        Box::new(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move { n >= call })
        })
    }

    #[tokio::test]
    async fn a_backoff_wait_ends_when_the_api_server_answers_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let probe = probe_answering_from(2, calls.clone());
        let started = tokio::time::Instant::now();
        wait_unless_back(BACKOFF_MAX * 2, &probe).await;
        // Two probes, one a second: back after about 2 s of a 10 s wait.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() < BACKOFF_MAX * 2);
    }

    #[tokio::test]
    async fn a_short_backoff_wait_does_not_probe() {
        let calls = Arc::new(AtomicUsize::new(0));
        let probe = probe_answering_from(1, calls.clone());
        wait_unless_back(BACKOFF_FIRST, &probe).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}

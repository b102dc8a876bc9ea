//! Kubernetes Events written off the request path and aggregated into Event
//! series (events.k8s.io/v1 `series.count`), as kubelet's recorder does.
//!
//! A caller hands an occurrence to [`EventSink::record`] and returns at once;
//! the audit line for it is the caller's and is already written. A flusher
//! writes, per interval, one request per distinct series: a POST for a new
//! series, a PATCH of `series` for one written in the last few minutes. So a
//! burst of 500 resolutions of one grant is a POST and a few PATCHes instead
//! of 500 POSTs. On shutdown [`EventSink::flush`] writes what is pending,
//! bounded by a deadline.
//!
//! Occurrences are isomorphic (one series) when regarding, related, reason,
//! action, type and note are equal: events.k8s.io makes all of these
//! immutable, so a series can only count, never change its text. Callers that
//! want one series per grant and reason keep pod names out of the note and
//! the related object (the pods are in the audit lines).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as KubeEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{EventType, Reporter};
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

/// A series older than this gets a new Event (kube-rs and client-go use the
/// same 6 minutes; the API server keeps Events for an hour).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);
/// Writes in flight at once during a flush.
const WRITES_IN_FLIGHT: usize = 8;
/// A series whose write failed is tried again on this many later flushes.
const ATTEMPTS: u8 = 3;
/// Longest note the API server accepts (1 KiB).
const NOTE_LIMIT: usize = 1024;

/// One thing that happened, to be counted into its series.
#[derive(Clone, Debug)]
pub struct Occurrence {
    pub regarding: ObjectReference,
    pub related: Option<ObjectReference>,
    pub reason: String,
    pub action: String,
    pub type_: EventType,
    pub note: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SeriesKey {
    regarding: RefKey,
    related: Option<RefKey>,
    reason: String,
    action: String,
    warning: bool,
    note: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RefKey {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl From<&ObjectReference> for RefKey {
    fn from(r: &ObjectReference) -> Self {
        RefKey {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

/// A series to write: its key, what is pending, and the Event already
/// written for it (namespace, name, count), if any.
type Plan = (SeriesKey, Pending, Option<(String, String, i32)>);

/// Occurrences of one series not yet written.
struct Pending {
    occurrence: Occurrence,
    count: i32,
    first: Timestamp,
    last: Timestamp,
    attempts: u8,
}

/// A series already written: its Event and the count it shows.
struct Written {
    namespace: String,
    name: String,
    count: i32,
    started: Instant,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    /// `create` or `patch`.
    verb: &'static str,
    /// `ok` or `error`.
    result: &'static str,
}

/// Counters of the sink, registered by [`EventSink::register`].
#[derive(Clone, Default)]
struct SinkMetrics {
    occurrences: Counter,
    writes: Family<WriteLabels, Counter>,
    pending: Gauge,
    dropped: Counter,
}

struct Shared {
    api_client: Client,
    reporter: Reporter,
    pending: std::sync::Mutex<HashMap<SeriesKey, Pending>>,
    /// Held across a whole flush: two flushes never race on one series.
    written: tokio::sync::Mutex<HashMap<SeriesKey, Written>>,
    seq: AtomicU64,
    metrics: SinkMetrics,
}

/// The process's one Event writer. Cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    shared: Arc<Shared>,
}

/// What one flush wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub created: usize,
    pub patched: usize,
    pub failed: usize,
    /// Series still pending afterwards (failed writes to retry, or the
    /// deadline passed).
    pub left: usize,
}

impl EventSink {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        EventSink {
            shared: Arc::new(Shared {
                api_client: client,
                reporter,
                pending: Default::default(),
                written: Default::default(),
                seq: AtomicU64::new(0),
                metrics: SinkMetrics::default(),
            }),
        }
    }

    /// Registers the sink's counters (`scopehold_event_*`).
    pub fn register(&self, registry: &mut Registry) {
        self.register_as(registry, "scopehold_event");
    }

    /// Registers the sink's counters as `{prefix}_*`: a process with two
    /// sinks (custody's and the controller's) needs two sets of names, since
    /// one name may not be registered twice.
    pub fn register_as(&self, registry: &mut Registry, prefix: &str) {
        let m = &self.shared.metrics;
        registry.register(
            format!("{prefix}_occurrences"),
            "Occurrences handed to the Event writer (each is also an audit line)",
            m.occurrences.clone(),
        );
        registry.register(
            format!("{prefix}_writes"),
            "Event writes to the API server by verb (create: a new series, patch: a series count) and result",
            m.writes.clone(),
        );
        registry.register(
            format!("{prefix}_series_pending"),
            "Event series with occurrences not yet written",
            m.pending.clone(),
        );
        registry.register(
            format!("{prefix}_occurrences_dropped"),
            "Occurrences whose Event could not be written after retries or before the shutdown deadline",
            m.dropped.clone(),
        );
    }

    /// Counts one occurrence into its series; never waits for the API server.
    pub fn record(&self, occurrence: Occurrence) {
        let now = Timestamp::now();
        let key = SeriesKey {
            regarding: RefKey::from(&occurrence.regarding),
            related: occurrence.related.as_ref().map(RefKey::from),
            reason: occurrence.reason.clone(),
            action: occurrence.action.clone(),
            warning: occurrence.type_ == EventType::Warning,
            note: occurrence.note.clone(),
        };
        self.shared.metrics.occurrences.inc();
        let Ok(mut pending) = self.shared.pending.lock() else {
            return;
        };
        pending
            .entry(key)
            .and_modify(|p| {
                p.count = p.count.saturating_add(1);
                p.last = now;
            })
            .or_insert(Pending {
                occurrence,
                count: 1,
                first: now,
                last: now,
                attempts: 0,
            });
        self.shared.metrics.pending.set(pending.len() as i64);
    }

    /// Flushes every `interval` until the task is dropped.
    pub async fn run(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush(None).await;
        }
    }

    /// Writes every pending series once. With a deadline, series not written
    /// by then stay pending (and are counted as dropped if this is the last
    /// flush, which the caller knows).
    pub async fn flush(&self, deadline: Option<Instant>) -> FlushStats {
        let shared = &self.shared;
        let mut written = shared.written.lock().await;
        let batch: Vec<(SeriesKey, Pending)> = match shared.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => Vec::new(),
        };
        let now = Instant::now();
        written.retain(|_, w| now.duration_since(w.started) < SERIES_TTL);
        let mut stats = FlushStats::default();
        if batch.is_empty() {
            shared.metrics.pending.set(0);
            return stats;
        }
        let in_batch: u64 = batch
            .iter()
            .map(|(_, p)| u64::try_from(p.count).unwrap_or(0))
            .sum();
        let plans: Vec<Plan> = batch
            .into_iter()
            .map(|(key, p)| {
                let live = written
                    .get(&key)
                    .map(|w| (w.namespace.clone(), w.name.clone(), w.count));
                (key, p, live)
            })
            .collect();
        let writes = futures::stream::iter(plans)
            .map(|(key, p, live)| async move {
                let outcome = match &live {
                    Some((ns, name, count)) => self
                        .patch_series(ns, name, count.saturating_add(p.count), &p)
                        .await
                        .map(|()| (ns.clone(), name.clone(), count.saturating_add(p.count))),
                    None => self.create(&p).await,
                };
                (key, p, live.is_some(), outcome)
            })
            .buffer_unordered(WRITES_IN_FLIGHT);
        let mut writes = std::pin::pin!(writes);
        let mut retry: Vec<(SeriesKey, Pending)> = Vec::new();
        let mut unsettled: u64 = in_batch;
        loop {
            let next = match deadline {
                Some(at) => {
                    match tokio::time::timeout_at(tokio::time::Instant::from_std(at), writes.next())
                        .await
                    {
                        Ok(next) => next,
                        Err(_) => {
                            shared.metrics.dropped.inc_by(unsettled);
                            tracing::warn!(
                                occurrences = unsettled,
                                "Event flush hit its deadline; these occurrences have audit lines but no Event"
                            );
                            break;
                        }
                    }
                }
                None => writes.next().await,
            };
            let Some((key, mut p, patched, outcome)) = next else {
                break;
            };
            unsettled = unsettled.saturating_sub(u64::try_from(p.count).unwrap_or(0));
            let verb = if patched { "patch" } else { "create" };
            match outcome {
                Ok((namespace, name, count)) => {
                    shared
                        .metrics
                        .writes
                        .get_or_create(&WriteLabels { verb, result: "ok" })
                        .inc();
                    if patched {
                        stats.patched += 1;
                    } else {
                        stats.created += 1;
                    }
                    let started = written.get(&key).map_or(now, |w| w.started);
                    written.insert(
                        key,
                        Written {
                            namespace,
                            name,
                            count,
                            started,
                        },
                    );
                }
                Err(error) => {
                    shared
                        .metrics
                        .writes
                        .get_or_create(&WriteLabels {
                            verb,
                            result: "error",
                        })
                        .inc();
                    stats.failed += 1;
                    // A patch that failed (the Event expired or was deleted)
                    // starts a new series next time.
                    written.remove(&key);
                    p.attempts += 1;
                    if p.attempts < ATTEMPTS {
                        tracing::warn!(reason = %p.occurrence.reason, %error, "writing Event failed; retrying");
                        retry.push((key, p));
                    } else {
                        tracing::warn!(reason = %p.occurrence.reason, %error, count = p.count, "writing Event failed; giving up (the audit lines have every occurrence)");
                        shared
                            .metrics
                            .dropped
                            .inc_by(u64::try_from(p.count).unwrap_or(0));
                    }
                }
            }
        }
        if let Ok(mut pending) = shared.pending.lock() {
            for (key, p) in retry {
                merge_back(&mut pending, key, p);
            }
            stats.left = pending.len();
            shared.metrics.pending.set(pending.len() as i64);
        }
        stats
    }

    /// Occurrences still unwritten (for the shutdown path to report).
    pub fn pending_occurrences(&self) -> u64 {
        self.shared
            .pending
            .lock()
            .map(|p| {
                p.values()
                    .map(|p| u64::try_from(p.count).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Final flush on shutdown: retries until everything is written or the
    /// deadline passes; what is left is logged and counted as dropped.
    pub async fn close(&self, deadline: Instant) -> FlushStats {
        let mut total = FlushStats::default();
        loop {
            let s = self.flush(Some(deadline)).await;
            total.created += s.created;
            total.patched += s.patched;
            total.failed += s.failed;
            total.left = s.left;
            if s.left == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.pending_occurrences();
        if left > 0 {
            self.shared.metrics.dropped.inc_by(left);
            tracing::warn!(
                occurrences = left,
                "Events not written before the shutdown deadline (the audit lines have them)"
            );
        }
        total
    }

    async fn create(&self, p: &Pending) -> Result<(String, String, i32), kube::Error> {
        let o = &p.occurrence;
        let namespace = o
            .regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let base = o.regarding.name.as_deref().unwrap_or("scopehold");
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        // Unique per process and time, like kube-rs's and client-go's names.
        let name = format!(
            "{}.{:x}{:04x}",
            base.chars().take(200).collect::<String>(),
            Timestamp::now().as_nanosecond() as u64,
            seq & 0xffff
        );
        let series = (p.count > 1).then_some(EventSeries {
            count: p.count,
            last_observed_time: MicroTime(p.last),
        });
        let event = KubeEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            action: Some(o.action.clone()),
            reason: Some(o.reason.clone()),
            note: Some(truncate(&o.note, NOTE_LIMIT)),
            type_: Some(
                match o.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_owned(),
            ),
            event_time: Some(MicroTime(p.first)),
            regarding: Some(o.regarding.clone()),
            related: o.related.clone(),
            reporting_controller: Some(self.shared.reporter.controller.clone()),
            reporting_instance: Some(
                self.shared
                    .reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.shared.reporter.controller.clone()),
            ),
            series,
            ..Default::default()
        };
        let api: Api<KubeEvent> = Api::namespaced(self.shared.api_client.clone(), &namespace);
        api.create(&PostParams::default(), &event).await?;
        Ok((namespace, name, p.count))
    }

    async fn patch_series(
        &self,
        namespace: &str,
        name: &str,
        count: i32,
        p: &Pending,
    ) -> Result<(), kube::Error> {
        let api: Api<KubeEvent> = Api::namespaced(self.shared.api_client.clone(), namespace);
        let patch = json!({
            "series": { "count": count, "lastObservedTime": MicroTime(p.last) }
        });
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

fn merge_back(pending: &mut HashMap<SeriesKey, Pending>, key: SeriesKey, failed: Pending) {
    match pending.get_mut(&key) {
        Some(newer) => {
            newer.count = newer.count.saturating_add(failed.count);
            newer.first = failed.first;
            newer.attempts = newer.attempts.max(failed.attempts);
        }
        None => {
            pending.insert(key, failed);
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries_and_the_limit() {
        let long = "é".repeat(600);
        let cut = truncate(&long, NOTE_LIMIT);
        assert!(cut.len() <= NOTE_LIMIT, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", NOTE_LIMIT), "short");
    }

    #[test]
    fn a_failed_series_merges_into_newer_occurrences() {
        let occurrence = Occurrence {
            regarding: ObjectReference::default(),
            related: None,
            reason: "SecretResolved".into(),
            action: "Resolve".into(),
            type_: EventType::Normal,
            note: "n".into(),
        };
        let key = SeriesKey {
            regarding: RefKey::from(&occurrence.regarding),
            related: None,
            reason: occurrence.reason.clone(),
            action: occurrence.action.clone(),
            warning: false,
            note: occurrence.note.clone(),
        };
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::now();
        let mut pending = HashMap::new();
        pending.insert(
            key.clone(),
            Pending {
                occurrence: occurrence.clone(),
                count: 3,
                first: t1,
                last: t1,
                attempts: 0,
            },
        );
        merge_back(
            &mut pending,
            key.clone(),
            Pending {
                occurrence,
                count: 5,
                first: t0,
                last: t0,
                attempts: 1,
            },
        );
        let merged = &pending[&key];
        assert_eq!(merged.count, 8);
        assert_eq!(merged.first, t0);
        assert_eq!(merged.last, t1);
        assert_eq!(merged.attempts, 1);
    }
}

//! Prometheus metrics of the custody service (prometheus-client, in the
//! controller's registry; names and units by Prometheus conventions).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed`, `denied`, `invalid`, `unavailable` or `unauthenticated`.
    pub result: &'static str,
    /// `Granted`, a denial reason (`AgentSuspended`, `TokenRejected`, ...)
    /// or, for the other results, the step that failed.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Invalidation kind: `revoked`, `expired`, `suspended`, `rotated`, ...
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabel {
    /// `node_plugin` (the calling plugin's token) or `pod` (the pod's token).
    pub token: &'static str,
}

#[derive(Clone)]
pub struct CustodyMetrics {
    pub decisions: Family<DecisionLabels, Counter>,
    pub resolve_seconds: Family<ResultLabel, Histogram>,
    pub streams_open: Gauge,
    pub invalidations_sent: Family<KindLabel, Counter>,
    pub token_reviews: Family<CallerLabel, Counter>,
    pub pod_reads: Counter,
    pub reports: Family<KindLabel, Counter>,
    /// Resolves that delivered a volume the content it already had.
    pub unchanged_deliveries: Counter,
}

impl Default for CustodyMetrics {
    fn default() -> Self {
        CustodyMetrics {
            decisions: Family::default(),
            // 0.5 ms .. ~4 s
            resolve_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            streams_open: Gauge::default(),
            invalidations_sent: Family::default(),
            token_reviews: Family::default(),
            pod_reads: Counter::default(),
            reports: Family::default(),
            unchanged_deliveries: Counter::default(),
        }
    }
}

impl CustodyMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = CustodyMetrics::default();
        let r = registry.sub_registry_with_prefix("scopehold_custody");
        r.register(
            "decisions",
            "Resolve decisions by result and reason",
            m.decisions.clone(),
        );
        r.register(
            "resolve_duration_seconds",
            "Time from a Resolve call's arrival to its answer, by result",
            m.resolve_seconds.clone(),
        );
        r.register(
            "invalidation_streams",
            "Open invalidation streams (one per connected node plugin)",
            m.streams_open.clone(),
        );
        r.register(
            "invalidations_sent",
            "Invalidations sent to node plugins, by kind (summed over streams)",
            m.invalidations_sent.clone(),
        );
        r.register(
            "token_reviews",
            "TokenReviews sent to the API server, by whose token",
            m.token_reviews.clone(),
        );
        r.register(
            "pod_reads",
            "Pod GETs for tokens without node claims (Kubernetes before 1.30)",
            m.pod_reads.clone(),
        );
        r.register(
            "node_reports",
            "Node plugin reports accepted, by event",
            m.reports.clone(),
        );
        r.register(
            "unchanged_deliveries",
            "Resolves that delivered a volume the content it already held (republishes): not recorded as resolutions",
            m.unchanged_deliveries.clone(),
        );
        Arc::new(m)
    }

    pub fn decided(&self, result: &'static str, reason: &str, seconds: f64) {
        self.decisions
            .get_or_create(&DecisionLabels {
                result,
                reason: reason.to_owned(),
            })
            .inc();
        self.resolve_seconds
            .get_or_create(&ResultLabel { result })
            .observe(seconds);
    }
}

/// An invalidation stream that counts what it sends and is counted open
/// until the node plugin goes away.
pub struct Counted<S> {
    inner: S,
    metrics: Arc<CustodyMetrics>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, metrics: Arc<CustodyMetrics>) -> Self {
        metrics.streams_open.inc();
        Counted { inner, metrics }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.metrics.streams_open.dec();
    }
}

impl<S, T, E> Stream for Counted<S>
where
    S: Stream<Item = Result<T, E>> + Unpin,
    T: InvalidationKind,
{
    type Item = Result<T, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(item))) = &polled {
            self.metrics
                .invalidations_sent
                .get_or_create(&KindLabel {
                    kind: item.kind_name(),
                })
                .inc();
        }
        polled
    }
}

/// The kind label of a streamed message.
pub trait InvalidationKind {
    fn kind_name(&self) -> String;
}

impl InvalidationKind for crate::proto::scopehold::v1::Invalidation {
    fn kind_name(&self) -> String {
        crate::proto::scopehold::v1::invalidation::Kind::try_from(self.kind)
            .map(|k| {
                let name = k.as_str_name();
                name.strip_prefix("KIND_")
                    .unwrap_or(name)
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| "unknown".to_owned())
    }
}

//! Prometheus metrics of the controller, in one prometheus-client registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: &'static str,
    /// `written`, `unchanged` or `error`.
    pub outcome: &'static str,
}

pub struct Metrics {
    pub reconciles: Family<OutcomeLabels, Counter>,
    pub status_writes: Family<KindLabel, Counter>,
    pub reconcile_seconds: Family<KindLabel, Histogram>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            status_writes: Family::default(),
            reconcile_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
        };
        registry.register(
            "scopehold_reconciles",
            "Reconciles by kind and outcome",
            m.reconciles.clone(),
        );
        registry.register(
            "scopehold_status_writes",
            "Status writes to the API server",
            m.status_writes.clone(),
        );
        registry.register(
            "scopehold_reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.reconcile_seconds.clone(),
        );
        m
    }

    pub fn reconciled(&self, kind: &'static str, written: bool) {
        let outcome = if written { "written" } else { "unchanged" };
        self.reconciles
            .get_or_create(&OutcomeLabels { kind, outcome })
            .inc();
        if written {
            self.status_writes.get_or_create(&KindLabel { kind }).inc();
        }
    }

    pub fn failed(&self, kind: &'static str) {
        self.reconciles
            .get_or_create(&OutcomeLabels {
                kind,
                outcome: "error",
            })
            .inc();
    }
}

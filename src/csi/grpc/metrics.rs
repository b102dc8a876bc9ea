//! Prometheus metrics of the node plugin: publish/unpublish latency and
//! errors by gRPC code (a wrapper around the Node service), and, read at
//! scrape time, volumes mounted, registry entries, the push stream's state,
//! the invalidations it received and applied, and the Resolve answers not
//! applied because they predated an applied invalidation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::{Request, Response, Status};

use crate::csi::converge::push::PushState;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::node_server::Node;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `NodePublishVolume` or `NodeUnpublishVolume`.
    pub method: &'static str,
    /// The gRPC status code, e.g. `PermissionDenied`.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The call metrics, shared by the wrapper.
#[derive(Clone)]
pub struct NodeMetrics {
    publish_seconds: Histogram,
    unpublish_seconds: Histogram,
    errors: Family<ErrorLabels, Counter>,
}

impl NodeMetrics {
    /// Registers the call metrics and a collector of the node's state
    /// (`volumes`: how many volumes are tracked now; `stale_answers`: how
    /// many Resolve answers were asked again instead of applied).
    pub fn register(
        registry: &mut Registry,
        push: Arc<PushState>,
        registry_dir: PathBuf,
        volumes: impl Fn() -> usize + Send + Sync + 'static,
        stale_answers: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        // 0.5 ms .. ~4 s
        let buckets = || Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let m = NodeMetrics {
            publish_seconds: buckets(),
            unpublish_seconds: buckets(),
            errors: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("scopehold_node");
        r.register(
            "publish_duration_seconds",
            "NodePublishVolume from arrival to answer, successful or not",
            m.publish_seconds.clone(),
        );
        r.register(
            "unpublish_duration_seconds",
            "NodeUnpublishVolume from arrival to answer, successful or not",
            m.unpublish_seconds.clone(),
        );
        r.register(
            "errors",
            "Failed Node calls by method and gRPC code",
            m.errors.clone(),
        );
        r.register_collector(Box::new(StateCollector {
            push,
            registry_dir,
            volumes: Box::new(volumes),
            stale_answers: Box::new(stale_answers),
        }));
        m
    }

    fn observe<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let seconds = started.elapsed().as_secs_f64();
        match method {
            "NodePublishVolume" => self.publish_seconds.observe(seconds),
            _ => self.unpublish_seconds.observe(seconds),
        }
        if let Err(status) = result {
            self.errors
                .get_or_create(&ErrorLabels {
                    method,
                    code: format!("{:?}", status.code()),
                })
                .inc();
        }
    }
}

/// The state read at scrape time.
struct StateCollector {
    push: Arc<PushState>,
    registry_dir: PathBuf,
    volumes: Box<dyn Fn() -> usize + Send + Sync>,
    stale_answers: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector")
            .field("registry_dir", &self.registry_dir)
            .finish_non_exhaustive()
    }
}

impl StateCollector {
    /// Registry entries on disk (one file per published volume; a readdir,
    /// no file is read).
    fn registry_entries(&self) -> i64 {
        std::fs::read_dir(&self.registry_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .count() as i64
            })
            .unwrap_or(0)
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)
        };
        gauge(
            &mut encoder,
            "volumes_mounted",
            "Volumes this plugin publishes and keeps current",
            i64::try_from((self.volumes)()).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "registry_entries",
            "Entries in the on-disk registry of published volumes",
            self.registry_entries(),
        )?;
        gauge(
            &mut encoder,
            "push_stream_connected",
            "1 while the custody invalidation stream is open, else 0",
            i64::from(self.push.connected()),
        )?;
        let received = encoder.encode_descriptor(
            "invalidations_received",
            "Invalidations received from custody",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.push.received()).encode(received)?;
        let mut applied = encoder.encode_descriptor(
            "invalidations_applied",
            "Invalidations that concerned at least one volume here (RESYNC always), by kind",
            None,
            MetricType::Counter,
        )?;
        for (kind, count) in self.push.applied() {
            let labels = KindLabel {
                kind: kind.to_owned(),
            };
            ConstCounter::new(count).encode(applied.encode_family(&labels)?)?;
        }
        let stale = encoder.encode_descriptor(
            "stale_answers",
            "Resolve answers older than an invalidation already applied to the volume: asked again, never applied",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new((self.stale_answers)()).encode(stale)?;
        Ok(())
    }
}

/// The Node service with its calls timed and its errors counted.
/// Without metrics (no `--metrics-listen`) it only delegates.
pub struct Metered<N> {
    inner: N,
    metrics: Option<NodeMetrics>,
}

impl<N> Metered<N> {
    pub fn new(inner: N, metrics: Option<NodeMetrics>) -> Self {
        Metered { inner, metrics }
    }

    fn observe<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        if let Some(m) = &self.metrics {
            m.observe(method, started, result);
        }
    }
}

#[tonic::async_trait]
impl<N: Node> Node for Metered<N> {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        self.inner.node_stage_volume(request).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        self.inner.node_unstage_volume(request).await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let started = Instant::now();
        let result = self.inner.node_publish_volume(request).await;
        self.observe("NodePublishVolume", started, &result);
        result
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let started = Instant::now();
        let result = self.inner.node_unpublish_volume(request).await;
        self.observe("NodeUnpublishVolume", started, &result);
        result
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        self.inner.node_get_volume_stats(request).await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        self.inner.node_expand_volume(request).await
    }

    async fn node_get_capabilities(
        &self,
        request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        self.inner.node_get_capabilities(request).await
    }

    async fn node_get_info(
        &self,
        request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        self.inner.node_get_info(request).await
    }
}

//! Keeping published volumes current, and the state the Node service
//! shares with it.
//!
//! - [`NodeService`]: the plugin's shared state (config, custody client,
//!   mounter, registry, locks, the in-memory volume table, the work queue).
//!   The gRPC handlers ([`crate::csi::grpc::node`]) and everything here are
//!   methods on it; it is defined here, below the gRPC surface, so that
//!   convergence never imports the handlers.
//! - [`steps`]: converging one volume (republish, push, expiry) without
//!   unmounting it.
//! - [`work`]: per-volume work queues.
//! - [`payload`]: custody's answer checked and turned into files.
//! - [`push`]: the invalidation stream from custody.
//! - [`order`]: an answer from custody older than an invalidation already
//!   applied to the volume is asked again, never applied.
//! - [`expiry`]: the local timer that withdraws expired grants.
//! - [`resolver`]: the custody client behind the [`resolver::Resolver`] seam.
//! - [`reports`]: what the plugin changed in running pods, sent to custody
//!   to become Kubernetes Events.

use std::fmt;
use std::sync::Arc;

pub mod expiry;
pub mod order;
pub mod payload;
pub mod push;
pub mod reports;
pub mod resolver;
pub mod steps;
pub mod work;

pub use steps::Converged;
pub use work::{Work, WorkQueue};

use reports::ReportSink;
use resolver::Resolver;

use super::volume::locks::KeyedLocks;
use super::volume::mounter::Mounter;
use super::volume::registry::Registry;
use super::volume::table::VolumeTable;
use super::volume::target_path::TargetPathPolicy;

/// How long a replaced version of a volume's files stays in place after a
/// rotation (see [`crate::csi::volume::atomic_writer::Retiring`]): a reader that resolved
/// `..data` just before the swap never sees a missing file. The writer does
/// not wait for it; a timer retires the version.
pub(crate) const RETIRE_DELAY: std::time::Duration = std::time::Duration::from_millis(50);
/// Concurrent custody calls of the push path and republishes together
/// (a rotation can touch every volume on the node at once).
const MAX_CONCURRENT_CUSTODY_CALLS: usize = 8;

/// Settings of the Node service.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name: NodeGetInfo's `node_id` and the `node_name` sent to
    /// custody.
    pub node_name: String,
    /// Which target paths are accepted.
    pub target_paths: TargetPathPolicy,
    /// Size limit of each volume's tmpfs.
    pub tmpfs_size_bytes: u64,
}

impl NodeConfig {
    /// The most file content one volume may hold: half the tmpfs, so that a
    /// rotation (old and new version side by side) always fits.
    pub fn payload_limit_bytes(&self) -> u64 {
        crate::api::validation::volume_payload_limit(self.tmpfs_size_bytes)
    }
}

/// The CSI Node service. Cheap to clone: the clones share everything (the
/// push path and the expiry timer hold one each).
pub struct NodeService<R> {
    pub(crate) config: NodeConfig,
    pub(crate) resolver: Arc<R>,
    pub(crate) mounter: Mounter,
    pub(crate) registry: Registry,
    pub(crate) locks: KeyedLocks,
    pub(crate) volumes: VolumeTable,
    pub(crate) work: WorkQueue,
    pub(crate) custody_permits: Arc<tokio::sync::Semaphore>,
    pub(crate) reports: ReportSink,
    pub(crate) floors: order::Floors,
}

impl<R> Clone for NodeService<R> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            resolver: self.resolver.clone(),
            mounter: self.mounter.clone(),
            registry: self.registry.clone(),
            locks: self.locks.clone(),
            volumes: self.volumes.clone(),
            work: self.work.clone(),
            custody_permits: self.custody_permits.clone(),
            reports: self.reports.clone(),
            floors: self.floors.clone(),
        }
    }
}

impl<R> fmt::Debug for NodeService<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeService")
            .field("config", &self.config)
            .field("mounter", &self.mounter)
            .field("registry", &self.registry)
            .field("volumes", &self.volumes.len())
            .finish_non_exhaustive()
    }
}

/// A fresh random id that correlates the plugin's and custody's records.
pub fn new_request_id() -> String {
    let mut bytes = [0_u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness (should not happen on Linux): time and a hash
        // with per-process random keys still make collisions unlikely.
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos())
                .unwrap_or_default(),
        );
        bytes[..8].copy_from_slice(&hasher.finish().to_le_bytes());
    }
    hex::encode(bytes)
}

/// Runs blocking file-system and mount work off the async threads.
pub(crate) async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
    task_error: impl FnOnce(String) -> E,
) -> Result<T, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => Err(task_error(error.to_string())),
    }
}

impl<R: Resolver> NodeService<R> {
    pub fn new(config: NodeConfig, resolver: Arc<R>, mounter: Mounter, registry: Registry) -> Self {
        // Targets are resolved beneath the policy's root (the kubelet
        // directory), never walked as strings.
        let mounter = mounter.with_root(config.target_paths.root());
        Self {
            config,
            resolver,
            mounter,
            registry,
            locks: KeyedLocks::new(),
            volumes: VolumeTable::new(),
            work: WorkQueue::default(),
            custody_permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CUSTODY_CALLS)),
            reports: ReportSink::default(),
            floors: order::Floors::default(),
        }
    }

    /// Sends what the plugin changes in running pods to `reports` (custody
    /// turns them into Events); without it they are only audit lines.
    pub fn with_reports(mut self, reports: ReportSink) -> Self {
        self.reports = reports;
        self
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The published volumes as this plugin tracks them.
    pub fn volumes(&self) -> &VolumeTable {
        &self.volumes
    }

    pub fn resolver(&self) -> &Arc<R> {
        &self.resolver
    }
}

#[cfg(test)]
mod tests;

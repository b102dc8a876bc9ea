//! Leader election on a `coordination.k8s.io` Lease. Every replica keeps its
//! caches warm and serves custody; only the lease holder reconciles and writes
//! controller status.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the lease lives and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's name in `holderIdentity` (the pod name in a cluster).
    pub identity: String,
    /// A holder that has not renewed for this long loses the lease.
    pub duration_seconds: u64,
    /// The holder renews this long before the lease would run out.
    pub grace_seconds: u64,
}

/// Tells whether this replica leads, and lets it go on shutdown.
pub struct Leadership {
    pub is_leader: watch::Receiver<bool>,
    task: Option<JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>>,
}

impl Leadership {
    /// Always the leader: a single replica without election.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // The receiver reports "closed" once the sender is gone, but the last
        // value stays readable; leak nothing by dropping the sender here.
        drop(tx);
        Leadership {
            is_leader: rx,
            task: None,
        }
    }

    /// Starts competing for the lease in the background.
    pub async fn elect(
        client: Client,
        settings: &LeaseSettings,
    ) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, &settings.name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            .with_duration(settings.duration_seconds)
            .with_grace(settings.grace_seconds)
            .with_field_manager("scopehold-controller-lease")
            .build()
            .await?;
        let (is_leader, task) = manager.watch().await;
        Ok(Leadership {
            is_leader,
            task: Some(task),
        })
    }

    /// Releases the lease (so another replica takes over at once rather than
    /// after the lease duration) and waits briefly for that to happen.
    pub async fn release(mut self) {
        let Some(task) = self.task.take() else { return };
        drop(self.is_leader);
        match tokio::time::timeout(std::time::Duration::from_secs(3), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("lease released"),
            Ok(Ok(Err(error))) => tracing::warn!(%error, "releasing the lease failed"),
            Ok(Err(error)) => tracing::warn!(%error, "lease task failed"),
            Err(_) => tracing::warn!("lease not released within 3 s"),
        }
    }
}

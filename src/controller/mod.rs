//! The controller: reconciles SecretGrants and AgentIdentities.
//!
//! Both controllers read shared reflector stores. Each watch stream updates
//! its store *before* it triggers anything, and cross-kind triggers are sent
//! from those same streams, so a reconcile never reads a store that is older
//! than the event that woke it (which separate `watches()` streams would not
//! guarantee).

mod changes;
pub mod events;
mod grant;
pub mod http;
mod identity;
pub mod leader;
pub mod metrics;
mod streams;
pub mod watch_health;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::watcher;

use crate::caches::{CacheWriters, Caches};
use crate::event_series::EventSink;
use crate::secrets::SecretCacheError;

pub use metrics::Metrics;
pub use watch_health::WatchHealth;

/// Server-side-apply field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "scopehold-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Secret(#[from] SecretCacheError),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("encoding status: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Settings of one controller process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only this namespace is watched; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Instance name in Events (`reportingInstance`), usually the pod name.
    pub instance: Option<String>,
    /// Reconciles in flight at most, per kind.
    pub concurrency: u16,
    /// Size of each node plugin volume's tmpfs (the node plugin's
    /// `--tmpfs-size`): a grant whose files alone cannot fit is `Invalid`.
    pub volume_size_limit_bytes: u64,
}

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    /// The controller fields of the last status this process wrote, per
    /// object: the store may not show our own write yet when the next
    /// reconcile comes, and must not make us write (and announce) it twice.
    pub written: std::sync::Mutex<std::collections::HashMap<String, (u64, serde_json::Value)>>,
    /// Whether this replica holds the lease; followers reconcile nothing.
    pub is_leader: tokio::sync::watch::Receiver<bool>,
    pub caches: Caches,
    /// The controller's Event writer (see [`event_sink`]).
    pub events: EventSink,
    pub metrics: Arc<Metrics>,
    /// See [`Settings::volume_size_limit_bytes`].
    pub volume_size_limit_bytes: u64,
}

impl Context {
    /// The status to compare against: the store's, unless this process wrote
    /// a newer one that the store has not shown yet (resourceVersions are
    /// etcd revisions, so a lower one in the store is an older state).
    pub fn current_status<S: serde::de::DeserializeOwned>(
        &self,
        meta: &kube::api::ObjectMeta,
        stored: Option<S>,
    ) -> Option<S> {
        let uid = meta.uid.as_deref()?;
        let store_rv = meta
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let ours = self.written.lock().ok().and_then(|w| w.get(uid).cloned());
        match ours {
            Some((rv, status)) if rv > store_rv => serde_json::from_value(status).ok().or(stored),
            _ => stored,
        }
    }

    /// Remembers a status this process wrote, with the object's new version.
    pub fn remember_written<S: serde::Serialize>(
        &self,
        written: &kube::api::ObjectMeta,
        status: &S,
    ) {
        let (Some(uid), Some(rv)) = (
            written.uid.as_deref(),
            written
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return;
        };
        if let (Ok(mut w), Ok(value)) = (self.written.lock(), serde_json::to_value(status)) {
            w.insert(uid.to_owned(), (rv, value));
        }
    }

    /// Followers keep their caches warm but write nothing.
    pub fn leads(&self) -> bool {
        *self.is_leader.borrow()
    }
}

fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: kube::Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    tracing::warn!(%error, %kind, name = obj.meta().name.as_deref().unwrap_or(""), "reconcile failed; retrying");
    ctx.metrics.failed(if kind == grant::KIND {
        grant::KIND
    } else {
        identity::KIND
    });
    Action::requeue(Duration::from_secs(2))
}

/// The controller's own Event writer, reporting as [`FIELD_MANAGER`]: its
/// owner runs the flusher ([`EventSink::run`]) and closes it on shutdown.
/// `instance` is [`Settings::instance`].
pub fn event_sink(client: Client, instance: Option<String>) -> EventSink {
    EventSink::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        },
    )
}

/// Runs both controllers and the Secret watch until a shutdown signal.
/// `ready` is set once both stores hold their first full list.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    events: EventSink,
    caches: Caches,
    writers: CacheWriters,
    ready: Arc<std::sync::atomic::AtomicBool>,
    is_leader: tokio::sync::watch::Receiver<bool>,
    health: Arc<WatchHealth>,
) {
    let (grant_tx, grant_rx) = futures::channel::mpsc::unbounded();
    let (identity_tx, identity_rx) = futures::channel::mpsc::unbounded();
    let namespace = settings.namespace.as_deref();
    let wc = watcher::Config::default();

    let grant_stream = streams::grants(
        &client,
        namespace,
        wc.clone(),
        writers.grants,
        caches.clone(),
        identity_tx.clone(),
        writers.sync.clone(),
        health.clone(),
    );
    let identity_stream = streams::identities(
        &client,
        namespace,
        wc.clone(),
        writers.identities,
        caches.clone(),
        identity_tx,
        grant_tx.clone(),
        writers.sync,
        health.clone(),
    );
    let secret_watch = streams::secrets(
        client.clone(),
        namespace.map(str::to_owned),
        wc,
        caches.clone(),
        grant_tx,
        health,
    );

    let ctx = Arc::new(Context {
        client,
        written: Default::default(),
        is_leader: is_leader.clone(),
        caches: caches.clone(),
        events,
        metrics,
        volume_size_limit_bytes: settings.volume_size_limit_bytes,
    });

    // Becoming the leader reconciles everything: a follower skipped it all.
    let became_leader = || {
        tokio_stream::wrappers::WatchStream::new(is_leader.clone()).filter_map(|leading| {
            if leading {
                tracing::info!("leading: reconciling every object");
            }
            futures::future::ready(leading.then_some(()))
        })
    };
    // Bounded: unbounded reconciles opened one connection each (6,199 at a
    // 5,000-grant start) and timed the API server out (BENCHMARKS.md).
    let config =
        || kube::runtime::controller::Config::default().concurrency(settings.concurrency.max(1));
    let grants = Controller::for_stream(grant_stream, caches.grants.clone())
        .with_config(config())
        .trigger_backoff(watch_health::NoExtraBackoff)
        .reconcile_on(grant_rx)
        .reconcile_all_on(became_leader())
        .shutdown_on_signal()
        .run(grant::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let identities = Controller::for_stream(identity_stream, caches.identities.clone())
        .with_config(config())
        .trigger_backoff(watch_health::NoExtraBackoff)
        .reconcile_on(identity_rx)
        .reconcile_all_on(became_leader())
        .shutdown_on_signal()
        .run(identity::reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(async move {
        caches.synced().await;
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("caches synced; reconciling");
    });
    // The controllers end on SIGTERM/SIGINT (shutdown_on_signal); the Secret
    // watch never ends by itself and is dropped with them.
    tokio::select! {
        _ = futures::future::join(grants, identities) => {}
        _ = secret_watch => {}
    }
}

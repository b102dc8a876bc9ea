//! In-memory views of the cluster shared by the controller and the custody
//! service in one process: grant and identity stores, the granted-Secret cache
//! and whether the stores hold a full list yet.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use tokio::sync::{broadcast, watch};

use crate::api::{AgentIdentity, SecretGrant};
use crate::digest::DigestKey;
use crate::policy::store_index::StoreIndex;
use crate::secrets::SecretCache;
use crate::store_versions::{StoreVersions, Versions};

/// Read side, cheap to clone.
#[derive(Clone)]
pub struct Caches {
    pub grants: Store<SecretGrant>,
    pub identities: Store<AgentIdentity>,
    pub secrets: Arc<SecretCache>,
    /// Changes that affect what pods may hold, published by the watch
    /// streams after the stores applied them; custody streams them to the
    /// node plugins.
    pub changes: broadcast::Sender<Change>,
    synced: watch::Receiver<bool>,
    /// Names by agent, Secret and ServiceAccount, kept by the watch streams.
    index: Arc<RwLock<StoreIndex>>,
    /// The resourceVersion each watch has applied to the stores (custody's
    /// Resolve answers carry it; see [`crate::store_versions`]).
    pub versions: Arc<StoreVersions>,
}

/// What kind of change happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Revoked,
    Expired,
    Suspended,
    Rotated,
    Deleted,
    Conflict,
    Changed,
}

/// A change that may alter what mounted volumes should hold. Names only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub namespace: String,
    pub agent: Option<String>,
    pub grant: Option<String>,
    pub secret: Option<String>,
    pub content_digest: Option<String>,
    /// The version of the watch event that caused it, in that event's kind
    /// (all 0: unknown).
    pub versions: Versions,
}

impl Change {
    pub fn new(kind: ChangeKind, namespace: &str) -> Self {
        Change {
            kind,
            namespace: namespace.to_owned(),
            agent: None,
            grant: None,
            secret: None,
            content_digest: None,
            versions: Versions::default(),
        }
    }
}

/// Buffered changes per subscriber; one that falls further behind is told to
/// resynchronise instead.
const CHANGE_BUFFER: usize = 4096;

/// Write side, consumed by the watch streams.
pub struct CacheWriters {
    pub grants: Writer<SecretGrant>,
    pub identities: Writer<AgentIdentity>,
    pub sync: SyncTracker,
}

/// Creates empty caches and their writers; content digests of the cached
/// values are keyed with `digest_key`.
pub fn new(digest_key: DigestKey) -> (Caches, CacheWriters) {
    let (grants, grant_writer) = reflector::store::<SecretGrant>();
    let (identities, identity_writer) = reflector::store::<AgentIdentity>();
    let sync = SyncTracker::new();
    let caches = Caches {
        grants,
        identities,
        secrets: Arc::new(SecretCache::new(digest_key)),
        changes: broadcast::channel(CHANGE_BUFFER).0,
        synced: sync.subscribe(),
        index: Arc::default(),
        versions: Arc::default(),
    };
    let writers = CacheWriters {
        grants: grant_writer,
        identities: identity_writer,
        sync,
    };
    (caches, writers)
}

impl Caches {
    /// Waits until both stores hold a full list. A tokio watch, not
    /// `Store::wait_until_ready`: the latter keeps only the last waiter's
    /// waker, so a second waiter (ours beside kube's applier, or concurrent
    /// reconciles) can sleep forever.
    pub async fn synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|synced| *synced).await;
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Publishes a change; nobody listening is fine.
    pub fn publish(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    /// Changes the index (the watch streams do, after the store applied the
    /// same event).
    pub fn update_index(&self, edit: impl FnOnce(&mut StoreIndex)) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        edit(&mut index);
    }

    fn index_lookup(&self, lookup: impl FnOnce(&StoreIndex) -> Vec<String>) -> Vec<String> {
        lookup(&self.index.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The identities in `namespace` that claim `service_account`, by name.
    pub fn identities_claiming(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Vec<Arc<AgentIdentity>> {
        self.index_lookup(|i| i.identities_claiming(namespace, service_account))
            .into_iter()
            .filter_map(|name| {
                self.identities
                    .get(&ObjectRef::new(&name).within(namespace))
            })
            // A renamed ServiceAccount the index has not caught up with.
            .filter(|i| i.spec.service_account_name == service_account)
            .collect()
    }

    /// The grants of `agent` in `namespace`, by name.
    pub fn grants_of_agent(&self, namespace: &str, agent: &str) -> Vec<Arc<SecretGrant>> {
        self.grants_by_names(
            namespace,
            self.index_lookup(|i| i.grants_of_agent(namespace, agent)),
        )
        .filter(|g| g.spec.agent == agent)
        .collect()
    }

    /// The grants in `namespace` that read Secret `secret`, by name.
    pub fn grants_for_secret(&self, namespace: &str, secret: &str) -> Vec<Arc<SecretGrant>> {
        self.grants_by_names(
            namespace,
            self.index_lookup(|i| i.grants_for_secret(namespace, secret)),
        )
        .filter(|g| g.spec.secret_name == secret)
        .collect()
    }

    /// Whether any grant in `namespace` reads Secret `secret`.
    pub fn secret_is_referenced(&self, namespace: &str, secret: &str) -> bool {
        !self.grants_for_secret(namespace, secret).is_empty()
    }

    fn grants_by_names(
        &self,
        namespace: &str,
        names: Vec<String>,
    ) -> impl Iterator<Item = Arc<SecretGrant>> {
        names
            .into_iter()
            .filter_map(|name| self.grants.get(&ObjectRef::new(&name).within(namespace)))
    }
}

/// Tracks when both stores hold a full list, from the streams' own `InitDone`
/// events (seen after the store applied them).
#[derive(Clone)]
pub struct SyncTracker {
    grants: Arc<AtomicBool>,
    identities: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
}

impl SyncTracker {
    fn new() -> Self {
        SyncTracker {
            grants: Arc::default(),
            identities: Arc::default(),
            tx: Arc::new(watch::channel(false).0),
        }
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    pub fn grants_listed(&self) {
        self.mark(&self.grants);
    }

    pub fn identities_listed(&self) {
        self.mark(&self.identities);
    }

    fn mark(&self, flag: &AtomicBool) {
        flag.store(true, SeqCst);
        if self.grants.load(SeqCst) && self.identities.load(SeqCst) {
            self.tx.send_replace(true);
        }
    }
}

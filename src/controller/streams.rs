//! Watch streams that feed the stores and send cross-kind triggers.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;

use futures::channel::mpsc::UnboundedSender;
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::changes::{GrantSnapshot, IdentitySnapshot, grant_change, identity_change};
use super::watch_health::{Probe, WatchHealth, watch_with_health};
use crate::api::{AgentIdentity, SecretGrant};
use crate::caches::{Caches, Change, ChangeKind, SyncTracker};
use crate::secrets::CachedSecret;
use crate::store_versions::{Versions, Watched, parse_resource_version};

/// Watches `K` as untyped objects and converts each one, so that a single
/// malformed object is reported and skipped instead of failing the whole list
/// (which would stall the controller for every other object).
fn typed_watch<K>(
    client: &Client,
    namespace: Option<&str>,
    wc: watcher::Config,
    health: Arc<WatchHealth>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Placeholder + Clone + Debug + Send + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let resource = K::plural(&()).into_owned();
    let resource: &'static str = if resource == "secretgrants" {
        "secretgrants"
    } else {
        "agentidentities"
    };
    let probe = list_probe(api.clone());
    watch_with_health(resource, health, probe, watcher(api, wc)).filter_map(|item| {
        futures::future::ready(match item {
            Ok(event) => typed_event::<K>(event).map(Ok),
            Err(error) => Some(Err(error)),
        })
    })
}

/// A one-item list of `api`'s resource: does the API server answer?
fn list_probe<K>(api: Api<K>) -> Probe
where
    K: Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    Box::new(move || {
        let api = api.clone();
        Box::pin(async move {
            api.list_metadata(&kube::api::ListParams::default().limit(1))
                .await
                .is_ok()
        })
    })
}

/// An object that can stand for one whose stored form no longer parses, so
/// that the store forgets it (fail closed) instead of keeping its last good
/// copy, which custody would otherwise go on honouring.
pub(super) trait Placeholder {
    fn placeholder(meta: kube::api::ObjectMeta) -> Self;
}

impl Placeholder for SecretGrant {
    fn placeholder(meta: kube::api::ObjectMeta) -> Self {
        let mut grant = SecretGrant::new("", Default::default());
        grant.metadata = meta;
        grant
    }
}

impl Placeholder for AgentIdentity {
    fn placeholder(meta: kube::api::ObjectMeta) -> Self {
        let mut identity = AgentIdentity::new("", Default::default());
        identity.metadata = meta;
        identity
    }
}

fn typed_event<K>(event: Event<DynamicObject>) -> Option<Event<K>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Placeholder,
{
    // Ok(typed), or Err(placeholder) for an object that does not parse.
    let parse = |object: DynamicObject| {
        let (namespace, name) = (object.namespace(), object.name_any());
        let meta = object.metadata.clone();
        object.try_parse::<K>().map_err(|error| {
            tracing::warn!(
                kind = %K::kind(&()),
                namespace = namespace.as_deref().unwrap_or(""),
                name,
                %error,
                "skipping malformed object"
            );
            K::placeholder(meta)
        })
    };
    match event {
        Event::Apply(o) => Some(match parse(o) {
            Ok(k) => Event::Apply(k),
            Err(placeholder) => Event::Delete(placeholder),
        }),
        // During a (re)list an unparseable object is simply left out.
        Event::InitApply(o) => parse(o).ok().map(Event::InitApply),
        Event::Delete(o) => Some(Event::Delete(
            parse(o).unwrap_or_else(|placeholder| placeholder),
        )),
        Event::Init => Some(Event::Init),
        Event::InitDone => Some(Event::InitDone),
    }
}

/// A (re)list in progress: the (namespace, name) keys listed so far and the
/// changes to announce at its end.
type Relist<P> = (HashSet<(String, String)>, Vec<P>);

/// What one event, or a whole relist, tells the node plugins and the
/// controllers: every change and every object to re-evaluate goes out once,
/// however many of the batch's events touch it (a repeated change keeps the
/// highest version of each kind). A relist after an outage may find hundreds
/// of new identities on one ServiceAccount, each of which names all the
/// others as peers: sent one by one that was quadratic, and overflowed the
/// invalidation buffer, so a suspension in the same relist could reach the
/// node plugins only as a RESYNC.
#[derive(Default)]
struct Batch {
    changes: Vec<Change>,
    /// Index in `changes` by everything but the versions.
    index: HashMap<ChangeKey, usize>,
    identities: HashSet<ObjectRef<AgentIdentity>>,
    grants: HashSet<ObjectRef<SecretGrant>>,
}

type ChangeKey = (
    ChangeKind,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl Batch {
    fn change(&mut self, change: Change) {
        let key = (
            change.kind,
            change.namespace.clone(),
            change.agent.clone(),
            change.grant.clone(),
            change.secret.clone(),
            change.content_digest.clone(),
        );
        match self.index.get(&key) {
            Some(&at) => {
                let held = &mut self.changes[at].versions;
                held.grants = held.grants.max(change.versions.grants);
                held.identities = held.identities.max(change.versions.identities);
                held.secrets = held.secrets.max(change.versions.secrets);
            }
            None => {
                self.index.insert(key, self.changes.len());
                self.changes.push(change);
            }
        }
    }

    /// Publishes the changes (in the order first seen) and queues each
    /// object once.
    fn send(
        self,
        caches: &Caches,
        identity_tx: &UnboundedSender<ObjectRef<AgentIdentity>>,
        grant_tx: Option<&UnboundedSender<ObjectRef<SecretGrant>>>,
    ) {
        for change in self.changes {
            caches.publish(change);
        }
        for identity in self.identities {
            let _ = identity_tx.unbounded_send(identity);
        }
        if let Some(grant_tx) = grant_tx {
            for grant in self.grants {
                let _ = grant_tx.unbounded_send(grant);
            }
        }
    }
}

/// An object's resourceVersion as a number (0: unknown).
fn version_of<K: Resource>(object: &K) -> u64 {
    parse_resource_version(object.meta().resource_version.as_deref()).unwrap_or(0)
}

/// The highest version a (re)list has shown so far. Listed objects come in
/// name order, not version order, so the watch's version advances to it
/// only when the list is complete (and the store swapped it in).
#[derive(Default)]
struct ListedVersion(u64);

impl ListedVersion {
    fn saw(&mut self, version: u64) {
        self.0 = self.0.max(version);
    }

    /// Advances `kind` to the highest listed version and starts over.
    fn complete(&mut self, caches: &Caches, kind: Watched) {
        caches.versions.advance(kind, std::mem::take(&mut self.0));
    }
}

/// What the grant stream last saw of a grant: enough to announce its
/// disappearance when a relist no longer lists it.
#[derive(Clone)]
struct KnownGrant {
    snapshot: GrantSnapshot,
    agent: String,
    secret: String,
}

/// A change seen while (re)listing: held until `InitDone`, because the
/// reflector store swaps the new list in only then, and custody (which the
/// node plugins ask again on every change) must not answer from the old one.
struct PendingGrant {
    namespace: String,
    name: String,
    known: KnownGrant,
    digest: Option<String>,
    kind: Option<ChangeKind>,
    /// The grant watch's version of the change.
    version: u64,
}

/// Adds one grant change the store already holds to `batch`: for the node
/// plugins (through `caches.changes`) and the identity controller.
fn announce_grant(caches: &Caches, batch: &mut Batch, pending: PendingGrant, deleted: bool) {
    let PendingGrant {
        namespace: ns,
        name,
        known,
        digest,
        kind,
        version,
    } = pending;
    if let Some(kind) = kind {
        let mut change = Change::new(kind, &ns);
        change.versions = Versions::of(Watched::Grants, version);
        change.agent = Some(known.agent.clone());
        change.grant = Some(name);
        change.secret = Some(known.secret.clone());
        change.content_digest = digest;
        batch.change(change);
    }
    batch
        .identities
        .insert(ObjectRef::new(&known.agent).within(&ns));
    if deleted && !caches.secret_is_referenced(&ns, &known.secret) {
        caches.secrets.remove(&ns, &known.secret);
    }
}

/// SecretGrants: fill the grant store; tell the identity controller about
/// every grant change (its access list); prune unreferenced Secrets.
///
/// A relist (after a 410, or whenever the watcher starts over) is a full
/// resync: what changed while the watch was down is announced as if seen
/// live, and grants it no longer lists are announced as deleted.
#[allow(clippy::too_many_arguments)]
pub(super) fn grants(
    client: &Client,
    namespace: Option<&str>,
    wc: watcher::Config,
    writer: Writer<SecretGrant>,
    caches: Caches,
    identity_tx: UnboundedSender<ObjectRef<AgentIdentity>>,
    sync: SyncTracker,
    health: Arc<WatchHealth>,
) -> impl Stream<Item = Result<SecretGrant, watcher::Error>> + Send + 'static {
    let mut seen: HashMap<(String, String), KnownGrant> = HashMap::new();
    // During a (re)list: the keys listed so far and the changes to announce.
    let mut relist: Option<Relist<PendingGrant>> = None;
    let mut listed_version = ListedVersion::default();
    let mut listed_once = false;
    typed_watch::<SecretGrant>(client, namespace, wc, health)
        .reflect(writer)
        .inspect_ok(move |event| {
            index_grant_event(&caches, event);
            let (grant, deleted) = match event {
                Event::Apply(g) => (g, false),
                Event::Delete(g) => (g, true),
                Event::InitApply(g) => {
                    listed_version.saw(version_of(g));
                    let Some(ns) = g.namespace() else { return };
                    let key = (ns.clone(), g.name_any());
                    let known = KnownGrant {
                        snapshot: GrantSnapshot::of(g),
                        agent: g.spec.agent.clone(),
                        secret: g.spec.secret_name.clone(),
                    };
                    let previous = seen.insert(key.clone(), known.clone());
                    let kind = grant_change(previous.as_ref().map(|p| &p.snapshot), &known.snapshot);
                    let (listed, pending) = relist.get_or_insert_with(Default::default);
                    listed.insert(key.clone());
                    // The first list announces nothing: nobody holds anything yet.
                    if listed_once && previous.map(|p| p.snapshot) != Some(known.snapshot.clone()) {
                        pending.push(PendingGrant {
                            namespace: key.0,
                            name: key.1,
                            known,
                            digest: g.status.as_ref().and_then(|s| s.content_digest.clone()),
                            kind,
                            version: version_of(g),
                        });
                    }
                    return;
                }
                Event::Init => {
                    relist = Some(Default::default());
                    listed_version = ListedVersion::default();
                    return;
                }
                Event::InitDone => {
                    let (listed, pending) = relist.take().unwrap_or_default();
                    listed_version.complete(&caches, Watched::Grants);
                    if listed_once {
                        let vanished: Vec<(String, String)> =
                            seen.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                        let mut batch = Batch::default();
                        for key in vanished {
                            let Some(known) = seen.remove(&key) else { continue };
                            tracing::info!(namespace = %key.0, grant = %key.1, "grant deleted while the watch was down");
                            let (namespace, name) = key;
                            // The list's own version is not known here: the
                            // highest listed one stands for it.
                            let gone = PendingGrant {
                                namespace,
                                name,
                                known,
                                digest: None,
                                kind: Some(ChangeKind::Deleted),
                                version: caches.versions.get(Watched::Grants),
                            };
                            announce_grant(&caches, &mut batch, gone, true);
                        }
                        for change in pending {
                            announce_grant(&caches, &mut batch, change, false);
                        }
                        batch.send(&caches, &identity_tx, None);
                    }
                    listed_once = true;
                    return sync.grants_listed();
                }
            };
            caches.versions.advance(Watched::Grants, version_of(grant));
            let Some(ns) = grant.namespace() else { return };
            let key = (ns.clone(), grant.name_any());
            let known = KnownGrant {
                snapshot: GrantSnapshot::of(grant),
                agent: grant.spec.agent.clone(),
                secret: grant.spec.secret_name.clone(),
            };
            let (kind, changed) = if deleted {
                seen.remove(&key);
                (Some(ChangeKind::Deleted), true)
            } else {
                let previous = seen.insert(key, known.clone());
                let previous = previous.map(|p| p.snapshot);
                (
                    grant_change(previous.as_ref(), &known.snapshot),
                    previous.as_ref() != Some(&known.snapshot),
                )
            };
            // Status-only updates (resolution counts) leave the agent's access
            // list as it is: only a changed phase, spec or digest wakes it.
            if !changed {
                return;
            }
            let change = PendingGrant {
                namespace: ns,
                name: grant.name_any(),
                known,
                digest: grant.status.as_ref().and_then(|s| s.content_digest.clone()),
                kind,
                version: version_of(grant),
            };
            let mut batch = Batch::default();
            announce_grant(&caches, &mut batch, change, deleted);
            batch.send(&caches, &identity_tx, None);
        })
        .touched_objects()
}

/// An identity change to announce (live, or at the end of a relist).
struct PendingIdentity {
    namespace: String,
    name: String,
    snapshot: IdentitySnapshot,
    previous: Option<IdentitySnapshot>,
    kind: Option<ChangeKind>,
    deleted: bool,
    /// The identity watch's version of the change.
    version: u64,
}

/// Adds an identity change the store already holds to `batch`: for the node
/// plugins, the identities that share (or shared) its ServiceAccount, and
/// the grants of all of them.
///
/// Peers are concerned only when the claim itself changes (the identity is
/// new, deleted or moved to another ServiceAccount): a suspension, a spec
/// edit or the controller's own Conflict status write concerns this agent
/// alone. (Announcing every status write to every peer made n identities on
/// one ServiceAccount cost n² changes.)
fn announce_identity(caches: &Caches, batch: &mut Batch, change: PendingIdentity) {
    let PendingIdentity {
        namespace: ns,
        name,
        snapshot,
        previous,
        kind,
        deleted,
        version,
    } = change;
    let changed = deleted || previous.as_ref() != Some(&snapshot);
    let claim_changed =
        deleted || previous.as_ref().map(|p| &p.service_account) != Some(&snapshot.service_account);
    let mut agents: HashSet<String> = HashSet::from([name.clone()]);
    if claim_changed {
        let mut service_accounts = vec![snapshot.service_account.clone()];
        service_accounts.extend(
            previous
                .map(|p| p.service_account)
                .filter(|p| *p != service_accounts[0]),
        );
        for sa in &service_accounts {
            for peer in caches.identities_claiming(&ns, sa) {
                let peer = peer.name_any();
                if peer != name {
                    batch.identities.insert(ObjectRef::new(&peer).within(&ns));
                }
                agents.insert(peer);
            }
        }
    }
    if let Some(kind) = kind {
        // Peers are affected too: a new claimant puts them in conflict
        // (fail closed at once, before any status is written).
        for agent in &agents {
            let peer_kind = if *agent == name {
                kind
            } else if agents.len() > 1 && !deleted {
                ChangeKind::Conflict
            } else {
                ChangeKind::Changed
            };
            let mut change = Change::new(peer_kind, &ns);
            change.versions = Versions::of(Watched::Identities, version);
            change.agent = Some(agent.clone());
            batch.change(change);
        }
    }
    // Identity status writes (access lists) change nothing for grants.
    if !changed {
        return;
    }
    for agent in &agents {
        for grant in caches.grants_of_agent(&ns, agent) {
            batch.grants.insert(ObjectRef::from_obj(grant.as_ref()));
        }
    }
}

/// AgentIdentities: fill the identity store; re-evaluate identities that claim
/// the same ServiceAccount (conflicts) and the grants of all of them. A relist
/// is a full resync, as for grants.
#[allow(clippy::too_many_arguments)]
pub(super) fn identities(
    client: &Client,
    namespace: Option<&str>,
    wc: watcher::Config,
    writer: Writer<AgentIdentity>,
    caches: Caches,
    identity_tx: UnboundedSender<ObjectRef<AgentIdentity>>,
    grant_tx: UnboundedSender<ObjectRef<SecretGrant>>,
    sync: SyncTracker,
    health: Arc<WatchHealth>,
) -> impl Stream<Item = Result<AgentIdentity, watcher::Error>> + Send + 'static {
    // What each identity looked like last (its ServiceAccount among it), so
    // that moving an identity to another ServiceAccount also re-evaluates its
    // former peers, and only real changes reach the node plugins.
    let mut seen: HashMap<(String, String), IdentitySnapshot> = HashMap::new();
    let mut relist: Option<Relist<PendingIdentity>> = None;
    let mut listed_version = ListedVersion::default();
    let mut listed_once = false;
    typed_watch::<AgentIdentity>(client, namespace, wc, health)
        .reflect(writer)
        .inspect_ok(move |event| {
            index_identity_event(&caches, event);
            let (identity, deleted) = match event {
                Event::Apply(i) => (i, false),
                Event::Delete(i) => (i, true),
                Event::InitApply(i) => {
                    listed_version.saw(version_of(i));
                    let Some(ns) = i.namespace() else { return };
                    let key = (ns, i.name_any());
                    let snapshot = IdentitySnapshot::of(i);
                    let previous = seen.insert(key.clone(), snapshot.clone());
                    let (listed, pending) = relist.get_or_insert_with(Default::default);
                    listed.insert(key.clone());
                    if listed_once && previous.as_ref() != Some(&snapshot) {
                        let kind = identity_change(previous.as_ref(), &snapshot);
                        pending.push(PendingIdentity {
                            namespace: key.0,
                            name: key.1,
                            snapshot,
                            previous,
                            kind,
                            deleted: false,
                            version: version_of(i),
                        });
                    }
                    return;
                }
                Event::Init => {
                    relist = Some(Default::default());
                    listed_version = ListedVersion::default();
                    return;
                }
                Event::InitDone => {
                    let (listed, pending) = relist.take().unwrap_or_default();
                    listed_version.complete(&caches, Watched::Identities);
                    if listed_once {
                        let vanished: Vec<(String, String)> =
                            seen.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                        let mut batch = Batch::default();
                        for key in vanished {
                            let Some(snapshot) = seen.remove(&key) else { continue };
                            tracing::info!(namespace = %key.0, agent = %key.1, "identity deleted while the watch was down");
                            let (namespace, name) = key;
                            let gone = PendingIdentity {
                                namespace,
                                name,
                                snapshot: snapshot.clone(),
                                previous: Some(snapshot),
                                kind: Some(ChangeKind::Deleted),
                                deleted: true,
                                version: caches.versions.get(Watched::Identities),
                            };
                            announce_identity(&caches, &mut batch, gone);
                        }
                        for change in pending {
                            announce_identity(&caches, &mut batch, change);
                        }
                        batch.send(&caches, &identity_tx, Some(&grant_tx));
                    }
                    listed_once = true;
                    return sync.identities_listed();
                }
            };
            caches.versions.advance(Watched::Identities, version_of(identity));
            let Some(ns) = identity.namespace() else {
                return;
            };
            let name = identity.name_any();
            let key = (ns.clone(), name.clone());
            let snapshot = IdentitySnapshot::of(identity);
            let (previous, kind) = if deleted {
                (seen.remove(&key), Some(ChangeKind::Deleted))
            } else {
                let kind = identity_change(seen.get(&key), &snapshot);
                (seen.insert(key, snapshot.clone()), kind)
            };
            let change = PendingIdentity {
                namespace: ns,
                name,
                snapshot,
                previous,
                kind,
                deleted,
                version: version_of(identity),
            };
            let mut batch = Batch::default();
            announce_identity(&caches, &mut batch, change);
            batch.send(&caches, &identity_tx, Some(&grant_tx));
        })
        .touched_objects()
}

/// Tells the node plugins and the grant controller that Secret `ns/name`
/// changed (`kind` Rotated) or is gone (`kind` Deleted).
fn announce_secret(
    caches: &Caches,
    grant_tx: &UnboundedSender<ObjectRef<SecretGrant>>,
    ns: &str,
    name: &str,
    kind: ChangeKind,
    version: u64,
) {
    for grant in caches.grants_for_secret(ns, name) {
        let mut change = Change::new(kind, ns);
        change.versions = Versions::of(Watched::Secrets, version);
        change.agent = Some(grant.spec.agent.clone());
        change.grant = Some(grant.name_any());
        change.secret = Some(name.to_owned());
        caches.publish(change);
        let _ = grant_tx.unbounded_send(ObjectRef::from_obj(grant.as_ref()));
    }
}

/// Secrets: keep cached (granted) Secrets fresh and re-evaluate the grants
/// that read a Secret when its data changes, it appears or it disappears.
/// Secrets nobody grants are looked at and dropped, never kept. A relist
/// announces what changed meanwhile and drops cached Secrets it no longer
/// lists (deleted while the watch was down).
pub(super) async fn secrets(
    client: Client,
    namespace: Option<String>,
    wc: watcher::Config,
    caches: Caches,
    grant_tx: UnboundedSender<ObjectRef<SecretGrant>>,
    health: Arc<WatchHealth>,
) {
    let cache = caches.secrets.clone();
    let api: Api<Secret> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let probe = list_probe(api.clone());
    let events = watch_with_health("secrets", health, probe, watcher(api, wc));
    let mut events = events.boxed();
    let mut listed: Option<HashSet<(String, String)>> = None;
    let mut listed_version = ListedVersion::default();
    let mut listed_once = false;
    while let Some(item) = events.next().await {
        let Ok(event) = item else {
            // Reported (and backed off) by watch_with_health.
            continue;
        };
        let secret = match &event {
            Event::Apply(s) | Event::Delete(s) | Event::InitApply(s) => s,
            Event::Init => {
                listed = Some(HashSet::new());
                listed_version = ListedVersion::default();
                continue;
            }
            Event::InitDone => {
                let seen = listed.take().unwrap_or_default();
                listed_version.complete(&caches, Watched::Secrets);
                if listed_once {
                    for (ns, name) in cache.names() {
                        if seen.contains(&(ns.clone(), name.clone())) {
                            continue;
                        }
                        tracing::info!(namespace = %ns, secret = %name, "granted Secret deleted while the watch was down");
                        cache.remove(&ns, &name);
                        let version = caches.versions.get(Watched::Secrets);
                        announce_secret(
                            &caches,
                            &grant_tx,
                            &ns,
                            &name,
                            ChangeKind::Deleted,
                            version,
                        );
                    }
                }
                listed_once = true;
                continue;
            }
        };
        let (Some(ns), Some(name)): (Option<String>, Option<String>) = (
            secret.metadata.namespace.clone(),
            secret.metadata.name.clone(),
        ) else {
            continue;
        };
        let version = version_of(secret);
        if matches!(event, Event::InitApply(_)) {
            listed
                .get_or_insert_with(HashSet::new)
                .insert((ns.clone(), name.clone()));
            listed_version.saw(version);
        }
        // Most Secrets in a cluster are granted to nobody: one index lookup.
        let granted = !caches.grants_for_secret(&ns, &name).is_empty();
        let changed = if matches!(event, Event::Delete(_)) {
            let was_cached = cache.contains(&ns, &name);
            cache.remove(&ns, &name);
            was_cached || granted
        } else if cache.contains(&ns, &name) {
            cache.refresh(secret)
        } else if granted {
            cache.upsert(&ns, &name, CachedSecret::from_secret(secret));
            true
        } else {
            false
        };
        // The cache holds the event now: the version advances before the
        // change is announced, so that an answer from this replica is never
        // older than its own invalidation. A listed Secret counts only at
        // the list's end (lists come in name order, not version order).
        if !matches!(event, Event::InitApply(_)) {
            caches.versions.advance(Watched::Secrets, version);
        }
        // The cache above is updated at once (it is not a reflector store),
        // so relisted changes are announced at once too; the first list
        // announces nothing.
        let live = listed_once || !matches!(event, Event::InitApply(_));
        if live && changed {
            let kind = if matches!(event, Event::Delete(_)) {
                ChangeKind::Deleted
            } else {
                ChangeKind::Rotated
            };
            announce_secret(&caches, &grant_tx, &ns, &name, kind, version);
        }
    }
}

/// Keeps the grant index in step with the store (which has applied `event`).
/// A relist ends by rebuilding it from the store, which also drops grants
/// deleted while the watch was down.
fn index_grant_event(caches: &Caches, event: &Event<SecretGrant>) {
    let fields = |g: &SecretGrant| {
        g.namespace().map(|ns| {
            (
                ns,
                g.name_any(),
                g.spec.agent.clone(),
                g.spec.secret_name.clone(),
            )
        })
    };
    match event {
        Event::Apply(g) | Event::InitApply(g) => {
            if let Some((ns, name, agent, secret)) = fields(g) {
                caches.update_index(|i| i.apply_grant(&ns, &name, &agent, &secret));
            }
        }
        Event::Delete(g) => {
            if let Some((ns, name, _, _)) = fields(g) {
                caches.update_index(|i| i.delete_grant(&ns, &name));
            }
        }
        Event::InitDone => {
            let all = caches.grants.state();
            caches.update_index(|i| {
                i.clear_grants();
                for (ns, name, agent, secret) in all.iter().filter_map(|g| fields(g)) {
                    i.apply_grant(&ns, &name, &agent, &secret);
                }
            });
        }
        Event::Init => {}
    }
}

/// [`index_grant_event`] for identities.
fn index_identity_event(caches: &Caches, event: &Event<AgentIdentity>) {
    let fields = |i: &AgentIdentity| {
        i.namespace()
            .map(|ns| (ns, i.name_any(), i.spec.service_account_name.clone()))
    };
    match event {
        Event::Apply(i) | Event::InitApply(i) => {
            if let Some((ns, name, sa)) = fields(i) {
                caches.update_index(|x| x.apply_identity(&ns, &name, &sa));
            }
        }
        Event::Delete(i) => {
            if let Some((ns, name, _)) = fields(i) {
                caches.update_index(|x| x.delete_identity(&ns, &name));
            }
        }
        Event::InitDone => {
            let all = caches.identities.state();
            caches.update_index(|x| {
                x.clear_identities();
                for (ns, name, sa) in all.iter().filter_map(|i| fields(i)) {
                    x.apply_identity(&ns, &name, &sa);
                }
            });
        }
        Event::Init => {}
    }
}
#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;
    use crate::api::AgentIdentitySpec;

    fn identity(name: &str, service_account: &str) -> AgentIdentity {
        let mut identity = AgentIdentity::new(
            name,
            AgentIdentitySpec {
                service_account_name: service_account.into(),
                ..Default::default()
            },
        );
        identity.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("team".into()),
            generation: Some(1),
            ..Default::default()
        };
        identity
    }

    /// Caches whose stores hold `identities`, as after a relist.
    fn caches_with(identities: &[AgentIdentity]) -> Caches {
        let key = crate::digest::DigestKey::from_bytes(&[7; 32]).expect("32-byte key");
        let (caches, mut writers) = crate::caches::new(key);
        writers.identities.apply_watcher_event(&Event::Init);
        for i in identities {
            writers
                .identities
                .apply_watcher_event(&Event::InitApply(i.clone()));
        }
        writers.identities.apply_watcher_event(&Event::InitDone);
        index_identity_event(&caches, &Event::InitDone);
        caches
    }

    fn new_identity(i: &AgentIdentity) -> PendingIdentity {
        PendingIdentity {
            namespace: "team".into(),
            name: i.name_any(),
            snapshot: IdentitySnapshot::of(i),
            previous: None,
            kind: Some(ChangeKind::Changed),
            deleted: false,
            version: 0,
        }
    }

    #[test]
    fn a_relist_of_many_claimants_of_one_service_account_announces_each_agent_once() {
        let all: Vec<AgentIdentity> = (0..300)
            .map(|n| identity(&format!("churn-{n}"), "shared"))
            .collect();
        let caches = caches_with(&all);
        let mut batch = Batch::default();
        for i in &all {
            announce_identity(&caches, &mut batch, new_identity(i));
        }
        // The new identity itself (Changed) and every peer (Conflict): two
        // changes per agent at most, not one per pair.
        assert!(
            batch.changes.len() <= 2 * all.len(),
            "{}",
            batch.changes.len()
        );
        assert_eq!(batch.identities.len(), all.len());
        let conflicts = batch
            .changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Conflict)
            .count();
        assert_eq!(
            conflicts,
            all.len(),
            "every claimant is told it is in conflict"
        );
    }

    #[test]
    fn a_status_or_suspension_change_concerns_that_agent_alone() {
        let all = [identity("a", "shared"), identity("b", "shared")];
        let caches = caches_with(&all);
        let before = IdentitySnapshot::of(&all[0]);
        let mut suspended = all[0].clone();
        suspended.spec.suspended = true;
        let mut batch = Batch::default();
        announce_identity(
            &caches,
            &mut batch,
            PendingIdentity {
                namespace: "team".into(),
                name: "a".into(),
                snapshot: IdentitySnapshot::of(&suspended),
                previous: Some(before.clone()),
                kind: Some(ChangeKind::Suspended),
                deleted: false,
                version: 7,
            },
        );
        assert_eq!(batch.changes.len(), 1);
        assert_eq!(batch.changes[0].kind, ChangeKind::Suspended);
        assert_eq!(batch.changes[0].agent.as_deref(), Some("a"));
        assert!(batch.identities.is_empty(), "b is not re-evaluated");

        // A move to another ServiceAccount concerns the former peer.
        let mut moved = all[0].clone();
        moved.spec.service_account_name = "own".into();
        let mut batch = Batch::default();
        announce_identity(
            &caches,
            &mut batch,
            PendingIdentity {
                namespace: "team".into(),
                name: "a".into(),
                snapshot: IdentitySnapshot::of(&moved),
                previous: Some(before),
                kind: Some(ChangeKind::Changed),
                deleted: false,
                version: 7,
            },
        );
        assert!(
            batch
                .identities
                .contains(&ObjectRef::new("b").within("team"))
        );
    }
}

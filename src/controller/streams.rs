//! Watch streams that feed the stores and send cross-kind triggers.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;

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
use crate::api::{AgentIdentity, SecretGrant};
use crate::caches::{Caches, Change, ChangeKind, SyncTracker};
use crate::secrets::CachedSecret;

/// Watches `K` as untyped objects and converts each one, so that a single
/// malformed object is reported and skipped instead of failing the whole list
/// (which would stall the controller for every other object).
fn typed_watch<K>(
    client: &Client,
    namespace: Option<&str>,
    wc: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Placeholder + Clone + Debug + Send + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    watcher(api, wc).default_backoff().filter_map(|item| {
        futures::future::ready(match item {
            Ok(event) => typed_event::<K>(event).map(Ok),
            Err(error) => Some(Err(error)),
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

/// SecretGrants: fill the grant store; tell the identity controller about
/// every grant change (its access list); prune unreferenced Secrets.
#[allow(clippy::too_many_arguments)]
pub(super) fn grants(
    client: &Client,
    namespace: Option<&str>,
    wc: watcher::Config,
    writer: Writer<SecretGrant>,
    caches: Caches,
    identity_tx: UnboundedSender<ObjectRef<AgentIdentity>>,
    sync: SyncTracker,
) -> impl Stream<Item = Result<SecretGrant, watcher::Error>> + Send + 'static {
    let mut seen: HashMap<(String, String), GrantSnapshot> = HashMap::new();
    typed_watch::<SecretGrant>(client, namespace, wc)
        .reflect(writer)
        .inspect_ok(move |event| {
            index_grant_event(&caches, event);
            let (grant, deleted, live) = match event {
                Event::Apply(g) => (g, false, true),
                Event::Delete(g) => (g, true, true),
                Event::InitApply(g) => (g, false, false),
                Event::InitDone => return sync.grants_listed(),
                _ => return,
            };
            let Some(ns) = grant.namespace() else { return };
            let key = (ns.clone(), grant.name_any());
            let snapshot = GrantSnapshot::of(grant);
            let (kind, changed) = if deleted {
                seen.remove(&key);
                (Some(ChangeKind::Deleted), true)
            } else {
                let kind = grant_change(seen.get(&key), &snapshot);
                let changed = seen.get(&key) != Some(&snapshot);
                seen.insert(key, snapshot);
                (kind, changed)
            };
            if !live {
                return;
            }
            if let Some(kind) = kind {
                let mut change = Change::new(kind, &ns);
                change.agent = Some(grant.spec.agent.clone());
                change.grant = Some(grant.name_any());
                change.secret = Some(grant.spec.secret_name.clone());
                change.content_digest =
                    grant.status.as_ref().and_then(|s| s.content_digest.clone());
                caches.publish(change);
            }
            // Status-only updates (resolution counts) leave the agent's access
            // list as it is: only a changed phase, spec or digest wakes it.
            if changed {
                let _ = identity_tx.unbounded_send(ObjectRef::new(&grant.spec.agent).within(&ns));
            }
            if deleted && !caches.secret_is_referenced(&ns, &grant.spec.secret_name) {
                caches.secrets.remove(&ns, &grant.spec.secret_name);
            }
        })
        .touched_objects()
}

/// AgentIdentities: fill the identity store; re-evaluate identities that claim
/// the same ServiceAccount (conflicts) and the grants of all of them.
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
) -> impl Stream<Item = Result<AgentIdentity, watcher::Error>> + Send + 'static {
    // What each identity looked like last (its ServiceAccount among it), so
    // that moving an identity to another ServiceAccount also re-evaluates its
    // former peers, and only real changes reach the node plugins.
    let mut seen: HashMap<(String, String), IdentitySnapshot> = HashMap::new();
    typed_watch::<AgentIdentity>(client, namespace, wc)
        .reflect(writer)
        .inspect_ok(move |event| {
            index_identity_event(&caches, event);
            let (identity, deleted, live) = match event {
                Event::Apply(i) => (i, false, true),
                Event::Delete(i) => (i, true, true),
                // During a (re)list every object is reconciled anyway.
                Event::InitApply(i) => (i, false, false),
                Event::InitDone => return sync.identities_listed(),
                _ => return,
            };
            let Some(ns) = identity.namespace() else {
                return;
            };
            let name = identity.name_any();
            let sa = identity.spec.service_account_name.clone();
            let key = (ns.clone(), name.clone());
            let snapshot = IdentitySnapshot::of(identity);
            let (previous, kind) = if deleted {
                (seen.remove(&key), Some(ChangeKind::Deleted))
            } else {
                let kind = identity_change(seen.get(&key), &snapshot);
                (seen.insert(key, snapshot.clone()), kind)
            };
            let changed = deleted || previous.as_ref() != Some(&snapshot);
            if !live {
                return;
            }
            let mut service_accounts = vec![sa];
            service_accounts.extend(
                previous
                    .map(|p| p.service_account)
                    .filter(|p| *p != service_accounts[0]),
            );
            let mut agents: HashSet<String> = HashSet::from([name.clone()]);
            for sa in &service_accounts {
                for peer in caches.identities_claiming(&ns, sa) {
                    let peer = peer.name_any();
                    if peer != name {
                        let _ = identity_tx.unbounded_send(ObjectRef::new(&peer).within(&ns));
                    }
                    agents.insert(peer);
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
                    change.agent = Some(agent.clone());
                    caches.publish(change);
                }
            }
            // Identity status writes (access lists) change nothing for grants.
            if !changed {
                return;
            }
            for agent in &agents {
                for grant in caches.grants_of_agent(&ns, agent) {
                    let _ = grant_tx.unbounded_send(ObjectRef::from_obj(grant.as_ref()));
                }
            }
        })
        .touched_objects()
}

/// Secrets: keep cached (granted) Secrets fresh and re-evaluate the grants
/// that read a Secret when its data changes, it appears or it disappears.
/// Secrets nobody grants are looked at and dropped, never kept.
pub(super) async fn secrets(
    client: Client,
    namespace: Option<String>,
    wc: watcher::Config,
    caches: Caches,
    grant_tx: UnboundedSender<ObjectRef<SecretGrant>>,
) {
    let cache = caches.secrets.clone();
    let api: Api<Secret> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let events = watcher(api, wc).default_backoff();
    let mut events = events.boxed();
    while let Some(item) = events.next().await {
        let event = match item {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "Secret watch failed; retrying");
                continue;
            }
        };
        let (secret, live) = match &event {
            Event::Apply(s) | Event::Delete(s) => (s, true),
            Event::InitApply(s) => (s, false),
            _ => continue,
        };
        let (Some(ns), Some(name)): (Option<String>, Option<String>) = (
            secret.metadata.namespace.clone(),
            secret.metadata.name.clone(),
        ) else {
            continue;
        };
        // Most Secrets in a cluster are granted to nobody: one index lookup.
        let grants = caches.grants_for_secret(&ns, &name);
        let changed = if matches!(event, Event::Delete(_)) {
            let was_cached = cache.contains(&ns, &name);
            cache.remove(&ns, &name);
            was_cached || !grants.is_empty()
        } else if cache.contains(&ns, &name) {
            cache.refresh(secret)
        } else if !grants.is_empty() {
            cache.upsert(&ns, &name, CachedSecret::from_secret(secret));
            true
        } else {
            false
        };
        if live && changed {
            let kind = if matches!(event, Event::Delete(_)) {
                ChangeKind::Deleted
            } else {
                ChangeKind::Rotated
            };
            for grant in grants {
                let mut change = Change::new(kind, &ns);
                change.agent = Some(grant.spec.agent.clone());
                change.grant = Some(grant.name_any());
                change.secret = Some(name.clone());
                caches.publish(change);
                let _ = grant_tx.unbounded_send(ObjectRef::from_obj(grant.as_ref()));
            }
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

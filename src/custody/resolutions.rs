//! Resolution bookkeeping in statuses, written in batches: a burst of mounts
//! becomes at most one status write per grant (and per identity) per flush
//! interval, not one write per mount.
//!
//! Every custody replica counts its own resolutions, so several write the
//! same counters: each write carries the resourceVersion its count was based
//! on, and a conflict re-reads and adds again. A count therefore never goes
//! backwards and no replica's resolutions are lost or counted twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource};
use serde_json::json;

use super::FIELD_MANAGER;
use crate::api::grant::Resolution;
use crate::api::{AgentIdentity, SecretGrant};
use crate::caches::Caches;

/// How many recent resolutions a grant's status keeps.
pub const RECENT_LIMIT: usize = 10;

/// Attempts per grant and flush when other replicas keep writing first.
const CONFLICT_RETRIES: usize = 5;

type Key = (String, String);

/// Resolutions of one grant not written yet.
#[derive(Default)]
struct PendingGrant {
    count: i64,
    /// Oldest first, at most [`RECENT_LIMIT`].
    recent: Vec<Resolution>,
}

impl PendingGrant {
    fn add(&mut self, resolution: Resolution) {
        self.count += 1;
        self.recent.push(resolution);
        if self.recent.len() > RECENT_LIMIT {
            self.recent.remove(0);
        }
    }

    /// Puts an unwritten batch back in front of what arrived meanwhile.
    fn merge_older(&mut self, older: PendingGrant) {
        self.count += older.count;
        let mut recent = older.recent;
        recent.append(&mut self.recent);
        let excess = recent.len().saturating_sub(RECENT_LIMIT);
        recent.drain(..excess);
        self.recent = recent;
    }
}

#[derive(Default)]
struct Pending {
    grants: HashMap<Key, PendingGrant>,
    identities: HashMap<Key, Time>,
}

/// A grant's counters as last known, with the version they belong to.
#[derive(Clone, Default)]
struct Counted {
    resource_version: Option<String>,
    count: i64,
    recent: Vec<Resolution>,
}

fn rv_number(rv: Option<&str>) -> u64 {
    rv.and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Resolutions not yet written, and the counters we wrote last (the store may
/// not have seen our own write yet when the next flush comes).
#[derive(Default)]
pub struct ResolutionLog {
    pending: Mutex<Pending>,
    written: Mutex<HashMap<Key, Counted>>,
}

impl ResolutionLog {
    pub fn record(&self, namespace: &str, grant: &str, agent: &str, resolution: Resolution) {
        if let Ok(mut p) = self.pending.lock() {
            p.identities.insert(
                (namespace.to_owned(), agent.to_owned()),
                resolution.time.clone(),
            );
            p.grants
                .entry((namespace.to_owned(), grant.to_owned()))
                .or_default()
                .add(resolution);
        }
    }

    fn take(&self) -> Pending {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Keeps a batch that could not be written for the next flush.
    fn requeue(&self, key: Key, batch: PendingGrant) {
        if let Ok(mut p) = self.pending.lock() {
            p.grants.entry(key).or_default().merge_older(batch);
        }
    }

    /// The newer of the store's counters and our own last write.
    fn known(&self, caches: &Caches, key: &Key) -> Counted {
        let stored = caches
            .grants
            .get(&ObjectRef::new(&key.1).within(&key.0))
            .map(|g| {
                let status = g.status.clone().unwrap_or_default();
                Counted {
                    resource_version: g.metadata.resource_version.clone(),
                    count: status.resolutions.unwrap_or(0),
                    recent: status.recent_resolutions,
                }
            })
            .unwrap_or_default();
        let ours = self.written.lock().ok().and_then(|w| w.get(key).cloned());
        match ours {
            Some(ours)
                if rv_number(ours.resource_version.as_deref())
                    > rv_number(stored.resource_version.as_deref()) =>
            {
                ours
            }
            _ => stored,
        }
    }

    /// Adds `batch` to grant `key`'s counters. `Ok(false)`: the grant is gone.
    async fn write_grant(
        &self,
        client: &Client,
        caches: &Caches,
        key: &Key,
        batch: &PendingGrant,
    ) -> Result<bool, kube::Error> {
        let (namespace, name) = key;
        let api: Api<SecretGrant> = Api::namespaced(client.clone(), namespace);
        let mut base = self.known(caches, key);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let count = base.count + batch.count;
            let mut recent: Vec<Resolution> = batch.recent.iter().rev().cloned().collect();
            recent.extend(base.recent.iter().cloned());
            recent.truncate(RECENT_LIMIT);
            let last = recent.first().map(|r| r.time.clone());
            // The resourceVersion makes this write conditional on the count
            // it adds to (server-side apply honours it as a precondition).
            let mut patch = json!({
                "apiVersion": SecretGrant::api_version(&()),
                "kind": SecretGrant::kind(&()),
                "status": {
                    "lastResolvedAt": last,
                    "resolutions": count,
                    "recentResolutions": recent,
                }
            });
            if let Some(rv) = &base.resource_version {
                patch["metadata"] = json!({ "resourceVersion": rv });
            }
            match api
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(written) => {
                    if let Ok(mut w) = self.written.lock() {
                        w.insert(
                            key.clone(),
                            Counted {
                                resource_version: written.metadata.resource_version.clone(),
                                count,
                                recent,
                            },
                        );
                    }
                    return Ok(true);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => return Ok(false),
                Err(kube::Error::Api(status))
                    if status.code == 409 && attempt < CONFLICT_RETRIES =>
                {
                    // Someone (another replica, the controller) wrote first:
                    // add to what is there now.
                    // (The object: the chart grants `get` on grants, not
                    // on their status subresource.)
                    let Some(fresh) = api.get_opt(name).await? else {
                        return Ok(false);
                    };
                    let status = fresh.status.unwrap_or_default();
                    base = Counted {
                        resource_version: fresh.metadata.resource_version,
                        count: status.resolutions.unwrap_or(0),
                        recent: status.recent_resolutions,
                    };
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Writes everything pending. A grant whose write fails keeps its batch
    /// for the next flush (the audit lines and Events already recorded each
    /// resolution; the count must not lose them either).
    pub async fn flush(&self, client: &Client, caches: &Caches) -> usize {
        let pending = self.take();
        let mut writes = 0;
        for (key, batch) in pending.grants {
            match self.write_grant(client, caches, &key, &batch).await {
                Ok(true) => writes += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(namespace = %key.0, grant = %key.1, %error, "writing resolution status failed; retrying at the next flush");
                    self.requeue(key, batch);
                }
            }
        }
        for ((namespace, name), time) in pending.identities {
            let patch = json!({
                "apiVersion": AgentIdentity::api_version(&()),
                "kind": AgentIdentity::kind(&()),
                "status": { "lastResolvedAt": time }
            });
            let api: Api<AgentIdentity> = Api::namespaced(client.clone(), &namespace);
            match api
                .patch_status(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => writes += 1,
                Err(error) => {
                    tracing::warn!(%namespace, agent = %name, %error, "writing lastResolvedAt failed")
                }
            }
        }
        writes
    }

    /// Flushes every `interval` until the process ends.
    pub async fn run(&self, client: Client, caches: Caches, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush(&client, &caches).await;
        }
    }
}

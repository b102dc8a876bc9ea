//! Resolution bookkeeping in statuses, written in batches: a burst of mounts
//! becomes at most one status write per grant (and per identity) per flush
//! interval, not one write per mount.

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

type Key = (String, String);

#[derive(Default)]
struct Pending {
    grants: HashMap<Key, Vec<Resolution>>,
    identities: HashMap<Key, Time>,
}

/// Resolutions not yet written, and the counts we wrote last (the store may
/// not have seen our own write yet when the next flush comes).
#[derive(Default)]
pub struct ResolutionLog {
    pending: Mutex<Pending>,
    written: Mutex<HashMap<Key, (i64, Vec<Resolution>)>>,
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
                .push(resolution);
        }
    }

    fn take(&self) -> Pending {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Writes everything pending. Failed writes are logged and dropped: the
    /// audit lines and Events already recorded each resolution.
    pub async fn flush(&self, client: &Client, caches: &Caches) -> usize {
        let pending = self.take();
        let mut writes = 0;
        for ((namespace, name), mut fresh) in pending.grants {
            let stored = caches.grants.get(&ObjectRef::new(&name).within(&namespace));
            let (stored_count, stored_recent) = stored
                .and_then(|g| g.status.clone())
                .map(|s| (s.resolutions.unwrap_or(0), s.recent_resolutions))
                .unwrap_or_default();
            let key = (namespace.clone(), name.clone());
            let (written_count, written_recent) = self
                .written
                .lock()
                .ok()
                .and_then(|w| w.get(&key).cloned())
                .unwrap_or_default();
            let (base, older) = if written_count > stored_count {
                (written_count, written_recent)
            } else {
                (stored_count, stored_recent)
            };
            let count = base + i64::try_from(fresh.len()).unwrap_or(i64::MAX);
            fresh.reverse();
            let mut recent = fresh;
            recent.extend(older);
            recent.truncate(RECENT_LIMIT);
            let last = recent.first().map(|r| r.time.clone());
            let patch = json!({
                "apiVersion": SecretGrant::api_version(&()),
                "kind": SecretGrant::kind(&()),
                "status": {
                    "lastResolvedAt": last,
                    "resolutions": count,
                    "recentResolutions": recent,
                }
            });
            let api: Api<SecretGrant> = Api::namespaced(client.clone(), &namespace);
            match api
                .patch_status(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => {
                    writes += 1;
                    if let Ok(mut w) = self.written.lock() {
                        w.insert(key, (count, recent));
                    }
                }
                Err(error) => {
                    tracing::warn!(%namespace, grant = %name, %error, "writing resolution status failed")
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

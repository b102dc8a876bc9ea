//! Accepted uses, written into grant statuses in batches: at most one status
//! write per grant per flush interval, however many sidecars reported.
//!
//! Every controller replica takes reports, so several write the same
//! counters: each write carries the resourceVersion its count was based on,
//! and a conflict re-reads and adds again (as custody's resolution counters
//! do). A count never goes backwards, and no report is counted twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde_json::json;

use crate::api::SecretGrant;
use crate::api::grant::RecentUse;

/// Field manager of the usage fields (apart from the controller's and
/// custody's, so neither removes the other's fields).
pub const FIELD_MANAGER: &str = "scopehold-usage";
/// How many (pod, host) entries a grant's status keeps.
pub const RECENT_LIMIT: usize = 10;
/// Attempts per grant and flush when other replicas keep writing first.
const CONFLICT_RETRIES: usize = 5;

type Key = (String, String);

/// Uses of one grant not written yet.
#[derive(Default, Clone, Debug)]
pub struct PendingUses {
    pub count: i64,
    pub last: Option<Timestamp>,
    /// By (pod, host).
    pub by_place: HashMap<(String, String), (i64, Timestamp, Timestamp)>,
}

impl PendingUses {
    pub fn add(&mut self, pod: &str, host: &str, count: i64, first: Timestamp, last: Timestamp) {
        self.count += count;
        self.last = Some(self.last.map_or(last, |l| l.max(last)));
        let entry = self
            .by_place
            .entry((pod.to_owned(), host.to_owned()))
            .or_insert((0, first, last));
        entry.0 += count;
        entry.1 = entry.1.min(first);
        entry.2 = entry.2.max(last);
    }

    fn merge(&mut self, other: PendingUses) {
        for ((pod, host), (count, first, last)) in other.by_place {
            self.add(&pod, &host, count, first, last);
        }
    }

    /// `recent` (newest first) with these uses added, bounded.
    fn merged_recent(&self, recent: &[RecentUse]) -> Vec<RecentUse> {
        let mut out: Vec<RecentUse> = recent.to_vec();
        for ((pod, host), (count, first, last)) in &self.by_place {
            match out.iter_mut().find(|r| &r.pod == pod && &r.host == host) {
                Some(r) => {
                    r.count += count;
                    r.last_at = Time(r.last_at.0.max(*last));
                }
                None => out.push(RecentUse {
                    pod: pod.clone(),
                    host: host.clone(),
                    count: *count,
                    first_at: Time(*first),
                    last_at: Time(*last),
                }),
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.last_at.0));
        out.truncate(RECENT_LIMIT);
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{CONFLICT_RETRIES} conflicting writes in a row")]
    Conflicts,
}

/// Uses accepted and not yet written, per (namespace, grant).
#[derive(Default)]
pub struct UsageLog {
    pending: Mutex<HashMap<Key, PendingUses>>,
}

impl UsageLog {
    pub fn record(&self, namespace: &str, grant: &str, uses: PendingUses) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .entry((namespace.to_owned(), grant.to_owned()))
            .or_default()
            .merge(uses);
    }

    fn take(&self) -> HashMap<Key, PendingUses> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds `batch` to grant `key`'s status. `Ok(false)`: the grant is gone.
    async fn write(
        &self,
        client: &Client,
        key: &Key,
        batch: &PendingUses,
    ) -> Result<bool, WriteError> {
        let (namespace, name) = key;
        let api: Api<SecretGrant> = Api::namespaced(client.clone(), namespace);
        for _ in 0..CONFLICT_RETRIES {
            // Read the counters fresh: the write below is conditional on
            // exactly the count it adds to.
            // The object itself, not its status subresource: the chart's
            // ClusterRole grants `get` on grants and only `patch` on status.
            let Some(current) = api.get_opt(name).await? else {
                return Ok(false);
            };
            let status = current.status.unwrap_or_default();
            let uses = status.uses.unwrap_or(0) + batch.count;
            let last = match (status.last_used_at.map(|t| t.0), batch.last) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let recent = batch.merged_recent(&status.recent_uses);
            let patch = json!({
                "apiVersion": SecretGrant::api_version(&()),
                "kind": SecretGrant::kind(&()),
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "status": {
                    "uses": uses,
                    "lastUsedAt": last.map(Time),
                    "recentUses": recent,
                }
            });
            match api
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(WriteError::Conflicts)
    }

    /// Writes everything pending; a failed grant keeps its batch for the
    /// next flush. Returns the number of status writes.
    pub async fn flush(&self, client: &Client) -> usize {
        let mut writes = 0;
        for (key, batch) in self.take() {
            match self.write(client, &key, &batch).await {
                Ok(true) => writes += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(namespace = %key.0, grant = %key.1, %error, "writing usage status failed; retrying at the next flush");
                    self.record(&key.0, &key.1, batch);
                }
            }
        }
        writes
    }

    /// Flushes every `interval` until the process ends.
    pub async fn run(&self, client: Client, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush(&client).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_uses_merge_per_pod_and_host_newest_first() {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let mut batch = PendingUses::default();
        batch.add("p1", "a:443", 2, t(0), t(5));
        batch.add("p1", "a:443", 1, t(1), t(9));
        batch.add("p2", "b:443", 1, t(3), t(3));
        assert_eq!(batch.count, 4);
        assert_eq!(batch.last, Some(t(9)));
        let old = vec![RecentUse {
            pod: "p2".into(),
            host: "b:443".into(),
            count: 10,
            first_at: Time(t(-100)),
            last_at: Time(t(-50)),
        }];
        let merged = batch.merged_recent(&old);
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].pod.as_str(), merged[0].count), ("p1", 3));
        assert_eq!(merged[0].first_at, Time(t(0)));
        assert_eq!((merged[1].pod.as_str(), merged[1].count), ("p2", 11));
        assert_eq!(merged[1].first_at, Time(t(-100)));
    }
}

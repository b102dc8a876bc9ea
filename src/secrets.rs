//! A cache of the Secrets that grants refer to, with the digest key that
//! every digest of their values is computed under.
//!
//! Memory grows with the granted Secrets, not with every Secret in the cluster:
//! the Secret watch only refreshes entries that are already cached, and entries
//! are added on demand (a GET on first use) and pruned when no grant refers to
//! them any more.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::digest::DigestKey;

/// Bytes of a secret value. Its `Debug` never shows the content, so a value
/// cannot reach a log line through `{:?}` by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

/// The parts of a Secret that ScopeHold uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedSecret {
    pub resource_version: Option<String>,
    pub uid: Option<String>,
    pub data: BTreeMap<String, SecretBytes>,
}

impl CachedSecret {
    pub fn from_secret(secret: &Secret) -> Self {
        let mut data: BTreeMap<String, SecretBytes> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), SecretBytes(v.0.clone())))
            .collect();
        // stringData is write-only on the server, but objects built in memory
        // (tests, dry runs) may carry it; the API server merges it the same way.
        for (k, v) in secret.string_data.iter().flatten() {
            data.insert(k.clone(), SecretBytes(v.clone().into_bytes()));
        }
        CachedSecret {
            resource_version: secret.metadata.resource_version.clone(),
            uid: secret.metadata.uid.clone(),
            data,
        }
    }

    /// Whether `other` is a newer state of the same Secret than `self`.
    /// resourceVersions are etcd revisions; when one does not parse, the newer
    /// event wins, as the watch delivers events in order.
    fn is_older_than(&self, other: &CachedSecret) -> bool {
        match (
            self.resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
            other
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some(mine), Some(theirs)) => mine < theirs,
            _ => true,
        }
    }
}

type SecretKey = (String, String);

/// Granted Secrets by (namespace, name).
pub struct SecretCache {
    /// Every content digest of these values is keyed with it.
    digest_key: DigestKey,
    entries: RwLock<HashMap<SecretKey, Arc<CachedSecret>>>,
    /// One fetch per Secret at a time: concurrent misses (a restart
    /// reconciling thousands of grants over a few Secrets) wait for the first
    /// fetch instead of each reading the same Secret.
    fetching: std::sync::Mutex<HashMap<SecretKey, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretCacheError {
    #[error("reading Secret {namespace}/{name}: {source}")]
    Get {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl SecretCache {
    pub fn new(digest_key: DigestKey) -> Self {
        SecretCache {
            digest_key,
            entries: RwLock::default(),
            fetching: std::sync::Mutex::default(),
        }
    }

    /// The key of every content digest of these values.
    pub fn digest_key(&self) -> &DigestKey {
        &self.digest_key
    }

    fn key(namespace: &str, name: &str) -> SecretKey {
        (namespace.to_owned(), name.to_owned())
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<CachedSecret>> {
        self.entries
            .read()
            .ok()
            .and_then(|m| m.get(&Self::key(namespace, name)).cloned())
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.get(namespace, name).is_some()
    }

    /// The Secret from the cache, or read from the API server and cached.
    /// `Ok(None)` when it does not exist.
    pub async fn get_or_fetch(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<CachedSecret>>, SecretCacheError> {
        if let Some(hit) = self.get(namespace, name) {
            return Ok(Some(hit));
        }
        let gate = match self.fetching.lock() {
            Ok(mut map) => map.entry(Self::key(namespace, name)).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let _fetching = gate.lock().await;
        if let Some(hit) = self.get(namespace, name) {
            return Ok(Some(hit));
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let fetched = api
            .get_opt(name)
            .await
            .map_err(|source| SecretCacheError::Get {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source,
            })?;
        Ok(fetched.map(|secret| self.upsert(namespace, name, CachedSecret::from_secret(&secret))))
    }

    /// Stores `fresh` unless the cache already holds a newer state.
    pub fn upsert(&self, namespace: &str, name: &str, fresh: CachedSecret) -> Arc<CachedSecret> {
        let fresh = Arc::new(fresh);
        let Ok(mut map) = self.entries.write() else {
            return fresh;
        };
        let entry = map
            .entry(Self::key(namespace, name))
            .or_insert_with(|| fresh.clone());
        if entry.is_older_than(&fresh) {
            *entry = fresh;
        }
        entry.clone()
    }

    /// Refreshes an entry from a watch event, only if it is cached already.
    /// Returns whether the cached content changed.
    pub fn refresh(&self, secret: &Secret) -> bool {
        let (Some(namespace), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name)
        else {
            return false;
        };
        let Some(old) = self.get(namespace, name) else {
            return false;
        };
        let fresh = CachedSecret::from_secret(secret);
        let changed = old.data != fresh.data;
        self.upsert(namespace, name, fresh);
        changed
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.entries.write() {
            map.remove(&Self::key(namespace, name));
        }
        if let Ok(mut map) = self.fetching.lock() {
            map.remove(&Self::key(namespace, name));
        }
    }

    /// (namespace, name) of every cached Secret.
    pub fn names(&self) -> Vec<(String, String)> {
        self.entries
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.entries.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, SecretBytes> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), SecretBytes(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn debug_never_shows_values() {
        let a = data(&[("api", "hunter2")]);
        assert!(!format!("{a:?}").contains("hunter2"));
    }

    #[test]
    fn upsert_keeps_the_newest_resource_version() {
        let cache = SecretCache::new(crate::digest::DigestKey::from_bytes(&[1; 32]).unwrap());
        let newer = CachedSecret {
            resource_version: Some("20".into()),
            uid: None,
            data: data(&[("k", "new")]),
        };
        let older = CachedSecret {
            resource_version: Some("10".into()),
            uid: None,
            data: data(&[("k", "old")]),
        };
        cache.upsert("ns", "s", newer.clone());
        cache.upsert("ns", "s", older);
        assert_eq!(
            cache.get("ns", "s").map(|s| s.data.clone()),
            Some(newer.data)
        );
    }
}

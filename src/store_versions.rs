//! How far custody's caches have come, per watched kind: the resourceVersion
//! of the last event each watch applied.
//!
//! Why: the node plugin asks one custody replica (`Resolve`) and hears
//! invalidations from another (the stream), and either may lag behind. Each
//! invalidation names the version of the change that caused it, and each
//! Resolve answer the versions its replica had applied when it decided; the
//! plugin asks again when an answer is older than a change it already
//! applied to the volume, instead of putting back a key that was withdrawn.
//!
//! resourceVersions are etcd revisions: one counter for the whole cluster,
//! and each watch delivers its kind's events in that order. Kubernetes calls
//! them opaque; like the Secret cache and the counters, this reads them as
//! numbers, and a version that does not parse counts as unknown (0). Kinds
//! are only ever compared with the same kind.

use std::sync::atomic::{AtomicU64, Ordering};

/// One of custody's watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    Grants,
    Identities,
    Secrets,
}

/// Versions per kind (0: unknown, or nothing seen yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    pub grants: u64,
    pub identities: u64,
    pub secrets: u64,
}

impl Versions {
    /// Only `kind` at `version`.
    pub fn of(kind: Watched, version: u64) -> Self {
        let mut versions = Self::default();
        *versions.get_mut(kind) = version;
        versions
    }

    pub fn get(&self, kind: Watched) -> u64 {
        match kind {
            Watched::Grants => self.grants,
            Watched::Identities => self.identities,
            Watched::Secrets => self.secrets,
        }
    }

    fn get_mut(&mut self, kind: Watched) -> &mut u64 {
        match kind {
            Watched::Grants => &mut self.grants,
            Watched::Identities => &mut self.identities,
            Watched::Secrets => &mut self.secrets,
        }
    }
}

/// A resourceVersion as a number; `None` when absent or not a number.
pub fn parse_resource_version(version: Option<&str>) -> Option<u64> {
    version.and_then(|v| v.parse::<u64>().ok())
}

/// The versions the watch streams have applied to the caches. The streams
/// advance a kind only after the store holds the event (for a relist: at
/// its end, when the store swaps the new list in), so a reader that takes
/// [`StoreVersions::snapshot`] before reading the stores decides on at least
/// that state.
#[derive(Debug, Default)]
pub struct StoreVersions {
    grants: AtomicU64,
    identities: AtomicU64,
    secrets: AtomicU64,
}

impl StoreVersions {
    fn counter(&self, kind: Watched) -> &AtomicU64 {
        match kind {
            Watched::Grants => &self.grants,
            Watched::Identities => &self.identities,
            Watched::Secrets => &self.secrets,
        }
    }

    /// Records that `kind`'s watch applied an event at `version` (never
    /// goes back).
    pub fn advance(&self, kind: Watched, version: u64) {
        self.counter(kind).fetch_max(version, Ordering::SeqCst);
    }

    pub fn get(&self, kind: Watched) -> u64 {
        self.counter(kind).load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> Versions {
        Versions {
            grants: self.get(Watched::Grants),
            identities: self.get(Watched::Identities),
            secrets: self.get(Watched::Secrets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_move_forward_per_kind() {
        let versions = StoreVersions::default();
        versions.advance(Watched::Grants, 10);
        versions.advance(Watched::Grants, 7);
        versions.advance(Watched::Secrets, 3);
        assert_eq!(
            versions.snapshot(),
            Versions {
                grants: 10,
                identities: 0,
                secrets: 3
            }
        );
        assert_eq!(
            Versions::of(Watched::Identities, 5).get(Watched::Identities),
            5
        );
        assert_eq!(Versions::of(Watched::Identities, 5).get(Watched::Grants), 0);
        assert_eq!(parse_resource_version(Some("42")), Some(42));
        assert_eq!(parse_resource_version(Some("x1")), None);
        assert_eq!(parse_resource_version(None), None);
    }
}

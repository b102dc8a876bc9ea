//! A short-lived memory of node plugin tokens that passed TokenReview.
//!
//! Every custody call carries the node plugin's own ServiceAccount token, and
//! a plugin reuses one token for up to an hour. Reviewing it on every call put
//! one of three sequential API round trips on the Resolve path. Successful
//! reviews are remembered for [`CALLER_TTL`] (the same bound as the API
//! server's own authentication cache, so a deleted plugin pod loses access
//! about as fast either way); failures are never remembered, so a fresh token
//! works at once. Entries are keyed by a SHA-256 digest: no token is kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long a successful review of a caller's token is trusted.
pub const CALLER_TTL: Duration = Duration::from_secs(10);
/// Bound on remembered tokens (one or two per node plugin is normal).
const MAX_ENTRIES: usize = 4096;

type TokenDigest = [u8; 32];

#[derive(Default)]
pub struct CallerCache {
    entries: Mutex<HashMap<TokenDigest, Remembered>>,
}

struct Remembered {
    node: String,
    until: Instant,
}

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

impl CallerCache {
    /// The node of a caller whose `token` passed review less than
    /// [`CALLER_TTL`] before `now`.
    pub fn node_of(&self, token: &str, now: Instant) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&digest(token))
            .filter(|r| now < r.until)
            .map(|r| r.node.clone())
    }

    /// Remembers that `token` passed review at `now` as a plugin on `node`.
    pub fn remember(&self, token: &str, node: &str, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, r| now < r.until);
            if entries.len() >= MAX_ENTRIES {
                // Only reachable by a flood of distinct valid tokens; starting
                // over costs one review per caller, never a wrong answer.
                entries.clear();
            }
        }
        entries.insert(
            digest(token),
            Remembered {
                node: node.to_owned(),
                until: now + CALLER_TTL,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reviewed_token_is_trusted_for_the_ttl_only() {
        let cache = CallerCache::default();
        let t0 = Instant::now();
        assert_eq!(cache.node_of("token-a", t0), None);
        cache.remember("token-a", "node-1", t0);
        assert_eq!(cache.node_of("token-a", t0).as_deref(), Some("node-1"));
        let almost = t0 + CALLER_TTL - Duration::from_millis(1);
        assert_eq!(cache.node_of("token-a", almost).as_deref(), Some("node-1"));
        assert_eq!(cache.node_of("token-a", t0 + CALLER_TTL), None);
        // Another token is not vouched for by the first one.
        assert_eq!(cache.node_of("token-b", t0), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = CallerCache::default();
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES {
            cache.remember(&format!("old-{i}"), "n", t0);
        }
        // All old entries have expired: they make room for the new one.
        let later = t0 + CALLER_TTL;
        cache.remember("new", "n2", later);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.node_of("new", later).as_deref(), Some("n2"));
        // Full of live entries: start over rather than grow.
        for i in 0..MAX_ENTRIES {
            cache.remember(&format!("live-{i}"), "n", later);
        }
        assert!(cache.len() <= MAX_ENTRIES);
        cache.remember("newest", "n3", later);
        assert!(cache.len() <= MAX_ENTRIES);
        assert_eq!(cache.node_of("newest", later).as_deref(), Some("n3"));
    }
}

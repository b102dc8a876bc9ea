//! What custody last delivered to each volume, per grant: a Resolve that
//! hands a volume the same content again (kubelet's periodic republish, a
//! re-resolution after an invalidation that changed nothing for it) is not a
//! new resolution. It is counted in a metric and logged at debug, not recorded
//! as a `SecretResolved` Event or in the grant's resolution count; a first
//! mount and changed content stay full records.
//!
//! Per custody replica: a republish that reaches a replica which never served
//! that volume is recorded once there. Bounded: when full the memory starts
//! over, which only turns some republishes back into full records.

use std::collections::HashMap;
use std::sync::Mutex;

/// (pod UID, volume id, grant).
type Key = (String, String, String);

/// Volumes remembered at most.
const CAPACITY: usize = 65_536;

#[derive(Default)]
pub struct Delivered {
    digests: Mutex<HashMap<Key, String>>,
}

impl Delivered {
    /// Remembers that `digest` of `grant` went to the volume, and says whether
    /// that same content had gone there before. Content without a digest is
    /// never taken for a repeat.
    pub fn repeat(
        &self,
        pod_uid: &str,
        volume_id: &str,
        grant: &str,
        digest: Option<&str>,
    ) -> bool {
        let Some(digest) = digest else { return false };
        let Ok(mut digests) = self.digests.lock() else {
            return false;
        };
        if digests.len() >= CAPACITY {
            digests.clear();
        }
        let key = (pod_uid.to_owned(), volume_id.to_owned(), grant.to_owned());
        digests.insert(key, digest.to_owned()).as_deref() == Some(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_content_to_the_same_volume_is_a_repeat() {
        let d = Delivered::default();
        assert!(!d.repeat("u", "v", "g", Some("aaa")), "first mount");
        assert!(d.repeat("u", "v", "g", Some("aaa")), "republish");
        assert!(!d.repeat("u", "v", "g", Some("bbb")), "rotated content");
        assert!(!d.repeat("u", "v2", "g", Some("bbb")), "another volume");
        assert!(!d.repeat("u", "v", "g2", Some("bbb")), "another grant");
        assert!(!d.repeat("u", "v", "g", None));
        assert!(!d.repeat("u", "v", "g", None));
    }
}

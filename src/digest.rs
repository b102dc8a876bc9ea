//! The content digest: 12 hex digits of an HMAC-SHA-256 over the granted
//! keys' names and values, under the cluster's digest key.
//!
//! Digests are published in statuses, Events, audit lines and invalidations,
//! and streamed to node plugins. An unkeyed hash of a value would let anyone
//! who can read a status confirm a guessed low-entropy secret offline; keyed,
//! a digest only says "same content as before" to those who see two of them.
//! The key is kept in a Secret beside custody's TLS material
//! ([`crate::custody::digest_key`]) and never leaves custody's process.

use std::collections::BTreeMap;

use ring::hmac;

use crate::secrets::SecretBytes;

/// Shortest digest key accepted: HMAC-SHA-256 gains nothing from more, and a
/// shorter one would be guessable.
pub const MIN_KEY_BYTES: usize = 32;

/// Domain separation: the same key never signs anything that could be
/// confused with a content digest.
const CONTENT_CONTEXT: &[u8] = b"scopehold.dev content digest v1\0";
const KEY_ID_CONTEXT: &[u8] = b"scopehold.dev digest key id v1\0";

/// The cluster's digest key. Its `Debug` shows only the key id, so the key
/// cannot reach a log line through `{:?}`.
pub struct DigestKey {
    key: hmac::Key,
    id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the digest key has {0} bytes; at least {MIN_KEY_BYTES} are needed")]
pub struct KeyTooShort(pub usize);

impl DigestKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyTooShort> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyTooShort(bytes.len()));
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let tag = hmac::sign(&key, KEY_ID_CONTEXT);
        let id = hex::encode(&tag.as_ref()[..4]);
        Ok(DigestKey { key, id })
    }

    /// A short name of the key (an HMAC of a fixed text, not the key), for
    /// log lines: replicas that log the same id compute the same digests.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Keys a grant asks for that the Secret does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret has no key(s) {}", .0.join(", "))]
pub struct MissingKeys(pub Vec<String>);

/// First 12 hex digits of the HMAC-SHA-256, under `key`, of the granted
/// keys' names and values, sorted by key, each length-prefixed so that no two
/// different key sets can produce the same byte stream.
pub fn content_digest<'a>(
    key: &DigestKey,
    data: &BTreeMap<String, SecretBytes>,
    keys: impl IntoIterator<Item = &'a str>,
) -> Result<String, MissingKeys> {
    let mut keys: Vec<&str> = keys.into_iter().collect();
    keys.sort_unstable();
    keys.dedup();
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !data.contains_key(**k))
        .map(|k| (*k).to_owned())
        .collect();
    if !missing.is_empty() {
        return Err(MissingKeys(missing));
    }
    let mut mac = hmac::Context::with_key(&key.key);
    mac.update(CONTENT_CONTEXT);
    for name in keys {
        if let Some(value) = data.get(name) {
            mac.update(&(name.len() as u64).to_be_bytes());
            mac.update(name.as_bytes());
            mac.update(&(value.0.len() as u64).to_be_bytes());
            mac.update(&value.0);
        }
    }
    let tag = mac.sign();
    Ok(hex::encode(&tag.as_ref()[..6]))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, SecretBytes> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), SecretBytes(v.as_bytes().to_vec())))
            .collect()
    }

    fn key(byte: u8) -> DigestKey {
        DigestKey::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn digest_depends_only_on_granted_keys() {
        let k = key(1);
        let a = data(&[("api", "one"), ("other", "x")]);
        let b = data(&[("api", "one"), ("other", "y")]);
        let c = data(&[("api", "two"), ("other", "x")]);
        let d1 = content_digest(&k, &a, ["api"]);
        assert_eq!(d1, content_digest(&k, &b, ["api"]));
        assert_ne!(d1, content_digest(&k, &c, ["api"]));
        assert_eq!(d1.as_ref().map(|d| d.len()), Ok(12));
    }

    #[test]
    fn digest_is_order_independent_and_framed() {
        let k = key(1);
        let a = data(&[("a", "bc"), ("b", "")]);
        assert_eq!(
            content_digest(&k, &a, ["a", "b"]),
            content_digest(&k, &a, ["b", "a"])
        );
        let shifted = data(&[("a", "b"), ("b", "c")]);
        assert_ne!(
            content_digest(&k, &a, ["a", "b"]),
            content_digest(&k, &shifted, ["a", "b"])
        );
    }

    #[test]
    fn digest_reports_missing_keys() {
        let a = data(&[("api", "one")]);
        assert_eq!(
            content_digest(&key(1), &a, ["api", "gone"]),
            Err(MissingKeys(vec!["gone".into()]))
        );
    }

    #[test]
    fn another_key_gives_another_digest_and_no_plain_hash_matches() {
        let a = data(&[("api", "hunter2")]);
        let one = content_digest(&key(1), &a, ["api"]).unwrap();
        let two = content_digest(&key(2), &a, ["api"]).unwrap();
        assert_ne!(one, two);
        // Neither is a plain SHA-256 of the value, framed or not.
        let plain = hex::encode(Sha256::digest(b"hunter2"));
        assert!(!plain.starts_with(&one) && !plain.starts_with(&two));
    }

    #[test]
    fn digest_is_the_documented_hmac() {
        // The construction, spelled out, so that an outside tool given the
        // key (an operator comparing digests) can recompute one.
        let raw = [7_u8; 32];
        let a = data(&[("api", "v")]);
        let mut message = CONTENT_CONTEXT.to_vec();
        message.extend(3_u64.to_be_bytes());
        message.extend(b"api");
        message.extend(1_u64.to_be_bytes());
        message.extend(b"v");
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &raw), &message);
        assert_eq!(
            content_digest(&DigestKey::from_bytes(&raw).unwrap(), &a, ["api"]).unwrap(),
            hex::encode(&tag.as_ref()[..6])
        );
    }

    #[test]
    fn short_keys_are_refused_and_debug_hides_the_key() {
        assert_eq!(
            DigestKey::from_bytes(&[1; 16]).map(|_| ()),
            Err(KeyTooShort(16))
        );
        let k = key(0xab);
        let shown = format!("{k:?}");
        assert!(shown.contains(k.id()), "{shown}");
        assert!(!shown.contains("abab"), "{shown}");
        assert_eq!(k.id().len(), 8);
    }
}

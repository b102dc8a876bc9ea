//! The cluster's content-digest key: random bytes created once, kept in a
//! Secret in the controller's namespace beside custody's TLS material, and
//! read by every replica at start so that all of them compute the same
//! digests. Rotating it: README, "Rotating the digest key".

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::digest::{DigestKey, KeyTooShort, MIN_KEY_BYTES};

/// The Secret's data key that holds the digest key.
pub const DATA_KEY: &str = "digest.key";

#[derive(Debug, thiserror::Error)]
pub enum DigestKeyError {
    #[error("Secret {0} exists but has no {DATA_KEY}; delete it to have a new key created")]
    Missing(String),
    #[error("Secret {0}: {1}; delete it to have a new key created")]
    TooShort(String, #[source] KeyTooShort),
    /// getrandom's error (its `std::error::Error` impl needs a feature).
    #[error("generating the digest key: {0}")]
    Random(String),
    #[error("reading or creating Secret {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Loads the key from Secret `namespace/name`, creating the Secret with a new
/// random key when no replica has yet. Two replicas racing both try to
/// create; the loser reads the winner's.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<DigestKey, DigestKeyError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("{namespace}/{name}");
    let api_error = |source| DigestKeyError::Api {
        what: what.clone(),
        source,
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(api_error)? {
        return from_secret(&secret, &what);
    }
    let mut bytes = vec![0_u8; MIN_KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| DigestKeyError::Random(e.to_string()))?;
    match secrets
        .create(&PostParams::default(), &to_secret(name, bytes.clone()))
        .await
    {
        Ok(_) => {
            let key = DigestKey::from_bytes(&bytes)
                .map_err(|e| DigestKeyError::TooShort(what.clone(), e))?;
            tracing::info!(secret = %what, digestKeyID = key.id(), "created the content-digest key");
            Ok(key)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = secrets.get(name).await.map_err(api_error)?;
            from_secret(&secret, &what)
        }
        Err(e) => Err(api_error(e)),
    }
}

fn to_secret(name: &str, key: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(BTreeMap::from([(
                "scopehold.dev/purpose".to_owned(),
                "HMAC key of content digests; delete and restart the controllers to rotate"
                    .to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(DATA_KEY.to_owned(), ByteString(key))])),
        ..Default::default()
    }
}

fn from_secret(secret: &Secret, what: &str) -> Result<DigestKey, DigestKeyError> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .ok_or_else(|| DigestKeyError::Missing(what.to_owned()))?;
    DigestKey::from_bytes(&bytes.0).map_err(|e| DigestKeyError::TooShort(what.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_through_its_secret() {
        let secret = to_secret("k", vec![5; 32]);
        assert_eq!(secret.immutable, Some(true));
        let key = from_secret(&secret, "ns/k").unwrap();
        assert_eq!(key.id(), DigestKey::from_bytes(&[5; 32]).unwrap().id());
    }

    #[test]
    fn a_broken_secret_is_reported_not_replaced() {
        let empty = Secret::default();
        assert!(matches!(
            from_secret(&empty, "ns/k"),
            Err(DigestKeyError::Missing(_))
        ));
        let short = to_secret("k", vec![5; 8]);
        let error = from_secret(&short, "ns/k").unwrap_err();
        assert!(
            error.to_string().contains("8 bytes") && error.to_string().contains("delete it"),
            "{error}"
        );
    }
}

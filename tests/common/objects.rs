//! ScopeHold objects and credentials that several test files create.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use scopehold::api::{AgentIdentity, AgentIdentitySpec, GrantedKey, SecretGrant, SecretGrantSpec};
use serde_json::json;

use super::{AUDIENCE, server};

/// Creates Secret `name` in `ns` from string pairs.
pub async fn create_secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) -> Secret {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("creating Secret {ns}/{name}: {e}"))
}

/// Creates AgentIdentity `name` for ServiceAccount `sa`.
pub async fn create_identity(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    suspended: bool,
) -> AgentIdentity {
    let spec = AgentIdentitySpec {
        service_account_name: sa.into(),
        suspended,
        ..Default::default()
    };
    Api::<AgentIdentity>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &AgentIdentity::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("creating AgentIdentity {ns}/{name}: {e}"))
}

/// Creates SecretGrant `name`; `edit` adjusts the spec first.
pub async fn create_grant(
    client: &Client,
    ns: &str,
    name: &str,
    agent: &str,
    secret: &str,
    keys: Vec<GrantedKey>,
    edit: impl FnOnce(&mut SecretGrantSpec),
) -> SecretGrant {
    let mut spec = SecretGrantSpec {
        agent: agent.into(),
        secret_name: secret.into(),
        keys,
        ..Default::default()
    };
    edit(&mut spec);
    Api::<SecretGrant>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &SecretGrant::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("creating SecretGrant {ns}/{name}: {e}"))
}

/// A granted key with the default path and mode.
pub fn key(key: &str) -> GrantedKey {
    GrantedKey {
        key: key.into(),
        ..Default::default()
    }
}

/// A string field of a JSON log line, or "" when absent.
pub fn log_field(line: &str, field: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v[field].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A service-account JWT bound to pod `pod`/`uid` that expired a minute ago,
/// signed with the test API server's real signing key (TokenRequest cannot
/// issue one: its minimum lifetime is ten minutes).
pub fn expired_token(ns: &str, sa: &str, pod: &str, uid: &str) -> String {
    let key = std::fs::read(server().dir.join("sa.key")).expect("sa.key");
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&key).expect("rsa key");
    let now = Timestamp::now();
    let claims = json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": [AUDIENCE],
        "iat": (now - SignedDuration::from_secs(3600)).as_second(),
        "nbf": (now - SignedDuration::from_secs(3600)).as_second(),
        "exp": (now - SignedDuration::from_secs(60)).as_second(),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}, "pod": {"name": pod, "uid": uid}}
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .expect("sign")
}

/// A token of ServiceAccount `ns/sa` for ScopeHold's audience that is bound
/// to no pod.
pub async fn unbound_token(client: &Client, ns: &str, sa: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![AUDIENCE.to_string()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"))
        .status
        .expect("TokenRequest status")
        .token
}

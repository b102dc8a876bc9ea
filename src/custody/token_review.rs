//! TokenReview of ServiceAccount tokens: who is this, and which pod and node
//! is the token bound to.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

const SA_PREFIX: &str = "system:serviceaccount:";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// What the API server vouches for about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("token rejected by the API server: {0}")]
    Rejected(String),
    #[error("token is not valid for audience {0:?}")]
    Audience(String),
    #[error("token does not belong to a ServiceAccount")]
    NotServiceAccount,
    #[error("TokenReview failed: {0}")]
    Api(#[source] kube::Error),
}

/// Asks the API server whether `token` is valid for `audience`.
pub async fn review(
    client: &Client,
    token: &str,
    audience: &str,
) -> Result<TokenClaims, ReviewError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(ReviewError::Api)?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::Rejected(
            status
                .error
                .unwrap_or_else(|| "not authenticated".to_owned()),
        ));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(ReviewError::Audience(audience.to_owned()));
    }
    let user = status.user.unwrap_or_default();
    claims_from_user(
        user.username.as_deref().unwrap_or(""),
        &user.extra.unwrap_or_default(),
    )
}

/// Parses `system:serviceaccount:NS:NAME` and the pod/node extras.
pub fn claims_from_user(
    username: &str,
    extra: &BTreeMap<String, Vec<String>>,
) -> Result<TokenClaims, ReviewError> {
    let rest = username
        .strip_prefix(SA_PREFIX)
        .ok_or(ReviewError::NotServiceAccount)?;
    let (namespace, service_account) =
        rest.split_once(':').ok_or(ReviewError::NotServiceAccount)?;
    if namespace.is_empty() || service_account.is_empty() || service_account.contains(':') {
        return Err(ReviewError::NotServiceAccount);
    }
    // A claim with several values is ambiguous; treat it as absent.
    let single = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([one]) if !one.is_empty() => Some(one.clone()),
        _ => None,
    };
    Ok(TokenClaims {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod_name: single(EXTRA_POD_NAME),
        pod_uid: single(EXTRA_POD_UID),
        node_name: single(EXTRA_NODE_NAME),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_account_users_and_extras() {
        let extra: BTreeMap<String, Vec<String>> = [
            (EXTRA_POD_NAME.to_owned(), vec!["agent-0".to_owned()]),
            (EXTRA_POD_UID.to_owned(), vec!["u-1".to_owned()]),
            (
                EXTRA_NODE_NAME.to_owned(),
                vec!["n1".to_owned(), "n2".to_owned()],
            ),
        ]
        .into();
        let claims = claims_from_user("system:serviceaccount:team:bot", &extra).expect("claims");
        assert_eq!(claims.namespace, "team");
        assert_eq!(claims.service_account, "bot");
        assert_eq!(claims.pod_name.as_deref(), Some("agent-0"));
        assert_eq!(claims.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(claims.node_name, None, "ambiguous node claim is dropped");
    }

    #[test]
    fn refuses_other_users() {
        for user in [
            "alice",
            "system:serviceaccount:",
            "system:serviceaccount:ns",
            "system:serviceaccount::x",
            "system:serviceaccount:a:b:c",
        ] {
            assert!(claims_from_user(user, &BTreeMap::new()).is_err(), "{user}");
        }
    }
}

//! The AdmissionReview exchange (admission.k8s.io/v1) and the decision for
//! one pod: inject the proxy sidecar with `proxy::pod::inject`, or refuse
//! with the reason. The chart sends only pods annotated
//! `scopehold.dev/inject: proxy` here; anything else is admitted unchanged.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::proxy::pod::{self, InjectError, SidecarSettings};
use crate::proxy::rules::ProxyRules;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub request: Option<AdmissionRequest>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ResponseStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the RFC 6902 patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct ResponseStatus {
    pub code: u16,
    pub message: String,
}

impl AdmissionResponse {
    fn allow(uid: &str) -> Self {
        AdmissionResponse {
            uid: uid.to_owned(),
            allowed: true,
            status: None,
            patch_type: None,
            patch: None,
        }
    }

    fn deny(uid: &str, code: u16, message: String) -> Self {
        AdmissionResponse {
            uid: uid.to_owned(),
            allowed: false,
            status: Some(ResponseStatus { code, message }),
            patch_type: None,
            patch: None,
        }
    }

    /// The whole AdmissionReview to send back.
    pub fn into_review(self) -> Value {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": self,
        })
    }
}

/// Why a pod that asked for the sidecar is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("ScopeHold's caches are not synced yet; retry in a few seconds")]
    NotSynced,
    #[error("the admission request carries no pod: {0}")]
    BadPod(String),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("building the patch: {0}")]
    Patch(#[from] pod::PatchError),
}

/// Decides one request. `rules` renders the pod's proxy rules from the
/// namespace and ServiceAccount (the controller's caches, or lists).
pub fn decide(
    request: &AdmissionRequest,
    settings: &SidecarSettings,
    rules: impl FnOnce(&str, &str) -> Result<ProxyRules, Refused>,
) -> (AdmissionResponse, Outcome) {
    let uid = request.uid.as_str();
    if request.operation != "CREATE" {
        return (AdmissionResponse::allow(uid), Outcome::NotAsked);
    }
    match mutate(request, settings, rules) {
        Ok(Some(patch)) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
            let mut response = AdmissionResponse::allow(uid);
            response.patch_type = Some("JSONPatch");
            response.patch = Some(encoded);
            (response, Outcome::Injected)
        }
        Ok(None) => (AdmissionResponse::allow(uid), Outcome::NotAsked),
        Err(refused) => {
            let code = match refused {
                Refused::NotSynced => 503,
                Refused::BadPod(_) => 400,
                _ => 403,
            };
            let message = format!("scopehold: the proxy sidecar cannot be injected: {refused}");
            (
                AdmissionResponse::deny(uid, code, message),
                Outcome::Refused,
            )
        }
    }
}

/// What became of a request (for the log line and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    NotAsked,
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::NotAsked => "unchanged",
            Outcome::Refused => "refused",
        }
    }
}

fn mutate(
    request: &AdmissionRequest,
    settings: &SidecarSettings,
    rules: impl FnOnce(&str, &str) -> Result<ProxyRules, Refused>,
) -> Result<Option<Value>, Refused> {
    let raw = request
        .object
        .as_ref()
        .ok_or_else(|| Refused::BadPod("no object".into()))?;
    let pod: Pod =
        serde_json::from_value(raw.clone()).map_err(|e| Refused::BadPod(e.to_string()))?;
    if !pod::wants_injection(&pod) {
        return Ok(None);
    }
    // On CREATE the object often has no namespace yet; the request has it.
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .ok_or_else(|| Refused::BadPod("no namespace".into()))?;
    let rules = rules(&namespace, &crate::proxy::render::service_account(&pod))?;
    let changed = pod::inject(&pod, &rules, settings)?;
    Ok(Some(pod::admission_patch(raw, &changed, settings)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pod: Value) -> AdmissionRequest {
        AdmissionRequest {
            uid: "u1".into(),
            namespace: Some("ns".into()),
            operation: "CREATE".into(),
            object: Some(pod),
        }
    }

    #[test]
    fn pods_that_do_not_ask_pass_unchanged_and_askers_fail_closed() {
        let settings = SidecarSettings::default();
        let plain =
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let (response, outcome) = decide(&request(plain), &settings, |_, _| {
            unreachable!("not consulted for a pod that does not ask")
        });
        assert_eq!(outcome, Outcome::NotAsked);
        assert_eq!(response, AdmissionResponse::allow("u1"));

        let asking = serde_json::json!({
            "metadata": {"name": "p", "annotations": {"scopehold.dev/inject": "proxy"}},
            "spec": {"serviceAccountName": "bot", "containers": [{"name": "c"}]}
        });
        let (response, outcome) = decide(&request(asking), &settings, |ns, sa| {
            assert_eq!((ns, sa), ("ns", "bot"));
            Err(Refused::NotSynced)
        });
        assert_eq!(outcome, Outcome::Refused);
        assert!(!response.allowed);
        let review = response.into_review();
        assert_eq!(review["response"]["status"]["code"], 503);
        assert_eq!(review["kind"], "AdmissionReview");
    }
}

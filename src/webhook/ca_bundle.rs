//! Keeps the CA bundle of the chart's MutatingWebhookConfiguration equal to
//! the custody CA. The chart cannot know the CA (the controller makes it on
//! first start), so it registers the webhook without one; until the bundle
//! is set, the API server cannot verify the webhook and refuses annotated
//! pods (failurePolicy: Fail), which is the safe side.

use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};

#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    #[error("reading or patching MutatingWebhookConfiguration {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Sets every webhook's `clientConfig.caBundle` of configuration `name` to
/// `ca_pem` when it differs. Returns how many were changed. Works on the raw
/// object, so fields our Kubernetes types do not know are written back as
/// they were.
pub async fn sync(client: &Client, name: &str, ca_pem: &str) -> Result<usize, CaBundleError> {
    let resource = ApiResource::erase::<MutatingWebhookConfiguration>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let fail = |source| CaBundleError::Api {
        name: name.to_owned(),
        source,
    };
    let current = api.get(name).await.map_err(fail)?;
    let wanted = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut webhooks = current
        .data
        .get("webhooks")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut changed = 0;
    for hook in &mut webhooks {
        let Some(config) = hook
            .get_mut("clientConfig")
            .and_then(serde_json::Value::as_object_mut)
        else {
            continue;
        };
        if config.get("caBundle").and_then(|v| v.as_str()) != Some(wanted.as_str()) {
            config.insert("caBundle".into(), wanted.clone().into());
            changed += 1;
        }
    }
    if changed == 0 {
        return Ok(0);
    }
    // The resourceVersion makes a concurrent edit of the list (a Helm
    // upgrade) fail this write instead of being overwritten by it.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "webhooks": webhooks,
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(fail)?;
    Ok(changed)
}

/// Keeps the bundle in place: now, and again every `every` (a chart upgrade
/// may reset it); after a failure (the configuration not created yet, a
/// conflicting write) again within two seconds. Logs failures; never returns.
pub async fn keep(client: Client, name: String, ca_pem: String, every: Duration) {
    loop {
        let wait = match sync(&client, &name, &ca_pem).await {
            Ok(0) => every,
            Ok(n) => {
                tracing::info!(configuration = %name, webhooks = n, "webhook CA bundle set");
                every
            }
            Err(error) => {
                tracing::warn!(%error, "webhook CA bundle not set; annotated pods are refused until it is");
                RETRY.min(every)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

const RETRY: Duration = Duration::from_secs(2);

//! The mutating admission webhook of delivery mode `proxy`, served by every
//! controller replica over TLS with the custody certificate (same
//! self-made CA). The API server sends it pods annotated
//! `scopehold.dev/inject: proxy` (the chart's matchConditions); it adds the
//! sidecar with `proxy::pod::inject`, rendering the rules from the
//! controller's caches exactly as `kubectl scopehold inject` does from lists.

pub mod ca_bundle;
pub mod review;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kube::ResourceExt as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::api::SecretGrant;
use crate::caches::Caches;
use crate::proxy::pod::SidecarSettings;
use crate::proxy::render::rules_for;
use review::{AdmissionReview, Refused};

/// The path the chart's MutatingWebhookConfiguration calls.
pub const MUTATE_PATH: &str = "/mutate-pods";
/// The chart's matchConditions expression: only pods that ask for the
/// sidecar are sent to the webhook (and refused when it is down).
pub const MATCH_CONDITION: &str = "has(object.metadata.annotations) && 'scopehold.dev/inject' in object.metadata.annotations && object.metadata.annotations['scopehold.dev/inject'] == 'proxy'";
/// Largest AdmissionReview read (pods are far smaller).
const MAX_BODY: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook TLS: {0}")]
    Tls(String),
}

/// Where proxy sidecars report their uses.
pub const USAGE_PATH: &str = "/usage";

/// What every request shares.
pub struct Webhook {
    pub caches: Caches,
    pub sidecar: SidecarSettings,
    /// Takes the sidecars' usage reports (`POST /usage`).
    pub usage: Option<Arc<crate::usage::intake::Intake>>,
}

/// A rustls server configuration from PEM certificate chain and key.
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::Tls(format!("certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| WebhookError::Tls(format!("key: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::proxy::crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| WebhookError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    webhook: Arc<Webhook>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = listener.accept().await?;
        let (acceptor, webhook) = (acceptor.clone(), webhook.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::debug!(%error, %peer, "webhook: TLS handshake failed");
                    return;
                }
            };
            let service = service_fn(move |req| handle(webhook.clone(), req));
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, %peer, "webhook: connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    webhook: Arc<Webhook>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() == Method::POST
        && req.uri().path() == USAGE_PATH
        && let Some(intake) = webhook.usage.clone()
    {
        return Ok(usage(&intake, req).await);
    }
    if req.method() != Method::POST || req.uri().path() != MUTATE_PATH {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            format!("{{\"error\":\"POST an AdmissionReview to {MUTATE_PATH}\"}}"),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(error) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("reading the body: {error}")}).to_string(),
            ));
        }
    };
    let request = match serde_json::from_slice::<AdmissionReview>(&body) {
        Ok(AdmissionReview {
            request: Some(request),
        }) => request,
        Ok(_) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "{\"error\":\"the AdmissionReview has no request\"}".into(),
            ));
        }
        Err(error) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("not an AdmissionReview: {error}")})
                    .to_string(),
            ));
        }
    };
    let pod_name = request
        .object
        .as_ref()
        .and_then(|o| {
            o.pointer("/metadata/name")
                .or(o.pointer("/metadata/generateName"))
        })
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_owned();
    let (response, outcome) = review::decide(&request, &webhook.sidecar, |ns, sa| {
        rules_from_caches(&webhook.caches, ns, sa)
    });
    tracing::info!(
        namespace = request.namespace.as_deref().unwrap_or(""),
        pod = %pod_name,
        outcome = outcome.as_str(),
        reason = response.status.as_ref().map(|s| s.message.as_str()),
        "admission review"
    );
    Ok(reply(StatusCode::OK, response.into_review().to_string()))
}

/// A sidecar's usage report.
async fn usage(
    intake: &crate::usage::intake::Intake,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(error) => {
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("reading the body: {error}")}).to_string(),
            );
        }
    };
    match intake.accept(bearer.as_deref(), &body).await {
        Ok(counted) => reply(
            StatusCode::OK,
            serde_json::json!({ "counted": counted }).to_string(),
        ),
        Err(error) => {
            tracing::warn!(%error, "usage report refused");
            reply(
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::FORBIDDEN),
                serde_json::json!({ "error": error.to_string() }).to_string(),
            )
        }
    }
}

/// The pod's proxy rules from the controller's caches (the same
/// `rules_for` as `kubectl scopehold inject`).
fn rules_from_caches(
    caches: &Caches,
    namespace: &str,
    service_account: &str,
) -> Result<crate::proxy::ProxyRules, Refused> {
    if !caches.is_synced() {
        return Err(Refused::NotSynced);
    }
    let claiming = caches.identities_claiming(namespace, service_account);
    let grants: Vec<SecretGrant> = claiming
        .iter()
        .flat_map(|i| caches.grants_of_agent(namespace, &i.name_any()))
        .map(|g| (*g).clone())
        .collect();
    Ok(rules_for(
        namespace,
        service_account,
        claiming.iter().map(AsRef::as_ref),
        &grants,
    )?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_chart_sends_exactly_the_pods_that_ask() {
        let helpers = include_str!("../../charts/scopehold/templates/_helpers.tpl");
        assert!(helpers.contains(super::MATCH_CONDITION));
    }
}

//! The sidecar's usage reports: every few seconds, the uses counted since the
//! last report (per grant and host) go to the controller's HTTPS endpoint
//! (the one serving the admission webhook, custody's certificate), with the
//! sidecar's own bound ServiceAccount token (audience `scopehold.dev`,
//! mounted into the sidecar container only). The controller counts a use
//! only for a proxy grant of the agent that token proves, so a pod cannot
//! count uses of another agent's grants. A report that fails is kept and
//! sent with the next one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::audit::Usage;

/// Entries in one report at most (the controller refuses more).
pub const MAX_ENTRIES: usize = 256;

/// What the sidecar sends (`POST /usage`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    pub uses: Vec<UseEntry>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UseEntry {
    pub grant: String,
    /// `host:port` the value was injected for.
    pub host: String,
    pub count: u64,
    pub first_at: Timestamp,
    pub last_at: Timestamp,
}

/// Where and how the sidecar reports.
#[derive(Clone, Debug)]
pub struct ReportSettings {
    /// `https://host:port/usage`.
    pub url: Uri,
    /// PEM of the CA that signs the endpoint's certificate.
    pub ca_pem: String,
    /// The sidecar's bound token, re-read for every report (kubelet rotates it).
    pub token_file: PathBuf,
    pub every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("usage URL {0:?} must be https://host[:port]/path")]
    Url(String),
    #[error("usage CA: {0}")]
    Ca(String),
    #[error("reading the token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("the controller refused the report ({status}): {message}")]
    Refused { status: StatusCode, message: String },
}

/// A TLS client configuration trusting only `ca_pem`.
fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, ReportError> {
    let mut roots = RootCertStore::empty();
    for cert in super::ca_certificates(ca_pem).map_err(|e| ReportError::Ca(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| ReportError::Ca(e.to_string()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(super::crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| ReportError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks the settings once at start, so a bad URL or CA fails the sidecar
/// loudly instead of every report failing quietly.
pub fn check(settings: &ReportSettings) -> Result<Arc<rustls::ClientConfig>, ReportError> {
    let url = &settings.url;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        return Err(ReportError::Url(url.to_string()));
    }
    client_config(&settings.ca_pem)
}

/// Sends one report.
pub async fn send(
    settings: &ReportSettings,
    tls: Arc<rustls::ClientConfig>,
    report: &UsageReport,
) -> Result<(), ReportError> {
    let url = &settings.url;
    let host = url
        .host()
        .ok_or_else(|| ReportError::Url(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    let token =
        std::fs::read_to_string(&settings.token_file).map_err(|source| ReportError::Token {
            path: settings.token_file.clone(),
            source,
        })?;
    let connect = |e: String| ReportError::Connect(format!("{host}:{port}"), e);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| connect(e.to_string()))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| connect(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| connect(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| connect(e.to_string()))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(report).map_err(|e| connect(e.to_string()))?;
    let request = Request::post(url.path())
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| connect(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| connect(e.to_string()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(ReportError::Refused {
        status,
        message: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    })
}

/// The next report: everything counted, at most [`MAX_ENTRIES`] entries
/// (the rest stays for the one after).
fn next_report(usage: &Usage) -> Option<UsageReport> {
    let mut counts = usage.take();
    if counts.is_empty() {
        return None;
    }
    let mut uses = Vec::new();
    while uses.len() < MAX_ENTRIES {
        let Some(((grant, host), c)) = counts.pop_first() else {
            break;
        };
        uses.push(UseEntry {
            grant,
            host,
            count: c.count,
            first_at: c.first,
            last_at: c.last,
        });
    }
    usage.restore(counts);
    Some(UsageReport { uses })
}

/// Reports every `settings.every` until the process ends.
pub async fn run(usage: Arc<Usage>, settings: ReportSettings, tls: Arc<rustls::ClientConfig>) {
    let mut tick = tokio::time::interval(settings.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(report) = next_report(&usage) else {
            continue;
        };
        match send(&settings, tls.clone(), &report).await {
            Ok(()) => tracing::debug!(entries = report.uses.len(), "usage reported"),
            Err(error) => {
                tracing::warn!(%error, "usage report failed; kept for the next one");
                usage.restore(
                    report
                        .uses
                        .into_iter()
                        .map(|u| {
                            (
                                (u.grant, u.host),
                                super::audit::UseCount {
                                    count: u.count,
                                    first: u.first_at,
                                    last: u.last_at,
                                },
                            )
                        })
                        .collect(),
                );
            }
        }
    }
}

//! `scopehold proxy`: the sidecar of delivery mode `proxy`. The agent holds
//! a placeholder; the sidecar, which alone mounts the CSI volume with the
//! real values, injects them into requests to the grant's hosts.
//!
//! Imports `api` (types) and `audit` only; it talks to no API server.

pub mod audit;
pub mod ca;
pub mod inject;
pub mod pod;
pub mod render;
pub mod report;
pub mod rules;
pub mod scrub;
pub mod server;
pub mod tunnel;
pub mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

pub use rules::ProxyRules;

/// File names in the agent's volume.
pub const CA_FILE: &str = "ca.crt";
pub const BUNDLE_FILE: &str = "ca-bundle.crt";

/// ring, like the rest of the crate (kube, tonic).
pub fn crypto() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct ProxySettings {
    pub listen: SocketAddr,
    /// The sidecar's CSI volume (real values).
    pub values_dir: PathBuf,
    /// The volume shared with the agent (placeholders, CA certificate).
    pub agent_dir: PathBuf,
    pub rules: ProxyRules,
    pub pod: String,
    /// Extra CAs trusted for upstream connections (tests, private APIs).
    pub upstream_ca_files: Vec<PathBuf>,
    /// The same as PEM text (what the webhook injects: the sidecar
    /// container has no file of the controller's).
    pub upstream_ca_pem: Option<String>,
    /// How often the values volume is checked for changes.
    pub poll: Duration,
    /// Where uses are reported (none: audit lines only).
    pub report: Option<report::ReportSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("pod CA: {0}")]
    Ca(#[from] ca::CaError),
    #[error("agent volume: {0}")]
    Publish(#[from] values::PublishError),
    #[error("reading upstream CA {path}: {message}")]
    UpstreamCa { path: PathBuf, message: String },
    #[error("upstream CA (SCOPEHOLD_PROXY_UPSTREAM_CA_PEM): {0}")]
    UpstreamCaPem(#[source] CaPemError),
    #[error("TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
    #[error("usage reports: {0}")]
    Report(#[from] report::ReportError),
}

/// Prepares everything, binds, and returns the bound address and the
/// serving future: the agent's files exist before the port accepts (the
/// pod's startup probe on the port orders the agent after them).
pub async fn start(
    settings: ProxySettings,
) -> Result<
    (
        SocketAddr,
        impl Future<Output = Result<(), ProxyError>> + Send + 'static,
    ),
    ProxyError,
> {
    let upstream_tls = upstream_config(
        &settings.upstream_ca_files,
        settings.upstream_ca_pem.as_deref(),
    )?;
    let report_tls = settings.report.as_ref().map(report::check).transpose()?;
    let ca = ca::PodCa::generate()?;
    let placeholders = values::placeholders(&settings.agent_dir, &settings.rules)?;
    values::write_public(
        &settings.agent_dir.join(CA_FILE),
        ca.certificate_pem().as_bytes(),
    )?;
    values::write_public(
        &settings.agent_dir.join(BUNDLE_FILE),
        ca::trust_bundle(ca.certificate_pem()).as_bytes(),
    )?;
    let store = values::ValueStore::new(settings.values_dir.clone(), &settings.rules);
    let present = store.reload();
    tokio::spawn(store.clone().watch(settings.poll));
    let usage = Arc::new(audit::Usage::default());
    if let (Some(report), Some(tls)) = (settings.report.clone(), report_tls) {
        tokio::spawn(report::run(usage.clone(), report, tls));
    }
    let proxy = Arc::new(server::Proxy {
        namespace: settings.rules.namespace.clone(),
        agent: settings.rules.agent.clone(),
        pod: settings.pod.clone(),
        compiled: inject::Compiled::new(&settings.rules, &placeholders),
        values: store,
        ca,
        upstream_tls,
        usage,
    });
    let listener = server::bind(settings.listen)
        .await
        .map_err(|source| ProxyError::Listen {
            addr: settings.listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(
        listen = %bound,
        agent = %settings.rules.agent,
        grants = settings.rules.grants.len(),
        values_present = present,
        "proxy listening"
    );
    Ok((bound, async move {
        server::serve(listener, proxy)
            .await
            .map_err(ProxyError::Serve)
    }))
}

/// Why a PEM CA bundle was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum CaPemError {
    #[error("not PEM: {0}")]
    Pem(String),
    #[error("no certificate in it")]
    Empty,
}

/// The certificates of a PEM bundle; at least one.
pub fn ca_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaPemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaPemError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CaPemError::Empty);
    }
    Ok(certs)
}

fn upstream_config(
    files: &[PathBuf],
    pem: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, ProxyError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    for path in files {
        let fail = |message: String| ProxyError::UpstreamCa {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        for cert in ca_certificates(&text).map_err(|e| fail(e.to_string()))? {
            roots.add(cert).map_err(|e| fail(e.to_string()))?;
        }
    }
    if let Some(pem) = pem {
        for cert in ca_certificates(pem).map_err(ProxyError::UpstreamCaPem)? {
            roots
                .add(cert)
                .map_err(|e| ProxyError::UpstreamCaPem(CaPemError::Pem(e.to_string())))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_bundle_must_hold_a_certificate() {
        let ca = ca::PodCa::generate().unwrap();
        let two = format!("{}{}", ca.certificate_pem(), ca.certificate_pem());
        assert_eq!(ca_certificates(&two).unwrap().len(), 2);
        assert!(matches!(ca_certificates(""), Err(CaPemError::Empty)));
        assert!(matches!(
            ca_certificates("just some text\n"),
            Err(CaPemError::Empty)
        ));
        assert!(matches!(
            ca_certificates(
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
            ),
            Err(CaPemError::Pem(_))
        ));
    }

    #[test]
    fn the_upstream_trust_takes_inline_pem_and_refuses_a_bad_one() {
        let ca = ca::PodCa::generate().unwrap();
        assert!(upstream_config(&[], Some(ca.certificate_pem())).is_ok());
        let err = upstream_config(&[], Some("nothing")).unwrap_err();
        assert!(
            err.to_string().contains("SCOPEHOLD_PROXY_UPSTREAM_CA_PEM"),
            "{err}"
        );
    }
}

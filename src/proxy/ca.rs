//! The pod's own CA: generated in memory when the sidecar starts, its key
//! never serialized anywhere. It signs one leaf per granted host the agent
//! connects to; the agent trusts only its certificate (published in the
//! agent's volume together with the public roots).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

pub struct PodCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    /// One key for every leaf: minting a leaf is then one signature.
    leaf_key: KeyPair,
    /// Leaf configurations by host name; bounded by the grants' hosts.
    minted: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl PodCa {
    pub fn generate() -> Result<Self, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "scopehold proxy (this pod only)");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(PodCa {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            leaf_key: KeyPair::generate()?,
            minted: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM (public).
    pub fn certificate_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A TLS server configuration presenting a leaf for `host` (a DNS name
    /// or an IP address), minted on first use.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        if let Some(hit) = self.lock().get(host) {
            return Ok(hit.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = params.signed_by(&self.leaf_key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(super::crypto())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], key)?;
        // HTTP/1.1 only: one request at a time per connection keeps the
        // injection and the audit line per request simple.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.lock().insert(host.to_owned(), config.clone());
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerConfig>>> {
        self.minted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// PEM of a DER certificate.
pub fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The public roots (Mozilla's, as shipped by webpki-root-certs) plus the
/// pod's CA: what the agent's CA variables point at, so hosts the proxy
/// tunnels untouched still verify.
pub fn trust_bundle(ca_pem: &str) -> String {
    let mut out = String::new();
    for root in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        out.push_str(&pem(root));
    }
    out.push_str(ca_pem);
    out
}

//! TLS for the custody channel: a CA and a serving certificate, created once
//! and kept in a Secret that every replica shares, with the CA bundle
//! published in a ConfigMap that the node plugins trust.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";

/// Where the material lives and which names the certificate must carry.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub namespace: String,
    pub secret_name: String,
    pub configmap_name: String,
    /// DNS names or IP addresses the serving certificate is valid for.
    pub subject_alt_names: Vec<String>,
}

/// PEM text of the CA certificate and of the serving certificate and key.
/// `Debug` omits the key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &self.ca_pem)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Secret {0} exists but lacks {1}; delete it to have it recreated")]
    Incomplete(String, &'static str),
    #[error("reading or writing {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Generates a CA and a serving certificate for `sans`.
pub fn generate(sans: &[String]) -> Result<(TlsMaterial, String), rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "scopehold-custody-ca");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(sans.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "scopehold-custody");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((
        TlsMaterial {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        ca_key_pem,
    ))
}

/// Loads the shared material, creating it when no replica has yet. Two
/// replicas racing both try to create; the loser reads the winner's.
pub async fn ensure(client: &Client, settings: &TlsSettings) -> Result<TlsMaterial, TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let api_error = |what: &str| {
        let what = format!("{what} {}/{}", settings.namespace, settings.secret_name);
        move |source| TlsError::Api { what, source }
    };
    let material = match secrets
        .get_opt(&settings.secret_name)
        .await
        .map_err(api_error("Secret"))?
    {
        Some(secret) => from_secret(&secret, &settings.secret_name)?,
        None => {
            let (material, ca_key) = generate(&settings.subject_alt_names)?;
            let secret = to_secret(&settings.secret_name, &material, &ca_key);
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = %settings.secret_name, "created the custody CA and serving certificate");
                    material
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let secret = secrets
                        .get(&settings.secret_name)
                        .await
                        .map_err(api_error("Secret"))?;
                    from_secret(&secret, &settings.secret_name)?
                }
                Err(e) => return Err(api_error("Secret")(e)),
            }
        }
    };
    publish_ca(client, settings, &material.ca_pem).await?;
    Ok(material)
}

async fn publish_ca(client: &Client, settings: &TlsSettings, ca_pem: &str) -> Result<(), TlsError> {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &settings.namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(settings.configmap_name.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_CERT.to_owned(), ca_pem.to_owned())])),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&cm).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), "v1".into());
        map.insert("kind".into(), "ConfigMap".into());
    }
    configmaps
        .patch(
            &settings.configmap_name,
            &PatchParams::apply("scopehold-controller").force(),
            &Patch::Apply(&value),
        )
        .await
        .map_err(|source| TlsError::Api {
            what: format!(
                "ConfigMap {}/{}",
                settings.namespace, settings.configmap_name
            ),
            source,
        })?;
    Ok(())
}

fn to_secret(name: &str, m: &TlsMaterial, ca_key: &str) -> Secret {
    let data = [
        (CA_CERT, &m.ca_pem),
        (CA_KEY, &ca_key.to_owned()),
        (TLS_CERT, &m.cert_pem),
        (TLS_KEY, &m.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn from_secret(secret: &Secret, name: &str) -> Result<TlsMaterial, TlsError> {
    let get = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .ok_or_else(|| TlsError::Incomplete(name.to_owned(), key))
    };
    Ok(TlsMaterial {
        ca_pem: get(CA_CERT)?,
        cert_pem: get(TLS_CERT)?,
        key_pem: get(TLS_KEY)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_round_trips_through_a_secret() {
        let (m, ca_key) =
            generate(&["scopehold-custody.ns.svc".into(), "127.0.0.1".into()]).unwrap();
        assert!(m.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{m:?}").contains(&m.key_pem), "Debug shows no key");
        let back = from_secret(&to_secret("s", &m, &ca_key), "s").unwrap();
        assert_eq!(
            (back.ca_pem, back.cert_pem, back.key_pem),
            (m.ca_pem, m.cert_pem, m.key_pem)
        );
    }

    #[test]
    fn incomplete_secret_is_reported() {
        let secret = Secret {
            data: Some(BTreeMap::new()),
            ..Default::default()
        };
        assert!(matches!(
            from_secret(&secret, "s"),
            Err(TlsError::Incomplete(_, "ca.crt"))
        ));
    }
}

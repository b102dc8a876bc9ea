//! A CA of the test's own and a serving certificate signed by it: for the
//! loopback upstreams of tests/proxy.rs and examples/bench_proxy.rs, and
//! (included by tests/common/cluster.rs) the real node's test upstream.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA and a serving certificate for `names` (host names or IPs).
pub fn pki_for(names: &[&str]) -> TestPki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "scopehold test upstream CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// localhost and 127.0.0.1: two names, so one upstream is a granted and a
/// non-granted host at once.
pub fn test_pki() -> TestPki {
    pki_for(&["localhost", "127.0.0.1"])
}

//! Deciding, per request, which keys apply and rewriting the request: pure
//! functions over the request head, so every rule is unit-tested apart from
//! sockets and TLS.

use std::collections::BTreeMap;

use base64::Engine as _;
use http::header::{AUTHORIZATION, HOST, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use super::rules::{HostPattern, ProxyRules};
use super::values::Snapshot;

/// The host and port the agent asked to reach (CONNECT target or absolute
/// URI), host in lower case without brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn parse(authority: &http::uri::Authority, default_port: u16) -> Self {
        Target {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Clone, Debug)]
enum Injection {
    Header { name: HeaderName, template: String },
    Basic { username: String },
    Placeholder,
}

/// One proxied key, ready to apply.
#[derive(Clone, Debug)]
pub struct CompiledKey {
    pub grant: String,
    pub key: String,
    pub file: String,
    patterns: Vec<HostPattern>,
    injection: Injection,
    placeholder: String,
}

/// The rules with host patterns parsed and placeholders attached.
#[derive(Clone, Debug)]
pub struct Compiled {
    keys: Vec<CompiledKey>,
    allow: Option<Vec<HostPattern>>,
}

impl Compiled {
    /// Keys without a placeholder or with an unusable header name are left
    /// out (`ProxyRules::check` and the schema refuse them earlier).
    pub fn new(rules: &ProxyRules, placeholders: &BTreeMap<String, String>) -> Self {
        let mut keys = Vec::new();
        for g in &rules.grants {
            for k in &g.keys {
                let Some(placeholder) = placeholders.get(&k.file) else {
                    continue;
                };
                let injection = if let Some(h) = &k.proxy.header {
                    let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
                        continue;
                    };
                    Injection::Header {
                        name,
                        template: h.template.clone(),
                    }
                } else if let Some(b) = &k.proxy.basic_auth {
                    Injection::Basic {
                        username: b.username.clone(),
                    }
                } else {
                    Injection::Placeholder
                };
                keys.push(CompiledKey {
                    grant: g.grant.clone(),
                    key: k.key.clone(),
                    file: k.file.clone(),
                    patterns: k
                        .proxy
                        .hosts
                        .iter()
                        .filter_map(|h| HostPattern::parse(h))
                        .collect(),
                    injection,
                    placeholder: placeholder.clone(),
                });
            }
        }
        let allow = rules
            .egress_allow_list
            .as_ref()
            .map(|a| a.iter().filter_map(|h| HostPattern::parse(h)).collect());
        Compiled { keys, allow }
    }

    /// The keys that may be sent to `target`.
    pub fn keys_for(&self, target: &Target) -> Vec<&CompiledKey> {
        self.keys
            .iter()
            .filter(|k| {
                k.patterns
                    .iter()
                    .any(|p| p.matches(&target.host, target.port))
            })
            .collect()
    }

    /// Whether the agent may reach `target` at all: a granted host, or any
    /// host when its identity sets no allow-list.
    pub fn may_reach(&self, target: &Target) -> bool {
        match &self.allow {
            None => true,
            Some(allow) => {
                !self.keys_for(target).is_empty()
                    || allow.iter().any(|p| p.matches(&target.host, target.port))
            }
        }
    }
}

/// Why a request is answered by the proxy instead of going upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: http::StatusCode,
    pub reason: &'static str,
    pub message: String,
    /// Grants named in the refusal (for the audit line).
    pub grants: Vec<String>,
}

/// A request ready to go upstream.
#[derive(Debug, Default)]
pub struct Injected {
    /// `grant/key` pairs whose value went into the request.
    pub used: Vec<(String, String)>,
    /// Byte strings to mask in the response (each value as sent, in every
    /// form sent) and what replaces them.
    pub scrub: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Refuses a request whose `Host` (or absolute URI) names another host than
/// the one the agent's TLS connection was opened for: the value would go to
/// a host that was not checked against the grant.
pub fn check_authority(parts: &Parts, target: &Target) -> Result<(), Refusal> {
    let mismatch = |what: &str, seen: &str| Refusal {
        status: http::StatusCode::MISDIRECTED_REQUEST,
        reason: "HostMismatch",
        message: format!(
            "scopehold proxy: {what} {seen:?} does not match the host this connection was opened for ({target}); request refused"
        ),
        grants: vec![],
    };
    if let Some(authority) = parts.uri.authority()
        && Target::parse(authority, target.port) != *target
    {
        return Err(mismatch("request URI authority", authority.as_str()));
    }
    let Some(host) = parts.headers.get(HOST) else {
        if parts.uri.authority().is_some() {
            return Ok(());
        }
        return Err(mismatch("missing Host header", ""));
    };
    let seen = host.to_str().unwrap_or("");
    match seen.parse::<http::uri::Authority>() {
        Ok(a) if Target::parse(&a, target.port) == *target => Ok(()),
        _ => Err(mismatch("Host header", seen)),
    }
}

/// Injects the keys that apply into the request: templates set their
/// header; placeholders are replaced in header values and the query. A key
/// the request needs whose value is gone (revoked, expired, suspended)
/// refuses the request, naming the grant, so nothing leaves silently
/// unauthenticated.
pub fn inject(
    parts: &mut Parts,
    keys: &[&CompiledKey],
    values: &Snapshot,
) -> Result<Injected, Refusal> {
    let mut out = Injected::default();
    let mut gone: Vec<&CompiledKey> = Vec::new();
    for k in keys {
        let needed = match k.injection {
            Injection::Placeholder => contains_placeholder(parts, &k.placeholder),
            _ => true,
        };
        if !needed {
            continue;
        }
        let Some(value) = values.get(&k.file) else {
            gone.push(k);
            continue;
        };
        let value = value.bytes();
        let invalid = |what: &str| Refusal {
            status: http::StatusCode::BAD_GATEWAY,
            reason: "ValueUnusable",
            message: format!(
                "scopehold proxy: the value of SecretGrant {:?} key {:?} cannot be sent in {what}",
                k.grant, k.key
            ),
            grants: vec![k.grant.clone()],
        };
        match &k.injection {
            Injection::Header { name, template } => {
                let rendered = render(template, value);
                let header = HeaderValue::from_bytes(&rendered).map_err(|_| invalid("a header"))?;
                parts.headers.insert(name.clone(), header);
            }
            Injection::Basic { username } => {
                let credential = basic(username, value);
                let header = HeaderValue::from_str(&format!("Basic {credential}"))
                    .map_err(|_| invalid("a header"))?;
                parts.headers.insert(AUTHORIZATION, header);
                out.scrub.push((
                    credential.into_bytes(),
                    basic(username, k.placeholder.as_bytes()).into_bytes(),
                ));
            }
            Injection::Placeholder => {
                let ph = k.placeholder.as_bytes();
                for (_, v) in parts.headers.iter_mut() {
                    if find(v.as_bytes(), ph).is_some() {
                        let replaced = replace_all(v.as_bytes(), ph, value);
                        *v = HeaderValue::from_bytes(&replaced).map_err(|_| invalid("a header"))?;
                    }
                }
                if let Some(pq) = parts.uri.path_and_query()
                    && pq.query().is_some_and(|q| q.contains(&k.placeholder))
                {
                    let encoded = percent_encode(value);
                    let new = pq.as_str().replace(&k.placeholder, &encoded);
                    let pq: PathAndQuery = new.parse().map_err(|_| invalid("a URL"))?;
                    let mut uri = parts.uri.clone().into_parts();
                    uri.path_and_query = Some(pq);
                    parts.uri = Uri::from_parts(uri).map_err(|_| invalid("a URL"))?;
                    if encoded.as_bytes() != value {
                        out.scrub.push((encoded.into_bytes(), ph.to_vec()));
                    }
                }
            }
        }
        out.scrub
            .push((value.to_vec(), k.placeholder.as_bytes().to_vec()));
        out.used.push((k.grant.clone(), k.key.clone()));
    }
    if !gone.is_empty() {
        let mut grants: Vec<String> = gone.iter().map(|k| k.grant.clone()).collect();
        grants.dedup();
        let names = gone
            .iter()
            .map(|k| format!("SecretGrant {:?} (key {:?})", k.grant, k.key))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Refusal {
            status: http::StatusCode::FORBIDDEN,
            reason: "GrantWithdrawn",
            message: format!(
                "scopehold proxy: {names} no longer delivers its value to this pod (revoked, expired or its agent suspended); the request was not sent"
            ),
            grants,
        });
    }
    // Longest first, so a value containing another is masked whole.
    out.scrub.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
    Ok(out)
}

fn contains_placeholder(parts: &Parts, placeholder: &str) -> bool {
    parts
        .headers
        .values()
        .any(|v| find(v.as_bytes(), placeholder.as_bytes()).is_some())
        || parts.uri.query().is_some_and(|q| q.contains(placeholder))
}

fn render(template: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(template.len() + value.len());
    let mut rest = template;
    while let Some(at) = rest.find(crate::api::delivery::VALUE_MARK) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        out.extend_from_slice(value);
        rest = &rest[at + crate::api::delivery::VALUE_MARK.len()..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

fn basic(username: &str, password: &[u8]) -> String {
    let mut plain = Vec::with_capacity(username.len() + 1 + password.len());
    plain.extend_from_slice(username.as_bytes());
    plain.push(b':');
    plain.extend_from_slice(password);
    base64::engine::general_purpose::STANDARD.encode(plain)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = find(rest, needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn percent_encode(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyProxy;
    use crate::api::delivery::{BasicAuth, HeaderTemplate};
    use crate::proxy::rules::{GrantRules, KeyRules};

    fn compiled() -> Compiled {
        let key = |key: &str, proxy| KeyRules {
            key: key.into(),
            file: key.into(),
            proxy,
        };
        let rules = ProxyRules {
            namespace: "ns".into(),
            agent: "bot".into(),
            grants: vec![GrantRules {
                grant: "g".into(),
                secret: "s".into(),
                keys: vec![
                    key(
                        "bearer",
                        KeyProxy {
                            hosts: vec!["api.example.com".into()],
                            header: Some(HeaderTemplate {
                                name: "Authorization".into(),
                                template: "Bearer {value}".into(),
                            }),
                            ..Default::default()
                        },
                    ),
                    key(
                        "basic",
                        KeyProxy {
                            hosts: vec!["*.basic.test:8443".into()],
                            basic_auth: Some(BasicAuth {
                                username: "u".into(),
                            }),
                            ..Default::default()
                        },
                    ),
                    key(
                        "ph",
                        KeyProxy {
                            hosts: vec!["api.example.com".into()],
                            replace_placeholder: Some(true),
                            ..Default::default()
                        },
                    ),
                ],
            }],
            egress_allow_list: Some(vec!["pypi.org".into()]),
        };
        let placeholders = ["bearer", "basic", "ph"]
            .iter()
            .map(|k| (k.to_string(), format!("PH-{k}")))
            .collect();
        Compiled::new(&rules, &placeholders)
    }

    fn values(with: &[(&str, &str)]) -> std::sync::Arc<Snapshot> {
        let dir = tempfile::tempdir().unwrap();
        for (f, v) in with {
            std::fs::write(dir.path().join(f), v).unwrap();
        }
        let rules = ProxyRules {
            grants: vec![GrantRules {
                keys: with
                    .iter()
                    .map(|(f, _)| KeyRules {
                        file: f.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let store = crate::proxy::values::ValueStore::new(dir.path().into(), &rules);
        store.reload();
        store.snapshot()
    }

    fn request(uri: &str, host: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn target(h: &str, port: u16) -> Target {
        Target {
            host: h.into(),
            port,
        }
    }

    #[test]
    fn header_template_and_placeholder_for_the_granted_host() {
        let c = compiled();
        let t = target("api.example.com", 443);
        let keys = c.keys_for(&t);
        assert_eq!(keys.len(), 2);
        let mut parts = request(
            "/v1/x?key=PH-ph&other=1",
            "api.example.com",
            &[("authorization", "Bearer PH-bearer"), ("x-key", "k=PH-ph")],
        );
        check_authority(&parts, &t).unwrap();
        let v = values(&[("bearer", "s3cr3t\n"), ("ph", "a b/c")]);
        let done = inject(&mut parts, &keys, &v).unwrap();
        assert_eq!(parts.headers["authorization"], "Bearer s3cr3t");
        assert_eq!(parts.headers["x-key"], "k=a b/c");
        assert_eq!(parts.uri.query(), Some("key=a%20b%2Fc&other=1"));
        assert_eq!(done.used.len(), 2);
        assert!(
            done.scrub
                .iter()
                .any(|(v, p)| v == b"s3cr3t" && p == b"PH-bearer")
        );
    }

    #[test]
    fn other_hosts_get_nothing_and_the_allow_list_holds() {
        let c = compiled();
        assert!(c.keys_for(&target("evil.example", 443)).is_empty());
        assert!(c.keys_for(&target("api.example.com", 8443)).is_empty());
        assert!(!c.may_reach(&target("evil.example", 443)));
        assert!(c.may_reach(&target("pypi.org", 443)));
        assert!(c.may_reach(&target("x.basic.test", 8443)));
    }

    #[test]
    fn basic_auth() {
        let c = compiled();
        let t = target("a.basic.test", 8443);
        let mut parts = request("/", "a.basic.test:8443", &[]);
        let v = values(&[("basic", "pw")]);
        inject(&mut parts, &c.keys_for(&t), &v).unwrap();
        assert_eq!(parts.headers["authorization"], "Basic dTpwdw==");
    }

    #[test]
    fn a_withdrawn_value_refuses_naming_the_grant() {
        let c = compiled();
        let t = target("api.example.com", 443);
        let mut parts = request("/", "api.example.com", &[]);
        let refusal = inject(&mut parts, &c.keys_for(&t), &values(&[])).unwrap_err();
        assert_eq!(refusal.status, 403);
        assert!(
            refusal.message.contains("SecretGrant \"g\""),
            "{}",
            refusal.message
        );
        assert_eq!(refusal.grants, vec!["g".to_string()]);
        // The placeholder key is not needed by this request, so only the
        // header key is named.
        assert!(!refusal.message.contains("\"ph\""));
    }

    #[test]
    fn host_must_match_the_connection() {
        let t = target("api.example.com", 443);
        assert!(check_authority(&request("/", "api.example.com:443", &[]), &t).is_ok());
        assert!(check_authority(&request("/", "API.example.com", &[]), &t).is_ok());
        for bad in [
            "evil.example",
            "api.example.com:444",
            "api.example.com.evil",
        ] {
            let r = check_authority(&request("/", bad, &[]), &t).unwrap_err();
            assert_eq!(r.status, 421, "{bad}");
        }
        let abs = request("https://evil.example/", "api.example.com", &[]);
        assert!(check_authority(&abs, &t).is_err());
    }
}

//! What the sidecar injects where: the proxy grants of the pod's agent,
//! rendered once (by the admission webhook or `kubectl scopehold inject`)
//! into the sidecar's `--rules`. Values are not part of the rules; they come
//! from the sidecar's CSI volume and follow rotation and revocation live.

use serde::{Deserialize, Serialize};

use crate::api::delivery::{HOST_PATTERN, VALUE_MARK};
use crate::api::{DeliveryMode, GrantPhase, KeyProxy, SecretGrant};
use kube::ResourceExt;

/// Everything the sidecar needs besides the values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRules {
    pub namespace: String,
    pub agent: String,
    /// The agent's proxy grants, sorted by name.
    pub grants: Vec<GrantRules>,
    /// When set, hosts outside it (and outside every grant's hosts) are
    /// refused instead of tunnelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allow_list: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GrantRules {
    pub grant: String,
    pub secret: String,
    pub keys: Vec<KeyRules>,
}

impl GrantRules {
    /// What the sidecar does with one grant's keys, from the grant's spec.
    pub fn of(g: &SecretGrant) -> Self {
        GrantRules {
            grant: g.name_any(),
            secret: g.spec.secret_name.clone(),
            keys: g
                .spec
                .keys
                .iter()
                .filter_map(|k| {
                    Some(KeyRules {
                        key: k.key.clone(),
                        file: k.file_name().to_owned(),
                        proxy: k.proxy.clone()?,
                    })
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyRules {
    pub key: String,
    /// File name of the value in the sidecar's CSI volume, and of the
    /// placeholder in the agent's volume.
    pub file: String,
    pub proxy: KeyProxy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    #[error("proxy rules are not valid JSON: {0}")]
    Json(String),
    #[error(
        "SecretGrant {grant:?} key {key:?}: host {host:?} is not a host name with an optional port"
    )]
    Host {
        grant: String,
        key: String,
        host: String,
    },
    #[error("SecretGrant {grant:?} key {key:?}: {problem}")]
    Injection {
        grant: String,
        key: String,
        problem: &'static str,
    },
    #[error("egress allow-list entry {0:?} is not a host name with an optional port")]
    Allow(String),
    #[error("two proxied keys use the file name {0:?}")]
    DuplicateFile(String),
}

impl ProxyRules {
    /// Renders the rules from the agent's grants: only `delivery: proxy`
    /// grants that are not revoked; their keys in spec order.
    pub fn from_grants(
        namespace: &str,
        agent: &str,
        grants: &[SecretGrant],
        egress_allow_list: Option<Vec<String>>,
    ) -> Result<Self, RulesError> {
        let mut out: Vec<GrantRules> = grants
            .iter()
            .filter(|g| g.spec.agent == agent && g.spec.delivery == DeliveryMode::Proxy)
            // Only grants that resolve now: the sidecar's volume names
            // them, and custody refuses a volume naming an inactive grant.
            .filter(|g| !g.spec.revoked && g.phase() == Some(GrantPhase::Active))
            .map(GrantRules::of)
            .collect();
        out.sort_by(|a, b| a.grant.cmp(&b.grant));
        let rules = ProxyRules {
            namespace: namespace.to_owned(),
            agent: agent.to_owned(),
            grants: out,
            egress_allow_list,
        };
        rules.check()?;
        Ok(rules)
    }

    pub fn parse(json: &str) -> Result<Self, RulesError> {
        let rules: ProxyRules =
            serde_json::from_str(json).map_err(|e| RulesError::Json(e.to_string()))?;
        rules.check()?;
        Ok(rules)
    }

    /// The same checks the CRD schema makes, for rules that did not come
    /// through the API server.
    pub fn check(&self) -> Result<(), RulesError> {
        let mut files = std::collections::BTreeSet::new();
        for g in &self.grants {
            for k in &g.keys {
                let fail = |problem| RulesError::Injection {
                    grant: g.grant.clone(),
                    key: k.key.clone(),
                    problem,
                };
                if k.proxy.hosts.is_empty() {
                    return Err(fail("a proxied key needs at least one host"));
                }
                for h in &k.proxy.hosts {
                    if HostPattern::parse(h).is_none() {
                        return Err(RulesError::Host {
                            grant: g.grant.clone(),
                            key: k.key.clone(),
                            host: h.clone(),
                        });
                    }
                }
                let n = usize::from(k.proxy.header.is_some())
                    + usize::from(k.proxy.basic_auth.is_some())
                    + usize::from(k.proxy.replace_placeholder == Some(true));
                if n != 1 {
                    return Err(fail(
                        "set exactly one injection: header, basicAuth or replacePlaceholder: true",
                    ));
                }
                if let Some(h) = &k.proxy.header
                    && !h.template.contains(VALUE_MARK)
                {
                    return Err(fail("template must contain {value}"));
                }
                if !files.insert(k.file.clone()) {
                    return Err(RulesError::DuplicateFile(k.file.clone()));
                }
            }
        }
        for a in self.egress_allow_list.iter().flatten() {
            if HostPattern::parse(a).is_none() {
                return Err(RulesError::Allow(a.clone()));
            }
        }
        Ok(())
    }
}

/// `api.example.com`, `*.example.com`, with an optional port (default 443).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower case; for a wildcard, the suffix including its leading dot.
    name: String,
    wildcard: bool,
    port: u16,
}

impl HostPattern {
    pub fn parse(text: &str) -> Option<Self> {
        static PATTERN: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
        let re = PATTERN
            .get_or_init(|| regex::Regex::new(HOST_PATTERN).ok())
            .as_ref()?;
        if !re.is_match(text) {
            return None;
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p != 0)?),
            None => (text, 443),
        };
        let (name, wildcard) = match host.strip_prefix('*') {
            Some(suffix) => (suffix.to_owned(), true),
            None => (host.to_owned(), false),
        };
        Some(HostPattern {
            name,
            wildcard,
            port,
        })
    }

    /// Whether a request to `host:port` (host already lower case) matches.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        port == self.port
            && if self.wildcard {
                host.len() > self.name.len() && host.ends_with(&self.name)
            } else {
                host == self.name
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::delivery::HeaderTemplate;

    #[test]
    fn host_patterns() {
        let exact = HostPattern::parse("api.example.com").unwrap();
        assert!(exact.matches("api.example.com", 443));
        assert!(!exact.matches("api.example.com", 8443));
        assert!(!exact.matches("xapi.example.com", 443));
        let wild = HostPattern::parse("*.example.com:8443").unwrap();
        assert!(wild.matches("a.b.example.com", 8443));
        assert!(!wild.matches("example.com", 8443));
        assert!(!wild.matches("evil-example.com", 8443));
        assert!(!wild.matches("a.example.com", 443));
        for bad in [
            "",
            "*",
            "a/b",
            "a.com:0",
            "a.com:99999",
            "*.",
            "A.com",
            "a..com",
            "**.a.com",
        ] {
            assert!(HostPattern::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn checks_refuse_unusable_rules() {
        let key = |proxy| KeyRules {
            key: "k".into(),
            file: "k".into(),
            proxy,
        };
        let rules = |proxy| ProxyRules {
            namespace: "ns".into(),
            agent: "a".into(),
            grants: vec![GrantRules {
                grant: "g".into(),
                secret: "s".into(),
                keys: vec![key(proxy)],
            }],
            egress_allow_list: None,
        };
        let header = |t: &str| {
            Some(HeaderTemplate {
                name: "Authorization".into(),
                template: t.into(),
            })
        };
        let good = KeyProxy {
            hosts: vec!["api.example.com".into()],
            header: header("Bearer {value}"),
            ..Default::default()
        };
        assert_eq!(rules(good.clone()).check(), Ok(()));
        let no_hosts = KeyProxy {
            hosts: vec![],
            ..good.clone()
        };
        assert!(rules(no_hosts).check().is_err());
        let no_value = KeyProxy {
            header: header("Bearer"),
            ..good.clone()
        };
        assert!(rules(no_value).check().is_err());
        let two = KeyProxy {
            replace_placeholder: Some(true),
            ..good.clone()
        };
        assert!(rules(two).check().is_err());
        assert!(ProxyRules::parse("{").is_err());
    }
}

//! `grant AGENT --secret S --key K[=FILE]… [--ttl D | --expires-at T] --reason R`.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;

use crate::api::duration;
use crate::api::validation::{check_file_name, check_secret_key};
use crate::api::{AgentIdentity, GrantedKey, SecretGrant, SecretGrantSpec};
use crate::cli::args::GrantArgs;
use crate::cli::error::{api, status_code};
use crate::cli::output::{self, note};
use crate::cli::{CliError, Ctx, FIELD_MANAGER, OutputFormat};

/// Longest reason the schema accepts.
const MAX_REASON: usize = 1024;
/// Longest object name (DNS subdomain).
const MAX_NAME: usize = 253;

pub async fn run(ctx: &Ctx, args: &GrantArgs) -> Result<(), CliError> {
    let ns = ctx.namespace.as_str();
    let keys = parse_keys(&args.keys)?;
    let now = Timestamp::now();
    let lifetime = Lifetime::parse(args.ttl.as_deref(), args.expires_at.as_deref(), now)?;
    let reason = args.reason.trim();
    if reason.is_empty() {
        return Err(CliError::invalid(
            "--reason must say why the agent needs the keys",
        ));
    }
    if reason.chars().count() > MAX_REASON {
        return Err(CliError::invalid(format!(
            "--reason is longer than {MAX_REASON} characters"
        )));
    }
    let name = match &args.name {
        Some(name) => {
            check_dns_subdomain(name)?;
            name.clone()
        }
        None => default_name(&args.agent, &args.secret),
    };

    let identity = ctx
        .identities()
        .get_opt(&args.agent)
        .await
        .map_err(api(format!("reading AgentIdentity {:?}", args.agent)))?
        .ok_or_else(|| CliError::not_found("AgentIdentity", &args.agent, ns))?;
    let available = secret_keys(ctx, &args.secret).await?;
    check_keys_exist(&keys, &available, &args.secret, ns)?;
    for warning in warnings(&identity, &lifetime) {
        note(&format!("Warning: {warning}"));
    }

    let spec = SecretGrantSpec {
        agent: args.agent.clone(),
        secret_name: args.secret.clone(),
        keys,
        ttl: lifetime.ttl.as_ref().map(|(text, _)| text.clone()),
        expires_at: lifetime.expires_at.map(Time),
        revoked: false,
        reason: Some(reason.to_owned()),
        ..Default::default()
    };
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    let created = match ctx
        .grants()
        .create(&params, &SecretGrant::new(&name, spec))
        .await
    {
        Ok(created) => created,
        Err(e) if status_code(&e) == Some(409) => {
            return Err(CliError::AlreadyExists {
                kind: "SecretGrant",
                name,
                namespace: ns.to_owned(),
                hint: "; pass --name to create another one",
            });
        }
        Err(e) => return Err(api(format!("creating SecretGrant {name:?}"))(e)),
    };
    match ctx.output {
        OutputFormat::Table => {
            output::print(&format!("{}\n", summary(&created)))?;
            output::note(MOUNT_HINT);
            Ok(())
        }
        format => output::print(&output::document(
            format,
            &output::without_managed_fields(&created),
        )?),
    }
}

/// How an agent pod mounts its grants (on stderr, so table output stays
/// one line). The plugin refuses a volume without `readOnly: true`.
const MOUNT_HINT: &str = "The agent pod mounts it with: volumes: [{name: credentials, csi: {driver: csi.scopehold.dev, readOnly: true}}]";

/// The Secret's key names (values are read by the API call and dropped here).
async fn secret_keys(ctx: &Ctx, secret: &str) -> Result<BTreeSet<String>, CliError> {
    let found = ctx
        .secrets()
        .get_opt(secret)
        .await
        .map_err(api(format!("reading Secret {secret:?}")))?
        .ok_or_else(|| CliError::not_found("Secret", secret, &ctx.namespace))?;
    Ok(found.data.unwrap_or_default().into_keys().collect())
}

/// `K` or `K=FILE`, checked like the schema checks them, no duplicates.
pub fn parse_keys(specs: &[String]) -> Result<Vec<GrantedKey>, CliError> {
    let mut keys = Vec::new();
    let mut seen_keys = BTreeSet::new();
    let mut seen_files = BTreeSet::new();
    for spec in specs {
        let (key, path) = match spec.split_once('=') {
            Some((key, file)) => (key, Some(file)),
            None => (spec.as_str(), None),
        };
        check_secret_key(key)
            .map_err(|e| CliError::invalid(format!("invalid --key {spec:?}: {e}")))?;
        if let Some(file) = path {
            check_file_name(file)
                .map_err(|e| CliError::invalid(format!("invalid --key {spec:?}: file {e}")))?;
        }
        if !seen_keys.insert(key.to_owned()) {
            return Err(CliError::invalid(format!("--key {key:?} is given twice")));
        }
        let file = path.unwrap_or(key);
        if !seen_files.insert(file.to_owned()) {
            return Err(CliError::invalid(format!(
                "two keys would be mounted as the same file {file:?}"
            )));
        }
        keys.push(GrantedKey {
            key: key.to_owned(),
            path: path.filter(|p| *p != key).map(str::to_owned),
            mode: None,
            proxy: None,
        });
    }
    Ok(keys)
}

fn check_keys_exist(
    keys: &[GrantedKey],
    available: &BTreeSet<String>,
    secret: &str,
    namespace: &str,
) -> Result<(), CliError> {
    match keys.iter().find(|k| !available.contains(&k.key)) {
        Some(missing) => Err(CliError::KeyNotFound {
            secret: secret.to_owned(),
            namespace: namespace.to_owned(),
            key: missing.key.clone(),
            available: available.iter().cloned().collect(),
        }),
        None => Ok(()),
    }
}

/// How long the grant lasts: a ttl (as written, and parsed) or an instant.
#[derive(Debug, PartialEq)]
pub struct Lifetime {
    pub ttl: Option<(String, Duration)>,
    pub expires_at: Option<Timestamp>,
}

impl Lifetime {
    pub fn parse(
        ttl: Option<&str>,
        expires_at: Option<&str>,
        now: Timestamp,
    ) -> Result<Self, CliError> {
        let ttl = match ttl {
            None => None,
            Some(text) => {
                let parsed = duration::parse(text)
                    .map_err(|e| CliError::invalid(format!("invalid --ttl {text:?}: {e}")))?;
                if parsed.is_zero() {
                    return Err(CliError::invalid(format!(
                        "invalid --ttl {text:?}: a grant must last longer than 0s"
                    )));
                }
                Some((text.to_owned(), parsed))
            }
        };
        let expires_at = match expires_at {
            None => None,
            Some(text) => {
                let at: Timestamp = text.parse().map_err(|e| {
                    CliError::invalid(format!(
                        "invalid --expires-at {text:?}: {e} (use RFC 3339, such as 2030-01-01T18:00:00Z)"
                    ))
                })?;
                if at <= now {
                    return Err(CliError::invalid(format!(
                        "invalid --expires-at {text:?}: it is in the past"
                    )));
                }
                Some(at)
            }
        };
        if ttl.is_some() && expires_at.is_some() {
            return Err(CliError::invalid(
                "give at most one of --ttl and --expires-at",
            ));
        }
        Ok(Lifetime { ttl, expires_at })
    }

    /// Seconds from now until the grant ends, `None` without expiry.
    fn seconds(&self, now: Timestamp) -> Option<u64> {
        match (&self.ttl, self.expires_at) {
            (Some((_, d)), _) => Some(d.as_secs()),
            (None, Some(at)) => u64::try_from(at.as_second() - now.as_second()).ok(),
            (None, None) => None,
        }
    }
}

/// What the user should know before the grant exists: it will not resolve
/// (suspended agent) or will end earlier than asked (maxGrantTTL).
pub fn warnings(identity: &AgentIdentity, lifetime: &Lifetime) -> Vec<String> {
    let agent = identity.metadata.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    if identity.spec.suspended {
        out.push(format!(
            "AgentIdentity {agent:?} is suspended; this grant resolves only after `kubectl scopehold resume {agent}`"
        ));
    }
    if let Some(cap_text) = &identity.spec.max_grant_ttl
        && let Ok(cap) = duration::parse(cap_text)
    {
        let asked = lifetime.seconds(Timestamp::now());
        if asked.is_none_or(|s| s > cap.as_secs()) {
            out.push(format!(
                "AgentIdentity {agent:?} caps grants at {cap_text} (maxGrantTTL); this grant ends {cap_text} after creation"
            ));
        }
    }
    out
}

/// `AGENT-SECRET`, made a valid object name (DNS subdomain).
pub fn default_name(agent: &str, secret: &str) -> String {
    let raw: String = format!("{agent}-{secret}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let labels: Vec<&str> = raw
        .split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .collect();
    let mut name = labels.join(".");
    if name.len() > MAX_NAME {
        name.truncate(MAX_NAME);
    }
    let name = name.trim_end_matches(['-', '.']).to_owned();
    if name.is_empty() {
        "grant".to_owned()
    } else {
        name
    }
}

/// The Kubernetes rule for object names (RFC 1123 subdomain).
pub fn check_dns_subdomain(name: &str) -> Result<(), CliError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > MAX_NAME || !name.split('.').all(label_ok) {
        return Err(CliError::invalid(format!(
            "invalid --name {name:?}: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most {MAX_NAME} characters"
        )));
    }
    Ok(())
}

/// One line for people: what was granted, to whom, until when.
fn summary(grant: &SecretGrant) -> String {
    let name = grant.metadata.name.as_deref().unwrap_or_default();
    let s = &grant.spec;
    let keys: Vec<String> = s
        .keys
        .iter()
        .map(|k| match &k.path {
            Some(p) => format!("{}={p}", k.key),
            None => k.key.clone(),
        })
        .collect();
    let lifetime = match (&s.ttl, &s.expires_at) {
        (Some(ttl), _) => format!("for {ttl}"),
        (None, Some(at)) => format!("until {}", crate::cli::table::time(at.0)),
        (None, None) => "without expiry".to_owned(),
    };
    format!(
        "secretgrant.scopehold.dev/{name} created: agent {:?} may read keys {} of Secret {:?} {lifetime}",
        s.agent,
        keys.join(", "),
        s.secret_name
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentIdentitySpec;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn keys_with_and_without_file_names() {
        let keys = parse_keys(&strings(&["url", "service-key=supabase-key", "x=x"])).unwrap();
        assert_eq!(keys[0].key, "url");
        assert_eq!(keys[0].path, None);
        assert_eq!(keys[1].key, "service-key");
        assert_eq!(keys[1].path.as_deref(), Some("supabase-key"));
        assert_eq!(
            keys[2].path, None,
            "a file name equal to the key is the default"
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        for bad in [
            vec!["a/b"],
            vec!["k=../x"],
            vec!["k=..data"],
            vec!["k=a/b"],
            vec![""],
            vec!["k", "k"],
            vec!["a=f", "b=f"],
        ] {
            assert!(parse_keys(&strings(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lifetimes() {
        let now = Timestamp::from_second(1_900_000_000).unwrap();
        let ttl = Lifetime::parse(Some("1h30m"), None, now).unwrap();
        assert_eq!(ttl.ttl, Some(("1h30m".into(), Duration::from_secs(5400))));
        let at = Lifetime::parse(None, Some("2030-03-18T00:00:00Z"), now).unwrap();
        assert!(at.expires_at.is_some());
        assert_eq!(
            Lifetime::parse(None, None, now).unwrap(),
            Lifetime {
                ttl: None,
                expires_at: None
            }
        );
        for (ttl, at) in [
            (Some("8d"), None),
            (Some("0s"), None),
            (Some("-1h"), None),
            (None, Some("tomorrow")),
            (None, Some("2020-01-01T00:00:00Z")),
            (Some("1h"), Some("2030-03-18T00:00:00Z")),
        ] {
            assert!(Lifetime::parse(ttl, at, now).is_err(), "{ttl:?} {at:?}");
        }
        let err = Lifetime::parse(Some("8d"), None, now)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid --ttl \"8d\""), "{err}");
    }

    #[test]
    fn default_names_are_dns_safe() {
        assert_eq!(default_name("bot", "supabase"), "bot-supabase");
        assert_eq!(default_name("Bot_1", "my.secret"), "bot-1-my.secret");
        let long = default_name(&"a".repeat(200), &"b".repeat(200));
        assert_eq!(long.len(), 253);
        check_dns_subdomain(&long).unwrap();
        for name in ["bot-supabase", "bot-1-my.secret", "a"] {
            check_dns_subdomain(name).unwrap();
        }
        for bad in ["", "Bot", "-a", "a-", "a..b", "a_b", ".a"] {
            assert!(check_dns_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn warns_about_suspension_and_caps() {
        let mut identity = AgentIdentity::new(
            "bot",
            AgentIdentitySpec {
                service_account_name: "bot".into(),
                suspended: true,
                max_grant_ttl: Some("4h".into()),
                ..Default::default()
            },
        );
        let now = Timestamp::now();
        let long = Lifetime::parse(Some("8h"), None, now).unwrap();
        let w = warnings(&identity, &long);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("suspended"));
        assert!(w[1].contains("maxGrantTTL"));
        identity.spec.suspended = false;
        let short = Lifetime::parse(Some("1h"), None, now).unwrap();
        assert!(warnings(&identity, &short).is_empty());
        let forever = Lifetime::parse(None, None, now).unwrap();
        assert_eq!(warnings(&identity, &forever).len(), 1);
    }

    #[test]
    fn missing_keys_are_named_with_the_available_ones() {
        let keys = parse_keys(&strings(&["url", "nope"])).unwrap();
        let available: BTreeSet<String> = ["url".to_owned(), "token".to_owned()].into();
        let err = check_keys_exist(&keys, &available, "s", "ns").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"Secret "s" in namespace "ns" has no key "nope" (its keys: token, url)"#
        );
    }
}

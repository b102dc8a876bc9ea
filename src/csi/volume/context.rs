//! Typed parse of NodePublishVolume's `volume_context` and `secrets`.
//!
//! Kubelet (with `podInfoOnMount: true`) writes the pod facts into the volume
//! context under `csi.storage.k8s.io/…` keys, overwriting any pod-supplied
//! attribute of the same name. Everything else in the volume context comes
//! from the pod author and is untrusted: the only attribute a pod may set is
//! [`GRANTS_KEY`]; any other unprefixed key is refused (a typo such as `grant`
//! must not silently mount every grant). Unknown `csi.storage.k8s.io/` keys
//! are ignored (kubelet may add new ones).
//!
//! The pod's ServiceAccount tokens arrive as JSON (`{audience: {token,
//! expirationTimestamp}}`) under [`SERVICE_ACCOUNT_TOKENS_KEY`], in `secrets`
//! when the CSIDriver sets `serviceAccountTokenInSecrets`, else in the volume
//! context. When `secrets` holds them, the volume-context copy is ignored:
//! kubelet does not overwrite that key in this mode, so a pod author can
//! forge it. Custody verifies the token anyway; this parse only extracts it.
//!
//! No error message, and no `Debug` output, contains the token.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Deserialize;

pub use crate::api::validation::{is_dns1123_label, is_dns1123_subdomain};

/// Prefix of the keys kubelet writes.
pub const KUBELET_KEY_PREFIX: &str = "csi.storage.k8s.io/";
pub const POD_NAME_KEY: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE_KEY: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT_NAME_KEY: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
pub const SERVICE_ACCOUNT_TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";
/// The one attribute a pod may set: comma-separated grant names to mount a
/// subset of the agent's grants.
pub const GRANTS_KEY: &str = "grants";
/// The audience of the tokens kubelet mints for ScopeHold
/// (`CSIDriver.spec.tokenRequests`).
pub use crate::api::TOKEN_AUDIENCE;

/// Limit on the sum of all keys and values of the volume context (and,
/// separately, of the secrets).
pub const MAX_TOTAL_BYTES: usize = 64 * 1024;
/// Limit on one value.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Limit on the number of grant names in [`GRANTS_KEY`].
pub const MAX_GRANTS: usize = 64;
/// Unknown keys longer than this are shortened in error messages.
const MAX_KEY_IN_MESSAGE: usize = 64;

/// The pod the volume is for, as kubelet reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account_name: String,
}

/// Where the token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrigin {
    Secrets,
    VolumeContext,
}

impl fmt::Display for TokenOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Secrets => "secrets",
            Self::VolumeContext => "volume context",
        })
    }
}

/// The pod's bound ServiceAccount token for [`TOKEN_AUDIENCE`]. `Debug`
/// redacts the value; read it only to pass it on to custody.
#[derive(Clone, PartialEq, Eq)]
pub struct PodToken {
    value: String,
    expires_at: Option<jiff::Timestamp>,
    origin: TokenOrigin,
}

impl PodToken {
    /// The raw token. Sensitive: never log it.
    pub fn secret_value(&self) -> &str {
        &self.value
    }

    /// The expiry kubelet reported (`expirationTimestamp`), if any.
    pub fn expires_at(&self) -> Option<jiff::Timestamp> {
        self.expires_at
    }

    pub fn origin(&self) -> TokenOrigin {
        self.origin
    }
}

impl fmt::Debug for PodToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodToken")
            .field("value", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("origin", &self.origin)
            .finish()
    }
}

/// Everything NodePublishVolume's attributes tell us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAttributes {
    pub pod: PodInfo,
    /// `csi.storage.k8s.io/ephemeral`: true for inline volumes. The caller
    /// refuses `false` (ScopeHold serves inline volumes only).
    pub ephemeral: bool,
    /// Requested grant names, sorted and deduplicated; empty means all.
    pub grants: Vec<String>,
    pub token: PodToken,
}

/// Why the attributes were refused. Never contains a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeContextError {
    #[error("the volume context totals {total} bytes; at most {MAX_TOTAL_BYTES} are allowed")]
    ContextTooLarge { total: usize },
    #[error(
        "the NodePublishVolume secrets total {total} bytes; at most {MAX_TOTAL_BYTES} are allowed"
    )]
    SecretsTooLarge { total: usize },
    #[error("the value of {key:?} is {len} bytes; at most {MAX_VALUE_BYTES} are allowed")]
    ValueTooLarge { key: String, len: usize },
    #[error("unknown volume attribute {key:?}: the only attribute a pod may set is {GRANTS_KEY:?}")]
    UnknownAttribute { key: String },
    #[error("missing volume attribute {key}: is podInfoOnMount enabled on the CSIDriver?")]
    MissingPodInfo { key: &'static str },
    #[error("invalid volume attribute {key}: {reason}")]
    InvalidPodInfo {
        key: &'static str,
        reason: &'static str,
    },
    #[error("invalid {GRANTS_KEY:?} attribute: {reason}")]
    InvalidGrants { reason: String },
    #[error(
        "no ServiceAccount tokens in the request: the CSIDriver must request a token for audience {TOKEN_AUDIENCE}"
    )]
    TokensMissing,
    #[error(
        "the ServiceAccount tokens in the {origin} are not valid JSON (line {line}, column {column})"
    )]
    TokensMalformed {
        origin: TokenOrigin,
        line: usize,
        column: usize,
    },
    #[error("no token for audience {TOKEN_AUDIENCE} in the ServiceAccount tokens in the {origin}")]
    AudienceMissing { origin: TokenOrigin },
    #[error("the token for audience {TOKEN_AUDIENCE} in the {origin} is invalid: {reason}")]
    TokenInvalid {
        origin: TokenOrigin,
        reason: &'static str,
    },
}

/// Shape of one entry of kubelet's token JSON (a TokenRequestStatus).
#[derive(Deserialize)]
struct TokenRequestStatus {
    token: String,
    #[serde(default, rename = "expirationTimestamp")]
    expiration_timestamp: Option<String>,
}

/// Parses and validates the attributes of a NodePublishVolume request.
pub fn parse_publish_attributes(
    volume_context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
) -> Result<PublishAttributes, VolumeContextError> {
    check_sizes(volume_context).map_err(|error| match error {
        SizeError::Total(total) => VolumeContextError::ContextTooLarge { total },
        SizeError::Value { key, len } => VolumeContextError::ValueTooLarge { key, len },
    })?;
    check_sizes(secrets).map_err(|error| match error {
        SizeError::Total(total) => VolumeContextError::SecretsTooLarge { total },
        SizeError::Value { key, len } => VolumeContextError::ValueTooLarge { key, len },
    })?;

    if let Some(key) = volume_context
        .keys()
        .find(|key| !key.starts_with(KUBELET_KEY_PREFIX) && key.as_str() != GRANTS_KEY)
    {
        return Err(VolumeContextError::UnknownAttribute {
            key: key_for_message(key),
        });
    }

    let pod = PodInfo {
        namespace: required(volume_context, POD_NAMESPACE_KEY, is_dns1123_label)?,
        name: required(volume_context, POD_NAME_KEY, is_dns1123_subdomain)?,
        uid: required(volume_context, POD_UID_KEY, is_pod_uid)?,
        service_account_name: required(
            volume_context,
            SERVICE_ACCOUNT_NAME_KEY,
            is_dns1123_subdomain,
        )?,
    };
    let ephemeral = match volume_context.get(EPHEMERAL_KEY).map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        Some(_) => {
            return Err(VolumeContextError::InvalidPodInfo {
                key: EPHEMERAL_KEY,
                reason: "must be \"true\" or \"false\"",
            });
        }
        None => {
            return Err(VolumeContextError::MissingPodInfo { key: EPHEMERAL_KEY });
        }
    };
    let grants = match volume_context.get(GRANTS_KEY) {
        Some(value) => parse_grants(value)?,
        None => Vec::new(),
    };
    let token = extract_token(volume_context, secrets)?;
    Ok(PublishAttributes {
        pod,
        ephemeral,
        grants,
        token,
    })
}

enum SizeError {
    Total(usize),
    Value { key: String, len: usize },
}

fn check_sizes(map: &HashMap<String, String>) -> Result<(), SizeError> {
    let mut total = 0_usize;
    for (key, value) in map {
        if value.len() > MAX_VALUE_BYTES {
            return Err(SizeError::Value {
                key: key_for_message(key),
                len: value.len(),
            });
        }
        total = total.saturating_add(key.len()).saturating_add(value.len());
    }
    if total > MAX_TOTAL_BYTES {
        return Err(SizeError::Total(total));
    }
    Ok(())
}

fn required(
    volume_context: &HashMap<String, String>,
    key: &'static str,
    is_valid: fn(&str) -> bool,
) -> Result<String, VolumeContextError> {
    let value = volume_context
        .get(key)
        .ok_or(VolumeContextError::MissingPodInfo { key })?;
    if !is_valid(value) {
        return Err(VolumeContextError::InvalidPodInfo {
            key,
            reason: "not a valid Kubernetes name or uid",
        });
    }
    Ok(value.clone())
}

/// Parses `a, b,c` into sorted, deduplicated grant names (each a DNS-1123
/// subdomain, as SecretGrant names are).
fn parse_grants(value: &str) -> Result<Vec<String>, VolumeContextError> {
    let mut names = BTreeSet::new();
    for item in value.split(',') {
        let name = item.trim();
        if name.is_empty() {
            return Err(VolumeContextError::InvalidGrants {
                reason: "empty grant name (use a comma-separated list of SecretGrant names)"
                    .to_owned(),
            });
        }
        if !is_dns1123_subdomain(name) {
            return Err(VolumeContextError::InvalidGrants {
                reason: format!(
                    "{:?} is not a valid SecretGrant name",
                    key_for_message(name)
                ),
            });
        }
        names.insert(name.to_owned());
        if names.len() > MAX_GRANTS {
            return Err(VolumeContextError::InvalidGrants {
                reason: format!("more than {MAX_GRANTS} grant names"),
            });
        }
    }
    Ok(names.into_iter().collect())
}

fn extract_token(
    volume_context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
) -> Result<PodToken, VolumeContextError> {
    // Secrets first: when kubelet sends tokens there, the volume-context key
    // is pod-controlled and must be ignored.
    let (json, origin) = match secrets.get(SERVICE_ACCOUNT_TOKENS_KEY) {
        Some(json) => (json, TokenOrigin::Secrets),
        None => match volume_context.get(SERVICE_ACCOUNT_TOKENS_KEY) {
            Some(json) => (json, TokenOrigin::VolumeContext),
            None => return Err(VolumeContextError::TokensMissing),
        },
    };
    // The serde error itself is dropped: its message can quote input, which
    // here is a token.
    let mut by_audience: HashMap<String, TokenRequestStatus> =
        serde_json::from_str(json).map_err(|error| VolumeContextError::TokensMalformed {
            origin,
            line: error.line(),
            column: error.column(),
        })?;
    let status = by_audience
        .remove(TOKEN_AUDIENCE)
        .ok_or(VolumeContextError::AudienceMissing { origin })?;
    let invalid = |reason| VolumeContextError::TokenInvalid { origin, reason };
    if !is_compact_jws(&status.token) {
        return Err(invalid(
            "not a JWT (three base64url segments separated by dots)",
        ));
    }
    let expires_at = status
        .expiration_timestamp
        .map(|text| text.parse::<jiff::Timestamp>())
        .transpose()
        .map_err(|_| invalid("expirationTimestamp is not an RFC 3339 time"))?;
    Ok(PodToken {
        value: status.token,
        expires_at,
        origin,
    })
}

/// True for `header.payload.signature` with non-empty base64url segments.
fn is_compact_jws(token: &str) -> bool {
    let segments: Vec<&str> = token.split('.').collect();
    segments.len() == 3
        && segments.iter().all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        })
}

/// A pod UID: Kubernetes generates UUIDs; accept any short run of
/// alphanumerics and dashes, nothing that could form a path.
fn is_pod_uid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// Shortens a (possibly hostile) key for an error message.
fn key_for_message(key: &str) -> String {
    if key.len() <= MAX_KEY_IN_MESSAGE {
        return key.to_owned();
    }
    let mut end = MAX_KEY_IN_MESSAGE;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &key[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtdG9rZW4ifQ.c2lnbmF0dXJl";
    const FORGED: &str = "eyJmb3JnZWQiOjF9.eyJmb3JnZWQiOjF9.Zm9yZ2Vk";

    fn tokens_json(audience: &str, token: &str) -> String {
        serde_json::json!({
            audience: {"token": token, "expirationTimestamp": "2026-11-26T11:00:00Z"}
        })
        .to_string()
    }

    fn kubelet_context() -> HashMap<String, String> {
        [
            (POD_NAME_KEY, "claude-0"),
            (POD_NAMESPACE_KEY, "agents"),
            (POD_UID_KEY, "0f8e6a2c-3b1d-4c5e-9f70-1a2b3c4d5e6f"),
            (SERVICE_ACCOUNT_NAME_KEY, "claude"),
            (EPHEMERAL_KEY, "true"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
    }

    fn secrets_with_token() -> HashMap<String, String> {
        [(
            SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
            tokens_json(TOKEN_AUDIENCE, TOKEN),
        )]
        .into_iter()
        .collect()
    }

    fn assert_no_token(text: &str) {
        assert!(!text.contains(TOKEN), "token leaked: {text}");
        assert!(!text.contains("c2lnbmF0dXJl"), "token part leaked: {text}");
        assert!(!text.contains(FORGED), "forged token leaked: {text}");
    }

    #[test]
    fn kubelet_request_with_token_in_secrets_parses() -> Result<(), VolumeContextError> {
        let parsed = parse_publish_attributes(&kubelet_context(), &secrets_with_token())?;
        assert_eq!(parsed.pod.name, "claude-0");
        assert_eq!(parsed.pod.namespace, "agents");
        assert_eq!(parsed.pod.uid, "0f8e6a2c-3b1d-4c5e-9f70-1a2b3c4d5e6f");
        assert_eq!(parsed.pod.service_account_name, "claude");
        assert!(parsed.ephemeral);
        assert!(parsed.grants.is_empty());
        assert_eq!(parsed.token.secret_value(), TOKEN);
        assert_eq!(parsed.token.origin(), TokenOrigin::Secrets);
        assert_eq!(
            parsed.token.expires_at().map(|at| at.to_string()),
            Some("2026-11-26T11:00:00Z".to_owned())
        );
        Ok(())
    }

    #[test]
    fn token_in_volume_context_is_used_when_secrets_have_none() -> Result<(), VolumeContextError> {
        let mut context = kubelet_context();
        context.insert(
            SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
            tokens_json(TOKEN_AUDIENCE, TOKEN),
        );
        let parsed = parse_publish_attributes(&context, &HashMap::new())?;
        assert_eq!(parsed.token.secret_value(), TOKEN);
        assert_eq!(parsed.token.origin(), TokenOrigin::VolumeContext);
        Ok(())
    }

    #[test]
    fn forged_volume_context_token_is_ignored_when_secrets_hold_one()
    -> Result<(), VolumeContextError> {
        let mut context = kubelet_context();
        context.insert(
            SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
            tokens_json(TOKEN_AUDIENCE, FORGED),
        );
        let parsed = parse_publish_attributes(&context, &secrets_with_token())?;
        assert_eq!(parsed.token.secret_value(), TOKEN);
        // Even a malformed forged value does not matter then.
        context.insert(SERVICE_ACCOUNT_TOKENS_KEY.to_owned(), "{garbage".to_owned());
        assert_eq!(
            parse_publish_attributes(&context, &secrets_with_token())?
                .token
                .secret_value(),
            TOKEN
        );
        Ok(())
    }

    #[test]
    fn debug_output_redacts_the_token() -> Result<(), VolumeContextError> {
        let parsed = parse_publish_attributes(&kubelet_context(), &secrets_with_token())?;
        let shown = format!("{parsed:?} {parsed:#?}");
        assert_no_token(&shown);
        assert!(shown.contains("claude-0"));
        assert!(shown.contains("<redacted>"));
        Ok(())
    }

    #[test]
    fn grants_attribute_is_parsed_sorted_and_deduplicated() -> Result<(), VolumeContextError> {
        let mut context = kubelet_context();
        context.insert(
            GRANTS_KEY.to_owned(),
            " supabase-dev,github.ro , supabase-dev".to_owned(),
        );
        let parsed = parse_publish_attributes(&context, &secrets_with_token())?;
        assert_eq!(parsed.grants, vec!["github.ro", "supabase-dev"]);
        Ok(())
    }

    #[test]
    fn bad_grants_attributes_are_refused() {
        let too_many = (0..=MAX_GRANTS)
            .map(|index| format!("g{index}"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in [
            "",
            ",",
            "a,,b",
            "UPPER",
            "../x",
            "a/b",
            "-start",
            "end-",
            "a..b",
            "white space",
            "x".repeat(254).as_str(),
            too_many.as_str(),
        ] {
            let mut context = kubelet_context();
            context.insert(GRANTS_KEY.to_owned(), bad.to_owned());
            let result = parse_publish_attributes(&context, &secrets_with_token());
            assert!(
                matches!(result, Err(VolumeContextError::InvalidGrants { .. })),
                "{bad:?}: {result:?}"
            );
        }
    }

    #[test]
    fn unknown_user_attributes_are_refused_and_unknown_kubelet_keys_ignored() {
        let mut context = kubelet_context();
        context.insert(
            "csi.storage.k8s.io/some-future-key".to_owned(),
            "x".to_owned(),
        );
        assert!(parse_publish_attributes(&context, &secrets_with_token()).is_ok());

        context.insert("grant".to_owned(), "typo".to_owned());
        let result = parse_publish_attributes(&context, &secrets_with_token());
        assert!(matches!(
            result,
            Err(VolumeContextError::UnknownAttribute { ref key }) if key == "grant"
        ));
    }

    #[test]
    fn missing_or_invalid_pod_info_is_refused() {
        for key in [
            POD_NAME_KEY,
            POD_NAMESPACE_KEY,
            POD_UID_KEY,
            SERVICE_ACCOUNT_NAME_KEY,
            EPHEMERAL_KEY,
        ] {
            let mut context = kubelet_context();
            context.remove(key);
            assert_eq!(
                parse_publish_attributes(&context, &secrets_with_token()),
                Err(VolumeContextError::MissingPodInfo { key }),
            );
        }
        for (key, bad) in [
            (POD_NAMESPACE_KEY, "Agents"),
            (POD_NAMESPACE_KEY, "a.b"),
            (POD_NAME_KEY, ""),
            (POD_NAME_KEY, "../../etc"),
            (POD_UID_KEY, "../uid"),
            (POD_UID_KEY, "uid/with/slash"),
            (SERVICE_ACCOUNT_NAME_KEY, "sa name"),
            (EPHEMERAL_KEY, "yes"),
        ] {
            let mut context = kubelet_context();
            context.insert(key.to_owned(), bad.to_owned());
            assert!(
                matches!(
                    parse_publish_attributes(&context, &secrets_with_token()),
                    Err(VolumeContextError::InvalidPodInfo { key: k, .. }) if k == key
                ),
                "{key}={bad:?}"
            );
        }
        let mut context = kubelet_context();
        context.insert(EPHEMERAL_KEY.to_owned(), "false".to_owned());
        assert_eq!(
            parse_publish_attributes(&context, &secrets_with_token())
                .map(|parsed| parsed.ephemeral),
            Ok(false)
        );
    }

    #[test]
    fn oversized_attributes_are_refused() {
        let mut context = kubelet_context();
        context.insert(GRANTS_KEY.to_owned(), "a".repeat(MAX_VALUE_BYTES + 1));
        assert!(matches!(
            parse_publish_attributes(&context, &secrets_with_token()),
            Err(VolumeContextError::ValueTooLarge { .. })
        ));

        let mut context = kubelet_context();
        for index in 0..10 {
            context.insert(
                format!("csi.storage.k8s.io/filler-{index}"),
                "x".repeat(MAX_VALUE_BYTES - 100),
            );
        }
        assert!(matches!(
            parse_publish_attributes(&context, &secrets_with_token()),
            Err(VolumeContextError::ContextTooLarge { .. })
        ));

        let mut secrets = secrets_with_token();
        for index in 0..10 {
            secrets.insert(format!("ref-{index}"), "x".repeat(MAX_VALUE_BYTES - 100));
        }
        assert!(matches!(
            parse_publish_attributes(&kubelet_context(), &secrets),
            Err(VolumeContextError::SecretsTooLarge { .. })
        ));

        // A huge unknown key is reported shortened.
        let mut context = kubelet_context();
        context.insert("k".repeat(10_000), String::new());
        let message = parse_publish_attributes(&context, &secrets_with_token())
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(message.len() < 300, "{message}");
    }

    #[test]
    fn token_problems_are_reported_without_the_token() -> Result<(), String> {
        let mut cases: Vec<(HashMap<String, String>, &str)> = vec![
            (HashMap::new(), "missing"),
            (
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    format!("{{\"scopehold.dev\":{{\"token\":\"{TOKEN}\""),
                )]
                .into_iter()
                .collect(),
                "truncated json",
            ),
            (
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    format!("{{\"scopehold.dev\":{{\"token\":7,\"x\":\"{TOKEN}\"}}}}"),
                )]
                .into_iter()
                .collect(),
                "wrong type",
            ),
            (
                // serde_json's own message would quote this string.
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    format!("{{\"scopehold.dev\":\"{TOKEN}\"}}"),
                )]
                .into_iter()
                .collect(),
                "string instead of object",
            ),
            (
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    format!("[\"{TOKEN}\"]"),
                )]
                .into_iter()
                .collect(),
                "not an object",
            ),
            (
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    tokens_json("kubernetes.default.svc", TOKEN),
                )]
                .into_iter()
                .collect(),
                "other audience",
            ),
            (
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    tokens_json(TOKEN_AUDIENCE, &format!("{TOKEN}\nInjected: header")),
                )]
                .into_iter()
                .collect(),
                "not a jwt",
            ),
            (
                [(SERVICE_ACCOUNT_TOKENS_KEY.to_owned(), tokens_json(TOKEN_AUDIENCE, ""))]
                    .into_iter()
                    .collect(),
                "empty token",
            ),
            (
                [(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    serde_json::json!({TOKEN_AUDIENCE: {"token": TOKEN, "expirationTimestamp": TOKEN}})
                        .to_string(),
                )]
                .into_iter()
                .collect(),
                "bad expiry",
            ),
        ];
        for (secrets, case) in cases.drain(..) {
            let Err(error) = parse_publish_attributes(&kubelet_context(), &secrets) else {
                return Err(format!("{case}: accepted"));
            };
            assert_no_token(&error.to_string());
            assert_no_token(&format!("{error:?}"));
            let mut source = std::error::Error::source(&error);
            while let Some(inner) = source {
                assert_no_token(&inner.to_string());
                source = inner.source();
            }
        }
        Ok(())
    }

    #[test]
    fn dns1123_checks_match_kubernetes_rules() {
        assert!(is_dns1123_label("agents"));
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("supabase-dev.v2"));
        assert!(is_dns1123_subdomain(&format!(
            "{}.{}",
            "a".repeat(63),
            "b".repeat(63)
        )));
        assert!(!is_dns1123_subdomain(".a"));
        assert!(!is_dns1123_subdomain("a."));
        assert!(!is_dns1123_subdomain("a_b"));
    }
}

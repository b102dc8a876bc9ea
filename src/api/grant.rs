//! `SecretGrant`: one agent may read these keys of this Secret, for this long,
//! for this reason.

// Each printcolumn(...) repeats `type_ = ...`; clippy reads them as one
// attribute list and reports duplicates that are not.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::delivery::{DeliveryMode, KeyProxy};
use super::duration::DURATION_PATTERN;
use super::validation::{
    FILE_NAME_CEL, FILE_NAME_CEL_MESSAGE, FILE_NAME_PATTERN, SECRET_KEY_PATTERN,
};

/// Grants one AgentIdentity read access to some keys of one Secret in the same
/// namespace. Pods of that agent receive the keys as files in a CSI volume.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "scopehold.dev",
    version = "v1alpha1",
    kind = "SecretGrant",
    namespaced,
    status = "SecretGrantStatus",
    shortname = "sgrant",
    category = "scopehold",
    derive = "PartialEq",
    doc = "Grants one AgentIdentity read access to named keys of one Secret in the same namespace, for a bounded time and a stated reason.",
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".spec.secretName"),
    printcolumn(name = "Keys", type_ = "string", json_path = ".spec.keys[*].key"),
    printcolumn(name = "Delivery", type_ = "string", json_path = ".spec.delivery"),
    printcolumn(
        name = "Hosts",
        type_ = "string",
        json_path = ".spec.keys[*].proxy.hosts[*]"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!(has(self.ttl) && has(self.expiresAt))").message("set at most one of ttl and expiresAt"))]
#[x_kube(validation = Rule::new("!has(self.delivery) || self.delivery != 'proxy' || self.keys.all(k, has(k.proxy))").message("delivery: proxy needs keys[].proxy (hosts and an injection) on every key"))]
#[x_kube(validation = Rule::new("(has(self.delivery) && self.delivery == 'proxy') || self.keys.all(k, !has(k.proxy))").message("keys[].proxy is only used with delivery: proxy"))]
#[serde(rename_all = "camelCase")]
pub struct SecretGrantSpec {
    /// Name of the AgentIdentity (same namespace) that receives the keys.
    /// Immutable: grant another agent with another SecretGrant.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("agent is immutable; create another SecretGrant"))]
    pub agent: String,

    /// Name of the Secret (same namespace) that holds the keys. Cross-namespace
    /// grants do not exist. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("secretName is immutable; create another SecretGrant"))]
    pub secret_name: String,

    /// The Secret keys to hand out, each as one file in the agent's volume.
    /// Keys not listed here are never mounted.
    #[schemars(length(min = 1, max = 64))]
    pub keys: Vec<GrantedKey>,

    /// How long the grant lasts, counted from its creation, such as `8h` or
    /// `1h30m` (units h, m, s). Mutually exclusive with expiresAt. Without
    /// either the grant never expires, unless the agent's maxGrantTTL caps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ttl: Option<String>,

    /// Instant (RFC 3339) after which the grant no longer resolves and its
    /// files are withdrawn from running pods. Mutually exclusive with ttl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Revoke the grant but keep the object as the record. Files are withdrawn
    /// from running pods. Set back to false to reinstate it.
    #[serde(default)]
    pub revoked: bool,

    /// `file` (default): the keys are files in the agent's volume. `proxy`:
    /// the agent never holds them; the pod's `scopehold proxy` sidecar injects
    /// each into requests to the hosts its `proxy` names.
    #[serde(default)]
    pub delivery: DeliveryMode,

    /// Why the agent needs these keys; shown in audit records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// One Secret key to mount, and how.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GrantedKey {
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    #[x_kube(validation = Rule::new(FILE_NAME_CEL).message(FILE_NAME_CEL_MESSAGE))]
    pub key: String,

    /// File name in the mount; defaults to the key. A single file name: no
    /// `/`, not `.` or `..`, not starting with `..` (reserved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = FILE_NAME_PATTERN))]
    #[x_kube(validation = Rule::new(FILE_NAME_CEL).message(FILE_NAME_CEL_MESSAGE))]
    pub path: Option<String>,

    /// File mode as a number (0 to 0777; write 0440 in YAML or 288 in JSON).
    /// Defaults to 0440 with the pod's fsGroup as the file group, or 0444 when
    /// the pod has no fsGroup, so a non-root agent can read its own files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 511))]
    pub mode: Option<i32>,

    /// With `delivery: proxy`: the hosts this key may be sent to and how the
    /// proxy injects it. Required then, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<KeyProxy>,
}

impl GrantedKey {
    /// File name in the mount.
    pub fn file_name(&self) -> &str {
        self.path.as_deref().unwrap_or(&self.key)
    }
}

/// Where a grant stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum GrantPhase {
    /// Well-formed but not resolvable right now for a reason outside the grant:
    /// the agent is missing, suspended or in conflict.
    Pending,
    /// Resolvable: pods of the agent receive the keys.
    Active,
    /// Past its effective expiry.
    Expired,
    /// `spec.revoked` is true.
    Revoked,
    /// The Secret or a key is missing, or the spec is inconsistent.
    Invalid,
}

impl GrantPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantPhase::Pending => "Pending",
            GrantPhase::Active => "Active",
            GrantPhase::Expired => "Expired",
            GrantPhase::Revoked => "Revoked",
            GrantPhase::Invalid => "Invalid",
        }
    }
}

impl std::fmt::Display for GrantPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Observed state of a SecretGrant. The controller owns phase, conditions,
/// expiresAt, contentDigest and observedGeneration; the custody service owns
/// the resolution fields (separate server-side-apply field managers).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretGrantStatus {
    /// Pending, Active, Expired, Revoked or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GrantPhase>,
    /// `Ready` says whether the grant resolves now; its reason says why not
    /// (SecretNotFound, KeyNotFound, AgentNotFound, AgentSuspended, Conflict,
    /// Expired, Revoked, InvalidSpec, ValueTooLarge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Effective expiry: the earliest of expiresAt, creation + ttl and
    /// creation + the agent's maxGrantTTL. Absent when the grant never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// First 12 hex digits of an HMAC-SHA-256, under the cluster's digest
    /// key, over the granted keys' values: changes when the Secret (or the
    /// digest key) is rotated, and cannot be used to test a guessed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
    /// When a pod last resolved this grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resolved_at: Option<Time>,
    /// How many times pods resolved this grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolutions: Option<i64>,
    /// The most recent resolutions, newest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_resolutions: Vec<Resolution>,
    /// Delivery `proxy`: requests the proxy sidecars injected this grant's
    /// keys into, as they reported them (in batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<i64>,
    /// Delivery `proxy`: the latest such request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,
    /// Delivery `proxy`: where it was used recently, per pod and host, most
    /// recent first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_uses: Vec<RecentUse>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One pod that received this grant's keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resolution {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Uses of a proxy grant by one pod against one host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecentUse {
    pub pod: String,
    /// `host:port`.
    pub host: String,
    pub count: i64,
    pub first_at: Time,
    pub last_at: Time,
}

impl SecretGrant {
    pub fn phase(&self) -> Option<GrantPhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }

    /// Names of the granted Secret keys, in spec order.
    pub fn key_names(&self) -> Vec<String> {
        self.spec.keys.iter().map(|k| k.key.clone()).collect()
    }
}

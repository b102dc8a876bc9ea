//! `AgentIdentity`: a named coding agent, bound to one ServiceAccount.

// Each printcolumn(...) repeats `type_ = ...`; clippy reads them as one
// attribute list and reports duplicates that are not.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::delivery::HOST_PATTERN;
use super::duration::DURATION_PATTERN;

/// A named coding agent. Pods that run as `serviceAccountName` in this namespace
/// are this agent, and can resolve the keys its SecretGrants name, nothing else.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "scopehold.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    namespaced,
    status = "AgentIdentityStatus",
    shortname = "agentid",
    category = "scopehold",
    derive = "PartialEq",
    doc = "A named coding agent bound to one ServiceAccount. Pods running as that ServiceAccount resolve the keys that this agent's SecretGrants name, and nothing else.",
    printcolumn(
        name = "ServiceAccount",
        type_ = "string",
        json_path = ".spec.serviceAccountName"
    ),
    printcolumn(
        name = "Active-Grants",
        type_ = "integer",
        json_path = ".status.activeGrants"
    ),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspended"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// ServiceAccount (in this namespace) whose pods are this agent. Exactly one
    /// AgentIdentity may claim a ServiceAccount: when two do, both report
    /// Ready=False with reason Conflict and neither resolves anything.
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: String,

    /// Accountable person or team, shown in audit records (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub owner: Option<String>,

    /// What this agent is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Kill switch. While true, none of this agent's grants resolve and files
    /// already mounted into its running pods are withdrawn.
    #[serde(default)]
    pub suspended: bool,

    /// Upper bound on the lifetime of any grant to this agent, counted from the
    /// grant's creation, such as `8h` or `30m` (units h, m, s). A grant with a
    /// longer ttl, a later expiresAt or no expiry at all expires at this cap.
    #[serde(
        default,
        rename = "maxGrantTTL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_grant_ttl: Option<String>,

    /// For pods with the proxy sidecar (delivery mode `proxy`): hosts the
    /// agent may reach besides its proxy grants' hosts (`api.example.com`,
    /// `*.example.com`, optional `:port`, default 443). Unset: every host is
    /// reachable (tunnelled untouched). Set: every other host is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 259), regex(pattern = HOST_PATTERN)))]
    pub egress_allow_list: Option<Vec<String>>,
}

/// Observed state of an AgentIdentity, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// `Ready` says whether this agent can resolve anything now; its reason is
    /// one of Active, Suspended or Conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of this agent's grants that are Active.
    #[serde(default)]
    pub active_grants: i32,
    /// What this agent can resolve right now, sorted by grant name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<AccessEntry>,
    /// When a pod of this agent last resolved a grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resolved_at: Option<Time>,
}

/// One active grant as seen from the agent.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct AccessEntry {
    /// SecretGrant name.
    pub grant: String,
    /// Secret the grant reads from.
    pub secret: String,
    /// Secret keys the grant hands out.
    pub keys: Vec<String>,
}

impl AgentIdentity {
    /// Whether the spec says this agent is switched off.
    pub fn is_suspended(&self) -> bool {
        self.spec.suspended
    }
}

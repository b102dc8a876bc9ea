//! How a grant's keys reach the agent: as files (`file`, the default) or
//! injected on the wire by the pod's `scopehold proxy` sidecar (`proxy`), so
//! the agent never holds the value.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Hosts a proxied key may be sent to: `api.example.com`, `*.example.com`
/// (any name below example.com, not example.com itself), optionally with
/// `:port` (without one, only 443).
pub const HOST_PATTERN: &str = "^(\\*\\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*(:[0-9]{1,5})?$";
/// An HTTP header field name (RFC 9110 token).
pub const HEADER_NAME_PATTERN: &str = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";
/// What a template writes in place of the value.
pub const VALUE_MARK: &str = "{value}";

/// Delivery mode of a SecretGrant.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// The keys are files in the agent's CSI volume.
    #[default]
    File,
    /// The agent never holds the keys: the pod's proxy sidecar injects them
    /// into requests to the key's hosts.
    Proxy,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::File => "file",
            DeliveryMode::Proxy => "proxy",
        }
    }
}

/// Where and how the proxy sidecar uses one key. Exactly one injection:
/// `header`, `basicAuth` or `replacePlaceholder`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.header) ? 1 : 0) + (has(self.basicAuth) ? 1 : 0) + (has(self.replacePlaceholder) && self.replacePlaceholder ? 1 : 0) == 1").message("set exactly one injection: header, basicAuth or replacePlaceholder: true"))]
pub struct KeyProxy {
    /// Hosts this key may be sent to: exact names or `*.example.com`,
    /// optionally with `:port` (without a port: 443 only). Requests to any
    /// other host never carry the value.
    #[schemars(length(max = 32), inner(length(min = 1, max = 259), regex(pattern = HOST_PATTERN)))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("a proxied key needs at least one host"))]
    pub hosts: Vec<String>,

    /// Set this header on every request to the hosts, from a template that
    /// contains `{value}`, such as `Bearer {value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderTemplate>,

    /// Send the value as the password of HTTP basic authentication
    /// (`Authorization: Basic base64(username:value)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,

    /// Replace the pod's placeholder for this key wherever it appears in the
    /// request's header values or URL query, for requests to the hosts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_placeholder: Option<bool>,
}

/// A header the proxy sets, such as `Authorization: Bearer {value}`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderTemplate {
    /// Header name, such as `Authorization` or `apikey`.
    #[schemars(length(min = 1, max = 128), regex(pattern = HEADER_NAME_PATTERN))]
    #[x_kube(validation = Rule::new("!(self.lowerAscii() in ['host', 'content-length', 'transfer-encoding', 'connection', 'te', 'upgrade', 'proxy-authorization'])").message("the proxy cannot set this header"))]
    pub name: String,

    /// Header value; `{value}` stands for the key's value.
    #[schemars(length(min = 7, max = 1024))]
    #[x_kube(validation = Rule::new("self.contains('{value}')").message("template must contain {value}"))]
    pub template: String,
}

/// HTTP basic authentication with the key as password.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// The user name sent with the value.
    #[schemars(length(max = 256), regex(pattern = "^[^:\\x00-\\x1f]*$"))]
    pub username: String,
}

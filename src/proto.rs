//! Generated gRPC code for the CSI v1 (Identity, Node) and ScopeHold custody
//! protocols, compiled by `build.rs` from `proto/`.
//!
//! Messages that carry a token or a secret value get a hand-written `Debug`
//! that redacts them (prost is told to skip its derived `Debug` for those), so
//! formatting a request with `{:?}` can never leak a value.

use std::collections::HashMap;
use std::fmt;

/// Placeholder printed instead of a sensitive value.
const REDACTED: &str = "<redacted>";

/// The volume-context key under which kubelet may put the pod's tokens.
const SERVICE_ACCOUNT_TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";

pub mod csi {
    pub mod v1 {
        #![allow(
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            clippy::unwrap_used,
            clippy::expect_used,
            clippy::panic,
            missing_docs,
            unreachable_pub
        )]
        tonic::include_proto!("csi.v1");
    }
}

pub mod scopehold {
    pub mod v1 {
        #![allow(
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            clippy::unwrap_used,
            clippy::expect_used,
            clippy::panic,
            missing_docs,
            unreachable_pub
        )]
        tonic::include_proto!("scopehold.v1");
    }
}

/// Kubelet's plugin registration service (`k8s.io/kubelet`
/// `pkg/apis/pluginregistration/v1`; its proto package is `pluginregistration`).
pub mod pluginregistration {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::nursery,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        missing_docs,
        unreachable_pub
    )]
    tonic::include_proto!("pluginregistration");
}

/// Shows a map's keys, never its values.
struct KeysOnly<'a>(&'a HashMap<String, String>);

impl fmt::Debug for KeysOnly<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        f.debug_map()
            .entries(keys.into_iter().map(|key| (key, REDACTED)))
            .finish()
    }
}

/// Shows a volume context, with the token entry's value redacted (kubelet puts
/// the pod's tokens there when they are not sent in `secrets`).
struct VolumeContextRedacted<'a>(&'a HashMap<String, String>);

impl fmt::Debug for VolumeContextRedacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<(&String, &String)> = self.0.iter().collect();
        entries.sort();
        f.debug_map()
            .entries(entries.into_iter().map(|(key, value)| {
                let shown = if key.as_str() == SERVICE_ACCOUNT_TOKENS_KEY {
                    REDACTED
                } else {
                    value.as_str()
                };
                (key, shown)
            }))
            .finish()
    }
}

impl fmt::Debug for csi::v1::NodePublishVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodePublishVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &self.publish_context)
            .field("staging_target_path", &self.staging_target_path)
            .field("target_path", &self.target_path)
            .field("volume_capability", &self.volume_capability)
            .field("readonly", &self.readonly)
            .field("secrets", &KeysOnly(&self.secrets))
            .field(
                "volume_context",
                &VolumeContextRedacted(&self.volume_context),
            )
            .finish()
    }
}

impl fmt::Debug for csi::v1::NodeStageVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStageVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &self.publish_context)
            .field("staging_target_path", &self.staging_target_path)
            .field("volume_capability", &self.volume_capability)
            .field("secrets", &KeysOnly(&self.secrets))
            .field(
                "volume_context",
                &VolumeContextRedacted(&self.volume_context),
            )
            .finish()
    }
}

impl fmt::Debug for csi::v1::NodeExpandVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeExpandVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("volume_path", &self.volume_path)
            .field("capacity_range", &self.capacity_range)
            .field("staging_target_path", &self.staging_target_path)
            .field("volume_capability", &self.volume_capability)
            .field("secrets", &KeysOnly(&self.secrets))
            .finish()
    }
}

impl fmt::Debug for scopehold::v1::ResolveRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveRequest")
            .field("request_id", &self.request_id)
            .field("pod_token", &REDACTED)
            .field("pod_namespace", &self.pod_namespace)
            .field("pod_name", &self.pod_name)
            .field("pod_uid", &self.pod_uid)
            .field("service_account_name", &self.service_account_name)
            .field("node_name", &self.node_name)
            .field("volume_id", &self.volume_id)
            .field("grants", &self.grants)
            .field("fs_group", &self.fs_group)
            .finish()
    }
}

impl fmt::Debug for scopehold::v1::File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("File")
            .field("path", &self.path)
            .field("key", &self.key)
            .field("mode", &format_args!("{:#o}", self.mode))
            .field("content_len", &self.content.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::csi::v1 as csi;
    use super::scopehold::v1 as custody;
    use prost::Message;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.secret-token-value.sig";
    const SECRET_VALUE: &[u8] = b"sk-live-do-not-print-me";

    fn publish_request() -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: "csi-abc".to_owned(),
            target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount".to_owned(),
            secrets: [(
                super::SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                TOKEN.to_owned(),
            )]
            .into_iter()
            .collect(),
            volume_context: [
                (
                    super::SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    TOKEN.to_owned(),
                ),
                (
                    "csi.storage.k8s.io/pod.name".to_owned(),
                    "agent-0".to_owned(),
                ),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn debug_of_publish_request_redacts_tokens_but_shows_the_rest() {
        let shown = format!("{:?}", publish_request());
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("csi-abc"));
        assert!(shown.contains("agent-0"));
        assert!(shown.contains(super::SERVICE_ACCOUNT_TOKENS_KEY));
    }

    #[test]
    fn debug_of_resolve_request_and_file_redacts_secrets() {
        let request = custody::ResolveRequest {
            pod_token: TOKEN.to_owned(),
            pod_name: "agent-0".to_owned(),
            ..Default::default()
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("agent-0"));

        let response = custody::ResolveResponse {
            agent: "claude".to_owned(),
            grants: vec![custody::ResolvedGrant {
                grant: "supabase-dev".to_owned(),
                files: vec![custody::File {
                    path: "api-key".to_owned(),
                    key: "key".to_owned(),
                    mode: 0o440,
                    content: SECRET_VALUE.to_vec(),
                }],
                ..Default::default()
            }],
            refresh_after_seconds: 0,
            versions: None,
        };
        let shown = format!("{response:?}");
        assert!(!shown.contains("do-not-print-me"), "{shown}");
        assert!(shown.contains("0o440"));
        assert!(shown.contains("supabase-dev"));
    }

    #[test]
    fn csi_field_numbers_match_the_spec_on_the_wire() {
        // target_path is field 4 (wire type 2): tag byte 0x22.
        let request = csi::NodePublishVolumeRequest {
            target_path: "/t".to_owned(),
            ..Default::default()
        };
        assert_eq!(request.encode_to_vec(), vec![0x22, 2, b'/', b't']);
        // readonly is field 6 (varint): tag byte 0x30.
        let request = csi::NodePublishVolumeRequest {
            readonly: true,
            ..Default::default()
        };
        assert_eq!(request.encode_to_vec(), vec![0x30, 1]);
        // VOLUME_MOUNT_GROUP is 6.
        assert_eq!(
            csi::node_service_capability::rpc::Type::VolumeMountGroup as i32,
            6
        );
    }

    #[test]
    fn resolve_response_round_trips() -> Result<(), prost::DecodeError> {
        let response = custody::ResolveResponse {
            agent: "claude".to_owned(),
            grants: vec![custody::ResolvedGrant {
                grant: "g".to_owned(),
                secret: "s".to_owned(),
                content_digest: "0123456789ab".to_owned(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                files: vec![],
            }],
            refresh_after_seconds: 30,
            versions: None,
        };
        let decoded = custody::ResolveResponse::decode(response.encode_to_vec().as_slice())?;
        assert_eq!(decoded, response);
        Ok(())
    }
}

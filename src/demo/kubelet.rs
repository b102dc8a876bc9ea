//! Kubelet's side of a CSI ephemeral inline volume, played over the node
//! plugin's unix socket exactly as kubelet calls it: the volume id, target
//! path, pod-info volume context and the pod's bound token in `secrets`.
//! Used by the demo (there is no kubelet on a laptop) and by the tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};

use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::node_client::NodeClient;

/// Key of the service-account tokens in `secrets` and the volume context.
pub const TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";
/// The only audience ScopeHold asks kubelet for.
pub use crate::api::TOKEN_AUDIENCE as AUDIENCE;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("connecting to the node plugin at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The pod facts kubelet passes with `podInfoOnMount: true`.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub fs_group: Option<i64>,
}

/// A kubelet stand-in for one node.
#[derive(Clone, Debug)]
pub struct KubeletPlayer {
    pub socket: PathBuf,
    pub kubelet_dir: PathBuf,
}

/// `"csi-" + hex(sha256(podUID + volumeName))`, as kubelet names inline volumes.
pub fn volume_id(pod_uid: &str, volume: &str) -> String {
    let digest = Sha256::digest(format!("{pod_uid}{volume}").as_bytes());
    format!("csi-{}", hex::encode(digest))
}

impl KubeletPlayer {
    pub fn new(socket: impl Into<PathBuf>, kubelet_dir: impl Into<PathBuf>) -> Self {
        KubeletPlayer {
            socket: socket.into(),
            kubelet_dir: kubelet_dir.into(),
        }
    }

    /// `<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`.
    pub fn target_path(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.kubelet_dir
            .join("pods")
            .join(pod_uid)
            .join("volumes")
            .join("kubernetes.io~csi")
            .join(volume)
            .join("mount")
    }

    /// A fresh connection per call, as kubelet makes one.
    pub async fn connect(&self) -> Result<NodeClient<Channel>, KubeletError> {
        let path = self.socket.clone();
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|source| KubeletError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        Ok(NodeClient::new(channel))
    }

    /// The request kubelet sends for `pod`'s inline volume `volume`, with the
    /// token in `secrets` (serviceAccountTokenInSecrets) or, when
    /// `token_in_secrets` is false, in the volume context (older kubelets).
    pub fn publish_request(
        &self,
        pod: &PodInfo,
        volume: &str,
        token: &str,
        attributes: &HashMap<String, String>,
        token_in_secrets: bool,
        readonly: bool,
    ) -> csi::NodePublishVolumeRequest {
        let expires = Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(3600);
        let tokens = serde_json::json!({ AUDIENCE: { "token": token, "expirationTimestamp": expires.to_string() } })
            .to_string();
        // User attributes first; kubelet's own keys overwrite same-named ones.
        let mut context = attributes.clone();
        context.insert("csi.storage.k8s.io/pod.name".into(), pod.name.clone());
        context.insert(
            "csi.storage.k8s.io/pod.namespace".into(),
            pod.namespace.clone(),
        );
        context.insert("csi.storage.k8s.io/pod.uid".into(), pod.uid.clone());
        context.insert(
            "csi.storage.k8s.io/serviceAccount.name".into(),
            pod.service_account.clone(),
        );
        context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        let mut secrets = HashMap::new();
        if token_in_secrets {
            secrets.insert(TOKENS_KEY.to_owned(), tokens);
        } else {
            context.insert(TOKENS_KEY.to_owned(), tokens);
        }
        csi::NodePublishVolumeRequest {
            volume_id: volume_id(&pod.uid, volume),
            publish_context: HashMap::new(),
            staging_target_path: String::new(),
            target_path: self
                .target_path(&pod.uid, volume)
                .to_string_lossy()
                .into_owned(),
            volume_capability: Some(csi::VolumeCapability {
                access_mode: Some(csi::volume_capability::AccessMode {
                    mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(csi::volume_capability::AccessType::Mount(
                    csi::volume_capability::MountVolume {
                        fs_type: String::new(),
                        mount_flags: Vec::new(),
                        volume_mount_group: pod.fs_group.map(|g| g.to_string()).unwrap_or_default(),
                    },
                )),
            }),
            readonly,
            secrets,
            volume_context: context,
        }
    }

    /// Creates the parent directory as kubelet does (the plugin creates the
    /// target itself), then calls NodePublishVolume.
    pub async fn publish(
        &self,
        request: csi::NodePublishVolumeRequest,
    ) -> Result<Result<PathBuf, tonic::Status>, KubeletError> {
        let target = PathBuf::from(&request.target_path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|source| KubeletError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        let mut client = self.connect().await?;
        Ok(client.node_publish_volume(request).await.map(|_| target))
    }

    pub async fn unpublish(
        &self,
        pod_uid: &str,
        volume: &str,
    ) -> Result<Result<(), tonic::Status>, KubeletError> {
        let mut client = self.connect().await?;
        let request = csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id(pod_uid, volume),
            target_path: self
                .target_path(pod_uid, volume)
                .to_string_lossy()
                .into_owned(),
        };
        Ok(client.node_unpublish_volume(request).await.map(|_| ()))
    }
}

/// Whether `path` exists (for readable assertions and demo output).
pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_matches_kubelet() {
        assert_eq!(
            volume_id("0f8e6a2c-3b1d-4c5e-9f70-1a2b3c4d5e6f", "scopehold"),
            "csi-2736759dc07ffcd517c0929335bd4af4eb19d8adfc6acc677f9da0a9f9a21963"
        );
    }

    #[test]
    fn kubelet_keys_overwrite_user_attributes() {
        let player = KubeletPlayer::new("/tmp/x.sock", "/var/lib/kubelet");
        let pod = PodInfo {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            service_account: "sa".into(),
            fs_group: Some(7),
        };
        let forged: HashMap<String, String> = [
            ("csi.storage.k8s.io/pod.uid".to_owned(), "forged".to_owned()),
            ("grants".to_owned(), "g".to_owned()),
        ]
        .into();
        let r = player.publish_request(&pod, "creds", "tok", &forged, true, true);
        assert_eq!(r.volume_context["csi.storage.k8s.io/pod.uid"], "u");
        assert_eq!(r.volume_context["grants"], "g");
        assert!(r.secrets.contains_key(TOKENS_KEY) && !r.volume_context.contains_key(TOKENS_KEY));
        assert_eq!(
            r.target_path,
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/creds/mount"
        );
    }
}

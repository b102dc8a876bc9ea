//! Validation of NodePublishVolume / NodeUnpublishVolume target paths.
//!
//! The plugin mounts and deletes things at the target path as root, so it
//! accepts only absolute, normalised paths (no `.`/`..` components, no empty
//! components) below a configured root. In production the root is kubelet's
//! directory and the path must have kubelet's exact shape for a CSI volume:
//!
//! ```text
//! <kubelet-dir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume-name>/mount
//! ```
//!
//! which also tells us the pod UID and volume name to cross-check with the
//! volume context and the volume id. csi-sanity uses arbitrary directories,
//! so a policy that accepts any path below a given root exists for it.
//!
//! This is a lexical check; the mounter separately refuses a target that is
//! itself a symlink.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::api::validation::is_dns1123_label;

/// Kubelet's default `--root-dir`.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// The escaped plugin name kubelet uses in volume paths (`kubernetes.io/csi`).
pub const CSI_PLUGIN_DIR_NAME: &str = "kubernetes.io~csi";
/// Longest target path accepted (Linux PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;
/// Paths longer than this are shortened in error messages.
const MAX_PATH_IN_MESSAGE: usize = 256;

/// Why a target path (or a policy root) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetPathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path is {len} bytes long; at most {MAX_PATH_BYTES} are allowed")]
    TooLong { len: usize },
    #[error("the path {path:?} contains a NUL byte")]
    ContainsNul { path: String },
    #[error("the path {path:?} is not absolute")]
    NotAbsolute { path: String },
    #[error("the path {path:?} is not normalised: {reason}")]
    NotNormalized { path: String, reason: &'static str },
    #[error("the path {path:?} is not below {root:?}")]
    OutsideRoot { path: String, root: String },
    #[error("the path {path:?} is not a kubelet CSI volume path ({expected}): {reason}")]
    NotKubeletLayout {
        path: String,
        expected: &'static str,
        reason: &'static str,
    },
}

const KUBELET_LAYOUT: &str =
    "<kubelet-dir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume-name>/mount";

/// What kind of paths a policy accepts below its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Kubelet,
    AnyBelowRoot,
}

/// Which target paths the node plugin accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPathPolicy {
    /// Normalised, without a trailing slash (except for `/` itself).
    root: String,
    layout: Layout,
}

impl Default for TargetPathPolicy {
    /// Kubelet's layout under `/var/lib/kubelet`.
    fn default() -> Self {
        Self {
            root: DEFAULT_KUBELET_DIR.to_owned(),
            layout: Layout::Kubelet,
        }
    }
}

/// The pod and volume a kubelet target path belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletVolume {
    pub pod_uid: String,
    pub volume_name: String,
}

impl KubeletVolume {
    /// The volume id kubelet sends for this inline volume.
    pub fn expected_volume_id(&self) -> String {
        kubelet_volume_id(&self.pod_uid, &self.volume_name)
    }
}

/// A validated target path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPath {
    path: PathBuf,
    kubelet_volume: Option<KubeletVolume>,
}

impl TargetPath {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Set for paths validated against the kubelet layout.
    pub fn kubelet_volume(&self) -> Option<&KubeletVolume> {
        self.kubelet_volume.as_ref()
    }
}

impl TargetPathPolicy {
    /// Requires kubelet's CSI volume layout below `kubelet_dir`.
    pub fn kubelet(kubelet_dir: &str) -> Result<Self, TargetPathError> {
        Ok(Self {
            root: normalized_root(kubelet_dir)?,
            layout: Layout::Kubelet,
        })
    }

    /// Accepts any normalised path strictly below `root` (for csi-sanity).
    pub fn any_below(root: &str) -> Result<Self, TargetPathError> {
        Ok(Self {
            root: normalized_root(root)?,
            layout: Layout::AnyBelowRoot,
        })
    }

    pub fn root(&self) -> &Path {
        Path::new(&self.root)
    }

    /// Validates a target path from a CSI request.
    pub fn validate(&self, target_path: &str) -> Result<TargetPath, TargetPathError> {
        check_absolute_normalized(target_path)?;
        let outside = || TargetPathError::OutsideRoot {
            path: for_message(target_path),
            root: self.root.clone(),
        };
        let below_root = if self.root == "/" {
            target_path.strip_prefix('/')
        } else {
            target_path
                .strip_prefix(self.root.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
        }
        .filter(|rest| !rest.is_empty())
        .ok_or_else(outside)?;

        let kubelet_volume = match self.layout {
            Layout::AnyBelowRoot => None,
            Layout::Kubelet => Some(parse_kubelet_layout(target_path, below_root)?),
        };
        Ok(TargetPath {
            path: PathBuf::from(target_path),
            kubelet_volume,
        })
    }
}

/// `"csi-" + hex(sha256(pod_uid + volume_name))`, as kubelet computes the
/// volume handle of an inline CSI volume.
pub fn kubelet_volume_id(pod_uid: &str, volume_name: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(pod_uid.as_bytes());
    hasher.update(volume_name.as_bytes());
    format!("csi-{}", hex::encode(hasher.finalize()))
}

fn parse_kubelet_layout(
    full_path: &str,
    below_root: &str,
) -> Result<KubeletVolume, TargetPathError> {
    let not_layout = |reason| TargetPathError::NotKubeletLayout {
        path: for_message(full_path),
        expected: KUBELET_LAYOUT,
        reason,
    };
    let components: Vec<&str> = below_root.split('/').collect();
    let [pods, pod_uid, volumes, plugin, volume_name, mount] = components.as_slice() else {
        return Err(not_layout("wrong number of components"));
    };
    if *pods != "pods" || *volumes != "volumes" || *mount != "mount" {
        return Err(not_layout("unexpected directory names"));
    }
    if *plugin != CSI_PLUGIN_DIR_NAME {
        return Err(not_layout("not a kubernetes.io~csi volume"));
    }
    if pod_uid.len() > 128
        || !pod_uid
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    {
        return Err(not_layout("the pod uid is not a uid"));
    }
    if !is_dns1123_label(volume_name) {
        return Err(not_layout("the volume name is not a DNS-1123 label"));
    }
    Ok(KubeletVolume {
        pod_uid: (*pod_uid).to_owned(),
        volume_name: (*volume_name).to_owned(),
    })
}

fn normalized_root(root: &str) -> Result<String, TargetPathError> {
    let trimmed = root.trim_end_matches('/');
    if trimmed.is_empty() && root.starts_with('/') {
        return Ok("/".to_owned());
    }
    check_absolute_normalized(trimmed)?;
    Ok(trimmed.to_owned())
}

fn check_absolute_normalized(path: &str) -> Result<(), TargetPathError> {
    if path.is_empty() {
        return Err(TargetPathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(TargetPathError::TooLong { len: path.len() });
    }
    if path.contains('\0') {
        return Err(TargetPathError::ContainsNul {
            path: for_message(path),
        });
    }
    let Some(relative) = path.strip_prefix('/') else {
        return Err(TargetPathError::NotAbsolute {
            path: for_message(path),
        });
    };
    let not_normalized = |reason| TargetPathError::NotNormalized {
        path: for_message(path),
        reason,
    };
    if relative.is_empty() {
        return Ok(());
    }
    for component in relative.split('/') {
        match component {
            "" => return Err(not_normalized("empty component (double or trailing slash)")),
            "." => return Err(not_normalized("'.' component")),
            ".." => return Err(not_normalized("'..' component")),
            _ => {}
        }
    }
    Ok(())
}

fn for_message(path: &str) -> String {
    if path.len() <= MAX_PATH_IN_MESSAGE {
        return path.to_owned();
    }
    let mut end = MAX_PATH_IN_MESSAGE;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f8e6a2c-3b1d-4c5e-9f70-1a2b3c4d5e6f";

    fn kubelet_path(uid: &str, volume: &str) -> String {
        format!("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{volume}/mount")
    }

    #[test]
    fn kubelet_paths_are_accepted_and_decomposed() -> Result<(), TargetPathError> {
        let policy = TargetPathPolicy::default();
        let target = policy.validate(&kubelet_path(UID, "scopehold"))?;
        assert_eq!(target.path(), Path::new(&kubelet_path(UID, "scopehold")));
        let volume = target.kubelet_volume().cloned();
        assert_eq!(
            volume,
            Some(KubeletVolume {
                pod_uid: UID.to_owned(),
                volume_name: "scopehold".to_owned(),
            })
        );
        Ok(())
    }

    #[test]
    fn volume_id_matches_kubelets_handle() {
        // Test vector from the kubelet facts (sha256 of podUID + volume name).
        assert_eq!(
            kubelet_volume_id(UID, "scopehold"),
            "csi-2736759dc07ffcd517c0929335bd4af4eb19d8adfc6acc677f9da0a9f9a21963"
        );
        let volume = KubeletVolume {
            pod_uid: UID.to_owned(),
            volume_name: "scopehold".to_owned(),
        };
        assert_eq!(
            volume.expected_volume_id(),
            kubelet_volume_id(UID, "scopehold")
        );
    }

    #[test]
    fn hostile_or_malformed_paths_are_refused() {
        let policy = TargetPathPolicy::default();
        let long = format!("/var/lib/kubelet/{}", "a/".repeat(3000));
        let cases: Vec<String> = vec![
            String::new(),
            "relative/path".to_owned(),
            "/var/lib/kubelet".to_owned(),
            "/var/lib/kubelet/".to_owned(),
            "/var/lib/kubeletX/pods/u/volumes/kubernetes.io~csi/v/mount".to_owned(),
            "/etc/passwd".to_owned(),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/v/mount/"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/v/mount/.."),
            format!("/var/lib/kubelet/pods/{UID}/../../../etc/volumes/kubernetes.io~csi/v/mount"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/./mount"),
            format!("/var/lib/kubelet//pods/{UID}/volumes/kubernetes.io~csi/v/mount"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~secret/v/mount"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/v/other"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/Bad_Name/mount"),
            format!("/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/v/mount/extra"),
            "/var/lib/kubelet/pods/u$d/volumes/kubernetes.io~csi/v/mount".to_owned(),
            "/var/lib/kubelet/pods/u\0d/volumes/kubernetes.io~csi/v/mount".to_owned(),
            long,
        ];
        for case in &cases {
            let result = policy.validate(case);
            assert!(result.is_err(), "{case:?} accepted: {result:?}");
            if let Err(error) = result {
                assert!(
                    error.to_string().len() < 600,
                    "message too long for {case:?}"
                );
            }
        }
    }

    #[test]
    fn configurable_kubelet_dir_is_honoured() -> Result<(), TargetPathError> {
        let policy = TargetPathPolicy::kubelet("/data/kubelet/")?;
        assert!(
            policy
                .validate(&format!(
                    "/data/kubelet/pods/{UID}/volumes/kubernetes.io~csi/v/mount"
                ))
                .is_ok()
        );
        assert!(policy.validate(&kubelet_path(UID, "v")).is_err());
        assert!(TargetPathPolicy::kubelet("relative").is_err());
        assert!(TargetPathPolicy::kubelet("/a/../b").is_err());
        Ok(())
    }

    #[test]
    fn any_below_root_policy_serves_csi_sanity() -> Result<(), TargetPathError> {
        let policy = TargetPathPolicy::any_below("/tmp/csi-mount")?;
        let target = policy.validate("/tmp/csi-mount/target")?;
        assert_eq!(target.kubelet_volume(), None);
        assert!(policy.validate("/tmp/csi-mount").is_err());
        assert!(policy.validate("/tmp/csi-mount/../etc").is_err());
        assert!(policy.validate("/tmp/csi-mountX/target").is_err());
        assert!(policy.validate("/tmp/other/target").is_err());

        let everywhere = TargetPathPolicy::any_below("/")?;
        assert_eq!(everywhere.root(), Path::new("/"));
        assert!(everywhere.validate("/tmp/x").is_ok());
        assert!(everywhere.validate("/").is_err());
        Ok(())
    }
}

//! The CSI Node service: publishes ScopeHold's ephemeral inline volumes.
//!
//! NodePublishVolume, in order:
//! 1. validate the request: `volume_id`, `target_path` and
//!    `volume_capability` present (csi-sanity checks exactly these three
//!    come back as `INVALID_ARGUMENT` before anything else), the target path
//!    below the kubelet directory in kubelet's layout, the volume id and pod
//!    UID consistent with that path, the attributes well-formed, the volume
//!    ephemeral;
//! 2. take the per-target lock;
//! 3. track the volume (so that an invalidation arriving meanwhile is not
//!    lost) and ask custody (`Resolve`) with the pod's token; an answer
//!    older than such an invalidation is asked again
//!    ([`crate::csi::converge::order`]); a refusal mounts nothing;
//! 4. mount a size-limited tmpfs (never stacked), make the mount point
//!    read-only, write the files through a private writable view (detached:
//!    reachable by no path, kept for later writes) with the
//!    atomic writer (per-file modes, group = the pod's fsGroup), record the
//!    volume in the registry and keep the pod's token in memory for the
//!    push path ([`crate::csi::volume::table`]).
//!
//! A failure in step 4 of a first publish unmounts and removes the target
//! directory again, so nothing half-made is left behind.
//!
//! A republish (kubelet's `requiresRepublish`, our tmpfs already mounted at
//! the target) converges the volume instead ([`crate::csi::converge`]): the
//! files are rewritten only when they changed, a refusal withdraws them
//! and the call still succeeds (kubernetes#121271: a failed republish
//! could make kubelet drop the volume's directory), and an unreachable
//! custody keeps them (the local expiry timer still applies).
//!
//! Nothing here logs or returns a token, a volume-context value other than
//! pod and grant names, or file content.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use crate::csi::converge::payload::build_payload;
use crate::csi::converge::resolver::Resolver;
use crate::csi::converge::{NodeConfig, NodeService, blocking, new_request_id};
use crate::csi::errors::{MAX_VOLUME_ID_BYTES, PublishError, UnpublishError, error_chain, shorten};
use crate::csi::volume::atomic_writer::{Payload, VolumeLayout, WriteOutcome};
use crate::csi::volume::context::{PublishAttributes, parse_publish_attributes};
use crate::csi::volume::mounter::{
    MountError, MountOutcome, MountState, Mounter, TmpfsOptions, UnmountMode,
};
use crate::csi::volume::registry::{
    PodRef, PublishedGrant, PublishedVolume, REGISTRY_FORMAT_VERSION, Registry, RegistryError,
};
use crate::csi::volume::table::{TokenUpdate, VolumeHandle};
use crate::csi::volume::target_path::TargetPath;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::node_server::Node;
use crate::proto::csi::v1::node_service_capability::rpc::Type as RpcType;
use crate::proto::csi::v1::volume_capability::AccessType;
use crate::proto::scopehold::v1::ResolveRequest;

/// Hostile ids are shortened to this length in log lines.
const MAX_ID_IN_LOG: usize = 80;
/// Mode of the tmpfs root when the pod has an fsGroup (kubelet adds the
/// fsGroup to every container's groups) and when it has none.
const ROOT_MODE_WITH_GROUP: u32 = 0o750;
const ROOT_MODE_WITHOUT_GROUP: u32 = 0o755;

/// What a successful publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// True when this call mounted the tmpfs (first publish).
    pub mounted: bool,
    pub files: WriteOutcome,
}

/// A NodePublishVolume request that passed validation.
#[derive(Debug)]
struct CheckedPublish {
    volume_id: String,
    target: TargetPath,
    attributes: PublishAttributes,
    fs_group: Option<u32>,
    read_only: bool,
}

/// Validates everything that needs no I/O. The three fields csi-sanity
/// checks come first.
fn check_publish(
    config: &NodeConfig,
    request: &csi::NodePublishVolumeRequest,
) -> Result<CheckedPublish, PublishError> {
    check_volume_id(&request.volume_id).map_err(|len| match len {
        0 => PublishError::MissingVolumeId,
        len => PublishError::VolumeIdTooLong { len },
    })?;
    if request.target_path.is_empty() {
        return Err(PublishError::MissingTargetPath);
    }
    let capability = request
        .volume_capability
        .as_ref()
        .ok_or(PublishError::MissingCapability)?;
    let mount = match &capability.access_type {
        Some(AccessType::Mount(mount)) => mount,
        Some(AccessType::Block(_)) => return Err(PublishError::BlockAccess),
        None => return Err(PublishError::MissingAccessType),
    };
    // Only kubelet can make the pod's bind of the volume read-only, and it
    // does so only when the pod spec asks (`csi.readOnly: true`); the
    // Secrets Store CSI driver applies the same rule.
    if !request.readonly {
        return Err(PublishError::NotReadOnly);
    }

    let target = config
        .target_paths
        .validate(&request.target_path)
        .map_err(PublishError::TargetPath)?;
    if let Some(volume) = target.kubelet_volume()
        && volume.expected_volume_id() != request.volume_id
    {
        return Err(PublishError::VolumeIdMismatch);
    }
    let fs_group = match mount.volume_mount_group.as_str() {
        "" => None,
        group => Some(
            group
                .parse::<u32>()
                .map_err(|_| PublishError::InvalidMountGroup)?,
        ),
    };
    let attributes = parse_publish_attributes(&request.volume_context, &request.secrets)
        .map_err(PublishError::Attributes)?;
    if !attributes.ephemeral {
        return Err(PublishError::NotEphemeral);
    }
    if let Some(volume) = target.kubelet_volume()
        && volume.pod_uid != attributes.pod.uid
    {
        return Err(PublishError::PodUidMismatch);
    }
    Ok(CheckedPublish {
        volume_id: request.volume_id.clone(),
        target,
        attributes,
        fs_group,
        read_only: request.readonly,
    })
}

/// `Err(len)` for an empty (0) or too long id.
fn check_volume_id(volume_id: &str) -> Result<(), usize> {
    match volume_id.len() {
        0 => Err(0),
        len if len > MAX_VOLUME_ID_BYTES => Err(len),
        _ => Ok(()),
    }
}

/// Everything the blocking part of a publish needs.
struct Apply {
    mounter: Mounter,
    registry: Registry,
    target: PathBuf,
    options: TmpfsOptions,
    payload: Payload,
    fs_group: Option<u32>,
    entry: PublishedVolume,
    /// Our tmpfs was there already, left by a publish that never finished:
    /// a failure now removes it like one this call made.
    unfinished: bool,
}

impl Apply {
    /// Mounts (if needed), writes, records. On failure after mounting in
    /// this call, unmounts and removes the target directory again.
    fn run(self) -> Result<(PublishOutcome, Arc<VolumeHandle>), PublishError> {
        let target = self.target.as_path();
        let mounted = self
            .mounter
            .mount_tmpfs(target, &self.options)
            .map_err(|error| {
                // mount_tmpfs may have created the directory; remove it if it
                // is empty and not a mount point.
                if !self.mounter.is_mount_point(target).unwrap_or(true) {
                    let _ = self.mounter.remove_target(target);
                }
                PublishError::Mount(error)
            })?
            == MountOutcome::Mounted;
        let result = self.fill();
        if result.is_err() && (mounted || self.unfinished) {
            undo_mount(&self.mounter, target);
        }
        result.map(|(files, handle)| (PublishOutcome { mounted, files }, handle))
    }

    fn fill(&self) -> Result<(WriteOutcome, Arc<VolumeHandle>), PublishError> {
        let target = self.target.as_path();
        // The tmpfs is read-only as a mount from the moment it is attached
        // (every propagated copy too), whatever `readonly` says; the files
        // are written through the volume's private writable handle, kept
        // for every later write. Whatever the directory holds (nothing on
        // a fresh tmpfs; a crashed publish's leftovers otherwise) is not
        // the plugin's until written: the layout starts empty.
        let handle = Arc::new(
            VolumeHandle::open(&self.mounter, target, Some(VolumeLayout::default()))
                .map_err(PublishError::Mount)?,
        );
        let written = handle
            .writer()
            .write(&self.payload, self.fs_group)
            .map_err(PublishError::Write)?;
        let mut entry = self.entry.clone();
        entry.layout = handle.layout();
        self.registry
            .store(&entry)
            .map_err(PublishError::Registry)?;
        Ok((written, handle))
    }
}

/// Best-effort removal of a mount this call made, and of its directory.
fn undo_mount(mounter: &Mounter, target: &Path) {
    let unmounted = mounter
        .unmount(target, UnmountMode::Normal)
        .or_else(|_| mounter.unmount(target, UnmountMode::Detach));
    match unmounted {
        Ok(_) => {
            if let Err(error) = mounter.remove_target(target) {
                tracing::warn!(target_path = %target.display(), error = %error, "could not remove the target directory after a failed publish");
            }
        }
        Err(error) => {
            tracing::error!(target_path = %target.display(), error = %error, "could not unmount after a failed publish");
        }
    }
}
impl<R: Resolver> NodeService<R> {
    /// NodePublishVolume.
    pub async fn publish(
        &self,
        request: &csi::NodePublishVolumeRequest,
    ) -> Result<PublishOutcome, PublishError> {
        let checked = check_publish(&self.config, request)?;
        let target = checked.target.path().to_path_buf();
        let _guard = self.locks.lock(&target.to_string_lossy()).await;

        // What is there already: a registry entry, our mount.
        let (existing, mounted) = {
            let registry = self.registry.clone();
            let mounter = self.mounter.clone();
            let volume_id = checked.volume_id.clone();
            let target = target.clone();
            blocking(
                move || {
                    let existing =
                        load_entry(&registry, &volume_id).map_err(PublishError::Registry)?;
                    let mounted = match mounter.probe(&target).map_err(PublishError::Mount)? {
                        MountState::NotMounted => false,
                        MountState::Ours => true,
                        MountState::Foreign(entry) => {
                            return Err(PublishError::Mount(MountError::ForeignMount {
                                path: target,
                                fs_type: entry.fs_type,
                                mount_source: entry.source,
                            }));
                        }
                    };
                    Ok((existing, mounted))
                },
                PublishError::Task,
            )
            .await?
        };
        if let Some(entry) = &existing
            && entry.target_path != target
        {
            return Err(PublishError::PublishedElsewhere {
                volume_id: checked.volume_id.clone(),
            });
        }

        let request_id = new_request_id();
        let pod = &checked.attributes.pod;
        let resolve_request = ResolveRequest {
            request_id: request_id.clone(),
            pod_token: checked.attributes.token.secret_value().to_owned(),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            service_account_name: pod.service_account_name.clone(),
            node_name: self.config.node_name.clone(),
            volume_id: checked.volume_id.clone(),
            grants: checked.attributes.grants.clone(),
            fs_group: checked.fs_group.map(i64::from),
        };
        let now = jiff::Timestamp::now();
        let mut entry = PublishedVolume {
            format_version: REGISTRY_FORMAT_VERSION,
            volume_id: checked.volume_id.clone(),
            target_path: target.clone(),
            pod: PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                service_account_name: pod.service_account_name.clone(),
            },
            agent: existing
                .as_ref()
                .map(|entry| entry.agent.clone())
                .unwrap_or_default(),
            requested_grants: checked.attributes.grants.clone(),
            // What is mounted now: a republish compares against it.
            grants: existing
                .as_ref()
                .map(|entry| entry.grants.clone())
                .unwrap_or_default(),
            fs_group: checked.fs_group,
            read_only: checked.read_only,
            published_at: existing
                .as_ref()
                .map(|entry| entry.published_at)
                .unwrap_or(now),
            updated_at: now,
            // What the plugin made in the volume; a fresh mount (below)
            // starts from an empty one.
            layout: existing.as_ref().and_then(|entry| entry.layout.clone()),
        };

        // Our tmpfs without a registry entry is what a publish that crashed
        // between mounting and recording leaves: it was never answered OK,
        // so it is published afresh (a refusal fails the call and unmounts),
        // not converged like a live volume.
        let unfinished = mounted && existing.is_none();
        if mounted && !unfinished {
            let files = self
                .republish_locked(entry, checked.attributes.token.clone(), &request_id)
                .await?;
            return Ok(PublishOutcome {
                mounted: false,
                files,
            });
        }

        // Tracked before custody is asked: an invalidation that arrives
        // while the answer is on its way concerns this volume too (its work
        // waits for the volume's lock, and an answer older than it is asked
        // again instead of being mounted).
        let pending = self.volumes.target_of(&checked.volume_id).is_none();
        if pending {
            self.volumes.upsert(
                entry.clone(),
                TokenUpdate::Set(checked.attributes.token.clone()),
            );
        }
        let answer = {
            let _permit = self.custody_permit().await;
            self.resolve_in_order(&checked.volume_id, resolve_request)
                .await
        }
        .map_err(|status| PublishError::from_custody(&status))
        .and_then(|response| {
            let resolved = build_payload(&response, self.config.payload_limit_bytes())?;
            Ok((response, resolved))
        });
        let (response, resolved) = match answer {
            Ok(answer) => answer,
            Err(error) => {
                if pending {
                    self.forget_volume(&checked.volume_id);
                }
                if unfinished {
                    let mounter = self.mounter.clone();
                    let target = target.clone();
                    blocking(
                        move || {
                            undo_mount(&mounter, &target);
                            Ok(())
                        },
                        PublishError::Task,
                    )
                    .await?;
                }
                return Err(error);
            }
        };
        entry.agent = response.agent.clone();
        entry.grants = resolved.grants;
        let summary = GrantSummary(&entry.grants);

        let apply = Apply {
            mounter: self.mounter.clone(),
            registry: self.registry.clone(),
            target: target.clone(),
            options: TmpfsOptions {
                size_bytes: self.config.tmpfs_size_bytes,
                mode: if checked.fs_group.is_some() {
                    ROOT_MODE_WITH_GROUP
                } else {
                    ROOT_MODE_WITHOUT_GROUP
                },
                gid: checked.fs_group,
            },
            payload: resolved.payload,
            fs_group: checked.fs_group,
            entry: entry.clone(),
            unfinished,
        };
        let applied = blocking(move || apply.run(), PublishError::Task).await;
        let (outcome, handle) = match applied {
            Ok(applied) => applied,
            Err(error) => {
                if pending {
                    self.forget_volume(&checked.volume_id);
                }
                return Err(error);
            }
        };
        self.volumes.upsert(
            entry.clone(),
            TokenUpdate::Set(checked.attributes.token.clone()),
        );
        self.volumes.set_handle(&entry.volume_id, handle);
        tracing::info!(
            volume_id = %checked.volume_id,
            namespace = %pod.namespace,
            pod = %pod.name,
            agent = %entry.agent,
            grants = %summary,
            request_id = %request_id,
            mounted = outcome.mounted,
            files = ?outcome.files,
            "volume published"
        );
        Ok(outcome)
    }

    /// Stops tracking a volume (unpublished, or its first publish failed).
    fn forget_volume(&self, volume_id: &str) {
        self.volumes.remove(volume_id);
        self.floors.forget(volume_id);
    }

    /// NodeUnpublishVolume: unmounts our tmpfs, removes the target
    /// directory and the registry entry. Already gone is success.
    pub async fn unpublish(
        &self,
        request: &csi::NodeUnpublishVolumeRequest,
    ) -> Result<(), UnpublishError> {
        check_volume_id(&request.volume_id).map_err(|len| match len {
            0 => UnpublishError::MissingVolumeId,
            len => UnpublishError::VolumeIdTooLong { len },
        })?;
        if request.target_path.is_empty() {
            return Err(UnpublishError::MissingTargetPath);
        }
        let target = self
            .config
            .target_paths
            .validate(&request.target_path)
            .map_err(UnpublishError::TargetPath)?
            .path()
            .to_path_buf();
        let _guard = self.locks.lock(&target.to_string_lossy()).await;
        let mounter = self.mounter.clone();
        let registry = self.registry.clone();
        let volume_id = request.volume_id.clone();
        let unmounted = target.clone();
        let removed_entry = blocking(
            move || unpublish_blocking(&mounter, &registry, &volume_id, &unmounted),
            UnpublishError::Task,
        )
        .await?;
        // Forget the token with the volume (only if it is this target's).
        if self.volumes.target_of(&request.volume_id).as_deref() == Some(target.as_path()) {
            self.forget_volume(&request.volume_id);
        }
        tracing::info!(
            volume_id = %request.volume_id,
            namespace = removed_entry.as_ref().map(|entry| entry.pod.namespace.as_str()),
            pod = removed_entry.as_ref().map(|entry| entry.pod.name.as_str()),
            agent = removed_entry.as_ref().map(|entry| entry.agent.as_str()),
            "volume unpublished"
        );
        Ok(())
    }
}

fn unpublish_blocking(
    mounter: &Mounter,
    registry: &Registry,
    volume_id: &str,
    target: &Path,
) -> Result<Option<PublishedVolume>, UnpublishError> {
    match mounter.unmount(target, UnmountMode::Normal) {
        Ok(_) => {}
        // Still busy (a container runtime lagging behind): detach; the
        // kernel frees the tmpfs when the last user goes.
        Err(MountError::Sys {
            source: nix::errno::Errno::EBUSY,
            ..
        }) => {
            mounter
                .unmount(target, UnmountMode::Detach)
                .map_err(UnpublishError::Mount)?;
        }
        Err(error) => return Err(UnpublishError::Mount(error)),
    }
    match mounter.remove_target(target) {
        Ok(()) => {}
        Err(MountError::TargetNotDirectory { .. } | MountError::TargetIsSymlink { .. }) => {
            return Err(UnpublishError::TargetNotDirectory {
                path: target.to_path_buf(),
            });
        }
        Err(MountError::Io { ref source, .. })
            if source.kind() == io::ErrorKind::DirectoryNotEmpty =>
        {
            return Err(UnpublishError::TargetNotEmpty {
                path: target.to_path_buf(),
            });
        }
        Err(error) => {
            return Err(UnpublishError::RemoveTarget {
                path: target.to_path_buf(),
                source: error,
            });
        }
    }
    // Forget the volume only if the entry is the one for this target (an
    // unreadable entry is forgotten too: it describes nothing usable).
    let entry = load_entry(registry, volume_id).map_err(UnpublishError::Registry)?;
    match entry {
        Some(entry) if entry.target_path == target => {
            registry
                .remove(volume_id)
                .map_err(UnpublishError::Registry)?;
            Ok(Some(entry))
        }
        Some(entry) => {
            tracing::warn!(
                volume_id = %volume_id,
                recorded_target = %entry.target_path.display(),
                target_path = %target.display(),
                "unpublished a target that the registry does not record for this volume; keeping the entry"
            );
            Ok(None)
        }
        None => {
            registry
                .remove(volume_id)
                .map_err(UnpublishError::Registry)?;
            Ok(None)
        }
    }
}

/// The registry entry of a volume. An entry that exists but cannot be used
/// (corrupt, another format version, misplaced, oversized) is reported and
/// treated as absent, so that it never blocks a publish or an unpublish; the
/// next store replaces it. I/O errors stay errors.
fn load_entry(
    registry: &Registry,
    volume_id: &str,
) -> Result<Option<PublishedVolume>, RegistryError> {
    match registry.load(volume_id) {
        Ok(entry) => Ok(entry),
        Err(error @ RegistryError::Io { .. }) => Err(error),
        Err(error) => {
            tracing::warn!(
                volume_id = %id_for_log(volume_id),
                error = %error_chain(&error),
                "ignoring an unusable registry entry"
            );
            Ok(None)
        }
    }
}

/// `grant@digest,…` for log lines.
struct GrantSummary<'a>(&'a [PublishedGrant]);

impl fmt::Display for GrantSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, grant) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}@{}", grant.grant, grant.content_digest)?;
        }
        Ok(())
    }
}

/// Shortens a request's (possibly hostile) volume id for a log line.
/// One warning line for a failed Node RPC (the error names paths and
/// reasons only, never values or tokens).
fn log_failure(rpc: &'static str, volume_id: &str, code: Code, error: &dyn std::error::Error) {
    tracing::warn!(
        volume_id = %id_for_log(volume_id),
        code = ?code,
        error = %error_chain(error),
        "{rpc} failed"
    );
}

fn id_for_log(volume_id: &str) -> String {
    shorten(volume_id, MAX_ID_IN_LOG)
}

#[tonic::async_trait]
impl<R: Resolver> Node for NodeService<R> {
    async fn node_stage_volume(
        &self,
        _request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeStageVolume is not supported (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeUnstageVolume is not supported (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let result = self.publish(&request).await;
        if let Err(error) = &result {
            log_failure("NodePublishVolume", &request.volume_id, error.code(), error);
        }
        result
            .map(|_| Response::new(csi::NodePublishVolumeResponse {}))
            .map_err(Status::from)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let result = self.unpublish(&request).await;
        if let Err(error) = &result {
            log_failure(
                "NodeUnpublishVolume",
                &request.volume_id,
                error.code(),
                error,
            );
        }
        result
            .map(|()| Response::new(csi::NodeUnpublishVolumeResponse {}))
            .map_err(Status::from)
    }

    async fn node_get_volume_stats(
        &self,
        _request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented(
            "NodeGetVolumeStats is not supported (no GET_VOLUME_STATS capability)",
        ))
    }

    async fn node_expand_volume(
        &self,
        _request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeExpandVolume is not supported (no EXPAND_VOLUME capability)",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![csi::NodeServiceCapability {
                r#type: Some(csi::node_service_capability::Type::Rpc(
                    csi::node_service_capability::Rpc {
                        r#type: RpcType::VolumeMountGroup as i32,
                    },
                )),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.config.node_name.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
pub(crate) mod tests;

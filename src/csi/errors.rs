//! Why a Node RPC failed, and the gRPC code kubelet sees for it. Shared by
//! the gRPC handlers and convergence (a republish fails or succeeds with
//! these), so it sits below both.

use std::path::PathBuf;

use tonic::{Code, Status};

use super::volume::atomic_writer::AtomicWriteError;
use super::volume::context::VolumeContextError;
use super::volume::mounter::MountError;
use super::volume::registry::RegistryError;
use super::volume::target_path::TargetPathError;

/// Longest volume id accepted (the CSI spec's limit for ids).
pub const MAX_VOLUME_ID_BYTES: usize = 256;
/// Most files one volume may hold.
pub const MAX_FILES: usize = 1024;
/// Custody's messages are passed on to kubelet shortened to this length.
const MAX_CUSTODY_MESSAGE_BYTES: usize = 1024;

/// Why NodePublishVolume failed. [`PublishError::code`] is the gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("volume_id is missing")]
    MissingVolumeId,
    #[error("volume_id is {len} bytes long; at most {MAX_VOLUME_ID_BYTES} are allowed")]
    VolumeIdTooLong { len: usize },
    #[error("target_path is missing")]
    MissingTargetPath,
    #[error("volume_capability is missing")]
    MissingCapability,
    #[error("volume_capability has no access type; only the mount access type is supported")]
    MissingAccessType,
    #[error("block access is not supported: csi.scopehold.dev serves files (access type mount)")]
    BlockAccess,
    #[error(
        "csi.scopehold.dev volumes must be mounted read-only: set `readOnly: true` on the pod's csi volume (volumes[].csi.readOnly); a writable credential volume would let the pod replace its files and keep a revoked value"
    )]
    NotReadOnly,
    #[error("invalid target_path")]
    TargetPath(#[source] TargetPathError),
    #[error(
        "volume_id does not match the target path (kubelet derives an inline volume's id from the pod UID and the volume name)"
    )]
    VolumeIdMismatch,
    #[error("the pod UID in the target path differs from the csi.storage.k8s.io/pod.uid attribute")]
    PodUidMismatch,
    #[error("volume_mount_group is not a numeric group id")]
    InvalidMountGroup,
    #[error("invalid volume attributes")]
    Attributes(#[source] VolumeContextError),
    #[error(
        "csi.scopehold.dev serves only CSI ephemeral inline volumes (csi.storage.k8s.io/ephemeral is \"false\")"
    )]
    NotEphemeral,
    #[error("volume {volume_id:?} is already published at another target path")]
    PublishedElsewhere { volume_id: String },
    #[error("custody refused the volume: {message}")]
    Refused { code: Code, message: String },
    #[error("custody is unavailable: {message}")]
    CustodyUnavailable { message: String },
    #[error("custody failed ({code:?}): {message}")]
    CustodyFailed { code: Code, message: String },
    #[error("custody returned an unusable response: {reason}")]
    BadResponse { reason: String },
    #[error(
        "grants {first:?} and {second:?} both deliver the file {file:?}; give one of them another path"
    )]
    FileConflict {
        file: String,
        first: String,
        second: String,
    },
    #[error(
        "the granted files total {total} bytes; a volume holds at most {limit} (half of --tmpfs-size, leaving room for a rotation)"
    )]
    PayloadTooLarge { total: u64, limit: u64 },
    #[error("the volume holds {count} files; at most {MAX_FILES} are allowed")]
    TooManyFiles { count: usize },
    #[error("mounting the volume")]
    Mount(#[source] MountError),
    #[error("writing the volume's files")]
    Write(#[source] AtomicWriteError),
    #[error("recording the volume")]
    Registry(#[source] RegistryError),
    #[error("internal error: {0}")]
    Task(String),
}

impl PublishError {
    /// The gRPC code kubelet sees.
    pub fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId
            | Self::VolumeIdTooLong { .. }
            | Self::MissingTargetPath
            | Self::MissingCapability
            | Self::MissingAccessType
            | Self::BlockAccess
            | Self::NotReadOnly
            | Self::TargetPath(_)
            | Self::VolumeIdMismatch
            | Self::PodUidMismatch
            | Self::InvalidMountGroup
            | Self::Attributes(_) => Code::InvalidArgument,
            Self::NotEphemeral
            | Self::FileConflict { .. }
            | Self::PayloadTooLarge { .. }
            | Self::TooManyFiles { .. } => Code::FailedPrecondition,
            Self::PublishedElsewhere { .. } => Code::AlreadyExists,
            Self::Refused { code, .. } => *code,
            Self::CustodyUnavailable { .. } => Code::Unavailable,
            Self::Mount(error) => mount_error_code(error),
            Self::CustodyFailed { .. }
            | Self::BadResponse { .. }
            | Self::Write(_)
            | Self::Registry(_)
            | Self::Task(_) => Code::Internal,
        }
    }

    /// Classifies a status from custody (or from the client in front of it).
    pub fn from_custody(status: &Status) -> Self {
        let message = shorten(status.message(), MAX_CUSTODY_MESSAGE_BYTES);
        match status.code() {
            // Custody's decision about this pod: passed on as is.
            code @ (Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::InvalidArgument) => Self::Refused { code, message },
            // Try again later; kubelet treats UNAVAILABLE as retryable.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted => Self::CustodyUnavailable { message },
            code => Self::CustodyFailed { code, message },
        }
    }

    /// True when custody decided the pod gets nothing (as opposed to not
    /// being able to decide): a republish then withdraws the files.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }

    /// True for problems of this node (mounts, files, registry) rather than
    /// of custody's answer.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Self::Mount(_) | Self::Write(_) | Self::Registry(_) | Self::Task(_)
        )
    }
}

impl From<PublishError> for Status {
    fn from(error: PublishError) -> Self {
        Status::new(error.code(), error_chain(&error))
    }
}

/// Why NodeUnpublishVolume failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpublishError {
    #[error("volume_id is missing")]
    MissingVolumeId,
    #[error("volume_id is {len} bytes long; at most {MAX_VOLUME_ID_BYTES} are allowed")]
    VolumeIdTooLong { len: usize },
    #[error("target_path is missing")]
    MissingTargetPath,
    #[error("invalid target_path")]
    TargetPath(#[source] TargetPathError),
    #[error("unmounting the volume")]
    Mount(#[source] MountError),
    #[error(
        "{} is not an empty directory after unmounting; refusing to delete what ScopeHold did not create",
        path.display()
    )]
    TargetNotEmpty { path: PathBuf },
    #[error("{} is not a directory; refusing to delete it", path.display())]
    TargetNotDirectory { path: PathBuf },
    #[error("removing {}", path.display())]
    RemoveTarget {
        path: PathBuf,
        #[source]
        source: MountError,
    },
    #[error("updating the registry")]
    Registry(#[source] RegistryError),
    #[error("internal error: {0}")]
    Task(String),
}

impl UnpublishError {
    pub fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId
            | Self::VolumeIdTooLong { .. }
            | Self::MissingTargetPath
            | Self::TargetPath(_) => Code::InvalidArgument,
            Self::Mount(error) => mount_error_code(error),
            Self::TargetNotEmpty { .. } | Self::TargetNotDirectory { .. } => {
                Code::FailedPrecondition
            }
            Self::RemoveTarget { .. } | Self::Registry(_) | Self::Task(_) => Code::Internal,
        }
    }
}

impl From<UnpublishError> for Status {
    fn from(error: UnpublishError) -> Self {
        Status::new(error.code(), error_chain(&error))
    }
}

/// A mount that is not ours, or a target that is not a plain directory, is
/// a state problem; anything else is a local failure.
fn mount_error_code(error: &MountError) -> Code {
    match error {
        MountError::ForeignMount { .. }
        | MountError::TargetIsSymlink { .. }
        | MountError::OutsideRoot { .. }
        | MountError::Escapes { .. }
        | MountError::TargetNotDirectory { .. } => Code::FailedPrecondition,
        _ => Code::Internal,
    }
}

/// `error: source: source…`, the message kubelet shows in the pod's events.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

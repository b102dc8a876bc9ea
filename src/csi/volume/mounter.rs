//! Size-limited tmpfs mounts for published volumes.
//!
//! # Read-only without a writable window
//!
//! A pod must not be able to change its credential files, so the target mount
//! is read-only, yet the node plugin must keep updating it (rotation,
//! revocation). The approach:
//!
//! 1. [`Mounter::mount_tmpfs`] mounts a fresh tmpfs at the target.
//! 2. [`Mounter::set_read_only`] makes the *mount point* read-only
//!    (`MS_REMOUNT | MS_BIND | MS_RDONLY`). This is a per-mount flag: the
//!    tmpfs itself (its superblock) stays writable. Do this before
//!    NodePublishVolume returns, while no container can have the volume yet.
//! 3. To write, [`Mounter::writable_view`] bind-mounts the target onto a
//!    private scratch directory and clears the read-only flag on *that* bind
//!    only. The atomic writer writes there; the changes appear at the target
//!    at once (same tmpfs). Closing the view unmounts the scratch bind.
//!
//! The target is therefore never writable after step 2, and the bind mounts a
//! container runtime makes of it inherit the read-only flag. The simpler
//! alternative, remounting the target read-write for each update, would leave
//! a window in which a container (re)starting in that instant gets a writable
//! copy of the mount.
//!
//! 4. For a volume that is written again and again (rotations, withdrawals),
//!    [`Mounter::detached_view`] makes such a view once, opens its root and
//!    detaches the bind at once (`MNT_DETACH`): no path reaches it any more
//!    (it is not even in mountinfo), but the open directory keeps it alive
//!    and writable, and the plugin writes through `/proc/self/fd/N`. Every
//!    later write then needs no mount system call and no mountinfo scan,
//!    which matters when one change touches every volume on the node.
//!
//! The scratch directory should be private to the node plugin (for example
//! `/run/scopehold/rw` inside its container), not under a shared mount such as
//! the kubelet directory, so that the short-lived binds do not propagate.
//!
//! # Ownership and idempotence
//!
//! Our mounts are recognised in `/proc/self/mountinfo` by file system type
//! `tmpfs` and source [`TMPFS_SOURCE`]. Mounting over one of ours does
//! nothing (never stacks); mounting over anything else is refused. Callers
//! serialise operations per target. [`Mounter::probe`] avoids the scan when
//! `statx` can answer (see [`super::known_mounts`]).

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::known_mounts::{KnownMounts, mount_identity};

/// The mount source name that marks a tmpfs as ScopeHold's.
pub const TMPFS_SOURCE: &str = "scopehold";
/// Where the kernel describes this process's mounts.
const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";
/// Security flags every mount of ours carries (also on remounts, which would
/// otherwise clear them).
const SECURITY_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);
/// Upper bound on mounts removed from one target in [`Mounter::unmount`]
/// (in case an older bug or another tool stacked ours).
const MAX_STACKED_UNMOUNTS: usize = 16;

/// Parameters of a new tmpfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmpfsOptions {
    /// Size limit in bytes (`size=`).
    pub size_bytes: u64,
    /// Mode of the tmpfs root directory (`mode=`), for example 0o750.
    pub mode: u32,
    /// Group owning the tmpfs root directory (`gid=`), typically the pod's
    /// fsGroup. `None` keeps root's group.
    pub gid: Option<u32>,
}

impl TmpfsOptions {
    /// The mount data string, e.g. `size=1048576,mode=0750,gid=1000`.
    pub fn mount_data(&self) -> String {
        let mut data = format!("size={},mode={:04o}", self.size_bytes, self.mode);
        if let Some(gid) = self.gid {
            data.push_str(&format!(",gid={gid}"));
        }
        data
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    /// Our tmpfs was already there; nothing was done.
    AlreadyMounted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmountOutcome {
    Unmounted,
    /// The target was not mounted (or does not exist).
    NotMounted,
}

/// What is mounted at a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// Our tmpfs.
    Ours,
    /// Something else (described by its mountinfo line).
    Foreign(MountInfoEntry),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnmountMode {
    /// A plain unmount: fails with EBUSY while something uses the mount.
    #[default]
    Normal,
    /// `MNT_DETACH`: detach now, free when no longer busy.
    Detach,
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfoEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The path inside the file system that is mounted (`/` for a whole tmpfs).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options such as `ro`, `nosuid`.
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options such as `size=1024k`.
    pub super_options: Vec<String>,
}

impl MountInfoEntry {
    /// True when this mount point is read-only (per-mount flag).
    pub fn is_read_only(&self) -> bool {
        self.mount_options.iter().any(|option| option == "ro")
    }

    /// True for a tmpfs mounted by ScopeHold.
    pub fn is_scopehold_tmpfs(&self) -> bool {
        self.fs_type == "tmpfs" && self.source == TMPFS_SOURCE
    }
}

/// A malformed mountinfo line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed mountinfo line {line_number}: {problem}")]
pub struct MountInfoError {
    pub line_number: usize,
    pub problem: &'static str,
}

/// Parses the text of `/proc/<pid>/mountinfo` (see proc(5)). Fields are
/// unescaped (`\040` → space, `\011` → tab, `\012` → newline, `\134` → `\`).
pub fn parse_mountinfo(text: &[u8]) -> Result<Vec<MountInfoEntry>, MountInfoError> {
    let mut entries = Vec::new();
    for (index, line) in text.split(|byte| *byte == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        entries.push(parse_mountinfo_line(line, index + 1)?);
    }
    Ok(entries)
}

fn parse_mountinfo_line(line: &[u8], line_number: usize) -> Result<MountInfoEntry, MountInfoError> {
    let malformed = |problem| MountInfoError {
        line_number,
        problem,
    };
    let fields: Vec<&[u8]> = line.split(|byte| *byte == b' ').collect();
    // Fixed fields 0..=5, optional fields, "-", then fs type, source, super options.
    let separator = fields
        .iter()
        .skip(6)
        .position(|field| *field == b"-")
        .map(|offset| offset + 6)
        .ok_or_else(|| malformed("no '-' separator after the optional fields"))?;
    let field = |index: usize| {
        fields
            .get(index)
            .copied()
            .ok_or_else(|| malformed("too few fields"))
    };
    let number = |index: usize| -> Result<u32, MountInfoError> {
        std::str::from_utf8(field(index)?)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| malformed("mount id or parent id is not a number"))
    };
    let text = |index: usize| -> Result<String, MountInfoError> {
        Ok(String::from_utf8_lossy(&unescape_octal(field(index)?)).into_owned())
    };
    let path = |index: usize| -> Result<PathBuf, MountInfoError> {
        Ok(PathBuf::from(OsStr::from_bytes(&unescape_octal(field(
            index,
        )?))))
    };
    let options = |index: usize| -> Result<Vec<String>, MountInfoError> {
        Ok(text(index)?.split(',').map(str::to_owned).collect())
    };
    Ok(MountInfoEntry {
        mount_id: number(0)?,
        parent_id: number(1)?,
        root: path(3)?,
        mount_point: path(4)?,
        mount_options: options(5)?,
        fs_type: text(separator + 1)?,
        source: text(separator + 2)?,
        super_options: options(separator + 3)?,
    })
}

/// Replaces the kernel's `\ooo` octal escapes with the bytes they stand for.
/// A backslash not followed by three octal digits is kept as is.
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut index = 0;
    while index < field.len() {
        let escaped = field
            .get(index + 1..index + 4)
            .filter(|digits| {
                field[index] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            })
            .map(|digits| {
                digits
                    .iter()
                    .fold(0_u32, |value, digit| value * 8 + u32::from(digit - b'0'))
            })
            .and_then(|value| u8::try_from(value).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                index += 4;
            }
            None => {
                out.push(field[index]);
                index += 1;
            }
        }
    }
    out
}

/// The mount currently visible at `path`: of all entries mounted exactly
/// there, the one no other of them is stacked on.
fn topmost_mount_at<'a>(entries: &'a [MountInfoEntry], path: &Path) -> Option<&'a MountInfoEntry> {
    let at_path: Vec<&MountInfoEntry> = entries
        .iter()
        .filter(|entry| entry.mount_point == path)
        .collect();
    at_path
        .iter()
        .find(|candidate| {
            !at_path.iter().any(|other| {
                other.parent_id == candidate.mount_id && other.mount_id != candidate.mount_id
            })
        })
        .copied()
}

/// Errors of the mounter. They name paths and operations only.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{} is a symbolic link; refusing to mount there", path.display())]
    TargetIsSymlink { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    TargetNotDirectory { path: PathBuf },
    #[error(
        "{} already has a {fs_type} mount from {mount_source:?} that is not ScopeHold's; refusing to stack or remove it",
        path.display()
    )]
    ForeignMount {
        path: PathBuf,
        fs_type: String,
        mount_source: String,
    },
    #[error("{} is not mounted", path.display())]
    NotMounted { path: PathBuf },
    #[error("failed to {op} {}", path.display())]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {}", path.display())]
    MountInfo {
        path: PathBuf,
        #[source]
        source: MountInfoError,
    },
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MountError {
    move |source| MountError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn sys_error(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> MountError {
    move |source| MountError::Sys {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Mounts, remounts and unmounts ScopeHold's tmpfs volumes.
#[derive(Debug, Clone)]
pub struct Mounter {
    scratch_dir: PathBuf,
    /// Shared by the clones (one per blocking task).
    known: Arc<KnownMounts>,
}

impl Mounter {
    /// `scratch_dir` holds the short-lived writable binds of
    /// [`writable_view`](Self::writable_view); it is created (mode 0700) when
    /// first needed.
    pub fn new(scratch_dir: impl Into<PathBuf>) -> Self {
        Self {
            scratch_dir: scratch_dir.into(),
            known: Arc::default(),
        }
    }

    /// Mounts a tmpfs (nodev, nosuid, noexec) at `target`, creating the
    /// directory itself (not its parents) if needed. Does nothing when our
    /// tmpfs is already mounted there; refuses any other mount.
    pub fn mount_tmpfs(
        &self,
        target: &Path,
        options: &TmpfsOptions,
    ) -> Result<MountOutcome, MountError> {
        match fs::DirBuilder::new().mode(0o750).create(target) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(io_error("create", target)(error)),
        }
        let target = checked_directory(target)?;
        match self.probe(&target)? {
            MountState::Ours => return Ok(MountOutcome::AlreadyMounted),
            MountState::Foreign(existing) => return Err(foreign_mount(&target, &existing)),
            MountState::NotMounted => {}
        }
        nix::mount::mount(
            Some(TMPFS_SOURCE),
            &target,
            Some("tmpfs"),
            SECURITY_FLAGS,
            Some(options.mount_data().as_str()),
        )
        .map_err(sys_error("mount tmpfs at", &target))?;
        // We made it, under the caller's per-target lock: it is ours.
        if let Some(unique_id) = mount_identity(&target).and_then(|id| id.unique_id) {
            self.known.remember(&target, unique_id);
        }
        Ok(MountOutcome::Mounted)
    }

    /// Sets or clears the read-only flag of our mount point at `target` (the
    /// tmpfs itself stays writable; see the module comment).
    pub fn set_read_only(&self, target: &Path, read_only: bool) -> Result<(), MountError> {
        let target = checked_directory(target)?;
        self.require_ours(&target)?;
        remount_bind(&target, read_only)
    }

    /// A writable bind of our mount at `target`, in a fresh directory under the
    /// scratch directory. Close it with [`WritableView::close`].
    pub fn writable_view(&self, target: &Path) -> Result<WritableView, MountError> {
        let target = checked_directory(target)?;
        self.require_ours(&target)?;

        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&self.scratch_dir)
            .map_err(io_error("create", &self.scratch_dir))?;
        let view_dir = create_unique_dir(&self.scratch_dir)?;
        // From here on, dropping `view` removes the directory (and the bind,
        // once made) on every early return.
        let mut view = WritableView {
            path: view_dir.clone(),
            mounted: false,
        };
        nix::mount::mount(
            Some(&target),
            &view_dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_error("bind-mount a writable view at", &view_dir))?;
        view.mounted = true;
        // The bind inherits the target's read-only flag; clear it on the bind
        // only.
        remount_bind(&view_dir, false)?;
        Ok(view)
    }

    /// A writable view of our tmpfs at `target` that no path reaches: see
    /// the module comment (step 4). Holding it keeps the tmpfs's memory
    /// allocated after the target is unmounted, so drop it at unpublish.
    pub fn detached_view(&self, target: &Path) -> Result<DetachedView, MountError> {
        let mut view = self.writable_view(target)?;
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(&view.path)
            .map_err(io_error("open", &view.path))?;
        let dev = dir
            .metadata()
            .map_err(io_error("inspect", &view.path))?
            .dev();
        nix::mount::umount2(&view.path, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH)
            .map_err(sys_error("detach writable view", &view.path))?;
        view.mounted = false;
        view.release()?;
        Ok(DetachedView { dir, dev })
    }

    /// Unmounts our tmpfs at `target` (every layer of ours, should any be
    /// stacked). Not mounted is success; a foreign mount is refused.
    pub fn unmount(&self, target: &Path, mode: UnmountMode) -> Result<UnmountOutcome, MountError> {
        let target = match checked_directory(target) {
            Ok(target) => target,
            Err(MountError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(UnmountOutcome::NotMounted);
            }
            Err(error) => return Err(error),
        };
        let flags = match mode {
            UnmountMode::Normal => MntFlags::UMOUNT_NOFOLLOW,
            UnmountMode::Detach => MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH,
        };
        let mut outcome = UnmountOutcome::NotMounted;
        for _ in 0..MAX_STACKED_UNMOUNTS {
            match self.probe(&target)? {
                MountState::NotMounted => return Ok(outcome),
                MountState::Foreign(existing) => return Err(foreign_mount(&target, &existing)),
                MountState::Ours => {
                    nix::mount::umount2(&target, flags).map_err(sys_error("unmount", &target))?;
                    self.known.forget(&target);
                    outcome = UnmountOutcome::Unmounted;
                }
            }
        }
        Ok(outcome)
    }

    /// The mount visible at exactly `path` (after resolving symlinks in its
    /// parents), or `None` when `path` is not a mount point or does not exist.
    /// Always scans mountinfo; [`probe`](Self::probe) is the cheap question.
    pub fn mount_at(&self, path: &Path) -> Result<Option<MountInfoEntry>, MountError> {
        let Some(canonical) = canonical_or_missing(path)? else {
            return Ok(None);
        };
        self.known.count_scan();
        let entries = read_mountinfo()?;
        Ok(topmost_mount_at(&entries, &canonical).cloned())
    }

    /// What is mounted at exactly `path`: as [`mount_at`](Self::mount_at)
    /// would tell, but without scanning mountinfo when `statx` shows that
    /// `path` is no mount point, or is the mount of ours last seen there.
    pub fn probe(&self, path: &Path) -> Result<MountState, MountError> {
        let Some(canonical) = canonical_or_missing(path)? else {
            return Ok(MountState::NotMounted);
        };
        let before = mount_identity(&canonical);
        if let Some(identity) = before {
            if identity.is_mount_root == Some(false) {
                return Ok(MountState::NotMounted);
            }
            if let Some(unique_id) = identity.unique_id
                && self.known.is_ours(&canonical, unique_id)
            {
                return Ok(MountState::Ours);
            }
        }
        self.known.count_scan();
        let entries = read_mountinfo()?;
        let state = match topmost_mount_at(&entries, &canonical) {
            None => MountState::NotMounted,
            Some(entry) if entry.is_scopehold_tmpfs() => MountState::Ours,
            Some(entry) => MountState::Foreign(entry.clone()),
        };
        // Remember it only if the same mount was there before and after the
        // scan (unique IDs are never reused), so the scan described it.
        if state == MountState::Ours
            && let Some(unique_id) = before.and_then(|id| id.unique_id)
            && mount_identity(&canonical).and_then(|id| id.unique_id) == Some(unique_id)
        {
            self.known.remember(&canonical, unique_id);
        }
        Ok(state)
    }

    pub fn is_mount_point(&self, path: &Path) -> Result<bool, MountError> {
        Ok(self.probe(path)? != MountState::NotMounted)
    }

    /// Mountinfo scans this mounter (and its clones) made so far.
    pub fn mountinfo_scans(&self) -> u64 {
        self.known.scans()
    }

    fn require_ours(&self, target: &Path) -> Result<(), MountError> {
        match self.probe(target)? {
            MountState::Ours => Ok(()),
            MountState::Foreign(existing) => Err(foreign_mount(target, &existing)),
            MountState::NotMounted => Err(MountError::NotMounted {
                path: target.to_path_buf(),
            }),
        }
    }
}

/// A temporary writable bind of a volume's tmpfs. Dropping it unmounts it too
/// (best effort); [`close`](Self::close) reports errors.
pub struct WritableView {
    path: PathBuf,
    mounted: bool,
}

impl fmt::Debug for WritableView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritableView")
            .field("path", &self.path)
            .finish()
    }
}

impl WritableView {
    /// Where to write (for example with the atomic writer).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts the view and removes its directory.
    pub fn close(mut self) -> Result<(), MountError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), MountError> {
        if self.mounted {
            nix::mount::umount2(&self.path, MntFlags::UMOUNT_NOFOLLOW)
                .or_else(|_| {
                    // Busy (something still has a file open): detach instead so
                    // the view never lingers.
                    nix::mount::umount2(
                        &self.path,
                        MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH,
                    )
                })
                .map_err(sys_error("unmount writable view", &self.path))?;
            self.mounted = false;
        }
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", &self.path)(error)),
        }
    }
}

impl Drop for WritableView {
    fn drop(&mut self) {
        if let Err(error) = self.release() {
            tracing::warn!(error = %error, "could not clean up a writable view");
        }
    }
}

/// A writable, detached view of one volume's tmpfs (see
/// [`Mounter::detached_view`]).
#[derive(Debug)]
pub struct DetachedView {
    dir: fs::File,
    /// The tmpfs's device number, to recognise its target.
    dev: u64,
}

impl DetachedView {
    /// Where to write: `/proc/self/fd/N/.` (the trailing `.` makes the
    /// magic link resolve for `lstat` too). Valid only while `self` lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/.", self.dir.as_raw_fd()))
    }

    /// Whether `target` still shows this tmpfs (it was not unmounted and
    /// replaced behind our back).
    pub fn serves(&self, target: &Path) -> bool {
        fs::symlink_metadata(target)
            .is_ok_and(|metadata| metadata.is_dir() && metadata.dev() == self.dev)
    }
}

/// Changes only the per-mount flags of the mount at `path`.
fn remount_bind(path: &Path, read_only: bool) -> Result<(), MountError> {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | SECURITY_FLAGS;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(None::<&str>, path, None::<&str>, flags, None::<&str>).map_err(sys_error(
        if read_only {
            "remount read-only"
        } else {
            "remount read-write"
        },
        path,
    ))
}

/// Resolves `path` to its canonical form after checking that it is a real
/// directory and not itself a symlink.
fn checked_directory(path: &Path) -> Result<PathBuf, MountError> {
    let metadata = fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
    if metadata.file_type().is_symlink() {
        return Err(MountError::TargetIsSymlink {
            path: path.to_path_buf(),
        });
    }
    if !metadata.is_dir() {
        return Err(MountError::TargetNotDirectory {
            path: path.to_path_buf(),
        });
    }
    fs::canonicalize(path).map_err(io_error("resolve", path))
}

/// `path` resolved, or `None` when it does not exist.
fn canonical_or_missing(path: &Path) -> Result<Option<PathBuf>, MountError> {
    match fs::canonicalize(path) {
        Ok(canonical) => Ok(Some(canonical)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(io_error("resolve", path)(error)),
    }
}

fn read_mountinfo() -> Result<Vec<MountInfoEntry>, MountError> {
    let path = Path::new(MOUNTINFO_PATH);
    let text = fs::read(path).map_err(io_error("read", path))?;
    parse_mountinfo(&text).map_err(|source| MountError::MountInfo {
        path: path.to_path_buf(),
        source,
    })
}

fn foreign_mount(path: &Path, existing: &MountInfoEntry) -> MountError {
    MountError::ForeignMount {
        path: path.to_path_buf(),
        fs_type: existing.fs_type.clone(),
        mount_source: existing.source.clone(),
    }
}

/// Creates a new directory with a random name (mode 0700) under `parent`.
fn create_unique_dir(parent: &Path) -> Result<PathBuf, MountError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = parent.join(format!("view-{:016x}", hasher.finish()));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                // The mode is set again explicitly: the umask may have cut it.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                    .map_err(io_error("set the mode of", &path))?;
                return Ok(path);
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(io_error("create", &path)(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const SMALL: TmpfsOptions = TmpfsOptions {
        size_bytes: 1024 * 1024,
        mode: 0o750,
        gid: None,
    };

    /// A target under a temp dir plus a mounter whose scratch dir is beside
    /// it. Unmounts whatever is left when dropped, so a failing test does not
    /// leak mounts.
    struct Fixture {
        root: tempfile::TempDir,
        mounter: Mounter,
    }

    impl Fixture {
        fn new() -> Result<Self, io::Error> {
            let root = tempfile::tempdir()?;
            let mounter = Mounter::new(root.path().join("scratch"));
            Ok(Self { root, mounter })
        }

        fn target(&self) -> PathBuf {
            self.root.path().join("mount")
        }

        fn mounts_at_target(&self) -> Result<usize, Box<dyn std::error::Error>> {
            let canonical = fs::canonicalize(self.target())?;
            Ok(read_mountinfo()?
                .iter()
                .filter(|entry| entry.mount_point == canonical)
                .count())
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for _ in 0..MAX_STACKED_UNMOUNTS {
                if nix::mount::umount2(&self.target(), MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() -> TestResult {
        let text = b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
            42 27 0:39 / /var/lib/kubelet/pods/a\\040b/volumes/kubernetes.io~csi/tab\\011x/mount ro,nosuid,nodev,noexec,relatime shared:5 master:2 - tmpfs scopehold rw,size=1024k,mode=750\n\
            43 27 0:40 / /back\\134slash rw - tmpfs some\\040source rw\n";
        let entries = parse_mountinfo(text)?;
        assert_eq!(entries.len(), 3);

        assert_eq!(entries[0].mount_id, 36);
        assert_eq!(entries[0].parent_id, 35);
        assert_eq!(entries[0].root, PathBuf::from("/mnt1"));
        assert_eq!(entries[0].mount_point, PathBuf::from("/mnt2"));
        assert_eq!(entries[0].fs_type, "ext3");
        assert_eq!(entries[0].source, "/dev/root");
        assert_eq!(entries[0].super_options, vec!["rw", "errors=continue"]);
        assert!(!entries[0].is_read_only());

        assert_eq!(
            entries[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/a b/volumes/kubernetes.io~csi/tab\tx/mount")
        );
        assert!(entries[1].is_read_only());
        assert!(entries[1].is_scopehold_tmpfs());

        assert_eq!(entries[2].mount_point, PathBuf::from("/back\\slash"));
        assert_eq!(entries[2].source, "some source");
        assert!(!entries[2].is_scopehold_tmpfs());
        Ok(())
    }

    #[test]
    fn malformed_mountinfo_is_an_error() {
        for bad in [
            &b"36 35 98:0 /mnt1 /mnt2 rw,noatime ext3 /dev/root rw\n"[..],
            &b"x 35 98:0 / /m rw - tmpfs t rw\n"[..],
            &b"36 35 98:0 / /m rw -\n"[..],
        ] {
            assert!(
                parse_mountinfo(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn octal_unescape_handles_edge_cases() {
        assert_eq!(unescape_octal(b"a\\040b"), b"a b");
        assert_eq!(unescape_octal(b"\\012"), b"\n");
        assert_eq!(unescape_octal(b"trailing\\"), b"trailing\\");
        assert_eq!(unescape_octal(b"short\\04"), b"short\\04");
        assert_eq!(unescape_octal(b"not\\089octal"), b"not\\089octal");
        assert_eq!(
            unescape_octal(b"\\777"),
            b"\\777",
            "out of byte range stays literal"
        );
    }

    #[test]
    fn topmost_mount_is_the_one_stacked_last() -> TestResult {
        let text = b"50 1 0:1 / /m rw - tmpfs first rw\n\
            60 50 0:2 / /m rw - tmpfs second rw\n\
            70 1 0:3 / /other rw - tmpfs third rw\n";
        let entries = parse_mountinfo(text)?;
        let top = topmost_mount_at(&entries, Path::new("/m")).map(|entry| entry.source.clone());
        assert_eq!(top.as_deref(), Some("second"));
        assert!(topmost_mount_at(&entries, Path::new("/nothing")).is_none());
        Ok(())
    }

    #[test]
    fn tmpfs_mount_is_size_limited_secured_idempotent_and_unmountable() -> TestResult {
        let fixture = Fixture::new()?;
        let target = fixture.target();
        let options = TmpfsOptions {
            size_bytes: 64 * 1024,
            mode: 0o750,
            gid: Some(3456),
        };
        assert_eq!(
            fixture.mounter.mount_tmpfs(&target, &options)?,
            MountOutcome::Mounted
        );
        assert!(fixture.mounter.is_mount_point(&target)?);

        let entry = fixture.mounter.mount_at(&target)?.ok_or("no mount")?;
        assert!(entry.is_scopehold_tmpfs());
        for flag in ["nosuid", "nodev", "noexec"] {
            assert!(
                entry.mount_options.iter().any(|option| option == flag),
                "{flag}"
            );
        }
        let root = fs::metadata(&target)?;
        assert_eq!(root.mode() & 0o7777, 0o750);
        assert_eq!(root.gid(), 3456);

        // The size limit holds.
        let too_big = fs::write(target.join("big"), vec![0_u8; 128 * 1024]);
        assert!(too_big.is_err());
        let _ = fs::remove_file(target.join("big"));

        // A second mount is a no-op, never a stacked mount.
        assert_eq!(
            fixture.mounter.mount_tmpfs(&target, &options)?,
            MountOutcome::AlreadyMounted
        );
        assert_eq!(fixture.mounts_at_target()?, 1);

        assert_eq!(
            fixture.mounter.unmount(&target, UnmountMode::Normal)?,
            UnmountOutcome::Unmounted
        );
        assert!(!fixture.mounter.is_mount_point(&target)?);
        assert_eq!(
            fixture.mounter.unmount(&target, UnmountMode::Normal)?,
            UnmountOutcome::NotMounted
        );
        assert_eq!(
            fixture
                .mounter
                .unmount(&fixture.root.path().join("missing"), UnmountMode::Normal)?,
            UnmountOutcome::NotMounted
        );
        Ok(())
    }

    /// The publish sequence (probe, mount, read-only, writable view) and
    /// unpublish need no mountinfo scan when statx can answer (Linux 6.8+,
    /// as on the machines these tests run on).
    #[test]
    fn a_publish_and_unpublish_cycle_scans_no_mountinfo() -> TestResult {
        let fixture = Fixture::new()?;
        let target = fixture.target();
        let mounter = &fixture.mounter;
        let scans = mounter.mountinfo_scans();
        assert_eq!(mounter.probe(&target)?, MountState::NotMounted);
        mounter.mount_tmpfs(&target, &SMALL)?;
        mounter.set_read_only(&target, true)?;
        let view = mounter.detached_view(&target)?;
        assert_eq!(
            mounter.mount_tmpfs(&target, &SMALL)?,
            MountOutcome::AlreadyMounted
        );
        assert_eq!(mounter.probe(&target)?, MountState::Ours);
        assert_eq!(
            mounter.mountinfo_scans(),
            scans,
            "publish scanned mountinfo"
        );
        drop(view);
        assert_eq!(
            mounter.unmount(&target, UnmountMode::Normal)?,
            UnmountOutcome::Unmounted
        );
        assert_eq!(
            mounter.mountinfo_scans(),
            scans,
            "unpublish scanned mountinfo"
        );
        // The cheap answers agree with a scan.
        assert_eq!(mounter.mount_at(&target)?, None);
        Ok(())
    }

    /// A mount the mounter did not make (or no longer has) is classified by
    /// a scan, never taken for ours: one stacked on ours, one that replaced
    /// ours, and ours made by another mounter (as after a plugin restart).
    #[test]
    fn mounts_it_does_not_know_are_classified_by_a_scan() -> TestResult {
        let fixture = Fixture::new()?;
        let target = fixture.target();
        let mounter = &fixture.mounter;
        mounter.mount_tmpfs(&target, &SMALL)?;

        // Restart: a fresh mounter scans once, then knows the mount.
        let restarted = Mounter::new(fixture.root.path().join("scratch"));
        assert_eq!(restarted.probe(&target)?, MountState::Ours);
        assert_eq!(restarted.mountinfo_scans(), 1);
        assert_eq!(restarted.probe(&target)?, MountState::Ours);
        assert_eq!(restarted.mountinfo_scans(), 1);

        // Something stacked on ours.
        nix::mount::mount(
            Some("not-scopehold"),
            &target,
            Some("tmpfs"),
            SECURITY_FLAGS,
            Some("size=64k"),
        )?;
        assert!(matches!(mounter.probe(&target)?, MountState::Foreign(_)));
        assert!(matches!(
            mounter.set_read_only(&target, true),
            Err(MountError::ForeignMount { .. })
        ));
        assert!(matches!(
            mounter.unmount(&target, UnmountMode::Normal),
            Err(MountError::ForeignMount { .. })
        ));
        nix::mount::umount2(&target, MntFlags::empty())?;
        assert_eq!(mounter.probe(&target)?, MountState::Ours);

        // Ours replaced behind the mounter's back by a foreign tmpfs.
        nix::mount::umount2(&target, MntFlags::empty())?;
        assert_eq!(mounter.probe(&target)?, MountState::NotMounted);
        nix::mount::mount(
            Some("not-scopehold"),
            &target,
            Some("tmpfs"),
            SECURITY_FLAGS,
            Some("size=64k"),
        )?;
        assert!(matches!(mounter.probe(&target)?, MountState::Foreign(_)));
        assert!(matches!(
            mounter.writable_view(&target),
            Err(MountError::ForeignMount { .. })
        ));
        nix::mount::umount2(&target, MntFlags::empty())?;
        Ok(())
    }

    #[test]
    fn read_only_target_is_written_through_a_writable_view() -> TestResult {
        let fixture = Fixture::new()?;
        let target = fixture.target();
        fixture.mounter.mount_tmpfs(&target, &SMALL)?;
        fixture.mounter.set_read_only(&target, true)?;
        assert!(
            fixture
                .mounter
                .mount_at(&target)?
                .ok_or("no mount")?
                .is_read_only()
        );
        assert!(
            fs::write(target.join("direct"), b"x").is_err(),
            "target must be read-only"
        );

        let view = fixture.mounter.writable_view(&target)?;
        fs::write(view.path().join("file"), b"through the view")?;
        let view_path = view.path().to_path_buf();
        view.close()?;

        assert_eq!(fs::read(target.join("file"))?, b"through the view");
        assert!(!view_path.exists(), "view directory removed");
        assert!(
            fixture
                .mounter
                .mount_at(&target)?
                .ok_or("no mount")?
                .is_read_only(),
            "target stays read-only"
        );
        assert!(fs::write(target.join("file"), b"overwrite").is_err());

        // A dropped view cleans up too.
        let dropped_path = {
            let view = fixture.mounter.writable_view(&target)?;
            view.path().to_path_buf()
        };
        assert!(!dropped_path.exists());
        assert!(!fixture.mounter.is_mount_point(&dropped_path)?);

        fixture.mounter.set_read_only(&target, false)?;
        fs::write(target.join("direct"), b"x")?;
        fixture.mounter.unmount(&target, UnmountMode::Detach)?;
        Ok(())
    }

    #[test]
    fn a_detached_view_writes_into_the_read_only_target_and_is_reachable_by_no_path() -> TestResult
    {
        let fixture = Fixture::new()?;
        let target = fixture.target();
        fixture.mounter.mount_tmpfs(&target, &SMALL)?;
        fixture.mounter.set_read_only(&target, true)?;
        let root = fs::canonicalize(fixture.root.path())?;
        let ours = || -> Result<usize, MountError> {
            Ok(read_mountinfo()?
                .iter()
                .filter(|entry| entry.mount_point.starts_with(&root))
                .count())
        };
        assert_eq!(ours()?, 1);

        let view = fixture.mounter.detached_view(&target)?;
        // No trace in the mount table, and the scratch directory is empty.
        assert_eq!(ours()?, 1);
        assert_eq!(
            fs::read_dir(fixture.root.path().join("scratch"))?.count(),
            0
        );
        assert!(view.serves(&target));
        fs::write(view.path().join("file"), b"through the detached view")?;
        fs::create_dir(view.path().join("..dir"))?;
        assert_eq!(fs::read(target.join("file"))?, b"through the detached view");
        assert!(target.join("..dir").is_dir());
        assert!(
            fs::write(target.join("other"), b"x").is_err(),
            "target stays read-only"
        );

        // Once the target no longer shows this tmpfs, the view says so.
        fixture.mounter.unmount(&target, UnmountMode::Normal)?;
        assert!(!view.serves(&target));
        drop(view);
        Ok(())
    }

    #[test]
    fn foreign_mounts_are_neither_stacked_on_nor_removed() -> TestResult {
        let fixture = Fixture::new()?;
        let target = fixture.target();
        fs::create_dir(&target)?;
        nix::mount::mount(
            Some("not-scopehold"),
            &target,
            Some("tmpfs"),
            SECURITY_FLAGS,
            Some("size=64k"),
        )?;
        assert!(matches!(
            fixture.mounter.mount_tmpfs(&target, &SMALL),
            Err(MountError::ForeignMount { .. })
        ));
        assert!(matches!(
            fixture.mounter.unmount(&target, UnmountMode::Normal),
            Err(MountError::ForeignMount { .. })
        ));
        assert!(matches!(
            fixture.mounter.writable_view(&target),
            Err(MountError::ForeignMount { .. })
        ));
        assert_eq!(fixture.mounts_at_target()?, 1);
        nix::mount::umount2(&target, MntFlags::empty())?;
        Ok(())
    }

    #[test]
    fn symlinked_and_unmounted_targets_are_refused() -> TestResult {
        let fixture = Fixture::new()?;
        let real = fixture.root.path().join("real");
        fs::create_dir(&real)?;
        let link = fixture.root.path().join("link");
        std::os::unix::fs::symlink(&real, &link)?;
        assert!(matches!(
            fixture.mounter.mount_tmpfs(&link, &SMALL),
            Err(MountError::TargetIsSymlink { .. })
        ));
        assert!(!fixture.mounter.is_mount_point(&real)?);

        assert!(matches!(
            fixture.mounter.set_read_only(&real, true),
            Err(MountError::NotMounted { .. })
        ));
        assert!(matches!(
            fixture.mounter.writable_view(&real),
            Err(MountError::NotMounted { .. })
        ));
        Ok(())
    }

    #[test]
    fn mount_data_is_formatted_for_the_kernel() {
        let options = TmpfsOptions {
            size_bytes: 4096,
            mode: 0o750,
            gid: Some(1000),
        };
        assert_eq!(options.mount_data(), "size=4096,mode=0750,gid=1000");
        assert_eq!(
            TmpfsOptions {
                gid: None,
                ..options
            }
            .mount_data(),
            "size=4096,mode=0750"
        );
    }
}

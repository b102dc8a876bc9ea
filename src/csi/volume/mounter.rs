//! Size-limited tmpfs mounts for published volumes.
//!
//! # Read-only without a writable window
//!
//! A pod must not be able to change its credential files, so the target mount
//! is read-only, yet the node plugin must keep updating it (rotation,
//! revocation). The approach:
//!
//! 1. [`Mounter::mount_tmpfs`] creates the tmpfs detached (`fsopen` +
//!    `fsmount`) with the mount flag `MOUNT_ATTR_RDONLY`, and only then
//!    attaches it to the target directory's descriptor (`move_mount`). The
//!    flag is per mount (the superblock stays writable), and mount
//!    propagation copies it: the plugin runs in its own mount namespace with
//!    the kubelet directory shared both ways (kubelet's `Bidirectional`), so
//!    the host's copy, and the pod's bind made from it, are read-only from
//!    their first instant. (Mounting read-write and then remounting the
//!    plugin's copy read-only, as this module once did, leaves every
//!    propagated copy writable: a remount does not propagate.)
//! 2. [`Mounter::set_read_only`] changes only this namespace's copy; a
//!    volume never needs it.
//! 3. To write, [`Mounter::writable_view`] clones the target's mount from
//!    its descriptor (`open_tree`), attaches the clone in a private scratch
//!    directory and clears the read-only flag on *that* bind
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
//!    and writable, and the plugin writes through that descriptor (with
//!    `openat2` and the other `*at` calls, see [`super::dir_fd`]). Every
//!    later write then needs no mount system call and no mountinfo scan,
//!    which matters when one change touches every volume on the node.
//!
//! The scratch directory should be private to the node plugin (for example
//! `/run/scopehold/rw` inside its container), not under a shared mount such as
//! the kubelet directory, so that the short-lived binds do not propagate.
//!
//! # No path walking below the kubelet directory
//!
//! Targets are opened from a descriptor of the root (the kubelet
//! directory) with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`: a symlink anywhere on the way is refused
//! ([`MountError::TargetIsSymlink`]) before anything is created or mounted.
//! The tmpfs is attached to, probed through (`statx` of the descriptor,
//! mount id matched in mountinfo), cloned from and unmounted through
//! descriptors (the last through its parent's, so that our own descriptor
//! does not keep it busy), never through a re-resolved string.
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
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, CWD, OFlags, ResolveFlags, StatxAttributes, StatxFlags, openat2, statx};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, fsconfig_create,
    fsconfig_set_string, fsmount, fsopen, move_mount, open_tree,
};

use super::known_mounts::{KnownMounts, fd_mount_identity};

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
#[cfg(test)]
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
    #[error(
        "{} is or passes through a symbolic link; refusing to follow it below the kubelet directory",
        path.display()
    )]
    TargetIsSymlink { path: PathBuf },
    #[error("{} is not below {}", path.display(), root.display())]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("resolving {} would leave the kubelet directory", path.display())]
    Escapes { path: PathBuf },
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
    /// Every target is resolved beneath this directory (kubelet's), from a
    /// file descriptor of it, with symlinks refused at every step.
    root: PathBuf,
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
            root: PathBuf::from("/"),
            known: Arc::default(),
        }
    }

    /// Resolves targets beneath `root` (the kubelet directory) instead of
    /// `/`. `root` itself is trusted (it is configuration) and may be reached
    /// through symlinks; nothing below it is.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// Mounts a tmpfs (nodev, nosuid, noexec) at `target`, creating the
    /// directory itself (not its parents) if needed. Does nothing when our
    /// tmpfs is already mounted there; refuses any other mount.
    ///
    /// The tmpfs is made detached and read-only (`fsmount` with
    /// `MOUNT_ATTR_RDONLY`) and only then attached to the target directory's
    /// file descriptor (`move_mount`): every copy that mount propagation
    /// makes of it (the host's, through kubelet's `Bidirectional` mount, and
    /// from there the pod's) is read-only from its first instant. The plugin
    /// writes through a private writable view ([`Self::detached_view`]).
    pub fn mount_tmpfs(
        &self,
        target: &Path,
        options: &TmpfsOptions,
    ) -> Result<MountOutcome, MountError> {
        let dir = self.create_target(target)?;
        match self.probe_fd(target, &dir)? {
            MountState::Ours => return Ok(MountOutcome::AlreadyMounted),
            MountState::Foreign(existing) => return Err(foreign_mount(target, &existing)),
            MountState::NotMounted => {}
        }
        let tmpfs =
            new_read_only_tmpfs(options).map_err(rustix_error("create a tmpfs for", target))?;
        move_mount(
            &tmpfs,
            "",
            &dir,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(rustix_error("attach the tmpfs at", target))?;
        // We made it, under the caller's per-target lock: it is ours.
        if let Ok(mounted) = self.open_target(target)
            && let Some(unique_id) = fd_mount_identity(&mounted).and_then(|id| id.unique_id)
        {
            self.known.remember(target, unique_id);
        }
        Ok(MountOutcome::Mounted)
    }

    /// Sets or clears the read-only flag of this namespace's copy of our
    /// mount at `target` (the tmpfs itself stays writable; see the module
    /// comment). A volume is mounted read-only already; this is for tests
    /// and repairs.
    pub fn set_read_only(&self, target: &Path, read_only: bool) -> Result<(), MountError> {
        let dir = self.open_target(target)?;
        self.require_ours_fd(target, &dir)?;
        remount_bind(&fd_path(&dir), read_only)
    }

    /// A writable bind of our mount at `target`, in a fresh directory under the
    /// scratch directory. Close it with [`WritableView::close`].
    pub fn writable_view(&self, target: &Path) -> Result<WritableView, MountError> {
        let dir = self.open_target(target)?;
        self.require_ours_fd(target, &dir)?;

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
        // A clone of the mount taken from the target's descriptor (no path
        // is resolved again), attached in the plugin's scratch directory.
        let clone = open_tree(
            &dir,
            "",
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_EMPTY_PATH,
        )
        .map_err(rustix_error("clone the mount at", target))?;
        move_mount(
            &clone,
            "",
            CWD,
            view_dir.as_path(),
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(rustix_error("attach a writable view at", &view_dir))?;
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
        let dir = rustix::fs::open(
            view.path.as_path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(rustix_error("open", &view.path))?;
        let dev = rustix::fs::fstat(&dir)
            .map_err(rustix_error("inspect", &view.path))?
            .st_dev;
        nix::mount::umount2(&view.path, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH)
            .map_err(sys_error("detach writable view", &view.path))?;
        view.mounted = false;
        view.release()?;
        Ok(DetachedView {
            dir: Arc::new(dir),
            dev,
        })
    }

    /// Unmounts our tmpfs at `target` (every layer of ours, should any be
    /// stacked). Not mounted is success; a foreign mount is refused.
    ///
    /// The target is checked through its own descriptor, which is then
    /// closed (an open descriptor would keep the mount busy); the unmount
    /// names it from a descriptor of its parent, never following a link.
    pub fn unmount(&self, target: &Path, mode: UnmountMode) -> Result<UnmountOutcome, MountError> {
        let flags = match mode {
            UnmountMode::Normal => MntFlags::UMOUNT_NOFOLLOW,
            UnmountMode::Detach => MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH,
        };
        let Some((parent, name)) = self.open_parent(target)? else {
            return Ok(UnmountOutcome::NotMounted);
        };
        let by_parent = fd_path(&parent).join(&name);
        let mut outcome = UnmountOutcome::NotMounted;
        for _ in 0..MAX_STACKED_UNMOUNTS {
            let state = match open_beneath(&parent, Path::new(&name)) {
                Ok(dir) => self.probe_fd(target, &dir)?,
                Err(rustix::io::Errno::NOENT) => return Ok(outcome),
                Err(errno) => return Err(resolve_error(target)(errno)),
            };
            match state {
                MountState::NotMounted => return Ok(outcome),
                MountState::Foreign(existing) => return Err(foreign_mount(target, &existing)),
                MountState::Ours => {
                    nix::mount::umount2(&by_parent, flags).map_err(sys_error("unmount", target))?;
                    self.known.forget(target);
                    outcome = UnmountOutcome::Unmounted;
                }
            }
        }
        Ok(outcome)
    }

    /// A descriptor of `target`'s parent (resolved beneath the root, no
    /// symlinks) and the last component; `None` when the parent is gone.
    fn open_parent(
        &self,
        target: &Path,
    ) -> Result<Option<(OwnedFd, std::ffi::OsString)>, MountError> {
        let relative = self.relative(target)?;
        let (Some(parent), Some(name)) = (relative.parent(), relative.file_name()) else {
            return Err(MountError::OutsideRoot {
                path: target.to_path_buf(),
                root: self.root.clone(),
            });
        };
        let root = self.open_root()?;
        if parent.as_os_str().is_empty() {
            return Ok(Some((root, name.to_owned())));
        }
        match open_beneath(&root, parent) {
            Ok(dir) => Ok(Some((dir, name.to_owned()))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(errno) => Err(resolve_error(target)(errno)),
        }
    }

    /// The mount visible at exactly `path`, or `None` when `path` is not a
    /// mount point or does not exist. Always scans mountinfo;
    /// [`probe`](Self::probe) is the cheap question.
    pub fn mount_at(&self, path: &Path) -> Result<Option<MountInfoEntry>, MountError> {
        let dir = match self.open_target(path) {
            Ok(dir) => dir,
            Err(MountError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        self.scan_fd(path, &dir)
    }

    /// What is mounted at exactly `path`: as [`mount_at`](Self::mount_at)
    /// would tell, but without scanning mountinfo when `statx` shows that
    /// `path` is no mount point, or is the mount of ours last seen there.
    pub fn probe(&self, path: &Path) -> Result<MountState, MountError> {
        match self.open_target(path) {
            Ok(dir) => self.probe_fd(path, &dir),
            Err(MountError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(MountState::NotMounted)
            }
            Err(error) => Err(error),
        }
    }

    pub fn is_mount_point(&self, path: &Path) -> Result<bool, MountError> {
        Ok(self.probe(path)? != MountState::NotMounted)
    }

    /// Mountinfo scans this mounter (and its clones) made so far.
    pub fn mountinfo_scans(&self) -> u64 {
        self.known.scans()
    }

    /// The device number of what `target` shows now, if it resolves.
    pub fn device_of(&self, target: &Path) -> Option<u64> {
        let dir = self.open_target(target).ok()?;
        rustix::fs::fstat(&dir).ok().map(|stat| stat.st_dev)
    }

    /// Opens the directory `target` from a descriptor of the root,
    /// refusing symlinks (and magic links) at every step and any escape
    /// from the root. The result is an `O_PATH` descriptor: every later
    /// operation on the target goes through it, never through the string.
    pub fn open_target(&self, target: &Path) -> Result<OwnedFd, MountError> {
        let relative = self.relative(target)?;
        let root = self.open_root()?;
        open_beneath(&root, relative).map_err(resolve_error(target))
    }

    /// [`open_target`](Self::open_target), creating the last component
    /// (mode 0750) if it is missing; its parent must exist (kubelet makes it).
    fn create_target(&self, target: &Path) -> Result<OwnedFd, MountError> {
        let Some((parent_dir, name)) = self.open_parent(target)? else {
            return Err(rustix_error("open the parent of", target)(
                rustix::io::Errno::NOENT,
            ));
        };
        let name = Path::new(&name);
        match rustix::fs::mkdirat(&parent_dir, name, rustix::fs::Mode::from_raw_mode(0o750)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(error) => return Err(rustix_error("create", target)(error)),
        }
        open_beneath(&parent_dir, Path::new(name)).map_err(resolve_error(target))
    }

    /// Removes the (unmounted, empty) target directory, from a descriptor
    /// of its parent. Already gone is success; a symlink or a file there is
    /// refused and left alone.
    pub fn remove_target(&self, target: &Path) -> Result<(), MountError> {
        let Some((parent_dir, name)) = self.open_parent(target)? else {
            return Ok(());
        };
        let name = Path::new(&name);
        match rustix::fs::statat(&parent_dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(errno) => return Err(rustix_error("inspect", target)(errno)),
            Ok(stat)
                if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::Symlink =>
            {
                return Err(MountError::TargetIsSymlink {
                    path: target.to_path_buf(),
                });
            }
            Ok(stat)
                if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    != rustix::fs::FileType::Directory =>
            {
                return Err(MountError::TargetNotDirectory {
                    path: target.to_path_buf(),
                });
            }
            Ok(_) => {}
        }
        match rustix::fs::unlinkat(&parent_dir, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(errno) => Err(rustix_error("remove", target)(errno)),
        }
    }

    fn open_root(&self) -> Result<OwnedFd, MountError> {
        rustix::fs::open(
            &self.root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(rustix_error("open", &self.root))
    }

    /// `target` relative to the root; refused unless strictly below it.
    fn relative<'a>(&self, target: &'a Path) -> Result<&'a Path, MountError> {
        target
            .strip_prefix(&self.root)
            .ok()
            .filter(|relative| {
                !relative.as_os_str().is_empty()
                    && relative
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
            })
            .ok_or_else(|| MountError::OutsideRoot {
                path: target.to_path_buf(),
                root: self.root.clone(),
            })
    }

    fn probe_fd(&self, target: &Path, dir: &OwnedFd) -> Result<MountState, MountError> {
        let before = fd_mount_identity(dir);
        if let Some(identity) = before {
            if identity.is_mount_root == Some(false) {
                return Ok(MountState::NotMounted);
            }
            if let Some(unique_id) = identity.unique_id
                && self.known.is_ours(target, unique_id)
            {
                return Ok(MountState::Ours);
            }
        }
        let state = match self.scan_fd(target, dir)? {
            None => MountState::NotMounted,
            Some(entry) if entry.is_scopehold_tmpfs() => MountState::Ours,
            Some(entry) => MountState::Foreign(entry),
        };
        // The descriptor pins the mount, so the scan described this one.
        if state == MountState::Ours
            && let Some(unique_id) = before.and_then(|id| id.unique_id)
        {
            self.known.remember(target, unique_id);
        }
        Ok(state)
    }

    /// The mountinfo line of the mount `dir` is the root of, if it is one.
    fn scan_fd(&self, target: &Path, dir: &OwnedFd) -> Result<Option<MountInfoEntry>, MountError> {
        let stat = statx(
            dir,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::MNT_ID | StatxFlags::BASIC_STATS,
        )
        .map_err(rustix_error("inspect", target))?;
        // Linux 5.8+ says whether this is a mount root; without that, the
        // mount point must be where the descriptor is.
        let known_root = stat
            .stx_attributes_mask
            .contains(StatxAttributes::MOUNT_ROOT)
            .then(|| stat.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
        if known_root == Some(false) || stat.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
            return Ok(None);
        }
        self.known.count_scan();
        let entries = read_mountinfo()?;
        let Some(entry) = entries
            .iter()
            .find(|entry| u64::from(entry.mount_id) == stat.stx_mnt_id)
        else {
            return Ok(None);
        };
        if known_root.is_none()
            && fs::read_link(fd_path(dir)).ok().as_deref() != Some(entry.mount_point.as_path())
        {
            return Ok(None);
        }
        Ok(Some(entry.clone()))
    }

    fn require_ours_fd(&self, target: &Path, dir: &OwnedFd) -> Result<(), MountError> {
        match self.probe_fd(target, dir)? {
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
    dir: Arc<OwnedFd>,
    /// The tmpfs's device number, to recognise its target.
    dev: u64,
}

impl DetachedView {
    /// The descriptor of the tmpfs's root, writable: every write goes
    /// through it (see [`super::dir_fd`]). It keeps the tmpfs alive.
    pub fn dir(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.dir)
    }

    /// The tmpfs's device number: a target whose descriptor shows the
    /// same one still serves this tmpfs (see [`Mounter::device_of`]).
    pub fn dev(&self) -> u64 {
        self.dev
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

/// A new tmpfs, detached (attached nowhere yet) and read-only as a mount;
/// its superblock stays writable for the plugin's private view.
fn new_read_only_tmpfs(options: &TmpfsOptions) -> rustix::io::Result<OwnedFd> {
    let context = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&context, "source", TMPFS_SOURCE)?;
    fsconfig_set_string(&context, "size", options.size_bytes.to_string())?;
    fsconfig_set_string(&context, "mode", format!("{:04o}", options.mode))?;
    if let Some(gid) = options.gid {
        fsconfig_set_string(&context, "gid", gid.to_string())?;
    }
    fsconfig_create(&context)?;
    fsmount(
        &context,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )
}

/// Opens the directory `relative` beneath `dir`: no symlink (or magic
/// link) is followed at any step, and `..` cannot climb out.
fn open_beneath(dir: &OwnedFd, relative: &Path) -> rustix::io::Result<OwnedFd> {
    openat2(
        dir,
        relative,
        // No O_NOFOLLOW: with O_PATH it would return a final symlink
        // itself; RESOLVE_NO_SYMLINKS refuses it (ELOOP) instead.
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// `/proc/self/fd/N`: the kernel resolves it to exactly the object the
/// descriptor holds, whatever happened to the path since.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn rustix_error(op: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> MountError {
    move |errno| MountError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(errno.raw_os_error()),
    }
}

/// Errors of resolving a target: a symlink anywhere on the way, a
/// non-directory, or an escape are named as such.
fn resolve_error(path: &Path) -> impl FnOnce(rustix::io::Errno) -> MountError {
    move |errno| match errno {
        rustix::io::Errno::LOOP => MountError::TargetIsSymlink {
            path: path.to_path_buf(),
        },
        rustix::io::Errno::NOTDIR => MountError::TargetNotDirectory {
            path: path.to_path_buf(),
        },
        rustix::io::Errno::XDEV => MountError::Escapes {
            path: path.to_path_buf(),
        },
        errno => rustix_error("resolve", path)(errno),
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
    use std::io::Write;
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
        assert_eq!(fixture.mounter.device_of(&target), Some(view.dev()));
        let dir = view.dir();
        let file = super::super::dir_fd::create_file(&*dir, OsStr::new("file"), 0o644)?;
        fs::File::from(file).write_all(b"through the detached view")?;
        super::super::dir_fd::make_dir(&*dir, OsStr::new("..dir"), 0o755)?;
        assert_eq!(fs::read(target.join("file"))?, b"through the detached view");
        assert!(target.join("..dir").is_dir());
        assert!(
            fs::write(target.join("other"), b"x").is_err(),
            "target stays read-only"
        );

        // Once the target no longer shows this tmpfs, the view says so.
        fixture.mounter.unmount(&target, UnmountMode::Normal)?;
        assert_ne!(fixture.mounter.device_of(&target), Some(view.dev()));
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

/// The plugin runs in its own mount namespace with the kubelet directory
/// shared both ways (kubelet's `Bidirectional` mount propagation): what it
/// mounts there propagates to the host, where kubelet and the container
/// runtime bind it into the pod. These tests publish from a fresh mount
/// namespace and look from the test's own (the host's) namespace.
#[cfg(test)]
mod propagation_tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;

    use nix::mount::{MntFlags, MsFlags};
    use nix::sched::{CloneFlags, unshare};

    use super::{Mounter, TmpfsOptions, UnmountMode, parse_mountinfo};
    use crate::csi::volume::atomic_writer::{AtomicWriter, FileContent, Payload};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A directory bind-mounted onto itself and made shared, as kubelet's
    /// root directory is on a node; unmounted (with everything below) on drop.
    struct SharedDir {
        dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl SharedDir {
        fn new() -> Result<Self, Box<dyn std::error::Error>> {
            let dir = tempfile::tempdir()?;
            let path = fs::canonicalize(dir.path())?.join("kubelet");
            fs::create_dir(&path)?;
            nix::mount::mount(
                Some(&path),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            nix::mount::mount(
                None::<&str>,
                &path,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )?;
            Ok(Self { dir, path })
        }
    }

    impl Drop for SharedDir {
        fn drop(&mut self) {
            for _ in 0..8 {
                let _ = nix::mount::umount2(&self.path.join("mount"), MntFlags::MNT_DETACH);
            }
            let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
            let _ = self.dir.path();
        }
    }

    /// The thread of the other namespace: say when done, get its result.
    type NamespaceThread = (
        mpsc::Sender<()>,
        std::thread::JoinHandle<Result<(), String>>,
    );

    /// Runs `publish` on a thread that first moves into a new mount
    /// namespace (a copy of this one, so the shared directory stays a peer),
    /// then waits for `done` before it unmounts and ends.
    fn in_other_namespace(
        publish: impl FnOnce() -> Result<(), String> + Send + 'static,
        unpublish: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<NamespaceThread, String> {
        let (published_tx, published_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let result = unshare(CloneFlags::CLONE_NEWNS)
                .map_err(|error| format!("unshare: {error}"))
                .and_then(|()| publish());
            let failed = result.is_err();
            let _ = published_tx.send(result);
            if failed {
                return Ok(());
            }
            let _ = done_rx.recv();
            unpublish()
        });
        published_rx.recv().map_err(|error| error.to_string())??;
        Ok((done_tx, thread))
    }

    fn host_mount_at(
        path: &Path,
    ) -> Result<Option<super::MountInfoEntry>, Box<dyn std::error::Error>> {
        let entries = parse_mountinfo(&fs::read("/proc/self/mountinfo")?)?;
        Ok(super::topmost_mount_at(&entries, path).cloned())
    }

    /// The defect: the tmpfs was mounted read-write and only the plugin's
    /// own copy was then remounted read-only, so the copy that propagated to
    /// the host (and from there into the pod) stayed writable.
    #[test]
    fn a_volume_published_from_another_mount_namespace_is_read_only_on_the_host() -> TestResult {
        let kubelet = SharedDir::new()?;
        let target = kubelet.path.join("mount");
        let scratch = kubelet.dir.path().join("scratch");
        let mounter = Mounter::new(&scratch).with_root(&kubelet.path);
        let (publish_mounter, publish_target) = (mounter.clone(), target.clone());
        let (unpublish_mounter, unpublish_target) = (mounter.clone(), target.clone());
        let (done, thread) = in_other_namespace(
            move || {
                let options = TmpfsOptions {
                    size_bytes: 1024 * 1024,
                    mode: 0o755,
                    gid: None,
                };
                publish_mounter
                    .mount_tmpfs(&publish_target, &options)
                    .map_err(|error| error.to_string())?;
                publish_mounter
                    .set_read_only(&publish_target, true)
                    .map_err(|error| error.to_string())?;
                let view = publish_mounter
                    .detached_view(&publish_target)
                    .map_err(|error| error.to_string())?;
                let payload: Payload = [(
                    "api-key".to_owned(),
                    FileContent::new(b"value-1".to_vec(), 0o444),
                )]
                .into_iter()
                .collect();
                AtomicWriter::from_dir(view.dir(), &publish_target, Default::default())
                    .write(&payload, None)
                    .map_err(|error| error.to_string())?;
                Ok(())
            },
            move || {
                unpublish_mounter
                    .unmount(&unpublish_target, UnmountMode::Detach)
                    .map(|_| ())
                    .map_err(|error| error.to_string())
            },
        )?;

        // From the host's namespace: the files are there, and nothing can
        // be written, created, renamed or replaced.
        let checks = (|| -> TestResult {
            let entry = host_mount_at(&target)?.ok_or("the mount did not propagate to the host")?;
            assert!(entry.is_scopehold_tmpfs(), "{entry:?}");
            assert_eq!(fs::read(target.join("api-key"))?, b"value-1");
            assert!(
                entry.is_read_only(),
                "the host's copy of the volume is writable: {entry:?}"
            );
            assert!(fs::write(target.join("api-key"), b"tampered").is_err());
            assert!(fs::write(target.join("planted"), b"x").is_err());
            assert!(fs::create_dir(target.join("dir")).is_err());
            assert!(symlink("/etc", target.join("..data_new")).is_err());
            assert!(fs::rename(target.join("..data"), target.join("..old")).is_err());
            assert!(fs::remove_file(target.join("..data")).is_err());
            assert_eq!(fs::read(target.join("api-key"))?, b"value-1");
            Ok(())
        })();
        let _ = done.send(());
        let unpublished = thread.join().map_err(|_| "the namespace thread panicked")?;
        checks?;
        unpublished?;
        assert!(
            host_mount_at(&target)?.is_none(),
            "the unmount did not propagate"
        );
        Ok(())
    }
}

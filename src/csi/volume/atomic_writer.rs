//! Kubelet-style atomic writer for the files of one volume.
//!
//! Layout inside the volume directory (the same as kubelet's Secret volumes,
//! so tools that watch `..data` with inotify keep working):
//!
//! ```text
//! ..2026_11_26_10_00_00.8412337/   the current files, one directory per version
//! ..data -> ..2026_11_26_10_00_00.8412337
//! api-key -> ..data/api-key        one user-visible link per file
//! ```
//!
//! A new version is written into a fresh timestamped directory and published
//! by renaming a `..data_tmp` symlink over `..data`: rename is atomic, so a
//! reader opening `api-key` resolves either the whole old file or the whole
//! new one, never a mix. A reader that resolved `..data` just before the
//! swap still walks into the old directory; kubelet's writer removes that
//! directory at once, so such a reader can see `NotFound` for an instant.
//! With a shared [`Retiring`] set ([`AtomicWriter::with_retiring`]), a
//! rewrite that keeps every file (a rotation) leaves the old directory in
//! place and names it to the caller, who removes it with
//! [`AtomicWriter::retire`] after a short grace period: the user-visible
//! path then always resolves to a whole file. A rewrite that removes files
//! (a withdrawal) removes the old directory at once, so withdrawn content
//! never lingers.
//!
//! # Only descriptors, only names the writer made
//!
//! The writer holds a descriptor of the volume's root (the plugin's private
//! writable view) and does every step through descriptors with
//! [`super::dir_fd`] (`openat2` refusing symlinks, magic links, `..` and
//! mount crossings; `mkdirat`, `symlinkat`, `renameat`, `unlinkat`): no
//! path string is walked below the kubelet directory.
//!
//! What the volume holds is known from a [`VolumeLayout`] (persisted in the
//! plugin's registry), not from the directory: the current version, every
//! version directory made and not yet removed, and the user-visible links.
//! The writer never reads `..data` to find its files: it reads back the
//! registered version by name, swaps `..data` whatever stands there, and
//! removes its own versions and links by name. Every other entry of the
//! root (planted by someone with a writable copy, or left by a crash) is
//! removed by name, never followed or read. A volume written by an older
//! plugin has no layout yet: it is adopted once from `..data` (see
//! [`AtomicWriter::layout`]).
//!
//! Names starting with `..` are reserved for the writer. Files are created
//! with `O_EXCL` and read with `O_NOFOLLOW` through the version directory's
//! own descriptor.
//!
//! The writer offers no locking: the caller serialises writes per directory.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, Permissions};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::fd::OwnedFd;
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::dir_fd::{self, RemoveError};
pub use crate::api::validation::{InvalidFileName, validate_file_name};

/// Version directories of one volume that are no longer current but still
/// within their grace period; shared by every writer of that volume.
pub type Retiring = Arc<Mutex<BTreeSet<String>>>;

/// The [`VolumeLayout`] of one volume, shared by every writer of it; `None`
/// until known (adopted from the directory on first use).
pub type SharedLayout = Arc<Mutex<Option<VolumeLayout>>>;

/// The symlink that names the current version's directory.
const DATA_LINK: &str = "..data";
/// Staging name for the new `..data` link before the atomic rename.
const DATA_TMP_LINK: &str = "..data_tmp";
/// Mode of each timestamped directory: traversable by the file group and
/// others, so the file modes alone decide who can read (the mount root's mode
/// already keeps other pods' users out).
const VERSION_DIR_MODE: u32 = 0o755;
/// Only permission bits may be set: no setuid, setgid or sticky bit.
const PERMISSION_BITS: u32 = 0o777;
/// How many random directory names to try before giving up.
const UNIQUE_NAME_ATTEMPTS: u32 = 16;
/// File names longer than this are shortened in error messages.
const MAX_NAME_IN_MESSAGE: usize = 64;

/// What the writer made in a volume's directory, by name: the only entries
/// it keeps, reads or removes as its own. Persisted in the registry entry
/// of the volume; holds names only, never content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeLayout {
    /// The version directory `..data` names (none before the first write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Every version directory made and not yet removed: the current one
    /// and those within their grace period.
    #[serde(default)]
    pub versions: BTreeSet<String>,
    /// The user-visible links (`name -> ..data/name`): the current
    /// version's files.
    #[serde(default)]
    pub links: BTreeSet<String>,
}

/// One file of a payload: its content and permission bits.
///
/// `Debug` shows the length only: the content is a secret value.
#[derive(Clone, PartialEq, Eq)]
pub struct FileContent {
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl FileContent {
    pub fn new(bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            bytes: bytes.into(),
            mode,
        }
    }
}

impl fmt::Debug for FileContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileContent")
            .field("len", &self.bytes.len())
            .field("mode", &format_args!("{:#o}", self.mode))
            .finish_non_exhaustive()
    }
}

/// The complete desired content of a volume: file name → content.
pub type Payload = BTreeMap<String, FileContent>;

/// What [`AtomicWriter::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// A new version was published.
    Written,
    /// Content, modes and group already matched; nothing was rewritten
    /// (links and entries that are not as the writer left them are still
    /// repaired).
    Unchanged,
}

/// Errors of the atomic writer. Messages name paths and file names, never
/// file contents.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    #[error("invalid file name {name:?}")]
    InvalidFileName {
        name: String,
        #[source]
        reason: InvalidFileName,
    },
    #[error("invalid mode {mode:#o} for file {name:?}: only permission bits (0o777) are allowed")]
    InvalidMode { name: String, mode: u32 },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("unexpected entry {}: {what}", path.display())]
    UnexpectedEntry { path: PathBuf, what: &'static str },
    #[error("could not create a uniquely named version directory in {}", path.display())]
    NoUniqueVersionDir { path: PathBuf },
    #[error("failed to remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: RemoveError,
    },
    #[error("failed to {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(op: &'static str, path: PathBuf) -> impl FnOnce(io::Error) -> AtomicWriteError {
    move |source| AtomicWriteError::Io { op, path, source }
}

fn sys_error(op: &'static str, path: PathBuf) -> impl FnOnce(Errno) -> AtomicWriteError {
    move |errno| AtomicWriteError::Io {
        op,
        path,
        source: errno.into(),
    }
}

/// Shortens a (possibly hostile) name for an error message.
fn name_for_message(name: &str) -> String {
    if name.len() <= MAX_NAME_IN_MESSAGE {
        return name.to_owned();
    }
    let mut end = MAX_NAME_IN_MESSAGE;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// Writes payloads into one directory with kubelet's `..data` symlink swap.
#[derive(Debug, Clone)]
pub struct AtomicWriter {
    /// The volume's root.
    dir: Arc<OwnedFd>,
    /// How the root is named in messages (never opened).
    label: PathBuf,
    layout: SharedLayout,
    retiring: Option<Retiring>,
}

impl AtomicWriter {
    /// A writer for the directory `path` (a symlink as its last component
    /// is refused), with its layout adopted from the directory. For tests
    /// and tools; the node plugin uses [`from_dir`](Self::from_dir).
    pub fn open(path: &Path) -> Result<Self, AtomicWriteError> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            Errno::LOOP | Errno::NOTDIR => AtomicWriteError::NotADirectory {
                path: path.to_path_buf(),
            },
            errno => sys_error("open", path.to_path_buf())(errno),
        })?;
        Ok(Self::from_dir(Arc::new(dir), path, SharedLayout::default()))
    }

    /// A writer for the directory open as `dir` (named `label` in
    /// messages), with the volume's known layout.
    pub fn from_dir(dir: Arc<OwnedFd>, label: impl Into<PathBuf>, layout: SharedLayout) -> Self {
        Self {
            dir,
            label: label.into(),
            layout,
            retiring: None,
        }
    }

    /// Keeps a replaced version whose files all survive (see the module
    /// comment) and records it in `retiring` until [`retire`](Self::retire).
    /// Versions in `retiring` are never removed by a write.
    pub fn with_retiring(mut self, retiring: Retiring) -> Self {
        self.retiring = Some(retiring);
        self
    }

    /// How the directory is named in messages.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// What the writer made in the directory, as far as known: `None`
    /// before the first operation on a volume whose layout was not
    /// recorded (an older plugin's). Such a volume is adopted on first use:
    /// `..data`'s version, when it names a real version directory, with its
    /// files; everything else in the directory counts as foreign.
    pub fn layout(&self) -> Option<VolumeLayout> {
        self.lock_layout().clone()
    }

    /// Removes a version that [`write_graced`](Self::write_graced) left in
    /// place (unless it became current again, which a write never does).
    pub fn retire(&self, version: &str) -> Result<(), AtomicWriteError> {
        let mut guard = self.lock_layout();
        let result = match guard.as_mut() {
            Some(layout)
                if is_version_dir_name(version) && layout.current.as_deref() != Some(version) =>
            {
                let removed = self.remove(version);
                if removed.is_ok() {
                    layout.versions.remove(version);
                }
                removed
            }
            _ => Ok(()),
        };
        drop(guard);
        if let Some(retiring) = &self.retiring {
            retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(version);
        }
        result
    }

    /// The files of the current version: name → content and permission
    /// bits. Empty when nothing was written yet. Used to withdraw some files
    /// and keep the others without asking custody for them again. Reads
    /// exactly the registered files of the registered version, through
    /// that directory's descriptor; anything else there is an error (the
    /// caller then starts from an empty directory).
    pub fn read_current(&self) -> Result<Payload, AtomicWriteError> {
        let mut guard = self.lock_layout();
        let layout = self.known(&mut guard)?;
        let mut payload = Payload::new();
        let Some(version) = layout.current.clone() else {
            return Ok(payload);
        };
        let version_dir = self.open_version(&version)?;
        for name in &layout.links {
            let path = self.label.join(&version).join(name);
            let fd =
                dir_fd::open_file(&version_dir, OsStr::new(name)).map_err(|errno| match errno {
                    Errno::LOOP => AtomicWriteError::UnexpectedEntry {
                        path: path.clone(),
                        what: "a symbolic link where the writer made a file",
                    },
                    errno => sys_error("open", path.clone())(errno),
                })?;
            let mut file = File::from(fd);
            let metadata = file.metadata().map_err(io_error("inspect", path.clone()))?;
            if !metadata.is_file() {
                return Err(AtomicWriteError::UnexpectedEntry {
                    path,
                    what: "not a regular file",
                });
            }
            let mut bytes = Vec::with_capacity(metadata.len() as usize);
            file.read_to_end(&mut bytes)
                .map_err(io_error("read", path))?;
            payload.insert(
                name.clone(),
                FileContent::new(bytes, metadata.mode() & PERMISSION_BITS),
            );
        }
        Ok(payload)
    }

    /// Makes the directory hold exactly `payload`: files with the given modes,
    /// owned by group `group` (the process's effective group when `None`).
    /// Files not in the payload disappear; an empty payload withdraws
    /// everything. Invalid names or modes are refused before anything is
    /// touched.
    pub fn write(
        &self,
        payload: &Payload,
        group: Option<u32>,
    ) -> Result<WriteOutcome, AtomicWriteError> {
        let (outcome, kept) = self.write_graced(payload, group)?;
        if let Some(version) = kept {
            self.retire(&version)?;
        }
        Ok(outcome)
    }

    /// [`write`](Self::write), except that with a [`Retiring`] set a replaced
    /// version whose files all survive is left in place and returned: the
    /// caller retires it after a grace period.
    pub fn write_graced(
        &self,
        payload: &Payload,
        group: Option<u32>,
    ) -> Result<(WriteOutcome, Option<String>), AtomicWriteError> {
        validate_payload(payload)?;
        let group = group.unwrap_or_else(|| nix::unistd::getegid().as_raw());
        let mut spared = self.retiring_snapshot();

        let mut guard = self.lock_layout();
        let layout = self.known(&mut guard)?;
        let replaced = layout.current.clone();
        let unchanged = match &replaced {
            Some(version) => {
                self.data_link_names(version)? && self.version_matches(version, payload, group)?
            }
            None => false,
        };

        // A replaced version is kept for a grace period only when every file
        // it holds survives: then a reader racing the swap must still find
        // its file. Files that leave must leave at once.
        let keep_replaced = self.retiring.is_some()
            && !unchanged
            && replaced.is_some()
            && !layout.links.is_empty()
            && layout.links.iter().all(|name| payload.contains_key(name));
        let outcome = if unchanged {
            WriteOutcome::Unchanged
        } else {
            let version = self.create_version_dir(layout)?;
            let published = self
                .fill_version_dir(&version, payload, group)
                .and_then(|()| self.switch_data_link(&version));
            if let Err(error) = published {
                // Leave no half-written version behind; the old one stays live.
                if self.remove(&version).is_ok() {
                    layout.versions.remove(&version);
                }
                return Err(error);
            }
            layout.current = Some(version);
            WriteOutcome::Written
        };

        self.sync_user_visible_links(layout, payload)?;
        let kept = match (&self.retiring, replaced) {
            (Some(retiring), Some(version))
                if keep_replaced && outcome == WriteOutcome::Written =>
            {
                retiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(version.clone());
                spared.insert(version.clone());
                Some(version)
            }
            _ => None,
        };
        self.remove_replaced_versions(layout, &spared)?;
        self.remove_foreign_entries(layout)?;
        dir_fd::sync(&*self.dir).map_err(sys_error("flush directory", self.label.clone()))?;
        Ok((outcome, kept))
    }

    /// Removes everything in the volume's directory, whatever it is and
    /// whoever made it, without following a single link: each entry is
    /// removed by name from the root's descriptor, a directory level by
    /// level through descriptors. The known state after a tampered
    /// directory: empty. The directory itself stays.
    pub fn wipe(&self) -> Result<(), AtomicWriteError> {
        let mut guard = self.lock_layout();
        let entries = dir_fd::list(&*self.dir).map_err(sys_error("list", self.label.clone()))?;
        for entry in entries {
            dir_fd::remove_entry(&*self.dir, &entry.name).map_err(|source| {
                AtomicWriteError::Remove {
                    path: self.label.join(&entry.name),
                    source,
                }
            })?;
        }
        *guard = Some(VolumeLayout::default());
        drop(guard);
        if let Some(retiring) = &self.retiring {
            retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        Ok(())
    }

    fn lock_layout(&self) -> MutexGuard<'_, Option<VolumeLayout>> {
        self.layout.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retiring_snapshot(&self) -> BTreeSet<String> {
        self.retiring
            .as_ref()
            .map(|retiring| {
                retiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default()
    }

    /// The layout, adopted from the directory when not known yet.
    fn known<'a>(
        &self,
        layout: &'a mut Option<VolumeLayout>,
    ) -> Result<&'a mut VolumeLayout, AtomicWriteError> {
        if layout.is_none() {
            *layout = Some(self.adopt()?);
        }
        Ok(layout.get_or_insert_with(VolumeLayout::default))
    }

    /// The layout an older writer left: `..data`'s target when it names a
    /// version directory (a real one, opened without following links), and
    /// the regular files in it. Nothing is read but names.
    fn adopt(&self) -> Result<VolumeLayout, AtomicWriteError> {
        let mut layout = VolumeLayout::default();
        let data_link = self.label.join(DATA_LINK);
        let current = match dir_fd::read_link(&*self.dir, OsStr::new(DATA_LINK)) {
            Ok(Some(target)) => target
                .into_string()
                .ok()
                .filter(|name| is_version_dir_name(name)),
            Ok(None) | Err(Errno::INVAL) => None,
            Err(errno) => return Err(sys_error("read link", data_link)(errno)),
        };
        let Some(version) = current else {
            return Ok(layout);
        };
        let version_dir = match dir_fd::open_dir(&*self.dir, OsStr::new(&version)) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => return Ok(layout),
            Err(errno) => return Err(sys_error("open", self.label.join(&version))(errno)),
        };
        let entries =
            dir_fd::list(&version_dir).map_err(sys_error("list", self.label.join(&version)))?;
        layout.links = entries
            .into_iter()
            .filter(|entry| entry.file_type == FileType::RegularFile)
            .filter_map(|entry| entry.name.into_string().ok())
            .filter(|name| validate_file_name(name).is_ok())
            .collect();
        layout.versions.insert(version.clone());
        layout.current = Some(version);
        Ok(layout)
    }

    /// Removes `name` from the root, by name (see [`dir_fd::remove_entry`]).
    fn remove(&self, name: &str) -> Result<(), AtomicWriteError> {
        dir_fd::remove_entry(&*self.dir, OsStr::new(name)).map_err(|source| {
            AtomicWriteError::Remove {
                path: self.label.join(name),
                source,
            }
        })
    }

    fn open_version(&self, version: &str) -> Result<OwnedFd, AtomicWriteError> {
        let path = self.label.join(version);
        dir_fd::open_dir(&*self.dir, OsStr::new(version)).map_err(|errno| match errno {
            Errno::LOOP | Errno::NOTDIR => AtomicWriteError::UnexpectedEntry {
                path,
                what: "version entry is not a directory",
            },
            errno => sys_error("open", path)(errno),
        })
    }

    /// True when `..data` is the symlink to `version`.
    fn data_link_names(&self, version: &str) -> Result<bool, AtomicWriteError> {
        match dir_fd::read_link(&*self.dir, OsStr::new(DATA_LINK)) {
            Ok(target) => Ok(target.as_deref() == Some(OsStr::new(version))),
            Err(Errno::INVAL) => Ok(false),
            Err(errno) => Err(sys_error("read link", self.label.join(DATA_LINK))(errno)),
        }
    }

    /// True when the version directory holds exactly the payload's files with
    /// the same bytes, modes and group. Anything unexpected (a link, a
    /// missing entry) is simply "no": the write then starts a new version.
    fn version_matches(
        &self,
        version: &str,
        payload: &Payload,
        group: u32,
    ) -> Result<bool, AtomicWriteError> {
        let version_path = self.label.join(version);
        let version_dir = match dir_fd::open_dir(&*self.dir, OsStr::new(version)) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => return Ok(false),
            Err(errno) => return Err(sys_error("open", version_path)(errno)),
        };
        let stat =
            rustix::fs::fstat(&version_dir).map_err(sys_error("inspect", version_path.clone()))?;
        if stat.st_gid != group || stat.st_mode & 0o7777 != VERSION_DIR_MODE {
            return Ok(false);
        }
        let names_on_disk: BTreeSet<OsString> = dir_fd::list(&version_dir)
            .map_err(sys_error("list", version_path.clone()))?
            .into_iter()
            .map(|entry| entry.name)
            .collect();
        if names_on_disk.len() != payload.len()
            || !payload
                .keys()
                .all(|name| names_on_disk.contains(OsStr::new(name)))
        {
            return Ok(false);
        }

        for (name, wanted) in payload {
            let path = version_path.join(name);
            let mut file = match dir_fd::open_file(&version_dir, OsStr::new(name)) {
                Ok(fd) => File::from(fd),
                // A symlink (ELOOP) or a vanished file: not what we wrote.
                Err(_) => return Ok(false),
            };
            let metadata = file.metadata().map_err(io_error("inspect", path.clone()))?;
            if !metadata.is_file()
                || metadata.mode() & 0o7777 != wanted.mode
                || metadata.gid() != group
                || metadata.len() != wanted.bytes.len() as u64
            {
                return Ok(false);
            }
            let mut on_disk = Vec::with_capacity(wanted.bytes.len());
            file.read_to_end(&mut on_disk)
                .map_err(io_error("read", path))?;
            if on_disk != wanted.bytes {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Creates a fresh, empty `..YYYY_MM_DD_HH_MM_SS.<random>` directory
    /// (owner-only until filled) and records it in `layout` at once, so
    /// that it is removed by name even if what follows fails.
    fn create_version_dir(&self, layout: &mut VolumeLayout) -> Result<String, AtomicWriteError> {
        let stamp = jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S");
        for _ in 0..UNIQUE_NAME_ATTEMPTS {
            let name = format!("..{stamp}.{}", random_suffix());
            match dir_fd::make_dir(&*self.dir, OsStr::new(&name), 0o700) {
                Ok(()) => {
                    layout.versions.insert(name.clone());
                    return Ok(name);
                }
                Err(Errno::EXIST) => continue,
                Err(errno) => return Err(sys_error("create", self.label.join(&name))(errno)),
            }
        }
        Err(AtomicWriteError::NoUniqueVersionDir {
            path: self.label.clone(),
        })
    }

    /// Writes every file into the new version through the version
    /// directory's descriptor, then gives the directory its group and mode
    /// 0755 (explicitly, whatever the umask) and flushes it.
    fn fill_version_dir(
        &self,
        version: &str,
        payload: &Payload,
        group: u32,
    ) -> Result<(), AtomicWriteError> {
        let version_path = self.label.join(version);
        let version_dir = self.open_version(version)?;
        for (name, content) in payload {
            write_file(&version_dir, &version_path, name, content, group)?;
        }
        std::os::unix::fs::fchown(&version_dir, None, Some(group))
            .map_err(io_error("set the group of", version_path.clone()))?;
        rustix::fs::fchmod(&version_dir, Mode::from_raw_mode(VERSION_DIR_MODE))
            .map_err(sys_error("set the mode of", version_path.clone()))?;
        dir_fd::sync(&version_dir).map_err(sys_error("flush directory", version_path))
    }

    /// Points `..data` at `version` with one atomic rename, whatever
    /// `..data` was (a planted directory there is removed first).
    fn switch_data_link(&self, version: &str) -> Result<(), AtomicWriteError> {
        let tmp = OsStr::new(DATA_TMP_LINK);
        let data = OsStr::new(DATA_LINK);
        self.remove(DATA_TMP_LINK)?;
        dir_fd::make_link(OsStr::new(version), &*self.dir, tmp)
            .map_err(sys_error("create link", self.label.join(DATA_TMP_LINK)))?;
        let renamed = match dir_fd::rename(&*self.dir, tmp, data) {
            // A link cannot replace a directory.
            Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => {
                self.remove(DATA_LINK).and_then(|()| {
                    dir_fd::rename(&*self.dir, tmp, data)
                        .map_err(sys_error("rename link to", self.label.join(DATA_LINK)))
                })
            }
            other => other.map_err(sys_error("rename link to", self.label.join(DATA_LINK))),
        };
        if renamed.is_err() {
            let _ = self.remove(DATA_TMP_LINK);
        }
        renamed
    }

    /// Ensures `name -> ..data/name` for every payload file, replacing
    /// whatever else stands at that name, and removes the links of files
    /// that left, by name.
    fn sync_user_visible_links(
        &self,
        layout: &mut VolumeLayout,
        payload: &Payload,
    ) -> Result<(), AtomicWriteError> {
        let leaving: Vec<String> = layout
            .links
            .iter()
            .filter(|name| !payload.contains_key(*name))
            .cloned()
            .collect();
        for name in leaving {
            self.remove(&name)?;
            layout.links.remove(&name);
        }
        for name in payload.keys() {
            let wanted = user_visible_link_target(name);
            match dir_fd::read_link(&*self.dir, OsStr::new(name)) {
                Ok(Some(target)) if target == wanted => {
                    layout.links.insert(name.clone());
                    continue;
                }
                Ok(None) => {}
                // Another link or not a link at all: not ours any more.
                Ok(Some(_)) | Err(Errno::INVAL) => self.remove(name)?,
                Err(errno) => return Err(sys_error("read link", self.label.join(name))(errno)),
            }
            dir_fd::make_link(&wanted, &*self.dir, OsStr::new(name))
                .map_err(sys_error("create link", self.label.join(name)))?;
            layout.links.insert(name.clone());
        }
        Ok(())
    }

    /// Removes, by name, every version directory of the layout that is
    /// neither current nor within its grace period.
    fn remove_replaced_versions(
        &self,
        layout: &mut VolumeLayout,
        spared: &BTreeSet<String>,
    ) -> Result<(), AtomicWriteError> {
        let replaced: Vec<String> = layout
            .versions
            .iter()
            .filter(|name| layout.current.as_ref() != Some(*name) && !spared.contains(*name))
            .cloned()
            .collect();
        for name in replaced {
            self.remove(&name)?;
            layout.versions.remove(&name);
        }
        Ok(())
    }

    /// Removes every root entry the layout does not name (planted, moved
    /// there, or left by an interrupted write), without following it.
    fn remove_foreign_entries(&self, layout: &VolumeLayout) -> Result<(), AtomicWriteError> {
        let entries = dir_fd::list(&*self.dir).map_err(sys_error("list", self.label.clone()))?;
        for entry in entries {
            let ours = entry.name.to_str().is_some_and(|name| {
                name == DATA_LINK || layout.versions.contains(name) || layout.links.contains(name)
            });
            if !ours {
                dir_fd::remove_entry(&*self.dir, &entry.name).map_err(|source| {
                    AtomicWriteError::Remove {
                        path: self.label.join(&entry.name),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }
}

fn validate_payload(payload: &Payload) -> Result<(), AtomicWriteError> {
    for (name, content) in payload {
        validate_file_name(name).map_err(|reason| AtomicWriteError::InvalidFileName {
            name: name_for_message(name),
            reason,
        })?;
        if content.mode & !PERMISSION_BITS != 0 {
            return Err(AtomicWriteError::InvalidMode {
                name: name_for_message(name),
                mode: content.mode,
            });
        }
    }
    Ok(())
}

/// Creates `name` in the version directory (it must not exist), writes the
/// content, sets group and mode explicitly (umask-proof) and flushes it.
fn write_file(
    version_dir: &OwnedFd,
    version_path: &Path,
    name: &str,
    content: &FileContent,
    group: u32,
) -> Result<(), AtomicWriteError> {
    let path = version_path.join(name);
    // O_EXCL never opens anything planted at the name; the file starts
    // owner-only until its final mode is applied.
    let fd = dir_fd::create_file(version_dir, OsStr::new(name), 0o600)
        .map_err(sys_error("create", path.clone()))?;
    let mut file = File::from(fd);
    file.write_all(&content.bytes)
        .map_err(io_error("write", path.clone()))?;
    // chown before chmod: a chown may clear mode bits.
    std::os::unix::fs::fchown(&file, None, Some(group))
        .map_err(io_error("set the group of", path.clone()))?;
    file.set_permissions(Permissions::from_mode(content.mode))
        .map_err(io_error("set the mode of", path.clone()))?;
    file.sync_all().map_err(io_error("flush", path))
}

fn user_visible_link_target(name: &str) -> OsString {
    let mut target = OsString::from(DATA_LINK);
    target.push("/");
    target.push(name);
    target
}

/// True for names of the form `..YYYY_MM_DD_HH_MM_SS.<digits>`.
fn is_version_dir_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("..") else {
        return false;
    };
    let Some((stamp, suffix)) = rest.split_once('.') else {
        return false;
    };
    let stamp_shape_ok = stamp.len() == "YYYY_MM_DD_HH_MM_SS".len()
        && stamp.bytes().enumerate().all(|(index, byte)| match index {
            4 | 7 | 10 | 13 | 16 => byte == b'_',
            _ => byte.is_ascii_digit(),
        });
    stamp_shape_ok && !suffix.is_empty() && suffix.bytes().all(|byte| byte.is_ascii_digit())
}

/// A decimal suffix for a version directory. It only needs to make collisions
/// unlikely (creation retries on a collision), so the std hasher's per-process
/// random keys, mixed with the time and a counter, are enough.
fn random_suffix() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_i128(jiff::Timestamp::now().as_nanosecond());
    hasher.finish() % 1_000_000_000
}

#[cfg(test)]
#[path = "atomic_writer_tests.rs"]
mod tests;

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
//! Names starting with `..` are reserved for the writer. The writer never
//! follows a symlink out of its directory: `..data` must point at one of its
//! own timestamped directories, files are created with `O_EXCL` and read with
//! `O_NOFOLLOW`, and only symlinks it made itself are removed.
//!
//! The writer offers no locking: the caller serialises writes per directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::api::validation::is_reserved_name;
pub use crate::api::validation::{InvalidFileName, validate_file_name};

/// Version directories of one volume that are no longer current but still
/// within their grace period; shared by every writer of that volume.
pub type Retiring = Arc<Mutex<BTreeSet<String>>>;

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
    /// Content, modes and group already matched; nothing was rewritten (missing
    /// user-visible links are still repaired).
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
    #[error("failed to {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AtomicWriteError {
    move |source| AtomicWriteError::Io {
        op,
        path: path.to_path_buf(),
        source,
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
    dir: PathBuf,
    retiring: Option<Retiring>,
}

impl AtomicWriter {
    /// A writer for `dir`, which must exist when [`write`](Self::write) runs.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
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

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes a version that [`write_graced`](Self::write_graced) left in
    /// place (unless it became current again, which a write never does).
    pub fn retire(&self, version: &str) -> Result<(), AtomicWriteError> {
        let result = if is_version_dir_name(version)
            && self.current_version_dir()?.as_deref() != Some(version)
        {
            match fs::remove_dir_all(self.dir.join(version)) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    Err(io_error("remove", &self.dir.join(version))(error))
                }
                _ => Ok(()),
            }
        } else {
            Ok(())
        };
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
    /// and keep the others without asking custody for them again.
    pub fn read_current(&self) -> Result<Payload, AtomicWriteError> {
        let mut payload = Payload::new();
        let Some(version) = self.current_version_dir()? else {
            return Ok(payload);
        };
        let version_path = self.dir.join(version);
        for entry in fs::read_dir(&version_path).map_err(io_error("list", &version_path))? {
            let entry = entry.map_err(io_error("list", &version_path))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_file_name(&name).is_err() {
                continue;
            }
            let path = entry.path();
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_error("open", &path))?;
            let metadata = file.metadata().map_err(io_error("inspect", &path))?;
            if !metadata.is_file() {
                continue;
            }
            let mut bytes = Vec::with_capacity(metadata.len() as usize);
            file.read_to_end(&mut bytes)
                .map_err(io_error("read", &path))?;
            payload.insert(
                name,
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

        let dir_metadata =
            fs::symlink_metadata(&self.dir).map_err(io_error("inspect", &self.dir))?;
        if !dir_metadata.is_dir() {
            return Err(AtomicWriteError::NotADirectory {
                path: self.dir.clone(),
            });
        }

        let current_version = self.current_version_dir()?;
        let unchanged = match &current_version {
            Some(version) => self.version_matches(version, payload, group)?,
            None => false,
        };

        // A replaced version is kept for a grace period only when every file
        // it holds survives: then a reader racing the swap must still find
        // its file. Files that leave must leave at once.
        let keep_replaced = match (&self.retiring, &current_version, unchanged) {
            (Some(_), Some(version), false) => {
                let names = self.version_names(version)?;
                !names.is_empty() && names.iter().all(|name| payload.contains_key(name))
            }
            _ => false,
        };
        let outcome = if unchanged {
            WriteOutcome::Unchanged
        } else {
            let new_version = self.create_version_dir(group)?;
            if let Err(error) = self.fill_version_dir(&new_version, payload, group) {
                // Leave no half-written version behind; the old one stays live.
                let _ = fs::remove_dir_all(self.dir.join(&new_version));
                return Err(error);
            }
            if let Err(error) = self.switch_data_link(&new_version) {
                let _ = fs::remove_dir_all(self.dir.join(&new_version));
                return Err(error);
            }
            WriteOutcome::Written
        };

        self.sync_user_visible_links(payload)?;
        let kept = match (&self.retiring, current_version) {
            (Some(retiring), Some(version))
                if keep_replaced && outcome == WriteOutcome::Written =>
            {
                retiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(version.clone());
                Some(version)
            }
            _ => None,
        };
        self.remove_stale_versions()?;
        sync_dir(&self.dir)?;
        Ok((outcome, kept))
    }

    /// The file names in a version directory.
    /// Removes everything in the volume's directory, whatever it is and
    /// whoever made it, without following a single link: each entry is
    /// removed by name (a directory with `remove_dir_all`, which opens each
    /// level with `O_NOFOLLOW` and removes by name too). The known state
    /// after a tampered directory: empty. The directory itself stays.
    pub fn wipe(&self) -> Result<(), AtomicWriteError> {
        for entry in fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(io_error("inspect", &path))?;
            if file_type.is_dir() {
                fs::remove_dir_all(&path).map_err(io_error("remove", &path))?;
            } else {
                fs::remove_file(&path).map_err(io_error("remove", &path))?;
            }
        }
        if let Some(retiring) = &self.retiring {
            retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        Ok(())
    }

    fn version_names(&self, version: &str) -> Result<BTreeSet<String>, AtomicWriteError> {
        let version_path = self.dir.join(version);
        let mut names = BTreeSet::new();
        for entry in fs::read_dir(&version_path).map_err(io_error("list", &version_path))? {
            let entry = entry.map_err(io_error("list", &version_path))?;
            if let Some(name) = entry.file_name().to_str() {
                names.insert(name.to_owned());
            }
        }
        Ok(names)
    }

    /// The name of the version directory `..data` points to, if any. Refuses a
    /// `..data` that is not a symlink to one of our version directories.
    fn current_version_dir(&self) -> Result<Option<String>, AtomicWriteError> {
        let data_link = self.dir.join(DATA_LINK);
        let link_target = match fs::read_link(&data_link) {
            Ok(target) => target,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) if error.raw_os_error() == Some(nix::libc::EINVAL) => {
                return Err(AtomicWriteError::UnexpectedEntry {
                    path: data_link,
                    what: "not a symbolic link",
                });
            }
            Err(error) => return Err(io_error("read link", &data_link)(error)),
        };
        let version = link_target
            .to_str()
            .filter(|name| is_version_dir_name(name))
            .ok_or_else(|| AtomicWriteError::UnexpectedEntry {
                path: data_link.clone(),
                what: "does not point to a version directory of this writer",
            })?;
        let version_path = self.dir.join(version);
        match fs::symlink_metadata(&version_path) {
            Ok(metadata) if metadata.is_dir() => Ok(Some(version.to_owned())),
            Ok(_) => Err(AtomicWriteError::UnexpectedEntry {
                path: version_path,
                what: "version entry is not a directory",
            }),
            // A dangling `..data` (for example after a crash between removing
            // and switching, which our order never does, or tampering): treat
            // as no current version so the next write repairs it.
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("inspect", &version_path)(error)),
        }
    }

    /// True when the version directory holds exactly the payload's files with
    /// the same bytes, modes and group.
    fn version_matches(
        &self,
        version: &str,
        payload: &Payload,
        group: u32,
    ) -> Result<bool, AtomicWriteError> {
        let version_path = self.dir.join(version);
        let dir_metadata =
            fs::symlink_metadata(&version_path).map_err(io_error("inspect", &version_path))?;
        if dir_metadata.gid() != group || dir_metadata.mode() & 0o7777 != VERSION_DIR_MODE {
            return Ok(false);
        }

        let mut names_on_disk = BTreeSet::new();
        for entry in fs::read_dir(&version_path).map_err(io_error("list", &version_path))? {
            let entry = entry.map_err(io_error("list", &version_path))?;
            names_on_disk.insert(entry.file_name());
        }
        if names_on_disk.len() != payload.len()
            || !payload
                .keys()
                .all(|name| names_on_disk.contains(std::ffi::OsStr::new(name)))
        {
            return Ok(false);
        }

        for (name, wanted) in payload {
            let path = version_path.join(name);
            let mut file = match OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(file) => file,
                // A symlink (ELOOP) or a vanished file: not what we wrote.
                Err(_) => return Ok(false),
            };
            let metadata = file.metadata().map_err(io_error("inspect", &path))?;
            if !metadata.is_file()
                || metadata.mode() & 0o7777 != wanted.mode
                || metadata.gid() != group
                || metadata.len() != wanted.bytes.len() as u64
            {
                return Ok(false);
            }
            let mut on_disk = Vec::with_capacity(wanted.bytes.len());
            file.read_to_end(&mut on_disk)
                .map_err(io_error("read", &path))?;
            if on_disk != wanted.bytes {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Creates a fresh, empty `..YYYY_MM_DD_HH_MM_SS.<random>` directory with
    /// mode 0755 (set explicitly, whatever the umask) and the given group.
    fn create_version_dir(&self, group: u32) -> Result<String, AtomicWriteError> {
        let stamp = jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S");
        for _ in 0..UNIQUE_NAME_ATTEMPTS {
            let name = format!("..{stamp}.{}", random_suffix());
            let path = self.dir.join(&name);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    std::os::unix::fs::lchown(&path, None, Some(group))
                        .map_err(io_error("set the group of", &path))?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(VERSION_DIR_MODE))
                        .map_err(io_error("set the mode of", &path))?;
                    return Ok(name);
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(io_error("create", &path)(error)),
            }
        }
        Err(AtomicWriteError::NoUniqueVersionDir {
            path: self.dir.clone(),
        })
    }

    fn fill_version_dir(
        &self,
        version: &str,
        payload: &Payload,
        group: u32,
    ) -> Result<(), AtomicWriteError> {
        let version_path = self.dir.join(version);
        for (name, content) in payload {
            write_file(&version_path.join(name), content, group)?;
        }
        sync_dir(&version_path)
    }

    /// Points `..data` at `version` with one atomic rename.
    fn switch_data_link(&self, version: &str) -> Result<(), AtomicWriteError> {
        let tmp_link = self.dir.join(DATA_TMP_LINK);
        match fs::symlink_metadata(&tmp_link) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                fs::remove_file(&tmp_link).map_err(io_error("remove stale", &tmp_link))?;
            }
            Ok(_) => {
                return Err(AtomicWriteError::UnexpectedEntry {
                    path: tmp_link,
                    what: "not a symbolic link",
                });
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("inspect", &tmp_link)(error)),
        }
        symlink(version, &tmp_link).map_err(io_error("create link", &tmp_link))?;
        let data_link = self.dir.join(DATA_LINK);
        if let Err(error) = fs::rename(&tmp_link, &data_link) {
            let _ = fs::remove_file(&tmp_link);
            return Err(io_error("rename link to", &data_link)(error));
        }
        Ok(())
    }

    /// Ensures `name -> ..data/name` exists for every payload file and removes
    /// our links for names no longer in the payload. Entries we did not create
    /// are left alone, except that one blocking a payload name is an error.
    fn sync_user_visible_links(&self, payload: &Payload) -> Result<(), AtomicWriteError> {
        let mut linked = BTreeSet::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if is_reserved_name(&name) {
                continue;
            }
            let path = entry.path();
            let file_type = entry.file_type().map_err(io_error("inspect", &path))?;
            let ours = file_type.is_symlink()
                && fs::read_link(&path).map_err(io_error("read link", &path))?
                    == user_visible_link_target(&name);
            match (ours, payload.contains_key(&name)) {
                (true, true) => {
                    linked.insert(name);
                }
                (true, false) => {
                    fs::remove_file(&path).map_err(io_error("remove link", &path))?;
                }
                (false, true) if file_type.is_symlink() => {
                    // A link with the wrong target: replace it.
                    fs::remove_file(&path).map_err(io_error("remove link", &path))?;
                }
                (false, true) => {
                    return Err(AtomicWriteError::UnexpectedEntry {
                        path,
                        what: "blocks a user-visible link",
                    });
                }
                (false, false) => {}
            }
        }
        for name in payload.keys().filter(|name| !linked.contains(*name)) {
            let path = self.dir.join(name);
            symlink(user_visible_link_target(name), &path)
                .map_err(io_error("create link", &path))?;
        }
        Ok(())
    }

    /// Removes every version directory `..data` does not point to (the
    /// previous version, and leftovers of an interrupted write), except
    /// those still within their grace period.
    fn remove_stale_versions(&self) -> Result<(), AtomicWriteError> {
        let current = self.current_version_dir()?;
        let spared: BTreeSet<String> = self
            .retiring
            .as_ref()
            .map(|retiring| {
                retiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default();
        for entry in fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            if !is_version_dir_name(name)
                || current.as_deref() == Some(name)
                || spared.contains(name)
            {
                continue;
            }
            let path = entry.path();
            let file_type = entry.file_type().map_err(io_error("inspect", &path))?;
            if file_type.is_dir() {
                // remove_dir_all does not follow symlinks inside the tree.
                fs::remove_dir_all(&path).map_err(io_error("remove", &path))?;
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

/// Creates `path` (which must not exist), writes the content, sets group and
/// mode explicitly (umask-proof) and flushes it to storage.
fn write_file(path: &Path, content: &FileContent, group: u32) -> Result<(), AtomicWriteError> {
    // create_new (O_EXCL) never follows a symlink planted at `path`; the file
    // starts owner-only until its final mode is applied.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    file.write_all(&content.bytes)
        .map_err(io_error("write", path))?;
    // chown before chmod: a chown may clear mode bits.
    std::os::unix::fs::fchown(&file, None, Some(group))
        .map_err(io_error("set the group of", path))?;
    file.set_permissions(fs::Permissions::from_mode(content.mode))
        .map_err(io_error("set the mode of", path))?;
    file.sync_all().map_err(io_error("flush", path))
}

fn sync_dir(path: &Path) -> Result<(), AtomicWriteError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error("flush directory", path))
}

fn user_visible_link_target(name: &str) -> PathBuf {
    Path::new(DATA_LINK).join(name)
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
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn payload(entries: &[(&str, &[u8], u32)]) -> Payload {
        entries
            .iter()
            .map(|(name, bytes, mode)| ((*name).to_owned(), FileContent::new(*bytes, *mode)))
            .collect()
    }

    /// Top-level names in `dir`, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn version_dirs(dir: &Path) -> Vec<String> {
        entries(dir)
            .into_iter()
            .filter(|name| is_version_dir_name(name))
            .collect()
    }

    fn user_visible(dir: &Path) -> Vec<String> {
        entries(dir)
            .into_iter()
            .filter(|name| !is_reserved_name(name))
            .collect()
    }

    #[test]
    fn first_write_creates_the_kubelet_layout() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        let outcome = writer.write(
            &payload(&[("api-key", b"value-1", 0o440), ("url", b"https://x", 0o444)]),
            None,
        )?;
        assert_eq!(outcome, WriteOutcome::Written);
        assert_eq!(fs::read(dir.path().join("api-key"))?, b"value-1");
        assert_eq!(fs::read(dir.path().join("url"))?, b"https://x");
        assert_eq!(
            fs::read_link(dir.path().join("api-key"))?,
            PathBuf::from("..data/api-key")
        );
        let versions = version_dirs(dir.path());
        assert_eq!(versions.len(), 1);
        assert_eq!(
            fs::read_link(dir.path().join("..data"))?,
            PathBuf::from(&versions[0])
        );
        assert_eq!(
            entries(dir.path()),
            vec![
                versions[0].clone(),
                "..data".to_owned(),
                "api-key".to_owned(),
                "url".to_owned()
            ]
        );
        Ok(())
    }

    #[test]
    fn rewrite_with_changed_content_switches_version_and_removes_old() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(&payload(&[("api-key", b"old", 0o440)]), None)?;
        let old_versions = version_dirs(dir.path());

        let outcome = writer.write(&payload(&[("api-key", b"new", 0o440)]), None)?;
        assert_eq!(outcome, WriteOutcome::Written);
        assert_eq!(fs::read(dir.path().join("api-key"))?, b"new");
        let new_versions = version_dirs(dir.path());
        assert_eq!(new_versions.len(), 1, "old version removed");
        assert_ne!(new_versions, old_versions);
        Ok(())
    }

    #[test]
    fn identical_payload_is_not_rewritten() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        let files = payload(&[("api-key", b"same", 0o440)]);
        writer.write(&files, Some(4321))?;
        let before = version_dirs(dir.path());

        assert_eq!(writer.write(&files, Some(4321))?, WriteOutcome::Unchanged);
        assert_eq!(version_dirs(dir.path()), before);

        // A mode change, a group change or a content change each rewrite.
        assert_eq!(
            writer.write(&payload(&[("api-key", b"same", 0o400)]), Some(4321))?,
            WriteOutcome::Written
        );
        assert_eq!(
            writer.write(&payload(&[("api-key", b"same", 0o400)]), Some(4322))?,
            WriteOutcome::Written
        );
        assert_eq!(
            writer.write(&payload(&[("api-key", b"diff", 0o400)]), Some(4322))?,
            WriteOutcome::Written
        );
        Ok(())
    }

    #[test]
    fn unchanged_write_repairs_a_missing_user_visible_link() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        let files = payload(&[("api-key", b"v", 0o440)]);
        writer.write(&files, None)?;
        fs::remove_file(dir.path().join("api-key"))?;
        assert_eq!(writer.write(&files, None)?, WriteOutcome::Unchanged);
        assert_eq!(fs::read(dir.path().join("api-key"))?, b"v");
        Ok(())
    }

    #[test]
    fn removed_key_disappears() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(&payload(&[("a", b"1", 0o440), ("b", b"2", 0o440)]), None)?;
        assert_eq!(
            writer.write(&payload(&[("a", b"1", 0o440)]), None)?,
            WriteOutcome::Written
        );
        assert_eq!(user_visible(dir.path()), vec!["a".to_owned()]);
        assert!(fs::symlink_metadata(dir.path().join("b")).is_err());
        Ok(())
    }

    #[test]
    fn empty_payload_withdraws_everything_but_keeps_the_directory() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(&payload(&[("a", b"1", 0o440), ("b", b"2", 0o440)]), None)?;
        assert_eq!(writer.write(&Payload::new(), None)?, WriteOutcome::Written);
        assert!(user_visible(dir.path()).is_empty());
        let versions = version_dirs(dir.path());
        assert_eq!(versions.len(), 1);
        assert!(entries(&dir.path().join(&versions[0])).is_empty());
        assert_eq!(
            writer.write(&Payload::new(), None)?,
            WriteOutcome::Unchanged
        );
        Ok(())
    }

    #[test]
    fn bad_names_are_rejected_before_anything_is_touched() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(&payload(&[("good", b"1", 0o440)]), None)?;
        let before = entries(dir.path());

        let long_name = "x".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "..data",
            "..2026_01_01_00_00_00.1",
            "../escape",
            "a/b",
            "/abs",
            "nul\0byte",
            long_name.as_str(),
        ] {
            let files = payload(&[("good", b"2", 0o440), (bad, b"x", 0o440)]);
            let error = writer.write(&files, None);
            assert!(
                matches!(error, Err(AtomicWriteError::InvalidFileName { .. })),
                "{bad:?} accepted: {error:?}"
            );
            assert_eq!(entries(dir.path()), before, "{bad:?} touched the directory");
            assert_eq!(fs::read(dir.path().join("good"))?, b"1");
        }
        let bad_mode = writer.write(&payload(&[("good", b"2", 0o4755)]), None);
        assert!(matches!(
            bad_mode,
            Err(AtomicWriteError::InvalidMode { .. })
        ));
        assert_eq!(entries(dir.path()), before);
        Ok(())
    }

    #[test]
    fn accepted_names_include_dots_inside_and_the_longest_allowed() {
        let longest = "x".repeat(crate::api::validation::MAX_FILE_NAME_BYTES);
        for good in [".hidden", "a..b", "key.json", longest.as_str()] {
            assert_eq!(validate_file_name(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn error_messages_shorten_hostile_names() {
        let error = AtomicWriter::new("/nonexistent")
            .write(&payload(&[(&"/".repeat(5000), b"x", 0o440)]), None)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(error.len() < 200, "{error}");
    }

    #[test]
    fn modes_and_group_are_applied_exactly() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        // 0o666 would lose group/other write bits to a typical umask of 022:
        // seeing it intact shows the explicit chmod.
        writer.write(
            &payload(&[
                ("ro", b"1", 0o440),
                ("rw", b"2", 0o666),
                ("all", b"3", 0o444),
            ]),
            Some(2345),
        )?;
        for (name, mode) in [("ro", 0o440), ("rw", 0o666), ("all", 0o444)] {
            let metadata = fs::metadata(dir.path().join(name))?;
            assert_eq!(metadata.mode() & 0o7777, mode, "{name}");
            assert_eq!(metadata.gid(), 2345, "{name}");
        }
        let version = dir.path().join(&version_dirs(dir.path())[0]);
        let metadata = fs::metadata(version)?;
        assert_eq!(metadata.mode() & 0o7777, VERSION_DIR_MODE);
        assert_eq!(metadata.gid(), 2345);
        Ok(())
    }

    #[test]
    fn a_planted_data_link_pointing_outside_is_refused() -> TestResult {
        let outside = tempfile::tempdir()?;
        fs::write(outside.path().join("victim"), b"keep")?;
        let dir = tempfile::tempdir()?;
        symlink(outside.path(), dir.path().join("..data"))?;
        let result =
            AtomicWriter::new(dir.path()).write(&payload(&[("victim", b"x", 0o440)]), None);
        assert!(matches!(
            result,
            Err(AtomicWriteError::UnexpectedEntry { .. })
        ));
        assert_eq!(fs::read(outside.path().join("victim"))?, b"keep");
        Ok(())
    }

    #[test]
    fn a_symlinked_target_directory_is_refused() -> TestResult {
        let real = tempfile::tempdir()?;
        let holder = tempfile::tempdir()?;
        let link = holder.path().join("target");
        symlink(real.path(), &link)?;
        let result = AtomicWriter::new(&link).write(&payload(&[("a", b"x", 0o440)]), None);
        assert!(matches!(
            result,
            Err(AtomicWriteError::NotADirectory { .. })
        ));
        assert!(entries(real.path()).is_empty());
        Ok(())
    }

    #[test]
    fn foreign_entries_are_kept_and_a_blocking_one_is_an_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join("not-ours"), b"foreign")?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(&payload(&[("a", b"1", 0o440)]), None)?;
        assert_eq!(fs::read(dir.path().join("not-ours"))?, b"foreign");
        let blocked = writer.write(&payload(&[("not-ours", b"1", 0o440)]), None);
        assert!(matches!(
            blocked,
            Err(AtomicWriteError::UnexpectedEntry { .. })
        ));
        assert_eq!(fs::read(dir.path().join("not-ours"))?, b"foreign");
        Ok(())
    }

    #[test]
    fn leftovers_of_an_interrupted_write_are_cleaned_up() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(&payload(&[("a", b"1", 0o440)]), None)?;
        let orphan = dir.path().join("..2020_01_01_00_00_00.42");
        fs::create_dir(&orphan)?;
        fs::write(orphan.join("a"), b"orphan")?;
        symlink("..2020_01_01_00_00_00.42", dir.path().join("..data_tmp"))?;
        writer.write(&payload(&[("a", b"2", 0o440)]), None)?;
        assert!(!orphan.exists());
        assert!(fs::symlink_metadata(dir.path().join("..data_tmp")).is_err());
        assert_eq!(version_dirs(dir.path()).len(), 1);
        assert_eq!(fs::read(dir.path().join("a"))?, b"2");
        Ok(())
    }

    #[test]
    fn debug_of_file_content_hides_the_bytes() {
        let shown = format!("{:?}", FileContent::new(b"sk-live-secret".to_vec(), 0o440));
        assert!(!shown.contains("sk-live"), "{shown}");
        assert!(shown.contains("0o440"));
    }

    #[test]
    fn version_dir_names_are_recognised() {
        assert!(is_version_dir_name("..2026_11_26_10_00_00.8412337"));
        for not_version in [
            "..data",
            "..data_tmp",
            "..2026_11_26_10_00_00.",
            "..2026_11_26_10_00_00.12a",
            "..2026-11-26_10_00_00.1",
            "2026_11_26_10_00_00.1",
        ] {
            assert!(!is_version_dir_name(not_version), "{not_version}");
        }
    }

    /// Content of version `n`: a header repeated a version-dependent number of
    /// times, so a torn read (mixed versions or a truncated file) is detectable.
    fn versioned_content(version: usize) -> Vec<u8> {
        format!("version-{version:04}|")
            .repeat(500 + version * 37)
            .into_bytes()
    }

    fn is_whole_version(bytes: &[u8]) -> bool {
        let Some(header) = bytes.get(..13) else {
            return false;
        };
        let Some(version) = std::str::from_utf8(header)
            .ok()
            .and_then(|text| text.strip_prefix("version-"))
            .and_then(|text| text.strip_suffix('|'))
            .and_then(|digits| digits.parse::<usize>().ok())
        else {
            return false;
        };
        bytes == versioned_content(version).as_slice()
    }

    #[test]
    fn concurrent_reader_sees_only_whole_versions() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        writer.write(
            &[(
                "key".to_owned(),
                FileContent::new(versioned_content(0), 0o444),
            )]
            .into_iter()
            .collect(),
            None,
        )?;

        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = Arc::clone(&stop);
            let path = dir.path().join("key");
            std::thread::spawn(move || {
                let (mut whole, mut torn, mut transient) = (0_u64, 0_u64, 0_u64);
                while !stop.load(Ordering::Relaxed) {
                    match fs::read(&path) {
                        Ok(bytes) if is_whole_version(&bytes) => whole += 1,
                        Ok(_) => torn += 1,
                        // The old version directory vanished between resolving
                        // `..data` and opening the file: retry, as kubelet's
                        // consumers do.
                        Err(error) if error.kind() == io::ErrorKind::NotFound => transient += 1,
                        Err(_) => torn += 1,
                    }
                }
                (whole, torn, transient)
            })
        };

        for version in 1..=100 {
            let files: Payload = [(
                "key".to_owned(),
                FileContent::new(versioned_content(version), 0o444),
            )]
            .into_iter()
            .collect();
            assert_eq!(writer.write(&files, None)?, WriteOutcome::Written);
        }
        stop.store(true, Ordering::Relaxed);
        let (whole, torn, _transient) = reader.join().map_err(|_| "reader thread panicked")?;
        assert_eq!(torn, 0, "reader saw a torn file");
        assert!(whole > 0, "reader never completed a read");
        assert!(is_whole_version(&fs::read(dir.path().join("key"))?));
        assert_eq!(fs::read(dir.path().join("key"))?, versioned_content(100));
        Ok(())
    }

    #[test]
    fn read_current_returns_the_live_files_with_their_modes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let writer = AtomicWriter::new(dir.path());
        assert!(writer.read_current()?.is_empty());
        let files = payload(&[("a", b"alpha", 0o440), ("b", b"beta", 0o400)]);
        writer.write(&files, None)?;
        assert_eq!(writer.read_current()?, files);
        // Keeping all but one file is a rewrite without it.
        let mut kept = writer.read_current()?;
        kept.remove("a");
        assert_eq!(writer.write(&kept, None)?, WriteOutcome::Written);
        assert_eq!(user_visible(dir.path()), vec!["b".to_owned()]);
        assert_eq!(writer.read_current()?, payload(&[("b", b"beta", 0o400)]));
        Ok(())
    }

    /// With a grace period the user-visible path always resolves: a reader
    /// never sees `NotFound`, only whole versions.
    #[test]
    fn with_a_grace_period_a_reader_never_misses_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let retiring = Retiring::default();
        let writer = AtomicWriter::new(dir.path()).with_retiring(retiring.clone());
        let version = |n: usize| -> Payload {
            [(
                "key".to_owned(),
                FileContent::new(versioned_content(n), 0o444),
            )]
            .into_iter()
            .collect()
        };
        writer.write(&version(0), None)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = Arc::clone(&stop);
            let path = dir.path().join("key");
            std::thread::spawn(move || {
                let (mut whole, mut bad) = (0_u64, 0_u64);
                while !stop.load(Ordering::Relaxed) {
                    match fs::read(&path) {
                        Ok(bytes) if is_whole_version(&bytes) => whole += 1,
                        _ => bad += 1,
                    }
                }
                (whole, bad)
            })
        };
        for n in 1..=50 {
            let (outcome, kept) = writer.write_graced(&version(n), None)?;
            assert_eq!(outcome, WriteOutcome::Written);
            let kept = kept.ok_or("a rotation keeps the replaced version")?;
            // The old version is still there, and a later write spares it.
            assert!(dir.path().join(&kept).is_dir());
            std::thread::sleep(std::time::Duration::from_millis(10));
            writer.retire(&kept)?;
            assert!(!dir.path().join(&kept).exists());
        }
        stop.store(true, Ordering::Relaxed);
        let (whole, bad) = reader.join().map_err(|_| "reader thread panicked")?;
        assert_eq!(bad, 0, "reader saw a missing or torn file");
        assert!(whole > 0);
        assert_eq!(version_dirs(dir.path()).len(), 1);
        assert!(retiring.lock().map(|r| r.is_empty()).unwrap_or(false));
        Ok(())
    }

    /// A withdrawal removes the replaced version at once, and a write spares
    /// versions still in their grace period.
    #[test]
    fn withdrawals_leave_no_old_version_and_retiring_ones_are_spared() -> TestResult {
        let dir = tempfile::tempdir()?;
        let retiring = Retiring::default();
        let writer = AtomicWriter::new(dir.path()).with_retiring(retiring.clone());
        writer.write(&payload(&[("a", b"1", 0o444), ("b", b"2", 0o444)]), None)?;
        // Rotation of b: the replaced version is kept.
        let (_, kept) =
            writer.write_graced(&payload(&[("a", b"1", 0o444), ("b", b"3", 0o444)]), None)?;
        let kept = kept.ok_or("kept")?;
        // A withdrawal of a: its replaced version goes at once, the one in
        // its grace period stays.
        let (_, none) = writer.write_graced(&payload(&[("b", b"3", 0o444)]), None)?;
        assert_eq!(none, None);
        assert_eq!(version_dirs(dir.path()).len(), 2);
        assert!(dir.path().join(&kept).is_dir());
        writer.retire(&kept)?;
        assert_eq!(version_dirs(dir.path()).len(), 1);
        // Without a set, write() never leaves anything behind.
        let plain = AtomicWriter::new(dir.path());
        plain.write(&payload(&[("b", b"4", 0o444)]), None)?;
        assert_eq!(version_dirs(dir.path()).len(), 1);
        Ok(())
    }
}

//! File operations relative to a directory descriptor, one name at a time,
//! for directories a pod may have written to.
//!
//! Every open is an `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV` and `O_NOFOLLOW`: a symlink, a
//! `..`, a magic link or a mount point on the way fails the call instead of
//! being followed. Links are read with `readlinkat` and never resolved;
//! entries are removed with `unlinkat` from their parent's descriptor, so a
//! planted link is removed itself, never what it points to. Nothing here
//! takes a path string that the kernel would walk again.

use std::ffi::{CStr, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How every name is resolved: beneath the directory, no symlink of any
/// kind, no mount crossing.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Deepest directory tree [`remove_entry`] takes apart; deeper is an error
/// (the caller then gives the volume up rather than recurse without end).
pub const MAX_REMOVE_DEPTH: usize = 16;

/// Why [`remove_entry`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("a directory tree deeper than {MAX_REMOVE_DEPTH} levels")]
    TooDeep,
    #[error(transparent)]
    Sys(#[from] Errno),
}

fn openat2(dir: impl AsFd, name: &OsStr, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        mode,
        RESOLVE,
    )
}

/// Opens the directory `name` in `dir` for listing and `*at` calls.
pub fn open_dir(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat2(dir, name, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
}

/// Opens `name` in `dir` for reading. `O_NONBLOCK`, so a planted FIFO does
/// not block the open; the caller checks with `fstat` that it is a file.
pub fn open_file(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat2(dir, name, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
}

/// Creates `name` in `dir`, which must not exist (`O_EXCL`: nothing planted
/// there is opened), for writing, with `mode`.
pub fn create_file(dir: impl AsFd, name: &OsStr, mode: u32) -> Result<OwnedFd, Errno> {
    openat2(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(mode),
    )
}

/// Creates the directory `name` in `dir` with `mode` (less the umask).
pub fn make_dir(dir: impl AsFd, name: &OsStr, mode: u32) -> Result<(), Errno> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))
}

/// The target of the symlink `name` in `dir`, not resolved. `None` when
/// there is no such entry; `EINVAL` when it is not a symlink.
pub fn read_link(dir: impl AsFd, name: &OsStr) -> Result<Option<OsString>, Errno> {
    match rustix::fs::readlinkat(dir, name, Vec::new()) {
        Ok(target) => Ok(Some(OsString::from_vec(target.into_bytes()))),
        Err(Errno::NOENT) => Ok(None),
        Err(errno) => Err(errno),
    }
}

/// Creates the symlink `name -> target` in `dir` (the target is text, never
/// resolved by this module).
pub fn make_link(target: &OsStr, dir: impl AsFd, name: &OsStr) -> Result<(), Errno> {
    rustix::fs::symlinkat(target, dir, name)
}

/// Renames `from` over `to`, both in `dir` (atomic; replaces `to` itself if
/// it is a symlink or a file).
pub fn rename(dir: impl AsFd, from: &OsStr, to: &OsStr) -> Result<(), Errno> {
    let dir = dir.as_fd();
    rustix::fs::renameat(dir, from, dir, to)
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: OsString,
    pub file_type: FileType,
}

/// The entries of `dir` (without `.` and `..`), read from a fresh
/// descriptor of it so `dir`'s own position is untouched.
pub fn list(dir: impl AsFd) -> Result<Vec<Entry>, Errno> {
    let mut entries = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if is_dot_or_dot_dot(name) {
            continue;
        }
        entries.push(Entry {
            name: OsStr::from_bytes(name.to_bytes()).to_owned(),
            file_type: entry.file_type(),
        });
    }
    Ok(entries)
}

fn is_dot_or_dot_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

/// Removes `name` from `dir`, whatever it is, without following anything:
/// a symlink, a file or a socket is unlinked itself; a directory is taken
/// apart level by level through descriptors opened as above, then removed.
/// Already gone is success.
pub fn remove_entry(dir: impl AsFd, name: &OsStr) -> Result<(), RemoveError> {
    remove_at_depth(dir.as_fd(), name, 0)
}

fn remove_at_depth(
    dir: rustix::fd::BorrowedFd<'_>,
    name: &OsStr,
    depth: usize,
) -> Result<(), RemoveError> {
    // Two tries: the entry may change kind between the unlink and the open
    // (someone swapping a directory for a link); then unlink it again.
    for _ in 0..2 {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => return Ok(()),
            // Linux answers EISDIR for a directory (POSIX allows EPERM).
            Err(Errno::ISDIR) | Err(Errno::PERM) => {}
            Err(errno) => return Err(errno.into()),
        }
        let child = match open_dir(dir, name) {
            Ok(child) => child,
            Err(Errno::NOENT) => return Ok(()),
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        if depth >= MAX_REMOVE_DEPTH {
            return Err(RemoveError::TooDeep);
        }
        for entry in list(&child)? {
            remove_at_depth(child.as_fd(), &entry.name, depth + 1)?;
        }
        return match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(errno) => Err(errno.into()),
        };
    }
    Err(Errno::AGAIN.into())
}

/// `fsync` of a directory (or file) descriptor.
pub fn sync(fd: impl AsFd) -> Result<(), Errno> {
    rustix::fs::fsync(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn open(path: &std::path::Path) -> Result<OwnedFd, Errno> {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    #[test]
    fn links_on_the_way_are_refused_not_followed() -> TestResult {
        let outside = tempfile::tempdir()?;
        fs::write(outside.path().join("secret"), b"outside")?;
        let dir = tempfile::tempdir()?;
        symlink(outside.path(), dir.path().join("linked-dir"))?;
        symlink(
            outside.path().join("secret"),
            dir.path().join("linked-file"),
        )?;
        let fd = open(dir.path())?;
        // O_DIRECTORY | O_NOFOLLOW on a link: "not a directory".
        assert_eq!(
            open_dir(&fd, OsStr::new("linked-dir")).err(),
            Some(Errno::NOTDIR)
        );
        assert_eq!(
            open_file(&fd, OsStr::new("linked-file")).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(
            open_file(&fd, OsStr::new("linked-dir/secret")).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(open_file(&fd, OsStr::new("../x")).err(), Some(Errno::XDEV));
        assert_eq!(
            create_file(&fd, OsStr::new("linked-file"), 0o600).err(),
            Some(Errno::EXIST)
        );
        assert_eq!(fs::read(outside.path().join("secret"))?, b"outside");
        Ok(())
    }

    #[test]
    fn remove_entry_removes_links_and_trees_but_nothing_they_point_to() -> TestResult {
        let outside = tempfile::tempdir()?;
        fs::create_dir(outside.path().join("keep"))?;
        fs::write(outside.path().join("keep/file"), b"keep")?;
        let dir = tempfile::tempdir()?;
        symlink(outside.path(), dir.path().join("link"))?;
        fs::create_dir_all(dir.path().join("tree/a/b"))?;
        fs::write(dir.path().join("tree/a/b/file"), b"x")?;
        symlink(
            outside.path().join("keep"),
            dir.path().join("tree/a/escape"),
        )?;
        let fd = open(dir.path())?;
        remove_entry(&fd, OsStr::new("link"))?;
        remove_entry(&fd, OsStr::new("tree"))?;
        remove_entry(&fd, OsStr::new("never-there"))?;
        assert!(list(&fd)?.is_empty());
        assert_eq!(fs::read(outside.path().join("keep/file"))?, b"keep");
        Ok(())
    }

    #[test]
    fn remove_entry_gives_up_on_a_tree_too_deep() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut deep = dir.path().join("deep");
        for _ in 0..=MAX_REMOVE_DEPTH {
            deep.push("d");
        }
        fs::create_dir_all(&deep)?;
        let fd = open(dir.path())?;
        assert!(matches!(
            remove_entry(&fd, OsStr::new("deep")),
            Err(RemoveError::TooDeep)
        ));
        Ok(())
    }
}

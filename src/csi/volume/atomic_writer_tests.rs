//! Unit tests of the atomic writer on plain temporary directories.

use super::*;
use crate::api::validation::is_reserved_name;
use std::fs;
use std::os::unix::fs::symlink;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let error = validate_payload(&payload(&[(&"/".repeat(5000), b"x", 0o440)]))
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(!error.is_empty() && error.len() < 200, "{error}");
}

#[test]
fn modes_and_group_are_applied_exactly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
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
fn a_planted_data_link_pointing_outside_is_replaced_not_followed() -> TestResult {
    let outside = tempfile::tempdir()?;
    fs::write(outside.path().join("victim"), b"keep")?;
    let dir = tempfile::tempdir()?;
    symlink(outside.path(), dir.path().join("..data"))?;
    let writer = AtomicWriter::open(dir.path())?;
    writer.write(&payload(&[("victim", b"x", 0o440)]), None)?;
    assert_eq!(fs::read(outside.path().join("victim"))?, b"keep");
    assert_eq!(entries(outside.path()), vec!["victim".to_owned()]);
    assert_eq!(fs::read(dir.path().join("victim"))?, b"x");
    let data = fs::read_link(dir.path().join("..data"))?;
    assert!(is_version_dir_name(&data.to_string_lossy()), "{data:?}");
    Ok(())
}

#[test]
fn a_symlinked_target_directory_is_refused() -> TestResult {
    let real = tempfile::tempdir()?;
    let holder = tempfile::tempdir()?;
    let link = holder.path().join("target");
    symlink(real.path(), &link)?;
    let result = AtomicWriter::open(&link);
    assert!(matches!(
        result,
        Err(AtomicWriteError::NotADirectory { .. })
    ));
    assert!(entries(real.path()).is_empty());
    Ok(())
}

/// Whatever the writer did not make is removed by name, never followed:
/// a file, a directory tree, a link to a directory outside, an entry
/// blocking a file's name.
#[test]
fn foreign_entries_are_removed_by_name_and_never_followed() -> TestResult {
    let outside = tempfile::tempdir()?;
    fs::write(outside.path().join("a"), b"outside")?;
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
    writer.write(&payload(&[("a", b"1", 0o440)]), None)?;
    fs::write(dir.path().join("not-ours"), b"foreign")?;
    fs::create_dir_all(dir.path().join("tree/deeper"))?;
    symlink(outside.path(), dir.path().join("tree/deeper/escape"))?;
    symlink(outside.path(), dir.path().join("outside-link"))?;
    fs::remove_file(dir.path().join("a"))?;
    fs::create_dir(dir.path().join("a"))?;
    fs::write(dir.path().join("a/blocker"), b"x")?;
    assert_eq!(
        writer.write(&payload(&[("a", b"1", 0o440)]), None)?,
        WriteOutcome::Unchanged
    );
    assert_eq!(user_visible(dir.path()), vec!["a".to_owned()]);
    assert_eq!(fs::read(dir.path().join("a"))?, b"1");
    assert_eq!(fs::read(outside.path().join("a"))?, b"outside");
    assert_eq!(entries(outside.path()), vec!["a".to_owned()]);
    Ok(())
}

#[test]
fn leftovers_of_an_interrupted_write_are_cleaned_up() -> TestResult {
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?;
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
    let writer = AtomicWriter::open(dir.path())?.with_retiring(retiring.clone());
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
    let writer = AtomicWriter::open(dir.path())?.with_retiring(retiring.clone());
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
    let plain = AtomicWriter::open(dir.path())?;
    plain.write(&payload(&[("b", b"4", 0o444)]), None)?;
    assert_eq!(version_dirs(dir.path()).len(), 1);
    Ok(())
}

/// The single version directory of `dir` (the current one).
fn only_version(dir: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let versions = version_dirs(dir);
    match versions.as_slice() {
        [only] => Ok(only.clone()),
        _ => Err(format!("expected one version directory, found {versions:?}").into()),
    }
}

/// Every regular file's content anywhere below `dir`, links not followed.
fn all_contents(dir: &Path) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    found.extend(fs::read(entry.path()).ok());
                }
                _ => {}
            }
        }
    }
    found
}

/// Someone with a writable copy moved the version holding a value
/// aside (under a name that is not a version's) and left `..data`
/// dangling. A withdrawal of that value must not depend on finding it
/// through `..data`: the registered version is removed by name and the
/// moved copy, a foreign entry, goes too.
#[test]
fn a_withdrawal_removes_a_version_moved_aside() -> TestResult {
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
    writer.write(
        &payload(&[("revoked", b"sk-revoked", 0o440), ("kept", b"kept", 0o440)]),
        None,
    )?;
    let version = only_version(dir.path())?;
    fs::rename(dir.path().join(&version), dir.path().join("stash"))?;

    writer.write(&payload(&[("kept", b"kept", 0o440)]), None)?;
    assert!(
        !all_contents(dir.path()).iter().any(|c| c == b"sk-revoked"),
        "the withdrawn value is still in the directory: {:?}",
        entries(dir.path())
    );
    assert_eq!(fs::read(dir.path().join("kept"))?, b"kept");
    Ok(())
}

/// The files kept by a partial withdrawal are read back from the
/// version the writer made, by name, not from wherever `..data` points:
/// a planted version with other content is neither read nor kept.
#[test]
fn read_back_uses_the_registered_version_not_what_data_names() -> TestResult {
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
    writer.write(
        &payload(&[("revoked", b"sk-revoked", 0o440), ("kept", b"real", 0o440)]),
        None,
    )?;
    let planted = "..2020_01_01_00_00_00.1";
    fs::create_dir(dir.path().join(planted))?;
    fs::write(dir.path().join(planted).join("kept"), b"planted")?;
    fs::remove_file(dir.path().join("..data"))?;
    symlink(planted, dir.path().join("..data"))?;

    let mut kept = writer.read_current()?;
    kept.remove("revoked");
    assert_eq!(kept, payload(&[("kept", b"real", 0o440)]));
    writer.write(&kept, None)?;
    assert_eq!(fs::read(dir.path().join("kept"))?, b"real");
    assert_eq!(version_dirs(dir.path()).len(), 1);
    assert!(!all_contents(dir.path()).iter().any(|c| c == b"planted"));
    Ok(())
}

/// Swaps the named entry of `dir` for a link to `outside` and back, as
/// fast as it can, until `stop`, counting in `swaps`: a race against
/// the writer's reads.
fn swap_for_a_link_until(
    dir: PathBuf,
    name: String,
    outside: PathBuf,
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (real, aside) = (dir.join(&name), dir.join("aside"));
        while !stop.load(Ordering::Relaxed) {
            if fs::rename(&real, &aside).is_err() {
                continue;
            }
            let _ = symlink(&outside, &real);
            std::thread::yield_now();
            let _ = fs::remove_file(&real);
            let _ = fs::rename(&aside, &real);
            swaps.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Runs `step` at least `rounds` times, and on until the other thread
/// counted some swaps (bounded: a loaded machine may schedule it late).
fn race(rounds: u32, swaps: &AtomicU64, mut step: impl FnMut()) {
    let started = std::time::Instant::now();
    let mut done = 0;
    while done < rounds
        || (swaps.load(Ordering::Relaxed) < 100
            && started.elapsed() < std::time::Duration::from_secs(20))
    {
        step();
        done += 1;
    }
}

/// A version directory swapped for a link to a directory outside,
/// again and again while the writer reads it back: whatever the timing,
/// nothing outside is ever read (the version is opened once, without
/// following links, and its files through that descriptor).
#[test]
fn read_back_never_follows_a_version_swapped_for_a_link() -> TestResult {
    let outside = tempfile::tempdir()?;
    fs::write(outside.path().join("kept"), b"outside")?;
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
    writer.write(&payload(&[("kept", b"inside", 0o440)]), None)?;
    let version = only_version(dir.path())?;

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = swap_for_a_link_until(
        dir.path().to_path_buf(),
        version,
        outside.path().to_path_buf(),
        Arc::clone(&stop),
        Arc::clone(&swaps),
    );
    let (mut read, mut refused, mut leaked) = (0_u32, 0_u32, 0_u32);
    race(20_000, &swaps, || match writer.read_current() {
        Ok(files) => {
            read += 1;
            if files.values().any(|file| file.bytes == b"outside") {
                leaked += 1;
            }
        }
        Err(_) => refused += 1,
    });
    stop.store(true, Ordering::Relaxed);
    swapper.join().map_err(|_| "swapper panicked")?;
    let swaps = swaps.load(Ordering::Relaxed);
    assert_eq!(
        leaked, 0,
        "read outside content ({read} reads, {refused} refused, {swaps} swaps)"
    );
    assert!(
        swaps > 0 && read > 0,
        "no race: {read} reads, {swaps} swaps"
    );
    Ok(())
}

/// A new version directory swapped for a link to a directory outside
/// while the writer fills it: the write may fail, but never creates a
/// file outside.
#[test]
fn a_write_never_creates_files_through_a_version_swapped_for_a_link() -> TestResult {
    let outside = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let writer = AtomicWriter::open(dir.path())?;
    writer.write(&payload(&[("key", b"v0", 0o440)]), None)?;

    // Swap every version directory but the current one for a link,
    // as soon as it appears.
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (dir, outside) = (dir.path().to_path_buf(), outside.path().to_path_buf());
        let (stop, swaps) = (Arc::clone(&stop), Arc::clone(&swaps));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let current = fs::read_link(dir.join("..data")).ok();
                for name in version_dirs(&dir) {
                    let real = dir.join(&name);
                    if current.as_deref() == Some(Path::new(&name)) || real.is_symlink() {
                        continue;
                    }
                    if fs::rename(&real, dir.join("aside")).is_ok() {
                        let _ = symlink(&outside, &real);
                        swaps.fetch_add(1, Ordering::Relaxed);
                        let _ = fs::remove_dir_all(dir.join("aside"));
                    }
                }
            }
        })
    };
    let (mut round, mut failed) = (0_u32, 0_u32);
    race(300, &swaps, || {
        round += 1;
        let value = format!("v{round}");
        if writer
            .write(&payload(&[("key", value.as_bytes(), 0o440)]), None)
            .is_err()
        {
            failed += 1;
        }
    });
    stop.store(true, Ordering::Relaxed);
    swapper.join().map_err(|_| "swapper panicked")?;
    let swaps = swaps.load(Ordering::Relaxed);
    assert_eq!(
        entries(outside.path()),
        Vec::<String>::new(),
        "files created outside ({round} writes, {failed} failed, {swaps} swaps)"
    );
    assert!(swaps > 0, "no race: {round} writes");
    Ok(())
}

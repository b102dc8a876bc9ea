//! On-disk registry of the volumes this node plugin has published.
//!
//! One small JSON file per volume under a state directory, so that after a
//! restart the plugin still knows which targets it owns, for which pod and
//! agent, and which grants (with digests and expiry) are mounted there: it
//! can keep enforcing revocation and expiry before kubelet's next republish.
//! The registry never holds a token or a secret value.
//!
//! Writes are atomic: a temporary file is written, then renamed over the
//! volume's file. They are not flushed to disk (no fsync): the registry only
//! has to survive a restart of the plugin, which the page cache does; after
//! a power loss or reboot the tmpfs volumes it describes are gone anyway
//! (such entries are recognised at start-up as not mounted and replaced by
//! the next publish). Flushing cost milliseconds of disk wait on every
//! publish, rotation and unpublish.

use std::collections::hash_map::DefaultHasher;
use std::fs::{self, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::atomic_writer::VolumeLayout;

/// Version of the file format; files of another version are reported and
/// skipped rather than misread.
pub const REGISTRY_FORMAT_VERSION: u32 = 1;
/// Suffix of volume files.
const FILE_SUFFIX: &str = ".json";
/// Prefix of temporary files (a dot, so they never look like volume files).
const TEMP_PREFIX: &str = ".tmp-";
/// Volume files larger than this are corrupt, not read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Longest readable part of a volume id kept in a file name.
const MAX_ID_IN_FILE_NAME: usize = 96;

/// The pod a volume was published for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account_name: String,
}

/// One grant mounted in a volume: names, digest and expiry, never values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedGrant {
    pub grant: String,
    pub secret: String,
    pub content_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<jiff::Timestamp>,
    /// File names this grant put into the mount.
    #[serde(default)]
    pub files: Vec<String>,
    /// The Secret keys behind those files (for audit records; older entries
    /// lack them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
}

/// Everything the plugin remembers about one published volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedVolume {
    pub format_version: u32,
    pub volume_id: String,
    pub target_path: PathBuf,
    pub pod: PodRef,
    /// The AgentIdentity the pod resolved as (empty while nothing resolved).
    pub agent: String,
    /// The volume attribute `grants` (empty: every active grant).
    #[serde(default)]
    pub requested_grants: Vec<String>,
    #[serde(default)]
    pub grants: Vec<PublishedGrant>,
    /// Group of the mounted files (the pod's fsGroup), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_group: Option<u32>,
    pub read_only: bool,
    pub published_at: jiff::Timestamp,
    pub updated_at: jiff::Timestamp,
    /// What the plugin made in the volume's directory, by name: a
    /// withdrawal removes exactly these and treats anything else as
    /// foreign. Absent in entries of plugins before it (same format
    /// version: older plugins ignore the field, this one adopts such a
    /// volume's layout from its directory once, see
    /// [`AtomicWriter::layout`](super::atomic_writer::AtomicWriter::layout)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<VolumeLayout>,
}

/// Errors of the registry. Messages name files and volume ids only.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("failed to {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is not a valid registry entry", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format version {found}, expected {REGISTRY_FORMAT_VERSION}", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{} holds volume {volume_id:?}, which belongs in another file", path.display())]
    Misplaced { path: PathBuf, volume_id: String },
    #[error("failed to encode the registry entry of volume {volume_id:?}")]
    Encode {
        volume_id: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RegistryError {
    move |source| RegistryError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The result of [`Registry::load_all`]: the entries that loaded and the
/// problems with the others (reported, not fatal).
#[derive(Debug, Default)]
pub struct LoadedVolumes {
    pub volumes: Vec<PublishedVolume>,
    pub problems: Vec<RegistryError>,
}

/// The registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens (creating if needed, mode 0700) the registry directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .map_err(io_error("create", &dir))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `volume_id`.
    pub fn path_for(&self, volume_id: &str) -> PathBuf {
        self.dir.join(file_name_for(volume_id))
    }

    /// Writes (or replaces) the entry of `volume.volume_id` atomically.
    pub fn store(&self, volume: &PublishedVolume) -> Result<(), RegistryError> {
        let encoded =
            serde_json::to_vec_pretty(volume).map_err(|source| RegistryError::Encode {
                volume_id: volume.volume_id.clone(),
                source,
            })?;
        let final_path = self.path_for(&volume.volume_id);
        let temp_path = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            file_name_for(&volume.volume_id),
            unique_counter()
        ));
        let written = write_private(&temp_path, &encoded).and_then(|()| {
            fs::rename(&temp_path, &final_path).map_err(io_error("rename", &temp_path))
        });
        if let Err(error) = written {
            let _ = fs::remove_file(&temp_path);
            return Err(error);
        }
        Ok(())
    }

    /// Reads the entry of `volume_id`, if there is one.
    pub fn load(&self, volume_id: &str) -> Result<Option<PublishedVolume>, RegistryError> {
        let path = self.path_for(volume_id);
        match read_entry(&path) {
            Ok(volume) => Ok(Some(volume)),
            Err(RegistryError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Removes the entry of `volume_id`. Returns whether it existed.
    pub fn remove(&self, volume_id: &str) -> Result<bool, RegistryError> {
        let path = self.path_for(volume_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }

    /// Loads every entry, sorted by volume id. Unreadable or corrupt files
    /// are reported in [`LoadedVolumes::problems`] and skipped; leftover
    /// temporary files of an interrupted store are removed.
    pub fn load_all(&self) -> Result<LoadedVolumes, RegistryError> {
        let mut loaded = LoadedVolumes::default();
        for entry in fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let path = entry.path();
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                if let Err(error) = fs::remove_file(&path) {
                    loaded
                        .problems
                        .push(io_error("remove leftover", &path)(error));
                }
                continue;
            }
            if !name.ends_with(FILE_SUFFIX) || name.starts_with('.') {
                continue;
            }
            match read_entry(&path) {
                Ok(volume) if file_name_for(&volume.volume_id) == name => {
                    loaded.volumes.push(volume)
                }
                Ok(volume) => loaded.problems.push(RegistryError::Misplaced {
                    path,
                    volume_id: volume.volume_id,
                }),
                Err(error) => loaded.problems.push(error),
            }
        }
        loaded
            .volumes
            .sort_by(|left, right| left.volume_id.cmp(&right.volume_id));
        Ok(loaded)
    }
}

/// The file name for a volume id: a readable, sanitised prefix plus a hash of
/// the full id, so that distinct ids never share a file, whatever characters
/// they hold (kubelet's ids are `csi-<hex>`, csi-sanity's are arbitrary).
pub fn file_name_for(volume_id: &str) -> String {
    let readable: String = volume_id
        .chars()
        .take(MAX_ID_IN_FILE_NAME)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = Sha256::digest(volume_id.as_bytes());
    let short_hash = hex::encode(&digest[..8]);
    format!("vol-{readable}-{short_hash}{FILE_SUFFIX}")
}

fn read_entry(path: &Path) -> Result<PublishedVolume, RegistryError> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_error("open", path))?;
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(RegistryError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let volume: PublishedVolume =
        serde_json::from_slice(&bytes).map_err(|source| RegistryError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    if volume.format_version != REGISTRY_FORMAT_VERSION {
        return Err(RegistryError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: volume.format_version,
        });
    }
    Ok(volume)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    file.write_all(bytes).map_err(io_error("write", path))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_error("set the mode of", path))
}

/// Distinguishes concurrent temporary files of this process.
fn unique_counter() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = DefaultHasher::new();
    std::process::id().hash(&mut hasher);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-{count}", hasher.finish() & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn volume(volume_id: &str) -> Result<PublishedVolume, jiff::Error> {
        let published_at: jiff::Timestamp = "2026-11-26T10:00:00Z".parse()?;
        Ok(PublishedVolume {
            format_version: REGISTRY_FORMAT_VERSION,
            volume_id: volume_id.to_owned(),
            target_path: PathBuf::from(format!(
                "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/{volume_id}/mount"
            )),
            pod: PodRef {
                namespace: "agents".to_owned(),
                name: "claude-0".to_owned(),
                uid: "uid-1".to_owned(),
                service_account_name: "claude".to_owned(),
            },
            agent: "claude".to_owned(),
            requested_grants: vec![],
            grants: vec![PublishedGrant {
                grant: "supabase-dev".to_owned(),
                secret: "supabase".to_owned(),
                content_digest: "0123456789ab".to_owned(),
                expires_at: Some("2026-11-26T18:00:00Z".parse()?),
                files: vec!["api-key".to_owned()],
                keys: vec!["service-key".to_owned()],
            }],
            fs_group: Some(1000),
            read_only: true,
            published_at,
            updated_at: published_at,
            layout: Some(VolumeLayout {
                current: Some("..2026_11_26_10_00_00.1".to_owned()),
                versions: ["..2026_11_26_10_00_00.1".to_owned()].into(),
                links: ["api-key".to_owned()].into(),
            }),
        })
    }

    /// An entry as the plugin before the layout field wrote it (verbatim
    /// shape of format version 1): it still loads, with no layout, and an
    /// entry with a layout still has the fields an older plugin reads.
    #[test]
    fn entries_of_an_older_plugin_load_and_newer_ones_stay_readable() -> TestResult {
        let dir = tempfile::tempdir()?;
        let registry = Registry::open(dir.path())?;
        let old = r#"{
  "formatVersion": 1,
  "volumeId": "csi-old",
  "targetPath": "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/v/mount",
  "pod": {"namespace": "agents", "name": "claude-0", "uid": "uid-1", "serviceAccountName": "claude"},
  "agent": "claude",
  "requestedGrants": [],
  "grants": [{"grant": "g", "secret": "s", "contentDigest": "00", "files": ["api-key"]}],
  "fsGroup": 1000,
  "readOnly": true,
  "publishedAt": "2026-11-26T10:00:00Z",
  "updatedAt": "2026-11-26T10:00:00Z"
}"#;
        fs::write(registry.path_for("csi-old"), old)?;
        let loaded = registry.load("csi-old")?.ok_or("old entry not loaded")?;
        assert_eq!(loaded.layout, None);
        assert_eq!(loaded.grants[0].files, vec!["api-key".to_owned()]);

        let current = volume("csi-new")?;
        registry.store(&current)?;
        let stored: serde_json::Value =
            serde_json::from_slice(&fs::read(registry.path_for("csi-new"))?)?;
        assert_eq!(stored["formatVersion"], REGISTRY_FORMAT_VERSION);
        assert_eq!(stored["layout"]["links"], serde_json::json!(["api-key"]));
        assert_eq!(registry.load("csi-new")?, Some(current));
        Ok(())
    }

    #[test]
    fn store_load_remove_round_trip() -> TestResult {
        let dir = tempfile::tempdir()?;
        let registry = Registry::open(dir.path().join("volumes"))?;
        let entry = volume("csi-abc")?;
        registry.store(&entry)?;
        assert_eq!(registry.load("csi-abc")?, Some(entry.clone()));

        let mut updated = entry.clone();
        updated.grants.clear();
        registry.store(&updated)?;
        assert_eq!(registry.load("csi-abc")?, Some(updated));

        assert!(registry.remove("csi-abc")?);
        assert!(!registry.remove("csi-abc")?);
        assert_eq!(registry.load("csi-abc")?, None);
        Ok(())
    }

    #[test]
    fn load_all_returns_entries_sorted_and_reports_corrupt_files() -> TestResult {
        let dir = tempfile::tempdir()?;
        let registry = Registry::open(dir.path())?;
        registry.store(&volume("csi-b")?)?;
        registry.store(&volume("csi-a")?)?;
        fs::write(
            dir.path().join("vol-garbage-0000000000000000.json"),
            b"{not json",
        )?;
        fs::write(dir.path().join(".tmp-vol-leftover-1"), b"partial")?;
        fs::write(dir.path().join("README"), b"ignored")?;
        let mut future = serde_json::to_value(volume("csi-c")?)?;
        future["formatVersion"] = serde_json::json!(99);
        fs::write(registry.path_for("csi-c"), serde_json::to_vec(&future)?)?;
        fs::write(
            dir.path().join("vol-moved-0000000000000000.json"),
            serde_json::to_vec(&volume("csi-d")?)?,
        )?;

        let loaded = registry.load_all()?;
        let ids: Vec<&str> = loaded
            .volumes
            .iter()
            .map(|v| v.volume_id.as_str())
            .collect();
        assert_eq!(ids, vec!["csi-a", "csi-b"]);
        assert_eq!(loaded.problems.len(), 3, "{:?}", loaded.problems);
        assert!(
            loaded
                .problems
                .iter()
                .any(|p| matches!(p, RegistryError::Corrupt { .. }))
        );
        assert!(
            loaded
                .problems
                .iter()
                .any(|p| matches!(p, RegistryError::UnsupportedVersion { found: 99, .. }))
        );
        assert!(
            loaded
                .problems
                .iter()
                .any(|p| matches!(p, RegistryError::Misplaced { .. }))
        );
        assert!(!dir.path().join(".tmp-vol-leftover-1").exists());
        Ok(())
    }

    #[test]
    fn entries_are_private_and_hold_no_values() -> TestResult {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir()?;
        let registry = Registry::open(dir.path().join("state"))?;
        registry.store(&volume("csi-abc")?)?;
        assert_eq!(fs::metadata(registry.dir())?.mode() & 0o777, 0o700);
        let path = registry.path_for("csi-abc");
        assert_eq!(fs::metadata(&path)?.mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path)?;
        assert!(
            text.contains("\"contentDigest\": \"0123456789ab\""),
            "{text}"
        );
        assert!(
            text.contains("\"expiresAt\": \"2026-11-26T18:00:00Z\""),
            "{text}"
        );
        // Only the temp-free final file exists.
        assert_eq!(fs::read_dir(registry.dir())?.count(), 1);
        Ok(())
    }

    #[test]
    fn oversized_files_are_reported_not_read() -> TestResult {
        let dir = tempfile::tempdir()?;
        let registry = Registry::open(dir.path())?;
        let path = registry.path_for("csi-big");
        fs::write(&path, vec![b' '; (MAX_FILE_BYTES + 1) as usize])?;
        assert!(matches!(
            registry.load("csi-big"),
            Err(RegistryError::TooLarge { .. })
        ));
        Ok(())
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        let hostile = [
            "../../etc/passwd",
            "..",
            "a/b",
            "a_b",
            "a b",
            "",
            "csi-2736759dc07ffcd517c0929335bd4af4eb19d8adfc6acc677f9da0a9f9a21963",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for id in hostile {
            let name = file_name_for(id);
            assert!(
                name.starts_with("vol-") && name.ends_with(".json"),
                "{name}"
            );
            assert!(!name.contains('/') && !name.contains(".."), "{name}");
            assert!(name.len() <= 255, "{name}");
            assert!(seen.insert(name), "collision for {id:?}");
        }
        assert!(file_name_for(&"x".repeat(10_000)).len() <= 255);
    }
}

//! The real values, read from the sidecar's CSI volume (which the agent
//! container does not mount), and the placeholders the agent uses instead.
//! The node plugin swaps the volume's content atomically on rotation and
//! removes files on revocation; a poll every 100 ms notices both.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::rules::ProxyRules;

/// A secret value. No Debug or Display: it must not reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Value(Arc<[u8]>);

impl Value {
    pub fn new(bytes: &[u8]) -> Self {
        // A trailing newline (from `kubectl create secret --from-file`) can
        // not travel in a header; it is never part of an API key.
        let trimmed = bytes
            .strip_suffix(b"\n")
            .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
            .unwrap_or(bytes);
        Value(Arc::from(trimmed))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What the volume holds now, by file name. A file that is gone (revoked,
/// expired, suspended) is absent.
#[derive(Default)]
pub struct Snapshot {
    values: BTreeMap<String, Value>,
}

impl Snapshot {
    pub fn get(&self, file: &str) -> Option<&Value> {
        self.values.get(file)
    }
}

pub struct ValueStore {
    dir: PathBuf,
    files: Vec<String>,
    current: RwLock<Arc<Snapshot>>,
}

/// Identity of the files as last read: a change of any (rename by the
/// atomic writer, removal, rewrite) triggers a re-read.
type Stamp = Vec<Option<(u64, u64, i64, i64, u64)>>;

impl ValueStore {
    pub fn new(dir: PathBuf, rules: &ProxyRules) -> Arc<Self> {
        let files = rules
            .grants
            .iter()
            .flat_map(|g| g.keys.iter().map(|k| k.file.clone()))
            .collect();
        Arc::new(ValueStore {
            dir,
            files,
            current: RwLock::new(Arc::new(Snapshot::default())),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn stamp(&self) -> Stamp {
        self.files
            .iter()
            .map(|f| {
                std::fs::metadata(self.dir.join(f))
                    .ok()
                    .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
            })
            .collect()
    }

    /// Reads every value now; returns how many files were present.
    pub fn reload(&self) -> usize {
        let mut values = BTreeMap::new();
        for f in &self.files {
            // Opened through the volume's symlinks (the atomic writer's
            // layout); the volume is the sidecar's own, the agent cannot
            // plant anything in it.
            if let Ok(bytes) = std::fs::read(self.dir.join(f)) {
                values.insert(f.clone(), Value::new(&bytes));
            }
        }
        let n = values.len();
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Snapshot { values });
        n
    }

    /// Re-reads on every change until the process ends.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut last = self.stamp();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.stamp();
            if now != last {
                // A rename lands between two stats: read after stamping so
                // a change during the read is seen on the next tick.
                let present = self.reload();
                tracing::info!(
                    present,
                    of = self.files.len(),
                    "proxy: values changed, re-read"
                );
                last = now;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no randomness for the placeholders (getrandom failed)")]
    Random,
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The placeholder of every proxied key, by file name: kept from an earlier
/// run of the sidecar in this pod (so the agent's copy stays valid across a
/// sidecar restart), otherwise fresh random.
pub fn placeholders(
    agent_dir: &Path,
    rules: &ProxyRules,
) -> Result<BTreeMap<String, String>, PublishError> {
    let dir = agent_dir.join("placeholders");
    std::fs::create_dir_all(&dir).map_err(|source| PublishError::Write {
        path: dir.clone(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for g in &rules.grants {
        for k in &g.keys {
            let path = dir.join(&k.file);
            let kept = std::fs::read_to_string(&path)
                .ok()
                .filter(|p| is_placeholder(p));
            let placeholder = match kept {
                Some(p) => p,
                None => {
                    let p = fresh_placeholder().ok_or(PublishError::Random)?;
                    write_public(&path, p.as_bytes())?;
                    p
                }
            };
            out.insert(k.file.clone(), placeholder);
        }
    }
    Ok(out)
}

const PLACEHOLDER_PREFIX: &str = "scopehold-placeholder-";

fn fresh_placeholder() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).ok()?;
    Some(format!("{PLACEHOLDER_PREFIX}{}", hex::encode(bytes)))
}

fn is_placeholder(text: &str) -> bool {
    text.strip_prefix(PLACEHOLDER_PREFIX)
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Writes a public file (placeholder, CA certificate) for the agent,
/// replacing any earlier one atomically.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    let tmp = path.with_extension("tmp");
    let fail = |source| PublishError::Write {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(bytes).map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_look_like_placeholders() {
        let p = fresh_placeholder().unwrap();
        assert!(is_placeholder(&p));
        assert_ne!(Some(p), fresh_placeholder());
        assert!(!is_placeholder("scopehold-placeholder-xyz"));
    }

    #[test]
    fn a_trailing_newline_is_not_part_of_the_value() {
        assert_eq!(Value::new(b"abc\n").bytes(), b"abc");
        assert_eq!(Value::new(b"abc\r\n").bytes(), b"abc");
        assert_eq!(Value::new(b"abc").bytes(), b"abc");
    }
}

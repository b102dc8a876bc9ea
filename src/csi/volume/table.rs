//! The node plugin's in-memory view of its published volumes: the registry
//! entry of each (names, digests, expiry; mirrored on disk) and the pod's
//! token from the last NodePublishVolume.
//!
//! The token lives here only, in memory: it is never written to the registry
//! or logged ([`PodToken`]'s `Debug` redacts it). Kubelet sends a fresh one
//! with every republish, so the push path can re-resolve with the pod's own
//! identity between republishes; after a restart there is none until the
//! next republish, and the push path falls back to `GrantStates`.
//!
//! Each volume also keeps its [`VolumeHandle`]: the detached writable view
//! every write goes through, made once per volume (and again after a
//! restart), and the volume's [`VolumeLayout`]. While a handle exists its
//! layout is the authority (it changes with every write); the entry's copy
//! follows it and is what the registry persists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::atomic_writer::{AtomicWriter, Retiring, SharedLayout, VolumeLayout};
use super::context::PodToken;
use super::mounter::{DetachedView, MountError, Mounter};
use super::registry::PublishedVolume;

/// How one volume is written: its detached writable view, what the plugin
/// made in it and the versions still within their grace period.
#[derive(Debug)]
pub struct VolumeHandle {
    view: DetachedView,
    target: PathBuf,
    layout: SharedLayout,
    retiring: Retiring,
}

impl VolumeHandle {
    /// A handle for our tmpfs at `target`, which holds what `layout` names
    /// (`None`: not recorded, adopted from the directory on first use; an
    /// empty layout for a fresh tmpfs, or one whose content is not trusted).
    pub fn open(
        mounter: &Mounter,
        target: &Path,
        layout: Option<VolumeLayout>,
    ) -> Result<Self, MountError> {
        Ok(Self {
            view: mounter.detached_view(target)?,
            target: target.to_path_buf(),
            layout: Arc::new(Mutex::new(layout)),
            retiring: Retiring::default(),
        })
    }

    /// A writer for the volume, through the view's descriptor.
    pub fn writer(&self) -> AtomicWriter {
        AtomicWriter::from_dir(self.view.dir(), &self.target, self.layout.clone())
            .with_retiring(self.retiring.clone())
    }

    /// What the plugin made in the volume, as far as known.
    pub fn layout(&self) -> Option<VolumeLayout> {
        self.layout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the volume's target still shows this tmpfs (resolved from
    /// the kubelet directory's descriptor, symlinks refused).
    pub fn serves(&self, mounter: &Mounter, target: &Path) -> bool {
        mounter.device_of(target) == Some(self.view.dev())
    }
}

/// A token that expires within this margin is not used any more: custody
/// would refuse it, and a refusal withdraws content.
const TOKEN_EXPIRY_MARGIN: jiff::SignedDuration = jiff::SignedDuration::from_secs(10);

/// What to do with the held token when an entry is stored.
#[derive(Debug)]
pub enum TokenUpdate {
    /// Keep whatever token is held.
    Keep,
    /// Hold this one (from a NodePublishVolume).
    Set(PodToken),
    /// Forget it (custody rejected it).
    Clear,
}

#[derive(Debug)]
struct Tracked {
    entry: PublishedVolume,
    token: Option<PodToken>,
    handle: Option<Arc<VolumeHandle>>,
}

/// The published volumes, shared by the Node service, the push path and the
/// expiry timer. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct VolumeTable {
    volumes: Arc<Mutex<HashMap<String, Tracked>>>,
    /// Signalled whenever an entry (and so possibly an expiry) changes.
    changed: Arc<Notify>,
}

impl VolumeTable {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `entry` (replacing an older one) and updates the token. The
    /// entry's layout is the handle's while one serves the same target,
    /// else the older entry's when `entry` brings none.
    pub fn upsert(&self, mut entry: PublishedVolume, token: TokenUpdate) {
        {
            let mut volumes = self.lock();
            let (previous, handle) = match volumes.remove(&entry.volume_id) {
                // A handle belongs to the target it was made for.
                Some(t) if t.entry.target_path == entry.target_path => {
                    if let Some(handle) = &t.handle {
                        entry.layout = handle.layout();
                    } else if entry.layout.is_none() {
                        entry.layout = t.entry.layout;
                    }
                    (t.token, t.handle)
                }
                Some(t) => (t.token, None),
                None => (None, None),
            };
            let token = match token {
                TokenUpdate::Keep => previous,
                TokenUpdate::Set(token) => Some(token),
                TokenUpdate::Clear => None,
            };
            volumes.insert(
                entry.volume_id.clone(),
                Tracked {
                    entry,
                    token,
                    handle,
                },
            );
        }
        self.changed.notify_one();
    }

    /// Forgets the token of `volume_id` (custody no longer accepts it).
    pub fn clear_token(&self, volume_id: &str) {
        if let Some(tracked) = self.lock().get_mut(volume_id) {
            tracked.token = None;
        }
    }

    /// The volume's handle if it still serves `target`, else a new one
    /// (kept for next time). Blocking: may mount.
    pub fn handle(
        &self,
        volume_id: &str,
        target: &Path,
        mounter: &Mounter,
    ) -> Result<Arc<VolumeHandle>, MountError> {
        let cached = self
            .lock()
            .get(volume_id)
            .and_then(|t| t.handle.clone())
            .filter(|handle| handle.serves(mounter, target));
        if let Some(handle) = cached {
            return Ok(handle);
        }
        let layout = self
            .lock()
            .get(volume_id)
            .filter(|tracked| tracked.entry.target_path == target)
            .and_then(|tracked| tracked.entry.layout.clone());
        let handle = Arc::new(VolumeHandle::open(mounter, target, layout)?);
        if let Some(tracked) = self.lock().get_mut(volume_id)
            && tracked.entry.target_path == target
        {
            tracked.handle = Some(handle.clone());
        }
        Ok(handle)
    }

    /// Keeps `handle` for the volume (made by its first publish), and its
    /// layout in the entry.
    pub fn set_handle(&self, volume_id: &str, handle: Arc<VolumeHandle>) {
        if let Some(tracked) = self.lock().get_mut(volume_id) {
            tracked.entry.layout = handle.layout();
            tracked.handle = Some(handle);
        }
    }

    /// Drops the volume's handle (its tmpfs was unmounted).
    pub fn clear_handle(&self, volume_id: &str) {
        if let Some(tracked) = self.lock().get_mut(volume_id) {
            tracked.handle = None;
        }
    }

    /// Forgets the volume (unpublished).
    pub fn remove(&self, volume_id: &str) -> Option<PublishedVolume> {
        let removed = self.lock().remove(volume_id).map(|t| t.entry);
        self.changed.notify_one();
        removed
    }

    /// The entry of `volume_id` and a token that is still usable at `now`.
    pub fn get(
        &self,
        volume_id: &str,
        now: jiff::Timestamp,
    ) -> Option<(PublishedVolume, Option<PodToken>)> {
        self.lock().get(volume_id).map(|tracked| {
            let token = tracked
                .token
                .as_ref()
                .filter(|token| token_usable(token, now))
                .cloned();
            (tracked.entry.clone(), token)
        })
    }

    /// The target path of `volume_id`, if it is tracked.
    pub fn target_of(&self, volume_id: &str) -> Option<PathBuf> {
        self.lock()
            .get(volume_id)
            .map(|tracked| tracked.entry.target_path.clone())
    }

    /// Every tracked entry (a snapshot).
    pub fn entries(&self) -> Vec<PublishedVolume> {
        let mut entries: Vec<PublishedVolume> =
            self.lock().values().map(|t| t.entry.clone()).collect();
        entries.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        entries
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many volumes hold a usable token (for the status log line).
    pub fn with_token(&self, now: jiff::Timestamp) -> usize {
        self.lock()
            .values()
            .filter(|t| {
                t.token
                    .as_ref()
                    .is_some_and(|token| token_usable(token, now))
            })
            .count()
    }

    /// The earliest expiry after `now` of any mounted grant.
    pub fn next_expiry_after(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        self.lock()
            .values()
            .flat_map(|t| t.entry.grants.iter().filter_map(|g| g.expires_at))
            .filter(|at| *at > now)
            .min()
    }

    /// Per volume, the mounted grants whose expiry is at or before `now`.
    pub fn expired(&self, now: jiff::Timestamp) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .lock()
            .values()
            .filter_map(|t| {
                let grants: Vec<String> = t
                    .entry
                    .grants
                    .iter()
                    .filter(|g| g.expires_at.is_some_and(|at| at <= now))
                    .map(|g| g.grant.clone())
                    .collect();
                (!grants.is_empty()).then(|| (t.entry.volume_id.clone(), grants))
            })
            .collect();
        out.sort();
        out
    }

    /// Resolves after the next change (or at once if one happened since
    /// the last call): the expiry timer re-plans then.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

fn token_usable(token: &PodToken, now: jiff::Timestamp) -> bool {
    token
        .expires_at()
        .is_none_or(|expires_at| expires_at > now + TOKEN_EXPIRY_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume::context::parse_publish_attributes;
    use crate::csi::volume::registry::{PodRef, PublishedGrant, REGISTRY_FORMAT_VERSION};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn entry(id: &str, expiries: &[(&str, Option<&str>)]) -> Result<PublishedVolume, jiff::Error> {
        let now: jiff::Timestamp = "2026-11-26T10:00:00Z".parse()?;
        let mut grants = Vec::new();
        for (grant, expiry) in expiries {
            grants.push(PublishedGrant {
                grant: (*grant).to_owned(),
                secret: "s".to_owned(),
                content_digest: "0123456789ab".to_owned(),
                expires_at: expiry.map(str::parse).transpose()?,
                files: vec![format!("{grant}-file")],
                keys: vec![],
            });
        }
        Ok(PublishedVolume {
            format_version: REGISTRY_FORMAT_VERSION,
            volume_id: id.to_owned(),
            target_path: PathBuf::from(format!("/k/{id}/mount")),
            pod: PodRef {
                namespace: "ns".to_owned(),
                name: "p".to_owned(),
                uid: "u".to_owned(),
                service_account_name: "sa".to_owned(),
            },
            agent: "a".to_owned(),
            requested_grants: vec![],
            grants,
            fs_group: None,
            read_only: true,
            published_at: now,
            updated_at: now,
            layout: None,
        })
    }

    /// A token as kubelet passes it, expiring at `expires`.
    fn token(expires: &str) -> Result<PodToken, Box<dyn std::error::Error>> {
        let tokens = serde_json::json!({"scopehold.dev": {
            "token": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
            "expirationTimestamp": expires,
        }})
        .to_string();
        let context = [
            ("csi.storage.k8s.io/pod.name", "p"),
            ("csi.storage.k8s.io/pod.namespace", "ns"),
            (
                "csi.storage.k8s.io/pod.uid",
                "0f8e6a2c-3b1d-4c5e-9f70-1a2b3c4d5e6f",
            ),
            ("csi.storage.k8s.io/serviceAccount.name", "sa"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let secrets = [(
            "csi.storage.k8s.io/serviceAccount.tokens".to_owned(),
            tokens,
        )]
        .into_iter()
        .collect();
        Ok(parse_publish_attributes(&context, &secrets)?.token)
    }

    #[test]
    fn tokens_are_kept_replaced_cleared_and_expire() -> TestResult {
        let table = VolumeTable::new();
        let now: jiff::Timestamp = "2026-11-26T10:00:00Z".parse()?;
        table.upsert(
            entry("v1", &[])?,
            TokenUpdate::Set(token("2026-11-26T11:00:00Z")?),
        );
        assert!(table.get("v1", now).ok_or("missing")?.1.is_some());
        // A registry update keeps the token.
        table.upsert(entry("v1", &[("g", None)])?, TokenUpdate::Keep);
        assert!(table.get("v1", now).ok_or("missing")?.1.is_some());
        assert_eq!(table.with_token(now), 1);
        // Close to its expiry the token is no longer offered.
        let late: jiff::Timestamp = "2026-11-26T10:59:55Z".parse()?;
        assert!(table.get("v1", late).ok_or("missing")?.1.is_none());
        table.clear_token("v1");
        assert!(table.get("v1", now).ok_or("missing")?.1.is_none());
        table.upsert(
            entry("v1", &[])?,
            TokenUpdate::Set(token("2026-11-26T11:00:00Z")?),
        );
        table.upsert(entry("v1", &[])?, TokenUpdate::Clear);
        assert!(table.get("v1", now).ok_or("missing")?.1.is_none());
        assert!(table.remove("v1").is_some());
        assert!(table.is_empty());
        Ok(())
    }

    #[test]
    fn expiries_are_found_per_grant() -> TestResult {
        let table = VolumeTable::new();
        table.upsert(
            entry(
                "v1",
                &[
                    ("soon", Some("2026-11-26T10:00:05Z")),
                    ("later", Some("2026-11-26T12:00:00Z")),
                    ("never", None),
                ],
            )?,
            TokenUpdate::Keep,
        );
        table.upsert(
            entry("v2", &[("soon", Some("2026-11-26T10:00:07Z"))])?,
            TokenUpdate::Keep,
        );
        let start: jiff::Timestamp = "2026-11-26T10:00:00Z".parse()?;
        assert_eq!(
            table.next_expiry_after(start),
            Some("2026-11-26T10:00:05Z".parse()?)
        );
        assert_eq!(
            table.next_expiry_after("2026-11-26T10:00:05Z".parse()?),
            Some("2026-11-26T10:00:07Z".parse()?)
        );
        assert!(table.expired("2026-11-26T10:00:04Z".parse()?).is_empty());
        assert_eq!(
            table.expired("2026-11-26T10:00:06Z".parse()?),
            vec![("v1".to_owned(), vec!["soon".to_owned()])]
        );
        assert_eq!(table.expired("2026-11-26T10:00:07Z".parse()?).len(), 2);
        Ok(())
    }

    #[test]
    fn debug_output_never_shows_the_token() -> TestResult {
        let table = VolumeTable::new();
        table.upsert(
            entry("v1", &[])?,
            TokenUpdate::Set(token("2026-11-26T11:00:00Z")?),
        );
        let text = format!("{table:?}");
        assert!(!text.contains("c2ln"), "{text}");
        Ok(())
    }
}

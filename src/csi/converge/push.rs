//! The push path: one `WatchInvalidations` stream to custody for the whole
//! node plugin, kept open for as long as the plugin runs.
//!
//! Each invalidation is matched against the published volumes (same
//! namespace; the same agent when it names one; RESYNC matches all) and
//! becomes [`Work`] for the volumes it concerns: a revoked, expired or
//! deleted grant is withdrawn locally at once, a suspended, deleted or
//! conflicting agent loses everything, and a rotation or any other change
//! re-resolves (with the pod's held token; without one, `GrantStates`).
//! Custody sends RESYNC first on every (re)connect, so a change missed while
//! disconnected, or while this plugin was not running, is caught up at once.
//!
//! A broken stream is reopened with exponential backoff (capped at
//! [`MAX_BACKOFF`]); connects and disconnects are logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;

use super::resolver::Resolver;
use super::{NodeService, Work};
use crate::csi::errors::shorten;
use crate::csi::volume::registry::PublishedVolume;
use crate::proto::scopehold::v1::Invalidation;
use crate::proto::scopehold::v1::invalidation::Kind;

/// First reconnect delay, and its cap ("a few seconds": a custody that
/// restarts is back in well under that).
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// Whether the stream is up, for the CSI Probe and for tests.
#[derive(Debug, Default)]
pub struct PushState {
    connected: AtomicBool,
    /// Invalidations received since start.
    received: AtomicU64,
    /// Invalidations that concerned a volume here (RESYNC always), by kind.
    applied: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl PushState {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Applied invalidations by kind (`revoked`, `rotated`, `resync`, ...).
    pub fn applied(&self) -> Vec<(&'static str, u64)> {
        self.applied
            .lock()
            .map(|a| a.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    fn count_applied(&self, kind: Kind, volumes: usize) {
        if volumes == 0 && kind != Kind::Resync {
            return;
        }
        let name = kind.as_str_name();
        let name = name.strip_prefix("KIND_").unwrap_or(name);
        let label = match name {
            "REVOKED" => "revoked",
            "EXPIRED" => "expired",
            "SUSPENDED" => "suspended",
            "ROTATED" => "rotated",
            "DELETED" => "deleted",
            "CONFLICT" => "conflict",
            "CHANGED" => "changed",
            "RESYNC" => "resync",
            _ => "other",
        };
        if let Ok(mut a) = self.applied.lock() {
            *a.entry(label).or_default() += 1;
        }
    }
}

/// Exponential backoff with ±20 % jitter, so that the node plugins of a
/// cluster do not reconnect in lockstep after a custody restart.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: INITIAL_BACKOFF,
        }
    }

    fn reset(&mut self) {
        self.next = INITIAL_BACKOFF;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let mut byte = [0_u8; 1];
        let jitter = if getrandom::fill(&mut byte).is_ok() {
            // 0.8 ..= 1.2
            0.8 + f64::from(byte[0]) / 255.0 * 0.4
        } else {
            1.0
        };
        base.mul_f64(jitter).min(MAX_BACKOFF)
    }
}

/// Keeps the stream open and applies what arrives, until the task is
/// aborted (the plugin shuts down).
pub async fn run<R: Resolver>(service: NodeService<R>, state: Arc<PushState>) {
    let node_name = service.config().node_name.clone();
    let mut backoff = Backoff::new();
    let mut failures: u64 = 0;
    loop {
        match service
            .resolver()
            .watch_invalidations(node_name.clone())
            .await
        {
            Ok(mut stream) => {
                state.connected.store(true, Ordering::Relaxed);
                tracing::info!(
                    volumes = service.volumes().len(),
                    "custody invalidation stream connected"
                );
                let ended = loop {
                    match stream.next().await {
                        Some(Ok(invalidation)) => {
                            // The stream works: the next failure starts the
                            // backoff afresh.
                            backoff.reset();
                            failures = 0;
                            state.received.fetch_add(1, Ordering::Relaxed);
                            let volumes = apply(&service, &invalidation);
                            state.count_applied(invalidation.kind(), volumes);
                        }
                        Some(Err(status)) => {
                            break format!(
                                "{:?}: {}",
                                status.code(),
                                shorten(status.message(), 256)
                            );
                        }
                        None => break "closed by custody".to_owned(),
                    }
                };
                state.connected.store(false, Ordering::Relaxed);
                tracing::warn!(reason = %ended, "custody invalidation stream disconnected");
            }
            Err(status) => {
                failures += 1;
                // Every failure is logged while custody is away; the
                // backoff keeps that to one line per few seconds.
                tracing::warn!(
                    code = ?status.code(),
                    message = %shorten(status.message(), 256),
                    attempt = failures,
                    "cannot open the custody invalidation stream"
                );
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(
            retry_in_ms = delay.as_millis() as u64,
            "reconnecting to custody"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Queues work for every volume the invalidation concerns; returns how many.
pub fn apply<R: Resolver>(service: &NodeService<R>, invalidation: &Invalidation) -> usize {
    let mut matched = 0_usize;
    for volume in service.volumes().entries() {
        if let Some(work) = plan(invalidation, &volume) {
            // Before the work is queued: an answer in flight for this
            // volume that predates the change must not be applied.
            service.floors.record(&volume.volume_id, invalidation);
            service.enqueue(&volume.volume_id, work);
            matched += 1;
        }
    }
    let kind = invalidation.kind();
    if matched > 0 || kind == Kind::Resync {
        tracing::info!(
            kind = kind.as_str_name(),
            namespace = %invalidation.namespace,
            agent = %invalidation.agent,
            grant = %invalidation.grant,
            secret = %invalidation.secret,
            volumes = matched,
            "invalidation"
        );
    } else {
        tracing::debug!(
            kind = kind.as_str_name(),
            namespace = %invalidation.namespace,
            agent = %invalidation.agent,
            grant = %invalidation.grant,
            "invalidation concerns no volume on this node"
        );
    }
    matched
}

/// What an invalidation means for one volume, if anything.
pub fn plan(invalidation: &Invalidation, volume: &PublishedVolume) -> Option<Work> {
    let kind = invalidation.kind();
    if kind == Kind::Resync {
        return Some(Work::refresh());
    }
    if invalidation.namespace != volume.pod.namespace {
        return None;
    }
    // An empty agent on the volume means nothing resolved yet (or it was
    // refused before): any change in its namespace may concern it.
    if !invalidation.agent.is_empty()
        && !volume.agent.is_empty()
        && invalidation.agent != volume.agent
    {
        return None;
    }
    let grant = invalidation.grant.as_str();
    if !grant.is_empty()
        && !volume.requested_grants.is_empty()
        && !volume.requested_grants.iter().any(|g| g == grant)
    {
        return None;
    }
    let held = volume.grants.iter().find(|g| g.grant == grant);
    match kind {
        // Queued even when the grant is not mounted here right now: a
        // refresh in progress may be about to mount it (custody answered it
        // before the change), and the queue runs this after that refresh.
        // When it runs, a grant that is not mounted costs nothing.
        Kind::Revoked | Kind::Expired | Kind::Deleted if !grant.is_empty() => {
            Some(Work::withdraw_grants([grant.to_owned()], reason(kind)))
        }
        // The agent itself was deleted, suspended or is in conflict.
        Kind::Revoked | Kind::Expired | Kind::Deleted | Kind::Suspended | Kind::Conflict => {
            Some(Work::withdraw_all(reason(kind)))
        }
        Kind::Rotated => match held {
            // Already holds that content (the digest arrives twice: from the
            // Secret watch and with the grant's status).
            Some(held)
                if !invalidation.content_digest.is_empty()
                    && held.content_digest == invalidation.content_digest =>
            {
                None
            }
            _ => Some(Work::refresh()),
        },
        Kind::Changed | Kind::Unspecified | Kind::Resync => Some(Work::refresh()),
    }
}

/// The audit reason of a withdrawal caused by `kind`.
fn reason(kind: Kind) -> &'static str {
    match kind {
        Kind::Revoked => "Revoked",
        Kind::Expired => "Expired",
        Kind::Deleted => "Deleted",
        Kind::Suspended => "AgentSuspended",
        Kind::Conflict => "Conflict",
        Kind::Rotated => "Rotated",
        Kind::Changed => "Changed",
        Kind::Resync => "Resync",
        Kind::Unspecified => "Unspecified",
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::csi::volume::registry::{PodRef, PublishedGrant, REGISTRY_FORMAT_VERSION};

    fn volume(agent: &str, requested: &[&str], held: &[(&str, &str)]) -> PublishedVolume {
        let now = jiff::Timestamp::UNIX_EPOCH;
        PublishedVolume {
            format_version: REGISTRY_FORMAT_VERSION,
            volume_id: "csi-1".to_owned(),
            target_path: PathBuf::from("/k/mount"),
            pod: PodRef {
                namespace: "team".to_owned(),
                name: "pod".to_owned(),
                uid: "uid".to_owned(),
                service_account_name: "sa".to_owned(),
            },
            agent: agent.to_owned(),
            requested_grants: requested.iter().map(|g| (*g).to_owned()).collect(),
            grants: held
                .iter()
                .map(|(grant, digest)| PublishedGrant {
                    grant: (*grant).to_owned(),
                    secret: "s".to_owned(),
                    content_digest: (*digest).to_owned(),
                    expires_at: None,
                    files: vec![format!("{grant}.txt")],
                    keys: vec![],
                })
                .collect(),
            fs_group: None,
            read_only: true,
            published_at: now,
            updated_at: now,
            layout: None,
        }
    }

    fn inv(kind: Kind, namespace: &str, agent: &str, grant: &str, digest: &str) -> Invalidation {
        Invalidation {
            kind: kind as i32,
            namespace: namespace.to_owned(),
            agent: agent.to_owned(),
            grant: grant.to_owned(),
            secret: String::new(),
            content_digest: digest.to_owned(),
            occurred_at: None,
            versions: None,
        }
    }

    #[test]
    fn invalidations_match_by_namespace_agent_and_held_grant() {
        let v = volume("bot", &[], &[("g", "aaa"), ("h", "bbb")]);
        assert_eq!(
            plan(&inv(Kind::Resync, "", "", "", ""), &v),
            Some(Work::refresh())
        );
        assert_eq!(plan(&inv(Kind::Revoked, "other", "bot", "g", ""), &v), None);
        assert_eq!(plan(&inv(Kind::Revoked, "team", "eve", "g", ""), &v), None);
        assert_eq!(
            plan(&inv(Kind::Revoked, "team", "bot", "g", ""), &v),
            Some(Work::withdraw_grants(["g".to_owned()], "Revoked"))
        );
        assert_eq!(
            plan(&inv(Kind::Expired, "team", "bot", "h", ""), &v),
            Some(Work::withdraw_grants(["h".to_owned()], "Expired"))
        );
        // Not mounted here (yet): queued all the same, a no-op unless a
        // refresh in flight mounts it first.
        assert_eq!(
            plan(&inv(Kind::Deleted, "team", "bot", "x", ""), &v),
            Some(Work::withdraw_grants(["x".to_owned()], "Deleted"))
        );
        // The agent deleted, suspended, in conflict: everything goes.
        assert_eq!(
            plan(&inv(Kind::Deleted, "team", "bot", "", ""), &v),
            Some(Work::withdraw_all("Deleted"))
        );
        assert_eq!(
            plan(&inv(Kind::Suspended, "team", "bot", "", ""), &v),
            Some(Work::withdraw_all("AgentSuspended"))
        );
        assert_eq!(
            plan(&inv(Kind::Conflict, "team", "bot", "", ""), &v),
            Some(Work::withdraw_all("Conflict"))
        );
        // Rotation: skipped when the digest is already mounted.
        assert_eq!(
            plan(&inv(Kind::Rotated, "team", "bot", "g", "aaa"), &v),
            None
        );
        assert_eq!(
            plan(&inv(Kind::Rotated, "team", "bot", "g", "ccc"), &v),
            Some(Work::refresh())
        );
        assert_eq!(
            plan(&inv(Kind::Rotated, "team", "bot", "g", ""), &v),
            Some(Work::refresh())
        );
        // A grant not mounted (yet) may appear: re-resolve.
        assert_eq!(
            plan(&inv(Kind::Changed, "team", "bot", "new", ""), &v),
            Some(Work::refresh())
        );
        assert_eq!(
            plan(&inv(Kind::Rotated, "team", "bot", "restored", ""), &v),
            Some(Work::refresh())
        );
    }

    #[test]
    fn a_volume_that_names_its_grants_ignores_the_others() {
        let v = volume("bot", &["g"], &[("g", "aaa")]);
        assert_eq!(plan(&inv(Kind::Changed, "team", "bot", "h", ""), &v), None);
        assert_eq!(plan(&inv(Kind::Rotated, "team", "bot", "h", ""), &v), None);
        assert_eq!(
            plan(&inv(Kind::Changed, "team", "bot", "g", ""), &v),
            Some(Work::refresh())
        );
        // Agent-wide changes still apply.
        assert_eq!(
            plan(&inv(Kind::Changed, "team", "bot", "", ""), &v),
            Some(Work::refresh())
        );
    }

    #[test]
    fn a_volume_without_an_agent_follows_its_namespace() {
        let v = volume("", &[], &[]);
        assert_eq!(
            plan(&inv(Kind::Changed, "team", "bot", "g", ""), &v),
            Some(Work::refresh())
        );
        assert_eq!(
            plan(&inv(Kind::Changed, "elsewhere", "bot", "g", ""), &v),
            None
        );
    }

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(first >= INITIAL_BACKOFF.mul_f64(0.79) && first <= INITIAL_BACKOFF.mul_f64(1.21));
        for _ in 0..10 {
            assert!(backoff.next_delay() <= MAX_BACKOFF);
        }
        assert!(backoff.next_delay() >= MAX_BACKOFF.mul_f64(0.79));
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL_BACKOFF.mul_f64(1.21));
    }
}

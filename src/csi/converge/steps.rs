//! Convergence: making a published volume hold exactly what its pod may hold
//! now, without unmounting it.
//!
//! Three ways in, one set of steps:
//! - a republish (kubelet's periodic NodePublishVolume on a mounted target)
//!   with the pod's fresh token;
//! - the push path ([`super::push`]): an invalidation from custody becomes
//!   [`Work`] for the volumes it concerns;
//! - the expiry timer ([`super::expiry`]): a grant's known expiry passed.
//!
//! The steps, always under the volume's per-target lock:
//! - withdrawing named grants (revoked, expired, deleted) or everything
//!   (agent suspended, deleted or in conflict) is local: the files of the
//!   other grants are read back from the volume and written again without
//!   the withdrawn ones, so no custody call is needed and a withdrawal lands
//!   even while custody is down;
//! - refreshing re-resolves with the pod's token and rewrites the files
//!   (nothing is written when they did not change). A refusal withdraws the
//!   volume's files but keeps the mount; an unreachable custody keeps them.
//!   Without a token (after a restart, before the next republish) it asks
//!   `GrantStates` and withdraws the files of every inactive grant, only
//!   those.
//!
//! Every grant whose files leave a volume gets a `ContentWithdrawn` audit
//! line, every grant whose content changed a `SecretRotated` one; both are
//! also reported to custody, which records them as Kubernetes Events
//! ([`super::reports`]). Work for a
//! volume is queued per volume ([`WorkQueue`]): what arrives while the
//! volume is busy is merged and done next, so a burst of invalidations costs
//! one pass per volume.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use tonic::{Code, Status};

use super::payload::build_payload;
use super::resolver::Resolver;
use super::work::{Step, Withdrawal, Work};
use super::{NodeService, RETIRE_DELAY, blocking, new_request_id};
use crate::audit::{AuditRecord, Decision};
use crate::csi::errors::{PublishError, error_chain, shorten};
use crate::csi::volume::atomic_writer::{Payload, WriteOutcome};
use crate::csi::volume::context::PodToken;
use crate::csi::volume::mounter::UnmountMode;
use crate::csi::volume::registry::{PublishedGrant, PublishedVolume};
use crate::csi::volume::table::TokenUpdate;
use crate::proto::scopehold::v1::{GrantRef, NodeReport, ResolveRequest, ResolveResponse};

/// Custody's refusal reasons are shortened to this length in audit lines.
const MAX_REASON_BYTES: usize = 64;

/// The result of converging one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Converged {
    /// A new version of the files was written (content changed or left).
    Written,
    /// The files already matched.
    Unchanged,
    /// Custody could not be asked; the files were kept as they are.
    Kept,
}

impl Converged {
    pub fn write_outcome(self) -> WriteOutcome {
        match self {
            Self::Written => WriteOutcome::Written,
            Self::Unchanged | Self::Kept => WriteOutcome::Unchanged,
        }
    }
}

/// A permit for custody calls (none only if the semaphore were closed,
/// which never happens; the call then goes ahead unthrottled).
type Permit = Option<tokio::sync::OwnedSemaphorePermit>;

/// `Reason` from custody's `Reason: message` statuses (a PascalCase word),
/// else the code name.
fn refusal_reason(status: &Status) -> String {
    match status.message().split_once(':') {
        Some((head, _))
            if head.len() <= MAX_REASON_BYTES
                && head.starts_with(|c: char| c.is_ascii_uppercase())
                && head.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            head.to_owned()
        }
        _ => format!("{:?}", status.code()),
    }
}

fn timestamp(at: &prost_types::Timestamp) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(at.seconds, at.nanos).ok()
}

impl<R: Resolver> NodeService<R> {
    /// A permit for one custody call; `None` only if the semaphore was
    /// closed, which never happens (the call then goes ahead unthrottled).
    pub(crate) async fn custody_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.custody_permits.acquire().await.ok()
    }

    /// Queues `work` for a volume and makes sure a worker runs it.
    pub fn enqueue(&self, volume_id: &str, work: Work) {
        if work.is_empty() {
            return;
        }
        if self.work.add(volume_id, work) {
            let service = self.clone();
            let volume_id = volume_id.to_owned();
            tokio::spawn(async move { service.drain(volume_id).await });
        }
    }

    /// Volumes with work queued or in progress.
    pub fn busy_volumes(&self) -> usize {
        self.work.busy()
    }

    /// A volume's worker: withdrawals at once, a refresh once a custody
    /// permit is free (a withdrawal that arrives meanwhile goes first, and
    /// invalidations that arrive meanwhile merge into the waiting refresh).
    async fn drain(self, volume_id: String) {
        loop {
            match self.work.next_step(&volume_id) {
                Step::Withdraw(withdrawal) => {
                    self.perform_withdrawal(&volume_id, withdrawal).await;
                }
                Step::Refresh(arrived) => {
                    let Some(target) = self.volumes.target_of(&volume_id) else {
                        // Unpublished meanwhile.
                        self.work.take_refresh(&volume_id);
                        continue;
                    };
                    // The volume's lock first, then a permit: the order a
                    // publish takes them in, so the two never wait on each
                    // other in a cycle.
                    let guard = self.locks.lock(&target.to_string_lossy()).await;
                    let permit = tokio::select! {
                        biased;
                        () = arrived.notified() => continue,
                        permit = self.custody_permits.clone().acquire_owned() => permit.ok(),
                    };
                    if self.work.take_refresh(&volume_id) {
                        self.refresh_volume_locked(&volume_id, permit).await;
                    }
                    drop(guard);
                }
                Step::Done => return,
            }
        }
    }

    /// Withdraws files of a volume (local only). Failures are logged; the
    /// next invalidation, republish or expiry tries again.
    async fn perform_withdrawal(&self, volume_id: &str, withdrawal: Withdrawal) {
        let Some(target) = self.volumes.target_of(volume_id) else {
            return;
        };
        let _guard = self.locks.lock(&target.to_string_lossy()).await;
        // Unpublished while queued: nothing to do.
        let Some((entry, _)) = self.volumes.get(volume_id, jiff::Timestamp::now()) else {
            return;
        };
        if let Err(error) = self.withdraw_locked(entry.clone(), withdrawal, None).await {
            tracing::error!(
                volume_id = %volume_id,
                namespace = %entry.pod.namespace,
                pod = %entry.pod.name,
                error = %error_chain(&error),
                "could not withdraw files"
            );
        }
    }

    /// Re-resolves a volume; the caller holds its lock and got `permit`.
    async fn refresh_volume_locked(&self, volume_id: &str, permit: Permit) {
        let Some((entry, token)) = self.volumes.get(volume_id, jiff::Timestamp::now()) else {
            return;
        };
        let request_id = new_request_id();
        match self
            .refresh_locked(entry.clone(), token, TokenUpdate::Keep, &request_id, permit)
            .await
        {
            Ok(Converged::Kept) => self.retry_refresh_later(volume_id),
            Ok(_) => self.work.forget_retry(volume_id),
            Err(error) => tracing::error!(
                volume_id = %volume_id,
                namespace = %entry.pod.namespace,
                pod = %entry.pod.name,
                request_id = %request_id,
                error = %error_chain(&error),
                "could not converge the volume"
            ),
        }
    }

    /// Custody could not answer a refresh: try again after a backoff
    /// instead of waiting for the next invalidation or kubelet's republish
    /// (a minute or more), because the refresh may carry a revocation that
    /// reached this plugin only as a RESYNC or a changed grant.
    fn retry_refresh_later(&self, volume_id: &str) {
        let Some(delay) = self.work.schedule_retry(volume_id) else {
            return;
        };
        tracing::info!(
            volume_id = %volume_id,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "refresh will be retried"
        );
        let service = self.clone();
        let volume_id = volume_id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            service.work.retry_due(&volume_id);
            if service.volumes.target_of(&volume_id).is_none() {
                service.work.forget_retry(&volume_id);
                return;
            }
            service.enqueue(&volume_id, Work::refresh());
        });
    }

    /// A republish: converge with the fresh token and hold it. Only local
    /// failures fail the call; whatever custody says (or does not say), the
    /// volume was handled and kubelet gets OK.
    pub(crate) async fn republish_locked(
        &self,
        entry: PublishedVolume,
        token: PodToken,
        request_id: &str,
    ) -> Result<WriteOutcome, PublishError> {
        let volume_id = entry.volume_id.clone();
        let pod = entry.pod.clone();
        let permit = self.custody_permits.clone().acquire_owned().await.ok();
        match self
            .refresh_locked(
                entry,
                Some(token.clone()),
                TokenUpdate::Set(token),
                request_id,
                permit,
            )
            .await
        {
            Ok(converged) => {
                let outcome = converged.write_outcome();
                // One line per kubelet republish (requiresRepublish; once per
                // pod sync period): the cadence is visible in the log.
                tracing::info!(
                    volume_id = %volume_id,
                    namespace = %pod.namespace,
                    pod = %pod.name,
                    request_id = %request_id,
                    outcome = ?outcome,
                    "volume republished"
                );
                Ok(outcome)
            }
            Err(error) if error.is_local() => Err(error),
            Err(error) => {
                tracing::error!(
                    volume_id = %volume_id,
                    namespace = %pod.namespace,
                    pod = %pod.name,
                    request_id = %request_id,
                    error = %error_chain(&error),
                    "republish: custody's answer cannot be mounted; the volume keeps its files"
                );
                Ok(WriteOutcome::Unchanged)
            }
        }
    }

    /// Re-resolves the volume with `token` (or checks its grant states
    /// without one) and makes the files match. `hold` says what to do with
    /// the held token. Needs the per-target lock; `permit` (a custody
    /// permit) is released as soon as custody has answered, before writing.
    pub(crate) async fn refresh_locked(
        &self,
        entry: PublishedVolume,
        token: Option<PodToken>,
        hold: TokenUpdate,
        request_id: &str,
        permit: Permit,
    ) -> Result<Converged, PublishError> {
        // Track the volume (and a fresh token) whatever custody answers: the
        // expiry timer and the push path need it from now on.
        self.volumes.upsert(entry.clone(), hold);
        let Some(token) = token else {
            return self.check_grant_states_locked(entry, permit).await;
        };
        let requested = entry.requested_grants.clone();
        match self
            .call_resolve(&entry, &token, &requested, request_id)
            .await
        {
            Ok(response) => {
                drop(permit);
                self.apply_response_locked(entry, &response, request_id)
                    .await
            }
            Err(status) => {
                let error = PublishError::from_custody(&status);
                if !error.is_refusal() {
                    tracing::warn!(
                        volume_id = %entry.volume_id,
                        namespace = %entry.pod.namespace,
                        pod = %entry.pod.name,
                        request_id = %request_id,
                        error = %error_chain(&error),
                        "custody did not answer; the volume keeps its granted files (grants still expire on time)"
                    );
                    // Custody may be unable to verify the pod (a
                    // TokenReview that did not come back in time) yet still
                    // know from its stores that a grant ended or the agent
                    // was suspended: its grant states need no pod token (one
                    // Pod list, answering "unknown", never "inactive", when
                    // that fails), so withdraw what it reports inactive now.
                    // The full refresh is retried either way.
                    self.check_grant_states_locked(entry, permit).await?;
                    return Ok(Converged::Kept);
                }
                if status.code() == Code::Unauthenticated {
                    // The pod's token no longer works (pod deleted, token
                    // expired): wait for the next republish's token.
                    self.volumes.clear_token(&entry.volume_id);
                }
                self.after_refusal_locked(entry, &token, &status, request_id, permit)
                    .await
            }
        }
    }

    /// Custody refused the pod. A volume that names its grants may still be
    /// entitled to some of them: it keeps those (re-resolved) and loses the
    /// rest. Otherwise everything is withdrawn.
    async fn after_refusal_locked(
        &self,
        entry: PublishedVolume,
        token: &PodToken,
        status: &Status,
        request_id: &str,
        permit: Permit,
    ) -> Result<Converged, PublishError> {
        if !entry.requested_grants.is_empty()
            && !entry.agent.is_empty()
            && status.code() != Code::Unauthenticated
        {
            let refs = entry
                .requested_grants
                .iter()
                .map(|grant| GrantRef {
                    namespace: entry.pod.namespace.clone(),
                    grant: grant.clone(),
                    agent: entry.agent.clone(),
                })
                .collect();
            if let Ok(states) = self.resolver.grant_states(refs).await {
                let active: BTreeSet<String> = states
                    .into_iter()
                    .filter(|state| state.active)
                    .filter_map(|state| state.grant_ref.map(|r| r.grant))
                    .filter(|grant| entry.requested_grants.contains(grant))
                    .collect();
                if !active.is_empty() && active.len() < entry.requested_grants.len() {
                    let active: Vec<String> = active.into_iter().collect();
                    if let Ok(response) =
                        self.call_resolve(&entry, token, &active, request_id).await
                    {
                        drop(permit);
                        return self
                            .apply_response_locked(entry, &response, request_id)
                            .await;
                    }
                }
            }
        }
        drop(permit);
        self.withdraw_locked(
            entry,
            Withdrawal::All(refusal_reason(status)),
            Some(request_id),
        )
        .await
    }

    async fn call_resolve(
        &self,
        entry: &PublishedVolume,
        token: &PodToken,
        grants: &[String],
        request_id: &str,
    ) -> Result<ResolveResponse, Status> {
        let request = ResolveRequest {
            request_id: request_id.to_owned(),
            pod_token: token.secret_value().to_owned(),
            pod_namespace: entry.pod.namespace.clone(),
            pod_name: entry.pod.name.clone(),
            pod_uid: entry.pod.uid.clone(),
            service_account_name: entry.pod.service_account_name.clone(),
            node_name: self.config.node_name.clone(),
            volume_id: entry.volume_id.clone(),
            grants: grants.to_vec(),
            fs_group: entry.fs_group.map(i64::from),
        };
        self.resolve_in_order(&entry.volume_id, request).await
    }

    /// Without a token: withdraws the files of every grant custody reports
    /// inactive (and only those), and takes over changed expiries. Custody
    /// unreachable keeps everything (the expiry timer still applies).
    async fn check_grant_states_locked(
        &self,
        entry: PublishedVolume,
        permit: Permit,
    ) -> Result<Converged, PublishError> {
        if entry.grants.is_empty() {
            return Ok(Converged::Unchanged);
        }
        let refs = entry
            .grants
            .iter()
            .map(|grant| GrantRef {
                namespace: entry.pod.namespace.clone(),
                grant: grant.grant.clone(),
                agent: entry.agent.clone(),
            })
            .collect();
        let states = self.resolver.grant_states(refs).await;
        drop(permit);
        let states = match states {
            Ok(states) => states,
            Err(status) => {
                tracing::warn!(
                    volume_id = %entry.volume_id,
                    namespace = %entry.pod.namespace,
                    pod = %entry.pod.name,
                    code = ?status.code(),
                    message = %shorten(status.message(), 256),
                    "custody could not report grant states; the volume keeps its files (grants still expire on time)"
                );
                return Ok(Converged::Kept);
            }
        };
        let mut next = entry.clone();
        let mut withdraw = BTreeMap::new();
        let mut expiry_changed = false;
        for state in states {
            let Some(grant_ref) = state.grant_ref else {
                continue;
            };
            if grant_ref.namespace != entry.pod.namespace || grant_ref.agent != entry.agent {
                continue;
            }
            if !state.active {
                let reason = if state.reason.is_empty() {
                    "Inactive".to_owned()
                } else {
                    shorten(&state.reason, MAX_REASON_BYTES)
                };
                withdraw.insert(grant_ref.grant, reason);
                continue;
            }
            // A known expiry is taken over (never dropped: an answer without
            // one may just mean custody could not evaluate the grant).
            let expires_at = state.expires_at.as_ref().and_then(timestamp);
            if let (Some(expires_at), Some(grant)) = (
                expires_at,
                next.grants.iter_mut().find(|g| g.grant == grant_ref.grant),
            ) && grant.expires_at != Some(expires_at)
            {
                grant.expires_at = Some(expires_at);
                expiry_changed = true;
            }
        }
        if !withdraw.is_empty() {
            return self
                .withdraw_locked(next, Withdrawal::Grants(withdraw), None)
                .await;
        }
        if expiry_changed {
            next.updated_at = jiff::Timestamp::now();
            let registry = self.registry.clone();
            let record = next.clone();
            blocking(
                move || registry.store(&record).map_err(PublishError::Registry),
                PublishError::Task,
            )
            .await?;
            self.volumes.upsert(next, TokenUpdate::Keep);
        }
        Ok(Converged::Unchanged)
    }

    /// Writes custody's answer into the volume (nothing when unchanged) and
    /// records and audits what changed.
    async fn apply_response_locked(
        &self,
        entry: PublishedVolume,
        response: &ResolveResponse,
        request_id: &str,
    ) -> Result<Converged, PublishError> {
        let resolved = build_payload(response, self.config.payload_limit_bytes())?;
        let mut next = entry.clone();
        next.agent = response.agent.clone();
        next.grants = resolved.grants;
        let record_changed = next.agent != entry.agent || next.grants != entry.grants;
        if record_changed {
            next.updated_at = jiff::Timestamp::now();
        }
        let written = match self
            .write_locked(&next, resolved.payload, record_changed)
            .await
        {
            Ok(written) => written,
            Err(error @ PublishError::Write(_)) => {
                // Grants leave but the directory could not be brought back
                // to a known state: as for any withdrawal, the pod loses the
                // volume rather than keep a withdrawn value.
                let withdrawn: Vec<(PublishedGrant, String)> = entry
                    .grants
                    .iter()
                    .filter(|grant| !next.grants.iter().any(|kept| kept.grant == grant.grant))
                    .map(|grant| (grant.clone(), "NoLongerGranted".to_owned()))
                    .collect();
                if withdrawn.is_empty() {
                    return Err(error);
                }
                return self
                    .unmount_locked(entry, &withdrawn, &error, Some(request_id))
                    .await;
            }
            Err(error) => return Err(error),
        };
        self.volumes.upsert(next.clone(), TokenUpdate::Keep);
        self.audit_changes(&entry, &next, request_id);
        if written == WriteOutcome::Written {
            tracing::info!(
                volume_id = %next.volume_id,
                namespace = %next.pod.namespace,
                pod = %next.pod.name,
                agent = %next.agent,
                grants = next.grants.len(),
                request_id = %request_id,
                "volume files updated"
            );
        }
        Ok(match written {
            WriteOutcome::Written => Converged::Written,
            WriteOutcome::Unchanged => Converged::Unchanged,
        })
    }

    /// Removes files from the volume: all of them, or those of some grants
    /// (the others are read back from the volume and kept as they are).
    pub(crate) async fn withdraw_locked(
        &self,
        entry: PublishedVolume,
        withdrawal: Withdrawal,
        request_id: Option<&str>,
    ) -> Result<Converged, PublishError> {
        let (withdrawn, all): (Vec<(PublishedGrant, String)>, bool) = match &withdrawal {
            Withdrawal::All(reason) => (
                entry
                    .grants
                    .iter()
                    .map(|grant| (grant.clone(), reason.clone()))
                    .collect(),
                true,
            ),
            Withdrawal::Grants(reasons) => (
                entry
                    .grants
                    .iter()
                    .filter_map(|grant| {
                        reasons
                            .get(&grant.grant)
                            .map(|reason| (grant.clone(), reason.clone()))
                    })
                    .collect(),
                false,
            ),
        };
        if withdrawn.is_empty() && !all {
            // None of these grants is mounted here.
            return Ok(Converged::Unchanged);
        }
        let mut next = entry.clone();
        next.grants
            .retain(|grant| !withdrawn.iter().any(|(w, _)| w.grant == grant.grant));
        let record_changed = next.grants != entry.grants;
        if record_changed {
            next.updated_at = jiff::Timestamp::now();
        }
        let drop_files: HashSet<String> = withdrawn
            .iter()
            .flat_map(|(grant, _)| grant.files.iter().cloned())
            .collect();
        let keep = if all {
            Keep::Nothing
        } else {
            Keep::AllBut(drop_files)
        };
        let written = match self.write_locked_keeping(&next, keep, record_changed).await {
            Ok(written) => written,
            Err(error) => {
                // The directory could not be brought back to a known state:
                // the pod loses the volume rather than keep a withdrawn value.
                return self
                    .unmount_locked(entry, &withdrawn, &error, request_id)
                    .await;
            }
        };
        self.volumes.upsert(next.clone(), TokenUpdate::Keep);
        for (grant, reason) in &withdrawn {
            self.audit(
                "ContentWithdrawn",
                Decision::Denied,
                &next,
                grant,
                reason,
                Some(&grant.content_digest),
                request_id,
                format!(
                    "files {} withdrawn from the running pod; the volume stays mounted",
                    grant.files.join(",")
                ),
            );
        }
        if written == WriteOutcome::Written {
            tracing::info!(
                volume_id = %next.volume_id,
                namespace = %next.pod.namespace,
                pod = %next.pod.name,
                agent = %next.agent,
                withdrawn = %withdrawn
                    .iter()
                    .map(|(grant, reason)| format!("{}({reason})", grant.grant))
                    .collect::<Vec<_>>()
                    .join(","),
                remaining = next.grants.len(),
                "volume files withdrawn"
            );
        }
        Ok(match written {
            WriteOutcome::Written => Converged::Written,
            WriteOutcome::Unchanged => Converged::Unchanged,
        })
    }

    /// The last resort of a withdrawal: unmount the volume (every layer of
    /// ours at the target), forget its handle and record every grant as
    /// withdrawn with the reason. The registry keeps the volume, with no
    /// grants, so that kubelet's next republish mounts it afresh if the pod
    /// may still hold something.
    async fn unmount_locked(
        &self,
        entry: PublishedVolume,
        withdrawn: &[(PublishedGrant, String)],
        cause: &PublishError,
        request_id: Option<&str>,
    ) -> Result<Converged, PublishError> {
        let cause = shorten(&error_chain(cause), 256);
        let mut next = entry.clone();
        next.grants.clear();
        next.updated_at = jiff::Timestamp::now();
        let mounter = self.mounter.clone();
        let registry = self.registry.clone();
        let stored = next.clone();
        let unmounted = blocking(
            move || {
                mounter
                    .unmount(&stored.target_path, UnmountMode::Detach)
                    .map_err(PublishError::Mount)?;
                registry.store(&stored).map_err(PublishError::Registry)
            },
            PublishError::Task,
        )
        .await;
        self.volumes.upsert(next.clone(), TokenUpdate::Keep);
        self.volumes.clear_handle(&next.volume_id);
        for grant in &entry.grants {
            let reason = withdrawn
                .iter()
                .find(|(w, _)| w.grant == grant.grant)
                .map(|(_, reason)| reason.as_str())
                .unwrap_or("VolumeUnmounted");
            self.audit(
                "ContentWithdrawn",
                Decision::Denied,
                &next,
                grant,
                reason,
                Some(&grant.content_digest),
                request_id,
                format!(
                    "the volume's directory could not be brought back to a known state ({cause}); the volume was unmounted and files {} withdrawn",
                    grant.files.join(",")
                ),
            );
        }
        tracing::error!(
            volume_id = %next.volume_id,
            namespace = %next.pod.namespace,
            pod = %next.pod.name,
            error = %cause,
            unmounted = unmounted.is_ok(),
            "volume unmounted to withdraw its files"
        );
        unmounted.map(|()| Converged::Written)
    }

    async fn write_locked(
        &self,
        record: &PublishedVolume,
        payload: Payload,
        store: bool,
    ) -> Result<WriteOutcome, PublishError> {
        self.write_locked_keeping(record, Keep::Exactly(payload), store)
            .await
    }

    /// Writes the volume's new content through its handle and, when
    /// `store`, the registry entry. A replaced version whose files all
    /// survive (a rotation) is retired by a timer after [`RETIRE_DELAY`], so
    /// the worker does not wait for it.
    async fn write_locked_keeping(
        &self,
        record: &PublishedVolume,
        keep: Keep,
        store: bool,
    ) -> Result<WriteOutcome, PublishError> {
        let mounter = self.mounter.clone();
        let registry = self.registry.clone();
        let volumes = self.volumes.clone();
        let record_id = record.volume_id.clone();
        let record = record.clone();
        let (written, kept, handle, refill) = blocking(
            move || {
                let handle = volumes
                    .handle(&record.volume_id, &record.target_path, &mounter)
                    .map_err(PublishError::Mount)?;
                let writer = handle.writer();
                let attempt = match &keep {
                    Keep::Exactly(payload) => writer.write_graced(payload, record.fs_group),
                    Keep::Nothing => writer.write_graced(&Payload::new(), record.fs_group),
                    Keep::AllBut(drop) => writer.read_current().and_then(|mut payload| {
                        payload.retain(|name, _| !drop.contains(name));
                        writer.write_graced(&payload, record.fs_group)
                    }),
                };
                let mut refill = false;
                let (written, kept) = match attempt {
                    Ok(done) => done,
                    // The directory is not as this plugin left it (links
                    // planted, entries replaced). What it holds is not read
                    // or followed: everything goes, by name, and the files
                    // are written again into the empty directory. Files kept
                    // from the old content cannot be trusted, so a partial
                    // withdrawal writes nothing and asks for a refresh.
                    Err(error) => {
                        tracing::warn!(
                            volume_id = %record.volume_id,
                            error = %error_chain(&error),
                            "the volume's directory was changed behind the plugin's back; wiping and rewriting it"
                        );
                        writer.wipe().map_err(PublishError::Write)?;
                        refill = matches!(keep, Keep::AllBut(_));
                        let payload = match keep {
                            Keep::Exactly(payload) => payload,
                            Keep::Nothing | Keep::AllBut(_) => Payload::new(),
                        };
                        let (_, kept) = writer
                            .write_graced(&payload, record.fs_group)
                            .map_err(PublishError::Write)?;
                        (WriteOutcome::Written, kept)
                    }
                };
                // The entry names what the volume holds: a write that changed
                // that is recorded even when nothing else changed.
                let layout = handle.layout();
                if store || layout != record.layout {
                    let record = PublishedVolume { layout, ..record };
                    registry.store(&record).map_err(PublishError::Registry)?;
                }
                Ok((written, kept, handle, refill))
            },
            PublishError::Task,
        )
        .await?;
        if let Some(version) = kept {
            tokio::spawn(async move {
                tokio::time::sleep(RETIRE_DELAY).await;
                let retired =
                    tokio::task::spawn_blocking(move || handle.writer().retire(&version)).await;
                if let Ok(Err(error)) = retired {
                    tracing::warn!(error = %error_chain(&error), "could not remove a replaced version of a volume's files");
                }
            });
        }
        if refill {
            self.enqueue(&record_id, Work::refresh());
        }
        Ok(written)
    }

    /// Audit lines for what a refresh changed: grants that left, grants
    /// whose content changed. (Custody audits every resolution itself.)
    fn audit_changes(&self, before: &PublishedVolume, after: &PublishedVolume, request_id: &str) {
        for old in &before.grants {
            match after.grants.iter().find(|grant| grant.grant == old.grant) {
                None => self.audit(
                    "ContentWithdrawn",
                    Decision::Denied,
                    after,
                    old,
                    "NoLongerGranted",
                    Some(&old.content_digest),
                    Some(request_id),
                    format!(
                        "custody no longer resolves this grant for the pod; files {} withdrawn",
                        old.files.join(",")
                    ),
                ),
                Some(new) if new.content_digest != old.content_digest => self.audit(
                    "SecretRotated",
                    Decision::Changed,
                    after,
                    new,
                    "Rotated",
                    Some(&new.content_digest),
                    Some(request_id),
                    format!(
                        "files {} now hold content digest {} (was {})",
                        new.files.join(","),
                        new.content_digest,
                        old.content_digest
                    ),
                ),
                Some(_) => {}
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        event: &'static str,
        decision: Decision,
        volume: &PublishedVolume,
        grant: &PublishedGrant,
        reason: &str,
        content_digest: Option<&str>,
        request_id: Option<&str>,
        message: String,
    ) {
        let mut record = AuditRecord::new(event, decision, &volume.pod.namespace);
        record.reason = Some(reason.to_owned());
        record.agent = (!volume.agent.is_empty()).then(|| volume.agent.clone());
        record.service_account = Some(volume.pod.service_account_name.clone());
        record.pod = Some(volume.pod.name.clone());
        record.pod_uid = Some(volume.pod.uid.clone());
        record.node = Some(self.config.node_name.clone());
        record.grant = Some(grant.grant.clone());
        record.secret = Some(grant.secret.clone());
        record.keys = if grant.keys.is_empty() {
            grant.files.clone()
        } else {
            grant.keys.clone()
        };
        record.content_digest = content_digest
            .filter(|digest| !digest.is_empty())
            .map(str::to_owned);
        record.request_id = request_id.map(str::to_owned);
        record.message = Some(message);
        record.emit();
        // And as a Kubernetes Event, through custody.
        self.reports.send(NodeReport {
            event: event.to_owned(),
            reason: reason.to_owned(),
            namespace: record.namespace,
            agent: record.agent.unwrap_or_default(),
            grant: grant.grant.clone(),
            secret: grant.secret.clone(),
            pod_name: volume.pod.name.clone(),
            pod_uid: volume.pod.uid.clone(),
            keys: record.keys,
            content_digest: record.content_digest.unwrap_or_default(),
        });
    }
}

/// What a write keeps of the volume's files.
enum Keep {
    /// Exactly this payload.
    Exactly(Payload),
    /// Nothing.
    Nothing,
    /// The current files except these names.
    AllBut(HashSet<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_come_from_custodys_message_or_the_code() {
        assert_eq!(
            refusal_reason(&Status::permission_denied(
                "AgentSuspended: agent \"bot\" is suspended"
            )),
            "AgentSuspended"
        );
        assert_eq!(
            refusal_reason(&Status::unauthenticated("token: expired")),
            "Unauthenticated"
        );
        assert_eq!(
            refusal_reason(&Status::not_found("no such pod")),
            "NotFound"
        );
    }
}

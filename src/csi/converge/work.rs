//! Per-volume work queues: what arrives while a volume is busy is merged
//! and done next, withdrawals first, so a burst of invalidations costs one
//! pass per volume.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// What to do to one volume. Merging two pieces of work keeps both:
/// withdrawals first (they are local and fail closed), then a refresh.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Work {
    /// Withdraw every file, for this reason.
    withdraw_all: Option<String>,
    /// Withdraw these grants' files: grant → reason.
    withdraw: BTreeMap<String, String>,
    /// Re-resolve (or, without a token, check the grant states).
    refresh: bool,
}

impl Work {
    pub fn refresh() -> Self {
        Self {
            refresh: true,
            ..Self::default()
        }
    }

    pub fn withdraw_all(reason: impl Into<String>) -> Self {
        Self {
            withdraw_all: Some(reason.into()),
            ..Self::default()
        }
    }

    pub fn withdraw_grants(grants: impl IntoIterator<Item = String>, reason: &str) -> Self {
        Self {
            withdraw: grants
                .into_iter()
                .map(|grant| (grant, reason.to_owned()))
                .collect(),
            ..Self::default()
        }
    }

    /// Adds `other` to this work (the first reason given for a grant wins).
    pub fn merge(&mut self, other: Work) {
        if self.withdraw_all.is_none() {
            self.withdraw_all = other.withdraw_all;
        }
        for (grant, reason) in other.withdraw {
            self.withdraw.entry(grant).or_insert(reason);
        }
        self.refresh |= other.refresh;
    }

    pub fn is_empty(&self) -> bool {
        self.withdraw_all.is_none() && self.withdraw.is_empty() && !self.refresh
    }

    pub fn refreshes(&self) -> bool {
        self.refresh
    }

    pub(super) fn withdrawal(&self) -> Option<Withdrawal> {
        match &self.withdraw_all {
            Some(reason) => Some(Withdrawal::All(reason.clone())),
            None if !self.withdraw.is_empty() => Some(Withdrawal::Grants(self.withdraw.clone())),
            None => None,
        }
    }
}

/// Which files leave a volume.
#[derive(Debug, Clone)]
pub(crate) enum Withdrawal {
    /// Everything, for this reason.
    All(String),
    /// The files of these grants (grant → reason).
    Grants(BTreeMap<String, String>),
}

/// Pending work per volume, and the volumes that have a worker (with the
/// signal that tells a worker waiting for a custody permit that a
/// withdrawal arrived).
#[derive(Debug, Default)]
struct QueueState {
    pending: HashMap<String, Work>,
    running: HashMap<String, Arc<tokio::sync::Notify>>,
    retries: HashMap<String, Retry>,
}

/// A volume whose refresh custody could not answer (the files were kept):
/// consecutive failures, and whether a retry is already scheduled.
#[derive(Debug, Default, Clone, Copy)]
struct Retry {
    failures: u32,
    scheduled: bool,
}

/// First delay before a refresh that custody could not answer is tried
/// again; it doubles up to [`RETRY_MAX`]. Withdrawals do not wait for it:
/// a failed refresh first asks custody's grant states (no pod token) and
/// withdraws what ended. The retry brings new and rotated content.
pub const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest delay between retries of one volume's refresh. Not lower: after
/// an API server outage every volume of every node whose refresh failed
/// retries, and each retry is a TokenReview on a recovering API server
/// (kubelet's own republish comes about once a minute anyway).
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// What a volume's worker does next.
pub(super) enum Step {
    /// Withdraw now (local, never waits for custody).
    Withdraw(Withdrawal),
    /// A refresh is pending: get a custody permit first (the refresh stays
    /// pending meanwhile, so that more invalidations merge into it).
    Refresh(Arc<tokio::sync::Notify>),
    /// Nothing left; the worker ends.
    Done,
}

/// At most one worker per volume; cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct WorkQueue {
    state: Arc<Mutex<QueueState>>,
}

impl WorkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Merges `work` into the volume's pending work; true when the caller
    /// must start a worker for it.
    pub(super) fn add(&self, volume_id: &str, work: Work) -> bool {
        let withdraws = work.withdrawal().is_some();
        let mut state = self.lock();
        state
            .pending
            .entry(volume_id.to_owned())
            .or_default()
            .merge(work);
        match state.running.get(volume_id) {
            Some(arrived) => {
                if withdraws {
                    arrived.notify_one();
                }
                false
            }
            None => {
                state.running.insert(volume_id.to_owned(), Arc::default());
                true
            }
        }
    }

    /// The volume's next step: pending withdrawals first (taken), then a
    /// pending refresh (left pending), else the worker ends.
    pub(super) fn next_step(&self, volume_id: &str) -> Step {
        let mut state = self.lock();
        if let Some(work) = state.pending.get_mut(volume_id) {
            if let Some(withdrawal) = work.withdrawal() {
                work.withdraw_all = None;
                work.withdraw.clear();
                return Step::Withdraw(withdrawal);
            }
            if work.refresh
                && let Some(arrived) = state.running.get(volume_id)
            {
                return Step::Refresh(arrived.clone());
            }
        }
        state.pending.remove(volume_id);
        state.running.remove(volume_id);
        Step::Done
    }

    /// Takes the pending refresh (true if there was one).
    pub(super) fn take_refresh(&self, volume_id: &str) -> bool {
        match self.lock().pending.get_mut(volume_id) {
            Some(work) if work.refresh => {
                work.refresh = false;
                true
            }
            _ => false,
        }
    }

    /// Volumes with work queued or in progress.
    pub fn busy(&self) -> usize {
        self.lock().running.len()
    }

    /// Custody could not answer the volume's refresh: the delay after which
    /// to refresh it again, or `None` when a retry is already scheduled.
    pub(super) fn schedule_retry(&self, volume_id: &str) -> Option<Duration> {
        let mut state = self.lock();
        let retry = state.retries.entry(volume_id.to_owned()).or_default();
        retry.failures = retry.failures.saturating_add(1);
        if retry.scheduled {
            return None;
        }
        retry.scheduled = true;
        let doublings = retry.failures.saturating_sub(1).min(16);
        Some(RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX))
    }

    /// The scheduled retry is due (it queues its refresh next).
    pub(super) fn retry_due(&self, volume_id: &str) {
        if let Some(retry) = self.lock().retries.get_mut(volume_id) {
            retry.scheduled = false;
        }
    }

    /// Custody answered the volume's refresh (or the volume is gone): the
    /// next failure starts from the first delay again.
    pub(super) fn forget_retry(&self, volume_id: &str) {
        self.lock().retries.remove(volume_id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn work_merges_withdrawals_before_a_refresh() {
        let mut work = Work::withdraw_grants(["a".to_owned()], "Revoked");
        work.merge(Work::refresh());
        work.merge(Work::withdraw_grants(
            ["a".to_owned(), "b".to_owned()],
            "Expired",
        ));
        assert!(work.refreshes());
        assert_eq!(
            work.withdraw,
            BTreeMap::from([
                ("a".to_owned(), "Revoked".to_owned()),
                ("b".to_owned(), "Expired".to_owned())
            ])
        );
        assert!(matches!(work.withdrawal(), Some(Withdrawal::Grants(_))));
        work.merge(Work::withdraw_all("AgentSuspended"));
        assert!(matches!(work.withdrawal(), Some(Withdrawal::All(r)) if r == "AgentSuspended"));
        assert!(Work::default().is_empty());
    }

    #[test]
    fn retries_back_off_to_the_cap_one_at_a_time_and_reset() {
        let queue = WorkQueue::default();
        assert_eq!(queue.schedule_retry("v1"), Some(RETRY_FIRST));
        assert_eq!(queue.schedule_retry("v1"), None, "one scheduled at a time");
        queue.retry_due("v1");
        assert_eq!(queue.schedule_retry("v1"), Some(RETRY_FIRST * 4));
        for _ in 0..40 {
            queue.retry_due("v1");
            assert!(queue.schedule_retry("v1").is_some_and(|d| d <= RETRY_MAX));
        }
        queue.retry_due("v1");
        assert_eq!(queue.schedule_retry("v1"), Some(RETRY_MAX));
        queue.forget_retry("v1");
        assert_eq!(queue.schedule_retry("v1"), Some(RETRY_FIRST));
        assert_eq!(queue.schedule_retry("v2"), Some(RETRY_FIRST), "per volume");
    }

    #[test]
    fn queue_runs_one_worker_per_volume_takes_withdrawals_first_and_merges() {
        let queue = WorkQueue::default();
        assert!(queue.add("v1", Work::refresh()));
        assert!(!queue.add("v1", Work::withdraw_all("Conflict")));
        assert!(queue.add("v2", Work::refresh()));
        assert_eq!(queue.busy(), 2);
        // The withdrawal is taken; the refresh stays pending until a permit
        // is held, so more work merges into it.
        assert!(
            matches!(queue.next_step("v1"), Step::Withdraw(Withdrawal::All(r)) if r == "Conflict")
        );
        assert!(matches!(queue.next_step("v1"), Step::Refresh(_)));
        assert!(!queue.add("v1", Work::refresh()));
        assert!(queue.take_refresh("v1"));
        assert!(!queue.take_refresh("v1"));
        assert!(matches!(queue.next_step("v1"), Step::Done));
        assert_eq!(queue.busy(), 1);
        // A new piece of work after the worker ended starts a new one.
        assert!(queue.add("v1", Work::refresh()));
    }
}

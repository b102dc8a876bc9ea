//! Ordered truth between `Resolve` and the invalidation stream.
//!
//! A Resolve answer and an invalidation can cross: the answer was decided
//! before a revocation that the stream has already delivered (custody was
//! slow to answer, or the call reached another replica whose watch lags).
//! Applying such an answer would put back a key that was just withdrawn.
//!
//! So every volume keeps the newest version, per watched kind, of the
//! invalidations applied to it ([`Floors::record`], called by the push path
//! for every volume an invalidation concerns, including a volume whose first
//! publish is still waiting for custody). An answer is used only when its
//! `versions` reach that floor in every kind and no unversioned invalidation
//! (RESYNC, or one from a custody that sends no versions) arrived while it
//! was asked for; otherwise custody is asked again
//! ([`super::NodeService::resolve_in_order`]), a few times with a short
//! backoff, and if the answers stay older the call fails as `UNAVAILABLE`:
//! a first publish fails (kubelet retries), a refresh keeps the volume as it
//! is (the withdrawal stays).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tonic::Status;

use super::NodeService;
use super::resolver::Resolver;
use crate::proto::scopehold::v1::{Invalidation, ResolveRequest, ResolveResponse, StoreVersions};

/// How often custody is asked in all before a too-old answer becomes
/// `UNAVAILABLE`, and the first wait between two asks (doubling): about
/// 1.5 s in all, long enough for a lagging replica to catch up.
const MAX_ASKS: u32 = 6;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);

/// What one volume has been told: the newest version per kind, and how
/// many unversioned invalidations concerned it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Floor {
    grants: u64,
    identities: u64,
    secrets: u64,
    unversioned: u64,
}

/// Taken before a Resolve call: what the volume had been told by then.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    unversioned: u64,
}

/// Why an answer is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// Older than an applied invalidation of `kind`.
    Older {
        kind: &'static str,
        answer: u64,
        applied: u64,
    },
    /// An invalidation without a version arrived while custody was asked.
    Interrupted,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Older {
                kind,
                answer,
                applied,
            } => write!(
                f,
                "custody's answer has seen {kind} up to version {answer}, older than the change at {applied} already applied"
            ),
            Self::Interrupted => {
                f.write_str("an invalidation without a version arrived while custody was asked")
            }
        }
    }
}

/// The floors of every volume the push path has matched. Cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct Floors {
    volumes: Arc<Mutex<HashMap<String, Floor>>>,
    /// Answers judged stale since start (a metric).
    stale: Arc<AtomicU64>,
}

impl Floors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Floor>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `invalidation` was applied to `volume_id`.
    pub fn record(&self, volume_id: &str, invalidation: &Invalidation) {
        let mut volumes = self.lock();
        let floor = volumes.entry(volume_id.to_owned()).or_default();
        match &invalidation.versions {
            Some(v) if *v != StoreVersions::default() => {
                floor.grants = floor.grants.max(v.grants);
                floor.identities = floor.identities.max(v.identities);
                floor.secrets = floor.secrets.max(v.secrets);
            }
            _ => floor.unversioned += 1,
        }
    }

    pub fn ticket(&self, volume_id: &str) -> Ticket {
        Ticket {
            unversioned: self
                .lock()
                .get(volume_id)
                .map_or(0, |floor| floor.unversioned),
        }
    }

    /// Whether an answer with `versions`, asked for under `ticket`, may be
    /// applied to `volume_id`.
    pub fn judge(
        &self,
        volume_id: &str,
        ticket: Ticket,
        versions: Option<&StoreVersions>,
    ) -> Result<(), Stale> {
        let floor = self.lock().get(volume_id).copied().unwrap_or_default();
        if floor.unversioned != ticket.unversioned {
            self.stale.fetch_add(1, Ordering::Relaxed);
            return Err(Stale::Interrupted);
        }
        let answer = versions.copied().unwrap_or_default();
        for (kind, answer, applied) in [
            ("grants", answer.grants, floor.grants),
            ("identities", answer.identities, floor.identities),
            ("secrets", answer.secrets, floor.secrets),
        ] {
            if answer < applied {
                self.stale.fetch_add(1, Ordering::Relaxed);
                return Err(Stale::Older {
                    kind,
                    answer,
                    applied,
                });
            }
        }
        Ok(())
    }

    /// Answers judged stale since start.
    pub fn stale_answers(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
    }

    /// Forgets a volume (unpublished, or its first publish failed).
    pub fn forget(&self, volume_id: &str) {
        self.lock().remove(volume_id);
    }
}

impl<R: Resolver> NodeService<R> {
    /// Resolve answers asked again instead of applied, since start.
    pub fn stale_answers(&self) -> u64 {
        self.floors.stale_answers()
    }

    /// Calls Resolve for `volume_id` and returns an answer no older than
    /// what the volume has been told; asks again while it is older. Errors
    /// are custody's, or `UNAVAILABLE` when every answer stayed older.
    pub(crate) async fn resolve_in_order(
        &self,
        volume_id: &str,
        request: ResolveRequest,
    ) -> Result<ResolveResponse, Status> {
        let mut delay = FIRST_RETRY_DELAY;
        let mut ask = 1;
        loop {
            let ticket = self.floors.ticket(volume_id);
            let response = self.resolver.resolve(request.clone()).await?;
            let stale = match self
                .floors
                .judge(volume_id, ticket, response.versions.as_ref())
            {
                Ok(()) => return Ok(response),
                Err(stale) => stale,
            };
            if ask >= MAX_ASKS {
                tracing::warn!(
                    volume_id = %volume_id,
                    request_id = %request.request_id,
                    asks = ask,
                    reason = %stale,
                    "custody's answers stay older than a change already applied; not applying them"
                );
                return Err(Status::unavailable(format!(
                    "StaleAnswer: {stale} (asked {ask} times)"
                )));
            }
            tracing::info!(
                volume_id = %volume_id,
                request_id = %request.request_id,
                ask,
                reason = %stale,
                "custody's answer predates a change already applied; asking again"
            );
            tokio::time::sleep(delay).await;
            delay *= 2;
            ask += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned(grants: u64, identities: u64, secrets: u64) -> Invalidation {
        Invalidation {
            versions: Some(StoreVersions {
                grants,
                identities,
                secrets,
            }),
            ..Default::default()
        }
    }

    fn versions(grants: u64, identities: u64, secrets: u64) -> StoreVersions {
        StoreVersions {
            grants,
            identities,
            secrets,
        }
    }

    #[test]
    fn an_answer_older_than_an_applied_change_of_its_kind_is_stale() {
        let floors = Floors::default();
        let ticket = floors.ticket("v");
        // Nothing applied yet: any answer goes, even one without versions.
        assert_eq!(floors.judge("v", ticket, None), Ok(()));
        floors.record("v", &versioned(100, 0, 0));
        floors.record("v", &versioned(0, 0, 40));
        floors.record("v", &versioned(90, 0, 0));
        assert_eq!(
            floors.judge("v", ticket, Some(&versions(99, 500, 500))),
            Err(Stale::Older {
                kind: "grants",
                answer: 99,
                applied: 100
            })
        );
        assert_eq!(
            floors.judge("v", ticket, Some(&versions(100, 0, 39))),
            Err(Stale::Older {
                kind: "secrets",
                answer: 39,
                applied: 40
            })
        );
        assert!(floors.judge("v", ticket, None).is_err());
        assert_eq!(floors.stale_answers(), 3);
        // Kinds are compared with their own kind only.
        assert_eq!(
            floors.judge("v", ticket, Some(&versions(100, 0, 40))),
            Ok(())
        );
        // Another volume was told nothing.
        assert_eq!(floors.judge("w", floors.ticket("w"), None), Ok(()));
        floors.forget("v");
        assert_eq!(floors.judge("v", floors.ticket("v"), None), Ok(()));
    }

    #[test]
    fn an_unversioned_invalidation_during_the_call_makes_the_answer_stale() {
        let floors = Floors::default();
        let before = floors.ticket("v");
        floors.record("v", &Invalidation::default());
        assert_eq!(
            floors.judge("v", before, Some(&versions(1, 1, 1))),
            Err(Stale::Interrupted)
        );
        // Asked again after it: fine.
        let after = floors.ticket("v");
        assert_eq!(floors.judge("v", after, Some(&versions(1, 1, 1))), Ok(()));
        assert_eq!(floors.stale_answers(), 1);
    }
}

//! Which watch events change what mounted volumes should hold. Status-only
//! updates (resolution counts, messages) must not count: custody writes them
//! on every mount, and a mount triggered by them would loop.

use crate::api::conditions::find_ready;
use crate::api::{AgentIdentity, GrantPhase, SecretGrant};
use crate::caches::ChangeKind;

/// The parts of a grant whose change matters to mounted volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantSnapshot {
    generation: Option<i64>,
    phase: Option<GrantPhase>,
    digest: Option<String>,
    revoked: bool,
}

impl GrantSnapshot {
    pub fn of(grant: &SecretGrant) -> Self {
        let status = grant.status.as_ref();
        GrantSnapshot {
            generation: grant.metadata.generation,
            phase: status.and_then(|s| s.phase),
            digest: status.and_then(|s| s.content_digest.clone()),
            revoked: grant.spec.revoked,
        }
    }
}

pub fn grant_change(old: Option<&GrantSnapshot>, new: &GrantSnapshot) -> Option<ChangeKind> {
    let Some(old) = old else {
        return Some(ChangeKind::Changed);
    };
    if new.revoked && !old.revoked {
        return Some(ChangeKind::Revoked);
    }
    if new.phase != old.phase {
        return match new.phase {
            Some(GrantPhase::Expired) => Some(ChangeKind::Expired),
            // Already announced when spec.revoked flipped.
            Some(GrantPhase::Revoked) if old.revoked => None,
            Some(GrantPhase::Revoked) => Some(ChangeKind::Revoked),
            _ => Some(ChangeKind::Changed),
        };
    }
    if new.generation != old.generation {
        return Some(ChangeKind::Changed);
    }
    match (&old.digest, &new.digest) {
        (Some(a), Some(b)) if a != b => Some(ChangeKind::Rotated),
        _ => None,
    }
}

/// The parts of an identity whose change matters to mounted volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySnapshot {
    pub service_account: String,
    /// Spec changes (maxGrantTTL among them) alter the agent's grants.
    generation: Option<i64>,
    suspended: bool,
    conflict: bool,
}

impl IdentitySnapshot {
    pub fn of(identity: &AgentIdentity) -> Self {
        let conflict = identity
            .status
            .as_ref()
            .and_then(|s| find_ready(&s.conditions))
            .is_some_and(|c| c.reason == "Conflict");
        IdentitySnapshot {
            service_account: identity.spec.service_account_name.clone(),
            generation: identity.metadata.generation,
            suspended: identity.spec.suspended,
            conflict,
        }
    }
}

pub fn identity_change(
    old: Option<&IdentitySnapshot>,
    new: &IdentitySnapshot,
) -> Option<ChangeKind> {
    let Some(old) = old else {
        return Some(ChangeKind::Changed);
    };
    if new.suspended && !old.suspended {
        return Some(ChangeKind::Suspended);
    }
    if new.conflict && !old.conflict {
        return Some(ChangeKind::Conflict);
    }
    if new != old {
        return Some(ChangeKind::Changed);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(generation: i64, phase: GrantPhase, digest: &str, revoked: bool) -> GrantSnapshot {
        GrantSnapshot {
            generation: Some(generation),
            phase: Some(phase),
            digest: Some(digest.into()),
            revoked,
        }
    }

    #[test]
    fn status_only_updates_are_not_changes() {
        let a = snap(1, GrantPhase::Active, "aaa", false);
        assert_eq!(grant_change(Some(&a), &a.clone()), None);
    }

    #[test]
    fn grant_transitions() {
        let active = snap(1, GrantPhase::Active, "aaa", false);
        assert_eq!(grant_change(None, &active), Some(ChangeKind::Changed));
        assert_eq!(
            grant_change(Some(&active), &snap(2, GrantPhase::Active, "aaa", true)),
            Some(ChangeKind::Revoked)
        );
        assert_eq!(
            grant_change(Some(&active), &snap(1, GrantPhase::Expired, "aaa", false)),
            Some(ChangeKind::Expired)
        );
        assert_eq!(
            grant_change(Some(&active), &snap(1, GrantPhase::Active, "bbb", false)),
            Some(ChangeKind::Rotated)
        );
        assert_eq!(
            grant_change(Some(&active), &snap(2, GrantPhase::Active, "aaa", false)),
            Some(ChangeKind::Changed)
        );
        let flagged = snap(2, GrantPhase::Active, "aaa", true);
        assert_eq!(
            grant_change(Some(&flagged), &snap(2, GrantPhase::Revoked, "aaa", true)),
            None,
            "announced once"
        );
        let revoked = snap(2, GrantPhase::Revoked, "aaa", true);
        assert_eq!(
            grant_change(Some(&revoked), &snap(3, GrantPhase::Revoked, "aaa", false)),
            Some(ChangeKind::Changed)
        );
    }

    #[test]
    fn identity_transitions() {
        let base = IdentitySnapshot {
            service_account: "sa".into(),
            generation: Some(1),
            suspended: false,
            conflict: false,
        };
        assert_eq!(identity_change(Some(&base), &base.clone()), None);
        let capped = IdentitySnapshot {
            generation: Some(2),
            ..base.clone()
        };
        assert_eq!(
            identity_change(Some(&base), &capped),
            Some(ChangeKind::Changed),
            "a spec edit such as maxGrantTTL"
        );
        let suspended = IdentitySnapshot {
            suspended: true,
            ..base.clone()
        };
        assert_eq!(
            identity_change(Some(&base), &suspended),
            Some(ChangeKind::Suspended)
        );
        assert_eq!(
            identity_change(Some(&suspended), &base),
            Some(ChangeKind::Changed)
        );
        let conflict = IdentitySnapshot {
            conflict: true,
            ..base.clone()
        };
        assert_eq!(
            identity_change(Some(&base), &conflict),
            Some(ChangeKind::Conflict)
        );
        let moved = IdentitySnapshot {
            service_account: "other".into(),
            ..base.clone()
        };
        assert_eq!(
            identity_change(Some(&base), &moved),
            Some(ChangeKind::Changed)
        );
    }
}

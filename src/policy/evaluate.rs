//! Pure evaluation of a grant and an identity: no I/O, so every rule has a
//! plain unit test.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::conditions::Reason;
use crate::api::duration;
use crate::api::identity::AccessEntry;
use crate::api::validation::{check_file_name, check_secret_key, volume_payload_limit};
use crate::api::{AgentIdentity, GrantPhase, SecretGrant};
use crate::digest::{DigestKey, content_digest};
use crate::secrets::{CachedSecret, SecretBytes, SecretCache};

/// What the controller concludes about one grant at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantEvaluation {
    pub phase: GrantPhase,
    pub reason: Reason,
    pub message: String,
    /// Effective expiry, truncated to whole seconds (what the status can show).
    pub expires_at: Option<Timestamp>,
    pub content_digest: Option<String>,
}

impl GrantEvaluation {
    pub fn is_active(&self) -> bool {
        self.phase == GrantPhase::Active
    }

    /// How long until the phase changes by itself (expiry), if it will.
    pub fn requeue_after(&self, now: Timestamp) -> Option<Duration> {
        let expiry = self.expires_at?;
        if self.phase == GrantPhase::Expired || self.phase == GrantPhase::Revoked {
            return None;
        }
        let left = expiry.duration_since(now);
        Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
    }
}

/// What the grant's agent looks like from the grant.
#[derive(Clone, Copy, Debug)]
pub enum AgentState<'a> {
    Missing,
    Present {
        identity: &'a AgentIdentity,
        conflict: bool,
    },
}

/// The Secret as far as the grant is concerned: its values and the key
/// that their content digest is computed under.
#[derive(Clone, Copy, Debug)]
pub enum SecretState<'a> {
    Missing,
    Present(&'a BTreeMap<String, SecretBytes>, &'a DigestKey),
}

impl<'a> SecretState<'a> {
    /// A Secret as the cache holds it (or not), digests keyed with the
    /// cache's key.
    pub fn cached(cache: &'a SecretCache, secret: Option<&'a CachedSecret>) -> Self {
        match secret {
            Some(secret) => SecretState::Present(&secret.data, cache.digest_key()),
            None => SecretState::Missing,
        }
    }
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn plus(base: Timestamp, d: Duration) -> Option<Timestamp> {
    let d = SignedDuration::try_from(d).ok()?;
    base.checked_add(d).ok()
}

/// Effective expiry: the earliest of `expiresAt`, creation + `ttl` and
/// creation + the agent's `maxGrantTTL`. Errors describe a bad duration.
pub fn effective_expiry(
    grant: &SecretGrant,
    agent: Option<&AgentIdentity>,
) -> Result<Option<Timestamp>, String> {
    let created = grant.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let mut candidates: Vec<Timestamp> = Vec::new();
    if let Some(at) = &grant.spec.expires_at {
        candidates.push(at.0);
    }
    if let Some(ttl) = &grant.spec.ttl {
        let ttl = duration::parse(ttl).map_err(|e| format!("spec.ttl: {e}"))?;
        if let Some(created) = created {
            candidates.push(plus(created, ttl).ok_or("spec.ttl is too large")?);
        }
    }
    if let Some(cap) = agent.and_then(|a| a.spec.max_grant_ttl.as_ref()) {
        // A bad cap on the agent must not widen the grant: fail the grant.
        let cap = duration::parse(cap).map_err(|e| format!("agent maxGrantTTL: {e}"))?;
        if let Some(created) = created {
            candidates.push(plus(created, cap).ok_or("agent maxGrantTTL is too large")?);
        }
    }
    Ok(candidates.into_iter().min().map(whole_seconds))
}

/// Problems the schema cannot express: duplicate file names, or names that
/// an object stored before a schema change may still carry.
pub fn spec_problems(grant: &SecretGrant) -> Vec<String> {
    let mut problems = Vec::new();
    if grant.spec.ttl.is_some() && grant.spec.expires_at.is_some() {
        problems.push("set at most one of ttl and expiresAt".to_owned());
    }
    if grant.spec.keys.is_empty() {
        problems.push("keys must name at least one Secret key".to_owned());
    }
    let mut seen = HashSet::new();
    for k in &grant.spec.keys {
        if let Err(e) = check_secret_key(&k.key) {
            problems.push(format!("key: {e}"));
        }
        if let Err(e) = check_file_name(k.file_name()) {
            problems.push(format!("path: {e}"));
        }
        if !seen.insert(k.file_name()) {
            problems.push(format!("two keys map to the file {:?}", k.file_name()));
        }
        if let Some(mode) = k.mode
            && !(0..=0o777).contains(&mode)
        {
            problems.push(format!("mode {mode} is outside 0..0777"));
        }
    }
    problems
}

/// Decides a grant's phase. Precedence: revoked, then invalid spec, expired,
/// missing or conflicting agent, suspended agent, missing Secret or keys.
/// No volume size limit applies (see [`evaluate_grant_within`]).
pub fn evaluate_grant(
    grant: &SecretGrant,
    agent: AgentState<'_>,
    secret: SecretState<'_>,
    now: Timestamp,
) -> GrantEvaluation {
    evaluate_grant_within(grant, agent, secret, now, None)
}

/// The bytes a grant's files take in a volume, counted as the node plugin
/// counts them: each value plus its file name.
pub fn granted_bytes(grant: &SecretGrant, data: &BTreeMap<String, SecretBytes>) -> u64 {
    grant
        .spec
        .keys
        .iter()
        .map(|key| {
            let value = data.get(&key.key).map_or(0, |bytes| bytes.0.len() as u64);
            value.saturating_add(key.file_name().len() as u64)
        })
        .fold(0, u64::saturating_add)
}

/// [`evaluate_grant`], and a grant whose files alone exceed
/// `volume_size_bytes`' payload limit ([`volume_payload_limit`]) is
/// `Invalid` / `ValueTooLarge` instead of an `Active` grant that never
/// mounts.
pub fn evaluate_grant_within(
    grant: &SecretGrant,
    agent: AgentState<'_>,
    secret: SecretState<'_>,
    now: Timestamp,
    volume_size_bytes: Option<u64>,
) -> GrantEvaluation {
    let identity = match agent {
        AgentState::Present { identity, .. } => Some(identity),
        AgentState::Missing => None,
    };
    let expiry = effective_expiry(grant, identity);
    let expires_at = expiry.clone().ok().flatten();
    let digest = match secret {
        SecretState::Present(data, key) => {
            content_digest(key, data, grant.spec.keys.iter().map(|k| k.key.as_str())).ok()
        }
        SecretState::Missing => None,
    };
    let verdict = |phase, reason, message: String| GrantEvaluation {
        phase,
        reason,
        message,
        expires_at,
        content_digest: digest.clone(),
    };

    if grant.spec.revoked {
        return verdict(
            GrantPhase::Revoked,
            Reason::Revoked,
            "grant is revoked".into(),
        );
    }
    let mut problems = spec_problems(grant);
    if let Err(e) = &expiry {
        problems.push(e.clone());
    }
    if !problems.is_empty() {
        return verdict(
            GrantPhase::Invalid,
            Reason::InvalidSpec,
            problems.join("; "),
        );
    }
    if let Some(at) = expires_at
        && at <= now
    {
        return verdict(
            GrantPhase::Expired,
            Reason::Expired,
            format!("grant expired at {at}"),
        );
    }
    let agent_name = &grant.spec.agent;
    match agent {
        AgentState::Missing => {
            return verdict(
                GrantPhase::Pending,
                Reason::AgentNotFound,
                format!("AgentIdentity {agent_name:?} does not exist in this namespace"),
            );
        }
        AgentState::Present {
            conflict: true,
            identity,
        } => {
            return verdict(
                GrantPhase::Pending,
                Reason::Conflict,
                format!(
                    "another AgentIdentity also claims ServiceAccount {:?}",
                    identity.spec.service_account_name
                ),
            );
        }
        AgentState::Present { identity, .. } if identity.is_suspended() => {
            return verdict(
                GrantPhase::Pending,
                Reason::AgentSuspended,
                format!("AgentIdentity {agent_name:?} is suspended"),
            );
        }
        AgentState::Present { .. } => {}
    }
    let secret_name = &grant.spec.secret_name;
    match secret {
        SecretState::Missing => verdict(
            GrantPhase::Invalid,
            Reason::SecretNotFound,
            format!("Secret {secret_name:?} does not exist in this namespace"),
        ),
        SecretState::Present(data, key) => {
            match content_digest(key, data, grant.spec.keys.iter().map(|k| k.key.as_str())) {
                Err(missing) => verdict(
                    GrantPhase::Invalid,
                    Reason::KeyNotFound,
                    format!("Secret {secret_name:?}: {missing}"),
                ),
                Ok(_)
                    if volume_size_bytes.is_some_and(|size| {
                        granted_bytes(grant, data) > volume_payload_limit(size)
                    }) =>
                {
                    let size = volume_size_bytes.unwrap_or_default();
                    verdict(
                        GrantPhase::Invalid,
                        Reason::ValueTooLarge,
                        format!(
                            "the granted keys of Secret {secret_name:?} take {} bytes (values plus file names); a volume holds at most {} bytes (half of the node plugin's {size}-byte tmpfs, chart value node.volumeSizeLimit), so it could never be mounted",
                            granted_bytes(grant, data),
                            volume_payload_limit(size)
                        ),
                    )
                }
                Ok(_) => verdict(
                    GrantPhase::Active,
                    Reason::Active,
                    match expires_at {
                        Some(at) => format!("resolvable until {at}"),
                        None => "resolvable; never expires".to_owned(),
                    },
                ),
            }
        }
    }
}

/// What the controller concludes about one identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityEvaluation {
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    pub active_grants: i32,
    pub access: Vec<AccessEntry>,
}

/// Decides an identity's Ready condition and what it can see. `peers` are the
/// other identities in the namespace that claim the same ServiceAccount;
/// `grants` are this identity's grants with the phase they evaluate to now
/// (not the phase their statuses show yet: see `controller::identity`).
pub fn evaluate_identity(
    identity: &AgentIdentity,
    peers: &[String],
    grants: &[(&SecretGrant, GrantPhase)],
) -> IdentityEvaluation {
    let mut access: Vec<AccessEntry> = grants
        .iter()
        .filter(|(_, phase)| *phase == GrantPhase::Active)
        .map(|(g, _)| AccessEntry {
            grant: g.metadata.name.clone().unwrap_or_default(),
            secret: g.spec.secret_name.clone(),
            keys: g.key_names(),
        })
        .collect();
    access.sort();
    let active_grants = i32::try_from(access.len()).unwrap_or(i32::MAX);
    let sa = &identity.spec.service_account_name;
    let (ready, reason, message) = if !peers.is_empty() {
        (
            false,
            Reason::Conflict,
            format!(
                "ServiceAccount {sa:?} is also claimed by {}",
                peers.join(", ")
            ),
        )
    } else if identity.is_suspended() {
        (
            false,
            Reason::Suspended,
            "agent is suspended: nothing resolves".to_owned(),
        )
    } else {
        (
            true,
            Reason::Active,
            format!("pods running as {sa:?} are this agent"),
        )
    };
    IdentityEvaluation {
        ready,
        reason,
        message,
        active_grants,
        access,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentIdentitySpec, GrantedKey, SecretGrantSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn grant(keys: &[&str]) -> SecretGrant {
        let mut g = SecretGrant::new(
            "g",
            SecretGrantSpec {
                agent: "bot".into(),
                secret_name: "creds".into(),
                keys: keys
                    .iter()
                    .map(|k| GrantedKey {
                        key: (*k).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        );
        g.metadata.creation_timestamp = Some(Time(ts(1_000)));
        g
    }

    fn identity() -> AgentIdentity {
        AgentIdentity::new(
            "bot",
            AgentIdentitySpec {
                service_account_name: "bot-sa".into(),
                ..Default::default()
            },
        )
    }

    fn test_key() -> DigestKey {
        DigestKey::from_bytes(&[9; 32]).unwrap()
    }

    fn data(keys: &[&str]) -> BTreeMap<String, SecretBytes> {
        keys.iter()
            .map(|k| ((*k).to_owned(), SecretBytes(b"v".to_vec())))
            .collect()
    }

    fn eval(
        g: &SecretGrant,
        a: &AgentIdentity,
        d: &BTreeMap<String, SecretBytes>,
        now: i64,
    ) -> GrantEvaluation {
        evaluate_grant(
            g,
            AgentState::Present {
                identity: a,
                conflict: false,
            },
            SecretState::Present(d, &test_key()),
            ts(now),
        )
    }

    #[test]
    fn active_when_everything_is_there() {
        let e = eval(&grant(&["api"]), &identity(), &data(&["api", "x"]), 1_001);
        assert_eq!((e.phase, e.reason), (GrantPhase::Active, Reason::Active));
        assert!(e.content_digest.is_some());
        assert_eq!(e.expires_at, None);
    }

    #[test]
    fn a_grant_too_large_for_a_volume_is_invalid_with_the_limit() {
        let g = grant(&["api"]);
        let mut big = data(&["api"]);
        big.insert("api".into(), SecretBytes(vec![b'x'; 600 * 1024]));
        let volume = 1024 * 1024;
        let e = evaluate_grant_within(
            &g,
            AgentState::Present {
                identity: &identity(),
                conflict: false,
            },
            SecretState::Present(&big, &test_key()),
            ts(1_001),
            Some(volume),
        );
        assert_eq!(
            (e.phase, e.reason),
            (GrantPhase::Invalid, Reason::ValueTooLarge)
        );
        assert!(e.message.contains("524288"), "{}", e.message);
        assert!(!e.message.contains("xxxx"), "{}", e.message);
        // Exactly at the limit (value plus file name) still fits.
        let mut fits = data(&["api"]);
        fits.insert(
            "api".into(),
            SecretBytes(vec![b'x'; 512 * 1024 - "api".len()]),
        );
        let e = evaluate_grant_within(
            &g,
            AgentState::Present {
                identity: &identity(),
                conflict: false,
            },
            SecretState::Present(&fits, &test_key()),
            ts(1_001),
            Some(volume),
        );
        assert_eq!(e.phase, GrantPhase::Active, "{}", e.message);
    }

    #[test]
    fn ttl_counts_from_creation_and_expires_exactly() {
        let mut g = grant(&["api"]);
        g.spec.ttl = Some("10s".into());
        let d = data(&["api"]);
        let before = eval(&g, &identity(), &d, 1_009);
        assert_eq!(before.phase, GrantPhase::Active);
        assert_eq!(
            before.requeue_after(ts(1_009)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(eval(&g, &identity(), &d, 1_010).phase, GrantPhase::Expired);
    }

    #[test]
    fn agent_cap_shortens_expiry() {
        let mut g = grant(&["api"]);
        g.spec.ttl = Some("8h".into());
        let mut a = identity();
        a.spec.max_grant_ttl = Some("1h".into());
        let e = eval(&g, &a, &data(&["api"]), 1_001);
        assert_eq!(e.expires_at, Some(ts(1_000 + 3600)));
        let mut forever = grant(&["api"]);
        forever.spec.ttl = None;
        assert_eq!(
            eval(&forever, &a, &data(&["api"]), 1_001).expires_at,
            Some(ts(4_600))
        );
    }

    #[test]
    fn expires_at_is_truncated_to_seconds() {
        let mut g = grant(&["api"]);
        g.spec.expires_at = Some(Time(ts(2_000) + SignedDuration::from_millis(700)));
        assert_eq!(
            eval(&g, &identity(), &data(&["api"]), 1_001).expires_at,
            Some(ts(2_000))
        );
    }

    #[test]
    fn revoked_wins_over_everything() {
        let mut g = grant(&["api"]);
        g.spec.revoked = true;
        g.spec.ttl = Some("1s".into());
        let e = evaluate_grant(&g, AgentState::Missing, SecretState::Missing, ts(5_000));
        assert_eq!((e.phase, e.reason), (GrantPhase::Revoked, Reason::Revoked));
    }

    #[test]
    fn reasons_for_missing_parts() {
        let g = grant(&["api", "other"]);
        let a = identity();
        let missing_key = eval(&g, &a, &data(&["api"]), 1_001);
        assert_eq!(
            (missing_key.phase, missing_key.reason),
            (GrantPhase::Invalid, Reason::KeyNotFound)
        );
        assert!(missing_key.message.contains("other"));
        let no_secret = evaluate_grant(
            &g,
            AgentState::Present {
                identity: &a,
                conflict: false,
            },
            SecretState::Missing,
            ts(1_001),
        );
        assert_eq!(no_secret.reason, Reason::SecretNotFound);
        let no_agent = evaluate_grant(&g, AgentState::Missing, SecretState::Missing, ts(1_001));
        assert_eq!(
            (no_agent.phase, no_agent.reason),
            (GrantPhase::Pending, Reason::AgentNotFound)
        );
        let conflict = evaluate_grant(
            &g,
            AgentState::Present {
                identity: &a,
                conflict: true,
            },
            SecretState::Present(&data(&["api", "other"]), &test_key()),
            ts(1_001),
        );
        assert_eq!(conflict.reason, Reason::Conflict);
        let mut suspended = identity();
        suspended.spec.suspended = true;
        assert_eq!(
            eval(&g, &suspended, &data(&["api", "other"]), 1_001).reason,
            Reason::AgentSuspended
        );
    }

    #[test]
    fn spec_problems_the_schema_cannot_catch() {
        let mut g = grant(&["a", "b"]);
        g.spec.keys[1].path = Some("a".into());
        let e = eval(&g, &identity(), &data(&["a", "b"]), 1_001);
        assert_eq!(
            (e.phase, e.reason),
            (GrantPhase::Invalid, Reason::InvalidSpec)
        );
        assert!(e.message.contains("two keys map to the file"));
        let mut bad = grant(&["../x"]);
        bad.spec.ttl = Some("3 days".into());
        let e = eval(&bad, &identity(), &data(&[]), 1_001);
        assert_eq!(e.reason, Reason::InvalidSpec);
        assert!(e.message.contains("spec.ttl"), "{}", e.message);
    }

    #[test]
    fn identity_access_lists_active_grants_sorted() {
        let mut g1 = grant(&["api"]);
        g1.metadata.name = Some("zeta".into());
        let mut g2 = g1.clone();
        g2.metadata.name = Some("alpha".into());
        let mut g3 = g1.clone();
        g3.metadata.name = Some("revoked".into());
        // The phase given is what counts, not a status written earlier.
        g3.status = Some(crate::api::SecretGrantStatus {
            phase: Some(GrantPhase::Active),
            ..Default::default()
        });
        let e = evaluate_identity(
            &identity(),
            &[],
            &[
                (&g1, GrantPhase::Active),
                (&g2, GrantPhase::Active),
                (&g3, GrantPhase::Revoked),
            ],
        );
        assert!(e.ready);
        assert_eq!(e.active_grants, 2);
        assert_eq!(
            e.access
                .iter()
                .map(|a| a.grant.as_str())
                .collect::<Vec<_>>(),
            ["alpha", "zeta"]
        );
        let c = evaluate_identity(&identity(), &["other".into()], &[]);
        assert_eq!((c.ready, c.reason), (false, Reason::Conflict));
    }
}

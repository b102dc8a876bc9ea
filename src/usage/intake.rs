//! `POST /usage`: a proxy sidecar's report of the requests it injected
//! values into. The caller is who its token says: a bound ServiceAccount
//! token (audience `scopehold.dev`) of a pod, verified by TokenReview. Uses
//! count only for proxy grants of the agent that claims that ServiceAccount,
//! and the pod is the token's, never the report's: a pod cannot count uses
//! of another agent's grants, nor name another pod. A report with any entry
//! that does not hold is refused whole, with the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource as _, ResourceExt as _};

use super::log::{PendingUses, UsageLog};
use crate::api::{DeliveryMode, TOKEN_AUDIENCE};
use crate::caches::Caches;
use crate::custody::token_review::{self, ReviewError};
use crate::event_series::{EventSink, Occurrence};
use crate::proxy::report::{MAX_ENTRIES, UsageReport};

/// Largest count one entry may carry (a sidecar reports every few seconds).
const MAX_COUNT: u64 = 10_000_000;
/// Longest `host:port`.
const MAX_HOST: usize = 261;
/// Clock skew tolerated for report times in the future.
const SKEW: SignedDuration = SignedDuration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("no bearer token")]
    NoToken,
    #[error("token refused: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("bad report: {0}")]
    Invalid(String),
    #[error("cannot check the report now: {0}")]
    Unavailable(String),
}

impl IntakeError {
    pub fn status(&self) -> u16 {
        match self {
            IntakeError::NoToken | IntakeError::Unauthenticated(_) => 401,
            IntakeError::Forbidden(_) => 403,
            IntakeError::Invalid(_) => 400,
            IntakeError::Unavailable(_) => 503,
        }
    }
}

pub struct Intake {
    pub client: Client,
    pub caches: Caches,
    pub log: Arc<UsageLog>,
    pub events: Option<EventSink>,
}

impl Intake {
    /// Checks and records one report; returns the uses counted.
    pub async fn accept(&self, bearer: Option<&str>, body: &[u8]) -> Result<u64, IntakeError> {
        let token = bearer
            .filter(|t| !t.is_empty())
            .ok_or(IntakeError::NoToken)?;
        let claims = match token_review::review(&self.client, token, TOKEN_AUDIENCE).await {
            Ok(c) => c,
            Err(ReviewError::Api(e)) => return Err(IntakeError::Unavailable(e.to_string())),
            Err(e) => return Err(IntakeError::Unauthenticated(e.to_string())),
        };
        let pod = match (&claims.pod_name, &claims.pod_uid) {
            (Some(name), Some(_)) => name.clone(),
            _ => {
                return Err(IntakeError::Forbidden(
                    "the token is not bound to a pod".into(),
                ));
            }
        };
        let report: UsageReport =
            serde_json::from_slice(body).map_err(|e| IntakeError::Invalid(e.to_string()))?;
        if report.uses.len() > MAX_ENTRIES {
            return Err(IntakeError::Invalid(format!(
                "{} entries; at most {MAX_ENTRIES}",
                report.uses.len()
            )));
        }
        if !self.caches.is_synced() {
            return Err(IntakeError::Unavailable("caches not synced".into()));
        }
        let ns = claims.namespace.as_str();
        let claiming = self.caches.identities_claiming(ns, &claims.service_account);
        let agent = match claiming.as_slice() {
            [one] => one.name_any(),
            [] => {
                return Err(IntakeError::Forbidden(format!(
                    "no AgentIdentity in {ns} claims ServiceAccount {}",
                    claims.service_account
                )));
            }
            _ => {
                return Err(IntakeError::Forbidden(format!(
                    "two AgentIdentities claim ServiceAccount {}",
                    claims.service_account
                )));
            }
        };
        let now = Timestamp::now();
        let mut batches: BTreeMap<String, PendingUses> = BTreeMap::new();
        let mut total = 0;
        for entry in &report.uses {
            let grant = self
                .caches
                .grants
                .get(&ObjectRef::new(&entry.grant).within(ns))
                .filter(|g| g.spec.agent == agent && g.spec.delivery == DeliveryMode::Proxy)
                .ok_or_else(|| {
                    IntakeError::Forbidden(format!(
                        "SecretGrant {ns}/{} is not a proxy grant of agent {agent}",
                        entry.grant
                    ))
                })?;
            if entry.count == 0 || entry.count > MAX_COUNT {
                return Err(IntakeError::Invalid(format!(
                    "count {} for {} is not within 1..={MAX_COUNT}",
                    entry.count, entry.grant
                )));
            }
            if entry.host.is_empty()
                || entry.host.len() > MAX_HOST
                || entry
                    .host
                    .chars()
                    .any(|c| !(c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
            {
                return Err(IntakeError::Invalid(format!(
                    "host {:?} is not host:port",
                    entry.host.chars().take(64).collect::<String>()
                )));
            }
            if entry.first_at > entry.last_at || entry.last_at > now + SKEW {
                return Err(IntakeError::Invalid(format!(
                    "times of {} are out of order or in the future",
                    entry.grant
                )));
            }
            let count = i64::try_from(entry.count).unwrap_or(i64::MAX);
            batches.entry(grant.name_any()).or_default().add(
                &pod,
                &entry.host,
                count,
                entry.first_at,
                entry.last_at.min(now),
            );
            total += entry.count;
        }
        for (grant, uses) in batches {
            if let (Some(events), Some(g)) = (
                &self.events,
                self.caches.grants.get(&ObjectRef::new(&grant).within(ns)),
            ) {
                // One series per grant (no pod or host in the text): the
                // counts are in the status, the places in recentUses.
                events.record(Occurrence {
                    regarding: g.object_ref(&()),
                    related: None,
                    reason: "ProxyUsed".into(),
                    action: "Inject".into(),
                    type_: EventType::Normal,
                    note: format!(
                        "agent {agent} used the grant's keys through the proxy sidecar (counts in status.uses)"
                    ),
                });
            }
            tracing::info!(
                target: crate::audit::TARGET,
                time = %now,
                event = "ProxyUsageReported",
                namespace = ns,
                agent = %agent,
                pod = %pod,
                grant = %grant,
                uses = uses.count,
            );
            self.log.record(ns, &grant, uses);
        }
        Ok(total)
    }
}

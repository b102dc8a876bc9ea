//! AgentIdentity reconciler: Ready (Active, Suspended or Conflict), and what
//! the agent can see right now, written only when it changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::events::{Transition, publish};
use super::{Context, Error, FIELD_MANAGER};
use crate::api::conditions::{self, Reason, find_ready};
use crate::api::{AgentIdentity, AgentIdentityStatus};
use crate::audit::Decision;
use crate::policy::evaluate::{IdentityEvaluation, evaluate_identity};

pub(super) const KIND: &str = "AgentIdentity";
const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(identity: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.caches.synced().await;
    if !ctx.leads() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let namespace = identity.namespace().ok_or(Error::MissingNamespace)?;
    let name = identity.name_any();
    let peers: Vec<String> = ctx
        .caches
        .identities_claiming(&namespace, &identity.spec.service_account_name)
        .iter()
        .map(|peer| peer.name_any())
        .filter(|n| *n != name)
        .collect();
    // `access` comes from evaluating the grants now, as the grant controller
    // and custody do, not from the phases their statuses show: those turn
    // Active one reconcile at a time, and at a bulk start (every grant new)
    // an identity was rewritten once per grant (5.7 writes per identity for 5
    // grants, BENCHMARKS.md). Now it is written once its grants are known,
    // and their status writes, which wake it again, change nothing.
    let grants = ctx.caches.grants_of_agent(&namespace, &name);
    let mut phases = Vec::with_capacity(grants.len());
    for grant in &grants {
        let (e, _) = super::grant::evaluate(&ctx, grant, &namespace, Some(&identity)).await?;
        phases.push((grant.as_ref(), e.phase));
    }
    let evaluation = evaluate_identity(&identity, &peers, &phases);

    let old = ctx
        .current_status(&identity.metadata, identity.status.clone())
        .unwrap_or_default();
    let generation = identity.metadata.generation;
    let desired = AgentIdentityStatus {
        conditions: vec![conditions::ready(
            evaluation.ready,
            evaluation.reason,
            evaluation.message.clone(),
            generation,
            &old.conditions,
            Timestamp::now(),
        )],
        observed_generation: generation,
        active_grants: evaluation.active_grants,
        access: evaluation.access.clone(),
        last_resolved_at: None,
    };
    let written = old.conditions != desired.conditions
        || old.observed_generation != desired.observed_generation
        || old.active_grants != desired.active_grants
        || old.access != desired.access;
    if written {
        let api: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &namespace);
        // lastResolvedAt belongs to the custody service's field manager.
        let mut status = serde_json::to_value(&desired)?;
        if let Some(map) = status.as_object_mut() {
            map.remove("lastResolvedAt");
        }
        let patch = json!({
            "apiVersion": AgentIdentity::api_version(&()),
            "kind": KIND,
            "status": status,
        });
        let updated = api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.remember_written(&updated.metadata, &desired);
        let old_reason = find_ready(&old.conditions).map(|c| c.reason.clone());
        if let Some(t) = transition(&identity, old_reason.as_deref(), &evaluation) {
            publish(&ctx.events, &identity.object_ref(&()), t);
        }
    }
    ctx.metrics.reconciled(KIND, written);
    ctx.metrics
        .reconcile_seconds
        .get_or_create(&super::metrics::KindLabel { kind: KIND })
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(RESYNC))
}

fn transition(
    identity: &AgentIdentity,
    old_reason: Option<&str>,
    e: &IdentityEvaluation,
) -> Option<Transition> {
    if old_reason == Some(e.reason.as_str()) {
        return None;
    }
    let namespace = identity.namespace().unwrap_or_default();
    let mut t = match e.reason {
        Reason::Suspended => Transition::new(
            "IdentitySuspended",
            Decision::Denied,
            &namespace,
            e.message.clone(),
        ),
        Reason::Conflict => Transition::new(
            "IdentityConflict",
            Decision::Denied,
            &namespace,
            e.message.clone(),
        ),
        Reason::Active if old_reason.is_some() => Transition::new(
            "IdentityReady",
            Decision::Allowed,
            &namespace,
            e.message.clone(),
        ),
        _ => return None,
    };
    t.audit.reason = Some(e.reason.as_str().to_owned());
    t.audit.agent = Some(identity.name_any());
    t.audit.service_account = Some(identity.spec.service_account_name.clone());
    Some(t)
}

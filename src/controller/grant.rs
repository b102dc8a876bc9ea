//! SecretGrant reconciler: evaluate, write the status only when it changed,
//! tell users about transitions, and wake up again at the exact expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::events::{Transition, publish};
use super::{Context, Error, FIELD_MANAGER};
use crate::api::conditions;
use crate::api::{AgentIdentity, GrantPhase, SecretGrant, SecretGrantStatus};
use crate::audit::Decision;
use crate::policy::evaluate::{AgentState, GrantEvaluation, SecretState, evaluate_grant_within};

pub(super) const KIND: &str = "SecretGrant";
/// A grant without expiry is still looked at this often, as a safety net for
/// a missed watch event.
const RESYNC: Duration = Duration::from_secs(600);
/// Waking a little after the expiry instant guarantees the reconcile sees it
/// as past, instead of waking a hair early and sleeping again.
const EXPIRY_SLACK: Duration = Duration::from_millis(5);

pub async fn reconcile(grant: Arc<SecretGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.caches.synced().await;
    if !ctx.leads() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let namespace = grant.namespace().ok_or(Error::MissingNamespace)?;
    tracing::debug!(grant = %grant.name_any(), %namespace, "reconciling");
    let identity = ctx
        .caches
        .identities
        .get(&ObjectRef::new(&grant.spec.agent).within(&namespace));
    let (evaluation, now) = evaluate(&ctx, &grant, &namespace, identity.as_deref()).await?;

    let old = ctx
        .current_status(&grant.metadata, grant.status.clone())
        .unwrap_or_default();
    let desired = desired_status(&grant, &evaluation, &old, now);
    let written = !controller_fields_equal(&old, &desired);
    if written {
        let api: Api<SecretGrant> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": SecretGrant::api_version(&()),
            "kind": KIND,
            "status": desired,
        });
        let updated = api
            .patch_status(
                &grant.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.remember_written(&updated.metadata, &desired);
        for t in transitions(&grant, identity.as_deref(), &old, &evaluation) {
            publish(&ctx.events, &grant.object_ref(&()), t);
        }
    }
    ctx.metrics.reconciled(KIND, written);
    ctx.metrics
        .reconcile_seconds
        .get_or_create(&super::metrics::KindLabel { kind: KIND })
        .observe(started.elapsed().as_secs_f64());
    Ok(match evaluation.requeue_after(now) {
        Some(left) if left < RESYNC => Action::requeue(left + EXPIRY_SLACK),
        _ => Action::requeue(RESYNC),
    })
}

/// What `grant` of the agent `identity` (from the store) amounts to now, and
/// the instant it was judged at: the one evaluation both the grant's status
/// and its agent's `access` list come from.
pub(super) async fn evaluate(
    ctx: &Context,
    grant: &SecretGrant,
    namespace: &str,
    identity: Option<&AgentIdentity>,
) -> Result<(GrantEvaluation, Timestamp), Error> {
    let conflict = identity.is_some_and(|i| {
        ctx.caches
            .identities_claiming(namespace, &i.spec.service_account_name)
            .len()
            > 1
    });
    let secret = ctx
        .caches
        .secrets
        .get_or_fetch(&ctx.client, namespace, &grant.spec.secret_name)
        .await?;
    let agent_state = match identity {
        Some(identity) => AgentState::Present { identity, conflict },
        None => AgentState::Missing,
    };
    let secret_state = SecretState::cached(&ctx.caches.secrets, secret.as_deref());
    // After the fetch, which may wait: an expiry passed meanwhile counts.
    let now = Timestamp::now();
    let evaluation = evaluate_grant_within(
        grant,
        agent_state,
        secret_state,
        now,
        Some(ctx.volume_size_limit_bytes),
    );
    Ok((evaluation, now))
}

/// The status fields the controller owns. The resolution fields belong to the
/// custody service's field manager and are never sent from here.
fn desired_status(
    grant: &SecretGrant,
    e: &GrantEvaluation,
    old: &SecretGrantStatus,
    now: Timestamp,
) -> SecretGrantStatus {
    let generation = grant.metadata.generation;
    SecretGrantStatus {
        phase: Some(e.phase),
        conditions: vec![conditions::ready(
            e.is_active(),
            e.reason,
            e.message.clone(),
            generation,
            &old.conditions,
            now,
        )],
        expires_at: e.expires_at.map(Time),
        content_digest: e.content_digest.clone(),
        observed_generation: generation,
        ..Default::default()
    }
}

fn controller_fields_equal(a: &SecretGrantStatus, b: &SecretGrantStatus) -> bool {
    a.phase == b.phase
        && a.conditions == b.conditions
        && a.expires_at == b.expires_at
        && a.content_digest == b.content_digest
        && a.observed_generation == b.observed_generation
}

fn transitions(
    grant: &SecretGrant,
    identity: Option<&AgentIdentity>,
    old: &SecretGrantStatus,
    e: &GrantEvaluation,
) -> Vec<Transition> {
    let namespace = grant.namespace().unwrap_or_default();
    let mut out = Vec::new();
    if old.phase != Some(e.phase) {
        let (reason, decision) = match e.phase {
            GrantPhase::Active => ("GrantActivated", Decision::Allowed),
            GrantPhase::Expired => ("GrantExpired", Decision::Denied),
            GrantPhase::Revoked => ("GrantRevoked", Decision::Denied),
            GrantPhase::Invalid => ("GrantInvalid", Decision::Denied),
            GrantPhase::Pending => ("GrantPending", Decision::Denied),
        };
        out.push(Transition::new(
            reason,
            decision,
            &namespace,
            e.message.clone(),
        ));
    }
    if let (Some(before), Some(after)) = (&old.content_digest, &e.content_digest)
        && before != after
    {
        out.push(Transition::new(
            "SecretRotated",
            Decision::Changed,
            &namespace,
            format!(
                "granted keys of Secret {:?} changed: digest {before} -> {after}",
                grant.spec.secret_name
            ),
        ));
    }
    for t in &mut out {
        t.audit.reason = Some(match t.reason {
            "SecretRotated" => "Rotated".to_owned(),
            _ => e.reason.as_str().to_owned(),
        });
        t.audit.agent = Some(grant.spec.agent.clone());
        t.audit.service_account = identity.map(|i| i.spec.service_account_name.clone());
        t.audit.grant = Some(grant.name_any());
        t.audit.secret = Some(grant.spec.secret_name.clone());
        t.audit.keys = grant.key_names();
        t.audit.content_digest = e.content_digest.clone();
    }
    out
}

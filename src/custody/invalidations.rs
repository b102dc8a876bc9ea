//! The push path: changes seen by the watch streams become Invalidation
//! messages (routed to the nodes they concern by [`super::fanout`]), and
//! grant states answer a plugin that has no pod token at hand (after a
//! restart).

use std::collections::HashMap;
use std::pin::Pin;

use futures::Stream;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tonic::Status;

use super::fanout::PodLister;
use crate::api::{AgentIdentity, SecretGrant};
use crate::caches::{Caches, Change, ChangeKind};
use crate::policy::evaluate::{AgentState, SecretState, evaluate_grant};
use crate::proto::scopehold::v1 as pb;
use crate::store_versions::Versions;

pub type InvalidationStream =
    Pin<Box<dyn Stream<Item = Result<pb::Invalidation, Status>> + Send + 'static>>;

fn timestamp_now() -> prost_types::Timestamp {
    let now = Timestamp::now();
    prost_types::Timestamp {
        seconds: now.as_second(),
        nanos: now.subsec_nanosecond(),
    }
}

pub(crate) fn resync() -> pb::Invalidation {
    pb::Invalidation {
        kind: pb::invalidation::Kind::Resync as i32,
        occurred_at: Some(timestamp_now()),
        ..Default::default()
    }
}

pub fn to_proto(change: Change) -> pb::Invalidation {
    use pb::invalidation::Kind;
    let kind = match change.kind {
        ChangeKind::Revoked => Kind::Revoked,
        ChangeKind::Expired => Kind::Expired,
        ChangeKind::Suspended => Kind::Suspended,
        ChangeKind::Rotated => Kind::Rotated,
        ChangeKind::Deleted => Kind::Deleted,
        ChangeKind::Conflict => Kind::Conflict,
        ChangeKind::Changed => Kind::Changed,
    };
    pb::Invalidation {
        kind: kind as i32,
        namespace: change.namespace,
        agent: change.agent.unwrap_or_default(),
        grant: change.grant.unwrap_or_default(),
        secret: change.secret.unwrap_or_default(),
        content_digest: change.content_digest.unwrap_or_default(),
        occurred_at: Some(timestamp_now()),
        versions: versions_to_proto(change.versions),
    }
}

/// `versions` on the wire; absent when nothing is known.
pub fn versions_to_proto(versions: Versions) -> Option<pb::StoreVersions> {
    (versions != Versions::default()).then_some(pb::StoreVersions {
        grants: versions.grants,
        identities: versions.identities,
        secrets: versions.secrets,
    })
}

/// Whether each grant may still be held by pods of the named agent, asked
/// by the node plugin on `node`. Only about agents with a pod on that node:
/// for any other the answer is inactive (`NotOnThisNode`) and says nothing
/// about the grant, as the invalidation stream would not have either.
pub async fn grant_states(
    caches: &Caches,
    client: &kube::Client,
    node: &str,
    refs: Vec<pb::GrantRef>,
) -> Vec<pb::GrantState> {
    let now = Timestamp::now();
    let mut out = Vec::with_capacity(refs.len());
    let pods = PodLister(client.clone());
    let mut placed: HashMap<(String, String), Result<bool, String>> = HashMap::new();
    for r in refs {
        let state = |active: bool, reason: &str| pb::GrantState {
            grant_ref: None,
            active,
            reason: reason.to_owned(),
            expires_at: None,
            content_digest: String::new(),
        };
        let key = (r.namespace.clone(), r.agent.clone());
        let here = match placed.get(&key) {
            Some(here) => here.clone(),
            None => {
                let here = pods
                    .agent_runs_on(caches, &r.namespace, &r.agent, node)
                    .await;
                placed.insert(key, here.clone());
                here
            }
        };
        match here {
            Ok(true) => {}
            Ok(false) => {
                out.push(pb::GrantState {
                    grant_ref: Some(r),
                    ..state(false, "NotOnThisNode")
                });
                continue;
            }
            Err(error) => {
                // Unknown is not inactive: the plugin keeps content and its
                // local expiry timer still applies.
                tracing::warn!(%error, namespace = %r.namespace, agent = %r.agent, "cannot tell where the agent's pods run; grant state unknown");
                out.push(pb::GrantState {
                    grant_ref: Some(r),
                    ..state(true, "Unknown")
                });
                continue;
            }
        }
        let grant: Option<std::sync::Arc<SecretGrant>> = caches
            .grants
            .get(&ObjectRef::new(&r.grant).within(&r.namespace));
        let mut answer = match grant {
            None => state(false, "NotFound"),
            Some(g) if g.spec.agent != r.agent => state(false, "AgentChanged"),
            Some(g) => {
                let identity: Option<std::sync::Arc<AgentIdentity>> = caches
                    .identities
                    .get(&ObjectRef::new(&r.agent).within(&r.namespace));
                let conflict = identity.as_ref().is_some_and(|i| {
                    caches
                        .identities_claiming(&r.namespace, &i.spec.service_account_name)
                        .len()
                        > 1
                });
                let secret = caches
                    .secrets
                    .get_or_fetch(client, &r.namespace, &g.spec.secret_name)
                    .await;
                let secret = match secret {
                    Ok(s) => s,
                    Err(error) => {
                        // Unknown is not inactive: the plugin keeps content
                        // and its local expiry timer still applies.
                        tracing::warn!(%error, grant = %g.name_any(), "grant state unknown");
                        out.push(pb::GrantState {
                            grant_ref: Some(r),
                            ..state(true, "Unknown")
                        });
                        continue;
                    }
                };
                let agent_state = match &identity {
                    Some(identity) => AgentState::Present { identity, conflict },
                    None => AgentState::Missing,
                };
                let e = evaluate_grant(
                    &g,
                    agent_state,
                    SecretState::cached(&caches.secrets, secret.as_deref()),
                    now,
                );
                pb::GrantState {
                    grant_ref: None,
                    active: e.is_active(),
                    reason: e.reason.as_str().to_owned(),
                    expires_at: e.expires_at.map(|t| prost_types::Timestamp {
                        seconds: t.as_second(),
                        nanos: 0,
                    }),
                    content_digest: e.content_digest.unwrap_or_default(),
                }
            }
        };
        answer.grant_ref = Some(r);
        out.push(answer);
    }
    out
}

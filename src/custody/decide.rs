//! Pure decisions of a Resolve call: does the token match the request, which
//! identity is the pod, which grants does it get, which files. No I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::ResourceExt;

use super::token_review::TokenClaims;
use crate::api::{AgentIdentity, DeliveryMode, SecretGrant};
use crate::policy::evaluate::GrantEvaluation;
use crate::secrets::SecretBytes;

/// Default file mode when the pod has an fsGroup: group-readable, and the
/// node plugin sets the group to the fsGroup.
pub const MODE_WITH_FS_GROUP: u32 = 0o440;
/// Default file mode without fsGroup: the agent may run as any non-root user,
/// and the tmpfs is private to the pod.
pub const MODE_WITHOUT_FS_GROUP: u32 = 0o444;

/// Why a Resolve call is refused. The string form is the audit reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    TokenRejected,
    TokenMismatch,
    WrongNode,
    PodNotFound,
    NoAgentIdentity,
    Conflict,
    AgentSuspended,
    GrantNotHeld,
    NoActiveGrants,
    /// Proxy grants asked for by a pod whose sidecar is not ScopeHold's.
    NotTheProxySidecar,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::TokenRejected => "TokenRejected",
            DenyReason::TokenMismatch => "TokenMismatch",
            DenyReason::WrongNode => "WrongNode",
            DenyReason::PodNotFound => "PodNotFound",
            DenyReason::NoAgentIdentity => "NoAgentIdentity",
            DenyReason::Conflict => "Conflict",
            DenyReason::AgentSuspended => "AgentSuspended",
            DenyReason::GrantNotHeld => "GrantNotHeld",
            DenyReason::NoActiveGrants => "NoActiveGrants",
            DenyReason::NotTheProxySidecar => "NotTheProxySidecar",
        }
    }
}

/// A refusal with a message for the caller (and the Event). Never holds a
/// token or a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    pub message: String,
    /// Who presented the token, from the TokenReview, when it passed: a
    /// denial names the claimed pod and, apart from it, the token's holder.
    pub presented_by: Option<Presenter>,
}

/// The holder of a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presenter {
    /// The TokenReview's user, `system:serviceaccount:NS:NAME`.
    pub user: String,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
}

impl Presenter {
    pub fn of(claims: &TokenClaims) -> Self {
        Presenter {
            user: format!(
                "system:serviceaccount:{}:{}",
                claims.namespace, claims.service_account
            ),
            pod: claims.pod_name.clone(),
            pod_uid: claims.pod_uid.clone(),
        }
    }
}

impl Denial {
    pub fn new(reason: DenyReason, message: impl Into<String>) -> Self {
        Denial {
            reason,
            message: message.into(),
            presented_by: None,
        }
    }
}

/// The pod as kubelet described it in the request.
#[derive(Clone, Debug)]
pub struct PodAsk<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// Empty when kubelet did not send it.
    pub service_account: &'a str,
}

/// The token must be bound to exactly the pod kubelet names, in its
/// namespace, as its ServiceAccount, and (when the token says) on the calling
/// plugin's node. Volume attributes never establish identity: the token does.
pub fn check_pod_claims(
    claims: &TokenClaims,
    ask: &PodAsk<'_>,
    caller_node: &str,
) -> Result<(), Denial> {
    let mismatch = |what: &str| {
        Denial::new(
            DenyReason::TokenMismatch,
            format!("pod token {what} does not match the request"),
        )
    };
    if claims.namespace != ask.namespace {
        return Err(mismatch("namespace"));
    }
    if !ask.service_account.is_empty() && claims.service_account != ask.service_account {
        return Err(mismatch("ServiceAccount"));
    }
    let (Some(pod_name), Some(pod_uid)) = (&claims.pod_name, &claims.pod_uid) else {
        return Err(Denial::new(
            DenyReason::TokenMismatch,
            "pod token is not bound to a pod (request it through CSIDriver tokenRequests)",
        ));
    };
    if pod_name != ask.name {
        return Err(mismatch("pod name"));
    }
    if pod_uid != ask.uid {
        return Err(mismatch("pod UID"));
    }
    if let Some(node) = &claims.node_name
        && node != caller_node
    {
        return Err(Denial::new(
            DenyReason::WrongNode,
            format!("pod is bound to node {node:?}, not to the calling node {caller_node:?}"),
        ));
    }
    Ok(())
}

/// The one AgentIdentity that claims the pod's ServiceAccount, given all
/// identities in `namespace` that claim `service_account` (sorted by name).
pub fn select_identity(
    claimers: Vec<Arc<AgentIdentity>>,
    namespace: &str,
    service_account: &str,
) -> Result<Arc<AgentIdentity>, Denial> {
    match claimers.as_slice() {
        [] => Err(Denial::new(
            DenyReason::NoAgentIdentity,
            format!(
                "no AgentIdentity in namespace {namespace:?} claims ServiceAccount {service_account:?}"
            ),
        )),
        [identity] => {
            if identity.is_suspended() {
                return Err(Denial::new(
                    DenyReason::AgentSuspended,
                    format!("AgentIdentity {:?} is suspended", identity.name_any()),
                ));
            }
            Ok(identity.clone())
        }
        many => Err(Denial::new(
            DenyReason::Conflict,
            format!(
                "ServiceAccount {service_account:?} is claimed by several AgentIdentities ({}): nothing resolves",
                many.iter()
                    .map(|i| i.name_any())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The grants to hand out: every active `file` grant, or exactly the
/// requested ones, each of which must be active and held by this agent.
/// `proxy` grants go only to a volume that names them (the proxy sidecar's,
/// which the agent container does not mount): a plain volume of the agent
/// never receives a value the agent is meant to use without holding.
pub fn select_grants(
    evaluated: Vec<(Arc<SecretGrant>, GrantEvaluation)>,
    requested: &[String],
    agent: &str,
) -> Result<Vec<(Arc<SecretGrant>, GrantEvaluation)>, Denial> {
    let (active, inactive): (Vec<_>, Vec<_>) =
        evaluated.into_iter().partition(|(_, e)| e.is_active());
    if requested.is_empty() {
        let active: Vec<_> = active
            .into_iter()
            .filter(|(g, _)| g.spec.delivery == DeliveryMode::File)
            .collect();
        if active.is_empty() {
            return Err(Denial::new(
                DenyReason::NoActiveGrants,
                format!(
                    "agent {agent:?} has no active SecretGrant with delivery: file (proxy grants reach only the volume of the proxy sidecar, which names them)"
                ),
            ));
        }
        return Ok(active);
    }
    let mut chosen = Vec::new();
    for name in requested {
        if let Some(hit) = active.iter().find(|(g, _)| &g.name_any() == name) {
            chosen.push(hit.clone());
        } else if let Some((_, e)) = inactive.iter().find(|(g, _)| &g.name_any() == name) {
            return Err(Denial::new(
                DenyReason::NoActiveGrants,
                format!("SecretGrant {name:?} is {} ({})", e.phase, e.reason),
            ));
        } else {
            return Err(Denial::new(
                DenyReason::GrantNotHeld,
                format!("agent {agent:?} holds no SecretGrant named {name:?}"),
            ));
        }
    }
    Ok(chosen)
}

/// One file to write into the pod's volume.
#[derive(Clone, PartialEq, Eq)]
pub struct GrantedFile {
    pub path: String,
    pub key: String,
    pub mode: u32,
    pub content: SecretBytes,
}

/// The files of one grant. Keys missing from `data` are skipped (the
/// evaluation that made the grant active already saw them).
pub fn files_for(
    grant: &SecretGrant,
    data: &BTreeMap<String, SecretBytes>,
    fs_group: Option<i64>,
) -> Vec<GrantedFile> {
    let default_mode = if fs_group.is_some() {
        MODE_WITH_FS_GROUP
    } else {
        MODE_WITHOUT_FS_GROUP
    };
    grant
        .spec
        .keys
        .iter()
        .filter_map(|k| {
            let content = data.get(&k.key)?.clone();
            let mode = k
                .mode
                .and_then(|m| u32::try_from(m).ok())
                .filter(|m| *m <= 0o777)
                .unwrap_or(default_mode);
            Some(GrantedFile {
                path: k.file_name().to_owned(),
                key: k.key.clone(),
                mode,
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::Reason;
    use crate::api::{AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrantSpec};

    fn claims() -> TokenClaims {
        TokenClaims {
            namespace: "team".into(),
            service_account: "bot".into(),
            pod_name: Some("agent-0".into()),
            pod_uid: Some("uid-1".into()),
            node_name: Some("node-a".into()),
        }
    }

    fn ask() -> PodAsk<'static> {
        PodAsk {
            namespace: "team",
            name: "agent-0",
            uid: "uid-1",
            service_account: "bot",
        }
    }

    #[test]
    fn token_must_match_the_pod_kubelet_names() {
        assert_eq!(check_pod_claims(&claims(), &ask(), "node-a"), Ok(()));
        let other_pod = PodAsk {
            name: "agent-1",
            ..ask()
        };
        assert_eq!(
            check_pod_claims(&claims(), &other_pod, "node-a").map_err(|d| d.reason),
            Err(DenyReason::TokenMismatch)
        );
        let other_uid = PodAsk {
            uid: "uid-2",
            ..ask()
        };
        assert!(check_pod_claims(&claims(), &other_uid, "node-a").is_err());
        let other_ns = PodAsk {
            namespace: "else",
            ..ask()
        };
        assert!(check_pod_claims(&claims(), &other_ns, "node-a").is_err());
        let other_sa = PodAsk {
            service_account: "root",
            ..ask()
        };
        assert!(check_pod_claims(&claims(), &other_sa, "node-a").is_err());
        assert_eq!(
            check_pod_claims(&claims(), &ask(), "node-b").map_err(|d| d.reason),
            Err(DenyReason::WrongNode)
        );
        let unbound = TokenClaims {
            pod_name: None,
            pod_uid: None,
            ..claims()
        };
        assert!(check_pod_claims(&unbound, &ask(), "node-a").is_err());
    }

    fn identity(name: &str, sa: &str, suspended: bool) -> Arc<AgentIdentity> {
        let mut i = AgentIdentity::new(
            name,
            AgentIdentitySpec {
                service_account_name: sa.into(),
                suspended,
                ..Default::default()
            },
        );
        i.metadata.namespace = Some("team".into());
        Arc::new(i)
    }

    #[test]
    fn identity_selection_fails_closed() {
        let one = vec![identity("bot", "bot", false)];
        assert_eq!(
            select_identity(one, "team", "bot").map(|i| i.name_any()),
            Ok("bot".to_owned())
        );
        assert_eq!(
            select_identity(vec![], "other", "bot").map_err(|d| d.reason),
            Err(DenyReason::NoAgentIdentity)
        );
        let two = vec![
            identity("bot", "bot", false),
            identity("evil", "bot", false),
        ];
        let conflict = select_identity(two, "team", "bot").map_err(|d| (d.reason, d.message));
        assert!(
            matches!(&conflict, Err((DenyReason::Conflict, m)) if m.contains("bot, evil")),
            "{conflict:?}"
        );
        let off = vec![identity("bot", "bot", true)];
        assert_eq!(
            select_identity(off, "team", "bot").map_err(|d| d.reason),
            Err(DenyReason::AgentSuspended)
        );
    }

    fn evaluated(name: &str, phase: GrantPhase) -> (Arc<SecretGrant>, GrantEvaluation) {
        let g = SecretGrant::new(
            name,
            SecretGrantSpec {
                agent: "bot".into(),
                secret_name: "s".into(),
                ..Default::default()
            },
        );
        let reason = if phase == GrantPhase::Active {
            Reason::Active
        } else {
            Reason::Revoked
        };
        (
            Arc::new(g),
            GrantEvaluation {
                phase,
                reason,
                message: String::new(),
                expires_at: None,
                content_digest: None,
            },
        )
    }

    #[test]
    fn grant_selection_and_narrowing() {
        let all = || {
            vec![
                evaluated("a", GrantPhase::Active),
                evaluated("b", GrantPhase::Active),
                evaluated("r", GrantPhase::Revoked),
            ]
        };
        let names = |v: Vec<(Arc<SecretGrant>, GrantEvaluation)>| {
            v.iter().map(|(g, _)| g.name_any()).collect::<Vec<_>>()
        };
        assert_eq!(
            select_grants(all(), &[], "bot").map(names),
            Ok(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(
            select_grants(all(), &["b".into()], "bot").map(names),
            Ok(vec!["b".to_owned()])
        );
        assert_eq!(
            select_grants(all(), &["zzz".into()], "bot").map_err(|d| d.reason),
            Err(DenyReason::GrantNotHeld)
        );
        assert_eq!(
            select_grants(all(), &["r".into()], "bot").map_err(|d| d.reason),
            Err(DenyReason::NoActiveGrants)
        );
        // A proxy grant never lands in a volume that does not name it.
        let mut proxied = evaluated("p", GrantPhase::Active);
        Arc::make_mut(&mut proxied.0).spec.delivery = DeliveryMode::Proxy;
        let with_proxy = || vec![evaluated("a", GrantPhase::Active), proxied.clone()];
        assert_eq!(
            select_grants(with_proxy(), &[], "bot").map(names),
            Ok(vec!["a".to_owned()])
        );
        assert_eq!(
            select_grants(with_proxy(), &["p".into()], "bot").map(names),
            Ok(vec!["p".to_owned()])
        );
        assert_eq!(
            select_grants(vec![proxied.clone()], &[], "bot").map_err(|d| d.reason),
            Err(DenyReason::NoActiveGrants)
        );
        assert_eq!(
            select_grants(vec![evaluated("r", GrantPhase::Revoked)], &[], "bot")
                .map_err(|d| d.reason),
            Err(DenyReason::NoActiveGrants)
        );
    }

    #[test]
    fn files_take_paths_and_modes_from_the_grant() {
        let g = SecretGrant::new(
            "g",
            SecretGrantSpec {
                agent: "bot".into(),
                secret_name: "s".into(),
                keys: vec![
                    GrantedKey {
                        key: "api".into(),
                        path: Some("api-key".into()),
                        mode: Some(0o400),
                        ..Default::default()
                    },
                    GrantedKey {
                        key: "url".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        let data: BTreeMap<String, SecretBytes> = [
            ("api".to_owned(), SecretBytes(b"1".to_vec())),
            ("url".to_owned(), SecretBytes(b"2".to_vec())),
            ("other".to_owned(), SecretBytes(b"3".to_vec())),
        ]
        .into();
        let with_group = files_for(&g, &data, Some(2000));
        assert_eq!(
            with_group
                .iter()
                .map(|f| (f.path.as_str(), f.mode))
                .collect::<Vec<_>>(),
            [("api-key", 0o400), ("url", MODE_WITH_FS_GROUP)]
        );
        let without = files_for(&g, &data, None);
        assert_eq!(without[1].mode, MODE_WITHOUT_FS_GROUP);
        assert!(
            without.iter().all(|f| f.key != "other"),
            "ungranted keys never leave"
        );
    }
}

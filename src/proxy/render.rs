//! From a pod to its proxy rules: which AgentIdentity claims the pod's
//! ServiceAccount, and that agent's active proxy grants. One function for
//! the admission webhook (reading the controller's caches) and for
//! `kubectl scopehold inject` (reading lists), so both change a pod alike.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;

use super::pod::InjectError;
use super::rules::ProxyRules;
use crate::api::{AgentIdentity, SecretGrant};

/// The ServiceAccount the pod runs as (`default` when it names none, as the
/// API server's ServiceAccount admission does).
pub fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The rules of the agent that claims `service_account` in `namespace`.
/// `identities` may hold identities of any ServiceAccount; `grants` those
/// of any agent in the namespace.
pub fn rules_for<'a>(
    namespace: &str,
    service_account: &str,
    identities: impl IntoIterator<Item = &'a AgentIdentity>,
    grants: &[SecretGrant],
) -> Result<ProxyRules, InjectError> {
    let mut claiming = identities
        .into_iter()
        .filter(|i| i.spec.service_account_name == service_account);
    let identity = match (claiming.next(), claiming.next()) {
        (Some(one), None) => one,
        (None, _) => {
            return Err(InjectError::NoIdentity {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            });
        }
        (Some(_), Some(_)) => {
            return Err(InjectError::IdentityConflict {
                service_account: service_account.to_owned(),
            });
        }
    };
    ProxyRules::from_grants(
        namespace,
        &identity.name_any(),
        grants,
        identity.spec.egress_allow_list.clone(),
    )
    .map_err(|e| InjectError::Rules(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentIdentitySpec;

    fn identity(name: &str, sa: &str) -> AgentIdentity {
        let mut i = AgentIdentity::new(
            name,
            AgentIdentitySpec {
                service_account_name: sa.into(),
                ..Default::default()
            },
        );
        i.metadata.namespace = Some("ns".into());
        i
    }

    #[test]
    fn the_claiming_identity_decides() {
        let a = identity("a", "sa-a");
        let b = identity("b", "sa-b");
        let rules = rules_for("ns", "sa-b", [&a, &b], &[]).unwrap();
        assert_eq!(rules.agent, "b");
        assert_eq!(
            rules_for("ns", "nobody", [&a, &b], &[]).unwrap_err(),
            InjectError::NoIdentity {
                namespace: "ns".into(),
                service_account: "nobody".into()
            }
        );
        let b2 = identity("b2", "sa-b");
        assert!(matches!(
            rules_for("ns", "sa-b", [&a, &b, &b2], &[]),
            Err(InjectError::IdentityConflict { .. })
        ));
        assert_eq!(service_account(&Pod::default()), "default");
    }
}

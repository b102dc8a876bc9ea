//! Pure lookups over the reflector stores: which objects a change affects.

use std::collections::HashSet;
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::api::{AgentIdentity, SecretGrant};

/// Grants in `namespace` that read Secret `secret`.
pub fn grants_for_secret(
    grants: &[Arc<SecretGrant>],
    namespace: &str,
    secret: &str,
) -> Vec<ObjectRef<SecretGrant>> {
    grants
        .iter()
        .filter(|g| g.namespace().as_deref() == Some(namespace) && g.spec.secret_name == secret)
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

/// Whether any grant in `namespace` still reads Secret `secret`.
pub fn secret_is_referenced(grants: &[Arc<SecretGrant>], namespace: &str, secret: &str) -> bool {
    grants
        .iter()
        .any(|g| g.namespace().as_deref() == Some(namespace) && g.spec.secret_name == secret)
}

/// Names of the identities in `namespace` that claim ServiceAccount `sa`.
pub fn identities_claiming(
    identities: &[Arc<AgentIdentity>],
    namespace: &str,
    sa: &str,
) -> Vec<String> {
    let mut names: Vec<String> = identities
        .iter()
        .filter(|i| {
            i.namespace().as_deref() == Some(namespace) && i.spec.service_account_name == sa
        })
        .map(|i| i.name_any())
        .collect();
    names.sort();
    names
}

/// Grants in `namespace` whose agent is one of `agents`.
pub fn grants_for_agents(
    grants: &[Arc<SecretGrant>],
    namespace: &str,
    agents: &HashSet<String>,
) -> Vec<ObjectRef<SecretGrant>> {
    grants
        .iter()
        .filter(|g| g.namespace().as_deref() == Some(namespace) && agents.contains(&g.spec.agent))
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

/// Grants in `namespace` given to agent `agent`.
pub fn grants_of_agent<'a>(
    grants: &'a [Arc<SecretGrant>],
    namespace: &str,
    agent: &str,
) -> Vec<&'a SecretGrant> {
    grants
        .iter()
        .filter(|g| g.namespace().as_deref() == Some(namespace) && g.spec.agent == agent)
        .map(|g| g.as_ref())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentIdentitySpec, GrantedKey, SecretGrantSpec};

    fn grant(ns: &str, name: &str, agent: &str, secret: &str) -> Arc<SecretGrant> {
        let mut g = SecretGrant::new(
            name,
            SecretGrantSpec {
                agent: agent.into(),
                secret_name: secret.into(),
                keys: vec![GrantedKey {
                    key: "k".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        g.metadata.namespace = Some(ns.into());
        Arc::new(g)
    }

    fn identity(ns: &str, name: &str, sa: &str) -> Arc<AgentIdentity> {
        let mut i = AgentIdentity::new(
            name,
            AgentIdentitySpec {
                service_account_name: sa.into(),
                ..Default::default()
            },
        );
        i.metadata.namespace = Some(ns.into());
        Arc::new(i)
    }

    #[test]
    fn secret_lookups_stay_in_their_namespace() {
        let grants = vec![
            grant("a", "g1", "bot", "s"),
            grant("b", "g2", "bot", "s"),
            grant("a", "g3", "bot", "t"),
        ];
        let hits = grants_for_secret(&grants, "a", "s");
        assert_eq!(
            hits.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["g1"]
        );
        assert!(secret_is_referenced(&grants, "b", "s"));
        assert!(!secret_is_referenced(&grants, "b", "t"));
    }

    #[test]
    fn claimants_of_a_service_account() {
        let ids = vec![
            identity("a", "x", "sa"),
            identity("a", "y", "sa"),
            identity("b", "z", "sa"),
        ];
        assert_eq!(identities_claiming(&ids, "a", "sa"), ["x", "y"]);
        assert!(identities_claiming(&ids, "a", "other").is_empty());
    }

    #[test]
    fn grants_by_agent() {
        let grants = vec![
            grant("a", "g1", "x", "s"),
            grant("a", "g2", "y", "s"),
            grant("b", "g3", "x", "s"),
        ];
        let agents: HashSet<String> = ["x".to_owned()].into();
        let hits = grants_for_agents(&grants, "a", &agents);
        assert_eq!(
            hits.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["g1"]
        );
        assert_eq!(grants_of_agent(&grants, "a", "y").len(), 1);
    }
}

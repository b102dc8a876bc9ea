//! The CRD YAML that `scopehold crdgen` prints and `crds/` holds.

use kube::CustomResourceExt;

use crate::api::{AgentIdentity, SecretGrant};

/// File name in `crds/` and the YAML text of each CRD.
pub fn documents() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        (
            "agentidentities.scopehold.dev.yaml",
            serde_yaml::to_string(&AgentIdentity::crd())?,
        ),
        (
            "secretgrants.scopehold.dev.yaml",
            serde_yaml::to_string(&SecretGrant::crd())?,
        ),
    ])
}

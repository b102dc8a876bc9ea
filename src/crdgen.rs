//! The YAML that `scopehold crdgen` prints and `crds/` holds: the CRDs, and the
//! admission policy that keeps granting from being a way around RBAC.

use kube::CustomResourceExt;

use crate::api::{AgentIdentity, SecretGrant};

/// The ValidatingAdmissionPolicy and its binding (see the file's comments).
pub const ADMISSION_POLICY: &str = include_str!("admission_policy.yaml");

/// File name in `crds/` and the YAML text of each document.
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
        (
            "zz-admission-policy.scopehold.dev.yaml",
            ADMISSION_POLICY.to_owned(),
        ),
    ])
}

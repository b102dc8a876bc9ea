//! The local demo: a real API server, the controller and the node plugin on
//! this machine, kubelet's part played in-process, walking the five steps and
//! the incident path in plain words.

pub mod kubelet;
pub mod local;
mod steps;

use std::path::PathBuf;

pub use steps::run;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error(transparent)]
    Kubelet(#[from] kubelet::KubeletError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("reading the kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{0}")]
    Step(String),
    #[error("the demo must run as root (it mounts a tmpfs, as the node plugin does on a node)")]
    NotRoot,
}

/// Where the repository is (for the API server's build script) and where
/// the `scopehold` binary is (beside this one).
#[derive(Clone, Debug)]
pub struct DemoPaths {
    pub repo: PathBuf,
    pub scopehold: PathBuf,
}

impl DemoPaths {
    pub fn discover() -> Result<Self, DemoError> {
        let exe = std::env::current_exe()
            .map_err(|e| DemoError::Step(format!("locating this program: {e}")))?;
        let scopehold = exe.with_file_name("scopehold");
        if !scopehold.exists() {
            return Err(DemoError::Step(format!(
                "{} not found: build it first (cargo build --bin scopehold)",
                scopehold.display()
            )));
        }
        let repo = std::env::var_os("SCOPEHOLD_REPO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        Ok(DemoPaths { repo, scopehold })
    }
}

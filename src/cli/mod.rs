//! `kubectl scopehold`: the operator's view of ScopeHold. Grants and revokes
//! access, shows what an agent can see and who can see a Secret, reads the
//! audit trail from Kubernetes Events, and runs the incident path
//! (`exposure`). It imports only `api`; it never reads or prints a Secret
//! value (it reads a Secret's key names when granting).

pub mod args;
pub mod commands;
pub mod error;
pub mod output;
pub mod table;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::api::{AgentIdentity, SecretGrant};
pub use args::{Cli, Command, OutputFormat};
pub use error::CliError;

/// Field manager of every write the plugin makes (visible in managedFields).
pub const FIELD_MANAGER: &str = "kubectl-scopehold";

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Demo = cli.command {
        return crate::demo::run().await.map_err(CliError::Demo);
    }
    let ctx = Ctx::connect(&cli.global).await?;
    match &cli.command {
        Command::Grant(a) => commands::grant::run(&ctx, a).await,
        Command::Revoke { grant } => commands::state::revoke(&ctx, grant).await,
        Command::Suspend { agent } => commands::state::set_suspended(&ctx, agent, true).await,
        Command::Resume { agent } => commands::state::set_suspended(&ctx, agent, false).await,
        Command::Access { agent } => commands::access::access(&ctx, agent).await,
        Command::WhoCan { secret } => commands::access::who_can(&ctx, secret).await,
        Command::Audit(a) => commands::audit::run(&ctx, a).await,
        Command::Exposure(a) => commands::exposure::run(&ctx, a).await,
        Command::Inject(a) => commands::inject::run(&ctx, a).await,
        Command::Usage(a) => commands::usage::run(&ctx, a).await,
        Command::Demo => crate::demo::run().await.map_err(CliError::Demo),
    }
}

/// A client and the namespace every command works in.
pub struct Ctx {
    pub client: Client,
    pub namespace: String,
    pub output: OutputFormat,
}

impl Ctx {
    pub async fn connect(global: &args::GlobalArgs) -> Result<Self, CliError> {
        let options = KubeConfigOptions {
            context: global.context.clone(),
            cluster: None,
            user: None,
        };
        let config = match load_kubeconfig(global.kubeconfig.as_deref())? {
            Some(kubeconfig) => Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| CliError::Kubeconfig(e.to_string()))?,
            None if global.context.is_some() => {
                return Err(CliError::Kubeconfig(
                    "--context given but no kubeconfig found (set --kubeconfig or KUBECONFIG)"
                        .into(),
                ));
            }
            None => Config::incluster().map_err(|e| {
                CliError::Kubeconfig(format!(
                    "no kubeconfig found (--kubeconfig, KUBECONFIG or ~/.kube/config) and not in a cluster: {e}"
                ))
            })?,
        };
        let namespace = global
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(error::api("building the API client"))?;
        Ok(Ctx {
            client,
            namespace,
            output: global.output,
        })
    }

    pub fn grants(&self) -> Api<SecretGrant> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn identities(&self) -> Api<AgentIdentity> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn events(&self) -> Api<Event> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// Reads the kubeconfig like kubectl: the given path list (from
/// `--kubeconfig` or `KUBECONFIG`, merged in order), else `~/.kube/config`.
/// `None` when there is none at all (in-cluster use).
fn load_kubeconfig(paths: Option<&str>) -> Result<Option<Kubeconfig>, CliError> {
    let given: Vec<std::path::PathBuf> = paths
        .map(|p| {
            std::env::split_paths(p)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if given.is_empty() {
        let Some(home) = std::env::var_os("HOME") else {
            return Ok(None);
        };
        let default = std::path::Path::new(&home).join(".kube").join("config");
        if !default.exists() {
            return Ok(None);
        }
        return read(&default).map(Some);
    }
    // As kubectl does with a KUBECONFIG list: missing files in a list are
    // skipped; a single named file must exist.
    let list = given.len() > 1;
    let mut merged: Option<Kubeconfig> = None;
    for path in &given {
        if list && !path.exists() {
            continue;
        }
        let next = read(path)?;
        merged = Some(match merged {
            None => next,
            Some(m) => m
                .merge(next)
                .map_err(|e| CliError::Kubeconfig(format!("{}: {e}", path.display())))?,
        });
    }
    Ok(merged)
}

/// Reads one kubeconfig file (kube's error names the path).
fn read(path: &std::path::Path) -> Result<Kubeconfig, CliError> {
    Kubeconfig::read_from(path).map_err(|e| CliError::Kubeconfig(e.to_string()))
}

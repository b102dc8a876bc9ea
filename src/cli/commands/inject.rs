//! `kubectl scopehold inject -f pod.yaml`: prints the pod as the admission
//! webhook would change it (the same function, `proxy::pod::inject`), for
//! clusters that run no webhook.

use std::io::Read as _;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;

use crate::cli::args::InjectArgs;
use crate::cli::error::{CliError, api};
use crate::cli::{Ctx, OutputFormat};
use crate::proxy::pod::{SidecarSettings, UsageTarget, inject};
use crate::proxy::render::{rules_for, service_account};

pub async fn run(ctx: &Ctx, args: &InjectArgs) -> Result<(), CliError> {
    let mut text = String::new();
    if args.filename == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(&args.filename)
            .map_err(|e| CliError::invalid(format!("reading {}: {e}", args.filename)))?;
    }
    let pod: Pod = serde_yaml::from_str(&text)
        .map_err(|e| CliError::invalid(format!("{} is not a Pod: {e}", args.filename)))?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| ctx.namespace.clone());
    let service_account = service_account(&pod);
    let identities =
        kube::Api::<crate::api::AgentIdentity>::namespaced(ctx.client.clone(), &namespace)
            .list(&ListParams::default())
            .await
            .map_err(api("listing AgentIdentities"))?;
    let grants = kube::Api::<crate::api::SecretGrant>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .map_err(api("listing SecretGrants"))?;
    let rules = rules_for(
        &namespace,
        &service_account,
        &identities.items,
        &grants.items,
    )
    .map_err(|e| CliError::invalid(e.to_string()))?;
    let usage = match (&args.usage_url, &args.usage_ca_file) {
        (Some(url), Some(file)) => Some(UsageTarget {
            url: url.clone(),
            ca_pem: std::fs::read_to_string(file)
                .map_err(|e| CliError::invalid(format!("reading {file}: {e}")))?,
        }),
        _ => None,
    };
    let upstream_ca_pem = match &args.upstream_ca_file {
        Some(file) => {
            let pem = std::fs::read_to_string(file)
                .map_err(|e| CliError::invalid(format!("reading {file}: {e}")))?;
            crate::proxy::ca_certificates(&pem)
                .map_err(|e| CliError::invalid(format!("{file}: {e}")))?;
            Some(pem)
        }
        None => None,
    };
    let settings = SidecarSettings {
        image: args.image.clone(),
        port: args.proxy_port,
        usage,
        upstream_ca_pem,
    };
    let changed = inject(&pod, &rules, &settings).map_err(|e| CliError::invalid(e.to_string()))?;
    match ctx.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&changed)?),
        _ => print!("{}", serde_yaml::to_string(&changed)?),
    }
    Ok(())
}

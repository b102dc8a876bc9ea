//! `revoke GRANT`, `suspend AGENT`, `resume AGENT`: one merge patch each.

use kube::Resource;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::api::{AgentIdentity, SecretGrant};
use crate::cli::error::{api, status_code};
use crate::cli::output::{self, say};
use crate::cli::{CliError, Ctx, FIELD_MANAGER, OutputFormat};

pub async fn revoke(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let (grant, changed) = revoke_grant(ctx, name).await?;
    match ctx.output {
        OutputFormat::Table => {
            let what = if changed {
                "revoked"
            } else {
                "already revoked"
            };
            output::print(&format!("secretgrant.scopehold.dev/{name} {what}\n"))
        }
        format => output::print(&output::document(
            format,
            &output::without_managed_fields(&grant),
        )?),
    }
}

/// Sets `spec.revoked`; returns the grant and whether it changed anything.
pub async fn revoke_grant(ctx: &Ctx, name: &str) -> Result<(SecretGrant, bool), CliError> {
    let api_ = ctx.grants();
    let current = api_
        .get_opt(name)
        .await
        .map_err(api(format!("reading SecretGrant {name:?}")))?
        .ok_or_else(|| CliError::not_found("SecretGrant", name, &ctx.namespace))?;
    if current.spec.revoked {
        return Ok((current, false));
    }
    let body = json!({"spec": {"revoked": true}});
    let patched = patch(&api_, ("SecretGrant", name), body, ctx, "revoking").await?;
    Ok((patched, true))
}

pub async fn set_suspended(ctx: &Ctx, agent: &str, suspended: bool) -> Result<(), CliError> {
    let api_ = ctx.identities();
    let current = api_
        .get_opt(agent)
        .await
        .map_err(api(format!("reading AgentIdentity {agent:?}")))?
        .ok_or_else(|| CliError::not_found("AgentIdentity", agent, &ctx.namespace))?;
    let verb = if suspended { "suspended" } else { "resumed" };
    let identity = if current.spec.suspended == suspended {
        say(
            ctx.output,
            &format!(
                "agentidentity.scopehold.dev/{agent} already {}",
                if suspended { "suspended" } else { "active" }
            ),
        )?;
        current
    } else {
        let body = json!({"spec": {"suspended": suspended}});
        let patched: AgentIdentity =
            patch(&api_, ("AgentIdentity", agent), body, ctx, "updating").await?;
        say(
            ctx.output,
            &format!("agentidentity.scopehold.dev/{agent} {verb}"),
        )?;
        patched
    };
    if ctx.output != OutputFormat::Table {
        output::print(&output::document(
            ctx.output,
            &output::without_managed_fields(&identity),
        )?)?;
    }
    Ok(())
}

/// A merge patch of `kind`/`name`; a 404 becomes the usual not-found error.
async fn patch<K>(
    api_: &kube::Api<K>,
    (kind, name): (&'static str, &str),
    body: serde_json::Value,
    ctx: &Ctx,
    verb: &str,
) -> Result<K, CliError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api_.patch(name, &params, &Patch::Merge(&body)).await {
        Ok(object) => Ok(object),
        // Deleted between the read and the patch.
        Err(e) if status_code(&e) == Some(404) => {
            Err(CliError::not_found(kind, name, &ctx.namespace))
        }
        Err(e) => Err(api(format!("{verb} {kind} {name:?}"))(e)),
    }
}

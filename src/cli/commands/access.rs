//! `access AGENT` (what it can resolve now) and `who-can SECRET` (every grant
//! on a Secret).

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::ListParams;
use serde::Serialize;

use crate::api::{AgentIdentity, GrantPhase, SecretGrant};
use crate::cli::error::api;
use crate::cli::output::{self, note, say};
use crate::cli::table::{self, Table};
use crate::cli::{CliError, Ctx, OutputFormat};

/// One thing an agent can resolve right now.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccessRow {
    pub grant: String,
    pub secret: String,
    pub keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// One grant on a Secret, in any phase.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrantRow {
    pub grant: String,
    pub agent: String,
    pub secret: String,
    pub keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<GrantPhase>,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub async fn access(ctx: &Ctx, agent: &str) -> Result<(), CliError> {
    let identity = ctx
        .identities()
        .get_opt(agent)
        .await
        .map_err(api(format!("reading AgentIdentity {agent:?}")))?
        .ok_or_else(|| CliError::not_found("AgentIdentity", agent, &ctx.namespace))?;
    let grants = list_grants(ctx).await?;
    let now = Timestamp::now();
    let rows = access_rows(&identity, &grants, now);
    if ctx.output != OutputFormat::Table {
        return output::print(&output::document(ctx.output, &rows)?);
    }
    if rows.is_empty() {
        return say(
            ctx.output,
            &format!(
                "AgentIdentity {agent:?} can resolve nothing right now: {}.",
                why_nothing(&identity)
            ),
        );
    }
    let mut t = Table::new(&["GRANT", "SECRET", "KEYS", "EXPIRES"]);
    for r in &rows {
        t.row(vec![
            r.grant.clone(),
            r.secret.clone(),
            table::list(&r.keys),
            table::expiry(r.expires_at, now, true),
        ]);
    }
    output::print(&t.render())
}

pub async fn who_can(ctx: &Ctx, secret: &str) -> Result<(), CliError> {
    let grants = list_grants(ctx).await?;
    let rows = grant_rows(&grants, secret);
    let exists = secret_exists(ctx, secret).await?;
    if rows.is_empty() && !exists {
        return Err(CliError::not_found("Secret", secret, &ctx.namespace));
    }
    if !exists {
        note(&format!(
            "Warning: Secret {secret:?} does not exist in namespace {:?}; its grants resolve nothing",
            ctx.namespace
        ));
    }
    if ctx.output != OutputFormat::Table {
        return output::print(&output::document(ctx.output, &rows)?);
    }
    if rows.is_empty() {
        return say(
            ctx.output,
            &format!(
                "No SecretGrant names Secret {secret:?} in namespace {:?}: no agent can read it.",
                ctx.namespace
            ),
        );
    }
    let now = Timestamp::now();
    let mut t = Table::new(&["GRANT", "AGENT", "KEYS", "PHASE", "EXPIRES"]);
    for r in &rows {
        t.row(vec![
            r.grant.clone(),
            r.agent.clone(),
            table::list(&r.keys),
            phase_cell(r.phase),
            table::expiry(r.expires_at, now, r.phase.is_some()),
        ]);
    }
    output::print(&t.render())
}

pub async fn list_grants(ctx: &Ctx) -> Result<Vec<SecretGrant>, CliError> {
    Ok(ctx
        .grants()
        .list(&ListParams::default())
        .await
        .map_err(api(format!(
            "listing SecretGrants in namespace {:?}",
            ctx.namespace
        )))?
        .items)
}

/// Whether the Secret exists, without reading its values.
pub async fn secret_exists(ctx: &Ctx, secret: &str) -> Result<bool, CliError> {
    Ok(ctx
        .secrets()
        .get_metadata_opt(secret)
        .await
        .map_err(api(format!("reading Secret {secret:?}")))?
        .is_some())
}

pub fn phase_cell(phase: Option<GrantPhase>) -> String {
    phase.map_or_else(|| "-".to_owned(), |p| p.as_str().to_owned())
}

/// What the agent can resolve now: the controller's `status.access`, checked
/// against each grant (still Active, not past its expiry) in case the status
/// lags behind. Nothing while the agent is suspended.
pub fn access_rows(
    identity: &AgentIdentity,
    grants: &[SecretGrant],
    now: Timestamp,
) -> Vec<AccessRow> {
    if identity.spec.suspended {
        return Vec::new();
    }
    let agent = identity.name_any();
    let entries = identity
        .status
        .as_ref()
        .map(|s| s.access.as_slice())
        .unwrap_or_default();
    let mut rows: Vec<AccessRow> = entries
        .iter()
        .filter_map(|entry| {
            let grant = grants
                .iter()
                .find(|g| g.name_any() == entry.grant && g.spec.agent == agent)?;
            let expires_at = grant
                .status
                .as_ref()
                .and_then(|s| s.expires_at.as_ref())
                .map(|t| t.0);
            let active = grant.phase() == Some(GrantPhase::Active)
                && !grant.spec.revoked
                && expires_at.is_none_or(|at| at > now);
            active.then(|| AccessRow {
                grant: entry.grant.clone(),
                secret: entry.secret.clone(),
                keys: entry.keys.clone(),
                expires_at,
            })
        })
        .collect();
    rows.sort_by(|a, b| a.grant.cmp(&b.grant));
    rows
}

/// Why an agent has nothing to resolve, for the empty `access` table.
pub fn why_nothing(identity: &AgentIdentity) -> String {
    if identity.spec.suspended {
        return "it is suspended (kubectl scopehold resume to lift it)".to_owned();
    }
    let ready = identity
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status != "True" => format!("it is not Ready ({}: {})", c.reason, c.message),
        None => "the controller has not reported on it yet".to_owned(),
        Some(_) => "it holds no active grant".to_owned(),
    }
}

/// Every grant naming `secret`, sorted by name.
pub fn grant_rows(grants: &[SecretGrant], secret: &str) -> Vec<GrantRow> {
    let mut rows: Vec<GrantRow> = grants
        .iter()
        .filter(|g| g.spec.secret_name == secret)
        .map(|g| GrantRow {
            grant: g.name_any(),
            agent: g.spec.agent.clone(),
            secret: g.spec.secret_name.clone(),
            keys: g.key_names(),
            phase: g.phase(),
            revoked: g.spec.revoked,
            expires_at: g
                .status
                .as_ref()
                .and_then(|s| s.expires_at.as_ref())
                .map(|t| t.0),
            reason: g.spec.reason.clone(),
        })
        .collect();
    rows.sort_by(|a, b| a.grant.cmp(&b.grant));
    rows
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::identity::AccessEntry;
    use crate::api::{
        AgentIdentitySpec, AgentIdentityStatus, GrantedKey, SecretGrantSpec, SecretGrantStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub(crate) fn grant(
        name: &str,
        agent: &str,
        secret: &str,
        phase: Option<GrantPhase>,
        expires: Option<i64>,
    ) -> SecretGrant {
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
        g.status = Some(SecretGrantStatus {
            phase,
            expires_at: expires.map(|s| Time(Timestamp::from_second(s).unwrap())),
            ..Default::default()
        });
        g
    }

    fn identity(access: &[(&str, &str)]) -> AgentIdentity {
        let mut i = AgentIdentity::new(
            "bot",
            AgentIdentitySpec {
                service_account_name: "bot".into(),
                ..Default::default()
            },
        );
        i.status = Some(AgentIdentityStatus {
            access: access
                .iter()
                .map(|(g, s)| AccessEntry {
                    grant: (*g).into(),
                    secret: (*s).into(),
                    keys: vec!["k".into()],
                })
                .collect(),
            ..Default::default()
        });
        i
    }

    #[test]
    fn access_keeps_only_grants_that_still_resolve() {
        let now = Timestamp::from_second(2_000_000_000).unwrap();
        let grants = vec![
            grant(
                "b-ok",
                "bot",
                "s1",
                Some(GrantPhase::Active),
                Some(2_000_003_600),
            ),
            grant("a-forever", "bot", "s2", Some(GrantPhase::Active), None),
            grant(
                "lagging-expiry",
                "bot",
                "s1",
                Some(GrantPhase::Active),
                Some(1_999_999_000),
            ),
            grant("now-revoked", "bot", "s1", Some(GrantPhase::Revoked), None),
            grant("other-agent", "eve", "s1", Some(GrantPhase::Active), None),
        ];
        let i = identity(&[
            ("b-ok", "s1"),
            ("a-forever", "s2"),
            ("lagging-expiry", "s1"),
            ("now-revoked", "s1"),
            ("other-agent", "s1"),
            ("deleted", "s1"),
        ]);
        let rows = access_rows(&i, &grants, now);
        let names: Vec<&str> = rows.iter().map(|r| r.grant.as_str()).collect();
        assert_eq!(names, ["a-forever", "b-ok"]);
        assert_eq!(
            rows[1].expires_at.map(|t| t.as_second()),
            Some(2_000_003_600)
        );
    }

    #[test]
    fn a_suspended_agent_resolves_nothing() {
        let grants = vec![grant("g", "bot", "s", Some(GrantPhase::Active), None)];
        let mut i = identity(&[("g", "s")]);
        i.spec.suspended = true;
        assert!(access_rows(&i, &grants, Timestamp::now()).is_empty());
        assert!(why_nothing(&i).contains("suspended"));
    }

    #[test]
    fn who_can_lists_every_phase_of_that_secret_only() {
        let grants = vec![
            grant("z", "bot", "db", Some(GrantPhase::Revoked), None),
            grant("a", "eve", "db", None, None),
            grant("m", "bot", "other", Some(GrantPhase::Active), None),
        ];
        let rows = grant_rows(&grants, "db");
        let names: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.grant.as_str(), r.agent.as_str()))
            .collect();
        assert_eq!(names, [("a", "eve"), ("z", "bot")]);
        assert_eq!(phase_cell(rows[0].phase), "-");
        assert_eq!(phase_cell(rows[1].phase), "Revoked");
    }
}

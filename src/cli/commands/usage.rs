//! `usage GRANT|AGENT [--since DURATION]`: the incident question for proxy
//! grants, "where was this key used, and when", from what the sidecars
//! reported into the grants' statuses (`uses`, `lastUsedAt`, `recentUses`).

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use super::access::list_grants;
use crate::api::{DeliveryMode, SecretGrant};
use crate::cli::args::UsageArgs;
use crate::cli::output::{self, note};
use crate::cli::table::{self, Table};
use crate::cli::{CliError, Ctx, OutputFormat};

/// Uses of one grant.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrantUsage {
    pub grant: String,
    pub agent: String,
    pub secret: String,
    pub delivery: DeliveryMode,
    /// Every use the sidecars reported.
    pub uses: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
    /// Where, per pod and host (within `--since`), most recent first.
    pub places: Vec<UsePlace>,
    /// More uses were counted than the places still show (the status keeps
    /// the most recent few): older places may be missing.
    pub possibly_incomplete: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsePlace {
    pub pod: String,
    pub host: String,
    pub count: i64,
    pub first_used: Timestamp,
    pub last_used: Timestamp,
}

pub async fn run(ctx: &Ctx, args: &UsageArgs) -> Result<(), CliError> {
    let since = match &args.since {
        Some(text) => {
            let d = crate::api::duration::parse(text)
                .map_err(|e| CliError::invalid(format!("--since {text:?}: {e}")))?;
            let span = k8s_openapi::jiff::SignedDuration::try_from(d)
                .map_err(|e| CliError::invalid(format!("--since {text:?}: {e}")))?;
            Some(
                Timestamp::now()
                    .checked_sub(span)
                    .map_err(|e| CliError::invalid(format!("--since {text:?}: {e}")))?,
            )
        }
        None => None,
    };
    let grants = list_grants(ctx).await?;
    let name = args.name.as_str();
    let selected: Vec<&SecretGrant> = if args.agent {
        grants.iter().filter(|g| g.spec.agent == name).collect()
    } else {
        match grants.iter().find(|g| g.name_any() == name) {
            Some(g) => vec![g],
            None => grants.iter().filter(|g| g.spec.agent == name).collect(),
        }
    };
    if selected.is_empty() {
        return Err(CliError::invalid(format!(
            "no SecretGrant named {name:?} and no grant of an agent named {name:?} in namespace {:?}",
            ctx.namespace
        )));
    }
    let report: Vec<GrantUsage> = selected.iter().map(|g| usage(g, since)).collect();
    match ctx.output {
        OutputFormat::Table => output::print(&render(&report))?,
        format => output::print(&output::document(format, &report)?)?,
    }
    let partial: Vec<&str> = report
        .iter()
        .filter(|u| u.possibly_incomplete)
        .map(|u| u.grant.as_str())
        .collect();
    if !partial.is_empty() {
        note(&format!(
            "Note: {} counted more uses than its recent places show; the sidecars' audit lines (event ProxyRequest) have every request.",
            partial.join(", ")
        ));
    }
    Ok(())
}

/// The uses of `grant`, places at or after `since`.
pub fn usage(grant: &SecretGrant, since: Option<Timestamp>) -> GrantUsage {
    let status = grant.status.clone().unwrap_or_default();
    let uses = status.uses.unwrap_or(0);
    let shown: i64 = status.recent_uses.iter().map(|r| r.count).sum();
    let mut places: Vec<UsePlace> = status
        .recent_uses
        .iter()
        .filter(|r| since.is_none_or(|s| r.last_at.0 >= s))
        .map(|r| UsePlace {
            pod: r.pod.clone(),
            host: r.host.clone(),
            count: r.count,
            first_used: r.first_at.0,
            last_used: r.last_at.0,
        })
        .collect();
    places.sort_by_key(|p| std::cmp::Reverse(p.last_used));
    GrantUsage {
        grant: grant.name_any(),
        agent: grant.spec.agent.clone(),
        secret: grant.spec.secret_name.clone(),
        delivery: grant.spec.delivery,
        uses,
        last_used_at: status.last_used_at.map(|t| t.0),
        places,
        possibly_incomplete: uses > shown,
    }
}

/// The table: one row per place, or one row saying there was none.
pub fn render(report: &[GrantUsage]) -> String {
    let mut t = Table::new(&[
        "GRANT",
        "AGENT",
        "USES",
        "POD",
        "HOST",
        "COUNT",
        "FIRST-USED",
        "LAST-USED",
    ]);
    for g in report {
        if g.places.is_empty() {
            let why = if g.delivery == DeliveryMode::Proxy {
                "-"
            } else {
                "(file grant: no proxy uses)"
            };
            t.row(vec![
                g.grant.clone(),
                g.agent.clone(),
                g.uses.to_string(),
                why.into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for p in &g.places {
            t.row(vec![
                g.grant.clone(),
                g.agent.clone(),
                g.uses.to_string(),
                p.pod.clone(),
                p.host.clone(),
                p.count.to_string(),
                table::time(p.first_used),
                table::time(p.last_used),
            ]);
        }
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GrantPhase;
    use crate::api::grant::RecentUse;
    use crate::cli::commands::access::tests::grant;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn place(pod: &str, host: &str, count: i64, first: i64, last: i64) -> RecentUse {
        RecentUse {
            pod: pod.into(),
            host: host.into(),
            count,
            first_at: Time(ts(first)),
            last_at: Time(ts(last)),
        }
    }

    #[test]
    fn places_newest_first_within_since_and_gaps_flagged() {
        let mut g = grant("openai", "coder", "llm", Some(GrantPhase::Active), None);
        g.spec.delivery = DeliveryMode::Proxy;
        if let Some(s) = g.status.as_mut() {
            s.uses = Some(12);
            s.last_used_at = Some(Time(ts(500)));
            s.recent_uses = vec![
                place("p1", "api.openai.com:443", 3, 100, 200),
                place("p2", "api.openai.com:443", 5, 300, 500),
            ];
        }
        let all = usage(&g, None);
        assert_eq!(all.uses, 12);
        assert!(all.possibly_incomplete);
        let pods: Vec<&str> = all.places.iter().map(|p| p.pod.as_str()).collect();
        assert_eq!(pods, ["p2", "p1"]);
        let recent = usage(&g, Some(ts(250)));
        assert_eq!(recent.places.len(), 1);
        assert_eq!(recent.places[0].pod, "p2");
        let text = render(&[all]);
        assert!(text.contains("api.openai.com:443"), "{text}");
    }
}

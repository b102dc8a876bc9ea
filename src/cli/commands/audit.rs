//! `audit [--agent A] [--secret S] [--limit N]`: the audit trail as recorded
//! in Kubernetes Events (events.k8s.io/v1), newest first.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::ListParams;
use serde::Serialize;

use super::access::list_grants;
use crate::api::{GROUP, SecretGrant};
use crate::cli::args::AuditArgs;
use crate::cli::error::api;
use crate::cli::output::{self, say};
use crate::cli::table::{self, Table};
use crate::cli::{CliError, Ctx, OutputFormat};

/// The Event reasons that make up the audit trail.
pub const REASONS: &[&str] = &[
    "SecretResolved",
    "AccessDenied",
    "GrantActivated",
    "GrantExpired",
    "GrantRevoked",
    "GrantInvalid",
    "SecretRotated",
    "ContentWithdrawn",
    "IdentitySuspended",
];

/// Longest note shown in the table (JSON and YAML carry the whole note).
const NOTE_WIDTH: usize = 100;

/// What the plugin knows about a grant that Events refer to.
#[derive(Clone, Debug)]
pub struct GrantFacts {
    pub uid: Option<String>,
    pub agent: String,
    pub secret: String,
}

/// Grants by name.
pub type GrantIndex = BTreeMap<String, GrantFacts>;

pub fn index(grants: &[SecretGrant]) -> GrantIndex {
    grants
        .iter()
        .map(|g| {
            (
                g.name_any(),
                GrantFacts {
                    uid: g.uid(),
                    agent: g.spec.agent.clone(),
                    secret: g.spec.secret_name.clone(),
                },
            )
        })
        .collect()
}

/// One audit record.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditRow {
    /// When it last happened.
    pub time: Option<Timestamp>,
    /// When it first happened (differs from `time` when `count` > 1).
    pub first_time: Option<Timestamp>,
    pub event: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub count: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub async fn run(ctx: &Ctx, args: &AuditArgs) -> Result<(), CliError> {
    let events = list_events(ctx).await?;
    let grants = index(&list_grants(ctx).await?);
    let rows: Vec<AuditRow> = events
        .iter()
        .filter_map(|e| audit_row(e, &grants))
        .collect();
    let filter = Filter {
        agent: args.agent.as_deref(),
        secret: args.secret.as_deref(),
    };
    let rows = select(
        rows,
        &filter,
        usize::try_from(args.limit).unwrap_or(usize::MAX),
    );
    if ctx.output != OutputFormat::Table {
        return output::print(&output::document(ctx.output, &rows)?);
    }
    if rows.is_empty() {
        return say(
            ctx.output,
            &format!(
                "No ScopeHold audit Events in namespace {:?}{}. Events last as long as the API server's --event-ttl (1h by default); the controller's JSON audit log lines (target \"audit\") keep the full record.",
                ctx.namespace,
                filter.describe()
            ),
        );
    }
    let mut t = Table::new(&["TIME", "EVENT", "AGENT/GRANT", "POD", "NOTE"]);
    for r in &rows {
        t.row(vec![
            table::opt_time(r.time),
            event_cell(r),
            subject_cell(r),
            table::or_dash(r.pod.as_deref()),
            table::truncate(r.note.as_deref().unwrap_or("-"), NOTE_WIDTH),
        ]);
    }
    output::print(&t.render())
}

/// Every Event in the namespace (paged).
pub async fn list_events(ctx: &Ctx) -> Result<Vec<Event>, CliError> {
    let api_ = ctx.events();
    let mut params = ListParams::default().limit(500);
    let mut out = Vec::new();
    loop {
        let page = api_.list(&params).await.map_err(api(format!(
            "listing Events in namespace {:?}",
            ctx.namespace
        )))?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

/// The audit record an Event stands for, if it is one of ours.
pub fn audit_row(event: &Event, grants: &GrantIndex) -> Option<AuditRow> {
    let reason = event.reason.as_deref()?;
    if !REASONS.contains(&reason) {
        return None;
    }
    let mut row = AuditRow {
        time: last_time(event),
        first_time: first_time(event),
        event: reason.to_owned(),
        type_: event.type_.clone(),
        count: event
            .series
            .as_ref()
            .map(|s| s.count)
            .or(event.deprecated_count)
            .unwrap_or(1),
        agent: None,
        grant: None,
        secret: None,
        pod: None,
        note: event.note.clone(),
    };
    for reference in [event.regarding.as_ref(), event.related.as_ref()]
        .into_iter()
        .flatten()
    {
        let name = reference.name.clone();
        match reference.kind.as_deref() {
            Some("SecretGrant") if is_ours(reference) => {
                row.grant = row.grant.or(name);
                if let Some(facts) = row.grant.as_ref().and_then(|g| grants.get(g))
                    && same_object(reference, facts)
                {
                    row.agent = row.agent.or_else(|| Some(facts.agent.clone()));
                    row.secret = Some(facts.secret.clone());
                }
            }
            Some("AgentIdentity") if is_ours(reference) => row.agent = name.or(row.agent),
            Some("Pod") => row.pod = row.pod.or(name),
            _ => {}
        }
    }
    Some(row)
}

fn is_ours(reference: &ObjectReference) -> bool {
    reference
        .api_version
        .as_deref()
        .is_none_or(|v| v.split('/').next() == Some(GROUP))
}

/// An Event about an earlier grant of the same name is not about this one.
fn same_object(reference: &ObjectReference, facts: &GrantFacts) -> bool {
    match (&reference.uid, &facts.uid) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// When the Event last happened.
pub fn last_time(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or(event.event_time.as_ref().map(|t| t.0))
        .or(event.deprecated_last_timestamp.as_ref().map(|t| t.0))
        .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// When the Event first happened.
pub fn first_time(event: &Event) -> Option<Timestamp> {
    event
        .event_time
        .as_ref()
        .map(|t| t.0)
        .or(event.deprecated_first_timestamp.as_ref().map(|t| t.0))
        .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

pub struct Filter<'a> {
    pub agent: Option<&'a str>,
    pub secret: Option<&'a str>,
}

impl Filter<'_> {
    fn matches(&self, row: &AuditRow) -> bool {
        self.agent.is_none_or(|a| row.agent.as_deref() == Some(a))
            && self.secret.is_none_or(|s| row.secret.as_deref() == Some(s))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = self.agent {
            parts.push(format!("agent {a:?}"));
        }
        if let Some(s) = self.secret {
            parts.push(format!("Secret {s:?}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" about {}", parts.join(" and "))
        }
    }
}

/// Filters, sorts newest first and keeps at most `limit` rows.
pub fn select(mut rows: Vec<AuditRow>, filter: &Filter<'_>, limit: usize) -> Vec<AuditRow> {
    rows.retain(|r| filter.matches(r));
    rows.sort_by_key(|r| std::cmp::Reverse(r.time));
    rows.truncate(limit);
    rows
}

fn event_cell(row: &AuditRow) -> String {
    if row.count > 1 {
        format!("{} (x{})", row.event, row.count)
    } else {
        row.event.clone()
    }
}

/// `agent/grant` for grant events, `agent` for identity events.
pub fn subject_cell(row: &AuditRow) -> String {
    match (&row.agent, &row.grant) {
        (Some(a), Some(g)) => format!("{a}/{g}"),
        (None, Some(g)) => format!("?/{g}"),
        (Some(a), None) => a.clone(),
        (None, None) => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GrantPhase;
    use crate::cli::commands::access::tests::grant;
    use k8s_openapi::api::events::v1::EventSeries;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn reference(kind: &str, name: &str, uid: Option<&str>) -> ObjectReference {
        let api_version = match kind {
            "Pod" => "v1",
            _ => "scopehold.dev/v1alpha1",
        };
        ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            name: Some(name.into()),
            uid: uid.map(str::to_owned),
            ..Default::default()
        }
    }

    fn event(
        reason: &str,
        at: i64,
        regarding: ObjectReference,
        related: Option<ObjectReference>,
    ) -> Event {
        Event {
            reason: Some(reason.into()),
            event_time: Some(MicroTime(Timestamp::from_second(at).unwrap())),
            regarding: Some(regarding),
            related,
            note: Some(format!("{reason} note")),
            ..Default::default()
        }
    }

    fn grants() -> GrantIndex {
        let mut g = grant("db", "bot", "supabase", Some(GrantPhase::Active), None);
        g.metadata.uid = Some("uid-db".into());
        index(&[g])
    }

    #[test]
    fn resolutions_name_agent_grant_secret_and_pod() {
        let e = event(
            "SecretResolved",
            100,
            reference("SecretGrant", "db", Some("uid-db")),
            Some(reference("Pod", "agent-0", None)),
        );
        let row = audit_row(&e, &grants()).unwrap();
        assert_eq!(row.agent.as_deref(), Some("bot"));
        assert_eq!(row.grant.as_deref(), Some("db"));
        assert_eq!(row.secret.as_deref(), Some("supabase"));
        assert_eq!(row.pod.as_deref(), Some("agent-0"));
        assert_eq!(subject_cell(&row), "bot/db");
    }

    #[test]
    fn denials_regarding_identities_or_pods() {
        let by_identity = event(
            "AccessDenied",
            1,
            reference("AgentIdentity", "sleepy", None),
            Some(reference("Pod", "p", None)),
        );
        let row = audit_row(&by_identity, &grants()).unwrap();
        assert_eq!(
            (row.agent.as_deref(), row.pod.as_deref()),
            (Some("sleepy"), Some("p"))
        );
        assert_eq!(subject_cell(&row), "sleepy");
        let by_pod = event("AccessDenied", 1, reference("Pod", "stranger", None), None);
        let row = audit_row(&by_pod, &grants()).unwrap();
        assert_eq!((row.agent, row.pod.as_deref()), (None, Some("stranger")));
    }

    #[test]
    fn other_events_and_recreated_grants() {
        let foreign = event("Scheduled", 1, reference("Pod", "p", None), None);
        assert!(audit_row(&foreign, &grants()).is_none());
        let old = event(
            "GrantRevoked",
            1,
            reference("SecretGrant", "db", Some("uid-of-an-older-db")),
            None,
        );
        let row = audit_row(&old, &grants()).unwrap();
        assert_eq!((row.agent, row.secret), (None, None));
        assert_eq!(
            subject_cell(&audit_row(&old, &GrantIndex::new()).unwrap()),
            "?/db"
        );
    }

    #[test]
    fn series_use_their_last_time_and_count() {
        let mut e = event(
            "SecretResolved",
            100,
            reference("SecretGrant", "db", None),
            None,
        );
        e.series = Some(EventSeries {
            count: 4,
            last_observed_time: MicroTime(Timestamp::from_second(500).unwrap()),
        });
        let row = audit_row(&e, &grants()).unwrap();
        assert_eq!(row.time.map(|t| t.as_second()), Some(500));
        assert_eq!(row.first_time.map(|t| t.as_second()), Some(100));
        assert_eq!(event_cell(&row), "SecretResolved (x4)");
    }

    #[test]
    fn select_filters_sorts_newest_first_and_limits() {
        let g = grants();
        let rows: Vec<AuditRow> = [
            event(
                "GrantActivated",
                10,
                reference("SecretGrant", "db", None),
                None,
            ),
            event(
                "SecretResolved",
                30,
                reference("SecretGrant", "db", None),
                None,
            ),
            event(
                "IdentitySuspended",
                20,
                reference("AgentIdentity", "bot", None),
                None,
            ),
            event(
                "AccessDenied",
                40,
                reference("AgentIdentity", "eve", None),
                None,
            ),
        ]
        .iter()
        .filter_map(|e| audit_row(e, &g))
        .collect();
        let all = select(
            rows.clone(),
            &Filter {
                agent: None,
                secret: None,
            },
            10,
        );
        let order: Vec<&str> = all.iter().map(|r| r.event.as_str()).collect();
        assert_eq!(
            order,
            [
                "AccessDenied",
                "SecretResolved",
                "IdentitySuspended",
                "GrantActivated"
            ]
        );
        let bot = select(
            rows.clone(),
            &Filter {
                agent: Some("bot"),
                secret: None,
            },
            10,
        );
        assert_eq!(bot.len(), 3);
        let secret = select(
            rows.clone(),
            &Filter {
                agent: None,
                secret: Some("supabase"),
            },
            10,
        );
        assert_eq!(secret.len(), 2);
        let limited = select(
            rows,
            &Filter {
                agent: None,
                secret: None,
            },
            1,
        );
        assert_eq!(limited[0].event, "AccessDenied");
    }
}

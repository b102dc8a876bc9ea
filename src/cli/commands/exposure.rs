//! `exposure SECRET [--revoke] [--yes]`: the incident path. Which grants ever
//! named the Secret, which agents held them, which pods received it and when;
//! optionally revoke every grant on it in one step.

use std::io::{BufRead as _, IsTerminal as _};

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use super::access::{list_grants, phase_cell, secret_exists};
use super::audit::{first_time, last_time, list_events};
use super::state::revoke_grant;
use crate::api::{GrantPhase, SecretGrant};
use crate::cli::args::ExposureArgs;
use crate::cli::output::{self, note, say};
use crate::cli::table::{self, Table};
use crate::cli::{CliError, Ctx, OutputFormat};

/// Everything known about where a Secret went.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Exposure {
    pub namespace: String,
    pub secret: String,
    pub secret_exists: bool,
    pub grants: Vec<ExposedGrant>,
    /// Grants that SecretResolved Events mention but that no longer exist
    /// (deleted, or replaced by a grant of the same name): they may have
    /// named this Secret.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unattributed_grants: Vec<String>,
    /// Grants this run revoked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExposedGrant {
    pub grant: String,
    pub agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<GrantPhase>,
    pub revoked: bool,
    pub keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<Timestamp>,
    /// Total resolutions the custody service counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolutions: Option<i64>,
    pub pods: Vec<Receipt>,
    /// Delivery `proxy`: requests the sidecars injected its keys into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uses: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
    /// Delivery `proxy`: where it was used (pod, host), most recent first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub used: Vec<super::usage::UsePlace>,
    /// More resolutions were counted than the status and Events still
    /// describe: older pods may be missing from `pods`.
    pub possibly_incomplete: bool,
}

/// One pod that received the grant's keys.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub first_received: Timestamp,
    pub last_received: Timestamp,
    /// Content digest of the latest delivery (identifies the value version).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

pub async fn run(ctx: &Ctx, args: &ExposureArgs) -> Result<(), CliError> {
    let secret = args.secret.as_str();
    let grants = list_grants(ctx).await?;
    let events = list_events(ctx).await?;
    let exists = secret_exists(ctx, secret).await?;
    let mut report = exposure(&ctx.namespace, secret, exists, &grants, &events);
    if report.grants.is_empty() && !exists {
        return Err(CliError::not_found("Secret", secret, &ctx.namespace));
    }
    if ctx.output == OutputFormat::Table {
        print_report(&report)?;
    }
    for line in warnings(&report) {
        note(&line);
    }
    if args.revoke {
        report.revoked = revoke_all(ctx, &report, args.yes).await?;
        if !report.grants.is_empty() {
            say(ctx.output, &next_step(&ctx.namespace, secret))?;
        }
    } else if report.grants.iter().any(|g| !g.revoked) {
        say(
            ctx.output,
            &format!(
                "To revoke every grant on it at once: kubectl scopehold -n {} exposure {secret} --revoke",
                ctx.namespace
            ),
        )?;
    }
    if ctx.output != OutputFormat::Table {
        output::print(&output::document(ctx.output, &report)?)?;
    }
    Ok(())
}

/// Builds the report from the grants and the namespace's Events.
pub fn exposure(
    namespace: &str,
    secret: &str,
    secret_exists: bool,
    grants: &[SecretGrant],
    events: &[Event],
) -> Exposure {
    let mut exposed: Vec<ExposedGrant> = grants
        .iter()
        .filter(|g| g.spec.secret_name == secret)
        .map(|g| {
            let status = g.status.clone().unwrap_or_default();
            let pods = receipts(g, events);
            let known = i64::try_from(status.recent_resolutions.len()).unwrap_or(i64::MAX);
            let usage = super::usage::usage(g, None);
            ExposedGrant {
                uses: status.uses,
                last_used_at: usage.last_used_at,
                used: usage.places,
                grant: g.name_any(),
                agent: g.spec.agent.clone(),
                phase: status.phase,
                revoked: g.spec.revoked,
                keys: g.key_names(),
                created: g.metadata.creation_timestamp.as_ref().map(|t| t.0),
                resolutions: status.resolutions,
                possibly_incomplete: status.resolutions.is_some_and(|n| n > known),
                pods,
            }
        })
        .collect();
    exposed.sort_by(|a, b| a.grant.cmp(&b.grant));
    Exposure {
        namespace: namespace.to_owned(),
        secret: secret.to_owned(),
        secret_exists,
        grants: exposed,
        unattributed_grants: unattributed(grants, events),
        revoked: Vec::new(),
    }
}

/// The pods that received `grant`, from its status and its SecretResolved
/// Events, one entry per pod (name and UID), oldest first.
pub fn receipts(grant: &SecretGrant, events: &[Event]) -> Vec<Receipt> {
    let mut out: Vec<Receipt> = Vec::new();
    let recent = grant
        .status
        .as_ref()
        .map(|s| s.recent_resolutions.as_slice())
        .unwrap_or_default();
    for r in recent {
        merge(
            &mut out,
            Receipt {
                pod: r.pod.clone(),
                pod_uid: r.pod_uid.clone(),
                node: r.node.clone(),
                first_received: r.time.0,
                last_received: r.time.0,
                digest: r.digest.clone(),
            },
        );
    }
    for event in events.iter().filter(|e| is_resolution_of(e, grant)) {
        let Some(pod) = event
            .related
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
        else {
            continue;
        };
        let (Some(name), Some(first), Some(last)) =
            (pod.name.clone(), first_time(event), last_time(event))
        else {
            continue;
        };
        merge(
            &mut out,
            Receipt {
                pod: name,
                pod_uid: pod.uid.clone(),
                node: None,
                first_received: first,
                last_received: last,
                digest: None,
            },
        );
    }
    out.sort_by(|a, b| (a.first_received, &a.pod).cmp(&(b.first_received, &b.pod)));
    out
}

fn merge(into: &mut Vec<Receipt>, seen: Receipt) {
    let same = |r: &Receipt| {
        r.pod == seen.pod
            && (r.pod_uid == seen.pod_uid || r.pod_uid.is_none() || seen.pod_uid.is_none())
    };
    match into.iter_mut().find(|r| same(r)) {
        None => into.push(seen),
        Some(r) => {
            if seen.last_received >= r.last_received && seen.digest.is_some() {
                r.digest = seen.digest.clone();
            }
            r.first_received = r.first_received.min(seen.first_received);
            r.last_received = r.last_received.max(seen.last_received);
            r.pod_uid = r.pod_uid.take().or(seen.pod_uid);
            r.node = r.node.take().or(seen.node);
        }
    }
}

fn is_resolution_of(event: &Event, grant: &SecretGrant) -> bool {
    event.reason.as_deref() == Some("SecretResolved")
        && event.regarding.as_ref().is_some_and(|r| {
            r.kind.as_deref() == Some("SecretGrant")
                && r.name.as_deref() == grant.metadata.name.as_deref()
                && match (&r.uid, &grant.metadata.uid) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        })
}

/// Grants named by SecretResolved Events that match no existing grant.
fn unattributed(grants: &[SecretGrant], events: &[Event]) -> Vec<String> {
    let mut names: Vec<String> = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SecretResolved"))
        .filter(|e| !grants.iter().any(|g| is_resolution_of(e, g)))
        .filter_map(|e| e.regarding.as_ref())
        .filter(|r| r.kind.as_deref() == Some("SecretGrant"))
        .filter_map(|r| r.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn print_report(report: &Exposure) -> Result<(), CliError> {
    let secret = &report.secret;
    let ns = &report.namespace;
    if report.grants.is_empty() {
        return output::print(&format!(
            "Secret {secret:?} in namespace {ns:?} was not exposed through ScopeHold: no SecretGrant names it.\n"
        ));
    }
    let mut t = Table::new(&[
        "GRANT",
        "AGENT",
        "PHASE",
        "KEYS",
        "POD",
        "NODE",
        "FIRST-RECEIVED",
        "LAST-RECEIVED",
    ]);
    for g in &report.grants {
        let head = |t: &mut Table, pod: &str, node: String, first: String, last: String| {
            t.row(vec![
                g.grant.clone(),
                g.agent.clone(),
                phase_cell(g.phase),
                table::list(&g.keys),
                pod.to_owned(),
                node,
                first,
                last,
            ]);
        };
        if g.pods.is_empty() {
            head(&mut t, "-", "-".into(), "-".into(), "-".into());
        }
        for p in &g.pods {
            head(
                &mut t,
                &p.pod,
                table::or_dash(p.node.as_deref()),
                table::time(p.first_received),
                table::time(p.last_received),
            );
        }
    }
    output::print(&t.render())?;
    let used: Vec<super::usage::GrantUsage> = report
        .grants
        .iter()
        .filter(|g| g.uses.is_some_and(|n| n > 0))
        .map(|g| super::usage::GrantUsage {
            grant: g.grant.clone(),
            agent: g.agent.clone(),
            secret: report.secret.clone(),
            delivery: crate::api::DeliveryMode::Proxy,
            uses: g.uses.unwrap_or(0),
            last_used_at: g.last_used_at,
            places: g.used.clone(),
            possibly_incomplete: false,
        })
        .collect();
    if !used.is_empty() {
        output::print("\nUsed through the proxy sidecar (the agents never held the value):\n")?;
        output::print(&super::usage::render(&used))?;
    }
    output::print(&format!("{}\n", summary(report)))
}

/// One sentence: how far the Secret went.
pub fn summary(report: &Exposure) -> String {
    let secret = &report.secret;
    let grants = report.grants.len();
    let mut pods: Vec<(&str, Option<&str>)> = report
        .grants
        .iter()
        .flat_map(|g| {
            g.pods
                .iter()
                .map(|p| (p.pod.as_str(), p.pod_uid.as_deref()))
        })
        .collect();
    pods.sort();
    pods.dedup();
    let mut agents: Vec<&str> = report
        .grants
        .iter()
        .filter(|g| !g.pods.is_empty())
        .map(|g| g.agent.as_str())
        .collect();
    agents.sort();
    agents.dedup();
    if pods.is_empty() {
        let verb = if grants == 1 { "names" } else { "name" };
        return format!(
            "No pod has received Secret {secret:?}: {} {verb} it, none was resolved.",
            plural(grants, "grant")
        );
    }
    format!(
        "Secret {secret:?} reached {} of {} through {}.",
        plural(pods.len(), "pod"),
        plural(agents.len(), "agent"),
        plural(grants, "grant")
    )
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Caveats for stderr: records that may be missing from the report.
pub fn warnings(report: &Exposure) -> Vec<String> {
    let mut out = Vec::new();
    if !report.secret_exists {
        out.push(format!(
            "Note: Secret {:?} no longer exists in namespace {:?}.",
            report.secret, report.namespace
        ));
    }
    let partial: Vec<&str> = report
        .grants
        .iter()
        .filter(|g| g.possibly_incomplete)
        .map(|g| g.grant.as_str())
        .collect();
    if !partial.is_empty() {
        out.push(format!(
            "Note: {} resolved more often than the status and Events still record; older pods may be missing (search the audit log lines for secret={:?}).",
            partial.join(", "),
            report.secret
        ));
    }
    if !report.unattributed_grants.is_empty() {
        out.push(format!(
            "Note: Events show resolutions of grants that no longer exist ({}); they may have named this Secret (kubectl scopehold audit).",
            report.unattributed_grants.join(", ")
        ));
    }
    out
}

async fn revoke_all(ctx: &Ctx, report: &Exposure, yes: bool) -> Result<Vec<String>, CliError> {
    let targets: Vec<&ExposedGrant> = report.grants.iter().filter(|g| !g.revoked).collect();
    if targets.is_empty() {
        say(
            ctx.output,
            &format!(
                "Every grant on Secret {:?} is already revoked.",
                report.secret
            ),
        )?;
        return Ok(Vec::new());
    }
    if !yes {
        confirm(&format!(
            "Revoke {} on Secret {:?} in namespace {:?}?",
            plural(targets.len(), "grant"),
            report.secret,
            ctx.namespace
        ))?;
    }
    let mut revoked = Vec::new();
    for g in targets {
        let (_, changed) = revoke_grant(ctx, &g.grant).await?;
        let what = if changed {
            "revoked"
        } else {
            "already revoked"
        };
        say(
            ctx.output,
            &format!(
                "secretgrant.scopehold.dev/{} {what} (agent {})",
                g.grant, g.agent
            ),
        )?;
        if changed {
            revoked.push(g.grant.clone());
        }
    }
    Ok(revoked)
}

/// Asks on the terminal; refuses when there is none (pass --yes).
fn confirm(question: &str) -> Result<(), CliError> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::ConfirmationRequired(format!(
            "{question} Refusing without confirmation: stdin is not a terminal; pass --yes"
        )));
    }
    note(&format!("{question} [y/N]"));
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CliError::ConfirmationRequired("nothing revoked".into()))
    }
}

/// What to do after revoking.
pub fn next_step(namespace: &str, secret: &str) -> String {
    format!(
        "Next: rotate the value of Secret {secret:?} (kubectl -n {namespace} create secret generic {secret} --from-literal=... --dry-run=client -o yaml | kubectl apply -f -); pods that still hold an active grant receive the new value within a second; revoked grants' files are withdrawn."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::grant::Resolution;
    use crate::cli::commands::access::tests::grant;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::EventSeries;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn resolved(grant: &str, grant_uid: &str, pod: &str, uid: &str, at: i64) -> Event {
        Event {
            reason: Some("SecretResolved".into()),
            event_time: Some(MicroTime(ts(at))),
            regarding: Some(ObjectReference {
                kind: Some("SecretGrant".into()),
                name: Some(grant.into()),
                uid: Some(grant_uid.into()),
                ..Default::default()
            }),
            related: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn resolution(pod: &str, uid: &str, at: i64, digest: &str) -> Resolution {
        Resolution {
            pod: pod.into(),
            pod_uid: Some(uid.into()),
            node: Some("node-a".into()),
            time: Time(ts(at)),
            digest: Some(digest.into()),
        }
    }

    fn leaked_grant(name: &str, agent: &str, phase: GrantPhase) -> SecretGrant {
        let mut g = grant(name, agent, "leaked", Some(phase), None);
        g.metadata.uid = Some(format!("uid-{name}"));
        g
    }

    #[test]
    fn receipts_merge_status_and_events_per_pod() {
        let mut g = leaked_grant("a", "bot", GrantPhase::Active);
        if let Some(s) = g.status.as_mut() {
            s.recent_resolutions = vec![
                resolution("p1", "u1", 300, "new"),
                resolution("p1", "u1", 100, "old"),
            ];
            s.resolutions = Some(2);
        }
        let mut repeated = resolved("a", "uid-a", "p1", "u1", 50);
        repeated.series = Some(EventSeries {
            count: 3,
            last_observed_time: MicroTime(ts(250)),
        });
        let events = vec![
            repeated,
            resolved("a", "uid-a", "p2", "u2", 400),
            // Same pod name, another pod (recreated): a separate receipt.
            resolved("a", "uid-a", "p1", "u9", 500),
            // An older grant of the same name: not this grant.
            resolved("a", "uid-old", "p3", "u3", 10),
        ];
        let r = receipts(&g, &events);
        let seen: Vec<(&str, Option<&str>, i64, i64)> = r
            .iter()
            .map(|r| {
                (
                    r.pod.as_str(),
                    r.pod_uid.as_deref(),
                    r.first_received.as_second(),
                    r.last_received.as_second(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("p1", Some("u1"), 50, 300),
                ("p2", Some("u2"), 400, 400),
                ("p1", Some("u9"), 500, 500)
            ]
        );
        assert_eq!(r[0].digest.as_deref(), Some("new"));
        assert_eq!(r[0].node.as_deref(), Some("node-a"));
    }

    #[test]
    fn report_covers_every_phase_and_flags_gaps() {
        let mut active = leaked_grant("a", "bot", GrantPhase::Active);
        if let Some(s) = active.status.as_mut() {
            s.recent_resolutions = vec![resolution("p1", "u1", 100, "d")];
            s.resolutions = Some(25);
        }
        let revoked = leaked_grant("b", "eve", GrantPhase::Revoked);
        let other = grant("c", "bot", "unrelated", Some(GrantPhase::Active), None);
        let events = vec![resolved("gone", "uid-gone", "p9", "u9", 1)];
        let report = exposure("ns", "leaked", true, &[revoked, other, active], &events);
        let names: Vec<&str> = report.grants.iter().map(|g| g.grant.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(report.grants[0].possibly_incomplete);
        assert_eq!(report.unattributed_grants, ["gone"]);
        assert_eq!(
            summary(&report),
            r#"Secret "leaked" reached 1 pod of 1 agent through 2 grants."#
        );
        let w = warnings(&report);
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn nothing_exposed() {
        let g = leaked_grant("a", "bot", GrantPhase::Active);
        let report = exposure("ns", "leaked", true, &[g], &[]);
        assert_eq!(
            summary(&report),
            r#"No pod has received Secret "leaked": 1 grant names it, none was resolved."#
        );
        let none = exposure("ns", "leaked", true, &[], &[]);
        assert!(none.grants.is_empty());
    }

    #[test]
    fn next_step_names_the_secret() {
        let text = next_step("team", "leaked");
        assert!(text.starts_with(r#"Next: rotate the value of Secret "leaked""#));
        assert!(text.contains("--dry-run=client -o yaml | kubectl apply -f -"));
        assert!(text.ends_with("revoked grants' files are withdrawn."));
    }
}

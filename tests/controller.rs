//! The controller against a real kube-apiserver: grant lifecycle, expiry at the
//! exact instant, Secret and agent changes, conflicts, rotation, no-op resyncs,
//! Events and audit lines, and no secret value anywhere in the output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret, key};
use common::{
    ControllerProcess, client, create_service_account, install_crds, test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::conditions::find_ready;
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    client: Client,
    ns: String,
    controller: ControllerProcess,
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let controller = ControllerProcess::start(&ns, &["--metrics-listen", "127.0.0.1:0"]);
        Fixture {
            client,
            ns,
            controller,
        }
    }

    fn grants(&self) -> Api<SecretGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn identities(&self) -> Api<AgentIdentity> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn secret(&self, name: &str, data: &[(&str, &str)]) -> Secret {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            string_data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..Default::default()
        };
        self.secrets()
            .create(&PostParams::default(), &secret)
            .await
            .expect("create Secret")
    }

    async fn set_secret(&self, name: &str, data: &[(&str, &str)]) {
        let data: BTreeMap<&str, &str> = data.iter().copied().collect();
        self.secrets()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "stringData": data })),
            )
            .await
            .expect("patch Secret");
    }

    async fn identity(
        &self,
        name: &str,
        sa: &str,
        edit: impl FnOnce(&mut AgentIdentitySpec),
    ) -> AgentIdentity {
        let mut spec = AgentIdentitySpec {
            service_account_name: sa.into(),
            ..Default::default()
        };
        edit(&mut spec);
        self.identities()
            .create(&PostParams::default(), &AgentIdentity::new(name, spec))
            .await
            .expect("create AgentIdentity")
    }

    async fn grant(
        &self,
        name: &str,
        agent: &str,
        secret: &str,
        keys: &[&str],
        edit: impl FnOnce(&mut SecretGrantSpec),
    ) -> SecretGrant {
        let mut spec = SecretGrantSpec {
            agent: agent.into(),
            secret_name: secret.into(),
            keys: keys
                .iter()
                .map(|k| GrantedKey {
                    key: (*k).into(),
                    ..Default::default()
                })
                .collect(),
            reason: Some("integration test".into()),
            ..Default::default()
        };
        edit(&mut spec);
        self.grants()
            .create(&PostParams::default(), &SecretGrant::new(name, spec))
            .await
            .expect("create SecretGrant")
    }

    async fn patch_grant(&self, name: &str, spec: serde_json::Value) {
        self.grants()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .expect("patch SecretGrant");
    }

    async fn patch_identity(&self, name: &str, spec: serde_json::Value) {
        self.identities()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .expect("patch AgentIdentity");
    }

    /// Waits until the grant reports `phase` with Ready reason `reason`.
    async fn await_grant(&self, name: &str, phase: GrantPhase, reason: &str) -> SecretGrant {
        let api = self.grants();
        wait_for_desc(
            &format!("grant {name} {phase}/{reason}"),
            WAIT,
            async || {
                let g = api.get(name).await.ok()?;
                let status = g.status.as_ref()?;
                let ready = find_ready(&status.conditions)?;
                (status.phase == Some(phase) && ready.reason == reason).then_some(g)
            },
        )
        .await
    }

    async fn await_identity(&self, name: &str, reason: &str) -> AgentIdentity {
        let api = self.identities();
        wait_for_desc(&format!("identity {name} {reason}"), WAIT, async || {
            let i = api.get(name).await.ok()?;
            let ready = find_ready(&i.status.as_ref()?.conditions)?;
            (ready.reason == reason).then_some(i)
        })
        .await
    }

    async fn event_reasons(&self, regarding: &str) -> Vec<String> {
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &self.ns);
        let mut list: Vec<K8sEvent> = events
            .list(&Default::default())
            .await
            .expect("list Events")
            .items;
        list.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
        list.into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding))
            .filter_map(|e| e.reason)
            .collect()
    }

    async fn await_event(&self, regarding: &str, reason: &str) {
        wait_for_desc(
            &format!("Event {reason} regarding {regarding}"),
            WAIT,
            async || {
                self.event_reasons(regarding)
                    .await
                    .iter()
                    .any(|r| r == reason)
                    .then_some(())
            },
        )
        .await
    }

    fn audit_events(&self, grant: &str) -> Vec<String> {
        self.controller
            .audit_lines()
            .into_iter()
            .filter(|l| l["grant"] == grant || l["agent"] == grant)
            .filter_map(|l| l["event"].as_str().map(str::to_owned))
            .collect()
    }
}

#[tokio::test]
async fn grant_lifecycle_pending_active_revoked_and_back() {
    let f = Fixture::new("lifecycle").await;
    create_service_account(&f.client, &f.ns, "bot-sa").await;
    f.secret("creds", &[("api", "lifecycle-value-1")]).await;
    f.identity("bot", "bot-sa", |s| s.suspended = true).await;
    f.grant("g", "bot", "creds", &["api"], |_| {}).await;

    f.await_grant("g", GrantPhase::Pending, "AgentSuspended")
        .await;
    f.await_identity("bot", "Suspended").await;
    f.patch_identity("bot", json!({"suspended": false})).await;
    let active = f.await_grant("g", GrantPhase::Active, "Active").await;
    let status = active.status.expect("status");
    assert_eq!(status.content_digest.as_ref().map(String::len), Some(12));
    assert_eq!(status.observed_generation, active.metadata.generation);
    let identity = f.await_identity("bot", "Active").await;
    wait_for_desc("identity access list", WAIT, async || {
        let i = f.identities().get("bot").await.ok()?;
        let s = i.status?;
        (s.active_grants == 1 && s.access.len() == 1 && s.access[0].keys == ["api"]).then_some(())
    })
    .await;
    assert_eq!(identity.spec.service_account_name, "bot-sa");

    f.patch_grant("g", json!({"revoked": true})).await;
    f.await_grant("g", GrantPhase::Revoked, "Revoked").await;
    wait_for_desc("access emptied", WAIT, async || {
        let s = f.identities().get("bot").await.ok()?.status?;
        (s.active_grants == 0 && s.access.is_empty()).then_some(())
    })
    .await;
    f.patch_grant("g", json!({"revoked": false})).await;
    f.await_grant("g", GrantPhase::Active, "Active").await;

    f.patch_identity("bot", json!({"suspended": true})).await;
    f.await_grant("g", GrantPhase::Pending, "AgentSuspended")
        .await;
    f.await_event("bot", "IdentitySuspended").await;
    for reason in ["GrantPending", "GrantActivated", "GrantRevoked"] {
        f.await_event("g", reason).await;
    }
    let audit = f.audit_events("g");
    for event in ["GrantPending", "GrantActivated", "GrantRevoked"] {
        assert!(
            audit.iter().any(|e| e == event),
            "no audit line {event}: {audit:?}"
        );
    }
    let line = f
        .controller
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "GrantActivated")
        .expect("GrantActivated line");
    for field in [
        "time",
        "decision",
        "reason",
        "namespace",
        "agent",
        "serviceAccount",
        "grant",
        "secret",
        "keys",
        "contentDigest",
    ] {
        assert!(!line[field].is_null(), "audit line lacks {field}: {line}");
    }
    assert_eq!(line["keys"], "api");
}

/// Expiry lands at the exact instant: within one second of `expiresAt` and of
/// creation + `ttl` (the status is polled every 50 ms).
#[tokio::test]
async fn grants_expire_within_a_second() {
    let f = Fixture::new("expiry").await;
    f.secret("creds", &[("api", "expiry-value")]).await;
    f.identity("bot", "bot-sa", |_| {}).await;
    let at = Timestamp::from_second(Timestamp::now().as_second() + 5).expect("timestamp");
    f.grant("by-instant", "bot", "creds", &["api"], |s| {
        s.expires_at = Some(Time(at))
    })
    .await;
    let ttl = f
        .grant("by-ttl", "bot", "creds", &["api"], |s| {
            s.ttl = Some("4s".into())
        })
        .await;
    let ttl_expiry =
        ttl.metadata.creation_timestamp.expect("created").0 + SignedDuration::from_secs(4);

    let active = f.await_grant("by-ttl", GrantPhase::Active, "Active").await;
    assert_eq!(
        active.status.and_then(|s| s.expires_at).map(|t| t.0),
        Some(ttl_expiry)
    );
    f.await_grant("by-instant", GrantPhase::Active, "Active")
        .await;

    for (name, expiry) in [("by-ttl", ttl_expiry), ("by-instant", at)] {
        f.await_grant(name, GrantPhase::Expired, "Expired").await;
        let late = Timestamp::now().duration_since(expiry);
        assert!(
            late >= SignedDuration::ZERO,
            "{name} expired early by {late:?}"
        );
        assert!(
            late < SignedDuration::from_secs(1),
            "{name} expired {late:?} after its expiry"
        );
        f.await_event(name, "GrantExpired").await;
    }
}

#[tokio::test]
async fn max_grant_ttl_caps_expiry() {
    let f = Fixture::new("cap").await;
    f.secret("creds", &[("api", "cap-value")]).await;
    f.identity("bot", "bot-sa", |s| s.max_grant_ttl = Some("1h".into()))
        .await;
    let long = f
        .grant("long", "bot", "creds", &["api"], |s| {
            s.ttl = Some("8h".into())
        })
        .await;
    let forever = f.grant("forever", "bot", "creds", &["api"], |_| {}).await;
    let short = f
        .grant("short", "bot", "creds", &["api"], |s| {
            s.ttl = Some("10m".into())
        })
        .await;
    for (grant, expected) in [(long, 3600), (forever, 3600), (short, 600)] {
        let name = grant.name_any();
        let created = grant.metadata.creation_timestamp.expect("created").0;
        let g = f.await_grant(&name, GrantPhase::Active, "Active").await;
        assert_eq!(
            g.status.and_then(|s| s.expires_at).map(|t| t.0),
            Some(created + SignedDuration::from_secs(expected)),
            "{name}"
        );
    }
}

/// A value that fits in a Secret (600 KiB) but never in a node plugin
/// volume (at most half of the default 1 MiB tmpfs): the grant is Invalid
/// with the limit in its message, instead of Active and never mountable.
/// Shrinking the value makes it Active again.
#[tokio::test]
async fn a_value_too_large_for_a_volume_makes_the_grant_invalid() {
    let f = Fixture::new("too-large").await;
    f.identity("bot", "bot-sa", |_| {}).await;
    let big = "x".repeat(600 * 1024);
    f.secret("creds", &[("api", big.as_str())]).await;
    f.grant("g", "bot", "creds", &["api"], |_| {}).await;
    let g = f
        .await_grant("g", GrantPhase::Invalid, "ValueTooLarge")
        .await;
    let message = find_ready(&g.status.expect("status").conditions)
        .expect("Ready")
        .message
        .clone();
    assert!(message.contains("524288"), "no limit in {message:?}");
    assert!(message.contains("volumeSizeLimit"), "{message:?}");
    assert!(
        !message.contains("xxxxxxxx"),
        "the value leaked: {message:?}"
    );
    f.set_secret("creds", &[("api", "small")]).await;
    f.await_grant("g", GrantPhase::Active, "Active").await;
}

#[tokio::test]
async fn secret_and_key_disappearing_invalidate_the_grant() {
    let f = Fixture::new("secret-gone").await;
    f.identity("bot", "bot-sa", |_| {}).await;
    f.grant("g", "bot", "creds", &["api", "url"], |_| {}).await;
    f.await_grant("g", GrantPhase::Invalid, "SecretNotFound")
        .await;
    f.secret(
        "creds",
        &[("api", "gone-value-1"), ("url", "https://example")],
    )
    .await;
    f.await_grant("g", GrantPhase::Active, "Active").await;

    f.secrets()
        .delete("creds", &DeleteParams::default())
        .await
        .expect("delete Secret");
    f.await_grant("g", GrantPhase::Invalid, "SecretNotFound")
        .await;
    f.await_event("g", "GrantInvalid").await;
    f.secret(
        "creds",
        &[("api", "gone-value-2"), ("url", "https://example")],
    )
    .await;
    f.await_grant("g", GrantPhase::Active, "Active").await;

    // Removing a granted key: a JSON merge patch with null removes it.
    f.secrets()
        .patch(
            "creds",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"url": null}})),
        )
        .await
        .expect("remove key");
    let g = f.await_grant("g", GrantPhase::Invalid, "KeyNotFound").await;
    let message = find_ready(&g.status.expect("status").conditions)
        .expect("Ready")
        .message
        .clone();
    assert!(
        message.contains("url"),
        "message names the missing key: {message}"
    );
}

#[tokio::test]
async fn missing_agent_and_conflicting_identities() {
    let f = Fixture::new("conflict").await;
    f.secret("creds", &[("api", "conflict-value")]).await;
    f.grant("g", "bot", "creds", &["api"], |_| {}).await;
    f.await_grant("g", GrantPhase::Pending, "AgentNotFound")
        .await;
    f.identity("bot", "shared-sa", |_| {}).await;
    f.await_grant("g", GrantPhase::Active, "Active").await;

    f.identity("intruder", "shared-sa", |_| {}).await;
    f.await_identity("bot", "Conflict").await;
    f.await_identity("intruder", "Conflict").await;
    f.await_grant("g", GrantPhase::Pending, "Conflict").await;
    f.await_event("bot", "IdentityConflict").await;

    // Moving the intruder to another ServiceAccount ends the conflict, and
    // moving it back starts it again (the former peers are looked up too).
    f.patch_identity("intruder", json!({"serviceAccountName": "other-sa"}))
        .await;
    f.await_identity("bot", "Active").await;
    f.await_grant("g", GrantPhase::Active, "Active").await;
    f.patch_identity("intruder", json!({"serviceAccountName": "shared-sa"}))
        .await;
    f.await_identity("bot", "Conflict").await;
    f.await_grant("g", GrantPhase::Pending, "Conflict").await;

    f.identities()
        .delete("intruder", &DeleteParams::default())
        .await
        .expect("delete");
    f.await_identity("bot", "Active").await;
    f.await_grant("g", GrantPhase::Active, "Active").await;

    f.identities()
        .delete("bot", &DeleteParams::default())
        .await
        .expect("delete");
    f.await_grant("g", GrantPhase::Pending, "AgentNotFound")
        .await;
}

#[tokio::test]
async fn rotation_changes_the_digest_only_for_granted_keys() {
    let f = Fixture::new("rotation").await;
    f.secret(
        "creds",
        &[("api", "rotation-old"), ("other", "rotation-untouched")],
    )
    .await;
    f.identity("bot", "bot-sa", |_| {}).await;
    f.grant("g", "bot", "creds", &["api"], |_| {}).await;
    let before = f.await_grant("g", GrantPhase::Active, "Active").await;
    let digest_before = before
        .status
        .clone()
        .and_then(|s| s.content_digest)
        .expect("digest");

    // A key that is not granted changes: nothing about the grant changes.
    f.set_secret("creds", &[("other", "rotation-changed")])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unchanged = f.grants().get("g").await.expect("get");
    assert_eq!(unchanged.resource_version(), before.resource_version());

    f.set_secret("creds", &[("api", "rotation-new")]).await;
    let after = wait_for_desc("digest change", WAIT, async || {
        let g = f.grants().get("g").await.ok()?;
        let d = g.status.as_ref()?.content_digest.clone()?;
        (d != digest_before).then_some(d)
    })
    .await;
    assert_eq!(after.len(), 12);
    f.await_event("g", "SecretRotated").await;
    let rotated = f
        .controller
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "SecretRotated")
        .expect("SecretRotated audit line");
    assert_eq!(rotated["contentDigest"], after.as_str());
}

/// A controller restart reconciles everything again (a forced full resync):
/// it must not write a single object.
#[tokio::test]
async fn noop_resync_writes_nothing() {
    let mut f = Fixture::new("resync").await;
    f.secret("creds", &[("api", "resync-value")]).await;
    f.identity("bot", "bot-sa", |_| {}).await;
    f.identity("other", "other-sa", |s| s.suspended = true)
        .await;
    for i in 0..5 {
        f.grant(&format!("g{i}"), "bot", "creds", &["api"], |s| {
            s.ttl = Some("1h".into())
        })
        .await;
    }
    f.grant("pending", "other", "creds", &["api"], |_| {}).await;
    f.grant("invalid", "bot", "creds", &["missing"], |_| {})
        .await;
    for i in 0..5 {
        f.await_grant(&format!("g{i}"), GrantPhase::Active, "Active")
            .await;
    }
    f.await_grant("pending", GrantPhase::Pending, "AgentSuspended")
        .await;
    f.await_grant("invalid", GrantPhase::Invalid, "KeyNotFound")
        .await;
    wait_for_desc("identity status settles", WAIT, async || {
        let s = f.identities().get("bot").await.ok()?.status?;
        (s.active_grants == 5).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let versions = |grants: Vec<SecretGrant>, ids: Vec<AgentIdentity>| {
        let mut v: Vec<(String, Option<String>)> = grants
            .iter()
            .map(|g| (g.name_any(), g.resource_version()))
            .collect();
        v.extend(ids.iter().map(|i| (i.name_any(), i.resource_version())));
        v
    };
    let before = versions(
        f.grants()
            .list(&Default::default())
            .await
            .expect("list")
            .items,
        f.identities()
            .list(&Default::default())
            .await
            .expect("list")
            .items,
    );

    let old = std::mem::replace(
        &mut f.controller,
        ControllerProcess::start(&f.ns, &["--metrics-listen", "127.0.0.1:0"]),
    );
    old.stop();
    let line = f
        .controller
        .wait_for_log(|l| l.contains("metrics_addr"), WAIT)
        .await;
    let addr = common::objects::log_field(&line, "metrics_addr");
    assert!(!addr.is_empty(), "no metrics_addr in {line}");
    let metrics = wait_for_desc(
        "all objects reconciled by the new controller",
        WAIT,
        async || {
            let body = reqwest_get(&format!("http://{addr}/metrics")).await?;
            let unchanged = |kind: &str| {
                metric(
                    &body,
                    &format!("scopehold_reconciles_total{{kind=\"{kind}\",outcome=\"unchanged\"}}"),
                )
            };
            (unchanged("SecretGrant") >= 7.0 && unchanged("AgentIdentity") >= 2.0).then_some(body)
        },
    )
    .await;
    for kind in ["SecretGrant", "AgentIdentity"] {
        assert_eq!(
            metric(
                &metrics,
                &format!("scopehold_status_writes_total{{kind=\"{kind}\"}}")
            ),
            0.0,
            "{kind} status writes during a no-op resync\n{metrics}"
        );
    }
    let after = versions(
        f.grants()
            .list(&Default::default())
            .await
            .expect("list")
            .items,
        f.identities()
            .list(&Default::default())
            .await
            .expect("list")
            .items,
    );
    assert_eq!(
        before, after,
        "resourceVersions changed during a no-op resync"
    );
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A plain HTTP GET over a TCP stream (the metrics endpoint), to avoid an HTTP
/// client dependency for one call.
async fn reqwest_get(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// Every value used by the tests in this file must be absent from the logs,
/// Events and statuses: run a full flow, then grep everything.
#[tokio::test]
async fn no_secret_value_in_logs_events_or_status() {
    let f = Fixture::new("leak").await;
    let values = [
        "leak-check-value-0xDEADBEEF",
        "leak-check-rotated-0xFEEDFACE",
        "leak-check-ungranted",
    ];
    f.secret("creds", &[("api", values[0]), ("other", values[2])])
        .await;
    f.identity("bot", "bot-sa", |_| {}).await;
    f.grant("g", "bot", "creds", &["api"], |s| s.ttl = Some("3s".into()))
        .await;
    f.grant("missing", "bot", "creds", &["nope"], |_| {}).await;
    f.await_grant("g", GrantPhase::Active, "Active").await;
    f.set_secret("creds", &[("api", values[1])]).await;
    f.await_event("g", "SecretRotated").await;
    f.await_grant("g", GrantPhase::Expired, "Expired").await;
    f.await_grant("missing", GrantPhase::Invalid, "KeyNotFound")
        .await;
    // Events are written in the background: the last transitions' Events
    // must be in what is searched.
    f.await_event("g", "GrantExpired").await;
    f.await_event("missing", "GrantInvalid").await;

    let mut everything = f.controller.logs();
    let events: Api<K8sEvent> = Api::namespaced(f.client.clone(), &f.ns);
    everything.push_str(
        &serde_json::to_string(
            &events
                .list(&Default::default())
                .await
                .expect("events")
                .items,
        )
        .expect("json"),
    );
    everything.push_str(
        &serde_json::to_string(
            &f.grants()
                .list(&Default::default())
                .await
                .expect("grants")
                .items,
        )
        .expect("json"),
    );
    everything.push_str(
        &serde_json::to_string(
            &f.identities()
                .list(&Default::default())
                .await
                .expect("ids")
                .items,
        )
        .expect("json"),
    );
    assert!(
        everything.len() > 1000,
        "captured output is suspiciously small"
    );
    for value in values {
        assert!(!everything.contains(value), "secret value {value:?} leaked");
        let b64 = base64_encode(value.as_bytes());
        assert!(
            !everything.contains(&b64),
            "secret value {value:?} leaked base64-encoded"
        );
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Malformed stored objects (written around the schema, e.g. before a schema
/// change) are reported and skipped; the controller goes on with the rest.
#[tokio::test]
async fn malformed_object_does_not_stop_the_controller() {
    let f = Fixture::new("malformed").await;
    f.secret("creds", &[("api", "malformed-value")]).await;
    f.identity("bot", "bot-sa", |_| {}).await;
    // The schema forbids this duplicate file name only through the controller.
    f.grant("dup", "bot", "creds", &["api", "api"], |_| {})
        .await;
    let g = f
        .await_grant("dup", GrantPhase::Invalid, "InvalidSpec")
        .await;
    let message = find_ready(&g.status.expect("status").conditions)
        .expect("Ready")
        .message
        .clone();
    assert!(message.contains("two keys map to the file"), "{message}");
    f.grant("fine", "bot", "creds", &["api"], |_| {}).await;
    f.await_grant("fine", GrantPhase::Active, "Active").await;
}

/// Bulk creation while the controller is down (an install, a restore, a
/// GitOps sync): an identity's `access` comes from evaluating its grants, so
/// its status is written once with every grant in it, not once per grant as
/// each grant's own status turns Active. Each activation still has its
/// `GrantActivated` Event on the grant (written off the reconcile's path).
#[tokio::test]
async fn bulk_start_writes_each_identity_once_and_an_event_per_activation() {
    const GRANTS: usize = 6;
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "bulk").await;
    create_secret(&client, &ns, "creds", &[("api", "bulk-value")]).await;
    create_identity(&client, &ns, "bot", "bot-sa", false).await;
    for i in 0..GRANTS {
        create_grant(
            &client,
            &ns,
            &format!("g{i}"),
            "bot",
            "creds",
            vec![key("api")],
            |_| {},
        )
        .await;
    }
    let f = Fixture {
        client: client.clone(),
        ns: ns.clone(),
        controller: ControllerProcess::start(&ns, &["--metrics-listen", "127.0.0.1:0"]),
    };
    for i in 0..GRANTS {
        f.await_grant(&format!("g{i}"), GrantPhase::Active, "Active")
            .await;
    }
    wait_for_desc("identity lists every grant", WAIT, async || {
        let s = f.identities().get("bot").await.ok()?.status?;
        (s.active_grants == GRANTS as i32 && s.access.len() == GRANTS).then_some(())
    })
    .await;
    for i in 0..GRANTS {
        f.await_event(&format!("g{i}"), "GrantActivated").await;
    }
    // Every grant status write has reached the identity controller by now
    // (and would have rewritten the identity if its access came from them).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let line = f
        .controller
        .wait_for_log(|l| l.contains("metrics_addr"), WAIT)
        .await;
    let addr = common::objects::log_field(&line, "metrics_addr");
    assert!(!addr.is_empty(), "no metrics_addr in {line}");
    let body = reqwest_get(&format!("http://{addr}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(
        metric(
            &body,
            "scopehold_status_writes_total{kind=\"AgentIdentity\"}"
        ),
        1.0,
        "identity status writes for {GRANTS} grants created while the controller was down\n{body}"
    );
    assert_eq!(
        metric(&body, "scopehold_status_writes_total{kind=\"SecretGrant\"}"),
        GRANTS as f64
    );
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let activated: Vec<K8sEvent> = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("GrantActivated"))
        .collect();
    assert_eq!(
        activated.len(),
        GRANTS,
        "one GrantActivated Event per grant: {activated:#?}"
    );
    assert_eq!(
        metric(&body, "scopehold_controller_event_occurrences_total"),
        GRANTS as f64,
        "{body}"
    );
}

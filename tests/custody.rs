//! The custody service against a real kube-apiserver, called the way the node
//! plugin calls it: real Pods, real bound tokens from the TokenRequest API, a
//! real TokenReview. Every denial is checked for its gRPC code, its audit line
//! and its AccessDenied Event.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret, expired_token, key};
use common::stack::{node_plugin_token, start_controller_with_custody};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};
use scopehold::api::{AgentIdentity, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec};
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;
use scopehold::proto::scopehold::v1::{ResolveRequest, ResolveResponse};
use serde_json::json;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    client: Client,
    ns: String,
    node: String,
    controller: ControllerProcess,
    custody: String,
    plugin_token: String,
}

struct AgentPod {
    name: String,
    uid: String,
    sa: String,
    token: String,
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let node = format!("{ns}-node-a");
        create_node(&client, &node).await;
        let plugin_token = node_plugin_token(&client, &ns, &node).await;
        let (controller, custody) = start_controller_with_custody(&ns, &[]).await;
        Fixture {
            client,
            ns,
            node,
            controller,
            custody,
            plugin_token,
        }
    }

    async fn secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        create_secret(&self.client, ns, name, data).await;
    }

    async fn identity(&self, name: &str, sa: &str, suspended: bool) {
        create_service_account(&self.client, &self.ns, sa).await;
        create_identity(&self.client, &self.ns, name, sa, suspended).await;
    }

    async fn grant(
        &self,
        name: &str,
        agent: &str,
        secret: &str,
        keys: Vec<GrantedKey>,
        edit: impl FnOnce(&mut SecretGrantSpec),
    ) {
        create_grant(&self.client, &self.ns, name, agent, secret, keys, edit).await;
    }

    async fn await_phase(&self, grant: &str, phase: GrantPhase) {
        let api: Api<SecretGrant> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc(&format!("{grant} {phase}"), WAIT, async || {
            (api.get(grant).await.ok()?.phase() == Some(phase)).then_some(())
        })
        .await;
    }

    async fn pod(&self, name: &str, sa: &str, node: &str) -> AgentPod {
        let pod = create_pod(&self.client, &self.ns, name, sa, node).await;
        let uid = pod.uid().unwrap();
        let token = pod_token(&self.client, &self.ns, sa, name, &uid, AUDIENCE, 3600).await;
        AgentPod {
            name: name.into(),
            uid,
            sa: sa.into(),
            token,
        }
    }

    fn request(&self, pod: &AgentPod) -> ResolveRequest {
        ResolveRequest {
            request_id: format!("test-{}", pod.name),
            pod_token: pod.token.clone(),
            pod_namespace: self.ns.clone(),
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            service_account_name: pod.sa.clone(),
            node_name: self.node.clone(),
            volume_id: format!("csi-{}", pod.uid),
            grants: vec![],
            fs_group: Some(2000),
        }
    }

    async fn call(
        &self,
        req: ResolveRequest,
        bearer: Option<&str>,
    ) -> Result<ResolveResponse, tonic::Status> {
        let mut client = CustodyClient::connect(format!("http://{}", self.custody))
            .await
            .unwrap();
        let mut request = tonic::Request::new(req);
        if let Some(token) = bearer {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        client
            .resolve(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn resolve(&self, req: ResolveRequest) -> Result<ResolveResponse, tonic::Status> {
        self.call(req, Some(&self.plugin_token.clone())).await
    }

    /// Expects a refusal with `code` whose message names `reason`, an
    /// AccessDenied audit line with that reason, and an AccessDenied Event.
    async fn expect_denied(&self, req: ResolveRequest, code: Code, reason: &str) -> tonic::Status {
        let request_id = req.request_id.clone();
        let status = self.resolve(req).await.expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(reason),
            "{reason} not in {:?}",
            status.message()
        );
        let line = wait_for_desc(
            &format!("AccessDenied audit line {request_id}"),
            WAIT,
            async || {
                self.controller
                    .audit_lines()
                    .into_iter()
                    .find(|l| l["event"] == "AccessDenied" && l["requestID"] == request_id.as_str())
            },
        )
        .await;
        assert_eq!(line["reason"], reason, "{line}");
        assert_eq!(line["decision"], "denied");
        status
    }

    async fn events(&self, reason: &str) -> Vec<K8sEvent> {
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }
}

#[tokio::test]
async fn resolves_only_the_granted_keys() {
    let f = Fixture::new("custody-ok").await;
    f.secret(
        &f.ns,
        "supabase",
        &[
            ("service-key", "custody-value-1"),
            ("url", "https://db"),
            ("admin", "never-out"),
        ],
    )
    .await;
    f.secret(&f.ns, "github", &[("token", "custody-value-2")])
        .await;
    f.identity("bot", "bot-sa", false).await;
    f.grant(
        "db",
        "bot",
        "supabase",
        vec![
            GrantedKey {
                key: "service-key".into(),
                path: Some("supabase-key".into()),
                mode: Some(0o400),
                proxy: None,
            },
            key("url"),
        ],
        |s| s.ttl = Some("1h".into()),
    )
    .await;
    f.grant("gh", "bot", "github", vec![key("token")], |_| {})
        .await;
    f.await_phase("db", GrantPhase::Active).await;
    f.await_phase("gh", GrantPhase::Active).await;
    let pod = f.pod("agent", "bot-sa", &f.node.clone()).await;

    let response = f.resolve(f.request(&pod)).await.expect("resolved");
    assert_eq!(response.agent, "bot");
    let mut files: Vec<(String, String, u32, Vec<u8>)> = response
        .grants
        .iter()
        .flat_map(|g| {
            g.files
                .iter()
                .map(move |f| (g.grant.clone(), f.path.clone(), f.mode, f.content.clone()))
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            (
                "db".into(),
                "supabase-key".into(),
                0o400,
                b"custody-value-1".to_vec()
            ),
            ("db".into(), "url".into(), 0o440, b"https://db".to_vec()),
            (
                "gh".into(),
                "token".into(),
                0o440,
                b"custody-value-2".to_vec()
            ),
        ]
    );
    let db = response.grants.iter().find(|g| g.grant == "db").unwrap();
    assert_eq!(db.content_digest.len(), 12);
    assert!(db.expires_at.is_some());
    assert!(response.refresh_after_seconds > 3000);

    // Narrowed to one grant.
    let mut narrowed = f.request(&pod);
    narrowed.grants = vec!["gh".into()];
    // Another volume of the pod: a new mount, a resolution of its own.
    narrowed.volume_id = format!("csi-{}-narrowed", pod.uid);
    let only = f.resolve(narrowed).await.expect("narrowed");
    assert_eq!(
        only.grants
            .iter()
            .map(|g| g.grant.as_str())
            .collect::<Vec<_>>(),
        ["gh"]
    );

    // Audit line, Event regarding the grant related to the pod, batched status.
    let line = f
        .controller
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "SecretResolved" && l["grant"] == "db")
        .expect("SecretResolved line");
    for (field, value) in [
        ("pod", "agent"),
        ("agent", "bot"),
        ("serviceAccount", "bot-sa"),
        ("secret", "supabase"),
        ("keys", "service-key,url"),
    ] {
        assert_eq!(line[field], value, "{line}");
    }
    assert_eq!(line["podUID"], pod.uid.as_str());
    assert_eq!(line["node"], f.node.as_str());
    // The Event is a series per grant (the pods are in the audit lines),
    // related to the agent.
    wait_for_desc("SecretResolved Event", WAIT, async || {
        f.events("SecretResolved").await.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("db")
                && e.related.as_ref().and_then(|r| r.kind.as_deref()) == Some("AgentIdentity")
                && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some("bot")
        })
    })
    .await;
    let grants: Api<SecretGrant> = Api::namespaced(f.client.clone(), &f.ns);
    wait_for_desc("resolution status", WAIT, async || {
        let s = grants.get("gh").await.ok()?.status?;
        (s.resolutions == Some(2)
            && s.recent_resolutions.len() == 2
            && s.recent_resolutions[0].pod == "agent"
            && s.last_resolved_at.is_some())
        .then_some(())
    })
    .await;
    // Kubelet's republish of the first volume delivers the same content again:
    // answered in full, but neither an audit record nor a resolution.
    let again = f.resolve(f.request(&pod)).await.expect("republished");
    assert_eq!(again.grants.len(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await; // > --status-flush-ms
    let resolved_gh = f
        .controller
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "SecretResolved" && l["grant"] == "gh")
        .count();
    assert_eq!(
        resolved_gh, 2,
        "a republish of unchanged content was recorded"
    );
    assert_eq!(
        grants.get("gh").await.unwrap().status.unwrap().resolutions,
        Some(2),
        "a republish of unchanged content was counted"
    );
    let identities: Api<AgentIdentity> = Api::namespaced(f.client.clone(), &f.ns);
    wait_for_desc("identity lastResolvedAt", WAIT, async || {
        identities.get("bot").await.ok()?.status?.last_resolved_at
    })
    .await;
}

#[tokio::test]
async fn refuses_callers_that_are_not_the_node_plugin() {
    let f = Fixture::new("custody-caller").await;
    f.identity("bot", "bot-sa", false).await;
    let pod = f.pod("agent", "bot-sa", &f.node.clone()).await;
    let none = f.call(f.request(&pod), None).await.expect_err("no token");
    assert_eq!(none.code(), Code::Unauthenticated);
    let agent_as_caller = f
        .call(f.request(&pod), Some(&pod.token))
        .await
        .expect_err("agent token");
    assert_eq!(agent_as_caller.code(), Code::PermissionDenied);
    let garbage = f
        .call(f.request(&pod), Some("not-a-token"))
        .await
        .expect_err("garbage");
    assert_eq!(garbage.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn denials_are_refused_audited_and_recorded() {
    let f = Fixture::new("custody-deny").await;
    f.secret(&f.ns, "creds", &[("api", "deny-value")]).await;
    f.identity("bot", "bot-sa", false).await;
    f.identity("sleepy", "sleepy-sa", true).await;
    f.identity("late", "late-sa", false).await;
    f.identity("gone", "gone-sa", false).await;
    f.grant("bot-grant", "bot", "creds", vec![key("api")], |_| {})
        .await;
    f.grant("sleepy-grant", "sleepy", "creds", vec![key("api")], |_| {})
        .await;
    let soon = Timestamp::from_second(Timestamp::now().as_second() + 2).unwrap();
    f.grant("late-grant", "late", "creds", vec![key("api")], |s| {
        s.expires_at = Some(Time(soon))
    })
    .await;
    f.grant("gone-grant", "gone", "creds", vec![key("api")], |s| {
        s.revoked = true
    })
    .await;
    f.await_phase("bot-grant", GrantPhase::Active).await;
    let node = f.node.clone();

    // No AgentIdentity for the pod's ServiceAccount.
    create_service_account(&f.client, &f.ns, "stranger").await;
    let stranger = f.pod("stranger", "stranger", &node).await;
    f.expect_denied(
        f.request(&stranger),
        Code::PermissionDenied,
        "NoAgentIdentity",
    )
    .await;

    // Suspended agent.
    let sleepy = f.pod("sleepy", "sleepy-sa", &node).await;
    f.expect_denied(f.request(&sleepy), Code::PermissionDenied, "AgentSuspended")
        .await;

    // Expired and revoked grants.
    let late = f.pod("late", "late-sa", &node).await;
    f.await_phase("late-grant", GrantPhase::Expired).await;
    f.expect_denied(f.request(&late), Code::PermissionDenied, "NoActiveGrants")
        .await;
    let gone = f.pod("gone", "gone-sa", &node).await;
    f.expect_denied(f.request(&gone), Code::PermissionDenied, "NoActiveGrants")
        .await;

    // A token of another pod, with this pod's details.
    let bot = f.pod("bot", "bot-sa", &node).await;
    let twin = f.pod("bot-twin", "bot-sa", &node).await;
    let mut stolen = f.request(&bot);
    stolen.pod_token = twin.token.clone();
    stolen.request_id = "stolen".into();
    f.expect_denied(stolen, Code::PermissionDenied, "TokenMismatch")
        .await;
    // The record names what was claimed (bot) and who presented the token
    // (bot-twin, per the TokenReview), not only the victim.
    let line = f
        .controller
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "AccessDenied" && l["requestID"] == "stolen")
        .unwrap();
    assert_eq!(line["pod"], "bot", "{line}");
    assert_eq!(line["podUID"], bot.uid.as_str(), "{line}");
    assert_eq!(line["callerPod"], "bot-twin", "{line}");
    assert_eq!(line["callerPodUID"], twin.uid.as_str(), "{line}");
    assert_eq!(
        line["callerUser"],
        format!("system:serviceaccount:{}:bot-sa", f.ns).as_str(),
        "{line}"
    );

    // Pod details in the volume attributes that contradict the token.
    let mut forged_uid = f.request(&bot);
    forged_uid.pod_uid = twin.uid.clone();
    forged_uid.request_id = "forged-uid".into();
    f.expect_denied(forged_uid, Code::PermissionDenied, "TokenMismatch")
        .await;
    let mut forged_sa = f.request(&bot);
    forged_sa.service_account_name = "sleepy-sa".into();
    forged_sa.request_id = "forged-sa".into();
    f.expect_denied(forged_sa, Code::PermissionDenied, "TokenMismatch")
        .await;

    // A token for another audience.
    let mut other_audience = f.request(&bot);
    other_audience.pod_token =
        pod_token(&f.client, &f.ns, "bot-sa", "bot", &bot.uid, "vault", 3600).await;
    other_audience.request_id = "other-audience".into();
    f.expect_denied(other_audience, Code::Unauthenticated, "TokenRejected")
        .await;

    // An expired token, signed by the cluster's real issuer key.
    let mut expired = f.request(&bot);
    expired.pod_token = expired_token(&f.ns, "bot-sa", &bot.name, &bot.uid);
    expired.request_id = "expired".into();
    let status = f
        .expect_denied(expired, Code::Unauthenticated, "TokenRejected")
        .await;
    assert!(status.message().contains("expired"), "{}", status.message());

    // A pod on another node than the calling plugin.
    let elsewhere_node = format!("{}-node-b", f.ns);
    create_node(&f.client, &elsewhere_node).await;
    let elsewhere = f.pod("elsewhere", "bot-sa", &elsewhere_node).await;
    f.expect_denied(f.request(&elsewhere), Code::PermissionDenied, "WrongNode")
        .await;

    // A grant name the agent does not hold.
    let mut narrowed = f.request(&bot);
    narrowed.grants = vec!["sleepy-grant".into()];
    narrowed.request_id = "narrowed".into();
    f.expect_denied(narrowed, Code::PermissionDenied, "GrantNotHeld")
        .await;

    // A deleted pod: custody no longer reads the Pod (the token's claims name
    // pod, UID and node), so the decision is the API server's TokenReview,
    // which refuses a deleted pod's token once its review cache (10 s) lets
    // go of it. Kubelet publishes no volume for a deleted pod meanwhile.
    let doomed = f.pod("doomed", "bot-sa", &node).await;
    assert!(
        f.resolve(f.request(&doomed)).await.is_ok(),
        "doomed pod resolves while it exists"
    );
    Api::<Pod>::namespaced(f.client.clone(), &f.ns)
        .delete(
            "doomed",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_for_desc("the deleted pod's token refused", WAIT, async || {
        match f.resolve(f.request(&doomed)).await {
            Err(status) => Some(status),
            Ok(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        }
    })
    .await;
    f.expect_denied(f.request(&doomed), Code::Unauthenticated, "TokenRejected")
        .await;

    // And the control: the legitimate pod resolves.
    assert!(f.resolve(f.request(&bot)).await.is_ok());

    // The Event of the stolen token names its holder too.
    wait_for_desc(
        "AccessDenied Event naming the token's holder",
        WAIT,
        async || {
            f.events("AccessDenied").await.into_iter().find(|e| {
                e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("token presented by") && n.contains("bot-twin"))
            })
        },
    )
    .await;

    // AccessDenied Events regarding the identity, related to the pod.
    wait_for_desc(
        "AccessDenied Event for the suspended agent",
        WAIT,
        async || {
            f.events("AccessDenied").await.into_iter().find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("sleepy")
                    && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some("sleepy")
            })
        },
    )
    .await;
    wait_for_desc(
        "AccessDenied Event regarding the stranger pod",
        WAIT,
        async || {
            f.events("AccessDenied").await.into_iter().find(|e| {
                e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("stranger")
            })
        },
    )
    .await;
}

/// A grant can only name a Secret in its own namespace: a Secret of that name
/// in another namespace is not found, and a pod in another namespace is not
/// the agent even with the same ServiceAccount name.
/// Requests that are malformed (not merely denied) are refused as invalid
/// arguments before any API call, and a well-formed request right after them
/// still resolves: a bad request loses nothing.
#[tokio::test]
async fn malformed_requests_are_invalid_and_change_nothing() {
    let f = Fixture::new("custody-malformed").await;
    f.secret(&f.ns, "creds", &[("api", "custody-malformed-value")])
        .await;
    f.identity("bot", "bot-sa", false).await;
    f.grant("g", "bot", "creds", vec![key("api")], |_| {}).await;
    f.await_phase("g", GrantPhase::Active).await;
    let pod = f.pod("agent", "bot-sa", &f.node.clone()).await;

    type Edit = fn(&mut ResolveRequest);
    let cases: [(&str, Edit); 6] = [
        ("no token", |r| r.pod_token.clear()),
        ("no pod name", |r| r.pod_name.clear()),
        ("no pod UID", |r| r.pod_uid.clear()),
        ("a path as pod name", |r| {
            r.pod_name = "../../secrets/creds".into()
        }),
        ("a subresource as pod name", |r| {
            r.pod_name = "agent/status".into()
        }),
        ("an upper-case namespace", |r| {
            r.pod_namespace = "Kube-System".into()
        }),
    ];
    for (what, edit) in cases {
        let mut req = f.request(&pod);
        edit(&mut req);
        let status = f.resolve(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            !status.message().contains(&pod.token),
            "{what}: the token is in the message"
        );
    }
    let response = f.resolve(f.request(&pod)).await.expect("resolved");
    assert_eq!(response.grants.len(), 1);
    assert_eq!(
        response.grants[0].files[0].content,
        b"custody-malformed-value"
    );
}

#[tokio::test]
async fn no_cross_namespace_access() {
    let f = Fixture::new("custody-xns").await;
    let other = test_namespace(&f.client, "custody-xns-other").await;
    f.secret(&other, "creds", &[("api", "other-namespace-value")])
        .await;
    f.identity("bot", "bot-sa", false).await;
    f.grant("g", "bot", "creds", vec![key("api")], |_| {}).await;
    f.await_phase("g", GrantPhase::Invalid).await;
    let pod = f.pod("agent", "bot-sa", &f.node.clone()).await;
    f.expect_denied(f.request(&pod), Code::PermissionDenied, "NoActiveGrants")
        .await;

    // Same ServiceAccount name in the other namespace: not this agent.
    create_service_account(&f.client, &other, "bot-sa").await;
    let foreign = create_pod(&f.client, &other, "foreign", "bot-sa", &f.node).await;
    let token = pod_token(
        &f.client,
        &other,
        "bot-sa",
        "foreign",
        &foreign.uid().unwrap(),
        AUDIENCE,
        3600,
    )
    .await;
    let mut req = f.request(&pod);
    req.pod_namespace = other.clone();
    req.pod_name = "foreign".into();
    req.pod_uid = foreign.uid().unwrap();
    req.pod_token = token;
    req.request_id = "foreign".into();
    f.expect_denied(req, Code::PermissionDenied, "NoAgentIdentity")
        .await;
}

#[tokio::test]
async fn no_secret_value_or_token_in_custody_output() {
    let f = Fixture::new("custody-leak").await;
    let value = "custody-leak-check-0xC0FFEE";
    f.secret(&f.ns, "creds", &[("api", value)]).await;
    f.identity("bot", "bot-sa", false).await;
    f.grant("g", "bot", "creds", vec![key("api")], |_| {}).await;
    f.await_phase("g", GrantPhase::Active).await;
    let pod = f.pod("agent", "bot-sa", &f.node.clone()).await;
    f.resolve(f.request(&pod)).await.expect("resolved");
    let mut mismatch = f.request(&pod);
    mismatch.pod_uid = "00000000-0000-0000-0000-000000000000".into();
    let _ = f.resolve(mismatch).await;
    let grants: Api<SecretGrant> = Api::namespaced(f.client.clone(), &f.ns);
    wait_for_desc("resolution recorded", WAIT, async || {
        grants.get("g").await.ok()?.status?.resolutions
    })
    .await;

    let mut everything = f.controller.logs();
    let events: Api<K8sEvent> = Api::namespaced(f.client.clone(), &f.ns);
    everything.push_str(
        &serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap(),
    );
    everything.push_str(
        &serde_json::to_string(&grants.list(&Default::default()).await.unwrap().items).unwrap(),
    );
    assert!(everything.contains("SecretResolved") && everything.contains("AccessDenied"));
    for secret in [value, pod.token.as_str(), f.plugin_token.as_str()] {
        assert!(
            !everything.contains(secret),
            "a secret value or token leaked into the output"
        );
    }
    // Tokens are JWTs: no fragment of their signature may appear either.
    let signature = pod.token.rsplit('.').next().unwrap();
    assert!(!everything.contains(&signature[..20]));
}

/// The push path: a node plugin subscribed to invalidations hears of every
/// change that alters what pods may hold, and of nothing else.
#[tokio::test]
async fn invalidations_reach_subscribed_node_plugins() {
    use scopehold::proto::scopehold::v1::invalidation::Kind;
    use scopehold::proto::scopehold::v1::{GrantRef, GrantStatesRequest, WatchRequest};

    let f = Fixture::new("custody-push").await;
    f.secret(&f.ns, "creds", &[("api", "push-value-1"), ("other", "x")])
        .await;
    f.identity("bot", "bot-sa", false).await;
    f.grant("g", "bot", "creds", vec![key("api")], |_| {}).await;
    f.grant("h", "bot", "creds", vec![key("other")], |_| {})
        .await;
    f.await_phase("g", GrantPhase::Active).await;
    f.await_phase("h", GrantPhase::Active).await;

    let mut client = CustodyClient::connect(format!("http://{}", f.custody))
        .await
        .unwrap();
    let mut request = tonic::Request::new(WatchRequest {
        node_name: f.node.clone(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", f.plugin_token).parse().unwrap(),
    );
    let mut stream = client
        .watch_invalidations(request)
        .await
        .unwrap()
        .into_inner();
    let mut received: Vec<(Kind, String, String)> = Vec::new();
    expect_push(&mut stream, &mut received, Kind::Resync, "", "").await;

    // A resolution writes status (resolution counts): not a change.
    let pod = f.pod("agent", "bot-sa", &f.node.clone()).await;
    let first = f.resolve(f.request(&pod)).await.expect("resolved");
    // The answer says how far custody's view had come, per watched kind.
    let at_first = first.versions.expect("versions in the answer");
    assert!(
        at_first.grants > 0 && at_first.identities > 0 && at_first.secrets > 0,
        "{at_first:?}"
    );
    let quiet = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    let quiet = quiet.map(|m| m.ok().flatten().map(|m| (m.kind(), m.agent, m.grant)));
    assert!(
        quiet.is_err(),
        "a status-only update produced an invalidation: {quiet:?}"
    );

    let grants: Api<SecretGrant> = Api::namespaced(f.client.clone(), &f.ns);
    let patch = |spec: serde_json::Value| kube::api::Patch::Merge(json!({ "spec": spec }));
    let pp = kube::api::PatchParams::default();
    grants
        .patch("g", &pp, &patch(json!({"revoked": true})))
        .await
        .unwrap();
    let revoked = expect_push(&mut stream, &mut received, Kind::Revoked, "bot", "g").await;
    assert_eq!(revoked.namespace, f.ns);
    // The revocation carries its grant event's version, newer than the
    // answer; an answer given after it is at least as new (never judged
    // older than custody's own invalidation).
    let revoked_at = revoked.versions.expect("versions in the invalidation");
    assert!(revoked_at.grants > at_first.grants, "{revoked_at:?}");
    assert_eq!((revoked_at.identities, revoked_at.secrets), (0, 0));
    let after = f.resolve(f.request(&pod)).await.expect("h still resolves");
    assert!(after.versions.expect("versions").grants >= revoked_at.grants);

    Api::<Secret>::namespaced(f.client.clone(), &f.ns)
        .patch(
            "creds",
            &pp,
            &kube::api::Patch::Merge(json!({"stringData": {"other": "y"}})),
        )
        .await
        .unwrap();
    let rotated = expect_push(&mut stream, &mut received, Kind::Rotated, "bot", "h").await;
    assert_eq!(rotated.secret, "creds");

    let agents: Api<AgentIdentity> = Api::namespaced(f.client.clone(), &f.ns);
    agents
        .patch("bot", &pp, &patch(json!({"suspended": true})))
        .await
        .unwrap();
    let suspended = expect_push(&mut stream, &mut received, Kind::Suspended, "bot", "").await;
    let suspended_at = suspended.versions.expect("versions in the invalidation");
    assert!(
        suspended_at.identities > at_first.identities,
        "{suspended_at:?}"
    );

    // Grant states, for a plugin without a pod token at hand.
    let refs = vec![
        GrantRef {
            namespace: f.ns.clone(),
            grant: "g".into(),
            agent: "bot".into(),
        },
        GrantRef {
            namespace: f.ns.clone(),
            grant: "h".into(),
            agent: "bot".into(),
        },
        GrantRef {
            namespace: f.ns.clone(),
            grant: "h".into(),
            agent: "someone-else".into(),
        },
        GrantRef {
            namespace: f.ns.clone(),
            grant: "nope".into(),
            agent: "bot".into(),
        },
    ];
    let mut request = tonic::Request::new(GrantStatesRequest { grants: refs });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", f.plugin_token).parse().unwrap(),
    );
    let states = client
        .grant_states(request)
        .await
        .unwrap()
        .into_inner()
        .grants;
    let summary: Vec<(bool, &str)> = states
        .iter()
        .map(|s| (s.active, s.reason.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (false, "Revoked"),
            (false, "AgentSuspended"),
            (false, "AgentChanged"),
            (false, "NotFound")
        ]
    );

    // Resume: pods of the agent may hold content again.
    agents
        .patch("bot", &pp, &patch(json!({"suspended": false})))
        .await
        .unwrap();
    expect_push(&mut stream, &mut received, Kind::Changed, "bot", "").await;
    // No plugin token, no stream.
    let Err(denied) = client
        .watch_invalidations(tonic::Request::new(WatchRequest::default()))
        .await
    else {
        panic!("a stream without the plugin's token");
    };
    assert_eq!(denied.code(), Code::Unauthenticated);
}

/// Reads invalidations until one matches; duplicates (a Secret change is
/// announced by the Secret watch and again when the digest lands in the
/// status) are fine, the node plugin's re-resolution is idempotent.
async fn expect_push(
    stream: &mut tonic::Streaming<scopehold::proto::scopehold::v1::Invalidation>,
    received: &mut Vec<(
        scopehold::proto::scopehold::v1::invalidation::Kind,
        String,
        String,
    )>,
    kind: scopehold::proto::scopehold::v1::invalidation::Kind,
    agent: &str,
    grant: &str,
) -> scopehold::proto::scopehold::v1::Invalidation {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} {agent}/{grant} within 5 s; got {received:?}"))
            .expect("stream ok")
            .expect("stream open");
        received.push((m.kind(), m.agent.clone(), m.grant.clone()));
        if m.kind() == kind && m.agent == agent && m.grant == grant {
            return m;
        }
    }
}

/// With TLS (the default), custody creates a CA and serving certificate once,
/// shares them between replicas through a Secret, publishes the CA in a
/// ConfigMap, and refuses plaintext and unauthenticated clients.
#[tokio::test]
async fn tls_is_the_default_and_refuses_plaintext() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "custody-tls").await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    create_service_account(&client, &ns, "bot-sa").await;
    let plugin_token = node_plugin_token(&client, &ns, &node).await;
    let args = [
        "--custody-listen",
        "127.0.0.1:0",
        "--custody-tls-namespace",
        &ns,
        "--custody-tls-san",
        "127.0.0.1",
        "--node-service-account",
        &format!("{ns}/node-plugin"),
    ];
    let first = ControllerProcess::start(&ns, &args);
    let second = ControllerProcess::start(&ns, &args);
    let mut addrs = Vec::new();
    for c in [&first, &second] {
        let line = c.wait_for_log(|l| l.contains("custody_addr"), WAIT).await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["tls"], true, "{line}");
        addrs.push(v["custody_addr"].as_str().unwrap().to_owned());
        c.wait_for_log(|l| l.contains("caches synced"), WAIT).await;
    }
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("scopehold-custody-tls")
        .await
        .unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let ca = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("scopehold-custody-ca")
        .await
        .unwrap()
        .data
        .unwrap()["ca.crt"]
        .clone();
    assert_eq!(
        String::from_utf8(secret.data.unwrap()["ca.crt"].0.clone()).unwrap(),
        ca,
        "both replicas serve the one CA that is published"
    );

    let pod = create_pod(&client, &ns, "agent", "bot-sa", &node).await;
    let token = pod_token(
        &client,
        &ns,
        "bot-sa",
        "agent",
        &pod.uid().unwrap(),
        AUDIENCE,
        3600,
    )
    .await;
    let request = |bearer: Option<&str>| {
        let mut r = tonic::Request::new(ResolveRequest {
            pod_token: token.clone(),
            pod_namespace: ns.clone(),
            pod_name: "agent".into(),
            pod_uid: pod.uid().unwrap(),
            service_account_name: "bot-sa".into(),
            node_name: node.clone(),
            ..Default::default()
        });
        if let Some(b) = bearer {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        r
    };
    for addr in &addrs {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut custody = CustodyClient::new(channel);
        // Authenticated over TLS: reaches the policy (no AgentIdentity here).
        let denied = custody
            .resolve(request(Some(&plugin_token)))
            .await
            .expect_err("no identity");
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("NoAgentIdentity"), "{denied:?}");
        assert_eq!(
            custody
                .resolve(request(None))
                .await
                .expect_err("no token")
                .code(),
            Code::Unauthenticated
        );
        assert_eq!(
            custody
                .resolve(request(Some(&token)))
                .await
                .expect_err("agent token")
                .code(),
            Code::PermissionDenied
        );

        // Plaintext to the TLS port gets nowhere.
        let plaintext = match CustodyClient::connect(format!("http://{addr}")).await {
            Ok(mut c) => c.resolve(request(Some(&plugin_token))).await.map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        assert!(
            plaintext.is_err(),
            "plaintext call succeeded against TLS custody"
        );
    }
    let everything = first.logs() + &second.logs();
    assert!(
        !everything.contains("PRIVATE KEY"),
        "key material in the logs"
    );
}

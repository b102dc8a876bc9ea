//! What custody lets out beyond the granted values, against a real
//! kube-apiserver: content digests are keyed per installation (and the key
//! shows nowhere), each node's invalidation stream and grant-state answers
//! name only what concerns its own pods, and a node may report only about
//! pods on it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::objects::{create_grant, create_identity, create_secret, key};
use common::stack::{NODE_PLUGIN_SA, node_plugin_token, start_controller_with_custody};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use scopehold::api::{AgentIdentity, SecretGrant};
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;
use scopehold::proto::scopehold::v1::invalidation::Kind;
use scopehold::proto::scopehold::v1::{
    GrantRef, GrantStatesRequest, Invalidation, NodeReport, ReportRequest, ResolveRequest,
    WatchRequest,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
/// A low-entropy value: exactly what an unkeyed digest would let anyone confirm.
const VALUE: &str = "hunter2";

/// HMAC-SHA-256 (RFC 2104) written out with sha2, independent of the
/// implementation under test.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0_u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The framing of one granted key and its value (README, "Content digests").
fn framed(name: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((name.len() as u64).to_be_bytes());
    out.extend(name.as_bytes());
    out.extend((value.len() as u64).to_be_bytes());
    out.extend(value.as_bytes());
    out
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn custody(addr: &str) -> CustodyClient<tonic::transport::Channel> {
    CustodyClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// One installation: its own namespace, node, controller (custody) and
/// therefore its own digest key, with the same Secret value as every other.
struct Install {
    client: Client,
    ns: String,
    node: String,
    plugin_token: String,
    controllers: Vec<(ControllerProcess, String)>,
}

impl Install {
    async fn new(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let node = format!("{ns}-node");
        create_node(&client, &node).await;
        let plugin_token = node_plugin_token(&client, &ns, &node).await;
        create_secret(&client, &ns, "creds", &[("api", VALUE)]).await;
        create_service_account(&client, &ns, "bot-sa").await;
        create_identity(&client, &ns, "bot", "bot-sa", false).await;
        create_grant(&client, &ns, "g", "bot", "creds", vec![key("api")], |_| {}).await;
        let mut install = Install {
            client,
            ns,
            node,
            plugin_token,
            controllers: Vec::new(),
        };
        install.start_replica().await;
        install
    }

    /// Starts one more controller replica keeping its key material in the
    /// installation's namespace.
    async fn start_replica(&mut self) -> &str {
        let started =
            start_controller_with_custody(&self.ns, &["--custody-tls-namespace", &self.ns]).await;
        self.controllers.push(started);
        &self.controllers.last().unwrap().1
    }

    async fn status_digest(&self) -> String {
        let grants: Api<SecretGrant> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc("the grant's contentDigest", WAIT, async || {
            grants.get("g").await.ok()?.status?.content_digest
        })
        .await
    }

    async fn resolve(&self, custody_addr: &str, pod: &str) -> String {
        let created = create_pod(&self.client, &self.ns, pod, "bot-sa", &self.node).await;
        let uid = created.uid().unwrap();
        let token = pod_token(&self.client, &self.ns, "bot-sa", pod, &uid, AUDIENCE, 3600).await;
        let request = ResolveRequest {
            request_id: format!("digest-{pod}"),
            pod_token: token,
            pod_namespace: self.ns.clone(),
            pod_name: pod.into(),
            pod_uid: uid.clone(),
            service_account_name: "bot-sa".into(),
            node_name: self.node.clone(),
            volume_id: format!("csi-{uid}"),
            ..Default::default()
        };
        let answer = custody(custody_addr)
            .await
            .resolve(bearer(request, &self.plugin_token))
            .await
            .expect("resolved")
            .into_inner();
        assert_eq!(answer.grants.len(), 1);
        assert_eq!(answer.grants[0].files[0].content, VALUE.as_bytes());
        answer.grants[0].content_digest.clone()
    }

    async fn key(&self) -> Vec<u8> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let secret = secrets
            .get_opt("scopehold-digest-key")
            .await
            .unwrap()
            .expect("the digest key Secret in the controller's namespace");
        secret.data.unwrap()["digest.key"].0.clone()
    }

    fn logs(&self) -> String {
        self.controllers.iter().map(|(c, _)| c.logs()).collect()
    }
}

#[tokio::test]
async fn content_digests_are_keyed_per_installation_and_the_key_shows_nowhere() {
    let mut one = Install::new("digest-one").await;
    let two = Install::new("digest-two").await;
    let (d1, d2) = (one.status_digest().await, two.status_digest().await);

    // Not a plain hash of the value (framed as before, or bare): a guess of
    // "hunter2" cannot be confirmed from the status.
    let unkeyed = hex::encode(Sha256::digest(framed("api", VALUE)));
    let bare = hex::encode(Sha256::digest(VALUE));
    for d in [&d1, &d2] {
        assert_eq!(d.len(), 12, "{d}");
        assert!(
            !unkeyed.starts_with(d.as_str()) && !bare.starts_with(d.as_str()),
            "contentDigest {d} is an unkeyed SHA-256 of the value"
        );
    }
    // Two installations, two keys: the same value has different digests.
    assert_ne!(d1, d2, "two installations gave the same digest");

    // It is the documented HMAC under the key kept in the Secret.
    let (k1, k2) = (one.key().await, two.key().await);
    assert_eq!(k1.len(), 32);
    assert_ne!(k1, k2);
    let mut message = b"scopehold.dev content digest v1\0".to_vec();
    message.extend(framed("api", VALUE));
    assert_eq!(d1, hex::encode(&hmac_sha256(&k1, &message)[..6]));
    assert_eq!(d2, hex::encode(&hmac_sha256(&k2, &message)[..6]));

    // Custody's answer, a second replica (same key, created once) and the
    // audit line all carry the status's digest.
    let first = one.controllers[0].1.clone();
    assert_eq!(one.resolve(&first, "agent-1").await, d1);
    let second = one.start_replica().await.to_owned();
    assert_eq!(one.resolve(&second, "agent-2").await, d1);
    assert_eq!(one.key().await, k1, "the key was created once");
    let line = wait_for_desc("the SecretResolved audit line", WAIT, async || {
        one.controllers
            .iter()
            .flat_map(|(c, _)| c.audit_lines())
            .find(|l| l["event"] == "SecretResolved" && l["pod"] == "agent-2")
    })
    .await;
    assert_eq!(line["contentDigest"], d1.as_str(), "{line}");
    let events: Api<K8sEvent> = Api::namespaced(one.client.clone(), &one.ns);
    let event = wait_for_desc("the SecretResolved Event", WAIT, async || {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SecretResolved"))
    })
    .await;
    assert!(
        event.note.as_deref().unwrap_or_default().contains(&d1),
        "{event:?}"
    );
    let grants: Api<SecretGrant> = Api::namespaced(one.client.clone(), &one.ns);
    wait_for_desc("the resolutions in the status", WAIT, async || {
        let status = grants.get("g").await.ok()?.status?;
        (status.recent_resolutions.len() >= 2).then_some(())
    })
    .await;
    let status = grants.get("g").await.unwrap().status.unwrap();
    assert!(
        status
            .recent_resolutions
            .iter()
            .all(|r| r.digest.as_deref() == Some(d1.as_str())),
        "{:?}",
        status.recent_resolutions
    );

    // The key itself: in no log line, Event, or status, in any encoding.
    for (install, key) in [(&one, &k1), (&two, &k2)] {
        let forms = [
            hex::encode(key),
            base64::engine::general_purpose::STANDARD.encode(key),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(key),
            String::from_utf8_lossy(key).into_owned(),
        ];
        let events: Api<K8sEvent> = Api::namespaced(install.client.clone(), &install.ns);
        let grants: Api<SecretGrant> = Api::namespaced(install.client.clone(), &install.ns);
        let agents: Api<AgentIdentity> = Api::namespaced(install.client.clone(), &install.ns);
        let published = [
            install.logs(),
            serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap(),
            serde_json::to_string(&grants.list(&Default::default()).await.unwrap().items).unwrap(),
            serde_json::to_string(&agents.list(&Default::default()).await.unwrap().items).unwrap(),
        ];
        for text in &published {
            for form in &forms {
                assert!(!text.contains(form.as_str()), "the digest key leaked");
            }
            assert!(!text.contains(VALUE), "the value leaked");
        }
    }
}

/// A second node plugin identity in `ns`: the node plugin's ServiceAccount,
/// another Pod of it on `node`, and that Pod's bound token.
async fn second_plugin_token(client: &Client, ns: &str, node: &str) -> String {
    let pod = create_pod(client, ns, "node-plugin-b", NODE_PLUGIN_SA, node).await;
    pod_token(
        client,
        ns,
        NODE_PLUGIN_SA,
        "node-plugin-b",
        &pod.uid().unwrap(),
        AUDIENCE,
        3600,
    )
    .await
}

/// Two nodes, each running one agent's pod; both plugins subscribed.
struct TwoNodes {
    client: Client,
    ns: String,
    node_a: String,
    node_b: String,
    token_a: String,
    token_b: String,
    _controller: ControllerProcess,
    custody: String,
}

impl TwoNodes {
    async fn new(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let (node_a, node_b) = (format!("{ns}-node-a"), format!("{ns}-node-b"));
        create_node(&client, &node_a).await;
        create_node(&client, &node_b).await;
        let token_a = node_plugin_token(&client, &ns, &node_a).await;
        let token_b = second_plugin_token(&client, &ns, &node_b).await;
        create_secret(&client, &ns, "creds-a", &[("api", "value-a")]).await;
        create_secret(&client, &ns, "creds-b", &[("api", "value-b")]).await;
        for (agent, node, secret, grant) in [
            ("bot-a", &node_a, "creds-a", "ga"),
            ("bot-b", &node_b, "creds-b", "gb"),
        ] {
            let sa = format!("{agent}-sa");
            create_service_account(&client, &ns, &sa).await;
            create_identity(&client, &ns, agent, &sa, false).await;
            create_grant(&client, &ns, grant, agent, secret, vec![key("api")], |_| {}).await;
            create_pod(&client, &ns, &format!("{agent}-pod"), &sa, node).await;
        }
        let (controller, custody) = start_controller_with_custody(&ns, &[]).await;
        TwoNodes {
            client,
            ns,
            node_a,
            node_b,
            token_a,
            token_b,
            _controller: controller,
            custody,
        }
    }

    async fn subscribe(&self, node: &str, token: &str) -> tonic::Streaming<Invalidation> {
        let mut stream = custody(&self.custody)
            .await
            .watch_invalidations(bearer(
                WatchRequest {
                    node_name: node.to_owned(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await;
        assert_eq!(first.kind(), Kind::Resync);
        stream
    }

    async fn patch<K>(&self, name: &str, spec: serde_json::Value)
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::<K>::namespaced(self.client.clone(), &self.ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }
}

async fn next(stream: &mut tonic::Streaming<Invalidation>) -> Invalidation {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an invalidation within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads until an invalidation of `kind` about `agent` arrives; returns
/// everything read, that one last.
async fn read_until(
    stream: &mut tonic::Streaming<Invalidation>,
    kind: Kind,
    agent: &str,
) -> Vec<Invalidation> {
    let mut seen = Vec::new();
    loop {
        let m = next(stream).await;
        let done = m.kind() == kind && m.agent == agent;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn each_node_hears_only_about_the_agents_whose_pods_it_runs() {
    let t = TwoNodes::new("fanout").await;
    let mut on_a = t.subscribe(&t.node_a, &t.token_a).await;
    let mut on_b = t.subscribe(&t.node_b, &t.token_b).await;

    // Revoking bot-a's grant reaches node A.
    t.patch::<SecretGrant>("ga", json!({"revoked": true})).await;
    let seen_a = read_until(&mut on_a, Kind::Revoked, "bot-a").await;
    assert_eq!(seen_a.last().unwrap().grant, "ga");
    // Then bot-b's: one stream of changes in order, so had node B been told
    // about bot-a it would have been told before this.
    t.patch::<SecretGrant>("gb", json!({"revoked": true})).await;
    let seen_b = read_until(&mut on_b, Kind::Revoked, "bot-b").await;
    let leaked: Vec<_> = seen_b
        .iter()
        .filter(|m| m.agent == "bot-a" || m.grant == "ga" || m.secret == "creds-a")
        .collect();
    assert!(leaked.is_empty(), "node B was told about bot-a: {leaked:?}");
    // And the other way round, behind a change of bot-a's.
    t.patch::<AgentIdentity>("bot-a", json!({"suspended": true}))
        .await;
    let seen_a = read_until(&mut on_a, Kind::Suspended, "bot-a").await;
    let leaked: Vec<_> = seen_a
        .iter()
        .filter(|m| m.agent == "bot-b" || m.grant == "gb" || m.secret == "creds-b")
        .collect();
    assert!(leaked.is_empty(), "node A was told about bot-b: {leaked:?}");

    // A pod of bot-b scheduled to node A later: node A now hears about bot-b.
    create_pod(&t.client, &t.ns, "bot-b-pod-2", "bot-b-sa", &t.node_a).await;
    t.patch::<AgentIdentity>("bot-b", json!({"suspended": true}))
        .await;
    read_until(&mut on_a, Kind::Suspended, "bot-b").await;
    read_until(&mut on_b, Kind::Suspended, "bot-b").await;
}

#[tokio::test]
async fn grant_states_answer_only_about_agents_with_pods_on_the_calling_node() {
    let t = TwoNodes::new("states-scope").await;
    let refs = || {
        ["ga", "gb"]
            .into_iter()
            .zip(["bot-a", "bot-b"])
            .map(|(grant, agent)| GrantRef {
                namespace: t.ns.clone(),
                grant: grant.into(),
                agent: agent.into(),
            })
            .collect::<Vec<_>>()
    };
    let ask = async |token: &str| {
        custody(&t.custody)
            .await
            .grant_states(bearer(GrantStatesRequest { grants: refs() }, token))
            .await
            .unwrap()
            .into_inner()
            .grants
            .into_iter()
            .map(|s| (s.active, s.reason, s.content_digest.is_empty()))
            .collect::<Vec<_>>()
    };
    // Node A learns ga's state and digest, and nothing about gb (bot-b runs
    // only on node B); node B the other way round.
    assert_eq!(
        ask(&t.token_a).await,
        [
            (true, "Active".to_owned(), false),
            (false, "NotOnThisNode".to_owned(), true)
        ]
    );
    assert_eq!(
        ask(&t.token_b).await,
        [
            (false, "NotOnThisNode".to_owned(), true),
            (true, "Active".to_owned(), false)
        ]
    );
}

fn report_about(ns: &str, pod: &str, uid: &str) -> NodeReport {
    NodeReport {
        event: "ContentWithdrawn".into(),
        reason: "Revoked".into(),
        namespace: ns.into(),
        agent: "bot-b".into(),
        grant: "gb".into(),
        secret: "creds-b".into(),
        pod_name: pod.into(),
        pod_uid: uid.into(),
        keys: vec!["api".into()],
        content_digest: String::new(),
    }
}

#[tokio::test]
async fn a_node_may_report_only_about_pods_on_it() {
    let t = TwoNodes::new("report-scope").await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(t.client.clone(), &t.ns);
    let uid_b = pods.get("bot-b-pod").await.unwrap().uid().unwrap();
    let report = |token: &str, reports: Vec<NodeReport>| {
        let addr = t.custody.clone();
        let token = token.to_owned();
        async move {
            custody(&addr)
                .await
                .report(bearer(ReportRequest { reports }, &token))
                .await
                .map(|r| r.into_inner().accepted)
        }
    };

    // Node A withdrawing content "from" bot-b's pod on node B: refused.
    let refused = report(&t.token_a, vec![report_about(&t.ns, "bot-b-pod", &uid_b)])
        .await
        .expect_err("a report about another node's pod");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("bot-b-pod")
            && refused.message().contains(&t.node_a)
            && refused
                .message()
                .contains("only about pods on its own node"),
        "{}",
        refused.message()
    );
    // Mixed with a report about its own pod: the whole call is refused.
    let uid_a = pods.get("bot-a-pod").await.unwrap().uid().unwrap();
    let mut own = report_about(&t.ns, "bot-a-pod", &uid_a);
    own.agent = "bot-a".into();
    own.grant = "ga".into();
    let mixed = report(
        &t.token_a,
        vec![own.clone(), report_about(&t.ns, "bot-b-pod", &uid_b)],
    )
    .await
    .expect_err("a batch with another node's pod");
    assert_eq!(mixed.code(), Code::PermissionDenied);

    // Its own pod, and node B about its own: accepted. A pod that does not
    // exist, or an old UID, cannot be placed: not accepted.
    assert_eq!(report(&t.token_a, vec![own]).await.unwrap(), 1);
    assert_eq!(
        report(&t.token_b, vec![report_about(&t.ns, "bot-b-pod", &uid_b)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        report(
            &t.token_b,
            vec![
                report_about(&t.ns, "no-such-pod", ""),
                report_about(&t.ns, "bot-b-pod", "another-uid"),
            ]
        )
        .await
        .unwrap(),
        0
    );
    // Only the accepted reports became audit lines.
    let lines: Vec<_> = t
        ._controller
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "ContentWithdrawn")
        .collect();
    let by_node: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["pod"].as_str().unwrap().to_owned(),
                l["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        by_node,
        [
            ("bot-a-pod".to_owned(), t.node_a.clone()),
            ("bot-b-pod".to_owned(), t.node_b.clone())
        ]
    );
}

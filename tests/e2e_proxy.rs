//! Delivery mode `proxy` on a real node (kubelet, containerd, runc; the chart
//! installed by `helm install`, see tests/common/cluster.rs): an agent pod
//! annotated `scopehold.dev/inject: proxy` is changed by the release's
//! admission webhook, the node plugin mounts the values into the sidecar
//! alone, and `curl` in the agent container (`kubectl exec`) calls an HTTPS
//! upstream on the host's loopback through the sidecar. The agent container
//! is then searched for the value: its files, its mounts, its processes.
//!
//! The pod runs on the host network (the pod bridge has no route to the
//! host's loopback) and maps the upstream's names to 127.0.0.1 with
//! `hostAliases`; the sidecar trusts the upstream's CA through the chart's
//! `proxyInjector.upstreamCA`, the operator's setting.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod proxy_support;

use std::time::{Duration, Instant};

use common::cluster::{AGENT_IMAGE, Cluster, UPSTREAM_HOSTS, cluster_with_scopehold};
use common::objects::{create_grant, create_identity, create_secret};
use common::{create_service_account, wait_for_desc};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use proxy_support::{TestPki, upstream};
use scopehold::api::{
    DeliveryMode, GrantPhase, GrantedKey, KeyProxy, SecretGrant, delivery::HeaderTemplate,
};
use scopehold::proxy::pod::{AGENT_MOUNT, SIDECAR_NAME, VALUES_VOLUME};
use serde_json::json;

const CURL_IMAGE: &str = "scopehold.local/curl:dev";
const WAIT: Duration = Duration::from_secs(90);

fn random(prefix: &str) -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}{}", hex::encode(b))
}

/// The real-node test upstream's PKI (written at `helm install`).
fn upstream_pki(c: &Cluster) -> TestPki {
    let read = |name: &str| std::fs::read_to_string(c.upstream_pki_dir().join(name)).unwrap();
    TestPki {
        ca_pem: read("ca.crt"),
        cert_pem: read("tls.crt"),
        key_pem: read("tls.key"),
    }
}

/// A grep pattern matching `value` whose own text is not `value` (a
/// bracket around one character), so the search never finds itself in
/// `/proc/*/cmdline`.
fn pattern_for(value: &str) -> String {
    let (head, tail) = value.split_at(value.len() / 2);
    let mut chars = tail.chars();
    let first = chars.next().unwrap();
    format!("{head}[{first}]{}", chars.as_str())
}

/// Every file of the agent container that holds `pattern`: its root
/// filesystem as the issue asks (`find / -xdev | xargs grep`), every other
/// mount it has (the placeholder volume, kubelet's /etc files, /dev/shm),
/// and its processes' environments and command lines.
fn agent_search(pattern: &str) -> String {
    format!(
        "find / -xdev -type f 2>/dev/null | xargs grep -l -E '{pattern}' 2>/dev/null; \
         grep -r -l -E '{pattern}' {AGENT_MOUNT} /etc /tmp /dev/shm /var/run 2>/dev/null; \
         for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do \
           tr '\\0' '\\n' <\"$f\" 2>/dev/null | grep -q -E '{pattern}' && echo \"$f\"; \
         done; true"
    )
}

struct AgentPod<'a> {
    c: &'a Cluster,
    ns: String,
}

impl AgentPod<'_> {
    fn sh(&self, script: &str) -> (bool, String, String) {
        let out = self
            .c
            .exec(&self.ns, "agent", Some("agent"), &["sh", "-c", script]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `curl` through the sidecar (the environment the webhook set);
    /// returns the HTTP status and the body.
    fn curl(&self, url: &str, extra: &str) -> (u16, String) {
        let (ok, out, err) = self.sh(&format!(
            "curl -sS {extra} -o /tmp/body -w '%{{http_code}}' '{url}'; echo; cat /tmp/body"
        ));
        assert!(ok, "curl {url} failed: {out}{err}");
        let (code, body) = out.split_once('\n').unwrap_or((&out, ""));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_agent_calls_the_api_and_never_holds_the_key() {
    let c = cluster_with_scopehold();
    let _shared = c.shared().await;
    let client = c.client().await;
    let ns = c.namespace(&client, "proxy").await;
    let value = random("sk-node-");
    let rotated = random("sk-rotated-");

    let pki = upstream_pki(c);
    let upstream = upstream(&pki).await;
    let port = upstream.addr.port();
    let (granted, other) = (UPSTREAM_HOSTS[0], UPSTREAM_HOSTS[1]);

    create_service_account(&client, &ns, "bot").await;
    create_secret(&client, &ns, "api", &[("token", &value)]).await;
    create_identity(&client, &ns, "bot", "bot", false).await;
    let key = GrantedKey {
        key: "token".into(),
        proxy: Some(KeyProxy {
            hosts: vec![format!("{granted}:{port}")],
            header: Some(HeaderTemplate {
                name: "Authorization".into(),
                template: "Bearer {value}".into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    create_grant(&client, &ns, "bot-api", "bot", "api", vec![key], |s| {
        s.delivery = DeliveryMode::Proxy
    })
    .await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    wait_for_desc("bot-api Active", WAIT, async || {
        (grants.get("bot-api").await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
    })
    .await;

    // The pod as its author writes it: no sidecar, no proxy settings.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent", "annotations": {"scopehold.dev/inject": "proxy"}},
        "spec": {
            "serviceAccountName": "bot",
            "hostNetwork": true,
            "hostAliases": [{"ip": "127.0.0.1", "hostnames": UPSTREAM_HOSTS}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "agent",
                "image": CURL_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
            }],
        }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // The webhook's caches may trail the grant's status by a moment.
    let created = wait_for_desc("the annotated pod admitted", WAIT, async || {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => Some(p),
            Err(e) if e.to_string().contains("no active SecretGrant") => None,
            Err(e) => panic!("creating the agent pod: {e}"),
        }
    })
    .await;
    let spec = created.spec.as_ref().unwrap();
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_NAME)
        .expect("the webhook added the sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let agent = &spec.containers[0];
    assert!(
        !agent
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == VALUES_VOLUME),
        "the agent container must not mount the values"
    );
    let running = Instant::now();
    loop {
        let p = pods.get("agent").await.unwrap();
        if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            break;
        }
        assert!(
            running.elapsed() < WAIT,
            "agent pod {ns}/agent not Running: {:?}\n{}",
            p.status,
            c.describe_release()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent = AgentPod { c, ns: ns.clone() };

    // 1. The agent's request reaches the upstream with the value added.
    let url = format!("https://{granted}:{port}/v1/models");
    let (code, body) = agent.curl(&url, "");
    assert_eq!(code, 200, "through the sidecar: {body}");
    let seen = upstream.last_seen().expect("the upstream got the request");
    assert_eq!(
        seen.header("authorization"),
        Some(&*format!("Bearer {value}"))
    );
    assert!(!body.contains(&value));

    // 2. An upstream that echoes the header: the agent reads the placeholder.
    let (code, body) = agent.curl(&format!("https://{granted}:{port}/echo"), "");
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(&value), "the echoed value reached the agent");

    // 3. The placeholder sent to a host that is not granted arrives as it
    // was (tunnelled; the agent does not trust the test CA, hence -k).
    let (ok, placeholder, err) = agent.sh(&format!("cat {AGENT_MOUNT}/placeholders/token"));
    assert!(ok, "{err}");
    let placeholder = placeholder.trim().to_string();
    let (code, _) = agent.curl(
        &format!("https://{other}:{port}/elsewhere"),
        &format!("-k -H 'Authorization: Bearer {placeholder}'"),
    );
    assert_eq!(code, 200);
    let seen = upstream.last_seen().unwrap();
    assert_eq!(seen.uri, "/elsewhere");
    assert_eq!(
        seen.header("authorization"),
        Some(&*format!("Bearer {placeholder}"))
    );

    // 4. Nothing the agent container can read holds the value; the same
    // search finds the placeholder (so it does look everywhere).
    let (_, found, _) = agent.sh(&agent_search(&pattern_for(&value)));
    assert_eq!(
        found.trim(),
        "",
        "the value is readable in the agent container"
    );
    let (_, found, _) = agent.sh(&agent_search(&pattern_for(&placeholder)));
    assert!(
        found.contains(&format!("{AGENT_MOUNT}/placeholders/token")),
        "the search does not reach the agent's mounts: {found:?}"
    );
    let (_, env, _) = agent.sh("env");
    assert!(!env.contains(&value));
    assert!(env.contains("HTTPS_PROXY=http://127.0.0.1:"), "{env}");

    // 5. A pod of the pod author's making that names the proxy grant in a
    // volume of its own container (no webhook, no sidecar): kubelet's
    // mount is refused, the container never starts, so never reads it.
    let thief: Pod = serde_json::from_value(json!({
        "metadata": {"name": "thief"},
        "spec": {
            "serviceAccountName": "bot",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "thief",
                "image": AGENT_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "cat /values/token; sleep 3600"],
                "volumeMounts": [{"name": "values", "mountPath": "/values", "readOnly": true}],
            }],
            "volumes": [{"name": "values", "csi": {
                "driver": "csi.scopehold.dev",
                "readOnly": true,
                "volumeAttributes": {"grants": "bot-api"},
            }}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &thief).await.unwrap();
    let refused = Instant::now();
    loop {
        let events = c.events_of(&ns, "thief");
        if events.contains("NotTheProxySidecar") {
            break;
        }
        assert!(
            refused.elapsed() < WAIT,
            "no refused mount for the thief pod: {events}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let phase = pods
        .get("thief")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Pending"));
    let thief_logs = c.kubectl(&["logs", "-n", &ns, "thief"]);
    assert!(!String::from_utf8_lossy(&thief_logs.stdout).contains(&value));

    // 6. Rotation: the next request carries the new value.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": rotated}})),
        )
        .await
        .unwrap();
    let rotation = Instant::now();
    loop {
        let (code, _) = agent.curl(&url, "");
        let seen = upstream.last_seen().unwrap();
        if code == 200 && seen.header("authorization") == Some(&*format!("Bearer {rotated}")) {
            break;
        }
        assert!(
            rotation.elapsed() < WAIT,
            "the rotated value never reached the upstream"
        );
    }
    eprintln!(
        "rotation: injected after {:?} (kubectl exec included)",
        rotation.elapsed()
    );

    // 7. Revocation: the sidecar refuses, naming the grant; nothing is sent.
    grants
        .patch(
            "bot-api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revoked": true}})),
        )
        .await
        .unwrap();
    let revocation = Instant::now();
    let refusal = loop {
        let (code, body) = agent.curl(&url, "");
        if code == 403 {
            break body;
        }
        assert!(
            revocation.elapsed() < WAIT,
            "the revoked grant was still injected"
        );
    };
    eprintln!(
        "revocation: refused after {:?} (kubectl exec included)",
        revocation.elapsed()
    );
    assert!(refusal.contains("bot-api"), "{refusal}");
    let sent_before = upstream.seen().len();
    let (code, _) = agent.curl(&url, "");
    assert_eq!(code, 403, "a refusal must stay a refusal");
    assert_eq!(
        upstream.seen().len(),
        sent_before,
        "a refused request reached the upstream"
    );

    // 8. The sidecar's audit lines name the host, never a value; its usage
    // reports reached the grant's status.
    let logs = c.kubectl_ok(&["logs", "-n", &ns, "agent", "-c", SIDECAR_NAME]);
    let audit: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let granted_at = format!("{granted}:{port}");
    assert!(
        audit.iter().any(|a| a["event"] == "ProxyRequest"
            && a["decision"] == "allowed"
            && a["host"] == granted_at.as_str()
            && a["path"] == "/v1/models"),
        "{logs}"
    );
    // The tunnel carried the request and its answer: an allowed use with
    // its bytes, whatever way the connection closed.
    let other_at = format!("{other}:{port}");
    assert!(
        audit.iter().any(|a| a["event"] == "ProxyTunnel"
            && a["decision"] == "allowed"
            && a["host"] == other_at.as_str()
            && a["responseBytes"].as_u64() > Some(0)),
        "{logs}"
    );
    for secret in [&value, &rotated, &placeholder] {
        assert!(
            !logs.contains(secret.as_str()),
            "the sidecar logged a value"
        );
    }
    let reported = Instant::now();
    let uses = loop {
        let status = grants.get("bot-api").await.unwrap().status;
        if let Some(uses) = status.and_then(|s| s.uses).filter(|u| *u >= 3) {
            break uses;
        }
        if reported.elapsed() > WAIT {
            let logs = c.kubectl_ok(&["logs", "-n", &ns, "agent", "-c", SIDECAR_NAME]);
            panic!(
                "the sidecar's uses never reached the grant's status; sidecar:\n{logs}\n{}",
                c.describe_release()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("grant status uses = {uses}");
    let node_logs = c.component_logs("node") + &c.component_logs("controller");
    for secret in [&value, &rotated] {
        assert!(
            !node_logs.contains(secret.as_str()),
            "a component logged a value"
        );
    }
}

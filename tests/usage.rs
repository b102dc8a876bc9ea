//! Usage of proxy grants against the real API server: the real sidecar
//! reports its uses to the controller with its pod's bound token; the grant's
//! status counts them in batches (`uses`, `lastUsedAt`, `recentUses`), one
//! Event series per grant records them, and `kubectl scopehold usage` and
//! `exposure` answer "where was this key used, and when". A pod cannot count
//! uses of another agent's grant.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod proxy_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, server, test_namespace, wait_for_desc,
};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use scopehold::api::delivery::HeaderTemplate;
use scopehold::api::{DeliveryMode, GrantPhase, GrantedKey, KeyProxy, SecretGrant};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn proxy_key(host: &str) -> GrantedKey {
    GrantedKey {
        key: "api-key".into(),
        proxy: Some(KeyProxy {
            hosts: vec![host.into()],
            header: Some(HeaderTemplate {
                name: "Authorization".into(),
                template: "Bearer {value}".into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn plugin(ns: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-scopehold"))
        .arg("--kubeconfig")
        .arg(&server().kubeconfig)
        .args(["-n", ns])
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// POSTs a report as a sidecar would; returns the HTTP status and body.
async fn post_report(
    url: &str,
    ca_pem: &str,
    token: &str,
    report: serde_json::Value,
) -> (u16, String) {
    let settings = scopehold::proxy::report::ReportSettings {
        url: url.parse().unwrap(),
        ca_pem: ca_pem.into(),
        token_file: {
            let dir = tempfile::tempdir().unwrap().keep();
            let path = dir.join("token");
            std::fs::write(&path, token).unwrap();
            path
        },
        every: Duration::from_secs(1),
    };
    let tls = scopehold::proxy::report::check(&settings).unwrap();
    let report = serde_json::from_value(report).unwrap();
    match scopehold::proxy::report::send(&settings, tls, &report).await {
        Ok(()) => (200, String::new()),
        Err(scopehold::proxy::report::ReportError::Refused { status, message }) => {
            (status.as_u16(), message)
        }
        Err(other) => panic!("report not sent: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_uses_are_counted_in_batches_and_answer_where_and_when() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "usage").await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    let controller = ControllerProcess::start(
        &ns,
        &[
            "--webhook-listen",
            "127.0.0.1:0",
            "--custody-tls-namespace",
            &ns,
            "--custody-tls-san",
            "127.0.0.1",
            // Long enough that a burst of requests is one or two writes.
            "--status-flush-ms",
            "2000",
        ],
    );
    let line = controller
        .wait_for_log(|l| l.contains("webhook_addr"), WAIT)
        .await;
    let addr = common::objects::log_field(&line, "webhook_addr");
    let url = format!("https://{addr}/usage");
    controller
        .wait_for_log(|l| l.contains("caches synced"), WAIT)
        .await;
    let ca = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("scopehold-custody-ca")
        .await
        .unwrap()
        .data
        .unwrap()["ca.crt"]
        .clone();

    // Two agents, each with a proxy grant.
    let pki = proxy_support::test_pki();
    let upstream = proxy_support::upstream(&pki).await;
    let host = format!("localhost:{}", upstream.addr.port());
    for (agent, sa) in [("coder", "coder-sa"), ("eve", "eve-sa")] {
        create_service_account(&client, &ns, sa).await;
        create_identity(&client, &ns, agent, sa, false).await;
        create_secret(
            &client,
            &ns,
            &format!("{agent}-llm"),
            &[("api-key", "usage-test-value")],
        )
        .await;
        create_grant(
            &client,
            &ns,
            &format!("{agent}-key"),
            agent,
            &format!("{agent}-llm"),
            vec![proxy_key(&host)],
            |s| s.delivery = DeliveryMode::Proxy,
        )
        .await;
    }
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    for g in ["coder-key", "eve-key"] {
        wait_for_desc(&format!("{g} Active"), WAIT, async || {
            (grants.get(g).await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
        })
        .await;
    }
    let coder_pod = create_pod(&client, &ns, "coder-0", "coder-sa", &node).await;
    let coder_uid = coder_pod.metadata.uid.clone().unwrap();
    let coder_token = pod_token(
        &client, &ns, "coder-sa", "coder-0", &coder_uid, AUDIENCE, 3600,
    )
    .await;

    // Refusals first, nothing counted by them.
    // Coder's pod names eve's grant: refused whole.
    let entry = |grant: &str| {
        json!({"uses": [{"grant": grant, "host": host, "count": 1000,
            "firstAt": "2026-01-01T00:00:00Z", "lastAt": "2026-01-01T00:00:01Z"}]})
    };
    let (status, body) = post_report(&url, &ca, &coder_token, entry("eve-key")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not a proxy grant of agent coder"), "{body}");
    // The same grant name with a token for another audience.
    let wrong_audience =
        pod_token(&client, &ns, "coder-sa", "coder-0", &coder_uid, "api", 3600).await;
    let (status, _) = post_report(&url, &ca, &wrong_audience, entry("coder-key")).await;
    assert_eq!(status, 401);
    // A token of the ServiceAccount bound to no pod.
    let unbound = common::objects::unbound_token(&client, &ns, "coder-sa").await;
    let (status, body) = post_report(&url, &ca, &unbound, entry("coder-key")).await;
    assert_eq!(status, 403, "{body}");
    // A count beyond reason.
    let mut huge = entry("coder-key");
    huge["uses"][0]["count"] = json!(u64::MAX);
    let (status, _) = post_report(&url, &ca, &coder_token, huge).await;
    assert_eq!(status, 400);

    // The real sidecar, reporting with coder's pod token.
    let tmp = tempfile::tempdir().unwrap();
    let (values, agent_dir, cwd) = (
        tmp.path().join("values"),
        tmp.path().join("agent"),
        tmp.path().join("cwd"),
    );
    for d in [&values, &agent_dir, &cwd] {
        std::fs::create_dir_all(d).unwrap();
    }
    proxy_support::put_value(&values, "api-key", "usage-test-value");
    let upstream_ca = tmp.path().join("upstream-ca.crt");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &coder_token).unwrap();
    let rules = json!({
        "namespace": ns, "agent": "coder",
        "grants": [{"grant": "coder-key", "secret": "coder-llm", "keys": [{"key": "api-key", "file": "api-key",
            "proxy": {"hosts": [host], "header": {"name": "Authorization", "template": "Bearer {value}"}}}]}],
    });
    let sidecar = proxy_support::Sidecar::start_with(
        Path::new(env!("CARGO_BIN_EXE_scopehold")),
        &values,
        &agent_dir,
        &cwd,
        &rules,
        &upstream_ca,
        &[
            "--usage-url",
            &url,
            &format!("--usage-ca={ca}"),
            "--token-file",
            token_file.to_str().unwrap(),
            "--report-ms",
            "300",
        ],
    );
    let bundle = tmp.path().join("trust.crt");
    std::fs::write(
        &bundle,
        std::fs::read_to_string(agent_dir.join("ca-bundle.crt")).unwrap() + &pki.ca_pem,
    )
    .unwrap();

    // Count the status writes while the requests run.
    let watch = tokio::spawn({
        let grants = grants.clone();
        async move {
            let mut seen = Vec::new();
            let stream = watcher(
                grants,
                watcher::Config::default().fields("metadata.name=coder-key"),
            )
            .applied_objects();
            futures::pin_mut!(stream);
            while let Some(Ok(g)) = stream.next().await {
                let uses = g.status.and_then(|s| s.uses);
                if seen.last() != Some(&uses) {
                    seen.push(uses);
                }
                if uses == Some(20) {
                    break;
                }
            }
            seen
        }
    });
    let proxy_url = format!("http://{}", sidecar.addr);
    for _ in 0..20 {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .arg(format!("https://{host}/v1/models"))
            .env("https_proxy", &proxy_url)
            .env("CURL_CA_BUNDLE", &bundle)
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.header("authorization") == Some("Bearer usage-test-value"))
    );
    let versions = tokio::time::timeout(WAIT, watch)
        .await
        .expect("uses reach 20")
        .unwrap();
    // Batches: 20 requests became a few status writes, never one each.
    let writes = versions.iter().filter(|u| u.is_some()).count();
    eprintln!("status writes for 20 requests: {writes} ({versions:?})");
    assert!(writes < 20, "one write per request: {versions:?}");
    let g = grants.get("coder-key").await.unwrap();
    let status = g.status.unwrap();
    assert_eq!(status.uses, Some(20));
    assert!(status.last_used_at.is_some());
    assert_eq!(status.recent_uses.len(), 1);
    let place = &status.recent_uses[0];
    assert_eq!(
        (place.pod.as_str(), place.host.as_str(), place.count),
        ("coder-0", host.as_str(), 20),
        "the pod comes from the token, the host from the request"
    );
    // Eve's grant: untouched by the refused report.
    let eve = grants.get("eve-key").await.unwrap().status.unwrap();
    assert_eq!(eve.uses, None);

    // One Event series for the grant.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let used = wait_for_desc("a ProxyUsed Event", WAIT, async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        let used: Vec<Event> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("ProxyUsed"))
            .collect();
        (!used.is_empty()).then_some(used)
    })
    .await;
    assert_eq!(used.len(), 1, "one series per grant");
    assert_eq!(
        used[0].regarding.as_ref().unwrap().name.as_deref(),
        Some("coder-key")
    );

    // The incident questions.
    let text = plugin(&ns, &["usage", "coder-key"]);
    assert!(text.contains("coder-0") && text.contains(&host), "{text}");
    let text = plugin(&ns, &["usage", "coder", "--since", "1h"]);
    assert!(text.contains("coder-key") && text.contains("20"), "{text}");
    let doc: serde_json::Value =
        serde_json::from_str(&plugin(&ns, &["exposure", "coder-llm", "-o", "json"])).unwrap();
    assert_eq!(doc["grants"][0]["uses"], 20, "{doc}");
    assert_eq!(doc["grants"][0]["used"][0]["pod"], "coder-0", "{doc}");
    let everything = format!(
        "{}{}",
        controller.logs(),
        serde_json::to_string(&grants.list(&ListParams::default()).await.unwrap()).unwrap()
    );
    assert!(!everything.contains("usage-test-value"));
    assert!(!everything.contains(&coder_token));
    drop(sidecar);
}

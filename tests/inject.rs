//! `kubectl scopehold inject`: the pod change of delivery mode `proxy`,
//! rendered from the agent's live grants on a real API server, and accepted
//! by that API server's own Pod validation (native sidecar and all).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret};
use common::{
    ControllerProcess, client, create_service_account, install_crds, kubectl, server,
    test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use scopehold::api::delivery::HeaderTemplate;
use scopehold::api::{AgentIdentity, DeliveryMode, GrantPhase, GrantedKey, KeyProxy, SecretGrant};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-scopehold");

fn inject(ns: &str, manifest: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, manifest).unwrap();
    let out = Command::new(BIN)
        .arg("--kubeconfig")
        .arg(&server().kubeconfig)
        .args(["-n", ns, "inject", "-f"])
        .arg(&file)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn pod_manifest(sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: coder\n  annotations:\n    scopehold.dev/inject: proxy\nspec:\n  serviceAccountName: {sa}\n  containers:\n  - name: agent\n    image: agent:latest\n"
    )
}

#[tokio::test]
async fn inject_adds_the_sidecar_from_the_agents_live_proxy_grants() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "inject").await;
    let controller = ControllerProcess::start(&ns, &[]);
    create_service_account(&client, &ns, "coder-sa").await;
    create_secret(&client, &ns, "llm", &[("api-key", "inject-never-printed")]).await;
    create_identity(&client, &ns, "coder", "coder-sa", false).await;
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .patch(
            "coder",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"egressAllowList": ["pypi.org", "*.github.com"]}})),
        )
        .await
        .unwrap();

    // No proxy grant yet: a clear refusal, nothing printed.
    let (ok, stdout, stderr) = inject(&ns, &pod_manifest("coder-sa"));
    assert!(!ok && stdout.is_empty(), "{stdout}{stderr}");
    assert!(
        stderr.contains("no active SecretGrant with delivery: proxy"),
        "{stderr}"
    );
    // A ServiceAccount no identity claims.
    let (ok, _, stderr) = inject(&ns, &pod_manifest("nobody"));
    assert!(
        !ok && stderr.contains("claims ServiceAccount \"nobody\""),
        "{stderr}"
    );

    let key = GrantedKey {
        key: "api-key".into(),
        proxy: Some(KeyProxy {
            hosts: vec!["api.openai.com".into()],
            header: Some(HeaderTemplate {
                name: "Authorization".into(),
                template: "Bearer {value}".into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    create_grant(&client, &ns, "openai", "coder", "llm", vec![key], |s| {
        s.delivery = DeliveryMode::Proxy
    })
    .await;
    // A file grant of the same agent is not the sidecar's business.
    create_grant(
        &client,
        &ns,
        "files",
        "coder",
        "llm",
        vec![common::objects::key("api-key")],
        |_| {},
    )
    .await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    wait_for_desc("openai Active", Duration::from_secs(30), async || {
        (grants.get("openai").await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
    })
    .await;

    let (ok, stdout, stderr) = inject(&ns, &pod_manifest("coder-sa"));
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("inject-never-printed"));
    let pod: Pod = serde_yaml::from_str(&stdout).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.name, "scopehold-proxy");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let rules = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "SCOPEHOLD_PROXY_RULES")
        .and_then(|e| e.value.clone())
        .unwrap();
    let rules = scopehold::proxy::ProxyRules::parse(&rules).unwrap();
    assert_eq!(rules.agent, "coder");
    assert_eq!(rules.grants.len(), 1);
    assert_eq!(rules.grants[0].grant, "openai");
    assert_eq!(
        rules.egress_allow_list,
        Some(vec!["pypi.org".to_string(), "*.github.com".to_string()])
    );
    let agent = &spec.containers[0];
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name == "scopehold-proxy-agent"),
        "the agent mounts the values volume"
    );

    // The API server's own Pod validation accepts the result.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("injected.yaml");
    std::fs::write(&file, &stdout).unwrap();
    let out = kubectl(&[
        "apply",
        "--dry-run=server",
        "-n",
        &ns,
        "-f",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Injecting the injected pod changes nothing.
    let (ok, again, _) = inject(&ns, &stdout);
    assert!(ok);
    assert_eq!(serde_yaml::from_str::<Pod>(&again).unwrap(), pod);
    drop(controller);
}

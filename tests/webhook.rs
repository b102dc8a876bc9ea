//! The proxy-sidecar admission webhook against the real API server: the
//! controller serves it on loopback with custody's certificate and sets the
//! caBundle; the API server calls it for annotated pods only; the result is
//! the same pod `kubectl scopehold inject` prints; with the webhook down,
//! annotated pods are refused and every other pod is admitted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret};
use common::{
    ControllerProcess, client, create_service_account, install_crds, server, test_namespace,
    wait_for_desc,
};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use scopehold::api::delivery::HeaderTemplate;
use scopehold::api::{DeliveryMode, GrantPhase, GrantedKey, KeyProxy, SecretGrant};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const IMAGE: &str = "example.test/scopehold:webhook-test";
const VALUE: &str = "webhook-value-never-in-a-pod";
const USAGE_URL: &str = "https://scopehold-custody.scopehold-system.svc:9444/usage";

/// The chart's webhook, pointed at the controller on loopback and limited to
/// one test namespace (other tests' pods never reach it).
fn configuration(name: &str, ns: &str, port: u16) -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "proxy-injector.scopehold.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{}", scopehold::webhook::MUTATE_PATH)},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "matchConditions": [{"name": "asks-for-the-proxy-sidecar", "expression": scopehold::webhook::MATCH_CONDITION}],
        }]
    }))
    .unwrap()
}

fn pod(name: &str, annotated: bool) -> Pod {
    let annotations = if annotated {
        json!({"scopehold.dev/inject": "proxy"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "serviceAccountName": "coder-sa",
            // No token volume: its random name would differ between pods.
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "agent",
                "image": "agent:latest",
                "env": [{"name": "HTTPS_PROXY", "value": "http://elsewhere:3128"}, {"name": "KEEP", "value": "1"}]
            }]
        }
    }))
    .unwrap()
}

/// `kubectl scopehold inject` on the same pod, with the same sidecar
/// settings as the controller's flags.
/// One CA certificate of a fixed run (what an operator's internal CA is).
fn upstream_ca_pem() -> &'static str {
    static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PEM.get_or_init(|| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    })
}

fn cli_inject(ns: &str, pod: &Pod, ca_pem: &str) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca_file = dir.path().join("upstream-ca.crt");
    std::fs::write(&upstream_ca_file, upstream_ca_pem()).unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, serde_yaml::to_string(pod).unwrap()).unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, ca_pem).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-scopehold"))
        .arg("--kubeconfig")
        .arg(&server().kubeconfig)
        .args([
            "-n",
            ns,
            "inject",
            "--image",
            IMAGE,
            "--usage-url",
            USAGE_URL,
        ])
        .arg("--usage-ca-file")
        .arg(&ca)
        .arg("--upstream-ca-file")
        .arg(&upstream_ca_file)
        .arg("-f")
        .arg(&file)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn annotated_pods_get_the_sidecar_others_pass_and_a_down_webhook_fails_closed() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "webhook").await;
    let config_name = format!("{ns}-proxy-injector");
    // The operator's upstream CA: the injected sidecar carries it, and the
    // CLI given the same file prints the same pod.
    let upstream_ca_dir = tempfile::tempdir().unwrap();
    let upstream_ca = upstream_ca_dir.path().join("upstream-ca.crt");
    std::fs::write(&upstream_ca, upstream_ca_pem()).unwrap();
    let upstream_ca_arg = upstream_ca.display().to_string();
    let controller = ControllerProcess::start(
        &ns,
        &[
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-configuration",
            &config_name,
            "--proxy-image",
            IMAGE,
            "--proxy-usage-url",
            USAGE_URL,
            "--proxy-upstream-ca-file",
            &upstream_ca_arg,
            "--custody-tls-namespace",
            &ns,
            "--custody-tls-san",
            "127.0.0.1",
        ],
    );
    let line = controller
        .wait_for_log(|l| l.contains("webhook_addr"), WAIT)
        .await;
    let addr: std::net::SocketAddr = common::objects::log_field(&line, "webhook_addr")
        .parse()
        .unwrap();
    controller
        .wait_for_log(|l| l.contains("caches synced"), WAIT)
        .await;

    // Registered like the chart does: no caBundle; the controller sets it.
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .create(
            &PostParams::default(),
            &configuration(&config_name, &ns, addr.port()),
        )
        .await
        .unwrap();
    let ca = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("scopehold-custody-ca")
        .await
        .unwrap()
        .data
        .unwrap()["ca.crt"]
        .clone();
    wait_for_desc("the caBundle set to the custody CA", WAIT, async || {
        let c = configs.get(&config_name).await.ok()?;
        let bundle = c.webhooks?[0].client_config.ca_bundle.clone()?;
        (bundle.0 == ca.as_bytes()).then_some(())
    })
    .await;

    create_service_account(&client, &ns, "coder-sa").await;
    create_secret(&client, &ns, "llm", &[("api-key", VALUE)]).await;
    create_identity(&client, &ns, "coder", "coder-sa", false).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // Asks, but the agent has no proxy grant: refused with the reason.
    let err = pods
        .create(&PostParams::default(), &pod("too-early", true))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no active SecretGrant with delivery: proxy"),
        "{err}"
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
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    wait_for_desc("openai Active", WAIT, async || {
        (grants.get("openai").await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
    })
    .await;

    // The webhook's caches may trail the status by a moment: retry while
    // the refusal is the "no grant yet" one.
    let injected = wait_for_desc("the annotated pod admitted", WAIT, async || {
        match pods
            .create(&PostParams::default(), &pod("coder", true))
            .await
        {
            Ok(p) => Some(p),
            Err(e) if e.to_string().contains("no active SecretGrant") => None,
            Err(e) => panic!("annotated pod refused: {e}"),
        }
    })
    .await;
    let spec = injected.spec.as_ref().unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.name, "scopehold-proxy");
    assert_eq!(sidecar.image.as_deref(), Some(IMAGE));
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let upstream_ca_env = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "SCOPEHOLD_PROXY_UPSTREAM_CA_PEM")
        .and_then(|e| e.value.as_deref());
    assert_eq!(upstream_ca_env, Some(upstream_ca_pem()));
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        [
            "scopehold-proxy-values",
            "scopehold-proxy-agent",
            "scopehold-proxy-token"
        ]
    );
    let agent = &spec.containers[0];
    let env = |name: &str| {
        agent
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == name)
            .map(|e| e.value.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(env("HTTPS_PROXY"), ["http://127.0.0.1:15001"]);
    assert_eq!(env("KEEP"), ["1"], "the pod's own variables stay");
    assert_eq!(env("SSL_CERT_FILE"), ["/var/run/scopehold/ca-bundle.crt"]);
    let mounts: Vec<_> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(
        mounts,
        ["scopehold-proxy-agent"],
        "the agent never mounts the values"
    );
    assert!(!serde_json::to_string(&injected).unwrap().contains(VALUE));

    // One code path: `kubectl scopehold inject` gives the same pod. Its output
    // goes through the same API server defaulting (a dry run under another
    // name; the webhook leaves an injected pod alone).
    let mut printed = cli_inject(&ns, &pod("coder", true), &ca);
    printed.metadata.name = Some("coder-cli".into());
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &printed,
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&dry.spec).unwrap(),
        serde_json::to_value(&injected.spec).unwrap(),
        "webhook and kubectl scopehold inject differ"
    );
    assert_eq!(dry.metadata.annotations, injected.metadata.annotations);

    // A pod that does not ask is untouched.
    let plain = pods
        .create(&PostParams::default(), &pod("plain", false))
        .await
        .unwrap();
    let plain_spec = plain.spec.as_ref().unwrap();
    assert!(plain_spec.init_containers.is_none());
    assert!(plain_spec.volumes.is_none());
    assert!(
        !plain
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("scopehold.dev/injected")
    );

    // Webhook down: annotated pods are refused, others admitted.
    drop(controller.kill());
    let err = pods
        .create(&PostParams::default(), &pod("while-down", true))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy-injector.scopehold.dev"), "{err}");
    pods.create(&PostParams::default(), &pod("plain-while-down", false))
        .await
        .unwrap();
    configs
        .delete(&config_name, &DeleteParams::default())
        .await
        .unwrap();
}

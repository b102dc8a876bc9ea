//! Proves that the test harness is the real thing: a kube-apiserver v1.36.3 with RBAC
//! enforced and real bound ServiceAccount tokens, which the custody service's
//! security rests on. If one of these fails, no other integration test means much.

// The crate denies these lints for every target; tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{
    AUDIENCE, client, client_as, create_node, create_pod, create_service_account, pod_token,
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

#[tokio::test]
async fn version_is_v1_36_3() {
    let info = client().await.apiserver_version().await.unwrap();
    assert_eq!(info.git_version, "v1.36.3", "{info:?}");
    assert_eq!((info.major.as_str(), info.minor.as_str()), ("1", "36"));
}

#[tokio::test]
async fn rbac_is_enforced_for_plain_users() {
    let admin = client().await;
    let ns = common::test_namespace(&admin, "harness-rbac").await;

    let alice_secrets = Api::<Secret>::namespaced(client_as("alice").await, &ns);
    match alice_secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("alice must be forbidden to list Secrets before a binding: {other:?}"),
    }

    let role = Role {
        metadata: named("secret-reader"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: named("alice-reads-secrets"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "secret-reader".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: "alice".into(),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    // The RBAC authorizer reads bindings from an informer: allow it to catch up.
    common::wait_for_desc(
        "alice allowed to list Secrets",
        Duration::from_secs(10),
        async || alice_secrets.list(&ListParams::default()).await.ok(),
    )
    .await;

    // The binding names alice only.
    let bob_secrets = Api::<Secret>::namespaced(client_as("bob").await, &ns);
    match bob_secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("bob must stay forbidden: {other:?}"),
    }
}

#[tokio::test]
async fn bound_pod_token_passes_token_review_with_pod_and_node_extras() {
    let admin = client().await;
    let ns = common::test_namespace(&admin, "harness-token").await;
    create_service_account(&admin, &ns, "agent").await;
    // Nodes are cluster-scoped: name it after the namespace so parallel tests differ.
    let node = create_node(&admin, &format!("node-{ns}")).await;
    let node_name = node.metadata.name.clone().unwrap();
    let pod = create_pod(&admin, &ns, "agent-0", "agent", &node_name).await;
    let pod_uid = pod.metadata.uid.clone().unwrap();

    let token = pod_token(&admin, &ns, "agent", "agent-0", &pod_uid, AUDIENCE, 600).await;
    let status = review(&admin, &token, AUDIENCE).await;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.audiences.as_deref(),
        Some(&[AUDIENCE.to_string()][..])
    );
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:agent").as_str())
    );
    let extra = user.extra.unwrap_or_default();
    println!("TokenReview extras of a Pod-bound token: {extra:#?}");
    let get = |k: &str| {
        extra
            .get(&format!("authentication.kubernetes.io/{k}"))
            .cloned()
    };
    assert_eq!(get("pod-name"), Some(vec!["agent-0".to_string()]));
    assert_eq!(get("pod-uid"), Some(vec![pod_uid]));
    assert_eq!(get("node-name"), Some(vec![node_name]));
    assert_eq!(get("node-uid"), Some(vec![node.metadata.uid.unwrap()]));
}

#[tokio::test]
async fn token_for_another_audience_fails_token_review() {
    let admin = client().await;
    let ns = common::test_namespace(&admin, "harness-audience").await;
    let pod = create_pod(&admin, &ns, "agent-0", "default", "node-unknown").await;
    let pod_uid = pod.metadata.uid.unwrap();

    let token = pod_token(
        &admin,
        &ns,
        "default",
        "agent-0",
        &pod_uid,
        "other.example",
        600,
    )
    .await;
    let status = review(&admin, &token, AUDIENCE).await;
    assert_ne!(status.authenticated, Some(true), "{status:?}");
    assert!(
        status.user.is_none_or(|u| u.username.is_none()),
        "no user for a rejected token"
    );
    println!("TokenReview error for a wrong audience: {:?}", status.error);
    // The same token is fine for its own audience, so the rejection above is the audience.
    assert_eq!(
        review(&admin, &token, "other.example").await.authenticated,
        Some(true)
    );
}

#[tokio::test]
async fn token_dies_with_its_pod() {
    let admin = client().await;
    let ns = common::test_namespace(&admin, "harness-podgone").await;
    let pod = create_pod(&admin, &ns, "agent-0", "default", "node-unknown").await;
    let token = pod_token(
        &admin,
        &ns,
        "default",
        "agent-0",
        &pod.metadata.uid.unwrap(),
        AUDIENCE,
        600,
    )
    .await;
    assert_eq!(
        review(&admin, &token, AUDIENCE).await.authenticated,
        Some(true)
    );

    // Grace period 0: no kubelet would ever confirm a graceful termination.
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .delete("agent-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    // TokenReview answers from kube-apiserver's authentication cache for up to 10 s
    // after a success (a fixed default, no flag), so a deleted pod's token keeps
    // passing that long: custody must check the pod itself to react faster.
    common::wait_for_desc(
        "token rejected after pod deletion",
        Duration::from_secs(20),
        async || (review(&admin, &token, AUDIENCE).await.authenticated != Some(true)).then_some(()),
    )
    .await;

    // A new pod of the same name has a new UID: the old token stays dead.
    create_pod(&admin, &ns, "agent-0", "default", "node-unknown").await;
    assert_ne!(
        review(&admin, &token, AUDIENCE).await.authenticated,
        Some(true)
    );
}

#[tokio::test]
async fn install_crds_establishes_and_is_idempotent() {
    let admin = client().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("widgets.yaml"), WIDGET_CRD).unwrap();
    // Twice at once, then again: concurrent tests do exactly this with crds/.
    tokio::join!(
        common::install_crds_from(&admin, dir.path()),
        common::install_crds_from(&admin, dir.path())
    );
    common::install_crds_from(&admin, dir.path()).await;
    let crd = Api::<CustomResourceDefinition>::all(admin)
        .get("widgets.harness.scopehold.dev")
        .await
        .unwrap();
    assert_eq!(
        crd.metadata.generation,
        Some(1),
        "re-applying changed nothing"
    );

    let out = common::kubectl(&["get", "widgets.harness.scopehold.dev", "-A", "-o", "name"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn project_crds_install_and_are_served() {
    // The real API server compiles the schemas' CEL rules on create: a bad rule
    // fails here, not at `kubectl apply` time on a user's cluster.
    common::install_crds(&client().await).await;
    let out = common::kubectl(&["api-resources", "--api-group=scopehold.dev", "-o", "name"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "agentidentities.scopehold.dev",
        "secretgrants.scopehold.dev",
    ] {
        assert!(
            served.lines().any(|l| l == kind),
            "{kind} not served: {served}"
        );
    }
}

#[tokio::test]
async fn controller_process_starts_logs_json_and_stops() {
    let admin = client().await;
    common::install_crds(&admin).await;
    let ns = common::test_namespace(&admin, "harness-controller").await;
    let controller = common::ControllerProcess::start(&ns, &[]);
    let line = controller
        .wait_for_log(|l| l.contains("metrics_addr"), Duration::from_secs(30))
        .await;
    let line: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    println!("controller start line: {line}");
    assert!(
        controller.try_exit_status().is_none(),
        "controller exited early"
    );
    assert!(
        controller
            .audit_lines()
            .iter()
            .all(|l| l["target"] == "audit")
    );
    let pid = controller.pid();
    controller.stop();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "controller still running after stop()"
    );
}

#[test]
fn kubectl_talks_to_the_test_server() {
    let out = common::kubectl(&["auth", "can-i", "--list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = common::kubectl(&["get", "--raw", "/readyz"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

async fn review(client: &Client, token: &str, audience: &str) -> TokenReviewStatus {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

fn named(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// A throwaway CRD with a status subresource, two documents (one empty) in one file.
const WIDGET_CRD: &str = r#"
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.scopehold.dev
spec:
  group: harness.scopehold.dev
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, properties: {size: {type: integer}}}
---
"#;

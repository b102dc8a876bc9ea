//! A stored SecretGrant that does not deserialize into the Rust type (possible
//! when it was written under an older or looser schema) must not stop the
//! controller: it is logged and skipped, and every other grant is reconciled.
//!
//! This binary has its own API server because it temporarily replaces the
//! cluster-scoped SecretGrant CRD with a permissive variant to store the bad
//! object. Keep it to this one test: others would see the loose schema.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    ControllerProcess, FIELD_MANAGER, client, install_crds, test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use scopehold::api::conditions::find_ready;
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const BAD: &str = "malformed-keys";

/// The real SecretGrant CRD with `spec` loosened to "any object".
fn permissive_grant_crd() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/secretgrants.scopehold.dev.yaml");
    let text = std::fs::read_to_string(&path).expect("read SecretGrant CRD");
    let mut crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
    let versions = crd["spec"]["versions"].as_array_mut().expect("versions");
    assert_eq!(versions.len(), 1, "update this test for multiple versions");
    let schema = &mut versions[0]["schema"]["openAPIV3Schema"];
    assert!(schema["properties"]["spec"].is_object(), "spec schema");
    schema["properties"]["spec"] = json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    });
    assert_eq!(versions[0]["subresources"], json!({ "status": {} }));
    crd
}

fn bad_grant(name: &str) -> DynamicObject {
    let ar = ApiResource::erase::<SecretGrant>(&());
    serde_json::from_value(json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": { "name": name },
        "spec": { "agent": "bot", "secretName": "creds", "keys": "not-a-list" },
    }))
    .expect("DynamicObject")
}

fn dynamic_grants(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<SecretGrant>(&()))
}

#[tokio::test]
async fn a_malformed_stored_grant_is_skipped_and_the_rest_reconciled() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "malformed").await;
    let dynamic = dynamic_grants(&client, &ns);

    // 1. Loosen the schema (same field manager as install_crds, so the fields it
    //    leaves out are removed rather than kept for another manager).
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "secretgrants.scopehold.dev",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(permissive_grant_crd()),
    )
    .await
    .expect("apply permissive CRD");

    // 2. Store the bad object; the API server picks up the new schema shortly.
    wait_for_desc(
        "the permissive schema to accept the bad grant",
        WAIT,
        async || match dynamic
            .create(&PostParams::default(), &bad_grant(BAD))
            .await
        {
            Ok(_) => Some(()),
            Err(kube::Error::Api(s)) if s.code == 422 => None,
            Err(e) => panic!("creating the bad grant: {e}"),
        },
    )
    .await;

    // 3. Restore the real CRD and wait until it is enforced again.
    install_crds(&client).await;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for_desc(
        "the real schema to refuse the bad grant again",
        WAIT,
        async || match dynamic.create(&dry_run, &bad_grant("probe")).await {
            Err(kube::Error::Api(s)) if s.code == 422 => Some(()),
            Ok(_) => None,
            Err(e) => panic!("dry-run create: {e}"),
        },
    )
    .await;
    let stored = dynamic.get(BAD).await.expect("bad grant is still stored");
    assert_eq!(stored.data["spec"]["keys"], "not-a-list");
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    assert!(
        grants.get(BAD).await.is_err(),
        "the stored grant should not deserialize into SecretGrant"
    );

    // 4. Valid objects next to it.
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".into()),
            ..Default::default()
        },
        string_data: Some([("api".to_owned(), "malformed-test-value".to_owned())].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
    let identity = AgentIdentity::new(
        "bot",
        AgentIdentitySpec {
            service_account_name: "bot-sa".into(),
            ..Default::default()
        },
    );
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &identity)
        .await
        .expect("create AgentIdentity");
    let grant = |name: &str| {
        SecretGrant::new(
            name,
            SecretGrantSpec {
                agent: "bot".into(),
                secret_name: "creds".into(),
                keys: vec![GrantedKey {
                    key: "api".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    };
    grants
        .create(&PostParams::default(), &grant("good"))
        .await
        .expect("create good grant");

    // 5. The controller lists both, skips the bad one and reconciles the rest.
    let controller = ControllerProcess::start(&ns, &[]);
    let await_active = async |name: &str| {
        wait_for_desc(&format!("grant {name} Active"), WAIT, async || {
            let g = grants.get(name).await.ok()?;
            let status = g.status?;
            let ready = find_ready(&status.conditions)?;
            (status.phase == Some(GrantPhase::Active) && ready.status == "True").then_some(())
        })
        .await
    };
    await_active("good").await;

    let line = controller
        .wait_for_log(
            |l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| {
                    v["message"] == "skipping malformed object"
                        && v["name"] == BAD
                        && v["namespace"] == ns.as_str()
                        && v["kind"] == "SecretGrant"
                })
            },
            WAIT,
        )
        .await;
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["level"], "WARN", "{line}");
    assert!(
        line["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the log line should say why: {line}"
    );

    // The watch keeps running: a grant created now is reconciled too.
    grants
        .create(&PostParams::default(), &grant("later"))
        .await
        .expect("create later grant");
    await_active("later").await;
    wait_for_desc("identity counts both good grants", WAIT, async || {
        let i = Api::<AgentIdentity>::namespaced(client.clone(), &ns)
            .get("bot")
            .await
            .ok()?;
        (i.status?.active_grants == 2).then_some(())
    })
    .await;

    assert!(
        controller.try_exit_status().is_none(),
        "controller exited:\n{}",
        controller.logs()
    );
    let bad = dynamic.get(BAD).await.expect("bad grant");
    assert!(
        bad.data.get("status").is_none(),
        "the controller wrote a status to an object it cannot read: {}",
        bad.data
    );
    let logs = controller.stop();
    assert!(
        !logs.contains("malformed-test-value"),
        "a secret value reached the log"
    );
}

//! The API server itself refuses malformed SecretGrants and AgentIdentities, with
//! a message that names the field and the rule, whether the object comes from
//! `kubectl apply -f` or from kube-rs. Valid objects near the same edges are
//! accepted (so every refusal below is the rule's doing, not a broken fixture),
//! and the shipped `crds/` and `examples/` apply cleanly with kubectl.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{client, install_crds, kubectl, test_namespace, wait_for_desc};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::{AgentIdentity, SecretGrant};
use serde_json::{Value, json};

/// A SecretGrant the schema accepts; each case below breaks exactly one thing.
fn valid_grant(name: &str) -> Value {
    json!({
        "apiVersion": "scopehold.dev/v1alpha1",
        "kind": "SecretGrant",
        "metadata": { "name": name },
        "spec": {
            "agent": "bot",
            "secretName": "creds",
            "keys": [{ "key": "api" }],
            "reason": "validation test",
        },
    })
}

/// A `delivery: proxy` grant the schema accepts.
fn valid_proxy_grant(name: &str) -> Value {
    let mut o = valid_grant(name);
    o["spec"]["delivery"] = json!("proxy");
    o["spec"]["keys"][0]["proxy"] = json!({
        "hosts": ["api.openai.com", "*.example.com:8443"],
        "header": {"name": "Authorization", "template": "Bearer {value}"},
    });
    o
}

fn valid_identity(name: &str) -> Value {
    json!({
        "apiVersion": "scopehold.dev/v1alpha1",
        "kind": "AgentIdentity",
        "metadata": { "name": name },
        "spec": { "serviceAccountName": "bot-sa", "maxGrantTTL": "8h" },
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Grant,
    Identity,
}

/// One malformed object: how to break a valid one, and what the API server
/// must say about it (the offending field and the rule's message).
struct Case {
    what: &'static str,
    kind: Kind,
    edit: Edit,
    field: &'static str,
    message: &'static str,
}

const FILE_NAME_RULE: &str =
    "must be a single file name: not '.' or '..', not starting with '..' (reserved)";

fn cases() -> Vec<Case> {
    vec![
        Case {
            what: "ttl and expiresAt together",
            kind: Kind::Grant,
            edit: |o| {
                o["spec"]["ttl"] = json!("1h");
                o["spec"]["expiresAt"] = json!("2030-01-01T00:00:00Z");
            },
            field: "spec:",
            message: "set at most one of ttl and expiresAt",
        },
        Case {
            what: "path ../x",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["path"] = json!("../x"),
            field: "spec.keys[0].path",
            message: r"should match '^[^/\x00]+$'",
        },
        Case {
            what: "path a/b",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["path"] = json!("a/b"),
            field: "spec.keys[0].path",
            message: r"should match '^[^/\x00]+$'",
        },
        Case {
            what: "path ..data",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["path"] = json!("..data"),
            field: "spec.keys[0].path",
            message: FILE_NAME_RULE,
        },
        Case {
            what: "path .",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["path"] = json!("."),
            field: "spec.keys[0].path",
            message: FILE_NAME_RULE,
        },
        Case {
            what: "key ..data (a key is also the default file name)",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["key"] = json!("..data"),
            field: "spec.keys[0].key",
            message: FILE_NAME_RULE,
        },
        Case {
            what: "empty keys list",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"] = json!([]),
            field: "spec.keys",
            message: "should have at least 1 items",
        },
        Case {
            what: "key name with a space",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["key"] = json!("api key"),
            field: "spec.keys[0].key",
            message: "should match '^[-._a-zA-Z0-9]+$'",
        },
        Case {
            what: "mode 1000 (above 0777)",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["mode"] = json!(1000),
            field: "spec.keys[0].mode",
            message: "should be less than or equal to 511",
        },
        Case {
            what: "mode -1",
            kind: Kind::Grant,
            edit: |o| o["spec"]["keys"][0]["mode"] = json!(-1),
            field: "spec.keys[0].mode",
            message: "should be greater than or equal to 0",
        },
        Case {
            what: "ttl '3 days'",
            kind: Kind::Grant,
            edit: |o| o["spec"]["ttl"] = json!("3 days"),
            field: "spec.ttl",
            message: "should match '^([0-9]{1,9}[hms])+$'",
        },
        Case {
            what: "proxy grant whose key has no proxy settings",
            kind: Kind::Grant,
            edit: |o| o["spec"]["delivery"] = json!("proxy"),
            field: "spec:",
            message: "delivery: proxy needs keys[].proxy (hosts and an injection) on every key",
        },
        Case {
            what: "proxy grant without hosts",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["keys"][0]["proxy"]["hosts"] = json!([]);
            },
            field: "spec.keys[0].proxy.hosts",
            message: "a proxied key needs at least one host",
        },
        Case {
            what: "proxy template that does not use the value",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["keys"][0]["proxy"]["header"]["template"] = json!("Bearer token");
            },
            field: "spec.keys[0].proxy.header.template",
            message: "template must contain {value}",
        },
        Case {
            what: "proxy key with two injections",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["keys"][0]["proxy"]["replacePlaceholder"] = json!(true);
            },
            field: "spec.keys[0].proxy",
            message: "set exactly one injection: header, basicAuth or replacePlaceholder: true",
        },
        Case {
            what: "proxy key with no injection",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["keys"][0]["proxy"] = json!({"hosts": ["api.openai.com"]});
            },
            field: "spec.keys[0].proxy",
            message: "set exactly one injection: header, basicAuth or replacePlaceholder: true",
        },
        Case {
            what: "proxy host given as a URL",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["keys"][0]["proxy"]["hosts"] = json!(["https://api.openai.com"]);
            },
            field: "spec.keys[0].proxy.hosts[0]",
            message: "should match",
        },
        Case {
            what: "proxy template setting the Host header",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["keys"][0]["proxy"]["header"]["name"] = json!("Host");
            },
            field: "spec.keys[0].proxy.header.name",
            message: "the proxy cannot set this header",
        },
        Case {
            what: "proxy settings on a file grant",
            kind: Kind::Grant,
            edit: |o| {
                *o = valid_proxy_grant("x");
                o["spec"]["delivery"] = json!("file");
            },
            field: "spec:",
            message: "keys[].proxy is only used with delivery: proxy",
        },
        Case {
            what: "AgentIdentity maxGrantTTL 1d",
            kind: Kind::Identity,
            edit: |o| o["spec"]["maxGrantTTL"] = json!("1d"),
            field: "spec.maxGrantTTL",
            message: "should match '^([0-9]{1,9}[hms])+$'",
        },
    ]
}

impl Case {
    /// The broken object, named `name`.
    fn object(&self, name: &str) -> Value {
        let mut object = match self.kind {
            Kind::Grant => valid_grant(name),
            Kind::Identity => valid_identity(name),
        };
        (self.edit)(&mut object);
        object
    }
}

/// Writes `yaml` to a temporary `.yaml` file (removed on drop).
fn manifest(yaml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("scopehold-validation-")
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    file.write_all(yaml.as_bytes()).expect("write manifest");
    file.flush().expect("flush manifest");
    file
}

fn apply_file(ns: &str, path: &Path) -> Output {
    kubectl(&["apply", "-n", ns, "-f", path.to_str().expect("utf-8 path")])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    )
}

async fn exists(client: &Client, ns: &str, kind: Kind, name: &str) -> bool {
    match kind {
        Kind::Grant => Api::<SecretGrant>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .expect("get SecretGrant")
            .is_some(),
        Kind::Identity => Api::<AgentIdentity>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .expect("get AgentIdentity")
            .is_some(),
    }
}

/// Asserts that `result` is the API server's 422 Invalid whose message names
/// `field` and contains `message`.
fn assert_invalid<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, kube::Error>,
    field: &str,
    message: &str,
) {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                status.code, 422,
                "{what}: expected 422 Invalid, got {status:?}"
            );
            assert_eq!(status.reason, "Invalid", "{what}: {status:?}");
            assert!(
                status.message.contains(field) && status.message.contains(message),
                "{what}: message should name {field:?} and say {message:?}, got: {}",
                status.message
            );
        }
        other => panic!("{what}: expected the API server to refuse it (422), got {other:?}"),
    }
}

#[tokio::test]
async fn kubectl_apply_refuses_malformed_objects_with_the_rule_message() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "validation-kubectl").await;

    // Positive control: the unbroken objects apply through the same path.
    for (kind, object) in [
        (Kind::Grant, valid_grant("control")),
        (Kind::Grant, valid_proxy_grant("control-proxy")),
        (Kind::Identity, valid_identity("control")),
    ] {
        let file = manifest(&serde_yaml::to_string(&object).unwrap());
        let out = apply_file(&ns, file.path());
        assert!(
            out.status.success(),
            "valid {kind:?} refused: {}",
            describe(&out)
        );
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(exists(&client, &ns, kind, name).await);
    }

    for (i, case) in cases().iter().enumerate() {
        let name = format!("bad-{i}");
        let file = manifest(&serde_yaml::to_string(&case.object(&name)).unwrap());
        let out = apply_file(&ns, file.path());
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "{}: kubectl apply succeeded\n{}",
            case.what,
            describe(&out)
        );
        assert!(
            err.contains("is invalid") && err.contains(case.field) && err.contains(case.message),
            "{}: stderr should name {:?} and say {:?}\n{}",
            case.what,
            case.field,
            case.message,
            describe(&out)
        );
        assert!(
            !exists(&client, &ns, case.kind, &name).await,
            "{}: the refused object exists anyway",
            case.what
        );
    }
}

#[tokio::test]
async fn kube_rs_create_gets_422_with_the_rule_message() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "validation-kube").await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    let identities: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();

    // Positive control through the same typed path.
    let grant: SecretGrant = serde_json::from_value(valid_grant("control")).unwrap();
    grants.create(&pp, &grant).await.expect("valid grant");
    let grant: SecretGrant = serde_json::from_value(valid_proxy_grant("control-proxy")).unwrap();
    grants.create(&pp, &grant).await.expect("valid proxy grant");
    let identity: AgentIdentity = serde_json::from_value(valid_identity("control")).unwrap();
    identities
        .create(&pp, &identity)
        .await
        .expect("valid identity");

    for (i, case) in cases().iter().enumerate() {
        let name = format!("bad-{i}");
        // Every case is expressible in the Rust types: the schema is the barrier.
        let result = match case.kind {
            Kind::Grant => {
                let grant: SecretGrant = serde_json::from_value(case.object(&name))
                    .unwrap_or_else(|e| panic!("{}: not a SecretGrant: {e}", case.what));
                grants.create(&pp, &grant).await.map(|_| ())
            }
            Kind::Identity => {
                let identity: AgentIdentity = serde_json::from_value(case.object(&name))
                    .unwrap_or_else(|e| panic!("{}: not an AgentIdentity: {e}", case.what));
                identities.create(&pp, &identity).await.map(|_| ())
            }
        };
        assert_invalid(case.what, result, case.field, case.message);
        assert!(
            !exists(&client, &ns, case.kind, &name).await,
            "{}: the refused object exists anyway",
            case.what
        );
    }
}

/// `agent` and `secretName` never change: a grant is re-pointed by creating
/// another one. Other fields stay editable (so the rule is not "refuse all").
#[tokio::test]
async fn agent_and_secret_name_are_immutable() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "validation-immutable").await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    let grant: SecretGrant = serde_json::from_value(valid_grant("g")).unwrap();
    grants
        .create(&PostParams::default(), &grant)
        .await
        .expect("create grant");

    // kube-rs: merge patches of spec.agent / spec.secretName.
    for (field, value, message) in [
        (
            "agent",
            "eve",
            "agent is immutable; create another SecretGrant",
        ),
        (
            "secretName",
            "other",
            "secretName is immutable; create another SecretGrant",
        ),
    ] {
        let result = grants
            .patch(
                "g",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { field: value } })),
            )
            .await;
        assert_invalid(
            &format!("patch spec.{field}"),
            result,
            &format!("spec.{field}"),
            message,
        );
    }

    // kubectl: apply the same object with a changed agent, then secretName.
    for (field, value, message) in [
        ("agent", "eve", "agent is immutable"),
        ("secretName", "other", "secretName is immutable"),
    ] {
        let mut object = valid_grant("g");
        object["spec"][field] = json!(value);
        let file = manifest(&serde_yaml::to_string(&object).unwrap());
        let out = apply_file(&ns, file.path());
        assert!(
            !out.status.success(),
            "kubectl apply changed spec.{field}: {}",
            describe(&out)
        );
        assert!(
            stderr(&out).contains(&format!("spec.{field}")) && stderr(&out).contains(message),
            "kubectl apply of a changed spec.{field}: {}",
            describe(&out)
        );
    }

    let stored = grants.get("g").await.expect("get grant");
    assert_eq!(stored.spec.agent, "bot");
    assert_eq!(stored.spec.secret_name, "creds");

    // Control: mutable fields still change, by both paths.
    grants
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "revoked": true } })),
        )
        .await
        .expect("revoking is an allowed change");
    let mut object = valid_grant("g");
    object["spec"]["revoked"] = json!(true);
    object["spec"]["reason"] = json!("changed reason");
    let file = manifest(&serde_yaml::to_string(&object).unwrap());
    let out = apply_file(&ns, file.path());
    assert!(out.status.success(), "changing reason: {}", describe(&out));
    let stored = grants.get("g").await.expect("get grant");
    assert!(stored.spec.revoked);
    assert_eq!(stored.spec.reason.as_deref(), Some("changed reason"));
}

/// Turns a valid object into the variant under test.
type Edit = fn(&mut Value);

/// Valid objects at the edges of each rule are accepted by both paths: names
/// that merely contain dots, the extreme modes, compound durations, an
/// expiresAt alone, and octal modes written the way the docs say.
#[tokio::test]
async fn objects_at_the_edges_of_the_rules_are_accepted() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "validation-edges").await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    let identities: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);

    let edges: Vec<(&str, Edit)> = vec![
        ("dotfile path", |o| {
            o["spec"]["keys"][0]["path"] = json!(".env")
        }),
        ("inner dots", |o| {
            o["spec"]["keys"] = json!([{ "key": "a..b", "path": "x..y" }])
        }),
        (
            "mode 0 and 0777",
            |o| o["spec"]["keys"] = json!([{ "key": "a", "mode": 0 }, { "key": "b", "mode": 511 }]),
        ),
        ("compound ttl", |o| o["spec"]["ttl"] = json!("1h30m15s")),
        ("expiresAt alone", |o| {
            o["spec"]["expiresAt"] = json!("2030-01-01T00:00:00Z")
        }),
        ("64 keys", |o| {
            o["spec"]["keys"] = (0..64).map(|i| json!({ "key": format!("k{i}") })).collect()
        }),
    ];
    for (i, (what, edit)) in edges.iter().enumerate() {
        let mut object = valid_grant(&format!("edge-rs-{i}"));
        edit(&mut object);
        let grant: SecretGrant = serde_json::from_value(object.clone()).unwrap();
        grants
            .create(&PostParams::default(), &grant)
            .await
            .unwrap_or_else(|e| panic!("{what}: kube-rs create refused: {e}"));

        object["metadata"]["name"] = json!(format!("edge-kubectl-{i}"));
        let file = manifest(&serde_yaml::to_string(&object).unwrap());
        let out = apply_file(&ns, file.path());
        assert!(
            out.status.success(),
            "{what}: kubectl apply refused: {}",
            describe(&out)
        );
    }

    // 65 keys is one too many: the upper bound holds too.
    let mut object = valid_grant("too-many");
    object["spec"]["keys"] = (0..65).map(|i| json!({ "key": format!("k{i}") })).collect();
    let grant: SecretGrant = serde_json::from_value(object).unwrap();
    assert_invalid(
        "65 keys",
        grants.create(&PostParams::default(), &grant).await,
        "spec.keys",
        "must have at most 64 items",
    );

    // YAML octal, as the mode's doc tells users to write it.
    let file = manifest(
        "apiVersion: scopehold.dev/v1alpha1\n\
         kind: SecretGrant\n\
         metadata:\n  name: octal\n\
         spec:\n  agent: bot\n  secretName: creds\n  keys:\n    - key: api\n      mode: 0440\n",
    );
    let out = apply_file(&ns, file.path());
    assert!(out.status.success(), "octal mode: {}", describe(&out));
    let octal = grants.get("octal").await.expect("get octal");
    assert_eq!(octal.spec.keys[0].mode, Some(0o440));

    let mut identity = valid_identity("compound");
    identity["spec"]["maxGrantTTL"] = json!("2h45m");
    let identity: AgentIdentity = serde_json::from_value(identity).unwrap();
    identities
        .create(&PostParams::default(), &identity)
        .await
        .expect("maxGrantTTL 2h45m");
    let names: Vec<String> = grants
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(names.len(), 2 * edges.len() + 1, "{names:?}");
}

/// The quickstart path: `kubectl apply -f crds/`, then the first three examples
/// into a namespace; `kubectl explain` shows the field docs from the Rust types.
#[tokio::test]
async fn crds_and_examples_apply_with_kubectl() {
    let client = client().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crds = root.join("crds");
    let out = kubectl(&["apply", "-f", crds.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl apply -f crds/: {}",
        describe(&out)
    );
    let out = kubectl(&[
        "wait",
        "--for",
        "condition=Established",
        "--timeout",
        "30s",
        "crd/secretgrants.scopehold.dev",
        "crd/agentidentities.scopehold.dev",
    ]);
    assert!(out.status.success(), "CRDs Established: {}", describe(&out));

    let ns = test_namespace(&client, "validation-examples").await;
    let example = |f: &str| root.join("examples").join(f).to_str().unwrap().to_owned();
    let (secret, agent, grant) = (
        example("01-secret.yaml"),
        example("02-agent.yaml"),
        example("03-grant.yaml"),
    );
    let out = kubectl(&[
        "apply", "-n", &ns, "-f", &secret, "-f", &agent, "-f", &grant,
    ]);
    assert!(
        out.status.success(),
        "kubectl apply examples: {}",
        describe(&out)
    );
    let stored = Api::<SecretGrant>::namespaced(client.clone(), &ns)
        .get("claude-code-supabase")
        .await
        .expect("example grant stored");
    assert_eq!(stored.spec.keys[0].mode, Some(0o440));
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .get("claude-code")
        .await
        .expect("example identity stored");

    // The OpenAPI document of a new CRD is published asynchronously.
    let explained = wait_for_desc(
        "kubectl explain secretgrant.spec.keys",
        Duration::from_secs(30),
        async || {
            let out = kubectl(&["explain", "secretgrant.spec.keys"]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    for text in ["Secret key", "File name in the mount", "File mode"] {
        assert!(
            explained.contains(text),
            "kubectl explain lacks {text:?}:\n{explained}"
        );
    }
}

//! Granting is not a way around RBAC: the ValidatingAdmissionPolicy shipped in
//! `crds/` (and the chart) lets a user create or change a SecretGrant only if that
//! user may `get` the Secret, and an AgentIdentity only if that user may act as its
//! ServiceAccount. Exercised with the harness's plain users against the real API
//! server's CEL authorizer. (The API server compiles the expressions when the
//! policy is applied; the schema type check runs in kube-controller-manager,
//! which the harness lacks, so every branch is exercised here instead.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::objects::{create_secret, key};
use common::{client, client_as, create_service_account, install_crds, test_namespace};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use scopehold::api::{AgentIdentity, AgentIdentitySpec, SecretGrant, SecretGrantSpec};

const POLICY: &str = "scopehold-grant-authorization";

/// Grants `user` the verbs on the resources (optionally only the named objects) in
/// `ns` through a Role and RoleBinding called `name`.
async fn allow(
    admin: &Client,
    ns: &str,
    name: &str,
    user: &str,
    resources: &[&str],
    verbs: &[&str],
    names: Option<&[&str]>,
) {
    let (groups, resources): (Vec<String>, Vec<String>) = resources
        .iter()
        .map(|r| match r.split_once('.') {
            Some((resource, group)) => (group.to_string(), resource.to_string()),
            None => (String::new(), (*r).to_string()),
        })
        .unzip();
    let role = Role {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(groups),
            resources: Some(resources),
            verbs: verbs.iter().map(|v| (*v).to_string()).collect(),
            resource_names: names.map(|n| n.iter().map(|s| (*s).to_string()).collect()),
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.into(),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

fn grant(name: &str, agent: &str, secret: &str) -> SecretGrant {
    SecretGrant::new(
        name,
        SecretGrantSpec {
            agent: agent.into(),
            secret_name: secret.into(),
            keys: vec![key("token")],
            ttl: Some("1h".into()),
            reason: Some("admission test".into()),
            ..Default::default()
        },
    )
}

fn identity(name: &str, sa: &str) -> AgentIdentity {
    AgentIdentity::new(
        name,
        AgentIdentitySpec {
            service_account_name: sa.into(),
            ..Default::default()
        },
    )
}

/// The message of a refusal, or a panic naming what was let through.
fn denial<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{what}: {status:?}");
            status.message
        }
        other => panic!("{what} must be refused by the admission policy, got {other:?}"),
    }
}

/// Installs crds/ (CRDs + policy) and waits until the policy is in force: the
/// admission plugin learns policies from an informer, a moment after they exist.
/// `probe` is an object the policy must refuse.
async fn policy_in_force<K>(api: &Api<K>, probe: &K)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match api.create(&PostParams::default(), probe).await {
            Err(kube::Error::Api(status)) if status.message.contains(POLICY) => return,
            Ok(created) => {
                let name = created.meta().name.clone().unwrap();
                // Let through before the policy took effect: undo and retry.
                let _ = api.delete(&name, &Default::default()).await;
            }
            Err(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the admission policy {POLICY} from crds/ never refused {probe:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_grant_needs_read_access_to_its_secret() {
    let admin = client().await;
    install_crds(&admin).await;
    let ns = test_namespace(&admin, "adm-grant").await;
    create_secret(&admin, &ns, "db", &[("token", "adm-db-value")]).await;
    create_secret(&admin, &ns, "payroll", &[("token", "adm-payroll-value")]).await;
    // alice may manage grants in the namespace, and read Secret "db" only.
    allow(
        &admin,
        &ns,
        "grant-editor",
        "alice",
        &["secretgrants.scopehold.dev"],
        &["get", "list", "create", "update", "patch"],
        None,
    )
    .await;
    allow(
        &admin,
        &ns,
        "db-reader",
        "alice",
        &["secrets"],
        &["get"],
        Some(&["db"]),
    )
    .await;

    let alice = Api::<SecretGrant>::namespaced(client_as("alice").await, &ns);
    policy_in_force(&alice, &grant("probe", "agent", "payroll")).await;

    let message = denial(
        alice
            .create(&PostParams::default(), &grant("steal", "agent", "payroll"))
            .await,
        "alice granting Secret payroll, which she may not read",
    );
    for part in [
        "SecretGrant",
        "alice",
        "may not get Secret \"payroll\"",
        &ns,
    ] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }

    // RBAC is eventually consistent too: retry until the Role is seen.
    let ok = common::wait_for_desc("alice granting db", Duration::from_secs(10), async || {
        alice
            .create(&PostParams::default(), &grant("mine", "agent", "db"))
            .await
            .ok()
    })
    .await;
    assert_eq!(ok.spec.secret_name, "db");

    // A grant of payroll made by someone who may read it (admin)...
    let admins = Api::<SecretGrant>::namespaced(admin.clone(), &ns);
    admins
        .create(
            &PostParams::default(),
            &grant("payroll", "agent", "payroll"),
        )
        .await
        .unwrap();
    // ...may not be widened by alice (another key, longer TTL)...
    let widen = serde_json::json!({"spec": {"ttl": "8h"}});
    denial(
        alice
            .patch("payroll", &PatchParams::default(), &Patch::Merge(&widen))
            .await,
        "alice extending a grant of a Secret she may not read",
    );
    // ...but she may revoke it: that only takes access away.
    let revoke = serde_json::json!({"spec": {"revoked": true}});
    let revoked = alice
        .patch("payroll", &PatchParams::default(), &Patch::Merge(&revoke))
        .await
        .unwrap();
    assert!(revoked.spec.revoked);
    // Taking the revocation back hands the Secret out again: checked.
    let unrevoke = serde_json::json!({"spec": {"revoked": false}});
    denial(
        alice
            .patch("payroll", &PatchParams::default(), &Patch::Merge(&unrevoke))
            .await,
        "alice un-revoking a grant of a Secret she may not read",
    );
    // Metadata-only changes pass.
    let label = serde_json::json!({"metadata": {"labels": {"team": "a"}}});
    alice
        .patch("payroll", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_identity_needs_the_right_to_act_as_its_service_account() {
    let admin = client().await;
    install_crds(&admin).await;
    let ns = test_namespace(&admin, "adm-identity").await;
    create_service_account(&admin, &ns, "bob-agent").await;
    create_service_account(&admin, &ns, "mallory-agent").await;
    // Both may manage identities; bob may mint tokens for bob-agent, mallory for
    // mallory-agent only.
    for user in ["bob", "mallory"] {
        allow(
            &admin,
            &ns,
            &format!("{user}-identities"),
            user,
            &["agentidentities.scopehold.dev"],
            &["get", "list", "create", "update", "patch"],
            None,
        )
        .await;
    }
    allow(
        &admin,
        &ns,
        "bob-token",
        "bob",
        &["serviceaccounts/token"],
        &["create"],
        Some(&["bob-agent"]),
    )
    .await;
    allow(
        &admin,
        &ns,
        "mallory-token",
        "mallory",
        &["serviceaccounts/token"],
        &["create"],
        Some(&["mallory-agent"]),
    )
    .await;

    let mallory = Api::<AgentIdentity>::namespaced(client_as("mallory").await, &ns);
    let bob = Api::<AgentIdentity>::namespaced(client_as("bob").await, &ns);
    policy_in_force(&mallory, &identity("probe", "bob-agent")).await;

    // Mallory can neither claim bob's ServiceAccount nor jam it with a second claim.
    let message = denial(
        mallory
            .create(&PostParams::default(), &identity("claim", "bob-agent"))
            .await,
        "mallory claiming bob-agent",
    );
    for part in [
        "AgentIdentity",
        "mallory",
        "may not act as ServiceAccount \"bob-agent\"",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }

    let bobs = common::wait_for_desc(
        "bob claiming bob-agent",
        Duration::from_secs(10),
        async || {
            bob.create(&PostParams::default(), &identity("bob", "bob-agent"))
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(bobs.spec.service_account_name, "bob-agent");
    let mine = common::wait_for_desc(
        "mallory claiming mallory-agent",
        Duration::from_secs(10),
        async || {
            mallory
                .create(
                    &PostParams::default(),
                    &identity("mallory", "mallory-agent"),
                )
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(mine.spec.service_account_name, "mallory-agent");

    // Moving her own identity onto bob's ServiceAccount is the same claim.
    let moved = serde_json::json!({"spec": {"serviceAccountName": "bob-agent"}});
    denial(
        mallory
            .patch("mallory", &PatchParams::default(), &Patch::Merge(&moved))
            .await,
        "mallory moving her identity onto bob-agent",
    );
    // Anyone who may edit identities may suspend one (it only takes access away),
    // but resuming it is acting as its ServiceAccount again.
    let suspend = serde_json::json!({"spec": {"suspended": true}});
    mallory
        .patch("bob", &PatchParams::default(), &Patch::Merge(&suspend))
        .await
        .unwrap();
    let resume = serde_json::json!({"spec": {"suspended": false}});
    denial(
        mallory
            .patch("bob", &PatchParams::default(), &Patch::Merge(&resume))
            .await,
        "mallory resuming bob's agent",
    );
    bob.patch("bob", &PatchParams::default(), &Patch::Merge(&resume))
        .await
        .unwrap();
}

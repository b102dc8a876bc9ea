//! On the real node (kubelet, containerd, runc; `tests/common/cluster.rs`):
//! an agent's credential volume cannot be changed from inside its root
//! container, the host's copy of the tmpfs is read-only too (the plugin
//! attaches it read-only, so what propagates out of its mount namespace is),
//! and a pod that asks for a writable volume never starts: kubelet shows the
//! plugin's message telling the user to set `readOnly: true`.

// The crate denies these lints for every target; tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::{AGENT_IMAGE, Cluster, cluster_with_scopehold};
use common::objects::{create_grant, create_identity, create_secret, key};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use scopehold::api::SecretGrant;
use scopehold::csi::volume::mounter::parse_mountinfo;
use serde_json::json;

const VALUE: &str = "real-node-readonly-value";
const MOUNT: &str = "/var/run/secrets/scopehold";

async fn agent_pod(client: &Client, ns: &str, name: &str, read_only: Option<bool>) {
    let mut csi = json!({"driver": "csi.scopehold.dev"});
    if let Some(read_only) = read_only {
        csi["readOnly"] = json!(read_only);
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": "agent-sa",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "agent",
                "image": AGENT_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
                // Root in its container, as the attacker is; the volume
                // mount itself does not say readOnly.
                "securityContext": {"runAsUser": 0},
                "volumeMounts": [{"name": "credentials", "mountPath": MOUNT}]
            }],
            "volumes": [{"name": "credentials", "csi": csi}]
        }
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("creating pod {ns}/{name}: {e}"));
}

async fn wait_running(c: &Cluster, client: &Client, ns: &str, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pod = pods.get(name).await.unwrap();
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Running") {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {ns}/{name} not Running: {phase:?}\n{}",
            c.describe_release()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sh(c: &Cluster, ns: &str, pod: &str, script: &str) -> (bool, String) {
    let out = c.exec(ns, pod, Some("agent"), &["sh", "-c", script]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_credential_volume_is_read_only_in_the_container_and_on_the_host() {
    let c = cluster_with_scopehold();
    let _guard = c.shared().await;
    let client = c.client().await;
    let ns = c.namespace(&client, "readonly").await;
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "agent-sa"}})).unwrap(),
        )
        .await
        .unwrap();
    create_secret(&client, &ns, "creds", &[("api-key", VALUE)]).await;
    create_identity(&client, &ns, "agent", "agent-sa", false).await;
    create_grant(
        &client,
        &ns,
        "g",
        "agent",
        "creds",
        vec![key("api-key")],
        |_| {},
    )
    .await;

    agent_pod(&client, &ns, "agent", Some(true)).await;
    let pod = wait_running(c, &client, &ns, "agent").await;
    let (ok, out) = sh(c, &ns, "agent", &format!("cat {MOUNT}/api-key"));
    assert!(ok && out == VALUE, "cannot read the value: {out}");

    // Root in the container: every way of changing the volume fails.
    for attempt in [
        format!("echo tampered > {MOUNT}/api-key"),
        format!("echo x > {MOUNT}/planted"),
        format!("mkdir {MOUNT}/dir"),
        format!("ln -sfn /etc {MOUNT}/..data"),
        format!("rm -f {MOUNT}/..data"),
        format!("mv {MOUNT}/..data {MOUNT}/..old"),
        format!("mount -o remount,rw {MOUNT}"),
    ] {
        let (ok, out) = sh(c, &ns, "agent", &attempt);
        assert!(!ok, "`{attempt}` succeeded inside the container: {out}");
    }
    let (ok, out) = sh(
        c,
        &ns,
        "agent",
        &format!("cat {MOUNT}/api-key; ls -A {MOUNT}"),
    );
    assert!(ok && out.starts_with(VALUE), "the volume changed: {out}");
    assert!(!out.contains("planted"), "{out}");

    // The host's copy (from which the runtime bound it into the container)
    // is read-only too: the plugin attached the tmpfs read-only.
    let uid = pod.metadata.uid.clone().unwrap();
    let target = c
        .kubelet_dir()
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~csi/credentials/mount");
    let entries = parse_mountinfo(&std::fs::read("/proc/self/mountinfo").unwrap()).unwrap();
    let host: Vec<_> = entries
        .iter()
        .filter(|entry| entry.mount_point == target)
        .collect();
    assert!(!host.is_empty(), "no host mount at {}", target.display());
    for entry in &host {
        assert!(entry.is_scopehold_tmpfs(), "{entry:?}");
        assert!(
            entry.is_read_only(),
            "the host's copy is writable: {entry:?}"
        );
    }
    assert!(std::fs::write(target.join("planted"), b"x").is_err());

    // Whatever root tried in the container, revocation still takes the value.
    Api::<SecretGrant>::namespaced(client.clone(), &ns)
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revoked": true}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (present, out) = sh(c, &ns, "agent", &format!("test -e {MOUNT}/api-key"));
        if !present {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revocation did not remove the value from the container: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_asking_for_a_writable_volume_is_told_to_set_read_only() {
    let c = cluster_with_scopehold();
    let _guard = c.shared().await;
    let client = c.client().await;
    let ns = c.namespace(&client, "writable").await;
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "agent-sa"}})).unwrap(),
        )
        .await
        .unwrap();
    create_secret(&client, &ns, "creds", &[("api-key", VALUE)]).await;
    create_identity(&client, &ns, "agent", "agent-sa", false).await;
    create_grant(
        &client,
        &ns,
        "g",
        "agent",
        "creds",
        vec![key("api-key")],
        |_| {},
    )
    .await;

    // No readOnly at all (kubelet sends readonly=false).
    agent_pod(&client, &ns, "writable", None).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let events = c.events_of(&ns, "writable");
        if events.contains("FailedMount") && events.contains("readOnly: true") {
            assert!(!events.contains(VALUE));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no FailedMount telling to set readOnly: true; events:\n{events}\n{}",
            c.describe_release()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pod = Api::<Pod>::namespaced(client.clone(), &ns)
        .get("writable")
        .await
        .unwrap();
    assert_ne!(
        pod.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "a pod with a writable credential volume started"
    );
}

//! An API server restart under a running controller (with custody) and node
//! plugin: the test API server is stopped and started again on the same
//! directory (same URL, CA, tokens, signing key and etcd data), and a
//! revocation made after the restart still reaches the running pod's volume.
//!
//! Its own test binary: the API server is shared by every test of a binary,
//! and this one stops it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::objects::{create_grant, create_identity, create_secret};
use common::stack::{
    NodePluginProcess, node_plugin_dir, node_plugin_token, start_controller_with_custody,
    unmount_below,
};
use common::{
    AUDIENCE, client, create_node, create_pod, create_service_account, install_crds, pod_token,
    server, test_namespace, wait_for_desc,
};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use scopehold::api::{GrantPhase, GrantedKey, SecretGrant};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Unmounts what the plugin left below a directory, also when the test fails.
struct UnmountBelow<'a>(&'a Path);

impl Drop for UnmountBelow<'_> {
    fn drop(&mut self) {
        unmount_below(self.0);
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".."))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_revocation_made_after_an_api_server_restart_still_lands() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "restart").await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    let plugin_token = node_plugin_token(&client, &ns, &node).await;
    create_service_account(&client, &ns, "bot-sa").await;
    create_identity(&client, &ns, "bot", "bot-sa", false).await;
    for file in ["a", "b"] {
        let name = format!("bot-{file}");
        create_secret(
            &client,
            &ns,
            &name,
            &[("value", &format!("restart-{ns}-{file}"))],
        )
        .await;
        let key = GrantedKey {
            key: "value".into(),
            path: Some(file.into()),
            ..Default::default()
        };
        create_grant(&client, &ns, &name, "bot", &name, vec![key], |_| {}).await;
    }
    let (controller, custody) = start_controller_with_custody(&ns, &[]).await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    for grant in ["bot-a", "bot-b"] {
        wait_for_desc(&format!("{grant} Active"), WAIT, async || {
            (grants.get(grant).await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
        })
        .await;
    }
    let dir = node_plugin_dir(&plugin_token);
    let _plugin = NodePluginProcess::start(dir.path(), &node, &custody, "node.log").await;
    let _unmount = UnmountBelow(dir.path());
    let pod = create_pod(&client, &ns, "bot-pod", "bot-sa", &node).await;
    let uid = pod.uid().unwrap();
    let token = pod_token(&client, &ns, "bot-sa", "bot-pod", &uid, AUDIENCE, 3600).await;
    let kubelet = KubeletPlayer::new(
        NodePluginProcess::socket(dir.path()),
        NodePluginProcess::kubelet_dir(dir.path()),
    );
    let info = PodInfo {
        namespace: ns.clone(),
        name: "bot-pod".into(),
        uid,
        service_account: "bot-sa".into(),
        fs_group: Some(3000),
    };
    let request = kubelet.publish_request(&info, "creds", &token, &HashMap::new(), true, true);
    let target = kubelet.publish(request).await.unwrap().expect("published");
    assert_eq!(listing(&target), ["a", "b"]);

    // The restart: clients see refused connections, then the same cluster.
    let stopped = Instant::now();
    tokio::task::spawn_blocking(|| server().restart())
        .await
        .unwrap();
    eprintln!("API server down and back in {:?}", stopped.elapsed());
    // The old admin credentials work against the restarted server.
    let client = common::client().await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        grants.get("bot-a").await.unwrap().phase(),
        Some(GrantPhase::Active),
        "etcd's data was kept"
    );

    grants
        .patch(
            "bot-a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "revoked": true } })),
        )
        .await
        .unwrap();
    let revoked = Instant::now();
    let file = target.join("a");
    wait_for_desc("the revoked file to leave the volume", WAIT, async || {
        file.symlink_metadata().is_err().then_some(())
    })
    .await;
    eprintln!(
        "revocation after the restart landed in {:?}",
        revoked.elapsed()
    );
    assert_eq!(listing(&target), ["b"]);
    wait_for_desc("bot-a Revoked", WAIT, async || {
        (grants.get("bot-a").await.ok()?.phase() == Some(GrantPhase::Revoked)).then_some(())
    })
    .await;
    assert!(
        controller.try_exit_status().is_none(),
        "the controller survived the restart"
    );
}

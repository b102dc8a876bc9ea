//! Ordered truth between Resolve and the invalidation stream: a Resolve
//! answer that custody decided before a revocation, but that reaches the
//! node plugin after the revocation's invalidation, never puts the revoked
//! key into the volume — with one custody, and with two replicas where the
//! stream and the Resolve call reach different ones.
//!
//! The real API server, the controller(s) with custody, and `scopehold node`
//! as a child process, reaching custody through a loopback TCP proxy that
//! holds the Resolve answer (the stream's connection, opened before, flows).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret};
use common::proxy::TcpProxy;
use common::scrape;
use common::stack::{
    NodePluginProcess, node_plugin_dir, node_plugin_token, start_controller_with_custody,
    start_controller_with_custody_via, unmount_below,
};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, server, test_namespace, wait_for_desc,
};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use scopehold::api::{GrantPhase, GrantedKey, SecretGrant};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const VOLUME: &str = "creds";
const AGENT: &str = "bot";

/// One test's cluster side: namespace, node, the agent with grants `bot-a`
/// (file `a`) and `bot-b` (file `b`), and its pod.
struct Agent {
    client: Client,
    ns: String,
    node: String,
    plugin_token: String,
    pod: PodInfo,
    pod_token: String,
}

impl Agent {
    async fn new(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let node = format!("{ns}-node");
        create_node(&client, &node).await;
        let plugin_token = node_plugin_token(&client, &ns, &node).await;
        let sa = format!("{AGENT}-sa");
        create_service_account(&client, &ns, &sa).await;
        create_identity(&client, &ns, AGENT, &sa, false).await;
        for file in ["a", "b"] {
            let name = format!("{AGENT}-{file}");
            create_secret(&client, &ns, &name, &[("value", &value_of(&ns, &name))]).await;
            let key = GrantedKey {
                key: "value".into(),
                path: Some(file.into()),
                ..Default::default()
            };
            create_grant(&client, &ns, &name, AGENT, &name, vec![key], |_| {}).await;
        }
        let pod_name = format!("{AGENT}-pod");
        let pod = create_pod(&client, &ns, &pod_name, &sa, &node).await;
        let uid = pod.uid().unwrap();
        let pod_token = pod_token(&client, &ns, &sa, &pod_name, &uid, AUDIENCE, 3600).await;
        Self {
            pod: PodInfo {
                namespace: ns.clone(),
                name: pod_name,
                uid,
                service_account: sa,
                fs_group: Some(3000),
            },
            client,
            ns,
            node,
            plugin_token,
            pod_token,
        }
    }

    /// Both grants Active (a controller runs).
    async fn await_active(&self) {
        for file in ["a", "b"] {
            self.await_phase(&format!("{AGENT}-{file}"), GrantPhase::Active)
                .await;
        }
    }

    fn grants(&self) -> Api<SecretGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn await_phase(&self, grant: &str, phase: GrantPhase) {
        let api = self.grants();
        wait_for_desc(&format!("{grant} {phase}"), WAIT, async || {
            (api.get(grant).await.ok()?.phase() == Some(phase)).then_some(())
        })
        .await;
    }

    async fn revoke(&self, grant: &str) {
        self.grants()
            .patch(
                grant,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "revoked": true } })),
            )
            .await
            .unwrap();
    }
}

/// The node plugin, reaching custody through `proxy`, on its own directory.
struct Plugin {
    process: Option<NodePluginProcess>,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.process.take();
        unmount_below(self.dir.path());
    }
}

impl Plugin {
    async fn start(agent: &Agent, proxy: &TcpProxy) -> Self {
        let dir = node_plugin_dir(&agent.plugin_token);
        let socket = NodePluginProcess::socket(dir.path());
        let process =
            NodePluginProcess::start(dir.path(), &agent.node, &proxy.addr.to_string(), "node.log")
                .await;
        let plugin = Self {
            process: Some(process),
            socket,
            dir,
        };
        // The stream is up (its first RESYNC handled): its connection is
        // open before any reply is held.
        wait_for_desc("the invalidation stream", WAIT, async || {
            plugin
                .logs()
                .contains("\"kind\":\"KIND_RESYNC\"")
                .then_some(())
        })
        .await;
        plugin
    }

    fn logs(&self) -> String {
        self.process.as_ref().map(|p| p.logs()).unwrap_or_default()
    }

    /// Invalidations the plugin received so far (its own metric).
    async fn received(&self) -> f64 {
        let process = self.process.as_ref().unwrap();
        let addr = wait_for_desc("the plugin's metrics address", WAIT, async || {
            process.metrics_addr()
        })
        .await;
        scrape::endpoint(&addr)
            .await
            .map(|s| s.sum("scopehold_node_invalidations_received_total", &[]))
            .unwrap_or(0.0)
    }

    /// Answers the plugin asked again instead of applying (its own metric).
    async fn stale_answers(&self) -> f64 {
        let addr = self.process.as_ref().unwrap().metrics_addr().unwrap();
        scrape::endpoint(&addr)
            .await
            .map(|s| s.sum("scopehold_node_stale_answers_total", &[]))
            .unwrap_or(0.0)
    }

    /// Starts a first NodePublishVolume for the agent's pod (kubelet waits
    /// for the answer; so does this task).
    fn publish(&self, agent: &Agent) -> tokio::task::JoinHandle<Result<PathBuf, tonic::Status>> {
        let kubelet = KubeletPlayer::new(&self.socket, self.dir.path().join("kubelet"));
        let request = kubelet.publish_request(
            &agent.pod,
            VOLUME,
            &agent.pod_token,
            &HashMap::new(),
            true,
            true,
        );
        tokio::spawn(async move { kubelet.publish(request).await.unwrap() })
    }
}

/// A value unique to this namespace and Secret.
fn value_of(ns: &str, secret: &str) -> String {
    format!("ordering-value-{ns}-{secret}")
}

/// User-visible names in a mount.
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

/// Waits until `custody` has decided the pod's Resolve (its audit line):
/// the answer exists, with both grants, and is held by the proxy.
async fn await_decided(custody: &ControllerProcess, agent: &Agent) {
    wait_for_desc("custody's decision for the pod", WAIT, async || {
        custody
            .audit_lines()
            .iter()
            .any(|l| {
                l["event"] == "SecretResolved"
                    && l["pod"] == agent.pod.name.as_str()
                    && l["grant"] == format!("{AGENT}-a").as_str()
            })
            .then_some(())
    })
    .await;
}

/// Revokes `bot-a` while the pod's answer is held, waits until the plugin
/// has received the revocation (and the controller recorded it), then lets
/// the held answer through and checks what the publish mounted: never `a`.
async fn revoke_across_the_held_answer(
    agent: &Agent,
    proxy: &TcpProxy,
    plugin: &Plugin,
    publish: tokio::task::JoinHandle<Result<PathBuf, tonic::Status>>,
) {
    let before = plugin.received().await;
    agent.revoke(&format!("{AGENT}-a")).await;
    agent
        .await_phase(&format!("{AGENT}-a"), GrantPhase::Revoked)
        .await;
    wait_for_desc("the revocation at the plugin", WAIT, async || {
        (plugin.received().await > before).then_some(())
    })
    .await;
    assert!(!publish.is_finished(), "the answer was held");
    proxy.release_replies();

    let target = tokio::time::timeout(WAIT, publish)
        .await
        .expect("publish answered")
        .unwrap()
        .expect("published with the grant still active");
    assert_eq!(
        listing(&target),
        ["b"],
        "the revoked grant's file must never land"
    );
    // Nothing puts it back later either (the withdrawal queued meanwhile
    // and any refresh run by now).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(listing(&target), ["b"]);
    let value = std::fs::read_to_string(target.join("b")).unwrap();
    assert_eq!(value, value_of(&agent.ns, &format!("{AGENT}-b")));
    let logs = plugin.logs();
    assert!(
        logs.contains("predates a change already applied"),
        "the old answer was recognised as such, not dodged by timing"
    );
    assert!(plugin.stale_answers().await >= 1.0);
    assert!(!logs.contains(&value_of(&agent.ns, &format!("{AGENT}-a"))));
}

#[tokio::test]
async fn an_answer_decided_before_a_revocation_never_mounts_the_revoked_key() {
    let agent = Agent::new("order-one").await;
    let (custody, custody_addr) = start_controller_with_custody(&agent.ns, &[]).await;
    agent.await_active().await;
    let proxy = TcpProxy::start(custody_addr.parse().unwrap()).await;
    let plugin = Plugin::start(&agent, &proxy).await;

    // The Resolve call opens its own connection: its answer is held.
    proxy.hold_replies();
    let publish = plugin.publish(&agent);
    await_decided(&custody, &agent).await;
    revoke_across_the_held_answer(&agent, &proxy, &plugin, publish).await;
}

/// Leader election among the test's replicas, with a short lease.
fn lease_args(ns: &str) -> [&str; 5] {
    [
        "--leader-election",
        "--lease-namespace",
        ns,
        "--lease-duration-seconds",
        "4",
    ]
}

#[tokio::test]
async fn with_two_replicas_a_late_answer_from_one_never_undoes_the_others_revocation() {
    let agent = Agent::new("order-two").await;
    let lease = lease_args(&agent.ns);
    let (streamer, streamer_addr) = start_controller_with_custody(&agent.ns, &lease).await;
    let (resolver, resolver_addr) = start_controller_with_custody(&agent.ns, &lease).await;
    agent.await_active().await;
    // The stream connects to the first replica...
    let proxy = TcpProxy::start(streamer_addr.parse().unwrap()).await;
    let plugin = Plugin::start(&agent, &proxy).await;
    // ...and Resolve to the second, whose answer is held.
    proxy.retarget(resolver_addr.parse().unwrap());
    proxy.hold_replies();
    let publish = plugin.publish(&agent);
    await_decided(&resolver, &agent).await;
    assert!(
        !streamer
            .audit_lines()
            .iter()
            .any(|l| l["event"] == "SecretResolved" && l["pod"] == agent.pod.name.as_str()),
        "the Resolve call reached the other replica"
    );
    revoke_across_the_held_answer(&agent, &proxy, &plugin, publish).await;
    assert!(
        streamer
            .logs()
            .contains("node plugin subscribed to invalidations"),
        "the stream is the first replica's"
    );
}

#[tokio::test]
async fn a_refresh_answered_by_a_replica_whose_watches_lag_never_puts_a_withdrawn_key_back() {
    let agent = Agent::new("order-lag").await;
    let lease = lease_args(&agent.ns);
    let (_streamer, streamer_addr) = start_controller_with_custody(&agent.ns, &lease).await;
    // The second replica reaches the API server through a proxy that can
    // freeze its watches while its requests (TokenReviews) still work.
    let upstream = server().url.trim_start_matches("https://").parse().unwrap();
    let api_proxy = TcpProxy::start(upstream).await;
    let kubeconfig = api_proxy.kubeconfig(&server().kubeconfig, &server().run_dir);
    let (_lagging, lagging_addr) =
        start_controller_with_custody_via(&agent.ns, &lease, &kubeconfig).await;
    agent.await_active().await;
    let proxy = TcpProxy::start(streamer_addr.parse().unwrap()).await;
    let plugin = Plugin::start(&agent, &proxy).await;
    proxy.retarget(lagging_addr.parse().unwrap());
    let target = plugin.publish(&agent).await.unwrap().expect("published");
    assert_eq!(listing(&target), ["a", "b"]);

    // The second replica's watches stop; the first sees the revocation and
    // its stream withdraws the file.
    api_proxy.freeze_quiet();
    agent.revoke(&format!("{AGENT}-a")).await;
    let file = target.join("a");
    wait_for_desc("the revocation at the plugin", WAIT, async || {
        file.symlink_metadata().is_err().then_some(())
    })
    .await;

    // A republish reaches the lagging replica, which still holds the grant
    // as active and says so: its answer is older than the revocation.
    let republished = plugin.publish(&agent).await.unwrap().expect("republished");
    assert_eq!(republished, target);
    assert_eq!(
        listing(&target),
        ["b"],
        "the withdrawn key must not come back"
    );
    // It did answer, and its answer was judged older (not merely missing).
    assert!(plugin.stale_answers().await >= 1.0);

    // Caught up, its answers are current and the key stays withdrawn.
    api_proxy.thaw();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listing(&target), ["b"]);
    assert!(
        !plugin
            .logs()
            .contains(&value_of(&agent.ns, &format!("{AGENT}-a")))
    );
}

//! Revocation, expiry, suspension and rotation reach running pods: the real
//! API server, the controller with custody, and the node plugin as a child
//! process (`scopehold node`), with kubelet played over the CSI socket. Every
//! change is made through the API and observed in the live tmpfs mount.
//!
//! Each test gives one pod two grants (files `a` and `b`, from two Secrets)
//! so that it can check that only the files of the affected grant go.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::proxy::TcpProxy;
use common::stack::{
    NodePluginProcess, node_plugin_dir, node_plugin_token, start_controller_with_custody,
    start_controller_with_custody_via, unmount_below,
};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, server, test_namespace, wait_for_desc,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo};
use scopehold::proto::csi::v1::ProbeRequest;
use scopehold::proto::csi::v1::identity_client::IdentityClient;
use serde_json::json;
use tonic::transport::Endpoint;

const WAIT: Duration = Duration::from_secs(20);
/// How fast a change must reach the mount ("within a second or two").
const DEADLINE: Duration = Duration::from_secs(2);
const VOLUME: &str = "creds";

struct Stack {
    client: Client,
    ns: String,
    node: String,
    controller: Option<ControllerProcess>,
    custody: String,
    plugin: Option<NodePluginProcess>,
    starts: usize,
    kubelet: KubeletPlayer,
    socket: PathBuf,
    dir: tempfile::TempDir,
    /// Between the controller and the API server, when the test asked for one.
    proxy: Option<TcpProxy>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Killing the plugin leaves its mounts in place, as a crash would.
        self.plugin.take();
        unmount_below(self.dir.path());
    }
}

/// An agent pod as kubelet knows it.
struct AgentPod {
    info: PodInfo,
    token: String,
}

impl Stack {
    async fn new(prefix: &str) -> Self {
        Self::build(prefix, false).await
    }

    /// A stack whose controller reaches the API server through a [`TcpProxy`].
    async fn behind_proxy(prefix: &str) -> Self {
        Self::build(prefix, true).await
    }

    async fn build(prefix: &str, proxied: bool) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let node = format!("{ns}-node");
        create_node(&client, &node).await;
        let plugin_token = node_plugin_token(&client, &ns, &node).await;
        let (proxy, (controller, custody)) = if proxied {
            let upstream = server().url.trim_start_matches("https://").parse().unwrap();
            let proxy = TcpProxy::start(upstream).await;
            let kubeconfig = proxy.kubeconfig(&server().kubeconfig, &server().run_dir);
            let started = start_controller_with_custody_via(&ns, &[], &kubeconfig).await;
            (Some(proxy), started)
        } else {
            (None, start_controller(&ns).await)
        };
        let dir = node_plugin_dir(&plugin_token);
        let socket = NodePluginProcess::socket(dir.path());
        let kubelet = KubeletPlayer::new(&socket, dir.path().join("kubelet"));
        let mut stack = Stack {
            client,
            ns,
            node,
            controller: Some(controller),
            custody,
            plugin: None,
            starts: 0,
            kubelet,
            socket,
            dir,
            proxy,
        };
        stack.start_plugin().await;
        stack
    }

    /// Starts `scopehold node` on the stack's directories (again, after a
    /// kill: same socket, kubelet dir, state dir) and waits for its socket.
    async fn start_plugin(&mut self) {
        let log = format!("node-{}.log", self.starts);
        self.starts += 1;
        self.plugin =
            Some(NodePluginProcess::start(self.dir.path(), &self.node, &self.custody, &log).await);
    }

    fn plugin(&self) -> &NodePluginProcess {
        self.plugin.as_ref().expect("node plugin running")
    }

    /// Waits until the plugin's invalidation stream is up (the first RESYNC
    /// was handled), so that a change made next is pushed, not caught up.
    async fn await_stream(&self) {
        let plugin = self.plugin();
        wait_for_desc("the invalidation stream", WAIT, async || {
            plugin
                .logs()
                .contains("\"kind\":\"KIND_RESYNC\"")
                .then_some(())
        })
        .await;
    }

    async fn secret(&self, name: &str, data: &[(&str, &str)]) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            string_data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    async fn identity(&self, name: &str, sa: &str) {
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &self.ns);
        if accounts.get_opt(sa).await.unwrap().is_none() {
            create_service_account(&self.client, &self.ns, sa).await;
        }
        let spec = AgentIdentitySpec {
            service_account_name: sa.into(),
            ..Default::default()
        };
        Api::<AgentIdentity>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &AgentIdentity::new(name, spec))
            .await
            .unwrap();
    }

    async fn grant(
        &self,
        name: &str,
        agent: &str,
        secret: &str,
        file: &str,
        edit: impl FnOnce(&mut SecretGrantSpec),
    ) {
        let mut spec = SecretGrantSpec {
            agent: agent.into(),
            secret_name: secret.into(),
            keys: vec![GrantedKey {
                key: "value".into(),
                path: Some(file.into()),
                mode: None,
                proxy: None,
            }],
            ..Default::default()
        };
        edit(&mut spec);
        self.grants()
            .create(&PostParams::default(), &SecretGrant::new(name, spec))
            .await
            .unwrap();
        self.await_phase(name, GrantPhase::Active).await;
    }

    fn grants(&self) -> Api<SecretGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn identities(&self) -> Api<AgentIdentity> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn await_phase(&self, grant: &str, phase: GrantPhase) {
        let api = self.grants();
        wait_for_desc(&format!("{grant} {phase}"), WAIT, async || {
            (api.get(grant).await.ok()?.phase() == Some(phase)).then_some(())
        })
        .await;
    }

    async fn patch_grant(&self, name: &str, spec: serde_json::Value) {
        self.grants()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    async fn patch_identity(&self, name: &str, spec: serde_json::Value) {
        self.identities()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    async fn pod(&self, name: &str, sa: &str) -> AgentPod {
        let pod = create_pod(&self.client, &self.ns, name, sa, &self.node).await;
        let uid = pod.uid().unwrap();
        let token = pod_token(&self.client, &self.ns, sa, name, &uid, AUDIENCE, 3600).await;
        AgentPod {
            info: PodInfo {
                namespace: self.ns.clone(),
                name: name.into(),
                uid,
                service_account: sa.into(),
                fs_group: Some(3000),
            },
            token,
        }
    }

    /// NodePublishVolume as kubelet sends it (also for a republish).
    async fn publish(&self, pod: &AgentPod) -> Result<PathBuf, tonic::Status> {
        let request = self.kubelet.publish_request(
            &pod.info,
            VOLUME,
            &pod.token,
            &HashMap::new(),
            true,
            true,
        );
        self.kubelet.publish(request).await.unwrap()
    }

    /// A pod of agent `agent` (ServiceAccount `<agent>-sa`) with grants
    /// `<agent>-a` and `<agent>-b` on Secrets `<agent>-a` and `<agent>-b`,
    /// published: files `a` and `b` are in its mount.
    async fn agent_with_two_grants(
        &self,
        agent: &str,
        edit_a: impl FnOnce(&mut SecretGrantSpec),
    ) -> (AgentPod, PathBuf) {
        let sa = format!("{agent}-sa");
        self.identity(agent, &sa).await;
        for file in ["a", "b"] {
            let name = format!("{agent}-{file}");
            self.secret(&name, &[("value", &value_of(&self.ns, &name))])
                .await;
        }
        self.grant(
            &format!("{agent}-a"),
            agent,
            &format!("{agent}-a"),
            "a",
            edit_a,
        )
        .await;
        self.grant(
            &format!("{agent}-b"),
            agent,
            &format!("{agent}-b"),
            "b",
            |_| {},
        )
        .await;
        let pod = self.pod(&format!("{agent}-pod"), &sa).await;
        let target = self.publish(&pod).await.expect("published");
        assert_eq!(listing(&target), ["a", "b"]);
        (pod, target)
    }

    /// The Event series `reason` regarding SecretGrant `grant`, waiting for
    /// it. Custody aggregates the node reports per grant and reason, so the
    /// Event names no pod; the pods are in the audit lines.
    async fn event(&self, reason: &str, grant: &str) -> Event {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc(&format!("{reason} Event for {grant}"), WAIT, async || {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                            == Some("SecretGrant")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(grant)
                        // Custody's, from the node reports (the controller
                        // writes its own SecretRotated on the status change).
                        && e.reporting_controller.as_deref() == Some("scopehold-custody")
                })
        })
        .await
    }

    /// The stack's secret values, to check no output leaks them.
    fn values(&self, agents: &[&str]) -> Vec<String> {
        agents
            .iter()
            .flat_map(|agent| ["a", "b"].map(|file| value_of(&self.ns, &format!("{agent}-{file}"))))
            .collect()
    }
}

async fn start_controller(ns: &str) -> (ControllerProcess, String) {
    start_controller_with_custody(ns, &[]).await
}

/// A value unique to this namespace and Secret.
fn value_of(ns: &str, secret: &str) -> String {
    format!("revocation-value-{ns}-{secret}")
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

fn is_mounted(target: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = target.to_string_lossy().into_owned();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

/// Polls (every 5 ms) until `check` holds; returns how long that took.
/// Panics after `WAIT`.
fn within(what: &str, started: Instant, mut check: impl FnMut() -> bool) -> Duration {
    loop {
        if check() {
            return started.elapsed();
        }
        if started.elapsed() > WAIT {
            panic!("{what}: not after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts that `path` disappears within [`DEADLINE`] of `started`.
fn gone_in_time(what: &str, path: &Path, started: Instant) -> Duration {
    let took = within(what, started, || path.symlink_metadata().is_err());
    eprintln!("{what}: {took:?}");
    assert!(took < DEADLINE, "{what} took {took:?}");
    took
}

/// Asserts the plugin wrote a ContentWithdrawn audit line for `grant`.
fn assert_withdrawn_audit(stack: &Stack, pod: &AgentPod, grant: &str, reason: &str) {
    let line = stack
        .plugin()
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "ContentWithdrawn" && l["grant"] == grant)
        .unwrap_or_else(|| panic!("no ContentWithdrawn audit line for {grant}"));
    assert_eq!(line["reason"], reason, "{line}");
    assert_eq!(line["decision"], "denied", "{line}");
    assert_eq!(line["namespace"], stack.ns.as_str(), "{line}");
    assert_eq!(line["pod"], pod.info.name.as_str(), "{line}");
    assert_eq!(line["podUID"], pod.info.uid.as_str(), "{line}");
    assert_eq!(line["node"], stack.node.as_str(), "{line}");
    assert_eq!(line["keys"], "value", "{line}");
    assert_eq!(line["secret"], grant, "{line}");
    assert_eq!(
        line["contentDigest"].as_str().map(str::len),
        Some(12),
        "{line}"
    );
}

/// The file `b` of `target` still holds its value.
fn assert_b_kept(stack: &Stack, agent: &str, target: &Path) {
    assert_eq!(
        std::fs::read_to_string(target.join("b")).unwrap(),
        value_of(&stack.ns, &format!("{agent}-b"))
    );
    assert!(is_mounted(target), "the mount must stay");
}

#[tokio::test]
async fn revoking_a_grant_withdraws_only_its_files_and_reinstating_brings_them_back() {
    let s = Stack::new("revoke").await;
    let (pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    s.await_stream().await;

    let started = Instant::now();
    s.patch_grant("bot-a", json!({"revoked": true})).await;
    gone_in_time("revoked file withdrawn", &target.join("a"), started);
    assert_b_kept(&s, "bot", &target);
    assert_eq!(listing(&target), ["b"]);
    wait_for_desc("ContentWithdrawn audit line", WAIT, async || {
        s.plugin()
            .audit_lines()
            .iter()
            .any(|l| l["event"] == "ContentWithdrawn")
            .then_some(())
    })
    .await;
    assert_withdrawn_audit(&s, &pod, "bot-a", "Revoked");
    // And a Kubernetes Event regarding the grant, related to the pod, which
    // custody records from the plugin's report.
    let event = s.event("ContentWithdrawn", "bot-a").await;
    let note = event.note.unwrap_or_default();
    assert!(note.contains("Revoked"), "{note}");
    // The reporting node and the pod are in custody's audit line.
    wait_for_desc("custody's ContentWithdrawn audit line", WAIT, async || {
        s.controller
            .as_ref()?
            .audit_lines()
            .into_iter()
            .any(|l| {
                l["event"] == "ContentWithdrawn"
                    && l["pod"] == "bot-pod"
                    && l["node"] == s.node.as_str()
                    && l["grant"] == "bot-a"
            })
            .then_some(())
    })
    .await;
    assert_eq!(event.action.as_deref(), Some("Withdraw"));

    // Un-revoked: the file reappears on push (re-resolved with the pod's
    // token from its last NodePublishVolume, which the plugin holds).
    let started = Instant::now();
    s.patch_grant("bot-a", json!({"revoked": false})).await;
    let took = within("reinstated file back", started, || {
        std::fs::read_to_string(target.join("a")).ok() == Some(value_of(&s.ns, "bot-a"))
    });
    eprintln!("reinstated file back: {took:?}");
    assert!(took < DEADLINE, "reinstatement took {took:?}");
    assert_eq!(listing(&target), ["a", "b"]);

    // Nothing secret in the plugin's output or the Events.
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.ns);
    let logs = s.plugin().logs()
        + &serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap();
    for secret in s.values(&["bot"]).iter().chain([&pod.token]) {
        assert!(
            !logs.contains(secret.as_str()),
            "a value leaked into the log"
        );
    }
}

#[tokio::test]
async fn deleting_a_grant_withdraws_only_its_files() {
    let s = Stack::new("delete-grant").await;
    let (pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    s.await_stream().await;
    let started = Instant::now();
    s.grants()
        .delete("bot-a", &DeleteParams::default())
        .await
        .unwrap();
    gone_in_time("deleted grant's file withdrawn", &target.join("a"), started);
    assert_b_kept(&s, "bot", &target);
    wait_for_desc("audit line", WAIT, async || {
        s.plugin()
            .audit_lines()
            .iter()
            .any(|l| l["event"] == "ContentWithdrawn")
            .then_some(())
    })
    .await;
    assert_withdrawn_audit(&s, &pod, "bot-a", "Deleted");
}

#[tokio::test]
async fn an_expiring_grant_is_withdrawn_on_time() {
    let s = Stack::new("expire").await;
    let (_pod, target) = s
        .agent_with_two_grants("bot", |spec| spec.ttl = Some("8s".into()))
        .await;
    let expires_at = s
        .grants()
        .get("bot-a")
        .await
        .unwrap()
        .status
        .and_then(|status| status.expires_at)
        .expect("effective expiry in the status")
        .0;
    let took = within("expired file withdrawn", Instant::now(), || {
        !target.join("a").exists()
    });
    let withdrawn_at = k8s_openapi::jiff::Timestamp::now();
    let late = withdrawn_at.duration_since(expires_at);
    eprintln!("expired file withdrawn {late} after expiresAt (waited {took:?})");
    assert!(
        late >= k8s_openapi::jiff::SignedDuration::from_millis(-50),
        "withdrawn before the expiry: {late}"
    );
    assert!(
        late < k8s_openapi::jiff::SignedDuration::from_secs(2),
        "withdrawn {late} after the expiry"
    );
    assert_b_kept(&s, "bot", &target);
}

/// Suspending, deleting or shadowing (a conflicting identity) an agent
/// withdraws everything it holds, and nothing of another agent.
async fn agent_change_withdraws_its_files(
    prefix: &str,
    change: impl AsyncFnOnce(&Stack),
    reason: &str,
) {
    let s = Stack::new(prefix).await;
    let (pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    let (_other, other_target) = s.agent_with_two_grants("other", |_| {}).await;
    s.await_stream().await;
    let started = Instant::now();
    change(&s).await;
    gone_in_time(&format!("{prefix}: file a"), &target.join("a"), started);
    gone_in_time(&format!("{prefix}: file b"), &target.join("b"), started);
    assert!(is_mounted(&target), "the mount must stay");
    // The other agent's pod keeps its files.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(listing(&other_target), ["a", "b"]);
    wait_for_desc("audit lines", WAIT, async || {
        (s.plugin()
            .audit_lines()
            .iter()
            .filter(|l| l["event"] == "ContentWithdrawn")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    assert_withdrawn_audit(&s, &pod, "bot-a", reason);
    assert_withdrawn_audit(&s, &pod, "bot-b", reason);
}

#[tokio::test]
async fn suspending_the_agent_withdraws_everything_it_holds() {
    agent_change_withdraws_its_files(
        "suspend",
        async |s: &Stack| s.patch_identity("bot", json!({"suspended": true})).await,
        "AgentSuspended",
    )
    .await;
}

#[tokio::test]
async fn deleting_the_agent_withdraws_everything_it_holds() {
    agent_change_withdraws_its_files(
        "delete-agent",
        async |s: &Stack| {
            s.identities()
                .delete("bot", &DeleteParams::default())
                .await
                .unwrap();
        },
        "Deleted",
    )
    .await;
}

#[tokio::test]
async fn a_conflicting_identity_withdraws_everything_the_agent_holds() {
    agent_change_withdraws_its_files(
        "conflict",
        async |s: &Stack| s.identity("impostor", "bot-sa").await,
        "Conflict",
    )
    .await;
}

/// Content of rotation `n`: a header repeated a rotation-dependent number
/// of times, so a torn or truncated read is detectable.
fn rotation_value(n: usize) -> String {
    format!("rotation-{n:04}|").repeat(40 + n * 7)
}

fn is_whole_rotation(bytes: &[u8]) -> bool {
    let Some(header) = bytes.get(..14) else {
        return false;
    };
    std::str::from_utf8(header)
        .ok()
        .and_then(|h| h.strip_prefix("rotation-"))
        .and_then(|h| h.strip_suffix('|'))
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| bytes == rotation_value(n).as_bytes())
}

#[tokio::test]
async fn rotations_reach_the_mount_and_readers_only_ever_see_whole_values() {
    let s = Stack::new("rotate").await;
    s.identity("bot", "bot-sa").await;
    s.secret("rotating", &[("value", &rotation_value(0))]).await;
    s.secret("steady", &[("value", "steady-value")]).await;
    s.grant("bot-a", "bot", "rotating", "a", |_| {}).await;
    s.grant("bot-b", "bot", "steady", "b", |_| {}).await;
    let pod = s.pod("bot-pod", "bot-sa").await;
    let target = s.publish(&pod).await.expect("published");
    s.await_stream().await;

    // A reader in a tight loop for the whole run: every read must be a
    // whole value; the path must always resolve.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let path = target.join("a");
        std::thread::spawn(move || {
            let (mut reads, mut missing, mut torn) = (0_u64, 0_u64, 0_u64);
            while !stop.load(Ordering::Relaxed) {
                match std::fs::read(&path) {
                    Ok(bytes) if is_whole_rotation(&bytes) => reads += 1,
                    Ok(_) => torn += 1,
                    Err(_) => missing += 1,
                }
            }
            (reads, missing, torn)
        })
    };

    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let mut latencies = Vec::new();
    for n in 1..=100 {
        let value = rotation_value(n);
        let started = Instant::now();
        secrets
            .patch(
                "rotating",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"value": value}})),
            )
            .await
            .unwrap();
        let path = target.join("a");
        latencies.push(within(&format!("rotation {n}"), started, || {
            std::fs::read(&path).is_ok_and(|bytes| bytes == value.as_bytes())
        }));
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, missing, torn) = reader.join().unwrap();
    latencies.sort();
    eprintln!(
        "100 rotations: p50 {:?}, p99 {:?}, max {:?}; reader: {reads} whole reads, {missing} missing, {torn} torn",
        latencies[49], latencies[98], latencies[99]
    );
    assert_eq!(missing, 0, "the file was missing during a rotation");
    assert_eq!(torn, 0, "a reader saw a partial or mixed value");
    assert!(reads > 100);
    assert!(latencies[98] < DEADLINE, "p99 {:?}", latencies[98]);
    assert_eq!(
        std::fs::read_to_string(target.join("b")).unwrap(),
        "steady-value"
    );
    let event = s.event("SecretRotated", "bot-a").await;
    assert_eq!(event.action.as_deref(), Some("Rotate"));
    // One audit line per rotation (written just after the swap).
    wait_for_desc("100 SecretRotated audit lines", WAIT, async || {
        (s.plugin()
            .audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "SecretRotated" && l["grant"] == "bot-a")
            .count()
            >= 100)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_revocation_while_the_plugin_is_down_lands_when_it_restarts() {
    let mut s = Stack::new("restart").await;
    let (pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    s.await_stream().await;

    s.plugin.take().expect("running").kill();
    s.patch_grant("bot-a", json!({"revoked": true})).await;
    s.await_phase("bot-a", GrantPhase::Revoked).await;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(listing(&target), ["a", "b"], "nobody withdrew while down");

    // Restarted: the registry is reloaded, the stream's RESYNC checks the
    // grants (GrantStates: the plugin holds no pod token yet).
    let started = Instant::now();
    s.start_plugin().await;
    let took = within("revocation applied after restart", started, || {
        !target.join("a").exists()
    });
    eprintln!("revocation applied {took:?} after the restart");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_b_kept(&s, "bot", &target);
    assert!(s.plugin().logs().contains("registry loaded"));
    wait_for_desc("audit line", WAIT, async || {
        s.plugin()
            .audit_lines()
            .iter()
            .any(|l| l["event"] == "ContentWithdrawn")
            .then_some(())
    })
    .await;
    assert_withdrawn_audit(&s, &pod, "bot-a", "Revoked");

    // Reinstating needs the pod's token: it arrives with the next republish,
    // after which pushes re-resolve again.
    assert_eq!(s.publish(&pod).await.expect("republish"), target);
    let started = Instant::now();
    s.patch_grant("bot-a", json!({"revoked": false})).await;
    let took = within("reinstated after restart", started, || {
        target.join("a").exists()
    });
    assert!(took < DEADLINE, "took {took:?}");
}

async fn probe(socket: &Path) -> Option<bool> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .ok()?;
    IdentityClient::new(channel)
        .probe(ProbeRequest {})
        .await
        .ok()?
        .into_inner()
        .ready
}

#[tokio::test]
async fn grants_expire_on_time_while_the_controller_is_down() {
    let mut s = Stack::new("no-controller").await;
    let (pod, target) = s
        .agent_with_two_grants("bot", |spec| spec.ttl = Some("12s".into()))
        .await;
    s.await_stream().await;
    assert_eq!(probe(&s.socket).await, Some(true));
    let expires_at = s
        .grants()
        .get("bot-a")
        .await
        .unwrap()
        .status
        .and_then(|status| status.expires_at)
        .expect("effective expiry")
        .0;

    // Custody goes with the controller.
    s.controller.take().expect("running").kill();
    let plugin = s.plugin();
    wait_for_desc("the stream to drop", WAIT, async || {
        plugin
            .logs()
            .contains("custody invalidation stream disconnected")
            .then_some(())
    })
    .await;
    let left = expires_at.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(
        left > k8s_openapi::jiff::SignedDuration::from_secs(1),
        "the setup was too slow: the grant expires {left} after the controller stopped"
    );

    within("expired file withdrawn", Instant::now(), || {
        !target.join("a").exists()
    });
    let late = k8s_openapi::jiff::Timestamp::now().duration_since(expires_at);
    eprintln!("withdrawn {late} after expiresAt with the controller down");
    assert!(late >= k8s_openapi::jiff::SignedDuration::from_millis(-50));
    assert!(
        late < k8s_openapi::jiff::SignedDuration::from_secs(2),
        "{late}"
    );
    assert_b_kept(&s, "bot", &target);
    wait_for_desc("audit line", WAIT, async || {
        s.plugin()
            .audit_lines()
            .iter()
            .any(|l| l["event"] == "ContentWithdrawn")
            .then_some(())
    })
    .await;
    assert_withdrawn_audit(&s, &pod, "bot-a", "Expired");

    // Probe is honest: custody is unreachable (its answer is cached ≤ 5 s).
    let socket = s.socket.clone();
    wait_for_desc("Probe to report not ready", WAIT, async || {
        (probe(&socket).await == Some(false)).then_some(())
    })
    .await;

    // A republish while custody is down succeeds and keeps what is there.
    assert_eq!(s.publish(&pod).await.expect("republish"), target);
    assert_eq!(listing(&target), ["b"]);

    // The controller comes back (a new custody address: restart the
    // plugin pointed at it) and the stream reconnects.
    let (controller, custody) = start_controller(&s.ns).await;
    s.controller = Some(controller);
    s.custody = custody;
    s.plugin.take().expect("running").kill();
    s.start_plugin().await;
    s.await_stream().await;
    assert_eq!(probe(&s.socket).await, Some(true));
    assert_b_kept(&s, "bot", &target);
}

#[tokio::test]
async fn the_plugin_reconnects_with_backoff_while_custody_is_away() {
    let mut s = Stack::new("reconnect").await;
    let (_pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    s.await_stream().await;
    // Custody vanishes and comes back on the same address.
    let addr = s.custody.clone();
    s.controller.take().expect("running").kill();
    std::thread::sleep(Duration::from_secs(3));
    let controller = ControllerProcess::start(
        &s.ns,
        &[
            "--custody-listen",
            &addr,
            "--custody-plaintext",
            "--node-service-account",
            &format!("{}/node-plugin", s.ns),
        ],
    );
    controller
        .wait_for_log(|l| l.contains("caches synced"), WAIT)
        .await;
    s.controller = Some(controller);
    let plugin = s.plugin();
    wait_for_desc("the stream to reconnect", WAIT, async || {
        (plugin
            .logs()
            .matches("custody invalidation stream connected")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    let logs = plugin.logs();
    assert!(logs.contains("cannot open the custody invalidation stream"));
    assert!(logs.contains("reconnecting to custody"));
    // Backoff: a few attempts in three seconds, not hundreds.
    let attempts = logs
        .matches("cannot open the custody invalidation stream")
        .count();
    assert!((1..=12).contains(&attempts), "{attempts} attempts");
    // And pushes work again.
    let started = Instant::now();
    s.patch_grant("bot-a", json!({"revoked": true})).await;
    gone_in_time("revoked after reconnect", &target.join("a"), started);
    assert_b_kept(&s, "bot", &target);
}

#[tokio::test]
async fn a_republish_converges_idempotently_and_never_fails_to_withdraw() {
    let s = Stack::new("republish").await;
    let (pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    s.await_stream().await;

    // Unchanged content is not rewritten.
    let version = std::fs::read_link(target.join("..data")).unwrap();
    assert_eq!(s.publish(&pod).await.expect("republish"), target);
    assert_eq!(std::fs::read_link(target.join("..data")).unwrap(), version);
    assert_eq!(listing(&target), ["a", "b"]);

    // The pod object is deleted (no invalidation covers that): custody
    // refuses a republish once TokenReview refuses the deleted pod's token
    // (custody reads no Pod: the token's claims name it, and the API server
    // caches a review for up to 10 s), which withdraws everything and still
    // returns OK (kubernetes#121271).
    Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .delete(&pod.info.name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    wait_for_desc("pod gone", WAIT, async || {
        pods.get_opt(&pod.info.name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    wait_for_desc("a republish that withdraws everything", WAIT, async || {
        assert_eq!(
            s.publish(&pod).await.expect("republish after refusal"),
            target
        );
        if listing(&target).is_empty() {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        None
    })
    .await;
    assert!(is_mounted(&target));
    wait_for_desc("audit lines", WAIT, async || {
        (s.plugin()
            .audit_lines()
            .iter()
            .filter(|l| l["event"] == "ContentWithdrawn")
            .count()
            == 2)
            .then_some(())
    })
    .await;

    // Kubelet's unpublish still works.
    s.kubelet
        .unpublish(&pod.info.uid, VOLUME)
        .await
        .unwrap()
        .expect("unpublished");
    assert!(!target.exists());
}

/// Both metrics endpoints, scraped against the real stack: the series move
/// with what happens (publish, a denial, a revocation, a rotation, unpublish).
#[tokio::test]
async fn the_controller_and_the_node_plugin_metrics_follow_what_happens() {
    use common::scrape::{self, Scrape};
    let s = Stack::new("metrics").await;
    let controller_addr = {
        let logs = s.controller.as_ref().unwrap().logs();
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["metrics_addr"].as_str().map(str::to_owned))
            .expect("controller metrics_addr")
    };
    let plugin_addr = wait_for_desc("node plugin metrics_addr", WAIT, async || {
        s.plugin().metrics_addr()
    })
    .await;
    let scrape_both = async || -> (Scrape, Scrape) {
        (
            scrape::endpoint(&controller_addr)
                .await
                .expect("controller /metrics"),
            scrape::endpoint(&plugin_addr)
                .await
                .expect("plugin /metrics"),
        )
    };
    s.await_stream().await;
    let (c0, n0) = scrape_both().await;
    assert_eq!(
        n0.sum("scopehold_node_push_stream_connected", &[]),
        1.0,
        "{}",
        n0.text
    );
    assert_eq!(n0.sum("scopehold_node_volumes_mounted", &[]), 0.0);
    assert_eq!(
        c0.sum("scopehold_custody_invalidation_streams", &[]),
        1.0,
        "{}",
        c0.text
    );

    let (pod, target) = s.agent_with_two_grants("bot", |_| {}).await;
    // A pod of no agent: denied (NoAgentIdentity), nothing mounted.
    create_service_account(&s.client, &s.ns, "stranger-sa").await;
    let stranger = s.pod("stranger", "stranger-sa").await;
    let denied = s.publish(&stranger).await.expect_err("denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // A revocation, then a rotation of the other grant's Secret.
    let started = Instant::now();
    s.patch_grant("bot-a", json!({"revoked": true})).await;
    gone_in_time("revoked", &target.join("a"), started);
    Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .patch(
            "bot-b",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"value": "metrics-rotated"}})),
        )
        .await
        .unwrap();
    wait_for_desc("rotated", WAIT, async || {
        (std::fs::read_to_string(target.join("b")).ok()? == "metrics-rotated").then_some(())
    })
    .await;

    let (c1, n1) = wait_for_desc("the series moved", WAIT, async || {
        let (c, n) = scrape_both().await;
        (n.sum(
            "scopehold_node_invalidations_applied_total",
            &[("kind", "rotated")],
        ) >= 1.0
            && c.sum(
                "scopehold_custody_node_reports_total",
                &[("kind", "SecretRotated")],
            ) >= 1.0)
            .then_some((c, n))
    })
    .await;
    let moved = |a: &Scrape, b: &Scrape, name: &str, labels: &[(&str, &str)]| {
        b.sum(name, labels) - a.sum(name, labels)
    };
    // Custody: the publishes and the rotation's refresh were allowed, the
    // stranger denied; each Resolve timed; invalidations sent on the stream.
    assert!(
        moved(
            &c0,
            &c1,
            "scopehold_custody_decisions_total",
            &[("result", "allowed"), ("reason", "Granted")]
        ) >= 2.0,
        "{}",
        c1.text
    );
    assert_eq!(
        moved(
            &c0,
            &c1,
            "scopehold_custody_decisions_total",
            &[("result", "denied"), ("reason", "NoAgentIdentity")]
        ),
        1.0,
        "{}",
        c1.text
    );
    assert!(
        moved(
            &c0,
            &c1,
            "scopehold_custody_resolve_duration_seconds_count",
            &[]
        ) >= 3.0
    );
    assert!(
        moved(
            &c0,
            &c1,
            "scopehold_custody_invalidations_sent_total",
            &[("kind", "revoked")]
        ) >= 1.0
    );
    assert!(
        moved(
            &c0,
            &c1,
            "scopehold_custody_invalidations_sent_total",
            &[("kind", "rotated")]
        ) >= 1.0
    );
    assert!(moved(&c0, &c1, "scopehold_event_occurrences_total", &[]) >= 4.0);
    // The node plugin: two publishes (one failed with PermissionDenied),
    // one volume mounted and registered, the revocation and rotation applied.
    assert!(
        moved(
            &n0,
            &n1,
            "scopehold_node_publish_duration_seconds_count",
            &[]
        ) >= 2.0
    );
    assert_eq!(
        moved(
            &n0,
            &n1,
            "scopehold_node_errors_total",
            &[
                ("method", "NodePublishVolume"),
                ("code", "PermissionDenied")
            ]
        ),
        1.0,
        "{}",
        n1.text
    );
    assert_eq!(n1.sum("scopehold_node_volumes_mounted", &[]), 1.0);
    assert_eq!(n1.sum("scopehold_node_registry_entries", &[]), 1.0);
    assert!(
        moved(
            &n0,
            &n1,
            "scopehold_node_invalidations_applied_total",
            &[("kind", "revoked")]
        ) >= 1.0
    );
    assert!(moved(&n0, &n1, "scopehold_node_invalidations_received_total", &[]) >= 2.0);

    s.kubelet
        .unpublish(&pod.info.uid, VOLUME)
        .await
        .unwrap()
        .expect("unpublished");
    let (_, n2) = scrape_both().await;
    assert_eq!(n2.sum("scopehold_node_volumes_mounted", &[]), 0.0);
    assert_eq!(n2.sum("scopehold_node_registry_entries", &[]), 0.0);
    assert_eq!(
        moved(
            &n1,
            &n2,
            "scopehold_node_unpublish_duration_seconds_count",
            &[]
        ),
        1.0
    );
}

/// Writes objects of `K` (made by `make` from a sequence number) in `ns` until a
/// watch from resourceVersion `rv` is answered `410 Gone`: the API server's watch
/// cache then no longer holds the events after `rv`, and a controller whose watch
/// stopped there must relist. The cache keeps events for at least 75 s (its
/// freshness window) and grows while they are younger, so the caller waits that
/// out first.
async fn push_watch_cache_past<K>(client: &Client, ns: &str, rv: &str, make: impl Fn(usize) -> K)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    use futures::{StreamExt, TryStreamExt};
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let kind = K::kind(&()).into_owned();
    for round in 0..40 {
        let gone = match api
            .watch(&kube::api::WatchParams::default().timeout(1), rv)
            .await
        {
            Ok(stream) => {
                let first = stream.boxed().try_next().await;
                matches!(first, Ok(Some(kube::api::WatchEvent::Error(ref e))) if e.code == 410)
            }
            Err(kube::Error::Api(status)) => status.code == 410,
            Err(_) => false,
        };
        if gone {
            eprintln!("{kind} watch cache past {rv} after {round} rounds");
            return;
        }
        futures::stream::iter(0..100)
            .map(|i| {
                let (api, object) = (api.clone(), make(round * 100 + i));
                async move { api.create(&PostParams::default(), &object).await.unwrap() }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
    }
    panic!("{kind}: a watch from {rv} is still served after 4000 writes");
}

/// Longest a watch may take to relist once its API server is reachable
/// again: the watches' own backoff (at most 5 s between attempts) plus the
/// relist itself.
const RELIST_AFTER_RESTORE: Duration = Duration::from_secs(8);

/// The current resourceVersion of `K`'s list.
async fn list_rv<K>(client: &Client, ns: &str) -> String
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap()
}

/// A controller cut off from the API server long enough that its watches get
/// `410 Gone` must treat the relist as a full resync: a Secret deleted, a grant
/// revoked, a grant deleted and an agent suspended in the gap are withdrawn from
/// running pods within a second or two of the relist, and never served again.
///
/// Each watch must also come back promptly once the API server is reachable:
/// kube's `Controller` used to add its own backoff (up to 30 s plus jitter)
/// to the grant and identity watches, so their relists, and the withdrawals
/// they carry, came 30-55 s after the connection was restored.
#[tokio::test]
async fn changes_made_while_the_controller_was_cut_off_land_at_the_relist() {
    let s = Stack::behind_proxy("relist").await;
    let (sdel_pod, sdel) = s.agent_with_two_grants("sdel", |_| {}).await;
    let (rev_pod, rev) = s.agent_with_two_grants("rev", |_| {}).await;
    let (gdel_pod, gdel) = s.agent_with_two_grants("gdel", |_| {}).await;
    let (sus_pod, sus) = s.agent_with_two_grants("sus", |_| {}).await;
    s.await_stream().await;
    let controller = s.controller.as_ref().unwrap();
    let proxy = s.proxy.as_ref().unwrap();

    // The controller's watches know at most these versions.
    let rvs = (
        list_rv::<Secret>(&s.client, &s.ns).await,
        list_rv::<SecretGrant>(&s.client, &s.ns).await,
        list_rv::<AgentIdentity>(&s.client, &s.ns).await,
    );
    proxy.cut();
    let cut = Instant::now();
    Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .delete("sdel-a", &DeleteParams::default())
        .await
        .unwrap();
    s.patch_grant("rev-a", json!({"revoked": true})).await;
    s.grants()
        .delete("gdel-a", &DeleteParams::default())
        .await
        .unwrap();
    s.patch_identity("sus", json!({"suspended": true})).await;
    // Nothing reaches the pods while the controller cannot see the changes
    // (this is what the relist must repair).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(listing(&sdel), ["a", "b"]);
    assert_eq!(listing(&sus), ["a", "b"]);

    // Push every watch cache past what the controller knows.
    let churn = test_namespace(&s.client, "relist-churn").await;
    let fresh = Duration::from_secs(80);
    tokio::time::sleep(fresh.saturating_sub(cut.elapsed())).await;
    push_watch_cache_past(&s.client, &churn, &rvs.0, |i| Secret {
        metadata: ObjectMeta {
            name: Some(format!("churn-{i}")),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    push_watch_cache_past(&s.client, &churn, &rvs.1, |i| {
        SecretGrant::new(
            &format!("churn-{i}"),
            SecretGrantSpec {
                agent: "nobody".into(),
                secret_name: "nothing".into(),
                keys: vec![GrantedKey {
                    key: "k".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    })
    .await;
    push_watch_cache_past(&s.client, &churn, &rvs.2, |i| {
        AgentIdentity::new(
            &format!("churn-{i}"),
            AgentIdentitySpec {
                service_account_name: "nobody".into(),
                ..Default::default()
            },
        )
    })
    .await;

    proxy.restore();
    let restored = Instant::now();
    // Record when each watch relisted (the controller says so at the 410) and
    // when each file left its pod.
    let files = [
        ("secrets", sdel.join("a")),
        ("secretgrants", rev.join("a")),
        ("secretgrants", gdel.join("a")),
        ("agentidentities", sus.join("a")),
        ("agentidentities", sus.join("b")),
    ];
    let mut relisted: HashMap<&str, Instant> = HashMap::new();
    let mut withdrawn: HashMap<PathBuf, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while relisted.len() < 3 || withdrawn.len() < files.len() {
        assert!(
            Instant::now() < deadline,
            "after reconnecting: relisted {:?}, withdrawn {:?} of {files:?}",
            relisted.keys().collect::<Vec<_>>(),
            withdrawn.keys().collect::<Vec<_>>()
        );
        let logs = controller.logs();
        for line in logs.lines().filter(|l| l.contains("relisting now")) {
            for resource in ["secrets", "secretgrants", "agentidentities"] {
                if line.contains(&format!("\"resource\":\"{resource}\"")) {
                    relisted.entry(resource).or_insert_with(Instant::now);
                }
            }
        }
        for (_, file) in &files {
            if file.symlink_metadata().is_err() {
                withdrawn.entry(file.clone()).or_insert_with(Instant::now);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (resource, at) in &relisted {
        let after = at.saturating_duration_since(restored);
        eprintln!("{resource} relisted {after:?} after the connection was restored");
        // The watches retry at most 5 s apart while the API server is away,
        // plus a probe: a relist later than this waited on another backoff.
        assert!(
            after < RELIST_AFTER_RESTORE,
            "{resource} relisted {after:?} after the connection was restored"
        );
    }
    for (resource, file) in &files {
        let late = withdrawn[file].saturating_duration_since(relisted[resource]);
        eprintln!(
            "{} withdrawn {late:?} after the {resource} relist",
            file.display()
        );
        assert!(
            late < DEADLINE,
            "{} withdrawn {late:?} after the relist",
            file.display()
        );
    }
    assert_b_kept(&s, "sdel", &sdel);
    assert_b_kept(&s, "rev", &rev);
    assert_b_kept(&s, "gdel", &gdel);

    // Never served again: kubelet's republish of each pod, and a new pod.
    for (pod, target, left) in [
        (&sdel_pod, &sdel, vec!["b"]),
        (&rev_pod, &rev, vec!["b"]),
        (&gdel_pod, &gdel, vec!["b"]),
        (&sus_pod, &sus, vec![]),
    ] {
        s.publish(pod).await.expect("republish");
        assert_eq!(listing(target), left, "{}", pod.info.name);
    }
    let fresh_pod = s.pod("sdel-pod-2", "sdel-sa").await;
    let target = s.publish(&fresh_pod).await.expect("new pod published");
    assert_eq!(
        listing(&target),
        ["b"],
        "a new pod must not get the deleted Secret"
    );
    s.await_phase("rev-a", GrantPhase::Revoked).await;
    let grants = s.grants();
    wait_for_desc("sdel-a no longer Active", WAIT, async || {
        (grants.get("sdel-a").await.ok()?.phase() != Some(GrantPhase::Active)).then_some(())
    })
    .await;
}

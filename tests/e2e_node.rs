//! End to end on a real node: kubelet v1.36.3, containerd, runc, the real
//! controllers, and ScopeHold installed by `helm install` of the chart
//! (tests/common/cluster.rs, hack/cluster.sh). The agent is a real container;
//! every read is `kubectl exec` inside it.
//!
//! Timing inside the container: a watcher started in the agent container
//! (kubectl exec) polls the file every 20 ms and prints the host's uptime
//! (`/proc/uptime` is not namespaced) when it sees the change; the test reads
//! the uptime just before its API write. The difference is what the agent
//! experiences, without kubectl's own latency. The bound ([`DEADLINE`]) is far
//! below kubelet's republish period (20 s here), so only the push path meets it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{AGENT_IMAGE, Cluster, RELEASE_NAMESPACE, cluster_with_scopehold};
use common::create_service_account;
use common::objects::{create_grant, create_identity, create_secret, key};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scopehold::api::{AgentIdentity, SecretGrant};
use serde_json::json;

/// How fast a change must reach the file inside the container ("within a
/// second or two", as tests/revocation.rs; figures in BENCHMARKS.md).
const DEADLINE: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(60);
const MOUNT: &str = "/var/run/secrets/scopehold";

struct Agent {
    ns: String,
    pod: String,
    client: Client,
}

impl Agent {
    /// Secret `api` {token, other}, ServiceAccount + AgentIdentity `bot`,
    /// SecretGrant `bot-api` of `token`, and a running agent pod `agent`
    /// mounting the CSI volume read-only.
    async fn start(c: &Cluster, prefix: &str) -> Self {
        let client = c.client().await;
        let ns = c.namespace(&client, prefix).await;
        create_service_account(&client, &ns, "bot").await;
        create_secret(
            &client,
            &ns,
            "api",
            &[("token", "v1-secret"), ("other", "never-granted")],
        )
        .await;
        create_identity(&client, &ns, "bot", "bot", false).await;
        create_grant(
            &client,
            &ns,
            "bot-api",
            "bot",
            "api",
            vec![key("token")],
            |_| {},
        )
        .await;
        let agent = Self {
            ns,
            pod: "agent".into(),
            client,
        };
        agent
            .run_pod(c, "agent", json!({"readOnly": true}), true)
            .await;
        agent
    }

    /// Creates an agent pod whose CSI volume has `csi_extra` and waits until
    /// it runs (`wait_running`).
    async fn run_pod(
        &self,
        c: &Cluster,
        name: &str,
        csi_extra: serde_json::Value,
        read_only_mount: bool,
    ) -> Pod {
        let mut csi = json!({"driver": "csi.scopehold.dev"});
        if let (Some(csi), Some(extra)) = (csi.as_object_mut(), csi_extra.as_object()) {
            csi.extend(extra.clone());
        }
        let mut mount = json!({"name": "credentials", "mountPath": MOUNT});
        if read_only_mount {
            mount["readOnly"] = json!(true);
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": "bot",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "agent",
                    "image": AGENT_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [mount],
                }],
                "volumes": [{"name": "credentials", "csi": csi}],
            }
        }))
        .unwrap();
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.ns);
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let pod = pods.get(name).await.unwrap();
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running {
                return pod;
            }
            assert!(
                Instant::now() < deadline,
                "agent pod {}/{name} not Running after {WAIT:?}: {:?}\n{}",
                self.ns,
                pod.status,
                c.describe_release()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn exec(&self, c: &Cluster, cmd: &[&str]) -> (bool, String, String) {
        self.exec_in(c, &self.pod, cmd)
    }

    fn exec_in(&self, c: &Cluster, pod: &str, cmd: &[&str]) -> (bool, String, String) {
        let out = c.exec(&self.ns, pod, Some("agent"), cmd);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn read(&self, c: &Cluster, file: &str) -> Option<String> {
        let (ok, out, _) = self.exec(c, &["cat", &format!("{MOUNT}/{file}")]);
        ok.then_some(out)
    }

    async fn patch_grant(&self, name: &str, spec: serde_json::Value) {
        Api::<SecretGrant>::namespaced(self.client.clone(), &self.ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    async fn patch_identity(&self, name: &str, spec: serde_json::Value) {
        Api::<AgentIdentity>::namespaced(self.client.clone(), &self.ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }
}

/// The host's uptime in seconds (the clock the in-container watcher prints).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A shell loop in the agent container that waits until `condition` (a shell
/// test) holds and prints the uptime then.
struct Watcher {
    child: Child,
    /// The child's stdout, read through one buffer (the first line and the
    /// answer can arrive together).
    out: BufReader<std::process::ChildStdout>,
    what: String,
}

impl Watcher {
    fn start(c: &Cluster, agent: &Agent, what: &str, condition: &str) -> Self {
        let script = format!(
            "echo watching; i=0; until {condition}; do usleep 20000; i=$((i+1)); \
             [ $i -gt 3000 ] && {{ echo timeout; exit 1; }}; done; cat /proc/uptime"
        );
        let mut child = Command::new("/usr/bin/kubectl")
            .arg("--kubeconfig")
            .arg(&c.kubeconfig)
            .args([
                "exec", "-n", &agent.ns, &agent.pod, "-c", "agent", "--", "sh", "-c", &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "watching", "watcher for {what} did not start");
        Self {
            child,
            out,
            what: what.into(),
        }
    }

    /// Waits for the watcher; returns how long after `since` (host uptime)
    /// the container saw the change.
    fn seen_after(mut self, since: f64) -> Duration {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        let _ = self.child.wait();
        let seen: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{}: the container never saw it ({rest:?})", self.what));
        let took = Duration::from_secs_f64((seen - since).max(0.0));
        eprintln!("{}: seen in the container after {took:?}", self.what);
        took
    }
}

fn file_gone(file: &str) -> String {
    format!("[ ! -e {MOUNT}/{file} ]")
}

fn file_is(file: &str, value: &str) -> String {
    format!("[ \"$(cat {MOUNT}/{file} 2>/dev/null)\" = '{value}' ]")
}

fn assert_in_time(what: &str, took: Duration) {
    assert!(
        took < DEADLINE,
        "{what} took {took:?} (deadline {DEADLINE:?})"
    );
}

/// Steps 1–5 in a real container: the granted key is readable, the ungranted
/// one absent, and the resolution left an Event and a JSON audit line.
#[tokio::test(flavor = "multi_thread")]
async fn five_steps_in_a_real_pod() {
    let c = cluster_with_scopehold();
    let _shared = c.shared().await;
    let agent = Agent::start(c, "five-steps").await;

    assert_eq!(agent.read(c, "token").as_deref(), Some("v1-secret"));
    let (ok, listing, _) = agent.exec(c, &["ls", "-a", MOUNT]);
    assert!(ok);
    assert!(
        !listing.contains("other"),
        "ungranted key in the volume: {listing}"
    );
    assert!(agent.read(c, "other").is_none());
    // The agent is root in its container and still cannot write the volume.
    let (ok, _, _) = agent.exec(c, &["sh", "-c", &format!("echo x > {MOUNT}/token")]);
    assert!(!ok, "root in the container wrote the secret file");
    assert_eq!(agent.read(c, "token").as_deref(), Some("v1-secret"));

    // Step 5: the Event and the JSON line.
    let events = Api::<Event>::namespaced(agent.client.clone(), &agent.ns);
    let deadline = Instant::now() + WAIT;
    let event = loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        if let Some(e) = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SecretResolved"))
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no SecretResolved Event in {}",
            agent.ns
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let regarding = event.regarding.unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("SecretGrant"));
    assert_eq!(regarding.name.as_deref(), Some("bot-api"));
    // One Event series per grant and content, related to the identity; the
    // pods are in the audit lines.
    let related = event.related.unwrap();
    assert_eq!(related.kind.as_deref(), Some("AgentIdentity"));
    assert_eq!(related.name.as_deref(), Some("bot"));
    let note = event.note.unwrap_or_default();
    assert!(note.contains("token") && !note.contains("other"), "{note}");
    let logs = c.component_logs("controller");
    let line = logs
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, json)| json))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["event"] == "SecretResolved" && l["namespace"] == agent.ns.as_str())
        .unwrap_or_else(|| panic!("no SecretResolved audit line for {}", agent.ns));
    assert_eq!(line["pod"], "agent");
    assert_eq!(line["grant"], "bot-api");
    assert_eq!(line["keys"], "token");
    // No value in any log of the release.
    for component in ["controller", "node"] {
        let logs = c.component_logs(component);
        assert!(
            !logs.contains("v1-secret") && !logs.contains("never-granted"),
            "{component} logged a value"
        );
    }
}

/// Rotation, revocation, grant deletion, expiry and suspension each reach the
/// file inside the running container within the deadline (push path).
#[tokio::test(flavor = "multi_thread")]
async fn changes_reach_the_container() {
    let c = cluster_with_scopehold();
    let _shared = c.shared().await;
    let agent = Agent::start(c, "changes").await;
    assert_eq!(agent.read(c, "token").as_deref(), Some("v1-secret"));
    let secrets = Api::<Secret>::namespaced(agent.client.clone(), &agent.ns);
    let grants = Api::<SecretGrant>::namespaced(agent.client.clone(), &agent.ns);

    // Rotation.
    let w = Watcher::start(c, &agent, "rotation", &file_is("token", "v2-secret"));
    let t = uptime();
    secrets
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": "v2-secret"}})),
        )
        .await
        .unwrap();
    assert_in_time("rotation", w.seen_after(t));

    // Revocation, then back.
    let w = Watcher::start(c, &agent, "revocation", &file_gone("token"));
    let t = uptime();
    agent.patch_grant("bot-api", json!({"revoked": true})).await;
    assert_in_time("revocation", w.seen_after(t));
    let w = Watcher::start(c, &agent, "un-revocation", &file_is("token", "v2-secret"));
    let t = uptime();
    agent
        .patch_grant("bot-api", json!({"revoked": false}))
        .await;
    w.seen_after(t);

    // Suspension, then back.
    let w = Watcher::start(c, &agent, "suspension", &file_gone("token"));
    let t = uptime();
    agent
        .patch_identity("bot", json!({"suspended": true}))
        .await;
    assert_in_time("suspension", w.seen_after(t));
    let w = Watcher::start(c, &agent, "resumption", &file_is("token", "v2-secret"));
    let t = uptime();
    agent
        .patch_identity("bot", json!({"suspended": false}))
        .await;
    w.seen_after(t);

    // Expiry: a second grant of `other` that expires in 8 s.
    let expires =
        // Whole seconds: the API keeps expiresAt to the second.
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second() + 8)
            .unwrap();
    create_grant(
        &agent.client,
        &agent.ns,
        "bot-other",
        "bot",
        "api",
        vec![key("other")],
        |spec| {
            spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                expires,
            ));
        },
    )
    .await;
    let w = Watcher::start(
        c,
        &agent,
        "expiring grant delivered",
        &format!("[ -e {MOUNT}/other ]"),
    );
    w.seen_after(uptime());
    let w = Watcher::start(c, &agent, "expiry", &file_gone("other"));
    let until_expiry = expires.duration_since(k8s_openapi::jiff::Timestamp::now());
    let t = uptime() + until_expiry.as_secs_f64().max(0.0);
    assert_in_time("expiry", w.seen_after(t));

    // Grant deletion.
    let w = Watcher::start(c, &agent, "grant deletion", &file_gone("token"));
    let t = uptime();
    grants
        .delete("bot-api", &DeleteParams::default())
        .await
        .unwrap();
    assert_in_time("grant deletion", w.seen_after(t));
}

/// Kubelet republishes the volume on its own (requiresRepublish) at the pod
/// sync period, and that does not add an Event per republish.
#[tokio::test(flavor = "multi_thread")]
async fn kubelet_republishes_on_its_own() {
    let c = cluster_with_scopehold();
    let _shared = c.shared().await;
    let agent = Agent::start(c, "republish").await;
    let count = |logs: &str, message: &str| {
        logs.lines()
            .filter(|l| {
                l.contains(message) && l.contains(&format!("\"namespace\":\"{}\"", agent.ns))
            })
            .count()
    };
    let logs = c.component_logs("node");
    assert_eq!(
        count(&logs, "\"volume published\""),
        1,
        "the first publish is logged once"
    );
    // Kubelet republishes a few times while the pod starts; the cadence is
    // what follows: wait for two more after the current count.
    let before = count(&logs, "\"volume republished\"");
    let started = Instant::now();
    // Two periods of 20 s; 90 s leaves room for jitter.
    let deadline = started + Duration::from_secs(90);
    let mut republished = before;
    while republished < before + 2 {
        assert!(
            Instant::now() < deadline,
            "kubelet republished {} times in 90 s",
            republished - before
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        republished = count(&c.component_logs("node"), "\"volume republished\"");
    }
    eprintln!(
        "kubelet republished the volume twice more in {:.0}s (syncFrequency 20s; {before} republishes during start-up)",
        started.elapsed().as_secs_f64()
    );
    let events = Api::<Event>::namespaced(agent.client.clone(), &agent.ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let resolved: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SecretResolved"))
        .collect();
    let count: i32 = resolved
        .iter()
        .map(|e| {
            e.deprecated_count.unwrap_or(1).max(1)
                + e.series.as_ref().map_or(0, |s| s.count - 1).max(0)
        })
        .sum();
    eprintln!(
        "SecretResolved Event objects: {}, counted occurrences: {count}",
        resolved.len()
    );
    assert!(
        resolved.len() <= 1,
        "one Event series per pod and grant, not one object per republish: {resolved:?}"
    );
    assert_eq!(agent.read(c, "token").as_deref(), Some("v1-secret"));
}

/// The tmpfs mount points of a pod's CSI volume on the host.
fn host_mounts_of(c: &Cluster, pod_uid: &str) -> Vec<String> {
    let prefix = format!(
        "{}/pods/{pod_uid}/volumes/kubernetes.io~csi/",
        c.kubelet_dir().display()
    );
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// Deleting the pod makes kubelet call NodeUnpublishVolume: the tmpfs is gone
/// from the host.
#[tokio::test(flavor = "multi_thread")]
async fn pod_deletion_removes_the_tmpfs_from_the_host() {
    let c = cluster_with_scopehold();
    let _shared = c.shared().await;
    let agent = Agent::start(c, "pod-deletion").await;
    let pods = Api::<Pod>::namespaced(agent.client.clone(), &agent.ns);
    let uid = pods.get("agent").await.unwrap().metadata.uid.unwrap();
    let mounts = host_mounts_of(c, &uid);
    assert_eq!(
        mounts.len(),
        1,
        "one tmpfs on the host for the pod's volume: {mounts:?}"
    );
    pods.delete("agent", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while pods.get_opt("agent").await.unwrap().is_some() || !host_mounts_of(c, &uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "pod or its tmpfs still there: {:?}",
            host_mounts_of(c, &uid)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = c.component_logs("node");
    assert!(
        logs.lines()
            .any(|l| l.contains("volume unpublished") && l.contains(&agent.ns)),
        "no NodeUnpublishVolume in the plugin's log"
    );
}

/// The node plugin's pod goes away and the DaemonSet brings it back: the
/// agent's mount stays intact throughout, and a revocation made while no
/// plugin ran is enforced once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn node_plugin_restart_keeps_mounts_and_catches_up() {
    let c = cluster_with_scopehold();
    let _alone = c.disruptive().await;
    let agent = Agent::start(c, "plugin-restart").await;
    let client = &agent.client;
    create_grant(
        client,
        &agent.ns,
        "bot-other",
        "bot",
        "api",
        vec![key("other")],
        |_| {},
    )
    .await;
    let w = Watcher::start(
        c,
        &agent,
        "second grant delivered",
        &format!("[ -e {MOUNT}/other ]"),
    );
    w.seen_after(uptime());
    let uid = Api::<Pod>::namespaced(client.clone(), &agent.ns)
        .get("agent")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let before = host_mounts_of(c, &uid);

    // No plugin on the node: the DaemonSet is told to select no node.
    let ds_name = format!("{}-node", common::cluster::RELEASE);
    let daemonsets =
        Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let park =
        json!({"spec": {"template": {"spec": {"nodeSelector": {"scopehold.dev/parked": "true"}}}}});
    daemonsets
        .patch(&ds_name, &PatchParams::default(), &Patch::Strategic(park))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !c.component_pods(client, "node").await.is_empty() {
        assert!(Instant::now() < deadline, "node plugin pod not gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // While it is away: the files stay readable, and a revocation happens.
    assert_eq!(agent.read(c, "token").as_deref(), Some("v1-secret"));
    agent
        .patch_grant("bot-other", json!({"revoked": true}))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        agent.read(c, "other").is_some(),
        "nothing should withdraw while the plugin is away"
    );

    // Back: the DaemonSet recreates the pod.
    let w = Watcher::start(
        c,
        &agent,
        "revocation made while the plugin was away",
        &file_gone("other"),
    );
    let unpark =
        json!({"spec": {"template": {"spec": {"nodeSelector": {"scopehold.dev/parked": null}}}}});
    daemonsets
        .patch(&ds_name, &PatchParams::default(), &Patch::Strategic(unpark))
        .await
        .unwrap();
    let t = uptime();
    let took = w.seen_after(t);
    eprintln!(
        "withdrawn {took:?} after the DaemonSet was restored (includes the plugin pod's start)"
    );
    assert_eq!(
        agent.read(c, "token").as_deref(),
        Some("v1-secret"),
        "the other grant's file is intact"
    );
    assert_eq!(
        host_mounts_of(c, &uid),
        before,
        "the same tmpfs, never remounted"
    );
    let out = c.kubectl(&[
        "rollout",
        "status",
        "-n",
        RELEASE_NAMESPACE,
        &format!("daemonset/{ds_name}"),
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "{}", c.describe_release());
}

/// The leader controller pod is killed: the other replica takes the Lease,
/// and a revocation made after the takeover reaches the container in time
/// and is reflected in the grant's status (only the leader writes status).
#[tokio::test(flavor = "multi_thread")]
async fn leader_killed_other_replica_takes_over() {
    let c = cluster_with_scopehold();
    let _alone = c.disruptive().await;
    let agent = Agent::start(c, "leader").await;
    let client = &agent.client;
    let leases = Api::<Lease>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let lease_name = |l: &Lease| l.metadata.name.clone().unwrap_or_default();
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let list = leases.list(&ListParams::default()).await.unwrap();
    let lease = list
        .items
        .iter()
        .find(|l| holder(l).is_some_and(|h| h.contains("controller")))
        .unwrap_or_else(|| panic!("no controller Lease: {:?}", list.items));
    let name = lease_name(lease);
    let leader = holder(lease).unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE);
    pods.delete(
        &leader,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(90);
    let new_leader = loop {
        let lease = leases.get(&name).await.unwrap();
        if let Some(h) = holder(&lease).filter(|h| *h != leader) {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "no replica took the Lease from {leader}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "{new_leader} took over {:?} after {leader} was killed",
        killed.elapsed()
    );
    let w = Watcher::start(c, &agent, "revocation after takeover", &file_gone("token"));
    let t = uptime();
    agent.patch_grant("bot-api", json!({"revoked": true})).await;
    assert_in_time("revocation after takeover", w.seen_after(t));
    let grants = Api::<SecretGrant>::namespaced(client.clone(), &agent.ns);
    let deadline = Instant::now() + WAIT;
    loop {
        let phase = grants
            .get("bot-api")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            .map(|p| format!("{p:?}"));
        if phase.as_deref() == Some("Revoked") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new leader never marked the grant Revoked: {phase:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = c.kubectl(&[
        "rollout",
        "status",
        "-n",
        RELEASE_NAMESPACE,
        "deployment/scopehold-controller",
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "{}", c.describe_release());
}

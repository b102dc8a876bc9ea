//! The demo's script.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt, ResourceExt};
use serde_json::json;

use super::kubelet::{KubeletPlayer, PodInfo};
use super::local::{self, NodePluginLayout, Process};
use super::{DemoError, DemoPaths};
use crate::api::{AgentIdentity, SecretGrant};

const NS: &str = "demo";
const SYSTEM_NS: &str = "scopehold-system";
const NODE: &str = "demo-node";
const VOLUME: &str = "credentials";
const WAIT: Duration = Duration::from_secs(30);

fn say(step: &str, text: &str) {
    println!("\n\x1b[1m{step}\x1b[0m {text}");
}

fn show(line: &str) {
    println!("    {line}");
}

fn step_err(what: &str) -> impl FnOnce(kube::Error) -> DemoError + '_ {
    move |e| DemoError::Step(format!("{what}: {e}"))
}

async fn apply(
    client: &Client,
    value: serde_json::Value,
    ns: Option<&str>,
) -> Result<(), DemoError> {
    let obj: kube::api::DynamicObject =
        serde_json::from_value(value).map_err(|e| DemoError::Step(format!("bad manifest: {e}")))?;
    let gvk = obj
        .types
        .as_ref()
        .map(kube::api::GroupVersionKind::try_from)
        .transpose()
        .map_err(|e| DemoError::Step(format!("bad manifest kind: {e}")))?
        .ok_or_else(|| DemoError::Step("manifest without kind".into()))?;
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    let api: Api<kube::api::DynamicObject> = match (ns, caps.scope) {
        (Some(ns), kube::discovery::Scope::Namespaced) => {
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        _ => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        &obj.name_any(),
        &PatchParams::apply("scopehold-demo").force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

async fn wait_until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> Result<T, DemoError> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(DemoError::Step(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn token(client: &Client, ns: &str, sa: &str, pod: &Pod) -> Result<String, DemoError> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![crate::api::TOKEN_AUDIENCE.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .map_err(step_err("requesting a bound token"))?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| DemoError::Step("TokenRequest without a token".into()))
}

fn pod(name: &str, sa: &str, fs_group: Option<i64>) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": sa,
            "securityContext": {"fsGroup": fs_group},
            "containers": [{"name": "agent", "image": "busybox:1.36"}],
            "volumes": [{"name": VOLUME, "csi": {"driver": "csi.scopehold.dev", "readOnly": true}}]
        }
    })
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with(".."))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))[..12].to_owned()
}

/// Runs the whole demo and cleans up after itself.
pub async fn run() -> Result<(), DemoError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(DemoError::NotRoot);
    }
    let paths = DemoPaths::discover()?;
    let dir = tempfile_dir()?;
    let result = run_in(&paths, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf, DemoError> {
    let dir = std::env::temp_dir().join(format!("scopehold-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| DemoError::Step(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

async fn run_in(paths: &DemoPaths, dir: &Path) -> Result<(), DemoError> {
    say(
        "Setting up.",
        "A real kube-apiserver with etcd on 127.0.0.1 (built on first use, then cached).",
    );
    let binary = local::apiserver_binary(&paths.repo).await?;
    let apiserver = local::start_apiserver(&binary, dir).await?;
    show(&format!("API server ready at {}", apiserver.url));
    let kubeconfig = Kubeconfig::read_from(&apiserver.kubeconfig)
        .map_err(|e| DemoError::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| DemoError::Kubeconfig(e.to_string()))?;
    let client = Client::try_from(config)?;

    for crd in [AgentIdentity::crd(), SecretGrant::crd()] {
        let mut value = serde_json::to_value(&crd).map_err(|e| DemoError::Step(e.to_string()))?;
        value["apiVersion"] = json!("apiextensions.k8s.io/v1");
        value["kind"] = json!("CustomResourceDefinition");
        apply(&client, value, None).await?;
    }
    show("CRDs AgentIdentity and SecretGrant installed");
    for ns in [NS, SYSTEM_NS] {
        apply(
            &client,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            None,
        )
        .await?;
    }
    apply(
        &client,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
        None,
    )
    .await?;
    for (ns, sa) in [(SYSTEM_NS, "scopehold-node"), (NS, "default")] {
        apply(
            &client,
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}),
            Some(ns),
        )
        .await?;
    }
    wait_until("the CRDs to be served", async || {
        Api::<SecretGrant>::namespaced(client.clone(), NS)
            .list(&Default::default())
            .await
            .ok()
    })
    .await?;

    let scopehold = &paths.scopehold;
    let mut controller = Process::spawn(
        scopehold,
        &[
            "controller",
            "--metrics-listen",
            "127.0.0.1:0",
            "--custody-listen",
            "127.0.0.1:0",
            "--custody-plaintext",
            "--node-service-account",
            "scopehold-system/scopehold-node",
            "--log-format",
            "json",
        ]
        .map(String::from),
        &apiserver.kubeconfig,
        dir.join("controller.log"),
    )?;
    let custody = controller.wait_for_field("custody_addr", WAIT).await?;
    controller.wait_for("caches synced", WAIT).await?;
    show(&format!(
        "controller running, custody on {custody} (plaintext: local demo only)"
    ));

    // The node plugin's own identity: a pod of its DaemonSet on this node.
    apply(
        &client,
        pod("scopehold-node", "scopehold-node", None),
        Some(SYSTEM_NS),
    )
    .await?;
    let plugin_pod = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
        .get("scopehold-node")
        .await?;
    let plugin_token = token(&client, SYSTEM_NS, "scopehold-node", &plugin_pod).await?;
    let layout = NodePluginLayout::under(dir);
    std::fs::write(&layout.token_file, &plugin_token)
        .map_err(|e| DemoError::Step(format!("writing the token file: {e}")))?;
    let node = Process::spawn(
        scopehold,
        &layout.args(NODE, &custody),
        &apiserver.kubeconfig,
        dir.join("node.log"),
    )?;
    wait_until("the node plugin socket", async || {
        layout.socket.exists().then_some(())
    })
    .await?;
    show(&format!(
        "node plugin serving CSI on {}",
        layout.socket.display()
    ));
    let kubelet = KubeletPlayer::new(&layout.socket, &layout.kubelet_dir);

    let outcome = five_steps(&client, &apiserver.kubeconfig, &kubelet, &controller).await;
    // Clean up the mount even when a step failed.
    let _ = cleanup(&client, &kubelet).await;
    let outcome = match outcome {
        Ok(mut sensitive) => {
            sensitive.push(plugin_token);
            check_no_leak(&client, &[&controller, &node], &sensitive).await
        }
        Err(e) => Err(e),
    };
    node.stop().await;
    controller.stop().await;
    drop(apiserver);
    if outcome.is_ok() {
        say(
            "Done.",
            "Everything started for this demo is stopped and removed.",
        );
    }
    outcome
}

/// The promise that values and tokens never reach logs, Events or statuses,
/// checked on everything this run produced.
async fn check_no_leak(
    client: &Client,
    processes: &[&Process],
    sensitive: &[String],
) -> Result<(), DemoError> {
    say(
        "Checking.",
        "No secret value or token in any log line, Event or status of this run.",
    );
    let mut everything: String = processes.iter().map(|p| p.logs()).collect();
    let events = Api::<Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await?;
    let grants = Api::<SecretGrant>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await?;
    let identities = Api::<AgentIdentity>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await?;
    for json in [
        serde_json::to_string(&events.items),
        serde_json::to_string(&grants.items),
        serde_json::to_string(&identities.items),
    ] {
        everything.push_str(&json.map_err(|e| DemoError::Step(e.to_string()))?);
    }
    if let Some(leaked) = sensitive
        .iter()
        .position(|v| everything.contains(v.as_str()))
    {
        return Err(DemoError::Step(format!(
            "sensitive string #{leaked} appears in the output of this run"
        )));
    }
    show(&format!(
        "{} bytes of logs, {} Events and every status checked: none of the {} values and tokens used appears",
        everything.len(),
        events.items.len(),
        sensitive.len()
    ));
    Ok(())
}

async fn cleanup(client: &Client, kubelet: &KubeletPlayer) -> Result<(), DemoError> {
    if let Some(uid) = Api::<Pod>::namespaced(client.clone(), NS)
        .get_opt("claude-code")
        .await?
        .and_then(|p| p.metadata.uid)
    {
        let _ = kubelet.unpublish(&uid, VOLUME).await?;
    }
    Ok(())
}

async fn five_steps(
    client: &Client,
    kubeconfig: &Path,
    kubelet: &KubeletPlayer,
    controller: &Process,
) -> Result<Vec<String>, DemoError> {
    let value = format!(
        "sb-demo-{}",
        digest(format!("{:?}", Instant::now()).as_bytes())
    );
    say(
        "1. Store one API key.",
        "A plain Kubernetes Secret; ScopeHold never copies it.",
    );
    apply(
        client,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "supabase"},
               "stringData": {"SUPABASE_SERVICE_KEY": value, "SUPABASE_URL": "https://example.supabase.co"}}),
        Some(NS),
    )
    .await?;
    show("secret/supabase with keys SUPABASE_SERVICE_KEY and SUPABASE_URL");

    say(
        "2. Create one agent identity.",
        "Pods running as ServiceAccount claude-code are the agent claude-code.",
    );
    apply(
        client,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "claude-code"}}),
        Some(NS),
    )
    .await?;
    apply(
        client,
        json!({"apiVersion": "scopehold.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "claude-code"},
               "spec": {"serviceAccountName": "claude-code", "owner": "platform-team", "maxGrantTTL": "8h"}}),
        Some(NS),
    )
    .await?;
    show("agentidentity/claude-code bound to serviceaccount/claude-code");

    say(
        "3. Grant only that key.",
        "For one hour, with a reason; SUPABASE_URL stays out of reach.",
    );
    apply(
        client,
        json!({"apiVersion": "scopehold.dev/v1alpha1", "kind": "SecretGrant", "metadata": {"name": "claude-code-supabase"},
               "spec": {"agent": "claude-code", "secretName": "supabase",
                        "keys": [{"key": "SUPABASE_SERVICE_KEY", "path": "supabase-key"}],
                        "ttl": "1h", "reason": "Run the database migrations for WEB-1234"}}),
        Some(NS),
    )
    .await?;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), NS);
    let active = wait_until("the grant to be Active", async || {
        let g = grants.get("claude-code-supabase").await.ok()?;
        (g.phase() == Some(crate::api::GrantPhase::Active)).then_some(g)
    })
    .await?;
    let status = active.status.unwrap_or_default();
    show(&format!(
        "secretgrant/claude-code-supabase is Active until {}, content digest {}",
        status
            .expires_at
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| "never".into()),
        status.content_digest.unwrap_or_default()
    ));

    say(
        "4. Resolve it at runtime.",
        "The agent's pod starts; kubelet asks the node plugin for its volume.",
    );
    apply(
        client,
        pod("claude-code", "claude-code", Some(1000)),
        Some(NS),
    )
    .await?;
    let agent_pod = Api::<Pod>::namespaced(client.clone(), NS)
        .get("claude-code")
        .await?;
    let pod_token = token(client, NS, "claude-code", &agent_pod).await?;
    let info = PodInfo {
        namespace: NS.into(),
        name: "claude-code".into(),
        uid: agent_pod.uid().unwrap_or_default(),
        service_account: "claude-code".into(),
        fs_group: Some(1000),
    };
    let request = kubelet.publish_request(&info, VOLUME, &pod_token, &HashMap::new(), true, true);
    let started = Instant::now();
    let target = kubelet
        .publish(request)
        .await?
        .map_err(|s| DemoError::Step(format!("NodePublishVolume failed: {}", s.message())))?;
    show(&format!(
        "NodePublishVolume succeeded in {:?} (token reviewed, pod checked, grant evaluated)",
        started.elapsed()
    ));
    show(&format!(
        "files in the pod's volume: {:?}",
        listing(&target)
    ));
    let file = target.join("supabase-key");
    let content = std::fs::read(&file)
        .map_err(|e| DemoError::Step(format!("reading {}: {e}", file.display())))?;
    if content != value.as_bytes() {
        return Err(DemoError::Step(
            "the mounted file does not hold the granted key".into(),
        ));
    }
    show(&format!(
        "supabase-key holds the granted key ({} bytes, equal to the Secret's value); SUPABASE_URL was not mounted",
        content.len()
    ));

    say(
        "5. See the audit entry.",
        "Every resolution is a Kubernetes Event and a JSON log line.",
    );
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let event = wait_until("the SecretResolved Event", async || {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SecretResolved"))
    })
    .await?;
    show(&format!(
        "Event {} regarding secretgrant/{}: {}",
        event.reason.unwrap_or_default(),
        event.regarding.and_then(|r| r.name).unwrap_or_default(),
        event.note.unwrap_or_default()
    ));
    let line = wait_until("the audit line", async || {
        controller
            .logs()
            .lines()
            .find(|l| l.contains("\"event\":\"SecretResolved\""))
            .map(str::to_owned)
    })
    .await?;
    show(&format!("audit: {line}"));

    let rotated = incident(client, kubeconfig, &grants, &file, &value).await?;
    Ok(vec![value, rotated, pod_token])
}

/// Runs `kubectl scopehold ARGS` (this very program) against the demo cluster
/// and shows its output indented.
async fn plugin(kubeconfig: &Path, args: &[&str]) -> Result<(), DemoError> {
    let exe = std::env::current_exe()
        .map_err(|e| DemoError::Step(format!("locating this program: {e}")))?;
    println!("    $ kubectl scopehold {}", args.join(" "));
    let output = tokio::process::Command::new(exe)
        .args(args)
        .args(["-n", NS, "--kubeconfig"])
        .arg(kubeconfig)
        .output()
        .await
        .map_err(|e| DemoError::Step(format!("running kubectl-scopehold: {e}")))?;
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        show(line);
    }
    if !output.status.success() {
        return Err(DemoError::Step(format!(
            "kubectl scopehold {} failed",
            args.join(" ")
        )));
    }
    Ok(())
}

async fn incident(
    client: &Client,
    kubeconfig: &Path,
    grants: &Api<SecretGrant>,
    file: &Path,
    old: &str,
) -> Result<String, DemoError> {
    say(
        "Incident.",
        "The key was pasted into a chat. Who received it, and when?",
    );
    wait_until("the resolution in the grant's status", async || {
        grants
            .get("claude-code-supabase")
            .await
            .ok()?
            .status?
            .resolutions
            .filter(|n| *n > 0)
    })
    .await?;
    plugin(kubeconfig, &["exposure", "supabase"]).await?;

    say(
        "Rotate.",
        "A new value in the Secret reaches the running pod, atomically.",
    );
    let new = format!("{old}-rotated");
    let started = Instant::now();
    Api::<Secret>::namespaced(client.clone(), NS)
        .patch(
            "supabase",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"SUPABASE_SERVICE_KEY": new}})),
        )
        .await?;
    wait_until("the rotated value in the pod", async || {
        (std::fs::read(file).ok()? == new.as_bytes()).then_some(())
    })
    .await?;
    show(&format!(
        "the mounted file changed {:?} after the Secret was updated",
        started.elapsed()
    ));

    say(
        "Revoke.",
        "Every grant on the exposed Secret, in one step; the file leaves the running pod.",
    );
    let started = Instant::now();
    plugin(kubeconfig, &["exposure", "supabase", "--revoke", "--yes"]).await?;
    wait_until("the file to be withdrawn", async || {
        (!file.exists()).then_some(())
    })
    .await?;
    show(&format!(
        "supabase-key was withdrawn {:?} after the revocation; the volume stays mounted",
        started.elapsed()
    ));
    Ok(new)
}

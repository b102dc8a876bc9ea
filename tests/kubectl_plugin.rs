//! `kubectl-scopehold` as users run it: the built binary as a child process
//! against the real kube-apiserver, with the controller (and its custody
//! service) running, and real resolutions made the way the node plugin makes
//! them (real Pods, bound tokens, CustodyClient::resolve).
//!
//! Every invocation goes through [`Plugin::run`], which fails the test if a
//! Secret value (all of them start with [`VALUE_MARK`]) or a panic shows up in
//! stdout or stderr.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::stack::{node_plugin_token, start_controller_with_custody};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, server, test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
};
use scopehold::proto::scopehold::v1::ResolveRequest;
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// Every Secret value in this file starts with this; no output may contain it.
const VALUE_MARK: &str = "kplug-value-";

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-scopehold");

/// What one run of the plugin printed.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    /// Exit code 1 and an `Error: …` line on stderr containing `message`.
    #[track_caller]
    fn fails_with(self, message: &str) -> Self {
        assert_eq!(self.code, 1, "expected exit code 1: {self:#?}");
        assert!(
            self.stderr.starts_with("Error: ") && self.stderr.contains(message),
            "expected {message:?} in stderr: {self:#?}"
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// The table row (line) that contains every one of `cells`.
    #[track_caller]
    fn row(&self, cells: &[&str]) -> &str {
        self.stdout
            .lines()
            .find(|l| cells.iter().all(|c| l.contains(c)))
            .unwrap_or_else(|| panic!("no row with {cells:?} in:\n{}", self.stdout))
    }
}

/// Runs the plugin with the admin kubeconfig in namespace `ns`.
fn plugin(ns: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.arg("--kubeconfig")
        .arg(&server().kubeconfig)
        .args(["-n", ns])
        .args(args);
    run(cmd)
}

/// Runs `cmd` with stdin closed; `KUBECONFIG` only if the test set it.
fn run(mut cmd: Command) -> Run {
    if !cmd.get_envs().any(|(k, _)| k == "KUBECONFIG") {
        cmd.env_remove("KUBECONFIG");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {BIN}: {e}"));
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // KPLUG_SHOW=1 with --nocapture prints every run, to read the output.
    if std::env::var_os("KPLUG_SHOW").is_some() {
        eprintln!("$ {cmd:?}\n{}{}", run.stdout, run.stderr);
    }
    for text in [&run.stdout, &run.stderr] {
        assert!(
            !text.contains(VALUE_MARK),
            "a Secret value appeared in the plugin's output: {run:#?}"
        );
        assert!(!text.contains("panicked"), "the plugin panicked: {run:#?}");
    }
    run
}

/// A namespace with the CRDs, optionally the controller with custody, and
/// kubelet's part (a node, the node plugin's pod and token).
struct Fixture {
    client: Client,
    ns: String,
    node: String,
    custody: Option<(ControllerProcess, String, String)>,
}

impl Fixture {
    /// Objects only, no controller.
    async fn bare(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        Fixture {
            client,
            node: format!("{ns}-node"),
            ns,
            custody: None,
        }
    }

    /// The controller with its custody service, reachable as the node plugin.
    async fn with_custody(prefix: &str) -> Self {
        let mut f = Self::bare(prefix).await;
        create_node(&f.client, &f.node).await;
        let plugin_token = node_plugin_token(&f.client, &f.ns, &f.node).await;
        let (controller, addr) = start_controller_with_custody(&f.ns, &[]).await;
        f.custody = Some((controller, addr, plugin_token));
        f
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

    async fn identity(&self, name: &str, sa: &str, suspended: bool) {
        create_service_account(&self.client, &self.ns, sa).await;
        let spec = AgentIdentitySpec {
            service_account_name: sa.into(),
            suspended,
            ..Default::default()
        };
        self.identities()
            .create(&PostParams::default(), &AgentIdentity::new(name, spec))
            .await
            .unwrap();
    }

    async fn grant(&self, name: &str, agent: &str, secret: &str, keys: &[&str], revoked: bool) {
        let spec = SecretGrantSpec {
            agent: agent.into(),
            secret_name: secret.into(),
            keys: keys
                .iter()
                .map(|k| GrantedKey {
                    key: (*k).into(),
                    ..Default::default()
                })
                .collect(),
            revoked,
            reason: Some("test".into()),
            ..Default::default()
        };
        self.grants()
            .create(&PostParams::default(), &SecretGrant::new(name, spec))
            .await
            .unwrap();
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

    /// Creates a pod running as `sa` and resolves its grants through custody,
    /// as the node plugin does on NodePublishVolume.
    async fn resolve_as_pod(&self, pod: &str, sa: &str) -> Result<Vec<String>, tonic::Status> {
        let (_, addr, plugin_token) = self.custody.as_ref().expect("fixture with custody");
        let created = create_pod(&self.client, &self.ns, pod, sa, &self.node).await;
        let uid = created.uid().unwrap();
        let token = pod_token(&self.client, &self.ns, sa, pod, &uid, AUDIENCE, 3600).await;
        let mut client = CustodyClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut request = tonic::Request::new(ResolveRequest {
            request_id: format!("kplug-{pod}"),
            pod_token: token,
            pod_namespace: self.ns.clone(),
            pod_name: pod.into(),
            pod_uid: uid.clone(),
            service_account_name: sa.into(),
            node_name: self.node.clone(),
            volume_id: format!("csi-{uid}"),
            grants: vec![],
            fs_group: Some(2000),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {plugin_token}").parse().unwrap(),
        );
        let response = client.resolve(request).await?.into_inner();
        Ok(response.grants.into_iter().map(|g| g.grant).collect())
    }

    async fn await_event(&self, reason: &str, regarding: &str, related: &str) {
        self.await_event_related(reason, regarding, Some(related))
            .await;
    }

    /// Events are written in the background (custody's and the controller's
    /// alike): wait for one before reading the audit trail.
    async fn await_event_related(&self, reason: &str, regarding: &str, related: Option<&str>) {
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc(
            &format!("{reason} Event regarding {regarding} related to {related:?}"),
            WAIT,
            async || {
                api.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some(reason)
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some(regarding)
                            && e.related.as_ref().and_then(|r| r.name.as_deref()) == related
                    })
            },
        )
        .await;
    }

    /// Waits until the grant's status lists exactly these pods as recent
    /// resolutions (custody writes them in batches).
    async fn await_resolutions(&self, grant: &str, pods: &[&str]) {
        let api = self.grants();
        let mut want: Vec<String> = pods.iter().map(|p| (*p).to_owned()).collect();
        want.sort();
        wait_for_desc(&format!("{grant} resolved by {pods:?}"), WAIT, async || {
            let status = api.get(grant).await.ok()?.status?;
            let mut seen: Vec<String> = status
                .recent_resolutions
                .iter()
                .map(|r| r.pod.clone())
                .collect();
            seen.sort();
            seen.dedup();
            (seen == want).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn grant_creates_a_checked_grant() {
    let f = Fixture::bare("kplug-grant").await;
    let ns = f.ns.as_str();
    f.identity("bot", "bot-sa", false).await;
    f.secret(
        "supabase",
        &[
            ("service-key", "kplug-value-service"),
            ("url", "kplug-value-url"),
            ("admin", "kplug-value-admin"),
        ],
    )
    .await;

    let created = plugin(
        ns,
        &[
            "grant",
            "bot",
            "--secret",
            "supabase",
            "--key",
            "service-key=supabase-key",
            "--key",
            "url",
            "--ttl",
            "8h",
            "--reason",
            "ticket 42",
        ],
    )
    .ok();
    assert!(
        created
            .stdout
            .starts_with("secretgrant.scopehold.dev/bot-supabase created"),
        "{created:#?}"
    );
    let grant = f.grants().get("bot-supabase").await.unwrap();
    assert_eq!(grant.spec.agent, "bot");
    assert_eq!(grant.spec.secret_name, "supabase");
    assert_eq!(grant.spec.ttl.as_deref(), Some("8h"));
    assert_eq!(grant.spec.reason.as_deref(), Some("ticket 42"));
    assert_eq!(grant.key_names(), ["service-key", "url"]);
    assert_eq!(grant.spec.keys[0].path.as_deref(), Some("supabase-key"));
    assert_eq!(grant.spec.keys[1].path, None);
    assert!(!grant.spec.revoked);

    // -o json prints the created object; --expires-at and --name.
    let at = (Timestamp::now() + SignedDuration::from_hours(2))
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let json = plugin(
        ns,
        &[
            "grant",
            "bot",
            "--secret",
            "supabase",
            "--key",
            "url",
            "--expires-at",
            &at,
            "--reason",
            "deploy",
            "--name",
            "deploy-url",
            "-o",
            "json",
        ],
    )
    .ok()
    .json();
    assert_eq!(json["kind"], "SecretGrant");
    assert_eq!(json["metadata"]["name"], "deploy-url");
    assert_eq!(json["spec"]["expiresAt"], at.as_str());
    assert!(json["metadata"].get("managedFields").is_none());

    let base = |extra: &[&str]| {
        let mut args = vec!["grant", "bot", "--secret", "supabase", "--reason", "r"];
        args.extend_from_slice(extra);
        args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()
    };
    let run_args = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        plugin(ns, &refs)
    };

    plugin(
        ns,
        &[
            "grant", "ghost", "--secret", "supabase", "--key", "url", "--reason", "r",
        ],
    )
    .fails_with(&format!(
        r#"Error: AgentIdentity "ghost" not found in namespace "{ns}""#
    ));
    plugin(
        ns,
        &[
            "grant", "bot", "--secret", "nope", "--key", "url", "--reason", "r",
        ],
    )
    .fails_with(&format!(
        r#"Error: Secret "nope" not found in namespace "{ns}""#
    ));
    run_args(base(&["--key", "url", "--key", "password"])).fails_with(&format!(
        r#"Secret "supabase" in namespace "{ns}" has no key "password" (its keys: admin, service-key, url)"#
    ));
    run_args(base(&["--key", "url", "--ttl", "8d"])).fails_with(r#"invalid --ttl "8d""#);
    run_args(base(&["--key", "url", "--ttl", "0s"])).fails_with(r#"invalid --ttl "0s""#);
    run_args(base(&[
        "--key",
        "url",
        "--expires-at",
        "2020-01-01T00:00:00Z",
    ]))
    .fails_with("in the past");
    run_args(base(&["--key", "url", "--expires-at", "tomorrow"]))
        .fails_with(r#"invalid --expires-at "tomorrow""#);
    run_args(base(&["--key", "../etc"])).fails_with(r#"invalid --key "../etc""#);
    run_args(base(&["--key", "url=..data"])).fails_with(r#"invalid --key "url=..data""#);
    run_args(base(&["--key", "url", "--name", "Bad_Name"]))
        .fails_with(r#"invalid --name "Bad_Name""#);
    plugin(
        ns,
        &[
            "grant", "bot", "--secret", "supabase", "--key", "url", "--reason", "  ",
        ],
    )
    .fails_with("--reason must say why");
    run_args(base(&["--key", "url"])).fails_with(&format!(
        r#"SecretGrant "bot-supabase" already exists in namespace "{ns}""#
    ));
    // Usage errors come from the flag parser (exit code 2), before any call.
    let conflict = run_args(base(&["--key", "url", "--ttl", "1h", "--expires-at", &at]));
    assert_eq!(conflict.code, 2, "{conflict:#?}");
    let no_key = plugin(
        ns,
        &["grant", "bot", "--secret", "supabase", "--reason", "r"],
    );
    assert_eq!(no_key.code, 2, "{no_key:#?}");

    let names: Vec<String> = f
        .grants()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(
        names,
        ["bot-supabase", "deploy-url"],
        "failed commands created nothing"
    );
}

#[tokio::test]
async fn revoke_suspend_and_resume() {
    let f = Fixture::bare("kplug-state").await;
    let ns = f.ns.as_str();
    f.identity("bot", "bot-sa", false).await;
    f.secret("creds", &[("api", "kplug-value-state")]).await;
    f.grant("g", "bot", "creds", &["api"], false).await;

    let revoked = plugin(ns, &["revoke", "g"]).ok();
    assert_eq!(revoked.stdout, "secretgrant.scopehold.dev/g revoked\n");
    assert!(f.grants().get("g").await.unwrap().spec.revoked);
    let again = plugin(ns, &["revoke", "g"]).ok();
    assert_eq!(
        again.stdout,
        "secretgrant.scopehold.dev/g already revoked\n"
    );
    let yaml = plugin(ns, &["revoke", "g", "-o", "yaml"]).ok();
    let object: serde_yaml::Value = serde_yaml::from_str(&yaml.stdout).unwrap();
    assert_eq!(object["spec"]["revoked"], serde_yaml::Value::Bool(true));
    plugin(ns, &["revoke", "ghost"]).fails_with(&format!(
        r#"Error: SecretGrant "ghost" not found in namespace "{ns}""#
    ));

    let suspended = plugin(ns, &["suspend", "bot"]).ok();
    assert_eq!(
        suspended.stdout,
        "agentidentity.scopehold.dev/bot suspended\n"
    );
    assert!(f.identities().get("bot").await.unwrap().spec.suspended);
    let json = plugin(ns, &["resume", "bot", "-o", "json"]).ok();
    assert_eq!(json.json()["spec"]["suspended"], false);
    assert!(
        json.stderr
            .contains("agentidentity.scopehold.dev/bot resumed")
    );
    assert!(!f.identities().get("bot").await.unwrap().spec.suspended);
    plugin(ns, &["resume", "bot"]).ok();
    plugin(ns, &["suspend", "ghost"]).fails_with(&format!(
        r#"Error: AgentIdentity "ghost" not found in namespace "{ns}""#
    ));
    plugin(ns, &["resume", "ghost"]).fails_with(r#"AgentIdentity "ghost" not found"#);
}

#[tokio::test]
async fn access_and_who_can_follow_the_controller() {
    let f = Fixture::bare("kplug-access").await;
    let ns = f.ns.clone();
    let ns = ns.as_str();
    let _controller = ControllerProcess::start(ns, &[]);
    f.identity("bot", "bot-sa", false).await;
    f.identity("eve", "eve-sa", false).await;
    f.secret(
        "db",
        &[("url", "kplug-value-db-url"), ("key", "kplug-value-db-key")],
    )
    .await;
    f.secret("gh", &[("token", "kplug-value-gh")]).await;
    plugin(
        ns,
        &[
            "grant",
            "bot",
            "--secret",
            "db",
            "--key",
            "url",
            "--key",
            "key",
            "--ttl",
            "1h",
            "--reason",
            "migration",
        ],
    )
    .ok();
    plugin(
        ns,
        &[
            "grant", "bot", "--secret", "gh", "--key", "token", "--reason", "ci",
        ],
    )
    .ok();
    f.grant("eve-db", "eve", "db", &["url"], true).await;
    f.await_phase("bot-db", GrantPhase::Active).await;
    f.await_phase("bot-gh", GrantPhase::Active).await;
    f.await_phase("eve-db", GrantPhase::Revoked).await;
    wait_for_desc("bot's status.access", WAIT, async || {
        let status = f.identities().get("bot").await.ok()?.status?;
        (status.access.len() == 2).then_some(())
    })
    .await;

    let access = plugin(ns, &["access", "bot"]).ok();
    assert!(
        access
            .stdout
            .starts_with("GRANT    SECRET   KEYS      EXPIRES\n"),
        "{access:#?}"
    );
    let db = access.row(&["bot-db", "db", "(in "]);
    assert!(db.contains("key,url") || db.contains("url,key"), "{db}");
    access.row(&["bot-gh", "gh", "token", "never"]);
    let rows = plugin(ns, &["access", "bot", "-o", "json"]).ok().json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["grant"], "bot-db");
    assert!(rows[0]["expiresAt"].is_string());
    assert_eq!(rows[1]["grant"], "bot-gh");
    assert!(rows[1].get("expiresAt").is_none());

    let eve = plugin(ns, &["access", "eve"]).ok();
    assert!(
        eve.stdout
            .contains(r#"AgentIdentity "eve" can resolve nothing right now"#),
        "{eve:#?}"
    );
    assert_eq!(
        plugin(ns, &["access", "eve", "-o", "json"]).ok().json(),
        serde_json::json!([])
    );
    plugin(ns, &["access", "ghost"]).fails_with(&format!(
        r#"Error: AgentIdentity "ghost" not found in namespace "{ns}""#
    ));

    let who = plugin(ns, &["who-can", "db"]).ok();
    assert!(who.stdout.starts_with("GRANT    AGENT   KEYS"), "{who:#?}");
    who.row(&["bot-db", "bot", "Active", "(in "]);
    who.row(&["eve-db", "eve", "url", "Revoked"]);
    assert!(!who.stdout.contains("bot-gh"));
    let rows = plugin(ns, &["who-can", "db", "-o", "yaml"]).ok();
    let rows: Vec<serde_yaml::Value> = serde_yaml::from_str(&rows.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["phase"], serde_yaml::Value::from("Revoked"));
    plugin(ns, &["who-can", "ghost"]).fails_with(&format!(
        r#"Error: Secret "ghost" not found in namespace "{ns}""#
    ));

    // Suspending shows at once, before the controller catches up.
    plugin(ns, &["suspend", "bot"]).ok();
    let suspended = plugin(ns, &["access", "bot"]).ok();
    assert!(suspended.stdout.contains("suspended"), "{suspended:#?}");
}

#[tokio::test]
async fn audit_shows_resolutions_and_denials() {
    let f = Fixture::with_custody("kplug-audit").await;
    let ns = f.ns.as_str();
    f.secret("creds", &[("api", "kplug-value-audit")]).await;
    f.identity("bot", "bot-sa", false).await;
    f.identity("sleepy", "sleepy-sa", true).await;
    f.grant("bot-creds", "bot", "creds", &["api"], false).await;
    f.grant("sleepy-creds", "sleepy", "creds", &["api"], false)
        .await;
    f.await_phase("bot-creds", GrantPhase::Active).await;
    assert_eq!(
        f.resolve_as_pod("agent", "bot-sa").await.unwrap(),
        ["bot-creds"]
    );
    f.resolve_as_pod("sleepy-pod", "sleepy-sa")
        .await
        .expect_err("suspended agent");
    // A series per grant, related to the agent (the pods are in the audit lines).
    f.await_event("SecretResolved", "bot-creds", "bot").await;
    f.await_event("AccessDenied", "sleepy", "sleepy-pod").await;
    f.await_event_related("GrantActivated", "bot-creds", None)
        .await;

    let audit = plugin(ns, &["audit"]).ok();
    assert!(
        audit.stdout.starts_with("TIME") && audit.stdout.lines().next().unwrap().ends_with("NOTE"),
        "{audit:#?}"
    );
    for header in ["EVENT", "AGENT/GRANT", "POD"] {
        assert!(audit.stdout.lines().next().unwrap().contains(header));
    }
    audit.row(&["SecretResolved", "bot/bot-creds", "received keys api"]);
    audit.row(&["AccessDenied", "sleepy", "sleepy-pod", "AgentSuspended"]);
    audit.row(&["GrantActivated", "bot/bot-creds"]);

    let rows = plugin(ns, &["audit", "-o", "json"]).ok().json();
    let rows = rows.as_array().unwrap();
    let times: Vec<&str> = rows.iter().map(|r| r["time"].as_str().unwrap()).collect();
    let parsed: Vec<Timestamp> = times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(
        parsed.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );

    let bot = plugin(ns, &["audit", "--agent", "bot", "-o", "json"])
        .ok()
        .json();
    let bot = bot.as_array().unwrap();
    assert!(!bot.is_empty());
    assert!(bot.iter().all(|r| r["agent"] == "bot"), "{bot:?}");
    assert!(
        // A series per grant: no pod (the pods are in the audit log lines).
        bot.iter()
            .any(|r| r["event"] == "SecretResolved" && r["secret"] == "creds")
    );
    let sleepy = plugin(ns, &["audit", "--agent", "sleepy"]).ok();
    sleepy.row(&["AccessDenied", "sleepy-pod"]);
    assert!(!sleepy.stdout.contains("SecretResolved"));

    let by_secret = plugin(ns, &["audit", "--secret", "creds", "-o", "json"])
        .ok()
        .json();
    let by_secret = by_secret.as_array().unwrap();
    assert!(by_secret.iter().all(|r| r["secret"] == "creds"));
    assert!(by_secret.iter().any(|r| r["event"] == "SecretResolved"));
    assert!(!by_secret.iter().any(|r| r["event"] == "AccessDenied"));

    let one = plugin(ns, &["audit", "--limit", "1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["time"], rows[0]["time"]);
    let nobody = plugin(ns, &["audit", "--agent", "nobody"]).ok();
    assert!(
        nobody.stdout.starts_with("No ScopeHold audit Events"),
        "{nobody:#?}"
    );
    assert_ne!(plugin(ns, &["audit", "--limit", "0"]).code, 0);
}

#[tokio::test]
async fn exposure_lists_every_pod_and_revokes_every_grant() {
    let f = Fixture::with_custody("kplug-exposure").await;
    let ns = f.ns.as_str();
    f.secret("leaked", &[("token", "kplug-value-leaked")]).await;
    f.secret("safe", &[("token", "kplug-value-safe")]).await;
    f.identity("bot", "bot-sa", false).await;
    f.identity("eve", "eve-sa", false).await;
    f.grant("bot-leaked", "bot", "leaked", &["token"], false)
        .await;
    f.grant("eve-leaked", "eve", "leaked", &["token"], false)
        .await;
    f.grant("old-leaked", "bot", "leaked", &["token"], true)
        .await;
    f.grant("bot-safe", "bot", "safe", &["token"], false).await;
    for g in ["bot-leaked", "eve-leaked", "bot-safe"] {
        f.await_phase(g, GrantPhase::Active).await;
    }
    f.await_phase("old-leaked", GrantPhase::Revoked).await;
    for (pod, sa) in [
        ("agent-1", "bot-sa"),
        ("agent-2", "bot-sa"),
        ("eve-1", "eve-sa"),
    ] {
        f.resolve_as_pod(pod, sa).await.unwrap();
    }
    f.await_resolutions("bot-leaked", &["agent-1", "agent-2"])
        .await;
    f.await_resolutions("eve-leaked", &["eve-1"]).await;

    let report = plugin(ns, &["exposure", "leaked"]).ok();
    assert!(report.stdout.starts_with("GRANT"), "{report:#?}");
    for (grant, agent, pod) in [
        ("bot-leaked", "bot", "agent-1"),
        ("bot-leaked", "bot", "agent-2"),
        ("eve-leaked", "eve", "eve-1"),
    ] {
        let row = report.row(&[grant, agent, "Active", "token", pod]);
        assert!(row.contains(&f.node), "node in {row:?}");
    }
    report.row(&["old-leaked", "bot", "Revoked", "-"]);
    assert!(!report.stdout.contains("bot-safe"));
    assert!(
        report
            .stdout
            .contains(r#"Secret "leaked" reached 3 pods of 2 agents through 3 grants."#),
        "{report:#?}"
    );
    assert!(report.stdout.contains("exposure leaked --revoke"));

    let json = plugin(ns, &["exposure", "leaked", "-o", "json"])
        .ok()
        .json();
    assert_eq!(json["secret"], "leaked");
    let grants = json["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 3);
    let pods: Vec<&str> = grants[0]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pod"].as_str().unwrap())
        .collect();
    assert_eq!(grants[0]["grant"], "bot-leaked");
    assert_eq!(pods, ["agent-1", "agent-2"]);
    assert!(grants[0]["pods"][0]["firstReceived"].is_string());
    assert_eq!(grants[0]["pods"][0]["digest"].as_str().unwrap().len(), 12);

    // Without --yes and without a terminal, nothing is revoked.
    plugin(ns, &["exposure", "leaked", "--revoke"]).fails_with("pass --yes");
    assert!(!f.grants().get("bot-leaked").await.unwrap().spec.revoked);

    let revoke = plugin(ns, &["exposure", "leaked", "--revoke", "--yes"]).ok();
    for line in [
        "secretgrant.scopehold.dev/bot-leaked revoked (agent bot)",
        "secretgrant.scopehold.dev/eve-leaked revoked (agent eve)",
        r#"Next: rotate the value of Secret "leaked" ("#,
        "--dry-run=client -o yaml | kubectl apply -f -); pods that still hold an active grant receive the new value within a second; revoked grants' files are withdrawn.",
    ] {
        assert!(revoke.stdout.contains(line), "{line:?} in {revoke:#?}");
    }
    assert!(!revoke.stdout.contains("old-leaked revoked"));
    for g in ["bot-leaked", "eve-leaked", "old-leaked"] {
        assert!(f.grants().get(g).await.unwrap().spec.revoked, "{g}");
        f.await_phase(g, GrantPhase::Revoked).await;
    }
    assert!(!f.grants().get("bot-safe").await.unwrap().spec.revoked);
    f.await_phase("bot-safe", GrantPhase::Active).await;

    let again = plugin(
        ns,
        &["exposure", "leaked", "--revoke", "--yes", "-o", "json"],
    )
    .ok();
    assert!(again.stderr.contains("already revoked"), "{again:#?}");
    assert!(again.json().get("revoked").is_none());
    // The pods are still on record after the revocation.
    plugin(ns, &["exposure", "leaked"])
        .ok()
        .row(&["bot-leaked", "Revoked", "agent-2"]);
}

#[tokio::test]
async fn exposure_when_nothing_was_exposed() {
    let f = Fixture::bare("kplug-unexposed").await;
    let ns = f.ns.as_str();
    f.secret("lonely", &[("k", "kplug-value-lonely")]).await;
    f.secret("granted", &[("k", "kplug-value-granted")]).await;
    f.identity("bot", "bot-sa", false).await;
    f.grant("g", "bot", "granted", &["k"], false).await;

    let lonely = plugin(ns, &["exposure", "lonely"]).ok();
    assert_eq!(
        lonely.stdout,
        format!(
            "Secret \"lonely\" in namespace \"{ns}\" was not exposed through ScopeHold: no SecretGrant names it.\n"
        )
    );
    let json = plugin(ns, &["exposure", "lonely", "-o", "json"])
        .ok()
        .json();
    assert_eq!(json["grants"], serde_json::json!([]));
    let granted = plugin(ns, &["exposure", "granted"]).ok();
    assert!(
        granted.stdout.contains(
            r#"No pod has received Secret "granted": 1 grant names it, none was resolved."#
        ),
        "{granted:#?}"
    );
    plugin(ns, &["exposure", "ghost"]).fails_with(&format!(
        r#"Error: Secret "ghost" not found in namespace "{ns}""#
    ));
    plugin(ns, &["exposure", "ghost", "--revoke", "--yes"])
        .fails_with(r#"Secret "ghost" not found"#);
}

/// KUBECONFIG instead of --kubeconfig, the context's namespace as default,
/// and a clear error for an unknown context.
#[tokio::test]
async fn kubeconfig_context_and_namespace() {
    let f = Fixture::bare("kplug-config").await;
    f.secret("s", &[("k", "kplug-value-config")]).await;
    f.identity("bot", "bot-sa", false).await;
    f.grant("g", "bot", "s", &["k"], false).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&server().kubeconfig).unwrap()).unwrap();
    for context in config["contexts"].as_sequence_mut().unwrap() {
        context["context"]["namespace"] = f.ns.clone().into();
    }
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();

    let mut cmd = Command::new(BIN);
    cmd.args(["who-can", "s"]);
    let with_env = run_with_kubeconfig_env(cmd, &path).ok();
    with_env.row(&["g", "bot", "k"]);

    // A list in KUBECONFIG, with a missing file, as kubectl accepts it.
    let list = std::env::join_paths([dir.path().join("missing"), path.clone()]).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["who-can", "s", "-o", "json"]);
    let out = run_with_kubeconfig_env(cmd, Path::new(&list)).ok();
    assert_eq!(out.json()[0]["grant"], "g");

    // -n overrides the context's namespace.
    let mut cmd = Command::new(BIN);
    cmd.args(["who-can", "s", "-n", "default"]);
    run_with_kubeconfig_env(cmd, &path)
        .fails_with(r#"Secret "s" not found in namespace "default""#);

    let mut cmd = Command::new(BIN);
    cmd.arg("--kubeconfig")
        .arg(&path)
        .args(["--context", "no-such-context", "who-can", "s"]);
    let bad = run(cmd);
    assert_eq!(bad.code, 1, "{bad:#?}");
    assert!(bad.stderr.starts_with("Error: kubeconfig:"), "{bad:#?}");

    let mut cmd = Command::new(BIN);
    cmd.arg("--kubeconfig")
        .arg(dir.path().join("missing"))
        .args(["who-can", "s"]);
    let missing = run(cmd);
    assert_eq!(missing.code, 1, "{missing:#?}");
    assert!(
        missing.stderr.starts_with("Error: kubeconfig:"),
        "{missing:#?}"
    );
}

fn run_with_kubeconfig_env(mut cmd: Command, kubeconfig: &Path) -> Run {
    cmd.env("KUBECONFIG", kubeconfig);
    run(cmd)
}

/// kubectl finds the binary on PATH and runs it as `kubectl scopehold`.
#[tokio::test]
async fn kubectl_finds_the_plugin() {
    let f = Fixture::bare("kplug-kubectl").await;
    f.identity("bot", "bot-sa", false).await;
    let bin_dir: PathBuf = Path::new(BIN).parent().unwrap().to_owned();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();

    let mut help = Command::new("/usr/bin/kubectl");
    help.args(["scopehold", "--help"]).env("PATH", &path);
    let help = run(help).ok();
    for command in [
        "grant", "revoke", "access", "who-can", "audit", "exposure", "demo",
    ] {
        assert!(help.stdout.contains(command), "{command} in {help:#?}");
    }
    assert!(help.stdout.contains("Usage: kubectl scopehold"));

    let mut list = Command::new("/usr/bin/kubectl");
    list.args(["plugin", "list"]).env("PATH", &path);
    let list = run(list);
    assert!(list.stdout.contains("kubectl-scopehold"), "{list:#?}");

    let mut access = Command::new("/usr/bin/kubectl");
    access
        .args(["scopehold", "-n", &f.ns, "access", "bot"])
        .env("PATH", &path)
        .env("KUBECONFIG", &server().kubeconfig);
    let access = run(access).ok();
    assert!(
        access
            .stdout
            .contains(r#"AgentIdentity "bot" can resolve nothing"#),
        "{access:#?}"
    );
}

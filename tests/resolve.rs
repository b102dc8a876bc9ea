//! Runtime resolution end to end: the tests play kubelet against a real API
//! server, the controller (custody) and the node plugin as processes. A real
//! Pod with a nodeName, a real bound token from the TokenRequest API, a real
//! NodePublishVolume over the plugin's unix socket, a real tmpfs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret, expired_token, key};
use common::stack::{
    NodePluginProcess, node_plugin_dir, node_plugin_token, start_controller_with_custody,
    unmount_below,
};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, test_namespace, wait_for_desc,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::{Client, ResourceExt};
use scopehold::api::{GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// Mount points below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points
}

/// The mountinfo line of the mount at `target`, if any.
fn mount_at(target: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = target.to_string_lossy().into_owned();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .map(str::to_owned)
        .collect()
}

struct Stack {
    client: Client,
    ns: String,
    node: String,
    controller: ControllerProcess,
    plugin: NodePluginProcess,
    kubelet: KubeletPlayer,
    dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        unmount_below(self.dir.path());
    }
}

impl Stack {
    async fn new(prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = test_namespace(&client, prefix).await;
        let node = format!("{ns}-node");
        create_node(&client, &node).await;
        let plugin_token = node_plugin_token(&client, &ns, &node).await;
        let (controller, custody) = start_controller_with_custody(&ns, &[]).await;
        let dir = node_plugin_dir(&plugin_token);
        let plugin = NodePluginProcess::start(dir.path(), &node, &custody, "node.log").await;
        let kubelet = KubeletPlayer::new(
            NodePluginProcess::socket(dir.path()),
            NodePluginProcess::kubelet_dir(dir.path()),
        );
        Stack {
            client,
            ns,
            node,
            controller,
            plugin,
            kubelet,
            dir,
        }
    }

    async fn secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        create_secret(&self.client, ns, name, data).await;
    }

    async fn identity(&self, name: &str, sa: &str, suspended: bool) {
        create_service_account(&self.client, &self.ns, sa).await;
        create_identity(&self.client, &self.ns, name, sa, suspended).await;
    }

    async fn grant(
        &self,
        name: &str,
        agent: &str,
        secret: &str,
        keys: Vec<GrantedKey>,
        edit: impl FnOnce(&mut SecretGrantSpec),
    ) {
        create_grant(&self.client, &self.ns, name, agent, secret, keys, edit).await;
        let api: Api<SecretGrant> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc(&format!("{name} evaluated"), WAIT, async || {
            api.get(name).await.ok()?.phase()
        })
        .await;
    }

    async fn await_phase(&self, grant: &str, phase: GrantPhase) {
        let api: Api<SecretGrant> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc(&format!("{grant} {phase}"), WAIT, async || {
            (api.get(grant).await.ok()?.phase() == Some(phase)).then_some(())
        })
        .await;
    }

    /// A Pod on `node` and its bound token, as kubelet would have them.
    async fn pod(
        &self,
        name: &str,
        sa: &str,
        node: &str,
        fs_group: Option<i64>,
    ) -> (PodInfo, String) {
        let pod = create_pod(&self.client, &self.ns, name, sa, node).await;
        self.as_kubelet_sees(&pod, fs_group).await
    }

    /// A created pod as kubelet would present it, with its bound token.
    async fn as_kubelet_sees(
        &self,
        pod: &k8s_openapi::api::core::v1::Pod,
        fs_group: Option<i64>,
    ) -> (PodInfo, String) {
        let (name, uid) = (pod.name_any(), pod.uid().unwrap());
        let sa = pod
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .clone()
            .unwrap();
        let token = pod_token(&self.client, &self.ns, &sa, &name, &uid, AUDIENCE, 3600).await;
        (
            PodInfo {
                namespace: self.ns.clone(),
                name,
                uid,
                service_account: sa,
                fs_group,
            },
            token,
        )
    }

    /// A pod changed by `proxy::pod::inject` (as the webhook would, with the
    /// controller's default sidecar settings), then by `edit`, on the node.
    async fn injected_pod(
        &self,
        name: &str,
        sa: &str,
        edit: impl FnOnce(&mut k8s_openapi::api::core::v1::Pod),
    ) -> (PodInfo, String) {
        use kube::api::{ListParams, PostParams};
        use scopehold::proxy::{pod, render};
        let identities =
            Api::<scopehold::api::AgentIdentity>::namespaced(self.client.clone(), &self.ns)
                .list(&ListParams::default())
                .await
                .unwrap();
        let grants = Api::<SecretGrant>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap();
        let rules = render::rules_for(&self.ns, sa, &identities.items, &grants.items).unwrap();
        let bare: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {pod::INJECT_ANNOTATION: "proxy"}},
            "spec": {
                "serviceAccountName": sa,
                "nodeName": self.node,
                "containers": [{"name": "agent", "image": "busybox"}],
            }
        }))
        .unwrap();
        let mut injected = pod::inject(&bare, &rules, &pod::SidecarSettings::default()).unwrap();
        edit(&mut injected);
        let created =
            Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), &self.ns)
                .create(&PostParams::default(), &injected)
                .await
                .unwrap();
        self.as_kubelet_sees(&created, None).await
    }

    async fn publish(
        &self,
        pod: &PodInfo,
        token: &str,
        attrs: &[(&str, &str)],
    ) -> Result<PathBuf, tonic::Status> {
        let attrs: HashMap<String, String> = attrs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let request = self
            .kubelet
            .publish_request(pod, "creds", token, &attrs, true, true);
        self.kubelet.publish(request).await.unwrap()
    }

    /// Expects a refusal with `code` naming `reason`, nothing mounted or left
    /// at the target, and an AccessDenied audit line with that reason.
    async fn expect_refused(
        &self,
        pod: &PodInfo,
        token: &str,
        attrs: &[(&str, &str)],
        code: Code,
        reason: &str,
    ) {
        let status = self
            .publish(pod, token, attrs)
            .await
            .expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(reason),
            "{reason} not in {:?}",
            status.message()
        );
        let target = self.kubelet.target_path(&pod.uid, "creds");
        assert!(
            mount_at(&target).is_empty(),
            "something is mounted at {}",
            target.display()
        );
        assert!(
            !target.exists(),
            "the refused publish left {} behind",
            target.display()
        );
        wait_for_desc(
            &format!("AccessDenied {reason} for {}", pod.name),
            WAIT,
            async || {
                self.controller.audit_lines().into_iter().find(|l| {
                    l["event"] == "AccessDenied"
                        && l["reason"] == reason
                        && l["pod"] == pod.name.as_str()
                })
            },
        )
        .await;
    }
}

/// The visible entries of a mount (without the atomic writer's `..` names).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".."))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn granted_keys_appear_as_files_on_a_tmpfs_and_nothing_else() {
    let s = Stack::new("resolve-ok").await;
    s.secret(
        &s.ns,
        "supabase",
        &[
            ("service-key", "resolve-value-1"),
            ("url", "https://db"),
            ("admin", "resolve-never"),
        ],
    )
    .await;
    s.identity("bot", "bot-sa", false).await;
    s.grant(
        "db",
        "bot",
        "supabase",
        vec![
            GrantedKey {
                key: "service-key".into(),
                path: Some("supabase-key".into()),
                mode: None,
                proxy: None,
            },
            GrantedKey {
                key: "url".into(),
                path: None,
                mode: Some(0o400),
                proxy: None,
            },
        ],
        |_| {},
    )
    .await;
    s.await_phase("db", GrantPhase::Active).await;

    let (pod, token) = s.pod("agent", "bot-sa", &s.node.clone(), Some(2000)).await;
    let target = s.publish(&pod, &token, &[]).await.expect("published");
    assert_eq!(listing(&target), ["supabase-key", "url"]);
    assert_eq!(
        std::fs::read(target.join("supabase-key")).unwrap(),
        b"resolve-value-1"
    );
    assert_eq!(std::fs::read(target.join("url")).unwrap(), b"https://db");
    let meta = std::fs::metadata(target.join("supabase-key")).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o440, 2000),
        "default mode with the pod's fsGroup"
    );
    let meta = std::fs::metadata(target.join("url")).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o400,
        "mode from the grant"
    );
    let mounts = mount_at(&target);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let line = &mounts[0];
    assert!(line.contains(" - tmpfs "), "not a tmpfs: {line}");
    for option in ["nosuid", "nodev", "noexec", "ro"] {
        assert!(
            line.split([' ', ',']).any(|o| o == option),
            "{option} missing: {line}"
        );
    }

    // Idempotent: a second identical publish changes nothing, stacks nothing.
    let before = std::fs::read_link(target.join("..data")).unwrap();
    s.publish(&pod, &token, &[]).await.expect("republished");
    assert_eq!(mount_at(&target).len(), 1, "a republish stacked a mount");
    assert_eq!(
        std::fs::read_link(target.join("..data")).unwrap(),
        before,
        "unchanged content was rewritten"
    );

    // A pod without fsGroup gets 0444 so a non-root agent can read; the
    // token may also come in the volume context (older kubelets).
    let (plain, plain_token) = s.pod("plain", "bot-sa", &s.node.clone(), None).await;
    let request =
        s.kubelet
            .publish_request(&plain, "creds", &plain_token, &HashMap::new(), false, true);
    let plain_target = s
        .kubelet
        .publish(request)
        .await
        .unwrap()
        .expect("token in the volume context");
    let meta = std::fs::metadata(plain_target.join("supabase-key")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);

    // Unpublish: unmounted and removed; again and unknown volumes are fine.
    s.kubelet
        .unpublish(&pod.uid, "creds")
        .await
        .unwrap()
        .expect("unpublished");
    assert!(mount_at(&target).is_empty() && !target.exists());
    s.kubelet
        .unpublish(&pod.uid, "creds")
        .await
        .unwrap()
        .expect("unpublish again");
    s.kubelet
        .unpublish("00000000-0000-0000-0000-000000000000", "creds")
        .await
        .unwrap()
        .expect("unknown volume");
    s.kubelet
        .unpublish(&plain.uid, "creds")
        .await
        .unwrap()
        .expect("unpublished");

    // Audited: SecretResolved with the pod; no value or token in any output.
    let line = s
        .controller
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "SecretResolved" && l["pod"] == "agent")
        .expect("audit");
    assert_eq!(line["keys"], "service-key,url");
    let everything = s.controller.logs() + &s.plugin.logs();
    for secret in [
        "resolve-value-1",
        "resolve-never",
        token.as_str(),
        plain_token.as_str(),
    ] {
        assert!(
            !everything.contains(secret),
            "a value or token leaked into the logs"
        );
    }
}

#[tokio::test]
async fn every_denial_mounts_nothing_and_is_audited() {
    let s = Stack::new("resolve-deny").await;
    s.secret(&s.ns, "creds", &[("api", "deny-value")]).await;
    s.identity("bot", "bot-sa", false).await;
    s.identity("sleepy", "sleepy-sa", true).await;
    s.identity("late", "late-sa", false).await;
    s.identity("gone", "gone-sa", false).await;
    s.identity("far", "far-sa", false).await;
    s.grant("bot-grant", "bot", "creds", vec![key("api")], |_| {})
        .await;
    s.grant("sleepy-grant", "sleepy", "creds", vec![key("api")], |_| {})
        .await;
    let soon = Timestamp::from_second(Timestamp::now().as_second() + 2).unwrap();
    s.grant("late-grant", "late", "creds", vec![key("api")], |g| {
        g.expires_at = Some(Time(soon))
    })
    .await;
    s.grant("gone-grant", "gone", "creds", vec![key("api")], |g| {
        g.revoked = true
    })
    .await;
    let other = test_namespace(&s.client, "resolve-deny-other").await;
    s.secret(&other, "elsewhere", &[("api", "other-namespace-value")])
        .await;
    s.grant("far-grant", "far", "elsewhere", vec![key("api")], |_| {})
        .await;
    let node = s.node.clone();

    create_service_account(&s.client, &s.ns, "stranger").await;
    let (stranger, t) = s.pod("stranger", "stranger", &node, None).await;
    s.expect_refused(
        &stranger,
        &t,
        &[],
        Code::PermissionDenied,
        "NoAgentIdentity",
    )
    .await;

    let (sleepy, t) = s.pod("sleepy", "sleepy-sa", &node, None).await;
    s.expect_refused(&sleepy, &t, &[], Code::PermissionDenied, "AgentSuspended")
        .await;

    s.await_phase("late-grant", GrantPhase::Expired).await;
    let (late, t) = s.pod("late", "late-sa", &node, None).await;
    s.expect_refused(&late, &t, &[], Code::PermissionDenied, "NoActiveGrants")
        .await;

    let (gone, t) = s.pod("gone", "gone-sa", &node, None).await;
    s.expect_refused(&gone, &t, &[], Code::PermissionDenied, "NoActiveGrants")
        .await;

    // A Secret in another namespace is not found from the grant's namespace.
    let (far, t) = s.pod("far", "far-sa", &node, None).await;
    s.expect_refused(&far, &t, &[], Code::PermissionDenied, "NoActiveGrants")
        .await;

    // A token of another pod.
    let (bot, bot_token) = s.pod("bot", "bot-sa", &node, None).await;
    let (_twin, twin_token) = s.pod("bot-twin", "bot-sa", &node, None).await;
    s.expect_refused(
        &bot,
        &twin_token,
        &[],
        Code::PermissionDenied,
        "TokenMismatch",
    )
    .await;

    // A token for another audience.
    let uid = bot.uid.clone();
    let vault = pod_token(&s.client, &s.ns, "bot-sa", "bot", &uid, "vault", 3600).await;
    s.expect_refused(&bot, &vault, &[], Code::Unauthenticated, "TokenRejected")
        .await;

    // An expired token signed with the cluster's real key.
    let expired = expired_token(&s.ns, "bot-sa", "bot", &uid);
    s.expect_refused(&bot, &expired, &[], Code::Unauthenticated, "TokenRejected")
        .await;

    // Pod information that contradicts the token: the ServiceAccount kubelet
    // reports is not the token's.
    let mut lying = bot.clone();
    lying.service_account = "sleepy-sa".into();
    s.expect_refused(
        &lying,
        &bot_token,
        &[],
        Code::PermissionDenied,
        "TokenMismatch",
    )
    .await;

    // A pod on another node than this plugin's.
    let far_node = format!("{}-far", s.ns);
    create_node(&s.client, &far_node).await;
    let (elsewhere, t) = s.pod("elsewhere", "bot-sa", &far_node, None).await;
    s.expect_refused(&elsewhere, &t, &[], Code::PermissionDenied, "WrongNode")
        .await;

    // A grant name the agent does not hold.
    s.expect_refused(
        &bot,
        &bot_token,
        &[("grants", "sleepy-grant")],
        Code::PermissionDenied,
        "GrantNotHeld",
    )
    .await;

    // The control: the same pod, honestly described, resolves.
    let target = s
        .publish(&bot, &bot_token, &[("grants", "bot-grant")])
        .await
        .expect("the legitimate request");
    assert_eq!(listing(&target), ["api"]);
    s.kubelet
        .unpublish(&bot.uid, "creds")
        .await
        .unwrap()
        .expect("unpublished");
}

/// Hostile requests are refused before anything is touched.
#[tokio::test]
async fn hostile_requests_touch_nothing_outside_the_target() {
    let s = Stack::new("resolve-hostile").await;
    s.identity("bot", "bot-sa", false).await;
    let (pod, token) = s.pod("bot", "bot-sa", &s.node.clone(), None).await;
    let outside = s.kubelet.kubelet_dir.parent().unwrap().join("outside");
    let base = s
        .kubelet
        .publish_request(&pod, "creds", &token, &HashMap::new(), true, true);
    let cases: Vec<(&str, scopehold::proto::csi::v1::NodePublishVolumeRequest)> = vec![
        ("target outside the kubelet dir", {
            let mut r = base.clone();
            r.target_path = outside.join("mount").to_string_lossy().into_owned();
            r
        }),
        ("dot-dot in the target", {
            let mut r = base.clone();
            r.target_path = format!("{}/../../../outside/mount", base.target_path);
            r
        }),
        ("empty volume id", {
            let mut r = base.clone();
            r.volume_id.clear();
            r
        }),
        ("oversized attribute", {
            let mut r = base.clone();
            r.volume_context
                .insert("grants".into(), "a".repeat(100_000));
            r
        }),
        ("forged pod uid", {
            let mut r = base.clone();
            r.volume_context.insert(
                "csi.storage.k8s.io/pod.uid".into(),
                "00000000-0000-0000-0000-000000000000".into(),
            );
            r
        }),
    ];
    for (what, request) in cases {
        // Straight to the socket: kubelet's parent-directory creation would
        // itself touch the hostile path.
        let mut node = s.kubelet.connect().await.unwrap();
        let status = node.node_publish_volume(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            !status.message().contains(&token),
            "{what}: the token is in the message"
        );
    }
    assert!(
        !outside.exists(),
        "a hostile request created a path outside the kubelet dir"
    );
    assert!(!s.kubelet.target_path(&pod.uid, "creds").exists());
    assert!(mounts_below(s.dir.path()).is_empty());
}

/// A `delivery: proxy` grant lands only in a volume that names it (the proxy
/// sidecar's); the agent's own plain volume gets the file grants alone.
#[tokio::test]
async fn a_proxy_grant_reaches_only_a_volume_that_names_it() {
    use scopehold::api::delivery::HeaderTemplate;
    use scopehold::api::{DeliveryMode, KeyProxy};
    let s = Stack::new("resolve-proxy").await;
    s.secret(&s.ns, "llm", &[("api-key", "proxy-only-value")])
        .await;
    s.secret(&s.ns, "plain", &[("url", "https://db")]).await;
    s.identity("bot", "bot-sa", false).await;
    let plain_key = |k: &str| GrantedKey {
        key: k.into(),
        ..Default::default()
    };
    s.grant("files", "bot", "plain", vec![plain_key("url")], |_| {})
        .await;
    let proxied = GrantedKey {
        proxy: Some(KeyProxy {
            hosts: vec!["api.openai.com".into()],
            header: Some(HeaderTemplate {
                name: "Authorization".into(),
                template: "Bearer {value}".into(),
            }),
            ..Default::default()
        }),
        ..plain_key("api-key")
    };
    s.grant("openai", "bot", "llm", vec![proxied], |spec| {
        spec.delivery = DeliveryMode::Proxy
    })
    .await;
    s.await_phase("files", GrantPhase::Active).await;
    s.await_phase("openai", GrantPhase::Active).await;

    let (agent, token) = s.pod("agent", "bot-sa", &s.node.clone(), None).await;
    let plain = s.publish(&agent, &token, &[]).await.expect("published");
    assert_eq!(
        listing(&plain),
        ["url"],
        "the proxy grant's value reached a plain volume"
    );

    // A volume naming the proxy grant in a pod without ScopeHold's sidecar
    // (anyone who may create pods for the agent's ServiceAccount can write
    // one): refused, nothing mounted.
    let (plain_pod, token) = s.pod("look-alike", "bot-sa", &s.node.clone(), None).await;
    let refused = s
        .publish(&plain_pod, &token, &[("grants", "openai")])
        .await
        .expect_err("a pod without the sidecar got the proxy grant");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("NotTheProxySidecar"),
        "{refused:?}"
    );

    // The injected pod (the webhook's and `kubectl scopehold inject`'s
    // rendering, with the controller's default settings) gets it.
    let (sidecar, token) = s.injected_pod("sidecar", "bot-sa", |_| {}).await;
    let named = s
        .publish(&sidecar, &token, &[("grants", "openai")])
        .await
        .expect("published");
    assert_eq!(listing(&named), ["api-key"]);
    assert_eq!(
        std::fs::read(named.join("api-key")).unwrap(),
        b"proxy-only-value"
    );

    // The same pod with the agent container also mounting the values.
    let (sneaky, token) = s
        .injected_pod("sneaky", "bot-sa", |pod| {
            let spec = pod.spec.as_mut().unwrap();
            spec.containers[0]
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(k8s_openapi::api::core::v1::VolumeMount {
                    name: scopehold::proxy::pod::VALUES_VOLUME.into(),
                    mount_path: "/mine".into(),
                    ..Default::default()
                });
        })
        .await;
    let refused = s
        .publish(&sneaky, &token, &[("grants", "openai")])
        .await
        .expect_err("the agent container mounted the values");
    assert!(refused.message().contains("\"agent\""), "{refused:?}");
}

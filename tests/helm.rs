//! The Helm chart (`charts/scopehold`): `helm lint`, what the values switch in the
//! rendered manifests, a server-side dry run of them against the real API server,
//! a real `helm install`, and what the chart's RBAC lets each ServiceAccount do
//! (SubjectAccessReviews, `kubectl auth can-i`, and real tokens).
//!
//! Helm comes from `$SCOPEHOLD_HELM` (set by `.ci/run`) or the shared cache
//! directory; when neither has helm v3.21.4 the test installs it from the Go module
//! proxy exactly as `.ci/run` does. No kubelet, scheduler or controller-manager runs
//! here, so the chart's pods never start: the tests check objects, not readiness.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, discovery};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The pinned helm release; `.ci/run` installs the same one.
const HELM_VERSION: &str = "v3.21.4";
/// Kubernetes version for renders that do not ask the server (the harness runs
/// v1.36.3). Server tests pass the server's own version.
const KUBE_VERSION: &str = "v1.36.3";
/// Release name of the real install; the chart's fullname is then `scopehold`.
const RELEASE: &str = "scopehold";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/scopehold")
}

// ---------------------------------------------------------------------------------
// helm: find or install, run
// ---------------------------------------------------------------------------------

/// The helm binary: `$SCOPEHOLD_HELM`, else `<cache>/bin/helm` when it is
/// v3.21.4, else installed there with `go install` (as `.ci/run` does). Never skips.
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match HELM.get_or_init(find_or_install_helm) {
        Ok(path) => path,
        Err(msg) => panic!("{msg}"),
    }
}

fn find_or_install_helm() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SCOPEHOLD_HELM") {
        let path = PathBuf::from(path);
        return match helm_version(&path) {
            Some(v) if v == HELM_VERSION => Ok(path),
            other => Err(format!(
                "SCOPEHOLD_HELM={} is {other:?}, expected {HELM_VERSION}",
                path.display()
            )),
        };
    }
    let cache = std::env::var_os("SCOPEHOLD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/scopehold")))
        .ok_or("neither SCOPEHOLD_CACHE nor HOME is set")?;
    let gobin = cache.join("bin");
    let helm = gobin.join("helm");
    if helm_version(&helm).as_deref() == Some(HELM_VERSION) {
        return Ok(helm);
    }
    // Same command as .ci/run (keep the two in sync). The -X flags set what the
    // upstream Makefile sets: without them `helm version` is empty and helm's
    // default Kubernetes version for `template`/`lint` is v1.20.
    eprintln!(
        "installing helm {HELM_VERSION} into {} (go install)",
        gobin.display()
    );
    let go = ["/usr/local/go/bin/go", "go"]
        .into_iter()
        .find(|g| {
            Command::new(g)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or("helm is missing and `go` is not installed to build it")?;
    let out = Command::new(go)
        .args(["install", "-trimpath", "-ldflags", &helm_ldflags()])
        .arg(format!("helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"))
        .env("GOBIN", &gobin)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running go install: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "go install helm {HELM_VERSION} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    match helm_version(&helm) {
        Some(v) if v == HELM_VERSION => Ok(helm),
        other => Err(format!("installed helm reports {other:?}")),
    }
}

fn helm_ldflags() -> String {
    [
        format!("-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"),
        "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1".into(),
        "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=36".into(),
        "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1".into(),
        "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36".into(),
    ]
    .join(" ")
}

fn helm_version(path: &Path) -> Option<String> {
    let out = Command::new(path)
        .args(["version", "--template", "{{.Version}}"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs helm with its state (cache, config, repositories) kept under the test
/// run's directory, not the user's home. Server commands get the admin kubeconfig.
fn helm(args: &[&str]) -> Output {
    let home = helm_home();
    Command::new(helm_bin())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("running helm")
}

/// Like [`helm`], against the test API server.
fn helm_server(args: &[&str]) -> Output {
    let kubeconfig = common::server().kubeconfig.to_string_lossy().into_owned();
    let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
    all.extend_from_slice(args);
    helm(&all)
}

/// Helm's cache, config and data directories (shared by runs, inside target/).
fn helm_home() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("scopehold-helm")
}

fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------------
// rendering
// ---------------------------------------------------------------------------------

/// `helm template` output as JSON documents.
struct Rendered {
    docs: Vec<Value>,
    text: String,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(
            all.len(),
            1,
            "expected exactly one {kind}, got {}",
            all.len()
        );
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered; have {:?}", self.ids()))
    }

    /// (apiVersion, kind, namespace, name) of every object.
    fn ids(&self) -> BTreeSet<(String, String, String, String)> {
        self.docs.iter().map(object_id).collect()
    }
}

fn object_id(d: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&d["apiVersion"]),
        s(&d["kind"]),
        s(&d["metadata"]["namespace"]),
        s(&d["metadata"]["name"]),
    )
}

fn parse_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML to JSON"))
        .collect()
}

/// `helm template RELEASE chart -n NS --kube-version V --set …`, or the error text.
fn try_render(
    release: &str,
    namespace: &str,
    kube_version: &str,
    sets: &[&str],
) -> Result<Rendered, String> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let mut args = vec![
        "template",
        release,
        chart.as_str(),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(Rendered {
        docs: parse_docs(&text),
        text,
    })
}

fn render(sets: &[&str]) -> Rendered {
    try_render(RELEASE, "scopehold-system", KUBE_VERSION, sets)
        .unwrap_or_else(|e| panic!("helm template {sets:?} failed:\n{e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn volume<'a>(workload: &'a Value, name: &str) -> Option<&'a Value> {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == name))
}

fn env_names(c: &Value) -> Vec<String> {
    c["env"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter_map(|e| e["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// True if every key/value of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (Some(sel), Some(labels)) = (selector.as_object(), labels.as_object()) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// ---------------------------------------------------------------------------------
// lint and chart files (no API server)
// ---------------------------------------------------------------------------------

#[test]
fn chart_lints_cleanly_with_every_switch() {
    let chart = chart_dir().to_string_lossy().into_owned();
    let variants: [&[&str]; 5] = [
        &[],
        &["custody.tls.enabled=false", "custody.plaintext=true"],
        &[
            "networkPolicy.enabled=true",
            "metrics.serviceMonitor.enabled=true",
        ],
        &[
            "csiDriver.create=false",
            "controller.podDisruptionBudget.enabled=false",
        ],
        &["csiDriver.serviceAccountTokenInSecrets=false"],
    ];
    for sets in variants {
        for strict in [false, true] {
            let mut args = vec!["lint", chart.as_str()];
            if strict {
                args.push("--strict");
            }
            for set in sets {
                args.extend(["--set", set]);
            }
            let out = ok(helm(&args), &format!("helm {}", args.join(" ")));
            assert!(
                out.contains("1 chart(s) linted, 0 chart(s) failed"),
                "helm {}: {out}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn chart_crds_are_byte_identical_copies_of_crds_dir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let list = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let (repo, chart) = (root.join("crds"), chart_dir().join("crds"));
    assert_eq!(
        list(&repo),
        list(&chart),
        "crds/ and charts/scopehold/crds/ hold other files"
    );
    for file in list(&repo) {
        assert!(
            std::fs::read(repo.join(&file)).unwrap() == std::fs::read(chart.join(&file)).unwrap(),
            "charts/scopehold/crds/{file} differs from crds/{file}: cp crds/*.yaml charts/scopehold/crds/"
        );
    }
}

/// Every value in values.yaml has a comment: a key is documented by a comment line
/// right above it (same indentation), or else every key directly inside it is.
#[test]
fn every_value_has_a_comment() {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key_of = |l: &str| -> Option<String> {
        let t = l.trim_start();
        if t.starts_with('#') || t.starts_with('-') {
            return None;
        }
        let (key, _) = t.split_once(':')?;
        (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .then(|| key.to_string())
    };
    let commented = |i: usize| -> bool {
        lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_start().starts_with('#') && indent(l) == indent(lines[i]))
    };
    fn check(
        i: usize,
        path: &str,
        lines: &[&str],
        indent: &dyn Fn(&str) -> usize,
        key_of: &dyn Fn(&str) -> Option<String>,
        commented: &dyn Fn(usize) -> bool,
        missing: &mut Vec<String>,
    ) {
        if commented(i) {
            return;
        }
        let own = indent(lines[i]);
        let body: Vec<usize> = (i + 1..lines.len())
            .take_while(|&j| lines[j].trim().is_empty() || indent(lines[j]) > own)
            .filter(|&j| !lines[j].trim().is_empty())
            .collect();
        let child_indent = body.iter().map(|&j| indent(lines[j])).min();
        let children: Vec<usize> = body
            .iter()
            .copied()
            .filter(|&j| Some(indent(lines[j])) == child_indent && key_of(lines[j]).is_some())
            .collect();
        if children.is_empty() {
            missing.push(path.to_string());
        }
        for j in children {
            let child = format!("{path}.{}", key_of(lines[j]).unwrap_or_default());
            check(j, &child, lines, indent, key_of, commented, missing);
        }
    }
    let mut missing = Vec::new();
    let mut top = 0;
    for (i, line) in lines.iter().enumerate() {
        if indent(line) == 0
            && let Some(key) = key_of(line)
        {
            top += 1;
            check(i, &key, &lines, &indent, &key_of, &commented, &mut missing);
        }
    }
    assert!(top > 5, "values.yaml has only {top} top-level keys?");
    assert!(missing.is_empty(), "values without a comment: {missing:?}");
}

// ---------------------------------------------------------------------------------
// what the values switch (helm template, no API server)
// ---------------------------------------------------------------------------------

#[test]
fn defaults_render_the_expected_objects() {
    let r = render(&[]);
    let kinds: BTreeMap<String, usize> = r.docs.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    let expected: BTreeMap<String, usize> = [
        ("ServiceAccount", 2),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        // custody, the controller's metrics, the node plugins' metrics
        ("Service", 3),
        ("Deployment", 1),
        ("DaemonSet", 1),
        ("PodDisruptionBudget", 1),
        ("CSIDriver", 1),
        // the proxy-sidecar admission webhook, and the guard of injected pods
        ("MutatingWebhookConfiguration", 1),
        ("ValidatingAdmissionPolicy", 1),
        ("ValidatingAdmissionPolicyBinding", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds, expected, "default objects");
    // Namespaced objects go to the release namespace; cluster-scoped have none.
    for d in &r.docs {
        let kind = d["kind"].as_str().unwrap();
        let ns = d["metadata"]["namespace"].as_str();
        if [
            "ClusterRole",
            "ClusterRoleBinding",
            "CSIDriver",
            "MutatingWebhookConfiguration",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
        .contains(&kind)
        {
            assert_eq!(ns, None, "{kind} is cluster-scoped");
        } else {
            assert_eq!(
                ns,
                Some("scopehold-system"),
                "{kind} in the release namespace"
            );
        }
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/instance"],
            RELEASE
        );
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"],
            "scopehold"
        );
    }
    // Images: chart appVersion by default, configurable.
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    let app_version = chart["appVersion"].as_str().unwrap();
    let controller = container(r.one("Deployment"), "controller");
    assert_eq!(
        controller["image"],
        format!("ghcr.io/scopehold/scopehold:{app_version}")
    );
    let custom = render(&[
        "image.repository=example.com/sh",
        "image.tag=dev",
        "image.pullPolicy=Never",
    ]);
    let ds = custom.one("DaemonSet");
    let deployed = container(custom.one("Deployment"), "controller");
    assert_eq!(deployed["image"], "example.com/sh:dev");
    assert_eq!(deployed["imagePullPolicy"], "Never");
    assert_eq!(container(ds, "node")["image"], "example.com/sh:dev");
    assert_eq!(container(ds, "node")["imagePullPolicy"], "Never");
    // One container per node: the plugin registers itself and serves its own
    // health endpoint (no node-driver-registrar, no livenessprobe sidecar).
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The PDB covers exactly the controller pods.
    let pdb = r.one("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let pod_labels = &r.one("Deployment")["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
    assert!(!selects(
        &pdb["spec"]["selector"]["matchLabels"],
        &r.one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    ));
    // NOTES tell the next steps.
    let notes = std::fs::read_to_string(chart_dir().join("templates/NOTES.txt")).unwrap();
    for needle in [
        "AgentIdentity",
        "SecretGrant",
        "csi.scopehold.dev",
        "kubectl scopehold",
    ] {
        assert!(notes.contains(needle), "NOTES.txt mentions {needle}");
    }
}

#[test]
fn controller_deployment_is_locked_down() {
    let r = render(&[]);
    let deploy = r.one("Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "scopehold-controller");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(deploy, "controller");
    assert_eq!(
        strings(&c["args"]),
        [
            "controller",
            "--custody-listen",
            "0.0.0.0:9443",
            "--metrics-listen",
            "0.0.0.0:8080",
            "--node-service-account",
            "scopehold-system/scopehold-node",
            "--volume-size-limit",
            "1Mi",
            "--webhook-listen",
            "0.0.0.0:9444",
            "--webhook-configuration",
            "scopehold-proxy-injector",
            "--proxy-image",
            "ghcr.io/scopehold/scopehold:0.1.0",
            "--proxy-port",
            "15001",
            "--proxy-usage-url",
            "https://scopehold-custody.scopehold-system.svc:9444/usage",
        ]
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(sc.get("privileged").is_none());
    let pod_name = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_NAME")
        .expect("POD_NAME env");
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 8080);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8080);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let ports: BTreeMap<String, i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().into(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("custody".into(), 9443),
            ("metrics".into(), 8080),
            ("webhook".into(), 9444)
        ])
    );
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    // Services: custody on 9443 and metrics on 8080, both selecting the controller.
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let custody = r.named("Service", "scopehold-custody");
    assert_eq!(custody["spec"]["ports"][0]["port"], 9443);
    assert_eq!(custody["spec"]["ports"][0]["targetPort"], 9443);
    assert!(selects(&custody["spec"]["selector"], pod_labels));
    let metrics = r.named("Service", "scopehold-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"], 8080);
    assert!(selects(&metrics["spec"]["selector"], pod_labels));
}

#[test]
fn node_daemonset_mounts_what_the_plugin_needs_and_nothing_grants_api_access() {
    let r = render(&[]);
    let ds = r.one("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "scopehold-node");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(pod.get("hostNetwork").is_none(), "no host network");
    let node = container(ds, "node");
    let args = strings(&node["args"]);
    let flag = |name: &str| -> String {
        let i = args
            .iter()
            .position(|a| a == name)
            .unwrap_or_else(|| panic!("node args lack {name}: {args:?}"));
        args[i + 1].clone()
    };
    assert_eq!(args[0], "node");
    assert_eq!(flag("--endpoint"), "unix:///csi/csi.sock");
    assert_eq!(flag("--node-name"), "$(NODE_NAME)");
    assert_eq!(
        flag("--custody-endpoint"),
        "https://scopehold-custody.scopehold-system.svc:9443"
    );
    assert_eq!(
        flag("--custody-ca-file"),
        "/etc/scopehold/custody-ca/ca.crt"
    );
    assert!(!args.contains(&"--custody-plaintext".to_string()));
    assert_eq!(flag("--kubelet-dir"), "/var/lib/kubelet");
    assert_eq!(flag("--state-dir"), "/var/lib/scopehold-csi");
    assert_eq!(flag("--tmpfs-size"), "1Mi");
    let token_file = flag("--token-file");
    let scratch_dir = flag("--scratch-dir");
    let node_name = node["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME env");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(node["securityContext"]["privileged"], true);

    let mounts: BTreeMap<String, Value> = node["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m.clone()))
        .collect();
    let kubelet = &mounts["kubelet-dir"];
    assert_eq!(kubelet["mountPath"], "/var/lib/kubelet");
    assert_eq!(kubelet["mountPropagation"], "Bidirectional");
    assert_eq!(
        volume(ds, "kubelet-dir").unwrap()["hostPath"]["path"],
        "/var/lib/kubelet"
    );
    assert_eq!(mounts["plugin-dir"]["mountPath"], "/csi");
    assert_eq!(
        volume(ds, "plugin-dir").unwrap()["hostPath"]["path"],
        "/var/lib/kubelet/plugins/csi.scopehold.dev/"
    );
    let state = volume(ds, "state-dir").unwrap();
    assert_eq!(state["hostPath"]["path"], "/var/lib/scopehold-csi");
    assert_eq!(mounts["state-dir"]["mountPath"], "/var/lib/scopehold-csi");
    let scratch = volume(ds, "scratch").unwrap();
    assert_eq!(scratch["emptyDir"]["medium"], "Memory");
    assert_eq!(mounts["scratch"]["mountPath"], scratch_dir.as_str());
    let token =
        &volume(ds, "custody-token").unwrap()["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "scopehold.dev");
    assert_eq!(token["expirationSeconds"], 3600);
    assert_eq!(
        format!(
            "{}/{}",
            mounts["custody-token"]["mountPath"].as_str().unwrap(),
            token["path"].as_str().unwrap()
        ),
        token_file
    );
    assert_eq!(
        volume(ds, "custody-ca").unwrap()["configMap"]["name"],
        "scopehold-custody-ca"
    );

    // Registration with kubelet and health are the plugin's own.
    assert_eq!(
        flag("--registration-dir"),
        "/var/lib/kubelet/plugins_registry"
    );
    assert_eq!(
        flag("--kubelet-csi-endpoint"),
        "/var/lib/kubelet/plugins/csi.scopehold.dev/csi.sock"
    );
    assert_eq!(flag("--health-listen"), "0.0.0.0:9808");
    assert_eq!(node["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(node["livenessProbe"]["httpGet"]["port"], 9808);
    assert_eq!(node["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(node["readinessProbe"]["httpGet"]["port"], 9808);
    assert_eq!(
        pod["containers"].as_array().unwrap().len(),
        1,
        "one container per node"
    );
    assert!(volume(ds, "registration-dir").is_none());

    // Nothing binds the node plugin's ServiceAccount.
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        for b in r.all(kind) {
            for s in b["subjects"].as_array().unwrap() {
                assert_ne!(s["name"], "scopehold-node", "{kind} binds the node plugin");
            }
        }
    }
    // A moved kubelet directory moves every path with it.
    let moved = render(&["node.kubeletDir=/data/kubelet/"]);
    let ds = moved.one("DaemonSet");
    assert_eq!(
        volume(ds, "kubelet-dir").unwrap()["hostPath"]["path"],
        "/data/kubelet"
    );
    assert_eq!(
        volume(ds, "plugin-dir").unwrap()["hostPath"]["path"],
        "/data/kubelet/plugins/csi.scopehold.dev/"
    );
    let moved_args = strings(&container(ds, "node")["args"]);
    for expected in [
        "/data/kubelet/plugins_registry",
        "/data/kubelet/plugins/csi.scopehold.dev/csi.sock",
    ] {
        assert!(
            moved_args.iter().any(|a| a == expected),
            "{expected} not in {moved_args:?}"
        );
    }
}

/// The values a cluster without kube-proxy or a reachable pod network needs
/// (docs/real-node.md; the single-node test cluster uses exactly these):
/// host networking, explicit API server and custody addresses.
#[test]
fn host_network_and_explicit_addresses() {
    let r = render(&[
        "hostNetwork=true",
        "apiServer.host=127.0.0.1",
        "apiServer.port=6443",
        "custody.address=127.0.0.1",
        "custody.port=19443",
        "metrics.port=18080",
        "node.healthPort=19808",
    ]);
    let deploy = r.one("Deployment");
    let ds = r.one("DaemonSet");
    for workload in [deploy, ds] {
        let pod = &workload["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
        for c in pod["containers"].as_array().unwrap() {
            // containerPorts of a host-network pod become hostPorts, and two
            // controller replicas could not share a node.
            assert!(c.get("ports").is_none(), "{c:?}");
        }
    }
    let c = container(deploy, "controller");
    let args = strings(&c["args"]);
    assert!(args.contains(&"--listen-reuse-port".to_string()));
    assert!(args.contains(&"0.0.0.0:19443".to_string()));
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(env["KUBERNETES_SERVICE_HOST"], "127.0.0.1");
    assert_eq!(env["KUBERNETES_SERVICE_PORT"], "6443");
    assert_eq!(env["SCOPEHOLD_CUSTODY_TLS_SANS"], "127.0.0.1");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 18080);
    let node = container(ds, "node");
    let node_args = strings(&node["args"]);
    let i = node_args
        .iter()
        .position(|a| a == "--custody-endpoint")
        .unwrap();
    assert_eq!(node_args[i + 1], "https://127.0.0.1:19443");
    assert!(node_args.contains(&"0.0.0.0:19808".to_string()));
    assert_eq!(node["readinessProbe"]["httpGet"]["port"], 19808);
    // The Services still select the controller on the same port numbers.
    let custody = r.named("Service", "scopehold-custody");
    assert_eq!(custody["spec"]["ports"][0]["targetPort"], 19443);

    // Defaults: none of it.
    let r = render(&[]);
    let c = container(r.one("Deployment"), "controller");
    assert!(!strings(&c["args"]).contains(&"--listen-reuse-port".to_string()));
    assert!(
        !serde_yaml::to_string(&c["env"])
            .unwrap()
            .contains("KUBERNETES_SERVICE_HOST")
    );

    // Half an API server address is refused.
    let half = try_render(RELEASE, "ns", KUBE_VERSION, &["apiServer.host=127.0.0.1"])
        .err()
        .expect("half an API server address refused");
    assert!(
        half.contains("apiServer.host and apiServer.port go together"),
        "{half}"
    );
}

/// The binary accepts the arguments the chart renders (clap refuses unknown flags
/// and bad values before it looks at `--help`), and every environment variable
/// the chart sets for ScopeHold is one the binary reads.
#[test]
fn the_binary_understands_the_rendered_args_and_env() {
    let bin = env!("CARGO_BIN_EXE_scopehold");
    let variants: [&[&str]; 2] = [
        &[],
        &["custody.tls.enabled=false", "custody.plaintext=true"],
    ];
    for sets in variants {
        let r = render(sets);
        for (kind, name) in [("Deployment", "controller"), ("DaemonSet", "node")] {
            let c = container(r.one(kind), name);
            let args = strings(&c["args"]);
            let out = Command::new(bin)
                .args(&args)
                .arg("--help")
                .env_clear()
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let help = ok(
                out,
                &format!("scopehold {} --help ({sets:?})", args.join(" ")),
            );
            // RUST_LOG (value logLevel) is read by the log filter, not by clap.
            for env in env_names(c).into_iter().filter(|e| e != "RUST_LOG") {
                assert!(
                    help.contains(&format!("[env: {env}=")),
                    "{kind} sets {env}, which `scopehold {}` does not read",
                    args[0]
                );
            }
        }
    }
}

#[test]
fn csidriver_matches_the_design() {
    let r = render(&[]);
    let d = r.one("CSIDriver");
    assert_eq!(d["apiVersion"], "storage.k8s.io/v1");
    assert_eq!(d["metadata"]["name"], "csi.scopehold.dev");
    assert_eq!(
        d["spec"],
        json!({
            "attachRequired": false,
            "podInfoOnMount": true,
            "volumeLifecycleModes": ["Ephemeral"],
            "tokenRequests": [{"audience": "scopehold.dev", "expirationSeconds": 3600}],
            "requiresRepublish": true,
            "serviceAccountTokenInSecrets": true,
            "fsGroupPolicy": "File",
        })
    );
    // The field needs Kubernetes >= 1.35: refused for older clusters, unless off.
    let err = try_render(RELEASE, "ns", "v1.34.2", &[])
        .err()
        .expect("1.34 refused");
    assert!(
        err.contains("csiDriver.serviceAccountTokenInSecrets needs Kubernetes >= 1.35"),
        "{err}"
    );
    let old = try_render(
        RELEASE,
        "ns",
        "v1.34.2",
        &["csiDriver.serviceAccountTokenInSecrets=false"],
    )
    .expect("renders for 1.34 with the field off");
    assert!(
        old.one("CSIDriver")["spec"]
            .get("serviceAccountTokenInSecrets")
            .is_none()
    );
    try_render(RELEASE, "ns", "v1.35.0", &[]).expect("1.35 is enough");
    assert!(
        render(&["csiDriver.create=false"])
            .all("CSIDriver")
            .is_empty()
    );
}

/// The Role's rules as `resources[/resourceNames]: verbs`.
fn role_rules(r: &Rendered) -> Vec<String> {
    r.one("Role")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| {
            let names = strings(&rule["resourceNames"]);
            format!(
                "{}{}: {}",
                strings(&rule["resources"]).join(","),
                if names.is_empty() {
                    String::new()
                } else {
                    format!("/{}", names.join(","))
                },
                strings(&rule["verbs"]).join(","),
            )
        })
        .collect()
}

#[test]
fn custody_tls_and_plaintext_values() {
    // Default: TLS, no --custody-plaintext anywhere, CA from the ConfigMap.
    let tls = render(&[]);
    assert!(!tls.text.contains("--custody-plaintext"));
    let env = env_names(container(tls.one("Deployment"), "controller"));
    assert!(
        env.contains(&"SCOPEHOLD_CUSTODY_TLS_SECRET".to_string()),
        "{env:?}"
    );
    assert_eq!(
        role_rules(&tls),
        [
            "leases: create",
            "leases/scopehold-controller: get,update,patch",
            "secrets: create",
            "secrets/scopehold-custody-tls: get,update",
            "configmaps/scopehold-custody-ca: get,create,update,patch",
        ]
    );

    // Plaintext needs both switches, and then reaches controller and node plugin.
    let plain = render(&["custody.tls.enabled=false", "custody.plaintext=true"]);
    assert!(
        strings(&container(plain.one("Deployment"), "controller")["args"])
            .contains(&"--custody-plaintext".to_string())
    );
    let ds = plain.one("DaemonSet");
    let node_args = strings(&container(ds, "node")["args"]);
    assert!(node_args.contains(&"--custody-plaintext".to_string()));
    assert!(node_args.contains(&"http://scopehold-custody.scopehold-system.svc:9443".to_string()));
    assert!(!node_args.contains(&"--custody-ca-file".to_string()));
    assert!(volume(ds, "custody-ca").is_none());
    // Without TLS the controller still creates its digest key Secret, but
    // needs no TLS Secret or ConfigMap of its own.
    assert_eq!(
        role_rules(&plain),
        [
            "leases: create",
            "leases/scopehold-controller: get,update,patch",
            "secrets: create",
        ]
    );
    for rendered in [&tls, &plain] {
        let env = env_names(container(rendered.one("Deployment"), "controller"));
        assert!(
            env.contains(&"SCOPEHOLD_DIGEST_KEY_SECRET".to_string()),
            "{env:?}"
        );
    }

    // Inconsistent combinations are refused with a clear message.
    let err = try_render(RELEASE, "ns", KUBE_VERSION, &["custody.tls.enabled=false"])
        .err()
        .expect("TLS off without plaintext refused");
    assert!(err.contains("also set custody.plaintext=true"), "{err}");
    let err = try_render(RELEASE, "ns", KUBE_VERSION, &["custody.plaintext=true"])
        .err()
        .expect("plaintext with TLS on refused");
    assert!(
        err.contains("contradicts custody.tls.enabled=true"),
        "{err}"
    );
}

#[test]
fn service_monitor_renders_only_when_enabled() {
    assert!(render(&[]).all("ServiceMonitor").is_empty());
    let r = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prom",
    ]);
    let sm = r.one("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["namespace"], "scopehold-system");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        strings(&sm["spec"]["namespaceSelector"]["matchNames"]),
        ["scopehold-system"]
    );
    // It selects the controller's and the node plugins' metrics Services
    // (only), on their named port, and each of them selects its pods.
    let selector = &sm["spec"]["selector"]["matchLabels"];
    for (service, pods) in [
        ("scopehold-metrics", r.one("Deployment")),
        ("scopehold-node-metrics", r.one("DaemonSet")),
    ] {
        let metrics = r.named("Service", service);
        assert!(
            selects(selector, &metrics["metadata"]["labels"]),
            "{service}"
        );
        assert!(
            selects(
                &metrics["spec"]["selector"],
                &pods["spec"]["template"]["metadata"]["labels"]
            ),
            "{service}"
        );
        assert_eq!(
            sm["spec"]["endpoints"][0]["port"],
            metrics["spec"]["ports"][0]["name"]
        );
    }
    assert!(!selects(
        selector,
        &r.named("Service", "scopehold-custody")["metadata"]["labels"]
    ));
    // The node plugin listens where the Service points.
    let node = &r.one("DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&node["args"]);
    let at = args
        .iter()
        .position(|a| a == "--metrics-listen")
        .expect("--metrics-listen");
    assert_eq!(args[at + 1], "0.0.0.0:9810");
    assert!(
        node["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == 9810)
    );
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
}

#[test]
fn proxy_injector_is_registered_fail_closed_for_annotated_pods_only() {
    let r = render(&[]);
    let mwc = r.named("MutatingWebhookConfiguration", "scopehold-proxy-injector");
    let hooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(
        hook["matchConditions"][0]["expression"],
        scopehold::webhook::MATCH_CONDITION
    );
    assert_eq!(strings(&hook["rules"][0]["operations"]), ["CREATE"]);
    assert_eq!(strings(&hook["rules"][0]["resources"]), ["pods"]);
    let service = &hook["clientConfig"]["service"];
    assert_eq!(service["name"], "scopehold-custody");
    assert_eq!(service["namespace"], "scopehold-system");
    assert_eq!(service["port"], 9444);
    assert_eq!(service["path"], scopehold::webhook::MUTATE_PATH);
    // The controller sets the caBundle (the chart cannot know the CA).
    assert!(hook["clientConfig"].get("caBundle").is_none());
    let custody = r.named("Service", "scopehold-custody");
    assert!(
        custody["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "webhook" && p["port"] == 9444)
    );

    // A URL instead of the Service (API servers that cannot reach Services).
    let r = render(&["proxyInjector.url=https://127.0.0.1:9444/mutate-pods"]);
    let hook = &r.one("MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(
        hook["clientConfig"]["url"],
        "https://127.0.0.1:9444/mutate-pods"
    );
    assert!(hook["clientConfig"].get("service").is_none());

    // Off, and off with plaintext custody (it serves with custody's certificate).
    for sets in [
        &["proxyInjector.enabled=false"][..],
        &["custody.tls.enabled=false", "custody.plaintext=true"][..],
    ] {
        let r = render(sets);
        assert!(r.all("MutatingWebhookConfiguration").is_empty(), "{sets:?}");
        assert!(r.all("ValidatingAdmissionPolicy").is_empty(), "{sets:?}");
        let args = strings(&container(r.one("Deployment"), "controller")["args"]);
        assert!(!args.contains(&"--webhook-listen".to_string()), "{sets:?}");
    }
}

/// The operator's upstream CA reaches the controller as a file it reads at
/// start, and a new CA rolls the replicas; without it nothing is mounted.
#[test]
fn proxy_upstream_ca_is_mounted_into_the_controller() {
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let r = render(&[&format!("proxyInjector.upstreamCA={pem}")]);
    let cm = r.named("ConfigMap", "scopehold-proxy-upstream-ca");
    assert_eq!(cm["data"]["ca.crt"], pem);
    let deployment = r.one("Deployment");
    let controller = container(deployment, "controller");
    let args = strings(&controller["args"]);
    let flag = args
        .iter()
        .position(|a| a == "--proxy-upstream-ca-file")
        .expect("the flag");
    let file = std::path::Path::new(&args[flag + 1]);
    let mount = controller["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "proxy-upstream-ca")
        .unwrap();
    assert_eq!(file.parent().unwrap().to_str(), mount["mountPath"].as_str());
    assert_eq!(mount["readOnly"], true);
    let template = &deployment["spec"]["template"];
    assert!(
        template["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["configMap"]["name"] == "scopehold-proxy-upstream-ca")
    );
    let checksum = &template["metadata"]["annotations"]["checksum/proxy-upstream-ca"];
    assert!(checksum.as_str().is_some_and(|c| c.len() == 64));

    let r = render(&[]);
    assert!(
        r.all("ConfigMap")
            .iter()
            .all(|c| c["metadata"]["name"] != "scopehold-proxy-upstream-ca")
    );
    let args = strings(&container(r.one("Deployment"), "controller")["args"]);
    assert!(!args.contains(&"--proxy-upstream-ca-file".to_string()));
}

#[test]
fn network_policy_limits_custody_to_node_plugin_pods() {
    assert!(render(&[]).all("NetworkPolicy").is_empty());
    let r = render(&["networkPolicy.enabled=true"]);
    let np = r.one("NetworkPolicy");
    let controller_pods = &r.one("Deployment")["spec"]["template"]["metadata"]["labels"];
    let node_pods = &r.one("DaemonSet")["spec"]["template"]["metadata"]["labels"];
    assert!(selects(
        &np["spec"]["podSelector"]["matchLabels"],
        controller_pods
    ));
    assert!(!selects(
        &np["spec"]["podSelector"]["matchLabels"],
        node_pods
    ));
    assert_eq!(strings(&np["spec"]["policyTypes"]), ["Ingress"]);
    let rules = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 3);
    // The API server calls the webhook from addresses a policy cannot name.
    let webhook = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "webhook")
        .unwrap();
    assert!(webhook.get("from").is_none());
    let custody = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "custody")
        .unwrap();
    let from = custody["from"].as_array().unwrap();
    assert_eq!(from.len(), 1);
    assert!(selects(&from[0]["podSelector"]["matchLabels"], node_pods));
    assert!(!selects(
        &from[0]["podSelector"]["matchLabels"],
        controller_pods
    ));
    let metrics = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "metrics")
        .unwrap();
    assert!(
        metrics.get("from").is_none(),
        "metrics from anywhere by default"
    );

    let r = render(&[
        "networkPolicy.enabled=true",
        "networkPolicy.metrics.from[0].namespaceSelector.matchLabels.name=monitoring",
    ]);
    let rules = r.one("NetworkPolicy")["spec"]["ingress"]
        .as_array()
        .unwrap()
        .clone();
    let metrics = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "metrics")
        .unwrap();
    assert_eq!(
        metrics["from"],
        json!([{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}])
    );
}

// ---------------------------------------------------------------------------------
// against the real API server
// ---------------------------------------------------------------------------------

async fn server_version(client: &Client) -> String {
    client
        .apiserver_version()
        .await
        .expect("GET /version")
        .git_version
}

fn kubectl_apply_dry_run(manifests: &str, namespace: &str, tag: &str) -> Output {
    let file = common::server().run_dir.join(format!("dry-run-{tag}.yaml"));
    std::fs::write(&file, manifests).unwrap();
    common::kubectl(&[
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        &file.to_string_lossy(),
    ])
}

#[tokio::test]
async fn rendered_manifests_pass_a_server_side_dry_run() {
    let client = common::client().await;
    common::install_crds(&client).await;
    let ns = common::test_namespace(&client, "helm-dry-run").await;
    let version = server_version(&client).await;
    let variants: [(&str, &[&str]); 4] = [
        ("defaults", &[]),
        (
            "plaintext",
            &["custody.tls.enabled=false", "custody.plaintext=true"],
        ),
        (
            "hardened",
            &[
                "networkPolicy.enabled=true",
                "networkPolicy.metrics.from[0].namespaceSelector.matchLabels.name=monitoring",
                "node.kubeletDir=/data/kubelet",
                "controller.priorityClassName=system-cluster-critical",
            ],
        ),
        (
            "no-csidriver",
            &[
                "csiDriver.create=false",
                "controller.podDisruptionBudget.enabled=false",
            ],
        ),
    ];
    for (tag, sets) in variants {
        let r = try_render("dry-run", &ns, &version, sets)
            .unwrap_or_else(|e| panic!("helm template ({tag}) failed:\n{e}"));
        let out = kubectl_apply_dry_run(&r.text, &ns, tag);
        let stdout = ok(out, &format!("kubectl apply --dry-run=server ({tag})"));
        // One "(server dry run)" line per object: nothing skipped.
        let applied = stdout
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(applied, r.docs.len(), "({tag}) kubectl said:\n{stdout}");
    }
    // The ServiceMonitor CRD is absent here: enabling it is refused by the server
    // (rather than silently dropped by the chart).
    let r = try_render(
        "dry-run",
        &ns,
        &version,
        &["metrics.serviceMonitor.enabled=true"],
    )
    .unwrap();
    let out = kubectl_apply_dry_run(&r.text, &ns, "servicemonitor");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ServiceMonitor"), "{stderr}");
}

/// The one real `helm install` of this test binary (the CSIDriver and the cluster
/// roles are cluster-scoped, so there is only one), into a fresh namespace.
struct Install {
    namespace: String,
    rendered: Rendered,
}

static INSTALL: tokio::sync::OnceCell<Install> = tokio::sync::OnceCell::const_new();

async fn installed() -> &'static Install {
    INSTALL
        .get_or_init(|| async {
            let client = common::client().await;
            let namespace = common::test_namespace(&client, "helm-install").await;
            let version = server_version(&client).await;
            let chart = chart_dir().to_string_lossy().into_owned();
            // Blocking subprocesses: keep them off the runtime's worker threads.
            let ns = namespace.clone();
            let out = tokio::task::spawn_blocking(move || {
                helm_server(&["install", RELEASE, &chart, "--namespace", &ns])
            })
            .await
            .unwrap();
            ok(out, "helm install");
            let rendered = try_render(RELEASE, &namespace, &version, &[])
                .unwrap_or_else(|e| panic!("helm template: {e}"));
            Install {
                namespace,
                rendered,
            }
        })
        .await
}

/// The object named like `template` on the server, through API discovery.
async fn live_object(client: &Client, template: &Value) -> Option<DynamicObject> {
    let (api_version, kind, ns, name) = object_id(template);
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let gvk = GroupVersionKind::gvk(group, version, &kind);
    let (ar, _) = discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discovering {api_version} {kind}: {e}"));
    let api: Api<DynamicObject> = if ns.is_empty() {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), &ns, &ar)
    };
    api.get_opt(&name)
        .await
        .unwrap_or_else(|e| panic!("getting {kind} {ns}/{name}: {e}"))
}

#[tokio::test]
async fn helm_install_creates_every_rendered_object() {
    let install = installed().await;
    let client = common::client().await;
    let ns = &install.namespace;
    let rendered = &install.rendered;

    // What helm recorded for the release is what `helm template` renders.
    let kubeconfig_ns = ns.clone();
    let manifest = tokio::task::spawn_blocking(move || {
        ok(
            helm_server(&["get", "manifest", RELEASE, "--namespace", &kubeconfig_ns]),
            "helm get manifest",
        )
    })
    .await
    .unwrap();
    let recorded: BTreeSet<_> = parse_docs(&manifest).iter().map(object_id).collect();
    assert_eq!(
        recorded,
        rendered.ids(),
        "helm get manifest vs helm template"
    );
    let status = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || {
            ok(
                helm_server(&["status", RELEASE, "--namespace", &ns]),
                "helm status",
            )
        }
    })
    .await
    .unwrap();
    assert!(status.contains("STATUS: deployed"), "{status}");

    // Every rendered object exists, owned by the release.
    let mut kinds = BTreeMap::new();
    for doc in &rendered.docs {
        let id = object_id(doc);
        let live = live_object(&client, doc)
            .await
            .unwrap_or_else(|| panic!("{id:?} was not created"));
        let annotations = live.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations
                .get("meta.helm.sh/release-name")
                .map(String::as_str),
            Some(RELEASE),
            "{id:?}"
        );
        assert_eq!(
            annotations.get("meta.helm.sh/release-namespace"),
            Some(ns),
            "{id:?}"
        );
        kinds.insert(
            id.1.clone(),
            doc["apiVersion"].as_str().unwrap().to_string(),
        );
    }
    for kind in [
        "Deployment",
        "DaemonSet",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "CSIDriver",
    ] {
        assert!(kinds.contains_key(kind), "install has a {kind}");
    }

    // And nothing else of this release exists for those kinds (listed by label).
    for (kind, api_version) in &kinds {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let (ar, caps) =
            discovery::pinned_kind(&client, &GroupVersionKind::gvk(group, version, kind))
                .await
                .unwrap();
        let api: Api<DynamicObject> = if caps.scope == discovery::Scope::Namespaced {
            Api::namespaced_with(client.clone(), ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
        let live: BTreeSet<String> = api
            .list(&lp)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect();
        let want: BTreeSet<String> = rendered
            .all(kind)
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(live, want, "{kind} objects of the release");
    }

    // The server kept the fields that matter (no silent pruning of unknown ones).
    let driver = live_object(&client, rendered.one("CSIDriver"))
        .await
        .unwrap();
    let spec = &driver.data["spec"];
    assert_eq!(spec["serviceAccountTokenInSecrets"], true);
    assert_eq!(spec["requiresRepublish"], true);
    assert_eq!(spec["podInfoOnMount"], true);
    assert_eq!(spec["attachRequired"], false);
    assert_eq!(spec["fsGroupPolicy"], "File");
    assert_eq!(spec["volumeLifecycleModes"], json!(["Ephemeral"]));
    assert_eq!(
        spec["tokenRequests"],
        json!([{"audience": "scopehold.dev", "expirationSeconds": 3600}])
    );
    let ds = live_object(&client, rendered.one("DaemonSet"))
        .await
        .unwrap();
    let node = ds.data["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "node")
        .unwrap()
        .clone();
    let kubelet = node["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "kubelet-dir")
        .unwrap()
        .clone();
    assert_eq!(kubelet["mountPropagation"], "Bidirectional");
    let deploy = live_object(&client, rendered.one("Deployment"))
        .await
        .unwrap();
    assert_eq!(deploy.data["spec"]["replicas"], 2);

    // Helm installed the CRDs from the chart's crds/ (or found them installed).
    for crd in [
        "agentidentities.scopehold.dev",
        "secretgrants.scopehold.dev",
    ] {
        let out = common::kubectl(&["get", "crd", crd, "-o", "name"]);
        assert!(out.status.success(), "CRD {crd} exists");
    }
    // No pods run (no scheduler, no kubelet, no controller-manager): expected.
    let pods = Api::<Pod>::namespaced(client, ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(pods.items.is_empty(), "no controller-manager, so no pods");
}

// ---------------------------------------------------------------------------------
// RBAC of the installed chart
// ---------------------------------------------------------------------------------

/// One authorization question, phrased like `kubectl auth can-i`.
struct Ask {
    verb: &'static str,
    /// `resource[.group][/subresource]`, e.g. `secretgrants.scopehold.dev/status`.
    resource: &'static str,
    /// `None`: cluster-wide (all namespaces).
    namespace: Option<String>,
    name: Option<&'static str>,
}

impl Ask {
    fn parts(&self) -> (String, String, String) {
        let (res, sub) = self.resource.split_once('/').unwrap_or((self.resource, ""));
        let (res, group) = res.split_once('.').unwrap_or((res, ""));
        (group.into(), res.into(), sub.into())
    }

    fn describe(&self) -> String {
        format!(
            "{} {}{} {}",
            self.verb,
            self.resource,
            self.name.map(|n| format!(" named {n}")).unwrap_or_default(),
            self.namespace
                .as_deref()
                .map(|n| format!("in {n}"))
                .unwrap_or_else(|| "cluster-wide".into()),
        )
    }
}

fn ask(verb: &'static str, resource: &'static str, namespace: Option<&str>) -> Ask {
    Ask {
        verb,
        resource,
        namespace: namespace.map(str::to_string),
        name: None,
    }
}

/// A question about one cluster-scoped object.
fn ask_cluster_named(verb: &'static str, resource: &'static str, name: &'static str) -> Ask {
    Ask {
        verb,
        resource,
        namespace: None,
        name: Some(name),
    }
}

fn ask_named(
    verb: &'static str,
    resource: &'static str,
    namespace: &str,
    name: &'static str,
) -> Ask {
    Ask {
        verb,
        resource,
        namespace: Some(namespace.to_string()),
        name: Some(name),
    }
}

/// SubjectAccessReview for ServiceAccount `ns/sa`, with the groups its tokens carry.
async fn allowed(client: &Client, ns: &str, sa: &str, q: &Ask) -> bool {
    let (group, resource, subresource) = q.parts();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{ns}:{sa}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(q.verb.into()),
                group: Some(group),
                resource: Some(resource),
                subresource: (!subresource.is_empty()).then_some(subresource),
                namespace: q.namespace.clone(),
                name: q.name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// Checks every (question, expected answer) and reports all mismatches at once.
async fn expect_access(client: &Client, ns: &str, sa: &str, cases: &[(Ask, bool)]) {
    let mut wrong = Vec::new();
    for (q, want) in cases {
        let got = allowed(client, ns, sa, q).await;
        if got != *want {
            wrong.push(format!(
                "{sa} {} {}: got {}",
                if *want {
                    "should be able to"
                } else {
                    "must not"
                },
                q.describe(),
                if got { "allowed" } else { "denied" }
            ));
        }
    }
    assert!(wrong.is_empty(), "RBAC mismatches:\n{}", wrong.join("\n"));
}

/// `kubectl auth can-i …` impersonating the ServiceAccount: "yes" or "no".
fn kubectl_can_i(ns: &str, sa: &str, args: &[&str]) -> bool {
    let who = format!("--as=system:serviceaccount:{ns}:{sa}");
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.push(&who);
    let out = common::kubectl(&all);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {args:?}: {other:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A token of ServiceAccount `ns/sa` for `audiences` (empty: the API server's own).
async fn sa_token(client: &Client, ns: &str, sa: &str, audiences: &[&str]) -> String {
    sa_token_for(client, ns, sa, audiences, 600).await
}

async fn sa_token_for(
    client: &Client,
    ns: &str,
    sa: &str,
    audiences: &[&str],
    expiration_seconds: i64,
) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(expiration_seconds),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"))
        .status
        .expect("token status")
        .token
}

fn status_code(result: Result<impl Sized, kube::Error>) -> Option<u16> {
    match result {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some(status.code),
        Err(other) => panic!("unexpected client error: {other}"),
    }
}

#[tokio::test]
async fn node_plugin_service_account_has_no_api_permissions() {
    let install = installed().await;
    let client = common::client().await;
    let ns = install.namespace.as_str();
    let other = common::test_namespace(&client, "helm-rbac-other").await;
    let o = Some(other.as_str());
    let n = Some(ns);
    let sa = "scopehold-node";

    let mut cases = Vec::new();
    for verb in ["get", "list", "watch"] {
        for scope in [n, o, None] {
            cases.push((ask(verb, "secrets", scope), false));
            cases.push((ask(verb, "pods", scope), false));
        }
    }
    for q in [
        ask("create", "tokenreviews.authentication.k8s.io", None),
        ask("create", "subjectaccessreviews.authorization.k8s.io", None),
        ask("create", "serviceaccounts/token", n),
        ask("get", "configmaps", n),
        ask_named("get", "secrets", ns, "scopehold-custody-tls"),
        ask_named("get", "configmaps", ns, "scopehold-custody-ca"),
        ask("get", "leases.coordination.k8s.io", n),
        ask("get", "agentidentities.scopehold.dev", o),
        ask("list", "secretgrants.scopehold.dev", None),
        ask("patch", "secretgrants.scopehold.dev/status", o),
        ask("create", "events.events.k8s.io", n),
        ask("create", "events", n),
        ask("get", "nodes", None),
        ask("get", "csidrivers.storage.k8s.io", None),
        ask("create", "pods", n),
        ask("*", "*", None),
    ] {
        cases.push((q, false));
    }
    expect_access(&client, ns, sa, &cases).await;

    // kubectl agrees, and the node plugin's rule list is exactly that of a
    // ServiceAccount nobody ever bound (what every authenticated identity gets).
    assert!(!kubectl_can_i(ns, sa, &["get", "secrets", "-n", ns]));
    assert!(!kubectl_can_i(
        ns,
        sa,
        &["list", "secrets", "--all-namespaces"]
    ));
    assert!(!kubectl_can_i(
        ns,
        sa,
        &["create", "tokenreviews.authentication.k8s.io"]
    ));
    assert!(!kubectl_can_i(ns, sa, &["get", "pods", "-n", &other]));
    let rules = |who: &str| {
        let out = common::kubectl(&[
            "auth",
            "can-i",
            "--list",
            "-n",
            ns,
            &format!("--as=system:serviceaccount:{ns}:{who}"),
        ]);
        ok(out, "kubectl auth can-i --list")
    };
    assert_eq!(
        rules(sa),
        rules("never-bound"),
        "node plugin has more than the defaults"
    );

    // Real tokens. The node plugin's only credential (audience scopehold.dev) is not
    // even accepted by the API server; an API-audience token of its ServiceAccount
    // authenticates but may read nothing.
    let custody_token = sa_token(&client, ns, sa, &["scopehold.dev"]).await;
    let as_custody = common::client_with_token(&custody_token).await;
    let listed = Api::<Secret>::namespaced(as_custody, ns)
        .list(&ListParams::default())
        .await;
    assert_eq!(
        status_code(listed),
        Some(401),
        "scopehold.dev token rejected by the API server"
    );
    let api_token = sa_token(&client, ns, sa, &[]).await;
    let as_node = common::client_with_token(&api_token).await;
    for scope in [ns, other.as_str()] {
        let listed = Api::<Secret>::namespaced(as_node.clone(), scope)
            .list(&ListParams::default())
            .await;
        assert_eq!(
            status_code(listed),
            Some(403),
            "node SA lists secrets in {scope}"
        );
        let got = Api::<Pod>::namespaced(as_node.clone(), scope)
            .get_opt("any")
            .await;
        assert_eq!(status_code(got), Some(403), "node SA gets pods in {scope}");
    }
}

#[tokio::test]
async fn controller_service_account_has_exactly_what_it_needs() {
    let install = installed().await;
    let client = common::client().await;
    let ns = install.namespace.as_str();
    let other = common::test_namespace(&client, "helm-rbac-other").await;
    let o = Some(other.as_str());
    let n = Some(ns);
    let sa = "scopehold-controller";

    let can = [
        // Grants name Secrets in their own namespace, in any namespace.
        ask("get", "secrets", o),
        ask("list", "secrets", o),
        ask("watch", "secrets", o),
        ask("list", "secrets", None),
        ask("watch", "secrets", None),
        ask("get", "secrets", n),
        // Identities and grants: read everywhere, write status only.
        ask("get", "agentidentities.scopehold.dev", o),
        ask("list", "agentidentities.scopehold.dev", None),
        ask("watch", "agentidentities.scopehold.dev", None),
        ask("get", "secretgrants.scopehold.dev", o),
        ask("list", "secretgrants.scopehold.dev", None),
        ask("watch", "secretgrants.scopehold.dev", None),
        ask("patch", "secretgrants.scopehold.dev/status", o),
        ask("patch", "agentidentities.scopehold.dev/status", o),
        // Custody: verify tokens, check pods, record decisions.
        ask("create", "tokenreviews.authentication.k8s.io", None),
        ask("get", "pods", o),
        // Custody: which nodes run an agent's pods (invalidation routing).
        ask("list", "pods", o),
        ask("list", "pods", None),
        ask("create", "events.events.k8s.io", o),
        ask("patch", "events.events.k8s.io", o),
        // Leader election and its own TLS material, in the release namespace.
        ask("create", "leases.coordination.k8s.io", n),
        ask_named(
            "get",
            "leases.coordination.k8s.io",
            ns,
            "scopehold-controller",
        ),
        ask_named(
            "update",
            "leases.coordination.k8s.io",
            ns,
            "scopehold-controller",
        ),
        ask_named(
            "patch",
            "leases.coordination.k8s.io",
            ns,
            "scopehold-controller",
        ),
        ask("create", "secrets", n),
        ask_named("get", "secrets", ns, "scopehold-custody-tls"),
        ask_named("update", "secrets", ns, "scopehold-custody-tls"),
        // Server-side apply creates with the name known, so even create is named.
        ask_named("create", "configmaps", ns, "scopehold-custody-ca"),
        ask_named("get", "configmaps", ns, "scopehold-custody-ca"),
        ask_named("patch", "configmaps", ns, "scopehold-custody-ca"),
        ask_named("update", "configmaps", ns, "scopehold-custody-ca"),
        // The proxy injector's configuration: its caBundle only.
        ask_cluster_named(
            "get",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            "scopehold-proxy-injector",
        ),
        ask_cluster_named(
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            "scopehold-proxy-injector",
        ),
    ];
    let cannot = [
        // No other webhook, and no removing its own.
        ask_cluster_named(
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            "some-other-webhook",
        ),
        ask_cluster_named(
            "delete",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            "scopehold-proxy-injector",
        ),
        ask(
            "create",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        ask(
            "list",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        ask(
            "patch",
            "validatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        // Secrets: read only, except its own TLS Secret.
        ask("create", "secrets", o),
        ask("update", "secrets", o),
        ask("patch", "secrets", o),
        ask("delete", "secrets", o),
        ask("deletecollection", "secrets", o),
        ask("create", "secrets", None),
        ask("delete", "secrets", n),
        ask_named("update", "secrets", ns, "some-other-secret"),
        ask_named("patch", "secrets", ns, "scopehold-custody-tls"),
        ask_named("delete", "secrets", ns, "scopehold-custody-tls"),
        ask_named("update", "configmaps", ns, "some-other-config"),
        ask("create", "configmaps", n),
        ask_named("create", "configmaps", ns, "some-other-config"),
        ask("get", "configmaps", o),
        ask("list", "configmaps", n),
        // Pods: read only.
        ask("watch", "pods", o),
        ask("delete", "pods", o),
        ask("delete", "pods", n),
        ask("create", "pods", o),
        ask("create", "pods/exec", o),
        ask("update", "pods", o),
        // Grants and identities: never the spec, never create or delete.
        ask("update", "secretgrants.scopehold.dev", o),
        ask("patch", "secretgrants.scopehold.dev", o),
        ask("create", "secretgrants.scopehold.dev", o),
        ask("delete", "secretgrants.scopehold.dev", o),
        ask("update", "agentidentities.scopehold.dev", o),
        ask("patch", "agentidentities.scopehold.dev", o),
        ask("update", "secretgrants.scopehold.dev/status", o),
        // Only its own Lease, only at home.
        ask("get", "leases.coordination.k8s.io", n),
        ask_named("update", "leases.coordination.k8s.io", ns, "kube-scheduler"),
        ask("get", "leases.coordination.k8s.io", o),
        ask("update", "leases.coordination.k8s.io", o),
        ask("create", "leases.coordination.k8s.io", o),
        ask_named(
            "delete",
            "leases.coordination.k8s.io",
            ns,
            "scopehold-controller",
        ),
        // No tokens of its own making, no escalation.
        ask("create", "serviceaccounts/token", o),
        ask("impersonate", "serviceaccounts", o),
        ask("impersonate", "users", None),
        ask("escalate", "clusterroles.rbac.authorization.k8s.io", None),
        ask("bind", "clusterroles.rbac.authorization.k8s.io", None),
        ask("create", "rolebindings.rbac.authorization.k8s.io", n),
        ask("delete", "events.events.k8s.io", o),
        ask("get", "nodes", None),
        ask("*", "*", None),
    ];
    let cases: Vec<(Ask, bool)> = can
        .into_iter()
        .map(|q| (q, true))
        .chain(cannot.into_iter().map(|q| (q, false)))
        .collect();
    expect_access(&client, ns, sa, &cases).await;

    // Cross-check through kubectl's impersonation, both ways.
    for (args, want) in [
        (vec!["list", "secrets", "--all-namespaces"], true),
        (vec!["watch", "secrets", "-n", &other], true),
        (vec!["create", "tokenreviews.authentication.k8s.io"], true),
        (vec!["get", "pods", "-n", &other], true),
        (vec!["create", "events.events.k8s.io", "-n", &other], true),
        (
            vec![
                "patch",
                "secretgrants.scopehold.dev",
                "--subresource=status",
                "-n",
                &other,
            ],
            true,
        ),
        (
            vec![
                "update",
                "leases.coordination.k8s.io/scopehold-controller",
                "-n",
                ns,
            ],
            true,
        ),
        (
            vec![
                "update",
                "leases.coordination.k8s.io/someone-else",
                "-n",
                ns,
            ],
            false,
        ),
        (vec!["create", "secrets", "-n", &other], false),
        (vec!["delete", "secrets", "-n", &other], false),
        (vec!["delete", "pods", "-n", &other], false),
        (
            vec!["update", "secretgrants.scopehold.dev", "-n", &other],
            false,
        ),
        (
            vec!["patch", "secretgrants.scopehold.dev", "-n", &other],
            false,
        ),
    ] {
        assert_eq!(
            kubectl_can_i(ns, sa, &args),
            want,
            "kubectl auth can-i {args:?}"
        );
    }

    // And with a real token of the controller's ServiceAccount.
    let token = sa_token(&client, ns, sa, &[]).await;
    let as_controller = common::client_with_token(&token).await;
    let victim = Secret {
        metadata: ObjectMeta {
            name: Some("victim".into()),
            ..Default::default()
        },
        string_data: Some([("k".to_string(), "v".to_string())].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &other)
        .create(&PostParams::default(), &victim)
        .await
        .unwrap();
    let all = Api::<Secret>::all(as_controller.clone())
        .list(&ListParams::default())
        .await
        .expect("controller lists secrets cluster-wide");
    assert!(
        all.items
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("victim"))
    );
    let secrets_other = Api::<Secret>::namespaced(as_controller.clone(), &other);
    let deleted = secrets_other
        .delete("victim", &DeleteParams::default())
        .await;
    assert_eq!(
        status_code(deleted),
        Some(403),
        "controller deletes a secret elsewhere"
    );
    let mut copy = victim.clone();
    copy.metadata.name = Some("planted".into());
    let created = secrets_other.create(&PostParams::default(), &copy).await;
    assert_eq!(
        status_code(created),
        Some(403),
        "controller creates a secret elsewhere"
    );
    let grants = Api::<DynamicObject>::namespaced_with(
        as_controller.clone(),
        &other,
        &kube::api::ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("scopehold.dev", "v1alpha1", "SecretGrant"),
            "secretgrants",
        ),
    );
    let spec_patch = grants
        .patch(
            "any",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revoked": false}})),
        )
        .await;
    assert_eq!(
        status_code(spec_patch),
        Some(403),
        "controller patches a grant's spec"
    );
    let pods = Api::<Pod>::namespaced(as_controller.clone(), &other);
    let deleted = pods.delete("any", &DeleteParams::default()).await;
    assert_eq!(status_code(deleted), Some(403), "controller deletes pods");

    // The CA ConfigMap: server-side apply may write it (and create it: that is
    // authorized with its name, see the SubjectAccessReviews above); a POST of any
    // ConfigMap is refused. Dry runs: authorized like the real thing, never stored.
    let configmaps = Api::<ConfigMap>::namespaced(as_controller.clone(), ns);
    let ca = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "scopehold-custody-ca"},
        "data": {"ca.crt": "dry run"},
    });
    configmaps
        .patch(
            "scopehold-custody-ca",
            &PatchParams::apply("scopehold-controller").force().dry_run(),
            &Patch::Apply(&ca),
        )
        .await
        .expect("controller server-side-applies its CA ConfigMap");
    let mut other_cm: ConfigMap = serde_json::from_value(ca).unwrap();
    other_cm.metadata.name = Some("not-ours".into());
    let posted = configmaps
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &other_cm,
        )
        .await;
    assert_eq!(
        status_code(posted),
        Some(403),
        "controller POSTs a ConfigMap"
    );
}

/// The real controller binary, authenticated as the chart's controller
/// ServiceAccount (nothing else), started with the Deployment's own arguments and
/// environment: it must sync its caches, reconcile a grant to Active and record an
/// Event, hold its Lease and publish its custody CA, i.e. the chart's RBAC is
/// enough for all of it.
#[tokio::test]
async fn controller_binary_runs_with_only_the_chart_rbac() {
    let install = installed().await;
    let client = common::client().await;
    common::install_crds(&client).await;
    let ns = install.namespace.as_str();
    let agents = common::test_namespace(&client, "helm-e2e-agents").await;

    // A kubeconfig with the controller ServiceAccount's token instead of the admin's.
    let token = sa_token_for(&client, ns, "scopehold-controller", &[], 3600).await;
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&common::server().kubeconfig).unwrap())
            .unwrap();
    for user in kubeconfig["users"]
        .as_sequence_mut()
        .expect("users in kubeconfig")
    {
        user["user"] = serde_yaml::to_value(BTreeMap::from([("token", token.as_str())])).unwrap();
    }
    let dir = common::server().run_dir.join("helm-controller");
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig_path = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig_path,
        serde_yaml::to_string(&kubeconfig).unwrap(),
    )
    .unwrap();

    // The Deployment's container, as installed, run as a local process (custody
    // TLS and leader election on, as in the cluster).
    let bin = env!("CARGO_BIN_EXE_scopehold");
    let c = container(install.rendered.one("Deployment"), "controller");
    let args: Vec<String> = strings(&c["args"])
        .into_iter()
        .map(|a| {
            if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0".to_string()
            } else {
                a
            }
        })
        .collect();
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .env_clear()
        .env("KUBECONFIG", &kubeconfig_path);
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_string(),
            (None, Some("metadata.name")) => "scopehold-controller-test-0".to_string(),
            (None, Some("metadata.namespace")) => ns.to_string(),
            other => panic!("unexpected env source for {name}: {other:?}"),
        };
        cmd.env(name, value);
    }
    let log_path = dir.join("controller.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning the controller");
    let mut controller = Running { child, log_path };

    // Steps 1-3 of the quickstart, as the admin: Secret, identity, grant.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut apply = vec!["apply".to_string(), "-n".into(), agents.clone()];
    for f in ["01-secret.yaml", "02-agent.yaml", "03-grant.yaml"] {
        apply.push("-f".into());
        apply.push(examples.join(f).to_string_lossy().into_owned());
    }
    let apply: Vec<&str> = apply.iter().map(String::as_str).collect();
    ok(common::kubectl(&apply), "kubectl apply examples");

    let grants = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &agents,
        &kube::api::ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("scopehold.dev", "v1alpha1", "SecretGrant"),
            "secretgrants",
        ),
    );
    let phase = common::wait_for_desc(
        "the grant to become Active",
        std::time::Duration::from_secs(60),
        async || {
            controller.assert_running();
            let grant = grants.get_opt("claude-code-supabase").await.ok()??;
            let phase = grant.data["status"]["phase"].as_str()?.to_string();
            (phase == "Active").then_some(phase)
        },
    )
    .await;
    assert_eq!(phase, "Active");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &agents);
    common::wait_for_desc(
        "an Event from the controller",
        std::time::Duration::from_secs(30),
        async || {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reporting_controller.as_deref() == Some("scopehold-controller"))
                .then_some(())
        },
    )
    .await;

    {
        let leases = Api::<Lease>::namespaced(client.clone(), ns);
        common::wait_for_desc(
            "the controller to hold its Lease",
            std::time::Duration::from_secs(30),
            async || {
                let lease = leases.get_opt("scopehold-controller").await.ok()??;
                let holder = lease.spec?.holder_identity?;
                (holder == "scopehold-controller-test-0").then_some(())
            },
        )
        .await;
    }
    {
        let configmaps = Api::<ConfigMap>::namespaced(client.clone(), ns);
        let ca = configmaps
            .get("scopehold-custody-ca")
            .await
            .expect("CA ConfigMap published");
        assert!(ca.data.unwrap_or_default().contains_key("ca.crt"));
        Api::<Secret>::namespaced(client.clone(), ns)
            .get("scopehold-custody-tls")
            .await
            .expect("custody TLS Secret created");
        let key = Api::<Secret>::namespaced(client.clone(), ns)
            .get("scopehold-digest-key")
            .await
            .expect("digest key Secret created");
        assert_eq!(
            key.data
                .unwrap_or_default()
                .get("digest.key")
                .map(|k| k.0.len()),
            Some(32)
        );
    }
    let logs = controller.stop();
    assert!(
        !logs.to_ascii_lowercase().contains("forbidden"),
        "the controller hit an RBAC denial:\n{logs}"
    );
}

/// A child process killed on drop, whose log is shown if the test fails.
struct Running {
    child: std::process::Child,
    log_path: PathBuf,
}

impl Running {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the controller exited ({status}):\n{}", self.logs());
        }
    }

    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- controller log {} ---\n{}",
                self.log_path.display(),
                self.logs()
            );
        }
    }
}

/// The installed release's guard on injected pods (a ValidatingAdmissionPolicy
/// from proxy-injector.yaml): the sidecar, the annotation and the values stay
/// out of reach of pod updates and debug containers; everything else of the
/// pod, and pods without the sidecar, stay as updatable as ever. Dry runs:
/// admission runs, nothing changes.
#[tokio::test]
async fn an_injected_pods_sidecar_cannot_be_changed_or_debugged() {
    installed().await;
    let client = common::client().await;
    let ns = common::test_namespace(&client, "sidecar-guard").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = |name: &str, injected: bool| -> Pod {
        let annotations = if injected {
            json!({"scopehold.dev/injected": "proxy"})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "automountServiceAccountToken": false,
                "initContainers": [{
                    "name": "scopehold-proxy", "image": "registry.test/scopehold:1",
                    "restartPolicy": "Always",
                    "volumeMounts": [{"name": "scopehold-proxy-values", "mountPath": "/v"}],
                }],
                "containers": [{"name": "agent", "image": "registry.test/agent:1"}],
                "volumes": [{"name": "scopehold-proxy-values", "emptyDir": {}}],
            }
        }))
        .unwrap()
    };
    for (name, injected) in [("guarded", true), ("plain", false)] {
        pods.create(&PostParams::default(), &pod(name, injected))
            .await
            .unwrap();
    }
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let json_patch = |ops: Value| Patch::Json::<()>(serde_json::from_value(ops).unwrap());
    let sidecar_image =
        json!([{"op": "replace", "path": "/spec/initContainers/0/image", "value": "busybox"}]);
    // The policy takes a moment to be in force after the install.
    let refusal = common::wait_for_desc(
        "the guard in force",
        std::time::Duration::from_secs(30),
        async || match pods
            .patch("guarded", &dry, &json_patch(sidecar_image.clone()))
            .await
        {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        },
    )
    .await;
    assert!(
        refusal.contains("sidecar of an injected pod cannot be changed"),
        "{refusal}"
    );

    let agent_image = json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "registry.test/agent:2"}]);
    pods.patch("guarded", &dry, &json_patch(agent_image))
        .await
        .expect("the agent's own container stays updatable");
    let drop_annotation =
        json!([{"op": "remove", "path": "/metadata/annotations/scopehold.dev~1injected"}]);
    let err = pods
        .patch("guarded", &dry, &json_patch(drop_annotation))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("annotation"), "{err}");

    let debug = |target: Option<&str>, mount: bool| {
        let mut container = json!({"name": "debug", "image": "busybox"});
        if let Some(target) = target {
            container["targetContainerName"] = json!(target);
        }
        if mount {
            container["volumeMounts"] =
                json!([{"name": "scopehold-proxy-values", "mountPath": "/x"}]);
        }
        Patch::Strategic(json!({"spec": {"ephemeralContainers": [container]}}))
    };
    for (target, mount) in [(Some("scopehold-proxy"), false), (None, true)] {
        let err = pods
            .patch_ephemeral_containers("guarded", &dry, &debug(target, mount))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ephemeral container"), "{err}");
    }
    pods.patch_ephemeral_containers("guarded", &dry, &debug(Some("agent"), false))
        .await
        .expect("debugging the agent's container stays possible");

    // A pod without the sidecar is not the guard's business.
    pods.patch("plain", &dry, &json_patch(sidecar_image))
        .await
        .expect("pods without the annotation are not guarded");
    pods.patch_ephemeral_containers("plain", &dry, &debug(Some("scopehold-proxy"), true))
        .await
        .expect("pods without the annotation are not guarded");
}

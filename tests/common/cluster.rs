//! A real single-node cluster (kubelet, containerd, runc, kube-controller-manager,
//! kube-scheduler, the test kube-apiserver) for end-to-end tests, started by
//! `hack/cluster.sh up` once per test binary, with ScopeHold installed by
//! `helm install` of `charts/scopehold` with only the values the node needs.
//! How to use it from a new test binary: docs/real-node.md ("Writing real-node tests").
//!
//! The cluster goes away when the test process exits however it exits: the
//! script tears down when its stdin (held here) closes. Only one node runs on a
//! machine at a time (the script waits for a running one to stop).
//!
//! Tests share the node and the ScopeHold release; each uses its own namespace
//! ([`Cluster::namespace`]). Tests that restart shared parts (the node plugin,
//! a controller replica) take [`Cluster::disruptive`]; the others take
//! [`Cluster::shared`], so no test sees another's restart.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Namespace and release name of the installed chart.
pub const RELEASE_NAMESPACE: &str = "scopehold-system";
pub const RELEASE: &str = "scopehold";
/// The agent image (busybox-static, every applet linked in /bin).
pub const AGENT_IMAGE: &str = "scopehold.local/busybox:static";
/// Ports of the release on the host network (DIR/values.yaml; clear of the
/// other tests' listeners on this machine).
pub const CUSTODY_PORT: u16 = 19443;
pub const METRICS_PORT: u16 = 18080;
pub const NODE_HEALTH_PORT: u16 = 19808;

/// Names the test upstream's certificate covers (pods map them to 127.0.0.1
/// with hostAliases): one to grant, one never granted.
pub const UPSTREAM_HOSTS: [&str; 2] = ["api.upstream.test", "other.upstream.test"];

/// Cluster start: builds are done before (hack/test.sh) or cached; this covers
/// a cold image build and the node's start.
const START_TIMEOUT: Duration = Duration::from_secs(1500);

pub struct Cluster {
    /// The cluster's state directory (short: kubelet's sockets live below it).
    pub dir: PathBuf,
    /// Admin kubeconfig of the cluster's API server.
    pub kubeconfig: PathBuf,
    /// The chart values this node needs (written by the script).
    pub values: PathBuf,
    /// `NODE_NAME`, `KUBELET_DIR`, `APISERVER_PORT`, … from `DIR/env`.
    pub env: BTreeMap<String, String>,
    _child: Mutex<Child>,
    _stdin: ChildStdin,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
/// Disruptive tests (restarting shared parts) exclude every other test.
static DISRUPTION: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The node of this test binary, started on first use (blocking).
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start) {
        Ok(cluster) => cluster,
        Err(msg) => panic!("{msg}"),
    }
}

/// The node with ScopeHold installed by `helm install` (once per test binary),
/// its DaemonSet and Deployment rolled out and the driver registered.
pub fn cluster_with_scopehold() -> &'static Cluster {
    let cluster = cluster();
    match INSTALLED.get_or_init(|| cluster.install_scopehold()) {
        Ok(()) => cluster,
        Err(msg) => panic!("{msg}"),
    }
}

fn start() -> Result<Cluster, String> {
    // Short and unique per process; below /tmp (sockets must fit 107 bytes).
    let dir = PathBuf::from(format!("/tmp/shn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let log_path = dir.join("cluster.log");
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = Command::new(repo().join("hack/cluster.sh"))
        .arg("up")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("spawning hack/cluster.sh: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let kubeconfig = loop {
        let left = (started + START_TIMEOUT).saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(path) = line.strip_prefix("ready ") {
                    break PathBuf::from(path.trim());
                }
            }
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "hack/cluster.sh up {} did not become ready; its log:\n{log}",
                    dir.display()
                ));
            }
        }
    };
    eprintln!(
        "real node ready in {:.1}s (state: {})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    let env = std::fs::read_to_string(dir.join("env"))
        .map_err(|e| format!("reading {}/env: {e}", dir.display()))?
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim_start_matches("export ").split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    Ok(Cluster {
        values: dir.join("values.yaml"),
        dir,
        kubeconfig,
        env,
        _child: Mutex::new(child),
        _stdin: stdin,
    })
}

/// The test upstream's PKI, shared with tests/proxy_support (test binaries
/// that use both load the file twice: two private copies, by design).
#[path = "../proxy_support/pki.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::duplicate_mod)]
mod pki;

/// A CA and a serving certificate for [`UPSTREAM_HOSTS`] in `dir`; returns
/// the CA file.
fn write_upstream_pki(dir: &Path) -> Result<PathBuf, String> {
    let pki = pki::pki_for(&UPSTREAM_HOSTS);
    let fail = |e: std::io::Error| format!("test upstream PKI in {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    for (name, text) in [
        ("ca.crt", &pki.ca_pem),
        ("tls.crt", &pki.cert_pem),
        ("tls.key", &pki.key_pem),
    ] {
        std::fs::write(dir.join(name), text).map_err(fail)?;
    }
    Ok(dir.join("ca.crt"))
}

impl Cluster {
    pub fn node_name(&self) -> &str {
        &self.env["NODE_NAME"]
    }

    /// `ca.crt`, `tls.crt` and `tls.key` of a test upstream serving
    /// [`UPSTREAM_HOSTS`], whose CA the release's injected sidecars trust.
    pub fn upstream_pki_dir(&self) -> PathBuf {
        self.dir.join("upstream-pki")
    }

    pub fn kubelet_dir(&self) -> PathBuf {
        PathBuf::from(&self.env["KUBELET_DIR"])
    }

    /// An admin client for the cluster's API server (one per test runtime).
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kube::Config");
        Client::try_from(config).expect("kube::Client")
    }

    /// `kubectl --kubeconfig <cluster> ARGS…` (captured; check the status yourself).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("/usr/bin/kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running /usr/bin/kubectl")
    }

    /// `kubectl …` that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The Events about object `name` in `ns`, one "reason: message" line
    /// each (kubelet writes a pod's FailedMount here).
    pub fn events_of(&self, ns: &str, name: &str) -> String {
        self.kubectl_ok(&[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ])
    }

    /// `kubectl exec -n NS POD -c CONTAINER -- CMD…` (the pod's first container
    /// when `container` is None).
    pub fn exec(&self, ns: &str, pod: &str, container: Option<&str>, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", "-n", ns, pod];
        if let Some(c) = container {
            args.extend(["-c", c]);
        }
        args.push("--");
        args.extend(cmd);
        self.kubectl(&args)
    }

    /// Runs `helm` with this cluster's kubeconfig.
    pub fn helm(&self, args: &[&str]) -> Output {
        let helm = std::env::var("SCOPEHOLD_HELM").unwrap_or_else(|_| {
            let cached = dirs_cache().join("bin/helm");
            cached.to_string_lossy().into_owned()
        });
        let home = self.dir.join("helm-home");
        Command::new(helm)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("running helm (hack/test.sh installs it into ~/.cache/scopehold/bin)")
    }

    /// `helm install` of charts/scopehold with DIR/values.yaml only (image,
    /// pull policy, host network, API server / custody addresses and ports,
    /// kubelet and state dirs); waits for the rollout and the registration.
    fn install_scopehold(&self) -> Result<(), String> {
        let started = Instant::now();
        let chart = repo().join("charts/scopehold");
        let values = self.values.to_string_lossy().into_owned();
        let upstream_ca = write_upstream_pki(&self.upstream_pki_dir())?;
        let upstream_ca = format!("proxyInjector.upstreamCA={}", upstream_ca.display());
        let out = self.helm(&[
            "install",
            RELEASE,
            &chart.to_string_lossy(),
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            &values,
            // The CA of test upstreams on loopback, trusted by injected
            // proxy sidecars (the operator's setting).
            "--set-file",
            &upstream_ca,
            "--wait",
            "--timeout",
            "5m",
        ]);
        if !out.status.success() {
            return Err(format!(
                "helm install failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.describe_release()
            ));
        }
        // The driver is registered when kubelet lists it in the CSINode object.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.kubectl(&[
                "get",
                "csinode",
                self.node_name(),
                "-o",
                "jsonpath={.spec.drivers[*].name}",
            ]);
            if String::from_utf8_lossy(&out.stdout).contains("csi.scopehold.dev") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kubelet never registered csi.scopehold.dev\n{}",
                    self.describe_release()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "helm install + rollout + registration took {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Pods, events and logs of the release, for failure messages.
    pub fn describe_release(&self) -> String {
        let mut text = String::new();
        for args in [
            vec!["get", "pods", "-A", "-o", "wide"],
            vec![
                "get",
                "events",
                "-n",
                RELEASE_NAMESPACE,
                "--sort-by=.lastTimestamp",
            ],
            vec![
                "logs",
                "-n",
                RELEASE_NAMESPACE,
                "-l",
                "app.kubernetes.io/component=node",
                "--tail=50",
            ],
            vec![
                "logs",
                "-n",
                RELEASE_NAMESPACE,
                "-l",
                "app.kubernetes.io/component=controller",
                "--tail=30",
                "--prefix",
            ],
        ] {
            let out = self.kubectl(&args);
            text.push_str(&format!(
                "--- kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        text
    }

    /// Holds off disruptive tests while a normal test runs.
    pub async fn shared(&self) -> tokio::sync::RwLockReadGuard<'static, ()> {
        DISRUPTION.read().await
    }

    /// Runs alone: for tests that restart the node plugin or a controller.
    pub async fn disruptive(&self) -> tokio::sync::RwLockWriteGuard<'static, ()> {
        DISRUPTION.write().await
    }

    /// A fresh namespace `<prefix>-xxxxx` (kube-controller-manager creates its
    /// `default` ServiceAccount and `kube-root-ca.crt`).
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating a namespace");
        created.metadata.name.expect("a generated name")
    }

    /// The release's pods of one component (`controller` or `node`).
    pub async fn component_pods(&self, client: &Client, component: &str) -> Vec<Pod> {
        Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .list(
                &ListParams::default().labels(&format!("app.kubernetes.io/component={component}")),
            )
            .await
            .expect("listing the release's pods")
            .items
    }

    /// Every log line of a component's running pods (kubectl logs).
    pub fn component_logs(&self, component: &str) -> String {
        let out = self.kubectl(&[
            "logs",
            "-n",
            RELEASE_NAMESPACE,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
            "--tail=-1",
            "--prefix",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("SCOPEHOLD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/scopehold")
        })
}

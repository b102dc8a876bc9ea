//! Shared support for the integration tests: a real kube-apiserver (v1.36.3, embedded
//! etcd, RBAC on) per test binary, clients for the admin and the plain RBAC users,
//! namespaces, CRDs, the controller as a child process, and kubelet's part of the
//! CSI token flow (Pods and bound ServiceAccount tokens).
//!
//! Each `tests/*.rs` file does `mod common;`. Every `#[tokio::test]` has its own
//! runtime, so nothing here caches a `kube::Client`: a client belongs to the runtime
//! that created it, and reusing one from another test's (finished) runtime hangs.
//!
//! State of a run lives under `target/tmp/scopehold-it/<test binary>-<pid>/`:
//! `apiserver/` (kubeconfig, users.json, ca.crt, apiserver.log, etcd data) and the
//! controller logs. It is kept after the run for post-mortems and removed by the
//! next run once the owning process is gone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

pub mod cluster;
pub mod objects;
pub mod proxy;
pub mod scrape;
pub mod stack;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use serde::Deserialize as _;

/// Field manager for everything the tests apply, distinct from the controller's.
pub const FIELD_MANAGER: &str = "scopehold-tests";

/// The audience the custody service accepts ServiceAccount tokens for.
pub use scopehold::api::TOKEN_AUDIENCE as AUDIENCE;

/// How long the API server may take from spawn to `/readyz` OK (etcd + apiserver
/// start, post-start hooks, RBAC bootstrap). The binary itself gives up after 3 min.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A running API server shared by all tests of one test binary.
pub struct ApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Admin kubeconfig (token of a `system:masters` user, CA-verified TLS).
    pub kubeconfig: PathBuf,
    /// The API server's state directory (also holds `apiserver.log`, `ca.crt`).
    pub dir: PathBuf,
    /// State directory of this test run (parent of `dir`); controller logs go here.
    pub run_dir: PathBuf,
    /// Bearer tokens of the plain users (`alice`, `bob`, `mallory`): they
    /// authenticate, belong to no group, and may do nothing until a test binds a role.
    pub users: BTreeMap<String, String>,
    /// The test API server binary (for [`ApiServer::start`] after a stop).
    bin: PathBuf,
    /// The running process; `None` while stopped.
    process: Mutex<Option<Running>>,
}

/// A running API server process.
struct Running {
    /// Held so it is never reaped while the tests run.
    child: Child,
    /// The write end of the child's stdin: the binary exits when it closes, i.e. when
    /// this test process exits (however it exits) or [`ApiServer::stop`] drops it.
    /// Never written to.
    stdin: ChildStdin,
}

/// How long a stopping API server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

impl ApiServer {
    /// Stops the API server (and its etcd): clients see connections refused until
    /// [`ApiServer::start`]. The server is shared by every test of the binary, so
    /// only a test binary with a single test may stop it.
    pub fn stop(&self) {
        let Some(Running { mut child, stdin }) = self.process.lock().unwrap().take() else {
            return;
        };
        // Closing stdin is the binary's signal to exit.
        drop(stdin);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the API server again on the same directory after [`ApiServer::stop`]:
    /// the same URL, CA, serving certificate, service-account signing key, tokens
    /// and objects (etcd's data is kept). Blocks until it is ready.
    pub fn start(&self) {
        let mut process = self.process.lock().unwrap();
        if process.is_some() {
            return;
        }
        let (running, url) =
            spawn_server(&self.bin, &self.dir).unwrap_or_else(|message| panic!("{message}"));
        assert_eq!(url, self.url, "the restarted API server moved");
        *process = Some(running);
    }

    /// [`ApiServer::stop`] then [`ApiServer::start`].
    pub fn restart(&self) {
        self.stop();
        self.start();
    }
}

static SERVER: OnceLock<Result<ApiServer, String>> = OnceLock::new();

/// The API server of this test binary, started on first use.
///
/// Blocks the calling thread during startup (at most [`READY_TIMEOUT`], plus a cold
/// Go build the first time on a machine); concurrent callers wait for the same
/// start. A failed start is remembered: every test then fails with the same message
/// instead of each one retrying a multi-minute build.
pub fn server() -> &'static ApiServer {
    match SERVER.get_or_init(start_server) {
        Ok(server) => server,
        Err(msg) => panic!("{msg}"),
    }
}

fn start_server() -> Result<ApiServer, String> {
    let run_dir = run_dir();
    let dir = run_dir.join("apiserver");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let bin = apiserver_binary()?;
    let (running, url) = spawn_server(&bin, &dir)?;

    let users_path = dir.join("users.json");
    let users: BTreeMap<String, String> = std::fs::read(&users_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("reading {}: {e}", users_path.display()))?;

    Ok(ApiServer {
        url,
        kubeconfig: dir.join("kubeconfig"),
        dir,
        run_dir,
        users,
        bin,
        process: Mutex::new(Some(running)),
    })
}

/// Starts the API server binary on `dir` (reusing what an earlier start left
/// there) and waits for its `ready <url>` line.
fn spawn_server(bin: &Path, dir: &Path) -> Result<(Running, String), String> {
    let log_path = dir.join("apiserver.log");
    // Appended: a restart keeps the earlier run's log.
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let mut child = Command::new(bin)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");

    // Read stdout on a thread so the wait can time out. The thread keeps draining
    // stdout after `ready` so the child never blocks on (or dies of) a full pipe.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::Builder::new()
        .name("apiserver-stdout".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        })
        .map_err(|e| format!("spawning stdout reader: {e}"))?;

    let started = Instant::now();
    let deadline = started + READY_TIMEOUT;
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("ready ") {
                    break url.trim().to_string();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(start_failure(
                    &format!("kube-apiserver not ready after {READY_TIMEOUT:?}"),
                    &log_path,
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(start_failure(
                    &format!("kube-apiserver exited before ready ({status})"),
                    &log_path,
                ));
            }
        }
    };
    eprintln!(
        "kube-apiserver ready at {url} after {:.1}s (state in {})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok((Running { child, stdin }, url))
}

/// Path of the test kube-apiserver binary: `$SCOPEHOLD_APISERVER_BIN` if set (CI
/// builds once up front), else whatever `tests/apiserver/build.sh` prints (it builds
/// on a cache miss; its progress goes straight to the terminal).
fn apiserver_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("SCOPEHOLD_APISERVER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apiserver/build.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    // Relay the build's progress live (a cold build takes minutes) and keep it for
    // the panic message, where CI logs show it next to the failing test.
    let stderr = child.stderr.take().expect("stderr is piped");
    let relay = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // Straight to the process's stderr: libtest captures only test threads.
            let _ = writeln!(std::io::stderr(), "{line}");
            seen.push(line);
        }
        seen
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let build_log = relay.join().unwrap_or_default();
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            tail(&build_log.join("\n"), 60)
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        return Err(format!("{} printed no binary path", script.display()));
    }
    Ok(PathBuf::from(path))
}

fn start_failure(what: &str, log: &Path) -> String {
    format!(
        "{what}\n--- last lines of {} ---\n{}",
        log.display(),
        tail(&std::fs::read_to_string(log).unwrap_or_default(), 60)
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// This run's state directory. Removes the directories of earlier runs whose process
/// is gone first, so `target/tmp` holds at most the last run of each test binary
/// (etcd preallocates a 64 MB WAL, which adds up quickly otherwise).
fn run_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scopehold-it");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .rsplit_once('-')
                .and_then(|(_, p)| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_stem)
        .map_or_else(|| "test".into(), |s| s.to_string_lossy().into_owned());
    root.join(format!("{stem}-{}", std::process::id()))
}

/// A fresh admin client (`system:masters`). Build one per test: see the module docs.
pub async fn client() -> Client {
    Client::try_from(admin_config().await).expect("building admin client")
}

/// A fresh client authenticated as plain user `user` (`alice`, `bob` or `mallory`),
/// same server and CA as the admin.
pub async fn client_as(user: &str) -> Client {
    let token = server()
        .users
        .get(user)
        .unwrap_or_else(|| panic!("no test user {user:?}; have {:?}", server().users.keys()));
    client_with_token(token).await
}

/// A fresh client that authenticates with `token` (e.g. a ServiceAccount token from
/// [`pod_token`], to test what that identity may do).
pub async fn client_with_token(token: &str) -> Client {
    let mut config = admin_config().await;
    // AuthInfo's token is a secrecy::SecretString; deserializing avoids a direct
    // dependency on secrecy just for the tests.
    config.auth_info =
        serde_json::from_value(serde_json::json!({ "token": token })).expect("AuthInfo from token");
    Client::try_from(config).expect("building token client")
}

async fn admin_config() -> Config {
    let path = &server().kubeconfig;
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", path.display()));
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube::Config from the test kubeconfig")
}

/// Creates a namespace named `<prefix>-<5 random chars>` and a `default`
/// ServiceAccount in it (no kube-controller-manager runs to create it). Returns the
/// name. The API server picks the suffix (`generateName`), so names never collide.
/// Namespaces are not deleted afterwards: without the namespace controller a
/// deletion would never finish, and the whole etcd goes away with the process.
pub async fn test_namespace(client: &Client, prefix: &str) -> String {
    let mut prefix: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    // 63 (DNS label) - 5 (generated suffix) - 1 (dash) = 57.
    prefix.truncate(57);
    let prefix = prefix.trim_matches('-');
    let prefix = if prefix.is_empty() { "test" } else { prefix };

    let ns = Namespace {
        metadata: ObjectMeta {
            generate_name: Some(format!("{prefix}-")),
            labels: Some([("scopehold.dev/test".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let ns = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {prefix}-*: {e}"));
    let name = ns.metadata.name.expect("created namespace has a name");
    create_service_account(client, &name, "default").await;
    name
}

/// Creates ServiceAccount `name` in `ns` (needed before Pods or TokenRequests).
pub async fn create_service_account(client: &Client, ns: &str, name: &str) -> ServiceAccount {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap_or_else(|e| panic!("creating ServiceAccount {ns}/{name}: {e}"))
}

/// Server-side-applies every document of `crds/*.yaml` and waits until each CRD is
/// Established (30 s). Idempotent, so every test that needs the CRDs calls it: SSA of
/// unchanged manifests by the same manager is a no-op, also when concurrent.
pub async fn install_crds(client: &Client) {
    install_crds_from(client, &Path::new(env!("CARGO_MANIFEST_DIR")).join("crds")).await;
}

/// [`install_crds`] from another directory (the harness tests use a throwaway CRD).
pub async fn install_crds_from(client: &Client, dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no CRD manifests in {}", dir.display());

    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", file.display()));
            if value.is_null() {
                continue; // empty document, e.g. a trailing `---`
            }
            if value.get("kind").and_then(serde_yaml::Value::as_str)
                != Some("CustomResourceDefinition")
            {
                // crds/ also holds the admission policy and its binding.
                apply_manifest(client, value, file).await;
                continue;
            }
            let crd: CustomResourceDefinition = serde_yaml::from_value(value)
                .unwrap_or_else(|e| panic!("{}: not a CRD: {e}", file.display()));
            let name = crd.metadata.name.clone().expect("CRD has a name");
            api.patch(&name, &params, &Patch::Apply(&crd))
                .await
                .unwrap_or_else(|e| panic!("applying CRD {name} from {}: {e}", file.display()));
            names.push(name);
        }
    }
    for name in names {
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established after 30s"))
            .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
    }
}

/// Server-side-applies one cluster-scoped manifest of any kind (e.g. the admission
/// policy in `crds/`), the resource found by discovery.
pub async fn apply_manifest(client: &Client, value: serde_yaml::Value, file: &Path) {
    let object: kube::api::DynamicObject = serde_yaml::from_value(value)
        .unwrap_or_else(|e| panic!("{}: not a Kubernetes object: {e}", file.display()));
    let types = object
        .types
        .clone()
        .unwrap_or_else(|| panic!("{}: object without apiVersion/kind", file.display()));
    let gvk = kube::api::GroupVersionKind::try_from(&types)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("{}: discovering {gvk:?}: {e}", file.display()));
    let name = object.metadata.name.clone().expect("manifest has a name");
    Api::<kube::api::DynamicObject>::all_with(client.clone(), &resource)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "applying {} {name} from {}: {e}",
                types.kind,
                file.display()
            )
        });
}

/// Runs `/usr/bin/kubectl --kubeconfig <admin kubeconfig> ARGS…` (blocking; kubectl
/// calls are short). Check `status` yourself; stdout/stderr are captured.
pub fn kubectl(args: &[&str]) -> Output {
    Command::new("/usr/bin/kubectl")
        .arg("--kubeconfig")
        .arg(&server().kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running /usr/bin/kubectl")
}

/// Polls `f` every 50 ms until it returns `Some`, and returns that value; panics
/// after `timeout`.
pub async fn wait_for<T>(timeout: Duration, f: impl AsyncFnMut() -> Option<T>) -> T {
    wait_for_desc("condition", timeout, f).await
}

/// [`wait_for`] with a description of what is awaited, for the panic message.
pub async fn wait_for_desc<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates a Node object (no kubelet behind it). Tokens for Pods on a node that
/// exists also carry the node's UID (`authentication.kubernetes.io/node-uid`);
/// without it they carry only the node name.
pub async fn create_node(client: &Client, name: &str) -> Node {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("creating Node {name}: {e}"))
}

/// Creates a minimal Pod as if already scheduled to `node_name` (no scheduler runs)
/// and running as ServiceAccount `sa`, which must exist. It stays Pending forever
/// (no kubelet), which is all the token flow needs: a real object with a real UID.
pub async fn create_pod(client: &Client, ns: &str, name: &str, sa: &str, node_name: &str) -> Pod {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa.to_string()),
            node_name: Some(node_name.to_string()),
            containers: vec![Container {
                name: "agent".to_string(),
                image: Some("busybox".to_string()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("creating Pod {ns}/{name}: {e}"))
}

/// Requests a ServiceAccount token bound to Pod `pod_name`/`pod_uid`, as kubelet does
/// for a CSI driver's `tokenRequests`. `expiration_seconds` must be ≥ 600 (API
/// minimum). Tokens for another audience or another pod are how tests forge
/// "almost right" credentials.
pub async fn pod_token(
    client: &Client,
    ns: &str,
    sa: &str,
    pod_name: &str,
    pod_uid: &str,
    audience: &str,
    expiration_seconds: i64,
) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_string()),
                kind: Some("Pod".to_string()),
                name: Some(pod_name.to_string()),
                uid: Some(pod_uid.to_string()),
            }),
        },
        ..Default::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa} bound to pod {pod_name}: {e}"));
    response
        .status
        .expect("TokenRequest response has a status")
        .token
}

/// Counts controllers started by this process, to give each its own log file.
static CONTROLLER_SEQ: AtomicU32 = AtomicU32::new(0);

/// The `scopehold controller` binary running as a child process against the test
/// API server, its stdout and stderr in one log file under the run directory (kept
/// after the run: the "no secret value in any output" test greps these).
pub struct ControllerProcess {
    /// `None` once stopped. A Mutex only so that `&self` methods can poll it.
    child: Mutex<Option<Child>>,
    log_path: PathBuf,
}

impl ControllerProcess {
    /// Starts `scopehold controller --watch-namespace NS --log-format json EXTRA…`
    /// with `KUBECONFIG` pointing at the admin kubeconfig.
    pub fn start(ns: &str, extra_args: &[&str]) -> Self {
        Self::start_with_kubeconfig(ns, extra_args, &server().kubeconfig)
    }

    /// [`ControllerProcess::start`] with another kubeconfig (e.g. one that
    /// reaches the API server through a [`proxy::TcpProxy`]).
    pub fn start_with_kubeconfig(ns: &str, extra_args: &[&str], kubeconfig: &Path) -> Self {
        let server = server();
        let seq = CONTROLLER_SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = server.run_dir.join(format!("controller-{ns}-{seq}.log"));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cloning log file handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scopehold"));
        cmd.args([
            "controller",
            "--watch-namespace",
            ns,
            "--log-format",
            "json",
        ]);
        // Tests run many controllers at once: the default metrics port (8080) would
        // collide, so take a free one unless the test asks for a specific address
        // (the controller logs the bound address as `metrics_addr`).
        if !extra_args.iter().any(|a| a.starts_with("--metrics-listen")) {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        let child = cmd
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_scopehold")));
        Self {
            child: Mutex::new(Some(child)),
            log_path,
        }
    }

    /// Process id, e.g. to send signals.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().map_or(0, Child::id)
    }

    /// Path of the combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the controller printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The JSON log lines with `"target": "audit"`, in order. Lines that are not
    /// JSON (e.g. a panic message on stderr) are skipped.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("target").and_then(|t| t.as_str()) == Some("audit"))
            .collect()
    }

    /// Waits until some log line satisfies `pred` and returns that line; panics
    /// with the log tail after `timeout` or if the process exits meanwhile.
    pub async fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "controller exited ({status}) before the awaited log line\n{}",
                    tail(&self.logs(), 40)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "no matching controller log line after {timeout:?}\n--- last lines of {} ---\n{}",
                    self.log_path.display(),
                    tail(&self.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Exit status if the process has exited, without waiting.
    pub fn try_exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap();
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 10 s. Returns the logs. Use this
    /// when a test checks shutdown behaviour (e.g. the leader Lease is released).
    pub fn stop(self) -> String {
        let child = self.child.lock().unwrap().take();
        if let Some(mut child) = child {
            // std has no SIGTERM and unsafe code is forbidden crate-wide, so use kill(1).
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return self.logs();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!(
                "controller {} ignored SIGTERM for 10 s; killed it",
                child.id()
            );
            let _ = child.kill();
            let _ = child.wait();
        }
        self.logs()
    }

    /// Hard kill (SIGKILL), as in a crash or node loss.
    pub fn kill(self) -> String {
        let child = self.child.lock().unwrap().take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.logs()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        // get_mut: no lock needed with &mut self, and it works even if poisoned.
        let child = match self.child.get_mut() {
            Ok(child) => child.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test is much easier to read with the controller's view of it;
        // libtest shows this output only for failed tests.
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of controller log {} ---\n{}",
                self.log_path.display(),
                tail(&self.logs(), 80)
            );
        }
    }
}

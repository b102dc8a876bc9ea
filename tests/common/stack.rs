//! The two processes that the resolution, revocation, custody and kubectl tests
//! start the same way: the controller serving custody in plaintext on a free
//! loopback port, and `scopehold node` with its socket, kubelet, state and
//! scratch directories under one directory — plus the node plugin's identity
//! (a ServiceAccount, a Pod on the node and its bound token).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::{Client, ResourceExt as _};
use scopehold::csi::grpc::server::MAX_SOCKET_PATH_BYTES;

use super::{
    AUDIENCE, ControllerProcess, create_pod, create_service_account, pod_token, server, tail,
};

/// Name of the node plugin's ServiceAccount and Pod in each test namespace.
pub const NODE_PLUGIN_SA: &str = "node-plugin";
const WAIT: Duration = Duration::from_secs(20);

/// Starts the controller with custody on `127.0.0.1:0` (plaintext, status
/// flushed every 200 ms, the node plugin's account `NS/node-plugin`) plus
/// `extra_args`, waits until its caches are synced and returns it with the
/// custody address.
pub async fn start_controller_with_custody(
    ns: &str,
    extra_args: &[&str],
) -> (ControllerProcess, String) {
    start_controller_with_custody_via(ns, extra_args, &server().kubeconfig).await
}

/// [`start_controller_with_custody`] reaching the API server through `kubeconfig`.
pub async fn start_controller_with_custody_via(
    ns: &str,
    extra_args: &[&str],
    kubeconfig: &Path,
) -> (ControllerProcess, String) {
    let node_sa = format!("{ns}/{NODE_PLUGIN_SA}");
    let mut args = vec![
        "--custody-listen",
        "127.0.0.1:0",
        "--custody-plaintext",
        "--node-service-account",
        &node_sa,
        "--status-flush-ms",
        "200",
    ];
    args.extend_from_slice(extra_args);
    let controller = ControllerProcess::start_with_kubeconfig(ns, &args, kubeconfig);
    let line = controller
        .wait_for_log(|l| l.contains("custody_addr"), WAIT)
        .await;
    let custody = serde_json::from_str::<serde_json::Value>(&line).unwrap()["custody_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    controller
        .wait_for_log(|l| l.contains("caches synced"), WAIT)
        .await;
    (controller, custody)
}

/// Creates the node plugin's ServiceAccount and a Pod of it on `node` (as the
/// DaemonSet would) and returns a bound token for that Pod (audience
/// `scopehold.dev`, one hour).
pub async fn node_plugin_token(client: &Client, ns: &str, node: &str) -> String {
    create_service_account(client, ns, NODE_PLUGIN_SA).await;
    let pod = create_pod(client, ns, NODE_PLUGIN_SA, NODE_PLUGIN_SA, node).await;
    pod_token(
        client,
        ns,
        NODE_PLUGIN_SA,
        NODE_PLUGIN_SA,
        &pod.uid().unwrap(),
        AUDIENCE,
        3600,
    )
    .await
}

/// A fresh directory for one node plugin under the run directory, with its
/// token file written. The prefix is kept short: the socket lives in it and a
/// unix socket path holds at most 107 bytes. A checkout deep enough that the
/// socket would not fit (the run directory sits under `target/`) gets the
/// directory under the system temp directory instead.
pub fn node_plugin_dir(plugin_token: &str) -> tempfile::TempDir {
    let fits = |dir: &tempfile::TempDir| {
        NodePluginProcess::socket(dir.path()).as_os_str().len() <= MAX_SOCKET_PATH_BYTES
    };
    let in_dir = |parent: &Path| {
        tempfile::Builder::new()
            .prefix("np-")
            .tempdir_in(parent)
            .unwrap()
    };
    let mut dir = in_dir(&server().run_dir);
    if !fits(&dir) {
        dir = in_dir(&std::env::temp_dir());
    }
    assert!(
        fits(&dir),
        "no room for a unix socket path under {}",
        dir.path().display()
    );
    std::fs::write(dir.path().join("token"), plugin_token).unwrap();
    dir
}

/// `scopehold node` as a child process; its stdout and stderr go to one log.
pub struct NodePluginProcess {
    child: Child,
    log: PathBuf,
}

impl NodePluginProcess {
    /// The socket of a plugin started on `dir`.
    pub fn socket(dir: &Path) -> PathBuf {
        dir.join("csi.sock")
    }

    /// The kubelet directory of a plugin started on `dir`.
    pub fn kubelet_dir(dir: &Path) -> PathBuf {
        dir.join("kubelet")
    }

    /// Starts the plugin on `dir` (made by [`node_plugin_dir`]; again after a
    /// kill: same socket, kubelet, state and scratch directories), logging to
    /// `dir/LOG_NAME`, and waits for its socket. Panics with the log's tail if
    /// the process exits first.
    pub async fn start(dir: &Path, node: &str, custody: &str, log_name: &str) -> Self {
        let socket = Self::socket(dir);
        let _ = std::fs::remove_file(&socket);
        let log = dir.join(log_name);
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_scopehold"))
            .arg("node")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-name", node])
            .arg("--custody-endpoint")
            .arg(format!("http://{custody}"))
            .arg("--custody-plaintext")
            .arg("--token-file")
            .arg(dir.join("token"))
            .arg("--kubelet-dir")
            .arg(Self::kubelet_dir(dir))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--scratch-dir")
            .arg(dir.join("scratch"))
            .args(["--log-format", "json"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        let mut plugin = Self { child, log };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !socket.exists() {
            if let Ok(Some(status)) = plugin.child.try_wait() {
                panic!(
                    "node plugin exited ({status}) before creating its socket\n{}",
                    tail(&plugin.logs(), 40)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("no node plugin socket after {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        plugin
    }

    /// Everything the plugin printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the plugin serves `/metrics` (it logs the bound address).
    pub fn metrics_addr(&self) -> Option<String> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["metrics_addr"].as_str().map(str::to_owned))
    }

    /// The plugin's JSON audit lines, in order.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "audit")
            .collect()
    }

    /// SIGKILL, as in a crash; returns the logs.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs()
    }
}

impl Drop for NodePluginProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of node plugin log {} ---\n{}",
                self.log.display(),
                tail(&self.logs(), 60)
            );
        }
    }
}

/// Lazily unmounts every mount below `dir`, deepest first (test clean-up:
/// the plugin's tmpfs mounts outlive it when a test fails midway).
pub fn unmount_below(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

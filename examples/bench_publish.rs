//! NodePublishVolume end to end (issue #3): kubelet's call over the node
//! plugin's unix socket, custody's Resolve (TokenReview of the plugin and of the
//! pod token, GET of the pod, grant evaluation, Secret cache), the tmpfs mount
//! and the atomic write, against a real kube-apiserver (embedded etcd, loopback).
//!
//! ```text
//! cargo build --release --bin scopehold
//! cargo run --release --example bench_publish   # as root; about 30 s; --help for sizes
//! ```
//!
//! Runs as root (the node plugin mounts real tmpfs volumes). The `scopehold`
//! binary is `--scopehold PATH` / `$SCOPEHOLD_BIN`, else `target/release/scopehold`.
//! The API server binary comes from `tests/apiserver/build.sh` (or
//! `$SCOPEHOLD_APISERVER_BIN`). Everything runs in a temporary directory that is
//! removed afterwards unless `--keep` is given (then its path is printed).
//!
//! Set up, not timed: the CRDs, `scopehold controller` (custody plaintext on
//! 127.0.0.1:0, `--status-flush-ms 1000`), `scopehold node` with the bound token
//! of its own pod, one Secret, AgentIdentity and SecretGrant, and one Pod (with a
//! bound TokenRequest token) per publish and per direct Resolve.
//!
//! Measured:
//! - the first publish (cold: custody channel connect, Secret fetched into the
//!   cache); every later figure has a warm Secret cache,
//! - NodePublishVolume latency at concurrency 1, at `--concurrency`, and again
//!   at concurrency 1 while every volume of the concurrent run is mounted
//!   (distinct pods, a fresh gRPC connection to the socket per call as kubelet
//!   makes one), mounts per second, NodeUnpublishVolume latency for every
//!   volume; each publish is split into legs by lining up its start and end
//!   with custody's audit line and the plugin's "volume published" line,
//! - the parts: a unix-socket connection, TokenReview (fresh and repeated
//!   token), GET pod, custody's Resolve called directly over one channel, and the
//!   node-local steps (mountinfo, mount, remounts, atomic write, registry fsync)
//!   timed in-process with the plugin's own library code, with no and with all
//!   volumes mounted,
//! - CPU seconds per publish of the API server, controller, node plugin and this
//!   process (kubelet's part), API requests per publish and their server-side
//!   mean latency (the API server's /metrics),
//! - VmRSS / VmHWM of the node plugin and the controller with every volume of the
//!   concurrent run published.
//!
//! At the end every volume is unpublished and /proc/self/mountinfo is checked:
//! no mount below the run's directory may remain (any leftover is reported and
//! detached).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
    TOKEN_AUDIENCE,
};
use scopehold::csi::volume::atomic_writer::{AtomicWriter, FileContent, Payload};
use scopehold::csi::volume::mounter::{Mounter, TmpfsOptions, UnmountMode, parse_mountinfo};
use scopehold::csi::volume::registry::{
    PodRef, PublishedVolume, REGISTRY_FORMAT_VERSION, Registry,
};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo, volume_id};
use scopehold::demo::local::{self, NodePluginLayout};
use scopehold::proto::csi::v1 as csi;
use scopehold::proto::scopehold::v1::ResolveRequest;
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;
use serde_json::json;
use support::timing::{Stats, ms, stats, timed};
use support::{client_for, cpu_seconds, cpu_split, install_crds, meta, mounts_below, tail};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

const NS: &str = "bench-publish";
const SYSTEM_NS: &str = "scopehold-system";
const NODE_SA: &str = "scopehold-node";
const AGENT_SA: &str = "agent";
const NODE: &str = "bench-node";
const VOLUME: &str = "credentials";
const FS_GROUP: i64 = 1000;
const SECRET_VALUE: &str = "sk-bench-0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(about = "NodePublishVolume end to end against a real kube-apiserver")]
struct Args {
    /// The `scopehold` binary (controller and node plugin).
    #[arg(long, env = "SCOPEHOLD_BIN")]
    scopehold: Option<PathBuf>,
    /// Publishes at concurrency 1 (distinct pods).
    #[arg(long, default_value_t = 200)]
    sequential: usize,
    /// Publishes at concurrency 1 while every volume of the concurrent run is
    /// mounted (distinct pods).
    #[arg(long, default_value_t = 100)]
    sequential_full: usize,
    /// Publishes at `--concurrency` (distinct pods); all stay mounted for the
    /// RSS figures, then are unpublished at the same concurrency.
    #[arg(long, default_value_t = 500)]
    concurrent: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Direct custody Resolve calls at concurrency 1 (distinct pods).
    #[arg(long, default_value_t = 200)]
    resolves: usize,
    /// Direct custody Resolve calls at `--concurrency` (distinct pods).
    #[arg(long, default_value_t = 320)]
    concurrent_resolves: usize,
    /// Iterations of each part measured alone (socket, TokenReview, GET pod).
    #[arg(long, default_value_t = 200)]
    micro: usize,
    /// In-process publish/unpublish cycles of the node-local steps.
    #[arg(long, default_value_t = 100)]
    local_cycles: usize,
    /// Pods and tokens created in flight at once during set-up.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
    /// Keep the state directory (logs, etcd, registry).
    #[arg(long)]
    keep: bool,
}

impl Args {
    fn scopehold_bin(&self) -> PathBuf {
        self.scopehold.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/scopehold")
        })
    }
}

// ---------------------------------------------------------------------------
// Processes.

/// A `scopehold` child process with its output in a log file.
struct Daemon {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Daemon {
    fn spawn(bin: &Path, args: &[String], kubeconfig: &Path, log: PathBuf) -> Daemon {
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log handle");
        let child = Command::new(bin)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let pid = child.id().expect("pid");
        Daemon {
            child: Some(child),
            pid,
            log,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    async fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.log.display(),
                    tail(&self.logs(), 20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {} after {timeout:?}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (kill(1): unsafe code is forbidden), SIGKILL after 10 s.
    async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "{} ignored SIGTERM for 10 s; killing it",
                    self.log.display()
                );
                let _ = child.kill().await;
            }
        }
    }
}

/// VmRSS and VmHWM in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The API server is a child of this process running `binary` (start_apiserver
/// keeps its handle private).
fn child_pid_running(binary: &Path) -> Option<u32> {
    let me = std::process::id();
    let binary = std::fs::canonicalize(binary).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == me && std::fs::read_link(e.path().join("exe")).ok()? == binary).then_some(pid)
    })
}

/// (busy, total) jiffies of the whole machine from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Mounts.

/// Detaches whatever is still mounted below the run's directory, also when
/// the benchmark fails half-way.
struct MountSweeper(PathBuf);

impl Drop for MountSweeper {
    fn drop(&mut self) {
        for point in mounts_below(&self.0) {
            eprintln!("detaching leftover mount {}", point.display());
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

// ---------------------------------------------------------------------------
// Kubernetes objects.

async fn create<K>(client: &Client, ns: Option<&str>, object: K) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns.unwrap_or("default"));
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", object.name_any()))
}

fn pod_manifest(name: &str, sa: &str, fs_group: Option<i64>) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": sa,
            "securityContext": {"fsGroup": fs_group},
            "containers": [{"name": "agent", "image": "busybox:1.36"}],
            "volumes": [{"name": VOLUME, "csi": {"driver": "csi.scopehold.dev", "readOnly": true}}]
        }
    }))
    .expect("pod manifest")
}

/// A bound ServiceAccount token for `pod` (audience scopehold.dev), as kubelet
/// obtains it for the CSI driver.
async fn bound_token(client: &Client, ns: &str, sa: &str, pod: &Pod) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![TOKEN_AUDIENCE.to_owned()],
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
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("TokenRequest status")
        .token
}

/// One agent pod as kubelet knows it, with its bound token.
struct BenchPod {
    info: PodInfo,
    token: String,
}

async fn create_pods(client: &Client, prefix: &str, n: usize, concurrency: usize) -> Vec<BenchPod> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let name = format!("{prefix}-{i:04}");
            let pod = create(
                client,
                Some(NS),
                pod_manifest(&name, AGENT_SA, Some(FS_GROUP)),
            )
            .await;
            let token = bound_token(client, NS, AGENT_SA, &pod).await;
            BenchPod {
                info: PodInfo {
                    namespace: NS.into(),
                    name,
                    uid: pod.uid().expect("pod uid"),
                    service_account: AGENT_SA.into(),
                    fs_group: Some(FS_GROUP),
                },
                token,
            }
        })
        .buffered(concurrency)
        .collect()
        .await
}

// ---------------------------------------------------------------------------
// The API server's /metrics.

/// Sums of apiserver_request_total and apiserver_request_duration_seconds
/// (sum, count) per "VERB resource[/subresource]".
#[derive(Clone, Debug, Default)]
struct ApiMetrics {
    requests: BTreeMap<String, f64>,
    duration_sum: BTreeMap<String, f64>,
    duration_count: BTreeMap<String, f64>,
    token_cache: BTreeMap<String, f64>,
}

fn labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        out.insert(
            key.trim_start_matches(',').trim().to_owned(),
            after[..end].to_owned(),
        );
        rest = &after[end + 1..];
    }
    out
}

impl ApiMetrics {
    async fn fetch(client: &Client) -> ApiMetrics {
        let request = tonic::codegen::http::Request::get("/metrics")
            .body(Vec::new())
            .expect("request");
        let body = client.request_text(request).await.expect("GET /metrics");
        let mut m = ApiMetrics::default();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            let key = || {
                let sub = labels.get("subresource").map_or("", String::as_str);
                format!(
                    "{} {}{}{}",
                    labels.get("verb").map_or("", String::as_str),
                    labels.get("resource").map_or("", String::as_str),
                    if sub.is_empty() { "" } else { "/" },
                    sub
                )
            };
            let target = match name {
                "apiserver_request_total" => &mut m.requests,
                "apiserver_request_duration_seconds_sum" => &mut m.duration_sum,
                "apiserver_request_duration_seconds_count" => &mut m.duration_count,
                "authentication_token_cache_request_total" => {
                    let status = labels.get("status").cloned().unwrap_or_default();
                    *m.token_cache.entry(status).or_default() += value;
                    continue;
                }
                _ => continue,
            };
            *target.entry(key()).or_default() += value;
        }
        m
    }

    /// Per key: (requests, mean server-side ms) between `before` and `self`.
    fn since(&self, before: &ApiMetrics) -> BTreeMap<String, (f64, f64)> {
        let d = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, k: &str| {
            a.get(k).copied().unwrap_or(0.0) - b.get(k).copied().unwrap_or(0.0)
        };
        self.requests
            .keys()
            .filter_map(|k| {
                let n = d(&self.requests, &before.requests, k);
                (n > 0.0).then(|| {
                    let count = d(&self.duration_count, &before.duration_count, k);
                    let sum = d(&self.duration_sum, &before.duration_sum, k);
                    (
                        k.clone(),
                        (
                            n,
                            if count > 0.0 {
                                sum / count * 1000.0
                            } else {
                                f64::NAN
                            },
                        ),
                    )
                })
            })
            .collect()
    }
}

/// CPU seconds of the processes involved, sampled around a batch.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    apiserver: f64,
    controller: f64,
    node: f64,
    node_system: f64,
    bench: f64,
}

impl Cpu {
    fn sample(apiserver: u32, controller: u32, node: u32) -> Cpu {
        Cpu {
            apiserver: cpu_seconds(apiserver),
            controller: cpu_seconds(controller),
            node: cpu_seconds(node),
            node_system: cpu_split(node).1,
            bench: cpu_seconds(std::process::id()),
        }
    }

    fn minus(self, before: Cpu) -> Cpu {
        Cpu {
            apiserver: self.apiserver - before.apiserver,
            controller: self.controller - before.controller,
            node: self.node - before.node,
            node_system: self.node_system - before.node_system,
            bench: self.bench - before.bench,
        }
    }

    fn total(self) -> f64 {
        self.apiserver + self.controller + self.node + self.bench
    }
}

// ---------------------------------------------------------------------------
// Kubelet's calls.

/// Wall-clock start and end of each publish, by pod name, to line up with
/// custody's audit line and the node plugin's "volume published" line.
type Marks = Mutex<HashMap<String, (Timestamp, Timestamp)>>;

async fn publish_one(
    kubelet: &KubeletPlayer,
    pod: &BenchPod,
    marks: &Marks,
) -> Result<Duration, String> {
    let request =
        kubelet.publish_request(&pod.info, VOLUME, &pod.token, &HashMap::new(), true, true);
    let at = Timestamp::now();
    let started = Instant::now();
    let answer = kubelet.publish(request).await;
    let elapsed = started.elapsed();
    marks
        .lock()
        .expect("marks")
        .insert(pod.info.name.clone(), (at, Timestamp::now()));
    match answer {
        Ok(Ok(_)) => Ok(elapsed),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(e) => Err(e.to_string()),
    }
}

/// The three legs of each publish from the logs: kubelet's call until
/// custody's decision (socket connect, the plugin's checks, custody's caller
/// and pod TokenReviews, GET pod, grant evaluation: custody writes its audit
/// line just before answering), the decision until the plugin logs "volume
/// published" (the answer's way back, mount, remounts, atomic write, registry
/// fsync), and that log line until kubelet has the reply.
struct Legs {
    to_decision: Vec<Duration>,
    to_published: Vec<Duration>,
    to_reply: Vec<Duration>,
}

fn log_times(
    log: &str,
    message_key: &str,
    message: &str,
    time_key: &str,
) -> HashMap<String, Timestamp> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v[message_key] == message)
        .filter_map(|v| {
            let pod = v["pod"].as_str()?.to_owned();
            let at: Timestamp = v[time_key].as_str()?.parse().ok()?;
            Some((pod, at))
        })
        .collect()
}

fn legs(marks: &Marks, controller_log: &str, node_log: &str) -> Legs {
    let decided = log_times(controller_log, "event", "SecretResolved", "time");
    let published = log_times(node_log, "message", "volume published", "timestamp");
    let span = |a: Timestamp, b: Timestamp| {
        Duration::try_from(b.duration_since(a)).unwrap_or(Duration::ZERO)
    };
    let mut out = Legs {
        to_decision: Vec::new(),
        to_published: Vec::new(),
        to_reply: Vec::new(),
    };
    for (pod, (start, end)) in marks.lock().expect("marks").iter() {
        if let (Some(&d), Some(&p)) = (decided.get(pod), published.get(pod)) {
            out.to_decision.push(span(*start, d));
            out.to_published.push(span(d, p));
            out.to_reply.push(span(p, *end));
        }
    }
    out
}

async fn unpublish_one(kubelet: &KubeletPlayer, pod: &BenchPod) -> Result<Duration, String> {
    let started = Instant::now();
    match kubelet.unpublish(&pod.info.uid, VOLUME).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(e) => Err(e.to_string()),
    }
}

/// How many of `pods` hold exactly the granted value in their volume.
fn verify_files(kubelet: &KubeletPlayer, pods: &[BenchPod]) -> usize {
    pods.iter()
        .filter(|p| {
            std::fs::read(kubelet.target_path(&p.info.uid, VOLUME).join("api-key"))
                .is_ok_and(|c| c == SECRET_VALUE.as_bytes())
        })
        .count()
}

async fn resolve_one(
    custody: &CustodyClient<Channel>,
    node_token: &str,
    pod: &BenchPod,
) -> Result<Duration, String> {
    let mut request = tonic::Request::new(ResolveRequest {
        request_id: String::new(),
        pod_token: pod.token.clone(),
        pod_namespace: pod.info.namespace.clone(),
        pod_name: pod.info.name.clone(),
        pod_uid: pod.info.uid.clone(),
        service_account_name: pod.info.service_account.clone(),
        node_name: NODE.into(),
        volume_id: volume_id(&pod.info.uid, VOLUME),
        grants: vec![],
        fs_group: Some(FS_GROUP),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {node_token}").parse().expect("header"),
    );
    let mut client = custody.clone();
    let started = Instant::now();
    let answer = client.resolve(request).await;
    let elapsed = started.elapsed();
    match answer {
        Ok(r) if r.get_ref().grants.len() == 1 => Ok(elapsed),
        Ok(r) => Err(format!("{} grants resolved", r.get_ref().grants.len())),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

// ---------------------------------------------------------------------------
// Node-local steps, timed in-process with the node plugin's own code.

#[derive(Default)]
struct LocalSteps {
    mountinfo: Vec<Duration>,
    mountinfo_read: Vec<Duration>,
    mount: Vec<Duration>,
    read_only: Vec<Duration>,
    view: Vec<Duration>,
    write: Vec<Duration>,
    close: Vec<Duration>,
    registry_store: Vec<Duration>,
    publish_total: Vec<Duration>,
    unmount: Vec<Duration>,
    registry_remove: Vec<Duration>,
}

/// `cycles` times: the blocking part of a publish (mount_tmpfs, set_read_only,
/// writable_view, AtomicWriter::write, close, Registry::store) and of an
/// unpublish (unmount, rmdir, Registry::remove), as `Apply::run` and
/// `unpublish_blocking` do them, plus one read and parse of mountinfo (the
/// plugin does four per publish and two per unpublish).
fn local_steps(root: &Path, cycles: usize) -> LocalSteps {
    let mounter = Mounter::new(root.join("scratch"));
    let registry = Registry::open(root.join("state")).expect("registry");
    let payload: Payload = [(
        "api-key".to_owned(),
        FileContent::new(SECRET_VALUE.as_bytes().to_vec(), 0o440),
    )]
    .into();
    let options = TmpfsOptions {
        size_bytes: 1 << 20,
        mode: 0o750,
        gid: Some(FS_GROUP as u32),
    };
    let mut s = LocalSteps::default();
    let time = |v: &mut Vec<Duration>, started: Instant| v.push(started.elapsed());
    for i in 0..cycles {
        let parent = root.join(format!("targets/{i:04}"));
        std::fs::create_dir_all(&parent).expect("target parent");
        let target = parent.join("mount");
        let id = format!("local-{i:04}");

        let t = Instant::now();
        let text = std::fs::read("/proc/self/mountinfo").expect("mountinfo");
        time(&mut s.mountinfo_read, t);
        let _ = parse_mountinfo(&text).expect("parse");
        time(&mut s.mountinfo, t);

        let all = Instant::now();
        let t = Instant::now();
        mounter.mount_tmpfs(&target, &options).expect("mount");
        time(&mut s.mount, t);
        let t = Instant::now();
        mounter.set_read_only(&target, true).expect("read-only");
        time(&mut s.read_only, t);
        let t = Instant::now();
        let view = mounter.writable_view(&target).expect("view");
        time(&mut s.view, t);
        let t = Instant::now();
        let writer = AtomicWriter::open(view.path()).expect("open view");
        writer
            .write(&payload, Some(FS_GROUP as u32))
            .expect("write");
        time(&mut s.write, t);
        let t = Instant::now();
        view.close().expect("close view");
        time(&mut s.close, t);
        let now = jiff::Timestamp::now();
        let entry = PublishedVolume {
            format_version: REGISTRY_FORMAT_VERSION,
            volume_id: id.clone(),
            target_path: target.clone(),
            pod: PodRef {
                namespace: NS.into(),
                name: id.clone(),
                uid: id.clone(),
                service_account_name: AGENT_SA.into(),
            },
            agent: "agent".into(),
            requested_grants: vec![],
            grants: vec![],
            fs_group: Some(FS_GROUP as u32),
            read_only: true,
            published_at: now,
            updated_at: now,
            layout: writer.layout(),
        };
        let t = Instant::now();
        registry.store(&entry).expect("store");
        time(&mut s.registry_store, t);
        time(&mut s.publish_total, all);

        let t = Instant::now();
        mounter
            .unmount(&target, UnmountMode::Normal)
            .expect("unmount");
        std::fs::remove_dir(&target).expect("rmdir");
        time(&mut s.unmount, t);
        let t = Instant::now();
        registry.remove(&id).expect("remove");
        time(&mut s.registry_remove, t);
    }
    s
}

// ---------------------------------------------------------------------------
// Output.

struct Report {
    latency: Vec<(String, Stats)>,
    figures: Vec<(String, String)>,
}

impl Report {
    fn lat(&mut self, what: impl Into<String>, samples: &[Duration]) {
        self.latency.push((what.into(), stats(samples)));
    }

    fn fig(&mut self, what: impl Into<String>, value: impl Into<String>) {
        self.figures.push((what.into(), value.into()));
    }

    fn print(&self) {
        let w = self
            .latency
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        println!();
        println!(
            "| {:w$} | {:>4} | {:>7} | {:>7} | {:>7} | {:>7} | {:>7} |",
            "latency (ms)", "n", "p50", "p90", "p99", "max", "mean"
        );
        println!(
            "|{}|-----:|--------:|--------:|--------:|--------:|--------:|",
            "-".repeat(w + 2)
        );
        for (k, s) in &self.latency {
            println!(
                "| {k:w$} | {:>4} | {:>7.2} | {:>7.2} | {:>7.2} | {:>7.2} | {:>7.2} |",
                s.n, s.p50, s.p90, s.p99, s.max, s.mean
            );
        }
        let w = self
            .figures
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        println!();
        println!("| {:w$} | value |", "measure");
        println!("|{}|-------|", "-".repeat(w + 2));
        for (k, v) in &self.figures {
            println!("| {k:w$} | {v} |");
        }
    }
}

// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "run as root: the node plugin mounts tmpfs volumes"
    );
    let bin = args.scopehold_bin();
    assert!(
        bin.exists(),
        "{} does not exist: cargo build --release --bin scopehold",
        bin.display()
    );
    let temp = tempfile::Builder::new()
        .prefix("scopehold-bench-publish-")
        .tempdir()
        .expect("temp dir");
    let (dir, _temp) = if args.keep {
        let kept = temp.keep();
        eprintln!("state in {}", kept.display());
        (kept, None)
    } else {
        (temp.path().to_owned(), Some(temp))
    };
    // Declared after the temp dir so it runs first on the way out.
    let _sweeper = MountSweeper(dir.clone());
    let mut report = Report {
        latency: Vec::new(),
        figures: Vec::new(),
    };
    let load_before = loadavg();

    // --- The API server, CRDs, namespaces, node, service accounts.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let apiserver_bin = match std::env::var_os("SCOPEHOLD_APISERVER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => local::apiserver_binary(repo)
            .await
            .expect("building the API server"),
    };
    let apiserver = local::start_apiserver(&apiserver_bin, &dir)
        .await
        .expect("starting the API server");
    let apiserver_pid = child_pid_running(&apiserver_bin).expect("API server pid");
    eprintln!("kube-apiserver ready at {}", apiserver.url);
    let client = client_for(&apiserver.kubeconfig).await;
    let version = client.apiserver_version().await.expect("version");
    install_crds(&client, WAIT).await;
    for ns in [NS, SYSTEM_NS] {
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: meta(ns),
                    ..Default::default()
                },
            )
            .await
            .expect("namespace");
    }
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &Node {
                metadata: meta(NODE),
                ..Default::default()
            },
        )
        .await
        .expect("node");
    for (ns, sa) in [(SYSTEM_NS, NODE_SA), (NS, AGENT_SA)] {
        create(
            &client,
            Some(ns),
            ServiceAccount {
                metadata: meta(sa),
                ..Default::default()
            },
        )
        .await;
    }

    // --- The controller with custody.
    let mut controller = Daemon::spawn(
        &bin,
        &[
            "controller",
            "--metrics-listen",
            "127.0.0.1:0",
            "--custody-listen",
            "127.0.0.1:0",
            "--custody-plaintext",
            "--node-service-account",
            "scopehold-system/scopehold-node",
            "--status-flush-ms",
            "1000",
            "--log-format",
            "json",
        ]
        .map(String::from),
        &apiserver.kubeconfig,
        dir.join("controller.log"),
    );
    let line = controller.wait_for("\"custody_addr\"", WAIT).await;
    let custody_addr =
        serde_json::from_str::<serde_json::Value>(&line).expect("JSON log line")["custody_addr"]
            .as_str()
            .expect("custody_addr")
            .to_owned();
    controller.wait_for("caches synced", WAIT).await;
    eprintln!("controller running, custody on {custody_addr}");

    // --- The node plugin, authenticated by a bound token of its own pod.
    let plugin_pod = create(
        &client,
        Some(SYSTEM_NS),
        pod_manifest("scopehold-node", NODE_SA, None),
    )
    .await;
    let node_token = bound_token(&client, SYSTEM_NS, NODE_SA, &plugin_pod).await;
    let layout = NodePluginLayout::under(&dir);
    std::fs::write(&layout.token_file, &node_token).expect("token file");
    let node_args = layout.args(NODE, &custody_addr);
    let mut node = Daemon::spawn(
        &bin,
        &node_args,
        &apiserver.kubeconfig,
        dir.join("node.log"),
    );
    node.wait_for("CSI node plugin serving", WAIT).await;
    let kubelet = KubeletPlayer::new(&layout.socket, &layout.kubelet_dir);

    // --- The Secret, the identity and the grant.
    create(
        &client,
        Some(NS),
        Secret {
            metadata: meta("creds"),
            string_data: Some(BTreeMap::from([
                ("api".to_owned(), SECRET_VALUE.to_owned()),
                ("url".to_owned(), "https://example.invalid".to_owned()),
            ])),
            ..Default::default()
        },
    )
    .await;
    create(
        &client,
        Some(NS),
        AgentIdentity::new(
            "agent",
            AgentIdentitySpec {
                service_account_name: AGENT_SA.into(),
                owner: Some("bench".into()),
                ..Default::default()
            },
        ),
    )
    .await;
    create(
        &client,
        Some(NS),
        SecretGrant::new(
            "agent-creds",
            SecretGrantSpec {
                agent: "agent".into(),
                secret_name: "creds".into(),
                keys: vec![GrantedKey {
                    key: "api".into(),
                    path: Some("api-key".into()),
                    ..Default::default()
                }],
                ttl: Some("8h".into()),
                reason: Some("benchmark".into()),
                ..Default::default()
            },
        ),
    )
    .await;
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), NS);
    let deadline = Instant::now() + WAIT;
    while grants.get("agent-creds").await.ok().and_then(|g| g.phase()) != Some(GrantPhase::Active) {
        assert!(Instant::now() < deadline, "grant not Active after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // --- Pods and tokens, up front.
    let total_pods = 1
        + args.sequential
        + args.sequential_full
        + args.concurrent
        + args.resolves
        + args.concurrent_resolves
        + 1;
    eprintln!(
        "creating {total_pods} pods with bound tokens ({} in flight)…",
        args.setup_concurrency
    );
    let started = Instant::now();
    let c = args.setup_concurrency;
    let warm = create_pods(&client, "warm", 1, c).await;
    let seq_pods = create_pods(&client, "seq", args.sequential, c).await;
    let conc_pods = create_pods(&client, "conc", args.concurrent, c).await;
    let res_pods = create_pods(&client, "res", args.resolves, c).await;
    let cres_pods = create_pods(&client, "cres", args.concurrent_resolves, c).await;
    let full_pods = create_pods(&client, "full", args.sequential_full, c).await;
    let token_pod = create_pods(&client, "tok", 1, 1).await;
    let token_pod_object = Api::<Pod>::namespaced(client.clone(), NS)
        .get(&token_pod[0].info.name)
        .await
        .expect("token pod");
    let fresh_tokens: Vec<String> = futures::stream::iter(0..args.micro)
        .map(|_| bound_token(&client, NS, AGENT_SA, &token_pod_object))
        .buffered(c)
        .collect()
        .await;
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!("  done in {setup_secs:.1} s");

    // --- 1. The first publish: custody channel connect, Secret fetched.
    eprintln!("first publish (cold)…");
    let cold_marks = Marks::default();
    let cold = timed(&warm, 1, |p| publish_one(&kubelet, p, &cold_marks)).await;
    cold.check("cold publish");
    assert_eq!(
        verify_files(&kubelet, &warm),
        1,
        "the warm-up volume holds the value"
    );
    report.lat(
        "publish, first (cold Secret cache, new custody channel)",
        &cold.latencies,
    );
    timed(&warm, 1, |p| unpublish_one(&kubelet, p))
        .await
        .check("unpublish warm-up");

    // --- 2. The parts, alone.
    eprintln!("the parts alone…");
    let mut fresh_conn = Vec::new();
    let mut fresh_call = Vec::new();
    for _ in 0..args.micro {
        let t = Instant::now();
        let mut c = kubelet.connect().await.expect("connect");
        fresh_conn.push(t.elapsed());
        c.node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo");
        fresh_call.push(t.elapsed());
    }
    let mut reused = Vec::new();
    let mut one = kubelet.connect().await.expect("connect");
    for _ in 0..args.micro {
        let t = Instant::now();
        one.node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo");
        reused.push(t.elapsed());
    }
    drop(one);
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: String| {
        let reviews = reviews.clone();
        async move {
            let t = Instant::now();
            let r = reviews
                .create(
                    &PostParams::default(),
                    &TokenReview {
                        spec: TokenReviewSpec {
                            token: Some(token),
                            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
                        },
                        ..Default::default()
                    },
                )
                .await
                .expect("TokenReview");
            assert_eq!(
                r.status.and_then(|s| s.authenticated),
                Some(true),
                "token authenticated"
            );
            t.elapsed()
        }
    };
    let mut review_fresh = Vec::new();
    for token in &fresh_tokens {
        review_fresh.push(review(token.clone()).await);
    }
    let mut review_repeat = Vec::new();
    for _ in 0..args.micro {
        review_repeat.push(review(node_token.clone()).await);
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut get_pod = Vec::new();
    for p in res_pods.iter().cycle().take(args.micro) {
        let t = Instant::now();
        pods_api.get(&p.info.name).await.expect("GET pod");
        get_pod.push(t.elapsed());
    }

    // --- 3. Custody's Resolve, called directly over one channel.
    eprintln!("custody Resolve directly…");
    let custody = CustodyClient::connect(format!("http://{custody_addr}"))
        .await
        .expect("custody channel");
    let res1 = timed(&res_pods, 1, |p| resolve_one(&custody, &node_token, p)).await;
    res1.check("Resolve c=1");
    let res32 = timed(&cres_pods, args.concurrency, |p| {
        resolve_one(&custody, &node_token, p)
    })
    .await;
    res32.check("Resolve c=32");

    // --- 4. Publish at concurrency 1.
    eprintln!("{} publishes at concurrency 1…", args.sequential);
    let seq_marks = Marks::default();
    let seq = timed(&seq_pods, 1, |p| publish_one(&kubelet, p, &seq_marks)).await;
    seq.check("publish c=1");
    let seq_ok = verify_files(&kubelet, &seq_pods);
    let seq_unpub = timed(&seq_pods, 1, |p| unpublish_one(&kubelet, p)).await;
    seq_unpub.check("unpublish c=1");

    // --- 5. Node-local steps with no volume mounted.
    eprintln!("node-local steps, no volumes mounted…");
    let local_empty = {
        let root = dir.join("local-empty");
        let cycles = args.local_cycles;
        tokio::task::spawn_blocking(move || local_steps(&root, cycles))
            .await
            .expect("local steps")
    };

    // --- 6. Publish at concurrency 32.
    eprintln!(
        "{} publishes at concurrency {}…",
        args.concurrent, args.concurrency
    );
    // Let the resolution counts of the earlier phases flush first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics_before = ApiMetrics::fetch(&client).await;
    let cpu_before = Cpu::sample(apiserver_pid, controller.pid, node.pid);
    let machine_before = machine_cpu();
    let conc_marks = Marks::default();
    let conc = timed(&conc_pods, args.concurrency, |p| {
        publish_one(&kubelet, p, &conc_marks)
    })
    .await;
    let cpu = Cpu::sample(apiserver_pid, controller.pid, node.pid).minus(cpu_before);
    let machine_after = machine_cpu();
    let machine_busy =
        (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0);
    let metrics_after = ApiMetrics::fetch(&client).await;
    conc.check("publish c=32");
    let conc_ok = verify_files(&kubelet, &conc_pods);
    let mounted = mounts_below(&layout.kubelet_dir).len();
    let node_mem = memory_mib(node.pid);
    let controller_mem = memory_mib(controller.pid);
    let load_during = loadavg();

    // --- 7. Publish at concurrency 1 with every volume mounted.
    eprintln!(
        "{} publishes at concurrency 1 with {mounted} volumes mounted…",
        args.sequential_full
    );
    let full_marks = Marks::default();
    let full = timed(&full_pods, 1, |p| publish_one(&kubelet, p, &full_marks)).await;
    full.check("publish c=1, all mounted");
    let full_ok = verify_files(&kubelet, &full_pods);
    let full_unpub = timed(&full_pods, 1, |p| unpublish_one(&kubelet, p)).await;
    full_unpub.check("unpublish c=1, all mounted");

    // --- 8. Node-local steps with every volume mounted.
    eprintln!("node-local steps, {mounted} volumes mounted…");
    let local_full = {
        let root = dir.join("local-full");
        let cycles = args.local_cycles;
        tokio::task::spawn_blocking(move || local_steps(&root, cycles))
            .await
            .expect("local steps")
    };

    // --- 9. Unpublish everything at concurrency 32, then check mountinfo.
    eprintln!("unpublishing {} volumes…", args.concurrent);
    let conc_unpub = timed(&conc_pods, args.concurrency, |p| unpublish_one(&kubelet, p)).await;
    conc_unpub.check("unpublish c=32");
    let leftovers = mounts_below(&dir);
    let leftover_dirs = conc_pods
        .iter()
        .chain(&seq_pods)
        .chain(&full_pods)
        .chain(&warm)
        .filter(|p| kubelet.target_path(&p.info.uid, VOLUME).exists())
        .count();
    let registry_left = std::fs::read_dir(dir.join("node-state"))
        .map(|d| d.count())
        .unwrap_or(0);

    // --- Figures.
    let n_conc = conc.latencies.len();
    let first = &conc.latencies[..n_conc.min(100)];
    let last = &conc.latencies[n_conc.saturating_sub(100)..];
    report.lat(
        format!(
            "publish, c=1 ({} pods, warm, 0 -> {0} mounted)",
            args.sequential
        ),
        &seq.latencies,
    );
    report.lat(
        format!(
            "publish, c={} ({} pods, warm)",
            args.concurrency, args.concurrent
        ),
        &conc.latencies,
    );
    report.lat(
        format!("  c={}: first 100 completed", args.concurrency),
        first,
    );
    report.lat(
        format!("  c={}: last 100 completed", args.concurrency),
        last,
    );
    report.lat(
        format!(
            "publish, c=1, {mounted} mounted ({} pods, warm)",
            args.sequential_full
        ),
        &full.latencies,
    );
    let (controller_log, node_log) = (controller.logs(), node.logs());
    for (label, marks) in [
        ("c=1".to_owned(), &seq_marks),
        (format!("c=1, {mounted} mounted"), &full_marks),
        (format!("c={}", args.concurrency), &conc_marks),
    ] {
        let l = legs(marks, &controller_log, &node_log);
        report.lat(
            format!("  {label} legs: call -> custody decided"),
            &l.to_decision,
        );
        report.lat(
            format!("  {label} legs: decided -> volume published"),
            &l.to_published,
        );
        report.lat(
            format!("  {label} legs: published -> kubelet has reply"),
            &l.to_reply,
        );
    }
    report.lat("unpublish, c=1", &seq_unpub.latencies);
    report.lat(
        format!("unpublish, c=1, {mounted} mounted"),
        &full_unpub.latencies,
    );
    report.lat(
        format!("unpublish, c={}", args.concurrency),
        &conc_unpub.latencies,
    );
    report.lat("custody Resolve direct, c=1 (one channel)", &res1.latencies);
    report.lat(
        format!("custody Resolve direct, c={}", args.concurrency),
        &res32.latencies,
    );
    report.lat("  TokenReview, fresh pod token", &review_fresh);
    report.lat("  TokenReview, repeated node token", &review_repeat);
    report.lat("  GET pod", &get_pod);
    report.lat("socket: connect (HTTP/2 handshake)", &fresh_conn);
    report.lat("socket: connect + NodeGetInfo", &fresh_call);
    report.lat("socket: NodeGetInfo on a reused connection", &reused);
    for (label, s) in [("0 mounted", &local_empty), ("all mounted", &local_full)] {
        report.lat(
            format!("node-local publish steps, {label}"),
            &s.publish_total,
        );
        report.lat("  read + parse /proc/self/mountinfo", &s.mountinfo);
        report.lat("    of which the read (kernel)", &s.mountinfo_read);
        report.lat("  mount_tmpfs", &s.mount);
        report.lat("  set_read_only", &s.read_only);
        report.lat("  writable_view", &s.view);
        report.lat("  atomic write", &s.write);
        report.lat("  close view", &s.close);
        report.lat("  registry store (fsync)", &s.registry_store);
        report.lat(format!("node-local unmount + rmdir, {label}"), &s.unmount);
        report.lat("  registry remove (fsync dir)", &s.registry_remove);
    }

    report.fig(
        "machine",
        format!(
            "{} CPUs, {:.0} GiB, kernel {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| m
                    .lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()))
                .map_or(0.0, |kib| kib / 1024.0 / 1024.0),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        ),
    );
    report.fig("kube-apiserver", version.git_version.clone());
    report.fig(
        "load average (before / during c=32)",
        format!("{load_before} / {load_during}"),
    );
    report.fig(
        "set-up: pods + tokens (s)",
        format!("{setup_secs:.1} for {total_pods} pods"),
    );
    report.fig(
        format!("publish c={}: mounts per second", args.concurrency),
        format!(
            "{:.1}  ({} in {:.2} s)",
            conc.rate(),
            n_conc,
            conc.wall.as_secs_f64()
        ),
    );
    report.fig(
        "publish c=1: mounts per second",
        format!("{:.1}", seq.rate()),
    );
    report.fig(
        format!(
            "unpublish c={}: all {} (s)",
            args.concurrency, args.concurrent
        ),
        format!(
            "{:.2}  ({:.0}/s)",
            conc_unpub.wall.as_secs_f64(),
            conc_unpub.rate()
        ),
    );
    report.fig(
        format!("custody Resolve c={}: per second", args.concurrency),
        format!("{:.1}", res32.rate()),
    );
    report.fig(
        "errors (publish c=1 / c=32 / unpublish / Resolve)",
        format!(
            "{} / {} / {} / {}",
            seq.errors.len() + full.errors.len(),
            conc.errors.len(),
            seq_unpub.errors.len() + full_unpub.errors.len() + conc_unpub.errors.len(),
            res1.errors.len() + res32.errors.len()
        ),
    );
    let slow = |v: &[Duration]| v.iter().filter(|d| ms(**d) >= 35.0).count();
    report.fig(
        "calls of 35 ms or more at c=1 (publish / publish all mounted / Resolve)",
        format!(
            "{} of {} / {} of {} / {} of {}",
            slow(&seq.latencies),
            seq.latencies.len(),
            slow(&full.latencies),
            full.latencies.len(),
            slow(&res1.latencies),
            res1.latencies.len()
        ),
    );
    let mut slow_resolves: Vec<String> = res1
        .latencies
        .iter()
        .map(|d| ms(*d))
        .filter(|&v| v >= 35.0)
        .map(|v| format!("{v:.0}"))
        .collect();
    slow_resolves.truncate(12);
    report.fig(
        "the c=1 Resolve calls of 35 ms or more (ms)",
        slow_resolves.join(", "),
    );
    report.fig(
        "volumes holding the granted value (c=1 / c=1 all mounted / c=32)",
        format!(
            "{seq_ok}/{} / {full_ok}/{} / {conc_ok}/{}",
            args.sequential, args.sequential_full, args.concurrent
        ),
    );
    report.fig(
        format!("node plugin VmRSS / VmHWM, {mounted} volumes (MiB)"),
        format!("{:.1} / {:.1}", node_mem.0, node_mem.1),
    );
    report.fig(
        format!("controller VmRSS / VmHWM, {mounted} volumes (MiB)"),
        format!("{:.1} / {:.1}", controller_mem.0, controller_mem.1),
    );
    let per = |secs: f64| format!("{:.2}", secs * 1000.0 / n_conc.max(1) as f64);
    report.fig(
        format!("c={}: CPU ms per publish, API server", args.concurrency),
        per(cpu.apiserver),
    );
    report.fig(
        format!("c={}: CPU ms per publish, controller", args.concurrency),
        per(cpu.controller),
    );
    report.fig(
        format!("c={}: CPU ms per publish, node plugin", args.concurrency),
        format!("{}  (system {})", per(cpu.node), per(cpu.node_system)),
    );
    report.fig(
        format!(
            "c={}: CPU ms per publish, kubelet player (this process)",
            args.concurrency
        ),
        per(cpu.bench),
    );
    report.fig(
        format!("c={}: CPU busy of 2 cores during the run", args.concurrency),
        format!(
            "{:.0} % (these four processes); {:.0} % (whole machine)",
            cpu.total() / conc.wall.as_secs_f64() / 2.0 * 100.0,
            machine_busy * 100.0
        ),
    );
    for (key, (count, mean_ms)) in metrics_after.since(&metrics_before) {
        report.fig(
            format!("c={}: API {key}", args.concurrency),
            format!(
                "{:.2} per publish, server mean {mean_ms:.2} ms",
                count / n_conc.max(1) as f64
            ),
        );
    }
    for (status, v) in &metrics_after.token_cache {
        let before = metrics_before
            .token_cache
            .get(status)
            .copied()
            .unwrap_or(0.0);
        report.fig(
            format!("c={}: API token cache {status}", args.concurrency),
            format!("{:.0}", v - before),
        );
    }
    report.fig(
        "after unpublish: mounts below the run dir / target dirs / registry entries",
        format!("{} / {leftover_dirs} / {registry_left}", leftovers.len()),
    );

    println!(
        "\nScopeHold NodePublishVolume end to end: 1 Secret, 1 AgentIdentity, 1 SecretGrant (1 key); \
         a fresh socket connection per call; Secret cache warm except the first row"
    );
    report.print();

    node.stop().await;
    controller.stop().await;
    drop(apiserver);
    assert!(
        leftovers.is_empty(),
        "mounts left below {}: {leftovers:?}",
        dir.display()
    );
}

//! Controller benchmark: 1,000 AgentIdentities and 5,000 SecretGrants against a
//! real kube-apiserver (embedded etcd, loopback), then a controller restart that
//! must reconcile everything without writing anything.
//!
//! ```text
//! cargo build --release --bin scopehold
//! cargo run --release --example bench_controller [-- --agents 1000 --grants-per-agent 5]
//! ```
//!
//! The controller binary is `--controller PATH` / `$SCOPEHOLD_BIN`, else
//! `target/release/scopehold` if it exists, else `target/debug/scopehold`. The
//! API server binary comes from `tests/apiserver/build.sh` (or
//! `$SCOPEHOLD_APISERVER_BIN`). Everything runs in a temporary directory that is
//! removed afterwards unless `--keep` is given (then its path is printed).
//!
//! Measured:
//! - creation time of the identities and grants (bounded concurrency),
//! - seconds from controller spawn until every grant is Active (a list every
//!   250 ms) and until every identity counts all its grants; also the first and
//!   last status write as the API server recorded them (managedFields time),
//!   which a slow list cannot delay,
//! - status writes and reconciles per object (from the controller's /metrics),
//! - after a restart: time until every object was reconciled, writes during that
//!   no-op resync (goal 0) and resourceVersion changes (goal 0),
//! - peak RSS (VmHWM) and peak open file descriptors of the controller, and the
//!   CPU seconds of the API server, the controller and this process, per run.
//!
//! The polling list of every grant costs the API server CPU too: compare with
//! `--poll-ms 5000` to see how much. Results are only comparable on the same
//! machine under the same background load.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, ResourceExt};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
};
use serde::Deserialize as _;
use support::{cpu_seconds, tail};

/// The controller's server-side-apply field manager.
const CONTROLLER_MANAGER: &str = "scopehold-controller";

#[derive(Parser, Debug)]
#[command(about = "ScopeHold controller benchmark against a real kube-apiserver")]
struct Args {
    /// The `scopehold` binary to benchmark.
    #[arg(long, env = "SCOPEHOLD_BIN")]
    controller: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    #[arg(long, default_value_t = 5)]
    grants_per_agent: usize,
    #[arg(long, default_value_t = 4)]
    secrets_per_namespace: usize,
    /// Create requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Interval of the "all Active?" list.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    /// Give up on a phase after this long.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Keep the state directory (API server and controller logs, etcd).
    #[arg(long)]
    keep: bool,
}

impl Args {
    fn grants(&self) -> usize {
        self.agents * self.grants_per_agent
    }

    fn controller_bin(&self) -> PathBuf {
        if let Some(bin) = &self.controller {
            return bin.clone();
        }
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let release = target.join("release/scopehold");
        if release.exists() {
            release
        } else {
            target.join("debug/scopehold")
        }
    }
}

// ---------------------------------------------------------------------------
// The API server: tests/apiserver's binary, as the integration tests run it.

struct ApiServer {
    pid: u32,
    kubeconfig: PathBuf,
    child: Child,
    /// The binary exits when its stdin closes, i.e. when this process ends.
    _stdin: ChildStdin,
}

impl ApiServer {
    fn start(dir: &Path) -> ApiServer {
        let bin = match std::env::var_os("SCOPEHOLD_APISERVER_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apiserver/build.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("running tests/apiserver/build.sh");
                assert!(out.status.success(), "build.sh failed: {}", out.status);
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        let state = dir.join("apiserver");
        let log = File::create(dir.join("apiserver.log")).expect("apiserver.log");
        let mut child = Command::new(&bin)
            .arg("--dir")
            .arg(&state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        // Keep draining stdout after `ready` so the child never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let url = loop {
            match rx.recv_timeout(Duration::from_secs(180)) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("ready ") {
                        break url.trim().to_owned();
                    }
                }
                Err(e) => panic!(
                    "kube-apiserver not ready ({e}); see {}",
                    dir.join("apiserver.log").display()
                ),
            }
        };
        eprintln!("kube-apiserver ready at {url}");
        ApiServer {
            pid: child.id(),
            kubeconfig: state.join("kubeconfig"),
            child,
            _stdin: stdin,
        }
    }

    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("client")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The controller under test, as a child process.

struct Controller {
    child: Option<Child>,
    log: PathBuf,
    spawned: Instant,
    spawned_at: Timestamp,
}

impl Controller {
    fn start(bin: &Path, kubeconfig: &Path, log: PathBuf) -> Controller {
        let out = File::create(&log).expect("controller log");
        let err = out.try_clone().expect("log handle");
        let spawned_at = Timestamp::now();
        let spawned = Instant::now();
        let child = Command::new(bin)
            .args([
                "controller",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        Controller {
            child: Some(child),
            log,
            spawned,
            spawned_at,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("controller exited ({status}):\n{}", tail(&self.logs(), 30));
        }
    }

    /// The JSON log line whose message is `message`, if printed yet.
    fn log_line(&self, message: &str) -> Option<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == message)
    }

    /// Seconds from spawn to the log line `message`, from its timestamp.
    fn seconds_to_log(&self, message: &str) -> Option<f64> {
        let line = self.log_line(message)?;
        let at: Timestamp = line["timestamp"].as_str()?.parse().ok()?;
        Some(at.duration_since(self.spawned_at).as_secs_f64())
    }

    async fn metrics_addr(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_line("controller starting") {
                return line["metrics_addr"]
                    .as_str()
                    .expect("metrics_addr")
                    .to_owned();
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "no metrics_addr log line");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Samples the number of open file descriptors (nearly all of them HTTP/1.1
    /// connections to the API server) every 200 ms while the process lives;
    /// returns the peak. Counting directory entries only (no readlink) keeps
    /// the sampler cheap even at thousands of descriptors.
    fn sample_fds(&self) -> Arc<AtomicUsize> {
        let peak = Arc::new(AtomicUsize::new(0));
        let fd_dir = PathBuf::from(format!("/proc/{}/fd", self.pid()));
        let out = peak.clone();
        tokio::spawn(async move {
            while let Ok(entries) = std::fs::read_dir(&fd_dir) {
                out.fetch_max(entries.count(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        peak
    }

    /// Peak resident set size in MiB (VmHWM).
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib / 1024.0
    }

    /// SIGTERM (kill(1): unsafe code is forbidden here too), SIGKILL after 10 s.
    fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("controller ignored SIGTERM for 10 s; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU seconds spent by the API server, the controller and this process
/// (the benchmark's own polling) during one phase.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    apiserver: f64,
    controller: f64,
    bench: f64,
    wall: f64,
}

impl CpuUse {
    fn show(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}  (wall {:.1})",
            self.apiserver, self.controller, self.bench, self.wall
        )
    }
}

/// GET over a plain TCP stream: /metrics is one small HTTP/1.1 endpoint.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The value of one series (`name{labels}`) in a Prometheus text body; 0 when absent.
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The controller's counters that this benchmark reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    grant_writes: f64,
    identity_writes: f64,
    grant_unchanged: f64,
    identity_unchanged: f64,
    grant_errors: f64,
    identity_errors: f64,
}

impl Counters {
    fn parse(body: &str) -> Counters {
        let writes = |k: &str| {
            metric(
                body,
                &format!("scopehold_status_writes_total{{kind=\"{k}\"}}"),
            )
        };
        let reconciles = |k: &str, o: &str| {
            metric(
                body,
                &format!("scopehold_reconciles_total{{kind=\"{k}\",outcome=\"{o}\"}}"),
            )
        };
        Counters {
            grant_writes: writes("SecretGrant"),
            identity_writes: writes("AgentIdentity"),
            grant_unchanged: reconciles("SecretGrant", "unchanged"),
            identity_unchanged: reconciles("AgentIdentity", "unchanged"),
            grant_errors: reconciles("SecretGrant", "error"),
            identity_errors: reconciles("AgentIdentity", "error"),
        }
    }

    async fn fetch(addr: &str) -> Counters {
        Counters::parse(&http_get(addr, "/metrics").await)
    }
}

/// Polls the counters until they stay the same for `quiet`.
async fn settle(addr: &str, quiet: Duration, timeout: Duration) -> Counters {
    let deadline = Instant::now() + timeout;
    let mut last = Counters::fetch(addr).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = Counters::fetch(addr).await;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(Instant::now() < deadline, "controller never went quiet");
    }
}

// ---------------------------------------------------------------------------
// The objects.

fn ns_name(i: usize) -> String {
    format!("bench-{i:02}")
}

fn agent_ns(args: &Args, agent: usize) -> String {
    ns_name(agent % args.namespaces)
}

async fn apply_crds(client: &Client) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("crds/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read CRD");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("YAML");
            // crds/ also holds the admission policy: only the CRDs matter here.
            if value.is_null() || value["kind"].as_str() != Some("CustomResourceDefinition") {
                continue;
            }
            let crd: CustomResourceDefinition = serde_yaml::from_value(value).expect("CRD");
            let name = crd.name_any();
            api.patch(
                &name,
                &PatchParams::apply("scopehold-bench").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("apply CRD");
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .expect("CRD Established in 30 s")
            .expect("watching CRD");
        }
    }
}

/// Runs `make(i)` for `0..n` with at most `concurrency` in flight; returns seconds.
async fn create_all<F, Fut>(n: usize, concurrency: usize, make: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(make)
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await
        .expect("create");
    started.elapsed().as_secs_f64()
}

async fn setup(client: &Client, args: &Args) -> (f64, f64) {
    let pp = PostParams::default();
    for n in 0..args.namespaces {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(ns_name(n)),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&pp, &ns)
            .await
            .expect("namespace");
        for s in 0..args.secrets_per_namespace {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(format!("creds-{s}")),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([
                    ("api".to_owned(), format!("bench-value-{n}-{s}")),
                    ("url".to_owned(), "https://example.invalid".to_owned()),
                ])),
                ..Default::default()
            };
            Api::<Secret>::namespaced(client.clone(), &ns_name(n))
                .create(&pp, &secret)
                .await
                .expect("secret");
        }
    }

    let identities = create_all(args.agents, args.concurrency, |i| {
        let api: Api<AgentIdentity> = Api::namespaced(client.clone(), &agent_ns(args, i));
        async move {
            let identity = AgentIdentity::new(
                &format!("agent-{i}"),
                AgentIdentitySpec {
                    service_account_name: format!("agent-{i}"),
                    owner: Some("bench".into()),
                    ..Default::default()
                },
            );
            api.create(&PostParams::default(), &identity)
                .await
                .map(drop)
        }
    })
    .await;

    let per_agent = args.grants_per_agent;
    let secrets = args.secrets_per_namespace;
    let grants = create_all(args.grants(), args.concurrency, |g| {
        let (agent, j) = (g / per_agent, g % per_agent);
        let api: Api<SecretGrant> = Api::namespaced(client.clone(), &agent_ns(args, agent));
        async move {
            let grant = SecretGrant::new(
                &format!("agent-{agent}-{j}"),
                SecretGrantSpec {
                    agent: format!("agent-{agent}"),
                    secret_name: format!("creds-{}", (agent + j) % secrets),
                    keys: vec![GrantedKey {
                        key: "api".into(),
                        ..Default::default()
                    }],
                    ttl: Some("8h".into()),
                    reason: Some("benchmark".into()),
                    ..Default::default()
                },
            );
            api.create(&PostParams::default(), &grant).await.map(drop)
        }
    })
    .await;
    (identities, grants)
}

/// (name, resourceVersion) of every grant and identity, sorted.
async fn versions(client: &Client) -> Vec<(String, String)> {
    let lp = ListParams::default();
    let mut v: Vec<(String, String)> = Vec::new();
    for g in Api::<SecretGrant>::all(client.clone())
        .list(&lp)
        .await
        .expect("list")
        .items
    {
        v.push((
            format!(
                "grant/{}/{}",
                g.namespace().unwrap_or_default(),
                g.name_any()
            ),
            g.resource_version().unwrap_or_default(),
        ));
    }
    for i in Api::<AgentIdentity>::all(client.clone())
        .list(&lp)
        .await
        .expect("list")
        .items
    {
        v.push((
            format!(
                "identity/{}/{}",
                i.namespace().unwrap_or_default(),
                i.name_any()
            ),
            i.resource_version().unwrap_or_default(),
        ));
    }
    v.sort();
    v
}

/// Figures of the first (cold) controller run.
struct ColdRun {
    caches_synced: Option<f64>,
    /// Server-side: first and last status write of the controller's field
    /// manager over all grants (managedFields time, 1 s resolution), seconds
    /// after spawn. Unlike the polled figure, not delayed by a slow list.
    first_write: Option<f64>,
    last_write: Option<f64>,
    peak_fds: usize,
    all_active: f64,
    identities_settled: f64,
    counters: Counters,
    peak_rss_mib: f64,
    list_ms_mean: f64,
    list_ms_max: f64,
    list_errors: usize,
}

async fn cold_run(client: &Client, args: &Args, controller: &mut Controller) -> ColdRun {
    let grants: Api<SecretGrant> = Api::all(client.clone());
    let identities: Api<AgentIdentity> = Api::all(client.clone());
    let timeout = Duration::from_secs(args.timeout_secs);
    let addr = controller.metrics_addr(timeout).await;
    let fds = controller.sample_fds();
    let mut list_ms: Vec<f64> = Vec::new();
    let mut list_errors = 0_usize;
    let mut last_report = Instant::now();
    let (all_active, first_write, last_write) = loop {
        let listed = Instant::now();
        let list = match grants.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                // An overloaded API server may drop a pooled connection; go on.
                eprintln!("  list failed ({e}); retrying");
                list_errors += 1;
                tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
                continue;
            }
        };
        list_ms.push(listed.elapsed().as_secs_f64() * 1000.0);
        let active = list
            .items
            .iter()
            .filter(|g| g.phase() == Some(GrantPhase::Active))
            .count();
        let elapsed = controller.spawned.elapsed().as_secs_f64();
        if active == args.grants() {
            let writes: Vec<f64> = list
                .items
                .iter()
                .filter_map(|g| status_write_time(g.managed_fields()))
                .map(|t| t.duration_since(controller.spawned_at).as_secs_f64())
                .collect();
            let first = writes.iter().copied().reduce(f64::min);
            let last = writes.iter().copied().reduce(f64::max);
            break (elapsed, first, last);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            let c = Counters::fetch(&addr).await;
            eprintln!(
                "  {elapsed:6.1}s: {active}/{} Active; grant writes {} unchanged {} errors {}; identity writes {} unchanged {} errors {}",
                args.grants(),
                c.grant_writes,
                c.grant_unchanged,
                c.grant_errors,
                c.identity_writes,
                c.identity_unchanged,
                c.identity_errors
            );
            last_report = Instant::now();
        }
        controller.assert_running();
        assert!(
            controller.spawned.elapsed() < timeout,
            "only {active}/{} grants Active after {timeout:?}",
            args.grants()
        );
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    };
    let identities_settled = loop {
        let Ok(list) = identities.list(&ListParams::default()).await else {
            list_errors += 1;
            continue;
        };
        let settled = list
            .items
            .iter()
            .filter(|i| {
                i.status
                    .as_ref()
                    .is_some_and(|s| s.active_grants as usize == args.grants_per_agent)
            })
            .count();
        if settled == args.agents {
            break controller.spawned.elapsed().as_secs_f64();
        }
        controller.assert_running();
        assert!(
            controller.spawned.elapsed() < timeout,
            "identities never settled"
        );
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    };
    let counters = settle(&addr, Duration::from_secs(3), timeout).await;
    ColdRun {
        caches_synced: controller.seconds_to_log("caches synced; reconciling"),
        first_write,
        last_write,
        peak_fds: fds.load(Ordering::Relaxed),
        all_active,
        identities_settled,
        counters,
        peak_rss_mib: controller.peak_rss_mib(),
        list_ms_mean: list_ms.iter().sum::<f64>() / list_ms.len() as f64,
        list_ms_max: list_ms.iter().copied().fold(0.0, f64::max),
        list_errors,
    }
}

/// When the controller last wrote this object's status (its field manager's
/// managedFields entry for the status subresource).
fn status_write_time(fields: &[ManagedFieldsEntry]) -> Option<Timestamp> {
    fields
        .iter()
        .filter(|f| {
            f.manager.as_deref() == Some(CONTROLLER_MANAGER)
                && f.subresource.as_deref() == Some("status")
        })
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .max()
}

/// Figures of the restarted controller's no-op resync.
struct WarmRun {
    caches_synced: Option<f64>,
    all_reconciled: f64,
    counters: Counters,
    rv_changes: usize,
    peak_fds: usize,
    peak_rss_mib: f64,
}

async fn warm_run(client: &Client, args: &Args, controller: &mut Controller) -> WarmRun {
    let before = versions(client).await;
    let fds = controller.sample_fds();
    let timeout = Duration::from_secs(args.timeout_secs);
    let addr = controller.metrics_addr(timeout).await;
    let all_reconciled = loop {
        let c = Counters::fetch(&addr).await;
        if c.grant_unchanged + c.grant_writes >= args.grants() as f64
            && c.identity_unchanged + c.identity_writes >= args.agents as f64
        {
            break controller.spawned.elapsed().as_secs_f64();
        }
        controller.assert_running();
        assert!(
            controller.spawned.elapsed() < timeout,
            "restarted controller did not reconcile everything: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counters = settle(&addr, Duration::from_secs(3), timeout).await;
    let after = versions(client).await;
    let rv_changes = before.iter().zip(&after).filter(|(b, a)| b != a).count()
        + before.len().abs_diff(after.len());
    WarmRun {
        caches_synced: controller.seconds_to_log("caches synced; reconciling"),
        all_reconciled,
        counters,
        rv_changes,
        peak_fds: fds.load(Ordering::Relaxed),
        peak_rss_mib: controller.peak_rss_mib(),
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = args.controller_bin();
    assert!(
        bin.exists(),
        "{} does not exist: cargo build --release --bin scopehold",
        bin.display()
    );
    let temp = tempfile::Builder::new()
        .prefix("scopehold-bench-")
        .tempdir()
        .expect("temp dir");
    // With --keep the directory outlives the run, also a failed one.
    let (dir, _temp) = if args.keep {
        let kept = temp.keep();
        eprintln!("state in {}", kept.display());
        (kept, None)
    } else {
        (temp.path().to_owned(), Some(temp))
    };
    let started = Instant::now();
    let server = ApiServer::start(&dir);
    let apiserver_secs = started.elapsed().as_secs_f64();
    let client = server.client().await;
    apply_crds(&client).await;

    eprintln!(
        "creating {} AgentIdentities and {} SecretGrants in {} namespaces ({} in flight)…",
        args.agents,
        args.grants(),
        args.namespaces,
        args.concurrency
    );
    let (identity_secs, grant_secs) = setup(&client, &args).await;

    eprintln!("cold start of {}…", bin.display());
    let mut first = Controller::start(&bin, &server.kubeconfig, dir.join("controller-1.log"));
    let cpu0 = (cpu_seconds(server.pid), cpu_seconds(std::process::id()));
    let cold = cold_run(&client, &args, &mut first).await;
    let cold_cpu = CpuUse {
        apiserver: cpu_seconds(server.pid) - cpu0.0,
        controller: cpu_seconds(first.pid()),
        bench: cpu_seconds(std::process::id()) - cpu0.1,
        wall: first.spawned.elapsed().as_secs_f64(),
    };
    first.stop();

    eprintln!("restart (no-op resync)…");
    let mut second = Controller::start(&bin, &server.kubeconfig, dir.join("controller-2.log"));
    let cpu0 = (cpu_seconds(server.pid), cpu_seconds(std::process::id()));
    let warm = warm_run(&client, &args, &mut second).await;
    let warm_cpu = CpuUse {
        apiserver: cpu_seconds(server.pid) - cpu0.0,
        controller: cpu_seconds(second.pid()),
        bench: cpu_seconds(std::process::id()) - cpu0.1,
        wall: second.spawned.elapsed().as_secs_f64(),
    };
    second.stop();

    let (n, a) = (args.grants() as f64, args.agents as f64);
    let rows: Vec<(String, String)> = vec![
        ("controller binary".into(), bin.display().to_string()),
        (
            "kube-apiserver start (s)".into(),
            format!("{apiserver_secs:.2}"),
        ),
        (
            format!("create {} AgentIdentities (s)", args.agents),
            format!("{identity_secs:.2}  ({:.0}/s)", a / identity_secs),
        ),
        (
            format!("create {} SecretGrants (s)", args.grants()),
            format!("{grant_secs:.2}  ({:.0}/s)", n / grant_secs),
        ),
        ("cold: caches synced (s)".into(), opt(cold.caches_synced)),
        (
            "cold: first / last grant status write (s, server)".into(),
            format!("{} / {}", opt(cold.first_write), opt(cold.last_write)),
        ),
        (
            "cold: every grant Active (s, seen by the poll)".into(),
            format!("{:.2}", cold.all_active),
        ),
        (
            "cold: every identity settled (s)".into(),
            format!("{:.2}", cold.identities_settled),
        ),
        (
            "cold: status writes per grant".into(),
            format!(
                "{:.3}  ({} writes)",
                cold.counters.grant_writes / n,
                cold.counters.grant_writes
            ),
        ),
        (
            "cold: status writes per identity".into(),
            format!(
                "{:.3}  ({} writes)",
                cold.counters.identity_writes / a,
                cold.counters.identity_writes
            ),
        ),
        (
            "cold: reconciles per grant / identity".into(),
            format!(
                "{:.3} / {:.3}",
                (cold.counters.grant_writes
                    + cold.counters.grant_unchanged
                    + cold.counters.grant_errors)
                    / n,
                (cold.counters.identity_writes
                    + cold.counters.identity_unchanged
                    + cold.counters.identity_errors)
                    / a
            ),
        ),
        (
            "cold: reconcile errors (grant / identity)".into(),
            format!(
                "{} / {}",
                cold.counters.grant_errors, cold.counters.identity_errors
            ),
        ),
        (
            "cold: CPU s apiserver / controller / bench".into(),
            cold_cpu.show(),
        ),
        ("cold: peak open fds".into(), cold.peak_fds.to_string()),
        (
            "cold: peak RSS (MiB)".into(),
            format!("{:.1}", cold.peak_rss_mib),
        ),
        (
            "poll list of all grants (ms, mean / max)".into(),
            format!(
                "{:.0} / {:.0}  ({} failed)",
                cold.list_ms_mean, cold.list_ms_max, cold.list_errors
            ),
        ),
        ("restart: caches synced (s)".into(), opt(warm.caches_synced)),
        (
            "restart: everything reconciled (s)".into(),
            format!("{:.2}", warm.all_reconciled),
        ),
        (
            "restart: status writes (goal 0)".into(),
            format!(
                "{} grant, {} identity",
                warm.counters.grant_writes, warm.counters.identity_writes
            ),
        ),
        (
            "restart: resourceVersion changes (goal 0)".into(),
            format!("{} of {}", warm.rv_changes, args.grants() + args.agents),
        ),
        (
            "restart: CPU s apiserver / controller / bench".into(),
            warm_cpu.show(),
        ),
        ("restart: peak open fds".into(), warm.peak_fds.to_string()),
        (
            "restart: peak RSS (MiB)".into(),
            format!("{:.1}", warm.peak_rss_mib),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!();
    println!(
        "ScopeHold controller: {} AgentIdentities, {} SecretGrants, {} namespaces, {} Secrets",
        args.agents,
        args.grants(),
        args.namespaces,
        args.namespaces * args.secrets_per_namespace
    );
    println!("| {:width$} | value |", "measure");
    println!("|{}|-------|", "-".repeat(width + 2));
    for (k, v) in &rows {
        println!("| {k:width$} | {v} |");
    }

    drop(server);
}

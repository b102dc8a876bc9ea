//! Revocation and rotation latency end to end (issue #4): from the API write
//! (a SecretGrant's `spec.revoked`, a Secret's value) to the file being gone
//! from, or replaced in, the live tmpfs mount of every published volume.
//!
//! ```text
//! cargo build --release --bin scopehold --example bench_revocation
//! sudo target/release/examples/bench_revocation [--events 100 --volumes 1,200]
//! ```
//!
//! Runs as root (the node plugin mounts real tmpfs volumes). It starts its own
//! kube-apiserver (`tests/apiserver/build.sh`, loopback, embedded etcd), the
//! controller (custody plaintext on 127.0.0.1:0) and the node plugin, and plays
//! kubelet with `KubeletPlayer` over the plugin's unix socket. The `scopehold`
//! binary is `--scopehold PATH` / `$SCOPEHOLD_BIN`, else the one beside this
//! example (`target/<profile>/scopehold`).
//!
//! For each volume count N: one namespace, one Secret, one AgentIdentity, one
//! SecretGrant, N pods of that agent, each with a bound token and a published
//! volume holding the granted file. Then, `--events` times each:
//! - rotate: patch the Secret's value; wait until every volume's file holds
//!   the new value;
//! - revoke: set `spec.revoked`; wait until the file is gone from every
//!   volume; then reinstate (`revoked: false`) and wait until every file is
//!   back (also timed: it needs a Resolve per volume with the pods' tokens).
//!
//! The clock starts just before the API call. Each volume's latency is the
//! first poll that sees the change (every 2 ms with one volume; every 5 ms
//! with more, so that polling 200 mounts does not take much of the CPU the
//! system under test needs; `--poll-ms` overrides); "last volume" is the slowest
//! volume of an event.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
    TOKEN_AUDIENCE,
};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo};
use scopehold::demo::local::{self, NodePluginLayout, Process};
use serde_json::json;
use support::{client_for, cpu_seconds, install_crds, meta, mounts_below};

const SYSTEM_NS: &str = "scopehold-system";
const NODE_SA: &str = "scopehold-node";
const AGENT: &str = "agent";
const NODE: &str = "bench-node";
const VOLUME: &str = "credentials";
const FILE: &str = "api-key";
const WAIT: Duration = Duration::from_secs(60);
/// How long one event may take before the run is declared broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Rotation, revocation and reinstatement latency from the API write to the mount.
#[derive(Debug, clap::Parser)]
struct Args {
    /// The `scopehold` binary (default: beside this example's directory,
    /// `target/<profile>/scopehold`).
    #[arg(long, env = "SCOPEHOLD_BIN")]
    scopehold: Option<PathBuf>,
    /// Events of each kind (rotate, revoke, reinstate) per scenario.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Published volumes per scenario, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 200])]
    volumes: Vec<usize>,
    /// Poll interval in ms (default: 2 with one volume, 5 with more).
    #[arg(long = "poll-ms", value_parser = parse_millis)]
    poll: Option<Duration>,
    /// Keep the state directory (logs, etcd, registry).
    #[arg(long)]
    keep: bool,
}

fn parse_millis(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("{text:?}: {e}"))
}

impl Args {
    fn scopehold_bin(&self) -> PathBuf {
        self.scopehold.clone().unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current exe");
            // target/<profile>/examples/bench_revocation → target/<profile>/scopehold
            exe.parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("scopehold"))
                .expect("target directory")
        })
    }
}

/// With SCOPEHOLD_BENCH_TRACE set, prints the wall-clock time of each event
/// start (to line up with the processes' JSON log timestamps).
fn trace(what: &str) {
    if std::env::var_os("SCOPEHOLD_BENCH_TRACE").is_some() {
        eprintln!("{} {what}", jiff::Timestamp::now());
    }
}

/// Nearest-rank percentile in milliseconds.
fn percentile(samples: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn summary(samples: &[Duration]) -> String {
    format!(
        "n={:>5}  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
        samples.len(),
        percentile(samples, 0.50),
        percentile(samples, 0.99),
        percentile(samples, 1.0)
    )
}

async fn namespace(client: &Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(name),
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
    service_account(client, name, "default").await;
}

async fn service_account(client: &Client, ns: &str, name: &str) {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta(name),
                ..Default::default()
            },
        )
        .await
        .expect("service account");
}

async fn pod(client: &Client, ns: &str, name: &str, sa: &str) -> (Pod, String) {
    let manifest: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": sa,
            "securityContext": {"fsGroup": 1000},
            "containers": [{"name": "agent", "image": "busybox:1.36"}],
            "volumes": [{"name": VOLUME, "csi": {"driver": "csi.scopehold.dev", "readOnly": true}}]
        }
    }))
    .expect("pod manifest");
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &manifest)
        .await
        .expect("pod");
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
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token")
        .token;
    (pod, token)
}

/// Value of rotation `n` (distinct lengths: a stale read is obvious).
fn value(n: usize) -> String {
    format!("sk-bench-rotation-{n:05}-{}", "x".repeat(n % 7))
}

/// What a volume's file must become.
#[derive(Clone)]
enum Expect {
    /// Replaced by this content. Cheap to poll: only `..data` is read until
    /// it points elsewhere (the atomic writer's swap), then the file once.
    Replaced(Vec<u8>),
    /// Gone (withdrawn).
    Gone,
    /// Present again with this content.
    Present(Vec<u8>),
}

fn data_link(file: &Path) -> Option<PathBuf> {
    std::fs::read_link(file.parent()?.join("..data")).ok()
}

/// Every file's current `..data` target (taken before an API write).
fn data_links(files: &[PathBuf]) -> Vec<Option<PathBuf>> {
    files.iter().map(|f| data_link(f)).collect()
}

/// Polls the files (every `poll`) until each is as expected; returns each
/// file's latency (the first poll that saw it) since `started`. Polling is
/// kept cheap (a readlink or an lstat per file) so that it does not take
/// the CPU the system under test needs.
fn wait_all(
    files: &[PathBuf],
    before: &[Option<PathBuf>],
    started: Instant,
    poll: Duration,
    expect: &Expect,
) -> Vec<Duration> {
    let mut seen: Vec<Option<Duration>> = vec![None; files.len()];
    let mut left = files.len();
    while left > 0 {
        for (index, (file, seen)) in files.iter().zip(seen.iter_mut()).enumerate() {
            let before = before.get(index).cloned().flatten();
            if seen.is_some() {
                continue;
            }
            let done = match expect {
                Expect::Gone => file.symlink_metadata().is_err(),
                Expect::Present(wanted) => {
                    file.symlink_metadata().is_ok()
                        && std::fs::read(file).is_ok_and(|c| c == *wanted)
                }
                Expect::Replaced(wanted) => {
                    data_link(file) != before && std::fs::read(file).is_ok_and(|c| c == *wanted)
                }
            };
            if done {
                *seen = Some(started.elapsed());
                left -= 1;
            }
        }
        if left > 0 {
            if started.elapsed() > EVENT_TIMEOUT {
                panic!(
                    "{left} of {} volumes did not change within {EVENT_TIMEOUT:?}",
                    files.len()
                );
            }
            std::thread::sleep(poll);
        }
    }
    seen.into_iter().flatten().collect()
}

#[derive(Default)]
struct Figures {
    per_volume: Vec<Duration>,
    all_volumes: Vec<Duration>,
}

impl Figures {
    fn add(&mut self, latencies: Vec<Duration>) {
        if let Some(max) = latencies.iter().max() {
            self.all_volumes.push(*max);
        }
        self.per_volume.extend(latencies);
    }
}

struct Scenario {
    volumes: usize,
    rotate: Figures,
    revoke: Figures,
    reinstate: Figures,
    /// CPU seconds per phase: (rotate, revoke + reinstate).
    cpu: [Cpu; 2],
}

/// CPU seconds (user + system) of the processes under test, of this
/// process (kubelet's part and the polling), and of the whole machine: the
/// difference is other work on the machine, i.e. noise.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    apiserver: f64,
    controller: f64,
    node: f64,
    bench: f64,
    machine: f64,
}

impl Cpu {
    fn sample() -> Cpu {
        let mut cpu = Cpu {
            bench: cpu_seconds(std::process::id()),
            machine: machine_busy_seconds(),
            ..Cpu::default()
        };
        for (pid, args) in children() {
            let seconds = cpu_seconds(pid);
            if args.contains("--dir") {
                cpu.apiserver += seconds;
            } else if is_controller(&args) {
                cpu.controller += seconds;
            } else if args.contains(" node ") || args.ends_with(" node") {
                cpu.node += seconds;
            }
        }
        cpu
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            apiserver: self.apiserver - before.apiserver,
            controller: self.controller - before.controller,
            node: self.node - before.node,
            bench: self.bench - before.bench,
            machine: self.machine - before.machine,
        }
    }

    /// CPU seconds on the machine not spent by the benchmark's processes.
    fn others(self) -> f64 {
        (self.machine - self.apiserver - self.controller - self.node - self.bench).max(0.0)
    }
}

/// Busy CPU seconds of the whole machine since boot (/proc/stat: all but
/// idle and iowait).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

/// `scopehold controller ...`
fn is_controller(args: &str) -> bool {
    args.split(' ').nth(1) == Some("controller")
}

/// This process's children: pid and command line (space-separated).
fn children() -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command name (which may hold spaces).
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid != Some(me) {
            continue;
        }
        let args = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push((pid, args.trim().to_owned()));
    }
    out
}

async fn run_scenario(
    client: &Client,
    kubelet: &KubeletPlayer,
    volumes: usize,
    events: usize,
    poll: Duration,
) -> Scenario {
    let ns = format!("bench-rev-{volumes}");
    namespace(client, &ns).await;
    service_account(client, &ns, AGENT).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: meta("api"),
                string_data: Some([("value".to_owned(), value(0))].into()),
                ..Default::default()
            },
        )
        .await
        .expect("secret");
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &AgentIdentity::new(
                AGENT,
                AgentIdentitySpec {
                    service_account_name: AGENT.into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("identity");
    let grants: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    grants
        .create(
            &PostParams::default(),
            &SecretGrant::new(
                "grant",
                SecretGrantSpec {
                    agent: AGENT.into(),
                    secret_name: "api".into(),
                    keys: vec![GrantedKey {
                        key: "value".into(),
                        path: Some(FILE.into()),
                        mode: None,
                        proxy: None,
                    }],
                    reason: Some("benchmark".into()),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("grant");
    let deadline = Instant::now() + WAIT;
    while grants.get("grant").await.expect("grant").phase() != Some(GrantPhase::Active) {
        assert!(Instant::now() < deadline, "grant not Active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // N pods, each with its own volume (set-up, not timed).
    let set_up = Instant::now();
    let pods: Vec<(PodInfo, String)> = futures::stream::iter(0..volumes)
        .map(|i| {
            let ns = ns.clone();
            async move {
                let name = format!("agent-{i:04}");
                let (pod, token) = pod(client, &ns, &name, AGENT).await;
                let info = PodInfo {
                    namespace: ns,
                    name,
                    uid: pod.uid().expect("uid"),
                    service_account: AGENT.into(),
                    fs_group: Some(1000),
                };
                let request =
                    kubelet.publish_request(&info, VOLUME, &token, &HashMap::new(), true, true);
                kubelet
                    .publish(request)
                    .await
                    .expect("socket")
                    .expect("NodePublishVolume");
                (info, token)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let files: Vec<PathBuf> = pods
        .iter()
        .map(|(info, _)| kubelet.target_path(&info.uid, VOLUME).join(FILE))
        .collect();
    let initial = Expect::Present(value(0).into_bytes());
    wait_all(&files, &[], Instant::now(), poll, &initial);
    println!(
        "  {volumes} volume(s) published in {:.1} s",
        set_up.elapsed().as_secs_f64()
    );

    let mut scenario = Scenario {
        volumes,
        rotate: Figures::default(),
        revoke: Figures::default(),
        reinstate: Figures::default(),
        cpu: [Cpu::default(); 2],
    };
    let cpu_start = Cpu::sample();
    let pp = PatchParams::default();
    for n in 1..=events {
        let wanted = value(n);
        let before = data_links(&files);
        let started = Instant::now();
        trace("start");
        secrets
            .patch(
                "api",
                &pp,
                &Patch::Merge(json!({"stringData": {"value": wanted}})),
            )
            .await
            .expect("rotate");
        let files = files.clone();
        let expect = Expect::Replaced(wanted.into_bytes());
        let latencies =
            tokio::task::spawn_blocking(move || wait_all(&files, &before, started, poll, &expect))
                .await
                .expect("poll");
        scenario.rotate.add(latencies);
    }
    println!("  rotations done");
    let cpu_rotated = Cpu::sample();
    scenario.cpu[0] = cpu_rotated.since(cpu_start);
    let current = value(events);
    for _ in 0..events {
        let started = Instant::now();
        trace("start");
        grants
            .patch(
                "grant",
                &pp,
                &Patch::Merge(json!({"spec": {"revoked": true}})),
            )
            .await
            .expect("revoke");
        let polled = files.clone();
        let latencies = tokio::task::spawn_blocking(move || {
            wait_all(&polled, &[], started, poll, &Expect::Gone)
        })
        .await
        .expect("poll");
        scenario.revoke.add(latencies);

        let started = Instant::now();
        trace("start");
        grants
            .patch(
                "grant",
                &pp,
                &Patch::Merge(json!({"spec": {"revoked": false}})),
            )
            .await
            .expect("reinstate");
        let polled = files.clone();
        let expect = Expect::Present(current.clone().into_bytes());
        let latencies =
            tokio::task::spawn_blocking(move || wait_all(&polled, &[], started, poll, &expect))
                .await
                .expect("poll");
        scenario.reinstate.add(latencies);
    }
    println!("  revocations done");
    scenario.cpu[1] = Cpu::sample().since(cpu_rotated);

    for (info, _) in &pods {
        kubelet
            .unpublish(&info.uid, VOLUME)
            .await
            .expect("socket")
            .expect("NodeUnpublishVolume");
    }
    scenario
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let scopehold = args.scopehold_bin();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "run as root: the node plugin mounts tmpfs volumes"
    );
    assert!(
        scopehold.exists(),
        "{} does not exist: cargo build --release --bin scopehold",
        scopehold.display()
    );
    let dir =
        std::env::temp_dir().join(format!("scopehold-bench-revocation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("state dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let apiserver_bin = match std::env::var_os("SCOPEHOLD_APISERVER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => local::apiserver_binary(repo)
            .await
            .expect("API server binary"),
    };
    let apiserver = local::start_apiserver(&apiserver_bin, &dir)
        .await
        .expect("API server");
    let client = client_for(&apiserver.kubeconfig).await;
    install_crds(&client, WAIT).await;
    namespace(&client, SYSTEM_NS).await;
    service_account(&client, SYSTEM_NS, NODE_SA).await;
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

    let mut controller = Process::spawn(
        &scopehold,
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
    )
    .expect("controller");
    let custody = controller
        .wait_for_field("custody_addr", WAIT)
        .await
        .expect("custody address");
    controller
        .wait_for("caches synced", WAIT)
        .await
        .expect("caches");

    let (_plugin_pod, plugin_token) = pod(&client, SYSTEM_NS, "scopehold-node", NODE_SA).await;
    let layout = NodePluginLayout::under(&dir);
    std::fs::write(&layout.token_file, plugin_token).expect("token file");
    let mut node = Process::spawn(
        &scopehold,
        &layout.args(NODE, &custody),
        &apiserver.kubeconfig,
        dir.join("node.log"),
    )
    .expect("node plugin");
    node.wait_for("custody invalidation stream connected", WAIT)
        .await
        .expect("stream");
    let kubelet = KubeletPlayer::new(&layout.socket, &layout.kubelet_dir);

    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Vec::new();
    for &volumes in &args.volumes {
        println!(
            "{volumes} published volume(s), {} events each:",
            args.events
        );
        let poll = args
            .poll
            .unwrap_or(Duration::from_millis(if volumes > 1 { 5 } else { 2 }));
        results.push(run_scenario(&client, &kubelet, volumes, args.events, poll).await);
    }

    println!();
    println!(
        "Revocation and rotation latency (API write -> mount), {} events each; binary {}",
        args.events,
        scopehold.display()
    );
    println!(
        "  load average before: {}; after: {}",
        load_before.trim(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for s in &results {
        for (what, cpu, per) in [
            ("rotation", s.cpu[0], args.events),
            ("revocation + reinstatement", s.cpu[1], args.events),
        ] {
            let per = per.max(1) as f64;
            println!(
                "  {:>3} vol  CPU ms per {what}: API server {:.1}, controller {:.1}, node plugin {:.1}, benchmark {:.1}; other work on the machine {:.1}",
                s.volumes,
                cpu.apiserver * 1000.0 / per,
                cpu.controller * 1000.0 / per,
                cpu.node * 1000.0 / per,
                cpu.bench * 1000.0 / per,
                cpu.others() * 1000.0 / per
            );
        }
        for (what, figures) in [
            ("rotate", &s.rotate),
            ("revoke", &s.revoke),
            ("reinstate", &s.reinstate),
        ] {
            println!(
                "  {:>3} vol  {what:<9} every volume:  {}",
                s.volumes,
                summary(&figures.per_volume)
            );
            if s.volumes > 1 {
                println!(
                    "  {:>3} vol  {what:<9} last volume:   {}",
                    s.volumes,
                    summary(&figures.all_volumes)
                );
            }
        }
    }

    node.stop().await;
    controller.stop().await;
    drop(apiserver);
    let left = mounts_below(&dir);
    if !left.is_empty() {
        eprintln!(
            "{} mounts left below {}; detaching",
            left.len(),
            dir.display()
        );
        for point in left {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    if args.keep {
        println!("state kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

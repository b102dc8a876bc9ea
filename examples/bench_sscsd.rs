//! The Secrets Store CSI Driver (SSCSD v1.6.1 with its fake provider) measured
//! exactly as `bench_publish` measures ScopeHold: the same kube-apiserver
//! binary, the same client (`KubeletPlayer`: kubelet's parent mkdir, a fresh
//! gRPC connection per call), the same phases and the same 41-byte value, and
//! the same table rows, so `bench/sscsd/run.sh` can interleave both and print
//! ratios. Phases: 1 cold publish; N at c=1 (then unpublished); M at c=C kept
//! mounted (RSS read then); K at c=1 with M mounted; unpublish all.
//!
//! SSCSD's CSIDriver requests no token, so the calls carry none; its pods
//! name a SecretProviderClass with `provider: fake`, whose file comes from
//! `bench/sscsd/provider` (built by `bench/sscsd/build.sh`).
//!
//! ```sh
//! sudo target/release/examples/bench_sscsd --sscsd "$(bench/sscsd/build.sh)"
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use scopehold::demo::kubelet::{KubeletPlayer, PodInfo};
use scopehold::demo::local;
use serde_json::json;
use support::timing::{Batch, stats};
use support::{client_for, cpu_seconds, meta, mounts_below};
use tokio::process::{Child, Command};

const NS: &str = "bench-publish";
const NODE: &str = "bench-node";
const SA: &str = "agent";
const VOLUME: &str = "credentials";
const SPC: &str = "bench-spc";
const DRIVER: &str = "secrets-store.csi.k8s.io";
const VALUE: &str = "sk-bench-0123456789abcdef0123456789abcdef";
const FS_GROUP: i64 = 1000;

#[derive(Parser, Debug)]
#[command(about = "SSCSD NodePublishVolume end to end, measured like bench_publish")]
struct Args {
    /// Directory with secrets-store-csi-driver, fake-provider and crds/
    /// (printed by bench/sscsd/build.sh).
    #[arg(long, env = "SSCSD_DIR")]
    sscsd: PathBuf,
    #[arg(long, default_value_t = 200)]
    sequential: usize,
    #[arg(long, default_value_t = 100)]
    sequential_full: usize,
    #[arg(long, default_value_t = 500)]
    concurrent: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
}

/// Runs `call` for every pod (see `support::timing::timed`) and says how
/// many calls failed.
async fn timed<'a, F, Fut>(pods: &'a [PodInfo], concurrency: usize, call: F) -> Batch
where
    F: Fn(&'a PodInfo) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    let batch = support::timing::timed(pods, concurrency, call).await;
    if let Some(first) = batch.errors.first() {
        eprintln!("  {} errors; first: {first}", batch.errors.len());
    }
    batch
}

async fn publish(kubelet: &KubeletPlayer, pod: &PodInfo) -> Result<Duration, String> {
    let attributes = HashMap::from([("secretProviderClass".to_owned(), SPC.to_owned())]);
    let mut request = kubelet.publish_request(pod, VOLUME, "", &attributes, true, true);
    // SSCSD's CSIDriver has no tokenRequests: kubelet sends no token.
    request.secrets.clear();
    let started = Instant::now();
    match kubelet.publish(request).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(e) => Err(e.to_string()),
    }
}

async fn unpublish(kubelet: &KubeletPlayer, pod: &PodInfo) -> Result<Duration, String> {
    let started = Instant::now();
    match kubelet.unpublish(&pod.uid, VOLUME).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(e) => Err(e.to_string()),
    }
}

fn holding_value(kubelet: &KubeletPlayer, pods: &[PodInfo]) -> usize {
    pods.iter()
        .filter(|p| {
            std::fs::read(kubelet.target_path(&p.uid, VOLUME).join("api-key"))
                .is_ok_and(|c| c == VALUE.as_bytes())
        })
        .count()
}

fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Daemon(Child, u32);

impl Daemon {
    fn spawn(bin: &Path, args: &[&str], kubeconfig: &Path, log: PathBuf) -> Daemon {
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
        Daemon(child, pid)
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.1.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.0.wait())
            .await
            .is_err()
        {
            let _ = self.0.kill().await;
        }
    }
}

/// Detaches whatever is still mounted below the run directory on the way out.
struct MountSweeper(PathBuf);

impl Drop for MountSweeper {
    fn drop(&mut self) {
        for point in mounts_below(&self.0) {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

async fn install_sscsd_crds(client: &Client, dir: &Path) {
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
        )),
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("SSCSD crds dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("crd file");
        let crd: DynamicObject = serde_yaml::from_str(&text).expect("crd yaml");
        crds.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|e| panic!("creating CRD from {}: {e}", file.display()));
    }
}

async fn create_pods(client: &Client, prefix: &str, n: usize, c: usize) -> Vec<PodInfo> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let name = format!("{prefix}-{i:04}");
            let pod: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name},
                "spec": {
                    "nodeName": NODE,
                    "serviceAccountName": SA,
                    "securityContext": {"fsGroup": FS_GROUP},
                    "containers": [{"name": "agent", "image": "busybox:1.36"}],
                    "volumes": [{"name": VOLUME, "csi": {"driver": DRIVER, "readOnly": true,
                        "volumeAttributes": {"secretProviderClass": SPC}}}]
                }
            }))
            .expect("pod manifest");
            let pod = Api::<Pod>::namespaced(client.clone(), NS)
                .create(&PostParams::default(), &pod)
                .await
                .expect("pod");
            PodInfo {
                namespace: NS.into(),
                name,
                uid: pod.uid().expect("uid"),
                service_account: SA.into(),
                fs_group: Some(FS_GROUP),
            }
        })
        .buffered(c)
        .collect()
        .await
}

fn row(label: &str, samples: &[Duration]) {
    let s = stats(samples);
    println!(
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        s.n, s.p50, s.p90, s.p99, s.max, s.mean
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "run as root: the driver mounts tmpfs volumes"
    );
    let temp = tempfile::Builder::new()
        .prefix("scopehold-bench-sscsd-")
        .tempdir()
        .expect("temp dir");
    let dir = temp.path().to_owned();
    let _sweeper = MountSweeper(dir.clone());
    let load_before = loadavg();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let apiserver_bin = match std::env::var_os("SCOPEHOLD_APISERVER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => local::apiserver_binary(repo).await.expect("API server"),
    };
    let apiserver = local::start_apiserver(&apiserver_bin, &dir)
        .await
        .expect("starting the API server");
    let client = client_for(&apiserver.kubeconfig).await;
    install_sscsd_crds(&client, &args.sscsd.join("crds")).await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(NS),
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
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
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta(SA),
                ..Default::default()
            },
        )
        .await
        .expect("service account");
    let spc_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "secrets-store.csi.x-k8s.io",
            "v1",
            "SecretProviderClass",
        )),
    );
    let spc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
        "metadata": {"name": SPC, "namespace": NS},
        "spec": {"provider": "fake", "parameters": {"objects": "api-key"}}
    }))
    .expect("spc");
    // The CRD is served a moment after it is created.
    let mut tries = 0;
    while let Err(e) = spc_api.create(&PostParams::default(), &spc).await {
        tries += 1;
        assert!(tries < 100, "SecretProviderClass: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let setup = Instant::now();
    let c = args.setup_concurrency;
    let warm = create_pods(&client, "warm", 1, c).await;
    let seq_pods = create_pods(&client, "seq", args.sequential, c).await;
    let conc_pods = create_pods(&client, "conc", args.concurrent, c).await;
    let full_pods = create_pods(&client, "full", args.sequential_full, c).await;
    eprintln!("pods created in {:.1} s", setup.elapsed().as_secs_f64());

    let providers = dir.join("providers");
    std::fs::create_dir_all(&providers).expect("providers dir");
    let provider_socket = providers.join("fake.sock");
    let socket = dir.join("csi.sock");
    let provider = Daemon::spawn(
        &args.sscsd.join("fake-provider"),
        &["--socket", provider_socket.to_str().expect("utf-8")],
        &apiserver.kubeconfig,
        dir.join("provider.log"),
    );
    let endpoint = format!("unix://{}", socket.display());
    let driver = Daemon::spawn(
        &args.sscsd.join("secrets-store-csi-driver"),
        &[
            "--endpoint",
            &endpoint,
            "--nodeid",
            NODE,
            "--provider-volume",
            providers.to_str().expect("utf-8"),
            "--additional-provider-volume-paths",
            providers.to_str().expect("utf-8"),
            "--metrics-addr",
            "127.0.0.1:0",
            "--kubeconfig",
            apiserver.kubeconfig.to_str().expect("utf-8"),
            "--v",
            "0",
        ],
        &apiserver.kubeconfig,
        dir.join("driver.log"),
    );
    let started = Instant::now();
    while !(socket.exists() && provider_socket.exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "SSCSD did not open its sockets; see {}",
            dir.join("driver.log").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kubelet = KubeletPlayer::new(&socket, dir.join("kubelet"));
    let kubelet = &kubelet;
    let pub_ = |p| publish(kubelet, p);
    let unpub = |p| unpublish(kubelet, p);

    let cold = timed(&warm, 1, pub_).await;
    timed(&warm, 1, unpub).await;
    let seq = timed(&seq_pods, 1, pub_).await;
    let seq_ok = holding_value(kubelet, &seq_pods);
    timed(&seq_pods, 1, unpub).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu0 = cpu_seconds(driver.1) + cpu_seconds(provider.1);
    let conc = timed(&conc_pods, args.concurrency, pub_).await;
    let cpu1 = cpu_seconds(driver.1) + cpu_seconds(provider.1);
    let conc_ok = holding_value(kubelet, &conc_pods);
    let mounted = mounts_below(&dir.join("kubelet")).len();
    let driver_mem = memory_mib(driver.1);
    let provider_mem = memory_mib(provider.1);
    let load_during = loadavg();
    let full = timed(&full_pods, 1, pub_).await;
    let full_ok = holding_value(kubelet, &full_pods);
    timed(&full_pods, 1, unpub).await;
    let conc_unpub = timed(&conc_pods, args.concurrency, unpub).await;
    let version = client.apiserver_version().await.expect("version");

    println!();
    println!("| latency (ms) | n | p50 | p90 | p99 | max | mean |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    row("publish, first (cold)", &cold.latencies);
    row(
        &format!("publish, c=1 ({} pods, 0 -> {0} mounted)", args.sequential),
        &seq.latencies,
    );
    row(
        &format!("publish, c={} ({} pods)", args.concurrency, args.concurrent),
        &conc.latencies,
    );
    row(
        &format!(
            "publish, c=1, {mounted} mounted ({} pods)",
            args.sequential_full
        ),
        &full.latencies,
    );
    row(
        &format!("unpublish, c={}", args.concurrency),
        &conc_unpub.latencies,
    );
    let mut figures: BTreeMap<&str, String> = BTreeMap::new();
    figures.insert("kube-apiserver", version.git_version);
    figures.insert(
        "load average (before / during c=32)",
        format!("{load_before} / {load_during}"),
    );
    figures.insert(
        "publish c=32: mounts per second",
        format!("{:.1}", conc.rate()),
    );
    figures.insert(
        "publish c=1: mounts per second",
        format!("{:.1}", seq.rate()),
    );
    figures.insert(
        "node plugin VmRSS / VmHWM (SSCSD driver)",
        format!("{:.1} / {:.1}", driver_mem.0, driver_mem.1),
    );
    figures.insert(
        "fake provider VmRSS / VmHWM",
        format!("{:.1} / {:.1}", provider_mem.0, provider_mem.1),
    );
    figures.insert(
        "c=32: CPU ms per publish, driver + provider",
        format!(
            "{:.2}",
            (cpu1 - cpu0) * 1000.0 / conc.latencies.len().max(1) as f64
        ),
    );
    figures.insert(
        "errors (publish c=1 / c=32 / c=1 all mounted / unpublish c=32)",
        format!(
            "{} / {} / {} / {}",
            seq.errors.len(),
            conc.errors.len(),
            full.errors.len(),
            conc_unpub.errors.len()
        ),
    );
    figures.insert(
        "volumes holding the value (c=1 / c=1 all mounted / c=32)",
        format!(
            "{seq_ok}/{} / {full_ok}/{} / {conc_ok}/{}",
            seq_pods.len(),
            full_pods.len(),
            conc_pods.len()
        ),
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    for (k, v) in figures {
        println!("| {k} | {v} |");
    }
    driver.stop().await;
    provider.stop().await;
}

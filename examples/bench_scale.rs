//! Cluster scale, simulated honestly on one machine: one controller with 2
//! replicas (leader election, both serving custody) against 10,000
//! SecretGrants, 2,000 AgentIdentities and 250 nodes. Each node is a
//! lightweight stand-in, not a node plugin: it holds the real invalidation
//! stream (WatchInvalidations, with the node's own bound token) and makes the
//! real Resolve calls, with real bound pod tokens, for its 40 volumes; it
//! writes no files (the node-local part is measured by bench_publish and
//! bench_revocation).
//!
//! Measures: cold convergence (every grant Active), custody memory and open
//! streams, 10,000 Resolves, the steady-state API request rate and CPU,
//! revocation fan-out (API write to every affected stand-in), rotation of a
//! Secret granted to 1,000 pods (API write to every pod re-resolved with the
//! new digest), and a no-op resync (both replicas restarted: 0 writes).
//!
//! ```sh
//! cargo build --release --bin scopehold --example bench_scale
//! target/release/examples/bench_scale            # --help for the sizes
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
    TOKEN_AUDIENCE,
};
use scopehold::demo::local;
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;
use scopehold::proto::scopehold::v1::invalidation::Kind;
use scopehold::proto::scopehold::v1::{ResolveRequest, WatchRequest};
use serde_json::json;
use support::{client_for, cpu_seconds, install_crds, meta};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

const SYSTEM_NS: &str = "scopehold-system";
const NODE_SA: &str = "scopehold-node";
const HOT_SECRET: &str = "hot";
/// No object written for this long: the work before has settled.
const QUIET: Duration = Duration::from_secs(5);
const SETTLE_LIMIT: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(about = "One controller (2 replicas) against many grants, identities and node stand-ins")]
struct Args {
    #[arg(long, env = "SCOPEHOLD_BIN")]
    scopehold: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    #[arg(long, default_value_t = 2000)]
    identities: usize,
    #[arg(long, default_value_t = 5)]
    grants_per_identity: usize,
    #[arg(long, default_value_t = 250)]
    nodes: usize,
    #[arg(long, default_value_t = 40)]
    volumes_per_node: usize,
    /// Revocations timed (one grant each).
    #[arg(long, default_value_t = 20)]
    revocations: usize,
    /// Resolve calls in flight at once over all stand-ins.
    #[arg(long, default_value_t = 32)]
    resolve_concurrency: usize,
    /// Seconds of idle steady state to measure the API request rate.
    #[arg(long, default_value_t = 30)]
    steady_seconds: u64,
    /// Set-up requests in flight at once (per phase; grants and pods are
    /// created at the same time).
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
}

fn ns(i: usize) -> String {
    format!("scale-{i:02}")
}

/// Agent `a` lives in namespace `a % namespaces`.
fn agent_ns(args: &Args, a: usize) -> String {
    ns(a % args.namespaces)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn rss_mib(pid: u32) -> (f64, f64) {
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

async fn create_n<F, Fut>(n: usize, concurrency: usize, make: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    futures::stream::iter(0..n)
        .map(make)
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
}

async fn bound_token(client: &Client, ns: &str, sa: &str, pod: &Pod) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![TOKEN_AUDIENCE.to_owned()],
            expiration_seconds: Some(7200),
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
        .expect("token status")
        .token
}

async fn create_pod(client: &Client, ns: &str, name: &str, sa: &str, node: &str) -> Pod {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "agent", "image": "busybox:1.36"}]}
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("pod {ns}/{name}: {e}"))
}

/// One volume a stand-in holds: the pod, its token, and the digest per grant
/// it last received.
#[derive(Clone)]
struct Volume {
    ns: String,
    pod: String,
    uid: String,
    sa: String,
    token: String,
}

struct StandIn {
    node: String,
    token: String,
    volumes: Vec<Volume>,
}

/// What the stand-ins saw, shared with the measuring code.
#[derive(Default)]
struct Seen {
    /// (node, namespace, grant, kind) -> first receipt.
    invalidations: HashMap<(String, String, String, i32), Instant>,
    /// Rotated volumes: (pod) -> (when re-resolved, digest of the hot grant).
    rotated: HashMap<String, (Instant, String)>,
    /// (pod, grant) -> the digest a re-resolve was started for. The node
    /// plugin skips a Rotated invalidation for content it already holds or
    /// fetches (the digest arrives twice: from the Secret watch and with the
    /// grant's status); so does the stand-in, or each pod would count 2-3
    /// TokenReviews per rotation that a real node does not send.
    refreshing: HashMap<(String, String), String>,
    /// Resolve calls made because of a rotation.
    re_resolves: usize,
    resolve_errors: usize,
}

async fn resolve(
    channel: &Channel,
    node: &StandIn,
    v: &Volume,
) -> Result<Vec<(String, String)>, tonic::Status> {
    let mut client = CustodyClient::new(channel.clone());
    let mut request = tonic::Request::new(ResolveRequest {
        request_id: String::new(),
        pod_token: v.token.clone(),
        pod_namespace: v.ns.clone(),
        pod_name: v.pod.clone(),
        pod_uid: v.uid.clone(),
        service_account_name: v.sa.clone(),
        node_name: node.node.clone(),
        volume_id: format!("csi-{}", v.uid),
        grants: vec![],
        fs_group: None,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", node.token).parse().expect("header"),
    );
    let answer = client.resolve(request).await?.into_inner();
    Ok(answer
        .grants
        .into_iter()
        .map(|g| (g.grant, g.content_digest))
        .collect())
}

/// Runs one stand-in: the invalidation stream, and a re-resolve of every
/// volume whose agent holds a rotated grant.
async fn run_stand_in(
    node: Arc<StandIn>,
    channel: Channel,
    seen: Arc<Mutex<Seen>>,
    permits: Arc<Semaphore>,
    hot_grants: Arc<HashMap<(String, String), Vec<usize>>>,
) {
    let mut client = CustodyClient::new(channel.clone());
    let mut request = tonic::Request::new(WatchRequest {
        node_name: node.node.clone(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", node.token).parse().expect("header"),
    );
    let mut stream = match client.watch_invalidations(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => panic!("{}: watch: {status}", node.node),
    };
    while let Some(Ok(inv)) = stream.next().await {
        let now = Instant::now();
        seen.lock()
            .expect("seen")
            .invalidations
            .entry((
                node.node.clone(),
                inv.namespace.clone(),
                inv.grant.clone(),
                inv.kind,
            ))
            .or_insert(now);
        if inv.kind == Kind::Rotated as i32
            && let Some(indices) = hot_grants.get(&(inv.namespace.clone(), inv.grant.clone()))
        {
            for &i in indices {
                if !inv.content_digest.is_empty() {
                    let pod = &node.volumes[i].pod;
                    let key = (pod.clone(), inv.grant.clone());
                    let mut seen = seen.lock().expect("seen");
                    let holds = seen.rotated.get(pod).map(|(_, d)| d) == Some(&inv.content_digest);
                    if holds || seen.refreshing.get(&key) == Some(&inv.content_digest) {
                        continue;
                    }
                    seen.refreshing.insert(key, inv.content_digest.clone());
                }
                let (node, channel, seen, permits) =
                    (node.clone(), channel.clone(), seen.clone(), permits.clone());
                let grant = inv.grant.clone();
                let wanted = inv.content_digest.clone();
                tokio::spawn(async move {
                    let _permit = permits.acquire().await.expect("permit");
                    let v = &node.volumes[i];
                    // An answer older than the invalidation (another replica's
                    // cache behind) is asked again, as the node plugin does.
                    for _ in 0..5 {
                        {
                            // Queued behind a refresh that got this content
                            // already (the plugin's queue runs one at a time).
                            let mut seen = seen.lock().expect("seen");
                            if !wanted.is_empty()
                                && seen.rotated.get(&v.pod).map(|(_, d)| d) == Some(&wanted)
                            {
                                break;
                            }
                            seen.re_resolves += 1;
                        }
                        match resolve(&channel, &node, v).await {
                            Ok(grants) => {
                                let digest = grants
                                    .into_iter()
                                    .find(|(g, _)| *g == grant)
                                    .map(|(_, d)| d)
                                    .unwrap_or_default();
                                let current = wanted.is_empty() || digest == wanted;
                                seen.lock()
                                    .expect("seen")
                                    .rotated
                                    .insert(v.pod.clone(), (Instant::now(), digest));
                                if current {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(_) => {
                                seen.lock().expect("seen").resolve_errors += 1;
                                break;
                            }
                        }
                    }
                });
            }
        }
    }
}

struct Replica {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Replica {
    fn start(bin: &Path, kubeconfig: &Path, dir: &Path, i: usize) -> Replica {
        let log = dir.join(format!("controller-{i}.log"));
        let out = File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new(bin)
            .args([
                "controller",
                "--metrics-listen",
                "127.0.0.1:0",
                "--custody-listen",
                "127.0.0.1:0",
                "--custody-plaintext",
                "--node-service-account",
                &format!("{SYSTEM_NS}/{NODE_SA}"),
                "--leader-election",
                "--lease-namespace",
                SYSTEM_NS,
                "--instance",
                &format!("replica-{i}"),
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("controller");
        let pid = child.id().expect("pid");
        Replica { child, pid, log }
    }

    async fn field(&self, key: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let logs = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(v) = logs
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|v| v[key].as_str().map(str::to_owned))
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no {key} in {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

async fn http_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// Sum of the samples of `name` whose series text contains every `want`.
fn metric(text: &str, name: &str, want: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let n = series.split('{').next().unwrap_or("");
            n == name && want.iter().all(|w| series.contains(w))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

async fn sum_metric(addrs: &[String], name: &str, want: &[&str]) -> f64 {
    let mut total = 0.0;
    for a in addrs {
        total += metric(&http_metrics(a).await, name, want);
    }
    total
}

/// `apiserver_request_total` by "VERB resource".
async fn api_requests(client: &Client) -> BTreeMap<String, f64> {
    let request = tonic::codegen::http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let body = client.request_text(request).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |k: &str| {
            series
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let sub = label("subresource");
        let key = format!(
            "{} {}{}",
            label("verb"),
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Requests that change objects, without those an idle cluster makes anyway
/// (leader-election leases, the API server's own endpoints).
fn object_writes(counts: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    counts
        .iter()
        .filter(|(k, _)| !k.starts_with("GET") && !k.starts_with("LIST") && !k.starts_with("WATCH"))
        .filter(|(k, _)| {
            !k.ends_with(" leases") && !k.ends_with(" endpoints") && !k.ends_with(" endpointslices")
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Waits until no object has been written for `quiet` (statuses, Events and
/// resolution counts flushed after the work that caused them), at most
/// `limit`. Returns when the last write was seen, and whether it settled.
async fn settle(client: &Client, quiet: Duration, limit: Duration) -> (Instant, bool) {
    let start = Instant::now();
    let mut last = object_writes(&api_requests(client).await);
    let mut last_write = start;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = object_writes(&api_requests(client).await);
        if now != last {
            last = now;
            last_write = Instant::now();
        }
        if last_write.elapsed() >= quiet {
            return (last_write, true);
        }
        if start.elapsed() >= limit {
            return (last_write, false);
        }
    }
}

fn by_kind(counts: &BTreeMap<String, f64>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = args
        .scopehold
        .clone()
        .unwrap_or_else(|| repo.join("target/release/scopehold"));
    let temp = tempfile::Builder::new()
        .prefix("scopehold-bench-scale-")
        .tempdir()
        .expect("temp");
    let dir = temp.path().to_owned();
    let fig = |k: &str, v: String| println!("| {k} | {v} |");
    println!("| measure | value |\n|---|---|");
    fig("load average at start", loadavg());
    let apiserver_bin = match std::env::var_os("SCOPEHOLD_APISERVER_BIN") {
        Some(b) => PathBuf::from(b),
        None => local::apiserver_binary(repo).await.expect("API server"),
    };
    let apiserver = local::start_apiserver(&apiserver_bin, &dir)
        .await
        .expect("API server");
    let client = client_for(&apiserver.kubeconfig).await;
    let apiserver_pid = {
        let me = std::process::id();
        let canon = std::fs::canonicalize(&apiserver_bin).expect("canon");
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let ppid: u32 = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                (ppid == me && std::fs::read_link(e.path().join("exe")).ok()? == canon)
                    .then_some(pid)
            })
            .expect("API server pid")
    };
    install_crds(&client, Duration::from_secs(60)).await;

    // --- Objects (not timed as part of any measure).
    let setup = Instant::now();
    let c = args.setup_concurrency;
    for n in (0..args.namespaces).map(ns).chain([SYSTEM_NS.to_owned()]) {
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: meta(&n),
                    ..Default::default()
                },
            )
            .await
            .expect("namespace");
    }
    let secret = |name: &str, value: &str| Secret {
        metadata: meta(name),
        string_data: Some([("value".to_owned(), value.to_owned())].into()),
        ..Default::default()
    };
    for i in 0..args.namespaces {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns(i));
        for s in 0..4 {
            api.create(
                &PostParams::default(),
                &secret(&format!("s{s}"), &format!("v-{i}-{s}")),
            )
            .await
            .expect("secret");
        }
    }
    Api::<Secret>::namespaced(client.clone(), &ns(0))
        .create(&PostParams::default(), &secret(HOT_SECRET, "hot-1"))
        .await
        .expect("hot secret");
    let client = &client;
    let args = &args;
    create_n(args.identities, c, |a| async move {
        let namespace = agent_ns(args, a);
        let sa = format!("agent-{a}");
        Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .create(
                &PostParams::default(),
                &ServiceAccount {
                    metadata: meta(&sa),
                    ..Default::default()
                },
            )
            .await
            .expect("sa");
        Api::<AgentIdentity>::namespaced(client.clone(), &namespace)
            .create(
                &PostParams::default(),
                &AgentIdentity::new(
                    &sa,
                    AgentIdentitySpec {
                        service_account_name: sa.clone(),
                        ..Default::default()
                    },
                ),
            )
            .await
            .expect("identity");
    })
    .await;
    // Grant 0 of every agent in namespace 0 is on the hot Secret.
    let grants_created = create_n(
        args.identities * args.grants_per_identity,
        c,
        |g| async move {
            let a = g / args.grants_per_identity;
            let k = g % args.grants_per_identity;
            let namespace = agent_ns(args, a);
            let secret = if k == 0 && a % args.namespaces == 0 {
                HOT_SECRET.to_owned()
            } else {
                format!("s{}", k % 4)
            };
            let spec = SecretGrantSpec {
                agent: format!("agent-{a}"),
                secret_name: secret,
                keys: vec![GrantedKey {
                    key: "value".into(),
                    path: Some(format!("f{k}")),
                    ..Default::default()
                }],
                ttl: Some("8h".into()),
                ..Default::default()
            };
            Api::<SecretGrant>::namespaced(client.clone(), &namespace)
                .create(
                    &PostParams::default(),
                    &SecretGrant::new(&format!("agent-{a}-g{k}"), spec),
                )
                .await
                .expect("grant");
        },
    );
    // Pods and their tokens need only the ServiceAccounts: they are made
    // while the grants are (the set-up is API round trips, most of them
    // for 2 requests per volume).
    let pods_made = async {
        Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NS)
            .create(
                &PostParams::default(),
                &ServiceAccount {
                    metadata: meta(NODE_SA),
                    ..Default::default()
                },
            )
            .await
            .expect("node sa");
        let node_tokens: Vec<String> = futures::stream::iter(0..args.nodes)
            .map(|n| async move {
                let node = format!("node-{n:03}");
                Api::<Node>::all(client.clone())
                    .create(
                        &PostParams::default(),
                        &Node {
                            metadata: meta(&node),
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("node");
                let pod =
                    create_pod(client, SYSTEM_NS, &format!("plugin-{n:03}"), NODE_SA, &node).await;
                bound_token(client, SYSTEM_NS, NODE_SA, &pod).await
            })
            .buffered(c)
            .collect::<Vec<String>>()
            .await;
        // Volume i: on node i / volumes_per_node, of agent i % identities.
        let total_volumes = args.nodes * args.volumes_per_node;
        let mut volumes: Vec<(usize, Volume)> = futures::stream::iter(0..total_volumes)
            .map(|i| async move {
                let a = i % args.identities;
                let namespace = agent_ns(args, a);
                let sa = format!("agent-{a}");
                let name = format!("pod-{i:05}");
                let node = format!("node-{:03}", i / args.volumes_per_node);
                let pod = create_pod(client, &namespace, &name, &sa, &node).await;
                let token = bound_token(client, &namespace, &sa, &pod).await;
                let volume = Volume {
                    ns: namespace,
                    pod: name,
                    uid: pod.uid().expect("uid"),
                    sa,
                    token,
                };
                (i, volume)
            })
            // Unordered: one slow pod or token does not hold up the rest.
            .buffer_unordered(c)
            .collect()
            .await;
        volumes.sort_unstable_by_key(|(i, _)| *i);
        let volumes: Vec<Volume> = volumes.into_iter().map(|(_, v)| v).collect();
        (node_tokens, volumes, total_volumes)
    };
    let ((), (node_tokens, volumes, total_volumes)) = futures::join!(grants_created, pods_made);
    let objects =
        args.identities * (args.grants_per_identity + 2) + total_volumes * 2 + args.nodes * 3;
    fig(
        "set-up: objects created (s)",
        format!("{objects} in {:.0} s", setup.elapsed().as_secs_f64()),
    );

    // --- Cold convergence: 2 replicas, leader election.
    let total_grants = args.identities * args.grants_per_identity;
    let api0 = api_requests(client).await;
    let cpu_api0 = cpu_seconds(apiserver_pid);
    let started = Instant::now();
    let replicas = vec![
        Replica::start(&bin, &apiserver.kubeconfig, &dir, 0),
        Replica::start(&bin, &apiserver.kubeconfig, &dir, 1),
    ];
    let mut metrics_addrs = Vec::new();
    let mut custody_addrs = Vec::new();
    for r in &replicas {
        metrics_addrs.push(r.field("metrics_addr").await);
        custody_addrs.push(r.field("custody_addr").await);
    }
    let grants_api: Vec<Api<SecretGrant>> = (0..args.namespaces)
        .map(|i| Api::namespaced(client.clone(), &ns(i)))
        .collect();
    loop {
        let written = sum_metric(
            &metrics_addrs,
            "scopehold_status_writes_total",
            &["SecretGrant"],
        )
        .await;
        if written >= total_grants as f64 {
            let mut active = 0;
            for api in &grants_api {
                active += api
                    .list(&ListParams::default())
                    .await
                    .map(|l| {
                        l.items
                            .iter()
                            .filter(|g| g.phase() == Some(GrantPhase::Active))
                            .count()
                    })
                    .unwrap_or(0);
            }
            if active >= total_grants {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "no convergence in 15 min"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cold = started.elapsed();
    let cpu_api1 = cpu_seconds(apiserver_pid);
    let ctl_cpu: f64 = replicas.iter().map(|r| cpu_seconds(r.pid)).sum();
    let api1 = api_requests(client).await;
    let cold_by_kind: BTreeMap<String, f64> = delta(&api0, &api1)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("GET") && !k.starts_with("LIST") && !k.starts_with("WATCH"))
        .collect();
    let cold_writes: f64 = cold_by_kind.values().sum();
    fig(
        &format!("cold: every one of {total_grants} grants Active (s)"),
        format!("{:.1}", cold.as_secs_f64()),
    );
    fig(
        "cold: API writes / CPU s API server / CPU s both replicas",
        format!(
            "{cold_writes:.0} / {:.1} / {ctl_cpu:.1}",
            cpu_api1 - cpu_api0
        ),
    );
    fig("cold: API writes by kind", by_kind(&cold_by_kind));
    // What the start still writes after the last grant turned Active
    // (identity statuses, Events): the start is over only when it stops.
    let (last_write, settled) = settle(client, QUIET, SETTLE_LIMIT).await;
    let api_settled = api_requests(client).await;
    let cpu_api_settled = cpu_seconds(apiserver_pid);
    let ctl_cpu_settled: f64 = replicas.iter().map(|r| cpu_seconds(r.pid)).sum();
    let start_writes = object_writes(&delta(&api0, &api_settled));
    fig(
        "cold: last write of the start (s after the replicas started)",
        format!(
            "{:.1}{}",
            last_write.duration_since(started).as_secs_f64(),
            if settled {
                ""
            } else {
                " (still writing: gave up waiting)"
            }
        ),
    );
    fig(
        "cold, start to last write: object writes / API server CPU s / both replicas CPU s",
        format!(
            "{:.0} / {:.1} / {:.1}",
            start_writes.values().sum::<f64>(),
            cpu_api_settled - cpu_api0,
            ctl_cpu_settled
        ),
    );
    fig(
        "cold, start to last write: object writes by kind",
        by_kind(&start_writes),
    );
    fig(
        "cold: API server CPU s per 1,000 grants / per 1,000 object writes",
        format!(
            "{:.2} / {:.2}",
            (cpu_api_settled - cpu_api0) * 1000.0 / total_grants as f64,
            (cpu_api_settled - cpu_api0) * 1000.0 / start_writes.values().sum::<f64>().max(1.0)
        ),
    );

    // --- Stand-ins: streams, then every volume resolved once.
    let mut by_node: Vec<Vec<Volume>> = vec![Vec::new(); args.nodes];
    for (i, v) in volumes.iter().enumerate() {
        by_node[i / args.volumes_per_node].push(v.clone());
    }
    let mut channels = Vec::new();
    for a in &custody_addrs {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                .expect("endpoint")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("custody channel"),
        );
    }
    let stand_ins: Vec<Arc<StandIn>> = by_node
        .into_iter()
        .enumerate()
        .map(|(n, vols)| {
            Arc::new(StandIn {
                node: format!("node-{n:03}"),
                token: node_tokens[n].clone(),
                volumes: vols,
            })
        })
        .collect();
    let hot_grant: Vec<(String, String)> = (0..args.identities)
        .filter(|a| a % args.namespaces == 0)
        .map(|a| (ns(0), format!("agent-{a}-g0")))
        .collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let permits = Arc::new(Semaphore::new(args.resolve_concurrency));
    for (n, s) in stand_ins.iter().enumerate() {
        // Which of this node's volumes hold which hot grant.
        let mut hot: HashMap<(String, String), Vec<usize>> = HashMap::new();
        for (i, v) in s.volumes.iter().enumerate() {
            let key = (v.ns.clone(), format!("{}-g0", v.sa));
            if hot_grant.contains(&key) {
                hot.entry(key).or_default().push(i);
            }
        }
        tokio::spawn(run_stand_in(
            s.clone(),
            channels[n % channels.len()].clone(),
            seen.clone(),
            permits.clone(),
            Arc::new(hot),
        ));
    }
    let streams_up = Instant::now();
    loop {
        let open = sum_metric(
            &metrics_addrs,
            "scopehold_custody_invalidation_streams",
            &[],
        )
        .await;
        if open >= args.nodes as f64 {
            break;
        }
        assert!(
            streams_up.elapsed() < Duration::from_secs(60),
            "{open} streams"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fig(
        &format!("{} invalidation streams open after (s)", args.nodes),
        format!("{:.2}", streams_up.elapsed().as_secs_f64()),
    );
    let resolving = Instant::now();
    let api_resolving = api_requests(client).await;
    let cpu_api2 = cpu_seconds(apiserver_pid);
    let results: Vec<Result<(), String>> = futures::stream::iter(
        stand_ins
            .iter()
            .enumerate()
            .flat_map(|(n, s)| (0..s.volumes.len()).map(move |i| (n, s.clone(), i))),
    )
    .map(|(n, s, i)| {
        let channel = channels[n % channels.len()].clone();
        async move {
            resolve(&channel, &s, &s.volumes[i])
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .buffer_unordered(args.resolve_concurrency)
    .collect()
    .await;
    let resolve_wall = resolving.elapsed();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let cpu_api3 = cpu_seconds(apiserver_pid);
    fig(
        &format!(
            "{total_volumes} Resolves at c={}: per second / errors",
            args.resolve_concurrency
        ),
        format!(
            "{:.0} / {}{}",
            total_volumes as f64 / resolve_wall.as_secs_f64(),
            errors.len(),
            errors
                .first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ),
    );
    fig(
        "Resolves: API server CPU s per 1,000 pods",
        format!(
            "{:.2}",
            (cpu_api3 - cpu_api2) * 1000.0 / total_volumes as f64
        ),
    );
    for (i, r) in replicas.iter().enumerate() {
        let (rss, hwm) = rss_mib(r.pid);
        fig(
            &format!("replica {i} VmRSS / VmHWM (MiB)"),
            format!("{rss:.1} / {hwm:.1}"),
        );
    }

    // --- Steady state: nothing happens for a while. The Resolves above
    // leave resolution counts and Events to flush: the window starts once
    // nothing has been written for QUIET.
    let settling = Instant::now();
    let (_, settled) = settle(client, QUIET, SETTLE_LIMIT).await;
    let after_resolves = object_writes(&delta(&api_resolving, &api_requests(client).await));
    fig(
        "Resolves, from the first until writes stopped: object writes by kind",
        by_kind(&after_resolves),
    );
    fig(
        "steady state: waited for writes to stop (s)",
        format!(
            "{:.1}{}",
            settling.elapsed().as_secs_f64(),
            if settled {
                ""
            } else {
                " (never stopped: the window is not idle)"
            }
        ),
    );
    let s0 = api_requests(client).await;
    let cpu_s0 = cpu_seconds(apiserver_pid);
    let ctl_s0: f64 = replicas.iter().map(|r| cpu_seconds(r.pid)).sum();
    tokio::time::sleep(Duration::from_secs(args.steady_seconds)).await;
    let s1 = api_requests(client).await;
    let cpu_s1 = cpu_seconds(apiserver_pid);
    let ctl_s1: f64 = replicas.iter().map(|r| cpu_seconds(r.pid)).sum();
    let steady = delta(&s0, &s1);
    let secs = args.steady_seconds as f64;
    // The benchmark's own scrape of /metrics is one GET per run here.
    let total: f64 = steady.values().sum::<f64>();
    fig(
        "steady state: API requests per second (all verbs)",
        format!(
            "{:.2} ({})",
            total / secs,
            steady
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    fig(
        "steady state: CPU s per second, API server / both replicas",
        format!(
            "{:.4} / {:.4}",
            (cpu_s1 - cpu_s0) / secs,
            (ctl_s1 - ctl_s0) / secs
        ),
    );
    fig(
        "steady state: CPU s per second, API server / both replicas, per 1,000 pods",
        format!(
            "{:.4} / {:.4}",
            (cpu_s1 - cpu_s0) / secs * 1000.0 / total_volumes as f64,
            (ctl_s1 - ctl_s0) / secs * 1000.0 / total_volumes as f64
        ),
    );

    // --- Revocation fan-out.
    let mut fanout = Vec::new();
    // Custody sends a change only to the nodes running the agent's pods:
    // stand-ins without one must not hear of it.
    let mut strays = 0_usize;
    // Only agents with pods somewhere: a revocation nobody holds times nothing.
    let with_pods: Vec<usize> = {
        let mut agents: Vec<usize> = stand_ins
            .iter()
            .flat_map(|s| s.volumes.iter())
            .filter_map(|v| v.sa.strip_prefix("agent-")?.parse().ok())
            .collect();
        agents.sort_unstable();
        agents.dedup();
        agents
    };
    assert!(!with_pods.is_empty(), "no agent has a pod");
    for r in 0..args.revocations {
        let a = with_pods[(r * 97 + 13) % with_pods.len()];
        let namespace = agent_ns(args, a);
        let grant = format!(
            "agent-{a}-g{}",
            1 + r % (args.grants_per_identity - 1).max(1)
        );
        let affected: Vec<String> = stand_ins
            .iter()
            .filter(|s| s.volumes.iter().any(|v| v.sa == format!("agent-{a}")))
            .map(|s| s.node.clone())
            .collect();
        let at = Instant::now();
        Api::<SecretGrant>::namespaced(client.clone(), &namespace)
            .patch(
                &grant,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"revoked": true}})),
            )
            .await
            .expect("revoke");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = {
                let seen = seen.lock().expect("seen");
                let got = |node: &String| {
                    seen.invalidations
                        .get(&(
                            node.clone(),
                            namespace.clone(),
                            grant.clone(),
                            Kind::Revoked as i32,
                        ))
                        .copied()
                };
                let times: Vec<Option<Instant>> = affected.iter().map(got).collect();
                times.iter().all(Option::is_some).then_some(times)
            };
            if let Some(times) = done {
                fanout.push(ms(times
                    .iter()
                    .flatten()
                    .max()
                    .expect("one")
                    .duration_since(at)));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "revocation {grant} not delivered"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = seen.lock().expect("seen");
        strays += stand_ins
            .iter()
            .filter(|s| !affected.contains(&s.node))
            .filter(|s| {
                seen.invalidations.contains_key(&(
                    s.node.clone(),
                    namespace.clone(),
                    grant.clone(),
                    Kind::Revoked as i32,
                ))
            })
            .count();
    }
    let mut f = fanout.clone();
    fig(
        &format!(
            "revocation: API write -> every affected stand-in, p50 / p99 / max ms ({} revocations)",
            fanout.len()
        ),
        format!(
            "{:.1} / {:.1} / {:.1}",
            pct(&mut f, 0.5),
            pct(&mut f, 0.99),
            pct(&mut f, 1.0)
        ),
    );
    fig(
        &format!(
            "revocation: streams without the agent's pods told of it, of {} x {} (expect 0)",
            args.nodes, args.revocations
        ),
        strays.to_string(),
    );

    // --- Rotation of the hot Secret (granted to every pod of namespace 0's agents).
    let hot_pods: usize = stand_ins
        .iter()
        .flat_map(|s| s.volumes.iter())
        .filter(|v| hot_grant.contains(&(v.ns.clone(), format!("{}-g0", v.sa))))
        .count();
    let cpu_r0 = cpu_seconds(apiserver_pid);
    let api_r0 = api_requests(client).await;
    let at = Instant::now();
    Api::<Secret>::namespaced(client.clone(), &ns(0))
        .patch(
            HOT_SECRET,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"value": "hot-2"}})),
        )
        .await
        .expect("rotate");
    let new_digest = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done: Vec<(Instant, String)> = seen
                .lock()
                .expect("seen")
                .rotated
                .values()
                .cloned()
                .collect();
            if done.len() >= hot_pods {
                break done;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {hot_pods} re-resolved",
                done.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let cpu_r1 = cpu_seconds(apiserver_pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api_r1 = api_requests(client).await;
    let digests: std::collections::BTreeSet<&String> = new_digest.iter().map(|(_, d)| d).collect();
    let mut lat: Vec<f64> = new_digest
        .iter()
        .map(|(t, _)| ms(t.duration_since(at)))
        .collect();
    fig(
        &format!(
            "rotation of a Secret granted to {hot_pods} pods: API write -> pod re-resolved, p50 / p99 / last ms"
        ),
        format!(
            "{:.0} / {:.0} / {:.0} ({} distinct digests)",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut lat, 1.0),
            digests.len()
        ),
    );
    fig(
        "rotation: API requests (by kind) / API server CPU s",
        format!(
            "{} / {:.1}",
            delta(&api_r0, &api_r1)
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            cpu_r1 - cpu_r0
        ),
    );
    let (resolve_errors, re_resolves) = {
        let seen = seen.lock().expect("seen");
        (seen.resolve_errors, seen.re_resolves)
    };
    fig(
        "rotation: Resolve calls / errors",
        format!("{re_resolves} / {resolve_errors}"),
    );

    // --- No-op resync: both replicas restarted.
    for r in replicas {
        r.stop().await;
    }
    let w0 = api_requests(client).await;
    let restarted = Instant::now();
    let replicas = vec![
        Replica::start(&bin, &apiserver.kubeconfig, &dir, 2),
        Replica::start(&bin, &apiserver.kubeconfig, &dir, 3),
    ];
    let mut addrs = Vec::new();
    for r in &replicas {
        addrs.push(r.field("metrics_addr").await);
    }
    let objects_total = (total_grants + args.identities) as f64;
    loop {
        let seen = sum_metric(&addrs, "scopehold_reconciles_total", &[]).await;
        if seen >= objects_total {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(300),
            "resync: {seen} reconciles"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let resync = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status_writes = sum_metric(&addrs, "scopehold_status_writes_total", &[]).await;
    let w1 = api_requests(client).await;
    let writes: BTreeMap<String, f64> = delta(&w0, &w1)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("GET") && !k.starts_with("LIST") && !k.starts_with("WATCH"))
        .collect();
    fig(
        "no-op resync (both replicas restarted): every object reconciled (s) / status writes",
        format!("{:.1} / {status_writes:.0}", resync.as_secs_f64()),
    );
    fig(
        "no-op resync: API writes by kind (leases and TokenReviews are not object writes)",
        writes
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    fig("load average at end", loadavg());
    for r in replicas {
        r.stop().await;
    }
}

//! `scopehold`: the controller (with the custody service), the CSI node
//! plugin and the CRD generator, as subcommands of one binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use kube::runtime::events::Reporter;
use prometheus_client::registry::Registry;
use scopehold::controller::leader::{Leadership, LeaseSettings};
use scopehold::controller::{self, Metrics, Settings};
use scopehold::custody::digest_key;
use scopehold::custody::metrics::CustodyMetrics;
use scopehold::custody::resolutions::ResolutionLog;
use scopehold::custody::server::{CustodyService, NodePluginAccount};
use scopehold::custody::tls::{self, TlsSettings};
use scopehold::event_series::EventSink;
use scopehold::proto::scopehold::v1::custody_server::CustodyServer;
use scopehold::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "scopehold",
    version,
    about = "Scoped, audited, revocable secrets for coding agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile AgentIdentities and SecretGrants.
    Controller(Box<ControllerArgs>),
    /// Serve the CSI node plugin (Identity and Node services) on a unix socket.
    Node(Box<NodeArgs>),
    /// Run the credential-injecting sidecar of delivery mode `proxy`.
    Proxy(Box<ProxyArgs>),
    /// Exit 0 when the proxy sidecar accepts connections (its startup probe).
    ProxyReady {
        #[arg(long, default_value = "127.0.0.1:15001")]
        addr: SocketAddr,
    },
    /// Print the CRDs as YAML, or write them into a directory.
    Crdgen {
        /// Write one file per CRD into this directory instead of stdout.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SCOPEHOLD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SCOPEHOLD_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Log format on stdout.
    #[arg(long, env = "SCOPEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Name of this instance in Events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Reconciles in flight at most, per kind.
    #[arg(long, env = "SCOPEHOLD_CONCURRENCY", default_value_t = 32)]
    concurrency: u16,
    /// Size of each node plugin volume's tmpfs: the node plugin's
    /// `--tmpfs-size` (the chart feeds both from `node.volumeSizeLimit`). A
    /// grant whose files alone exceed half of it is Invalid / ValueTooLarge.
    #[arg(long, env = "SCOPEHOLD_VOLUME_SIZE_LIMIT", default_value = "1Mi", value_parser = scopehold::csi::grpc::server::parse_size)]
    volume_size_limit: u64,
    /// Serve the custody gRPC API on this address (node plugins call it).
    #[arg(long, env = "SCOPEHOLD_CUSTODY_LISTEN")]
    custody_listen: Option<SocketAddr>,
    /// Bind the custody and metrics listeners with SO_REUSEPORT, so several
    /// replicas in one network namespace (host networking on one node) can
    /// listen on the same ports; the kernel spreads connections over them.
    #[arg(long, env = "SCOPEHOLD_LISTEN_REUSE_PORT")]
    listen_reuse_port: bool,
    #[command(flatten)]
    custody: CustodyArgs,
    #[command(flatten)]
    lease: LeaseArgs,
    #[command(flatten)]
    webhook: WebhookArgs,
}

#[derive(clap::Args)]
struct WebhookArgs {
    /// Serve the proxy-sidecar admission webhook (HTTPS, custody's
    /// certificate) on this address.
    #[arg(long, env = "SCOPEHOLD_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    /// MutatingWebhookConfiguration whose caBundle the controller keeps
    /// equal to the custody CA (the chart's).
    #[arg(long, env = "SCOPEHOLD_WEBHOOK_CONFIGURATION")]
    webhook_configuration: Option<String>,
    /// Image of the injected sidecar (the ScopeHold image).
    #[arg(
        long,
        env = "SCOPEHOLD_PROXY_IMAGE",
        default_value = "ghcr.io/scopehold/scopehold:latest"
    )]
    proxy_image: String,
    /// Loopback port of the injected sidecar.
    #[arg(long, env = "SCOPEHOLD_PROXY_PORT", default_value_t = 15001)]
    proxy_port: u16,
    /// Where injected sidecars report their uses: this webhook listener's
    /// `/usage` as the pods reach it (e.g.
    /// https://scopehold-custody.scopehold-system.svc:9444/usage). Without
    /// it, sidecars only write audit lines.
    #[arg(long, env = "SCOPEHOLD_WEBHOOK_USAGE_URL")]
    proxy_usage_url: Option<String>,
    /// PEM file of extra CAs the injected sidecars trust for upstream TLS
    /// (private APIs behind an internal CA). Read once at start.
    #[arg(long, env = "SCOPEHOLD_PROXY_UPSTREAM_CA_FILE")]
    proxy_upstream_ca_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LeaseArgs {
    /// Compete for a Lease; only the holder reconciles (run several replicas).
    #[arg(long, env = "SCOPEHOLD_LEADER_ELECTION")]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(
        long,
        env = "SCOPEHOLD_LEASE_NAME",
        default_value = "scopehold-controller"
    )]
    lease_name: String,
    /// Namespace of the Lease (the controller's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a holder that stopped renewing keeps the Lease.
    #[arg(long, env = "SCOPEHOLD_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
}

#[derive(clap::Args)]
struct CustodyArgs {
    /// ServiceAccount (NAMESPACE/NAME) of the node plugins: the only caller
    /// custody answers.
    #[arg(
        long,
        env = "SCOPEHOLD_NODE_SERVICE_ACCOUNT",
        default_value = "scopehold-system/scopehold-node"
    )]
    node_service_account: NodePluginAccount,
    /// Serve custody without TLS. Development only: values cross the network
    /// in clear text. Without it, custody serves TLS with a certificate from
    /// the shared TLS Secret (created on first start).
    #[arg(long, env = "SCOPEHOLD_CUSTODY_PLAINTEXT")]
    custody_plaintext: bool,
    /// Secret (in the controller's namespace) holding the custody CA and
    /// serving certificate; created when missing.
    #[arg(
        long,
        env = "SCOPEHOLD_CUSTODY_TLS_SECRET",
        default_value = "scopehold-custody-tls"
    )]
    custody_tls_secret: String,
    /// Secret (in the controller's namespace, beside the TLS Secret) holding
    /// the HMAC key of content digests; created when missing, read by every
    /// replica at start. Delete it and restart the controllers to rotate.
    #[arg(
        long,
        env = "SCOPEHOLD_DIGEST_KEY_SECRET",
        default_value = "scopehold-digest-key"
    )]
    digest_key_secret: String,
    /// ConfigMap where the CA bundle is published for the node plugins.
    #[arg(
        long,
        env = "SCOPEHOLD_CUSTODY_CA_CONFIGMAP",
        default_value = "scopehold-custody-ca"
    )]
    custody_ca_configmap: String,
    /// Namespace of the TLS Secret, the digest key Secret and the CA
    /// ConfigMap (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    custody_tls_namespace: String,
    /// Name of the custody Service; the certificate covers its DNS names.
    #[arg(
        long,
        env = "SCOPEHOLD_CUSTODY_SERVICE",
        default_value = "scopehold-custody"
    )]
    custody_service_name: String,
    /// Extra DNS names or IP addresses for the serving certificate.
    #[arg(long, env = "SCOPEHOLD_CUSTODY_TLS_SANS", value_delimiter = ',')]
    custody_tls_san: Vec<String>,
    /// Longest a Resolve waits on the API server before answering
    /// UNAVAILABLE (kubelet retries the mount).
    #[arg(
        long,
        env = "SCOPEHOLD_CUSTODY_DECISION_TIMEOUT_MS",
        default_value_t = 4000
    )]
    custody_decision_timeout_ms: u64,
    /// How often resolution counts are written into statuses.
    #[arg(long, env = "SCOPEHOLD_STATUS_FLUSH_MS", default_value_t = 1000)]
    status_flush_ms: u64,
    /// How often custody's Event series (resolutions, denials, node reports)
    /// are written: each series is one write per interval at most.
    #[arg(long, env = "SCOPEHOLD_EVENT_FLUSH_MS", default_value_t = 1000)]
    event_flush_ms: u64,
    /// On shutdown, how long to keep writing pending Events and statuses.
    #[arg(long, env = "SCOPEHOLD_SHUTDOWN_FLUSH_SECONDS", default_value_t = 5)]
    shutdown_flush_seconds: u64,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The CSI socket, e.g. unix:///csi/csi.sock (created with mode 0600).
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's name (NodeGetInfo's node_id; checked by custody).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The custody service, e.g. https://scopehold-custody.scopehold-system.svc:9443.
    #[arg(long, env = "SCOPEHOLD_CUSTODY_ENDPOINT")]
    custody_endpoint: String,
    /// Allow a plaintext http:// custody endpoint (development only).
    #[arg(long, env = "SCOPEHOLD_CUSTODY_PLAINTEXT")]
    custody_plaintext: bool,
    /// PEM bundle of the CA that signs custody's certificate (https://).
    #[arg(long, env = "SCOPEHOLD_CUSTODY_CA_FILE")]
    custody_ca_file: Option<PathBuf>,
    /// The plugin's own projected ServiceAccount token (audience scopehold.dev),
    /// re-read on every call.
    #[arg(
        long,
        env = "SCOPEHOLD_TOKEN_FILE",
        default_value = "/var/run/secrets/scopehold.dev/serviceaccount/token"
    )]
    token_file: PathBuf,
    /// Kubelet's root directory; target paths must be below it.
    #[arg(
        long,
        env = "SCOPEHOLD_KUBELET_DIR",
        default_value = "/var/lib/kubelet"
    )]
    kubelet_dir: PathBuf,
    /// Registry of published volumes (names and digests, no values).
    #[arg(
        long,
        env = "SCOPEHOLD_STATE_DIR",
        default_value = "/var/lib/scopehold-csi"
    )]
    state_dir: PathBuf,
    /// Private directory for short-lived writable views of the volumes.
    #[arg(
        long,
        env = "SCOPEHOLD_SCRATCH_DIR",
        default_value = "/run/scopehold-csi"
    )]
    scratch_dir: PathBuf,
    /// Size limit of each volume's tmpfs (Ki, Mi, Gi, k, M, G or bytes).
    #[arg(long, env = "SCOPEHOLD_TMPFS_SIZE", default_value = "1Mi", value_parser = scopehold::csi::grpc::server::parse_size)]
    tmpfs_size: u64,
    /// Serve Prometheus /metrics (and /healthz) on this address, e.g. 0.0.0.0:9809.
    #[arg(long, env = "SCOPEHOLD_NODE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Register with kubelet: serve its plugin registration service on a
    /// socket in this directory (kubelet's `<root>/plugins_registry`).
    #[arg(long, env = "SCOPEHOLD_REGISTRATION_DIR")]
    registration_dir: Option<PathBuf>,
    /// The CSI socket's path as kubelet sees it (told to kubelet at
    /// registration). Default: `<kubelet-dir>/plugins/csi.scopehold.dev/csi.sock`.
    #[arg(long, env = "SCOPEHOLD_KUBELET_CSI_ENDPOINT")]
    kubelet_csi_endpoint: Option<PathBuf>,
    /// Serve /healthz (liveness) and /readyz (registered with kubelet and
    /// custody reachable) on this address.
    #[arg(long, env = "SCOPEHOLD_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Log format on stdout.
    #[arg(long, env = "SCOPEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(flatten)]
    runtime: NodeRuntimeArgs,
}

/// Threads of the node plugin. It runs on every node and mostly waits (on
/// kubelet, custody and the kernel's mount calls): tokio's defaults, one
/// worker per core and up to 512 threads for blocking work (each with its
/// own malloc arena), cost memory on every node and buy nothing.
#[derive(clap::Args)]
struct NodeRuntimeArgs {
    /// Async worker threads.
    #[arg(long, env = "SCOPEHOLD_WORKER_THREADS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,
    /// Most threads doing blocking file-system and mount work at once (more
    /// wait their turn).
    #[arg(long, env = "SCOPEHOLD_BLOCKING_THREADS", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    blocking_threads: u16,
}

impl NodeRuntimeArgs {
    fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(self.worker_threads))
            .max_blocking_threads(usize::from(self.blocking_threads))
            .enable_all()
            .build()
    }
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Where the agent's HTTPS_PROXY/HTTP_PROXY point (loopback).
    #[arg(
        long,
        env = "SCOPEHOLD_PROXY_LISTEN",
        default_value = "127.0.0.1:15001"
    )]
    listen: SocketAddr,
    /// The sidecar's own CSI volume with the real values.
    #[arg(
        long,
        env = "SCOPEHOLD_PROXY_VALUES_DIR",
        default_value = "/var/run/scopehold/values"
    )]
    values_dir: PathBuf,
    /// The volume shared with the agent: placeholders and the CA certificate.
    #[arg(
        long,
        env = "SCOPEHOLD_PROXY_AGENT_DIR",
        default_value = "/var/run/scopehold/agent"
    )]
    agent_dir: PathBuf,
    /// The proxy rules (JSON), as `kubectl scopehold inject` or the webhook
    /// rendered them from the agent's grants.
    #[arg(long, env = "SCOPEHOLD_PROXY_RULES")]
    rules: String,
    /// This pod's name, for audit lines.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod: String,
    /// Extra PEM CA bundles trusted for upstream TLS (private APIs, tests).
    #[arg(long, env = "SCOPEHOLD_PROXY_UPSTREAM_CA", value_delimiter = ',')]
    upstream_ca: Vec<PathBuf>,
    /// Extra CAs trusted for upstream TLS as PEM text (the webhook sets it
    /// from the controller's --proxy-upstream-ca-file).
    #[arg(
        long,
        env = "SCOPEHOLD_PROXY_UPSTREAM_CA_PEM",
        allow_hyphen_values = true
    )]
    upstream_ca_pem: Option<String>,
    /// How often (ms) the values volume is checked for rotation/revocation.
    #[arg(long, env = "SCOPEHOLD_PROXY_POLL_MS", default_value_t = 100)]
    poll_ms: u64,
    /// Report uses to this https:// URL (the controller's /usage); without
    /// it, uses are only in the audit lines.
    #[arg(long, env = "SCOPEHOLD_PROXY_USAGE_URL")]
    usage_url: Option<http::Uri>,
    /// PEM of the CA of the usage URL's certificate (the custody CA).
    #[arg(long, env = "SCOPEHOLD_PROXY_USAGE_CA", allow_hyphen_values = true)]
    usage_ca: Option<String>,
    /// The sidecar's bound ServiceAccount token (audience scopehold.dev).
    #[arg(
        long,
        env = "SCOPEHOLD_PROXY_TOKEN_FILE",
        default_value = "/var/run/secrets/scopehold.dev/proxy/token"
    )]
    token_file: PathBuf,
    /// How often (ms) uses are reported.
    #[arg(long, env = "SCOPEHOLD_PROXY_REPORT_MS", default_value_t = 5000)]
    report_ms: u64,
    /// Log format on stdout.
    #[arg(long, env = "SCOPEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("proxy: {0}")]
    Proxy(#[from] scopehold::proxy::ProxyError),
    #[error("proxy at {addr} not ready: {source}")]
    NotReady {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--proxy-upstream-ca-file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("proxy: --usage-url and --usage-ca go together")]
    UsageFlags,
    #[error("proxy rules: {0}")]
    ProxyRules(#[from] scopehold::proxy::rules::RulesError),
    #[error("node plugin: {0}")]
    Node(#[from] scopehold::csi::grpc::server::NodePluginError),
    #[error("leader election: {0}")]
    Lease(#[source] scopehold::controller::leader::LeaseError),
    #[error("content-digest key: {0}")]
    DigestKey(#[source] scopehold::custody::digest_key::DigestKeyError),
    #[error("custody TLS: {0}")]
    Tls(#[source] scopehold::custody::tls::TlsError),
    #[error(transparent)]
    Webhook(#[from] scopehold::webhook::WebhookError),
    #[error("connecting to Kubernetes: {0}")]
    Client(#[source] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("rendering CRDs: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match &cli.command {
        Command::Node(args) => args.runtime.runtime(),
        _ => tokio::runtime::Runtime::new(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("scopehold: starting the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Controller(args) => run_controller(*args).await,
        Command::Node(args) => run_node(*args).await,
        Command::Proxy(args) => run_proxy(*args).await,
        Command::ProxyReady { addr } => tokio::net::TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|source| CliError::NotReady { addr, source }),
        Command::Crdgen { out_dir } => crdgen(out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("scopehold: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run_controller(args: ControllerArgs) -> Result<(), CliError> {
    telemetry::init(args.log_format);
    let client = kube::Client::try_default()
        .await
        .map_err(CliError::Client)?;
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let custody_parts = args.custody_listen.map(|_| {
        let events = EventSink::new(
            client.clone(),
            Reporter {
                controller: "scopehold-custody".into(),
                instance: args.instance.clone(),
            },
        );
        events.register(&mut registry);
        (events, CustodyMetrics::register(&mut registry))
    });
    // Transitions (GrantActivated, ...) are written by their own flusher, so a
    // reconcile never waits on an Event; `scopehold_controller_event_*`.
    let controller_events = controller::event_sink(client.clone(), args.instance.clone());
    controller_events.register_as(&mut registry, "scopehold_controller_event");
    tokio::spawn(
        controller_events
            .clone()
            .run(std::time::Duration::from_millis(
                args.custody.event_flush_ms.max(50),
            )),
    );
    let health = Arc::new(controller::WatchHealth::register(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    let listener = bind_tcp(args.metrics_listen, args.listen_reuse_port).map_err(|source| {
        CliError::Listen {
            addr: args.metrics_listen,
            source,
        }
    })?;
    let bound = listener.local_addr().unwrap_or(args.metrics_listen);
    tracing::info!(metrics_addr = %bound, namespace = args.watch_namespace.as_deref(), "controller starting");
    let router = controller::http::router(Arc::new(registry), ready.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    let settings = Settings {
        namespace: args.watch_namespace,
        instance: args.instance.clone(),
        concurrency: args.concurrency,
        volume_size_limit_bytes: args.volume_size_limit,
    };
    // Every replica computes digests under the one shared key: statuses,
    // Events, audit lines and the node plugins' checks agree.
    let digest_key = digest_key::ensure(
        &client,
        &args.custody.custody_tls_namespace,
        &args.custody.digest_key_secret,
    )
    .await
    .map_err(CliError::DigestKey)?;
    tracing::info!(
        secret = %args.custody.digest_key_secret,
        digestKeyID = digest_key.id(),
        "content digests are keyed"
    );
    let (caches, writers) = scopehold::caches::new(digest_key);
    let sidecar = sidecar_settings(&args.webhook, &args.custody, &client).await?;
    let mut flush_on_exit = None;
    if let (Some(addr), Some((events, custody_metrics))) = (args.custody_listen, custody_parts) {
        let resolutions = serve_custody(
            Listen {
                addr,
                reuse_port: args.listen_reuse_port,
            },
            &args.custody,
            client.clone(),
            caches.clone(),
            events.clone(),
            custody_metrics,
            sidecar.clone(),
        )
        .await?;
        flush_on_exit = Some((events, resolutions));
    }
    if let Some(addr) = args.webhook.webhook_listen {
        serve_webhook(
            Listen {
                addr,
                reuse_port: args.listen_reuse_port,
            },
            &args.webhook,
            &args.custody,
            client.clone(),
            caches.clone(),
            args.instance.clone(),
            sidecar,
        )
        .await?;
    }
    let leadership = if args.lease.leader_election {
        let identity = args
            .instance
            .clone()
            .unwrap_or_else(|| format!("scopehold-{}", std::process::id()));
        let lease = LeaseSettings {
            name: args.lease.lease_name.clone(),
            namespace: args.lease.lease_namespace.clone(),
            identity,
            duration_seconds: args.lease.lease_duration_seconds.max(2),
            grace_seconds: (args.lease.lease_duration_seconds / 3).max(1),
        };
        tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "leader election on");
        Leadership::elect(client.clone(), &lease)
            .await
            .map_err(CliError::Lease)?
    } else {
        Leadership::always()
    };
    let mut leading = leadership.is_leader.clone();
    tokio::spawn(async move {
        while leading.changed().await.is_ok() {
            let now = *leading.borrow();
            tracing::info!(
                leader = now,
                "{}",
                if now {
                    "became the leader"
                } else {
                    "lost leadership"
                }
            );
        }
    });
    controller::run(
        client.clone(),
        settings,
        metrics,
        controller_events.clone(),
        caches.clone(),
        writers,
        ready,
        leadership.is_leader.clone(),
        health,
    )
    .await;
    // Nothing recorded is lost on shutdown: pending Event series and
    // resolution counts are written, bounded by a deadline.
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_secs(args.custody.shutdown_flush_seconds);
    let written = controller_events.close(deadline).await;
    tracing::info!(
        events_created = written.created,
        events_patched = written.patched,
        events_left = written.left,
        "flushed the controller's Events"
    );
    if let Some((events, resolutions)) = flush_on_exit {
        let written = events.close(deadline).await;
        let statuses = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            resolutions.flush(&client, &caches),
        )
        .await
        .unwrap_or(0);
        tracing::info!(
            events_created = written.created,
            events_patched = written.patched,
            events_left = written.left,
            status_writes = statuses,
            "flushed Events and resolution statuses"
        );
    }
    leadership.release().await;
    tracing::info!("controller stopped");
    Ok(())
}

/// A listening TCP socket, optionally with SO_REUSEPORT (`--listen-reuse-port`).
fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds the custody listener and serves it in the background; returns the
/// resolution log, for the final flush.
/// Where a server listens; `reuse_port` lets the replicas on one host
/// network share the port.
struct Listen {
    addr: SocketAddr,
    reuse_port: bool,
}

async fn serve_custody(
    listen: Listen,
    args: &CustodyArgs,
    client: kube::Client,
    caches: scopehold::caches::Caches,
    events: EventSink,
    metrics: Arc<CustodyMetrics>,
    sidecar: scopehold::proxy::pod::SidecarSettings,
) -> Result<Arc<ResolutionLog>, CliError> {
    let tls = if args.custody_plaintext {
        tracing::warn!("custody serves plaintext (--custody-plaintext): development only");
        None
    } else {
        let settings = custody_tls_settings(args);
        let material = tls::ensure(&client, &settings)
            .await
            .map_err(CliError::Tls)?;
        Some(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(material.cert_pem, material.key_pem),
        ))
    };
    let listener = bind_tcp(listen.addr, listen.reuse_port).map_err(|source| CliError::Listen {
        addr: listen.addr,
        source,
    })?;
    let bound = listener.local_addr().unwrap_or(listen.addr);
    tracing::info!(custody_addr = %bound, tls = tls.is_some(), "custody serving");
    let resolutions = Arc::new(ResolutionLog::default());
    let flush_every = std::time::Duration::from_millis(args.status_flush_ms.max(100));
    {
        let (resolutions, client, caches) = (resolutions.clone(), client.clone(), caches.clone());
        tokio::spawn(async move { resolutions.run(client, caches, flush_every).await });
    }
    {
        let events = events.clone();
        let every = std::time::Duration::from_millis(args.event_flush_ms.max(50));
        tokio::spawn(events.run(every));
    }
    let service = CustodyService::new(
        client,
        caches,
        events,
        args.node_service_account.clone(),
        resolutions.clone(),
        metrics,
    )
    .with_decision_timeout(std::time::Duration::from_millis(
        args.custody_decision_timeout_ms.max(100),
    ))
    .with_sidecar(sidecar);
    // TCP_NODELAY: without it Nagle's algorithm held ~1.4% of Resolve replies
    // for ~40 ms (BENCHMARKS.md, NodePublishVolume end to end).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        // Keepalives find dead node-plugin streams (a node that vanished).
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(error) => {
                    tracing::error!(%error, "custody TLS configuration rejected");
                    return;
                }
            };
        }
        let result = builder
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .add_service(CustodyServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "custody server stopped");
        }
    });
    Ok(resolutions)
}

/// Where custody's TLS material lives and the names it covers (the webhook
/// serves with the same certificate).
fn custody_tls_settings(args: &CustodyArgs) -> TlsSettings {
    let (svc, ns) = (&args.custody_service_name, &args.custody_tls_namespace);
    let mut sans = vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ];
    sans.extend(args.custody_tls_san.iter().cloned());
    TlsSettings {
        namespace: ns.clone(),
        secret_name: args.custody_tls_secret.clone(),
        configmap_name: args.custody_ca_configmap.clone(),
        subject_alt_names: sans,
    }
}

/// How the proxy sidecar is rendered: by the webhook, and by custody when it
/// checks a pod's sidecar before handing out proxy grants.
async fn sidecar_settings(
    webhook: &WebhookArgs,
    custody: &CustodyArgs,
    client: &kube::Client,
) -> Result<scopehold::proxy::pod::SidecarSettings, CliError> {
    let upstream_ca_pem = webhook
        .proxy_upstream_ca_file
        .as_ref()
        .map(|path| read_ca_file(path))
        .transpose()?;
    let usage = match &webhook.proxy_usage_url {
        Some(url) if !custody.custody_plaintext => {
            let material = tls::ensure(client, &custody_tls_settings(custody))
                .await
                .map_err(CliError::Tls)?;
            Some(scopehold::proxy::pod::UsageTarget {
                url: url.clone(),
                ca_pem: material.ca_pem,
            })
        }
        _ => None,
    };
    Ok(scopehold::proxy::pod::SidecarSettings {
        image: webhook.proxy_image.clone(),
        port: webhook.proxy_port,
        usage,
        upstream_ca_pem,
    })
}

/// A PEM CA bundle, checked to hold certificates (a bad file stops the
/// start, not every injected sidecar later).
fn read_ca_file(path: &std::path::Path) -> Result<String, CliError> {
    let fail = |message: String| CliError::CaFile {
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    scopehold::proxy::ca_certificates(&pem).map_err(|e| fail(e.to_string()))?;
    Ok(pem)
}

/// Binds the admission webhook and serves it in the background; keeps the
/// webhook configuration's CA bundle current when one is named.
async fn serve_webhook(
    listen: Listen,
    args: &WebhookArgs,
    custody: &CustodyArgs,
    client: kube::Client,
    caches: scopehold::caches::Caches,
    instance: Option<String>,
    sidecar: scopehold::proxy::pod::SidecarSettings,
) -> Result<(), CliError> {
    let material = tls::ensure(&client, &custody_tls_settings(custody))
        .await
        .map_err(CliError::Tls)?;
    let config = scopehold::webhook::tls_config(&material.cert_pem, &material.key_pem)?;
    let listener = bind_tcp(listen.addr, listen.reuse_port).map_err(|source| CliError::Listen {
        addr: listen.addr,
        source,
    })?;
    let bound = listener.local_addr().unwrap_or(listen.addr);
    tracing::info!(webhook_addr = %bound, "admission webhook serving");
    if let Some(name) = args.webhook_configuration.clone() {
        tokio::spawn(scopehold::webhook::ca_bundle::keep(
            client.clone(),
            name,
            material.ca_pem.clone(),
            std::time::Duration::from_secs(30),
        ));
    }
    // Usage reports: counted into statuses in batches, one Event series
    // per grant.
    let log = Arc::new(scopehold::usage::log::UsageLog::default());
    {
        let (log, client) = (log.clone(), client.clone());
        let every = std::time::Duration::from_millis(custody.status_flush_ms.max(100));
        tokio::spawn(async move { log.run(client, every).await });
    }
    let events = EventSink::new(
        client.clone(),
        Reporter {
            controller: "scopehold-usage".into(),
            instance: instance.clone(),
        },
    );
    tokio::spawn(events.clone().run(std::time::Duration::from_millis(
        custody.event_flush_ms.max(50),
    )));
    let intake = scopehold::usage::intake::Intake {
        client: client.clone(),
        caches: caches.clone(),
        log,
        events: Some(events),
    };
    let webhook = Arc::new(scopehold::webhook::Webhook {
        caches,
        sidecar,
        usage: Some(Arc::new(intake)),
    });
    tokio::spawn(async move {
        if let Err(error) = scopehold::webhook::serve(listener, config, webhook).await {
            tracing::error!(%error, "admission webhook stopped");
        }
    });
    Ok(())
}

async fn run_node(args: NodeArgs) -> Result<(), CliError> {
    use scopehold::csi::{
        converge::resolver::CustodyClientConfig,
        grpc::{identity::DRIVER_NAME, registration::RegistrationSettings, server},
    };
    telemetry::init(args.log_format);
    let registration = args
        .registration_dir
        .map(|registry_dir| RegistrationSettings {
            registry_dir,
            csi_socket_for_kubelet: args.kubelet_csi_endpoint.clone().unwrap_or_else(|| {
                args.kubelet_dir
                    .join("plugins")
                    .join(DRIVER_NAME)
                    .join("csi.sock")
            }),
        });
    let settings = server::NodePluginSettings {
        endpoint: args.endpoint,
        node_name: args.node_name,
        custody: CustodyClientConfig {
            endpoint: args.custody_endpoint,
            plaintext: args.custody_plaintext,
            ca_file: args.custody_ca_file,
            token_file: args.token_file,
        },
        kubelet_dir: args.kubelet_dir,
        state_dir: args.state_dir,
        scratch_dir: args.scratch_dir,
        tmpfs_size_bytes: args.tmpfs_size,
        metrics_listen: args.metrics_listen,
        registration,
        health_listen: args.health_listen,
    };
    Ok(server::run(settings, server::shutdown_signal()).await?)
}

async fn run_proxy(args: ProxyArgs) -> Result<(), CliError> {
    telemetry::init(args.log_format);
    let rules = scopehold::proxy::ProxyRules::parse(&args.rules)?;
    let settings = scopehold::proxy::ProxySettings {
        listen: args.listen,
        values_dir: args.values_dir,
        agent_dir: args.agent_dir,
        rules,
        pod: args.pod,
        upstream_ca_files: args.upstream_ca,
        upstream_ca_pem: args.upstream_ca_pem,
        poll: std::time::Duration::from_millis(args.poll_ms.clamp(10, 5000)),
        report: match (args.usage_url, args.usage_ca) {
            (Some(url), Some(ca_pem)) => Some(scopehold::proxy::report::ReportSettings {
                url,
                ca_pem,
                token_file: args.token_file,
                every: std::time::Duration::from_millis(args.report_ms.clamp(100, 600_000)),
            }),
            (None, None) => None,
            _ => return Err(CliError::UsageFlags),
        },
    };
    let (_, serving) = scopehold::proxy::start(settings).await?;
    tokio::select! {
        result = serving => result?,
        _ = scopehold::csi::grpc::server::shutdown_signal() => tracing::info!("proxy stopping"),
    }
    Ok(())
}

fn crdgen(out_dir: Option<PathBuf>) -> Result<(), CliError> {
    let documents = scopehold::crdgen::documents()?;
    match out_dir {
        None => {
            for (_, yaml) in documents {
                print!("---\n{yaml}");
            }
        }
        Some(dir) => {
            for (file, yaml) in documents {
                let path = dir.join(file);
                std::fs::write(&path, yaml).map_err(|source| CliError::Write { path, source })?;
            }
        }
    }
    Ok(())
}

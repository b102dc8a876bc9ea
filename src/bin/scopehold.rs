//! `scopehold`: the controller (with the custody service), the CSI node
//! plugin and the CRD generator, as subcommands of one binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use scopehold::controller::{self, Metrics, Settings};
use scopehold::secrets::SecretCache;
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
    Controller(ControllerArgs),
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
}

#[derive(Debug, thiserror::Error)]
enum CliError {
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Controller(args) => run_controller(args).await,
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
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|source| CliError::Listen {
            addr: args.metrics_listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(args.metrics_listen);
    tracing::info!(metrics_addr = %bound, namespace = args.watch_namespace.as_deref(), "controller starting");
    let router = controller::http::router(Arc::new(registry), ready.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    let settings = Settings {
        namespace: args.watch_namespace,
        instance: args.instance,
    };
    controller::run(
        client,
        settings,
        metrics,
        Arc::new(SecretCache::default()),
        ready,
    )
    .await;
    tracing::info!("controller stopped");
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

//! Wiring of the node plugin: the unix socket, the custody client, the
//! Identity and Node services, and graceful shutdown. `scopehold node` only
//! parses flags into [`NodePluginSettings`] and calls [`run`].

use std::fs;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::net::SocketAddr;

use tokio::net::UnixListener;

use super::controller::ControllerCapabilitiesServer;
use super::health::HealthState;
use super::identity::{DRIVER_NAME, IdentityService};
use super::metrics::{Metered, NodeMetrics};
use super::registration::{RegistrationError, RegistrationSettings, RegistrationState};
use crate::csi::converge::push::PushState;
use crate::csi::converge::reports::ReportSink;
use crate::csi::converge::resolver::Resolver;
use crate::csi::converge::resolver::{CustodyClientConfig, CustodyClientError, CustodyResolver};
use crate::csi::converge::{NodeConfig, NodeService, new_request_id};
use crate::csi::volume::mounter::{MountState, Mounter};
use crate::csi::volume::registry::{Registry, RegistryError};
use crate::csi::volume::table::TokenUpdate;
use crate::csi::volume::target_path::{TargetPathError, TargetPathPolicy};
use crate::proto::csi::v1::identity_server::IdentityServer;
use crate::proto::csi::v1::node_server::NodeServer;

/// Smallest and largest accepted `--tmpfs-size`.
pub const MIN_TMPFS_BYTES: u64 = 64 * 1024;
pub const MAX_TMPFS_BYTES: u64 = 1024 * 1024 * 1024;
/// Longest path a unix socket address holds (`sun_path` is 108 bytes with
/// the terminating NUL). Kubelet connects by path, so a longer one is useless.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;
/// Longest node name (the CSI limit for `node_id`).
const MAX_NODE_NAME_BYTES: usize = 256;

/// Everything `scopehold node` needs.
#[derive(Debug, Clone)]
pub struct NodePluginSettings {
    /// `unix:///path/csi.sock` (or a plain absolute path).
    pub endpoint: String,
    pub node_name: String,
    pub custody: CustodyClientConfig,
    /// Kubelet's root directory; every target path must be below it.
    pub kubelet_dir: PathBuf,
    /// The registry of published volumes.
    pub state_dir: PathBuf,
    /// Private directory for the short-lived writable views.
    pub scratch_dir: PathBuf,
    pub tmpfs_size_bytes: u64,
    /// Serve Prometheus `/metrics` on this address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Register with kubelet through its plugin registration directory.
    pub registration: Option<RegistrationSettings>,
    /// Serve `/healthz` and `/readyz` here.
    pub health_listen: Option<SocketAddr>,
}

/// Why the node plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodePluginError {
    #[error("invalid --endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("listening for metrics on {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--node-name must be 1 to {MAX_NODE_NAME_BYTES} bytes long")]
    InvalidNodeName,
    #[error("--tmpfs-size must be between {MIN_TMPFS_BYTES} and {MAX_TMPFS_BYTES} bytes")]
    InvalidTmpfsSize,
    #[error("invalid --kubelet-dir {}", path.display())]
    KubeletDir {
        path: PathBuf,
        #[source]
        source: TargetPathError,
    },
    #[error("configuring the custody client")]
    Custody(#[from] CustodyClientError),
    #[error("opening the registry")]
    Registry(#[from] RegistryError),
    #[error("listening on {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: SocketError,
    },
    #[error("serving CSI")]
    Serve(#[source] tonic::transport::Error),
    #[error("registering with kubelet")]
    Registration(#[from] RegistrationError),
    #[error("serving the health endpoint on {addr}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Why the CSI socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("the path exists and is not a socket; refusing to replace it")]
    NotASocket,
    #[error("failed to {op}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn socket_io(op: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Io { op, source }
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, NodePluginError> {
    let invalid = |reason| NodePluginError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(invalid("expected unix:///absolute/path"));
    }
    if path.ends_with('/') {
        return Err(invalid("the socket path names a directory"));
    }
    if path.len() > MAX_SOCKET_PATH_BYTES {
        return Err(invalid(
            "the socket path is longer than the 107 bytes a unix socket address holds",
        ));
    }
    Ok(PathBuf::from(path))
}

/// Creates the listening socket at `path` with mode 0600. A stale socket is
/// removed first; anything else at the path is refused. The socket is bound
/// in a private (0700) directory beside the final path and renamed into
/// place, so it is never reachable with looser permissions. The bind goes
/// through `/proc/self/fd/N/s` (N: the private directory, held open) so the
/// staging path is short however deep the final path is: binding at
/// `<parent>/.shXXXXXXXX/s` would overflow `sun_path` for final paths that fit.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            fs::remove_file(path).map_err(socket_io("remove the stale socket"))?;
        }
        Ok(_) => return Err(SocketError::NotASocket),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(socket_io("inspect the socket path")(error)),
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(parent)
        .map_err(socket_io("create the socket directory"))?;
    let private_dir = parent.join(format!(".sh{}", &new_request_id()[..8]));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .map_err(socket_io("create a private directory for the socket"))?;
    let result = (|| {
        let staged = private_dir.join("s");
        let private_dir_handle =
            fs::File::open(&private_dir).map_err(socket_io("open the private directory"))?;
        let short_staged = format!("/proc/self/fd/{}/s", private_dir_handle.as_raw_fd());
        let listener = std::os::unix::net::UnixListener::bind(&short_staged)
            .map_err(socket_io("bind the socket"))?;
        drop(private_dir_handle);
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))
            .map_err(socket_io("set the socket's mode"))?;
        fs::rename(&staged, path).map_err(socket_io("move the socket into place"))?;
        listener
            .set_nonblocking(true)
            .map_err(socket_io("configure the socket"))?;
        UnixListener::from_std(listener).map_err(socket_io("register the socket"))
    })();
    let _ = fs::remove_dir_all(&private_dir);
    result
}

/// Parses a size such as `1Mi`, `512Ki`, `2M` or `1048576` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1Mi, 512Ki or 1048576"))?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size suffix {suffix:?} (use Ki, Mi, Gi, k, M or G)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Registers the node plugin's metrics and serves `/metrics` on `addr`.
async fn serve_metrics<R: crate::csi::converge::resolver::Resolver>(
    addr: std::net::SocketAddr,
    node: &NodeService<R>,
    push_state: &Arc<PushState>,
    state_dir: &Path,
) -> Result<NodeMetrics, NodePluginError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let volumes = node.clone();
    let floors = node.clone();
    let metrics = NodeMetrics::register(
        &mut registry,
        push_state.clone(),
        state_dir.to_owned(),
        move || volumes.volumes().len(),
        move || floors.stale_answers(),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodePluginError::MetricsListen { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(metrics_addr = %bound, "node plugin metrics serving");
    let router = crate::telemetry::metrics_router(Arc::new(registry));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "node plugin metrics server stopped");
        }
    });
    Ok(metrics)
}

/// Runs the node plugin until `shutdown` resolves, then removes the socket.
pub async fn run(
    settings: NodePluginSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodePluginError> {
    if settings.node_name.is_empty() || settings.node_name.len() > MAX_NODE_NAME_BYTES {
        return Err(NodePluginError::InvalidNodeName);
    }
    if !(MIN_TMPFS_BYTES..=MAX_TMPFS_BYTES).contains(&settings.tmpfs_size_bytes) {
        return Err(NodePluginError::InvalidTmpfsSize);
    }
    let socket = socket_path(&settings.endpoint)?;
    let target_paths =
        TargetPathPolicy::kubelet(&settings.kubelet_dir.to_string_lossy()).map_err(|source| {
            NodePluginError::KubeletDir {
                path: settings.kubelet_dir.clone(),
                source,
            }
        })?;
    let resolver = Arc::new(CustodyResolver::new(&settings.custody)?);
    let registry = Registry::open(&settings.state_dir)?;
    let loaded = registry.load_all()?;
    for problem in &loaded.problems {
        tracing::warn!(error = %problem, "skipping an unreadable registry entry");
    }
    let mounter = Mounter::new(&settings.scratch_dir);
    let (reports, report_queue) = ReportSink::channel();

    let node = NodeService::new(
        NodeConfig {
            node_name: settings.node_name.clone(),
            target_paths,
            tmpfs_size_bytes: settings.tmpfs_size_bytes,
        },
        resolver.clone(),
        mounter.clone(),
        registry,
    )
    .with_reports(reports);
    // Enforcement resumes where it stopped: the volumes that are still
    // mounted are tracked again (without tokens until their next republish;
    // the stream's first RESYNC checks their grants with GrantStates), and
    // their expiries are timed again.
    let mut tracked = 0_usize;
    for volume in loaded.volumes {
        // The first probe of each target scans mountinfo and teaches the
        // mounter the mount, so later publishes and unpublishes need no scan.
        match mounter.probe(&volume.target_path) {
            Ok(MountState::Ours) => {
                node.volumes().upsert(volume, TokenUpdate::Clear);
                tracked += 1;
            }
            Ok(_) => tracing::info!(
                volume_id = %volume.volume_id,
                target_path = %volume.target_path.display(),
                "registry entry without a mount (the node restarted?); kubelet republishes or unpublishes it"
            ),
            Err(error) => tracing::warn!(
                volume_id = %volume.volume_id,
                error = %error,
                "cannot check the mount of a registry entry; not tracking it"
            ),
        }
    }
    tracing::info!(
        volumes = tracked,
        state_dir = %settings.state_dir.display(),
        "registry loaded"
    );
    let push_state = Arc::new(PushState::default());
    let metrics = match settings.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, &node, &push_state, &settings.state_dir).await?),
        None => None,
    };
    let push = tokio::spawn(crate::csi::converge::push::run(
        node.clone(),
        push_state.clone(),
    ));
    let expiry = tokio::spawn(crate::csi::converge::expiry::run(node.clone()));
    let reporter = tokio::spawn(crate::csi::converge::reports::run(
        resolver.clone(),
        report_queue,
    ));
    let registration_state = settings
        .registration
        .as_ref()
        .map(|_| RegistrationState::default());
    if let Some(addr) = settings.health_listen {
        let (resolver, push_state) = (resolver.clone(), push_state.clone());
        let health = HealthState {
            registration: registration_state.clone(),
            // CSI Probe's answer: an open invalidation stream, else a dial.
            custody: Arc::new(move || {
                let (resolver, push_state) = (resolver.clone(), push_state.clone());
                Box::pin(async move { push_state.connected() || resolver.probe().await })
            }),
        };
        let bound = super::health::spawn(addr, health)
            .await
            .map_err(|source| NodePluginError::Health { addr, source })?;
        tracing::info!(health_addr = %bound, "health endpoint serving /healthz and /readyz");
    }
    let identity = IdentityService::new(resolver).with_push_state(push_state);

    let listener = bind_socket(&socket).map_err(|source| NodePluginError::Socket {
        path: socket.clone(),
        source,
    })?;
    tracing::info!(
        driver = DRIVER_NAME,
        version = env!("CARGO_PKG_VERSION"),
        endpoint = %socket.display(),
        node = %settings.node_name,
        custody = %settings.custody.endpoint,
        kubelet_dir = %settings.kubelet_dir.display(),
        tmpfs_size_bytes = settings.tmpfs_size_bytes,
        "CSI node plugin serving"
    );
    // One shutdown signal for both servers: the CSI socket and the
    // registration socket go away together.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let registration = match (settings.registration, registration_state) {
        (Some(registration), Some(state)) => {
            let mut stopped = stopped.clone();
            Some(tokio::spawn(async move {
                super::registration::serve(&registration, state, async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await
            }))
        }
        _ => None,
    };
    let csi_shutdown = {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let served = {
        let server = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .add_service(NodeServer::new(Metered::new(node, metrics)))
            // Conformance tooling only; no CONTROLLER_SERVICE is advertised.
            .add_service(ControllerCapabilitiesServer)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                csi_shutdown,
            );
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => result,
            () = shutdown => {
                let _ = stop.send(true);
                server.await
            }
        }
    };
    let _ = stop.send(true);
    if let Some(registration) = registration {
        match registration.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(error = %error, "plugin registration stopped with an error")
            }
            Err(error) => tracing::error!(error = %error, "plugin registration task failed"),
        }
    }
    push.abort();
    expiry.abort();
    reporter.abort();
    if let Err(error) = fs::remove_file(&socket)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(error = %error, "could not remove the socket");
    }
    tracing::info!("CSI node plugin stopped");
    served.map_err(NodePluginError::Serve)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1Mi"), Ok(1 << 20));
        assert_eq!(parse_size("512Ki"), Ok(512 << 10));
        assert_eq!(parse_size("2M"), Ok(2_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "Mi",
            "1.5Mi",
            "1MB",
            "-1",
            "99999999999999999999",
            "18446744073709551615Gi",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            socket_path("/csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        for bad in [
            "unix://relative.sock",
            "tcp://127.0.0.1:1",
            "unix:///csi/",
            "",
            format!("unix:///{}", "s".repeat(MAX_SOCKET_PATH_BYTES)).as_str(),
        ] {
            assert!(socket_path(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn socket_is_private_replaces_stale_sockets_and_refuses_files() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("plugin").join("csi.sock");
        let first = bind_socket(&path)?;
        let metadata = fs::symlink_metadata(&path)?;
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.mode() & 0o777, 0o600);
        // Only the socket is left in the directory (no staging leftovers).
        assert_eq!(fs::read_dir(path.parent().ok_or("no parent")?)?.count(), 1);
        // A client can connect to it.
        let connected = tokio::net::UnixStream::connect(&path).await;
        assert!(connected.is_ok());
        drop(first);

        // A stale socket (its listener is gone) is replaced.
        let _second = bind_socket(&path)?;
        assert!(fs::symlink_metadata(&path)?.file_type().is_socket());

        // A final path of the longest length a socket address holds works
        // (the staging path must not be longer than it).
        let base = dir.path().join("d");
        let room = MAX_SOCKET_PATH_BYTES - base.as_os_str().len() - 1;
        let longest = base.join("s".repeat(room));
        assert_eq!(longest.as_os_str().len(), MAX_SOCKET_PATH_BYTES);
        let _longest = bind_socket(&longest)?;
        assert!(tokio::net::UnixStream::connect(&longest).await.is_ok());
        assert_eq!(fs::read_dir(&base)?.count(), 1);

        let file = dir.path().join("not-a-socket");
        fs::write(&file, b"keep me")?;
        assert!(matches!(bind_socket(&file), Err(SocketError::NotASocket)));
        assert_eq!(fs::read(&file)?, b"keep me");
        Ok(())
    }
}

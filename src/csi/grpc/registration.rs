//! Registration with kubelet, without the node-driver-registrar sidecar.
//!
//! Kubelet watches `<kubelet dir>/plugins_registry/` for unix sockets that
//! serve `pluginregistration.Registration` (proto vendored from
//! `k8s.io/kubelet`). For each new socket it calls `GetInfo` (we answer: a
//! `CSIPlugin` named [`DRIVER_NAME`], the CSI socket's path *as kubelet sees
//! it*, CSI 1.0.0), then calls NodeGetInfo on that CSI socket, records the
//! driver in the node's CSINode object, and reports the outcome through
//! `NotifyRegistrationStatus`. That outcome is logged and kept in
//! [`RegistrationState`] for the readiness endpoint. Removing the socket
//! (shutdown) makes kubelet deregister the driver; a restarted plugin binds a
//! new socket and kubelet registers it again. Kubelet's client sends the
//! socket path as `:authority`, which tonic refuses; [`super::authority`]
//! rewrites it on the way in.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::authority::pump_client_to_server;
use super::identity::DRIVER_NAME;
use super::server::{SocketError, bind_socket};
use crate::proto::pluginregistration as pr;
use crate::proto::pluginregistration::registration_server::{Registration, RegistrationServer};

/// The plugin type kubelet's CSI plugin handler accepts.
const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// CSI spec versions the plugin speaks (kubelet requires a 1.x).
const SUPPORTED_CSI_VERSIONS: [&str; 1] = ["1.0.0"];

/// Where to register and what to tell kubelet.
#[derive(Debug, Clone)]
pub struct RegistrationSettings {
    /// Kubelet's plugin registration directory (`<kubelet dir>/plugins_registry`).
    pub registry_dir: PathBuf,
    /// The CSI socket's path in the host's (kubelet's) view, e.g.
    /// `/var/lib/kubelet/plugins/csi.scopehold.dev/csi.sock`.
    pub csi_socket_for_kubelet: PathBuf,
}

impl RegistrationSettings {
    /// The registration socket: `<registry dir>/csi.scopehold.dev-reg.sock`
    /// (the name node-driver-registrar uses, so a switch between the two
    /// leaves no second registration behind).
    pub fn socket_path(&self) -> PathBuf {
        self.registry_dir.join(format!("{DRIVER_NAME}-reg.sock"))
    }
}

/// What kubelet last said about the registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// Kubelet has not reported yet.
    Pending,
    /// Kubelet registered the driver.
    Registered,
    /// Kubelet refused the registration, with its reason.
    Failed(String),
}

/// Shared view of [`RegistrationStatus`] (for readiness).
#[derive(Debug, Clone)]
pub struct RegistrationState {
    status: Arc<watch::Sender<RegistrationStatus>>,
}

impl Default for RegistrationState {
    fn default() -> Self {
        Self {
            status: Arc::new(watch::Sender::new(RegistrationStatus::Pending)),
        }
    }
}

impl RegistrationState {
    pub fn status(&self) -> RegistrationStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.subscribe()
    }

    fn set(&self, status: RegistrationStatus) {
        self.status.send_replace(status);
    }

    #[cfg(test)]
    pub(crate) fn set_for_test(&self, status: RegistrationStatus) {
        self.set(status);
    }
}

/// Why registration could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("the CSI socket path for kubelet {} must be absolute", .0.display())]
    RelativeEndpoint(PathBuf),
    #[error("listening on {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: SocketError,
    },
    #[error("serving plugin registration")]
    Serve(#[source] tonic::transport::Error),
}

/// The `pluginregistration.Registration` service.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    endpoint: String,
    state: RegistrationState,
}

impl RegistrationService {
    pub fn new(csi_socket_for_kubelet: &Path, state: RegistrationState) -> Self {
        Self {
            endpoint: csi_socket_for_kubelet.to_string_lossy().into_owned(),
            state,
        }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<pr::InfoRequest>,
    ) -> Result<Response<pr::PluginInfo>, Status> {
        tracing::debug!(endpoint = %self.endpoint, "kubelet asked for the plugin's registration info");
        Ok(Response::new(pr::PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_owned(),
            name: DRIVER_NAME.to_owned(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_CSI_VERSIONS.map(str::to_owned).to_vec(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<pr::RegistrationStatus>,
    ) -> Result<Response<pr::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = DRIVER_NAME, "kubelet registered the driver");
            self.state.set(RegistrationStatus::Registered);
        } else {
            // Kubelet's message names its own check (version, name, NodeGetInfo);
            // it never carries a secret.
            tracing::error!(driver = DRIVER_NAME, error = %status.error, "kubelet refused the driver's registration");
            self.state.set(RegistrationStatus::Failed(status.error));
        }
        Ok(Response::new(pr::RegistrationStatusResponse {}))
    }
}

/// Serves registration on `<registry dir>/csi.scopehold.dev-reg.sock` until
/// `shutdown` resolves, then removes the socket (kubelet deregisters).
/// Call once the CSI socket is listening: kubelet dials it right after GetInfo.
pub async fn serve(
    settings: &RegistrationSettings,
    state: RegistrationState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RegistrationError> {
    if !settings.csi_socket_for_kubelet.is_absolute() {
        return Err(RegistrationError::RelativeEndpoint(
            settings.csi_socket_for_kubelet.clone(),
        ));
    }
    let path = settings.socket_path();
    let listener = bind_socket(&path).map_err(|source| RegistrationError::Socket {
        path: path.clone(),
        source,
    })?;
    tracing::info!(
        socket = %path.display(),
        csi_endpoint = %settings.csi_socket_for_kubelet.display(),
        "serving kubelet plugin registration"
    );
    let service = RegistrationService::new(&settings.csi_socket_for_kubelet, state);
    // Each kubelet connection goes through the :authority shim (see
    // `authority`) into an in-memory pipe that tonic serves.
    let (connections, incoming) = tokio::sync::mpsc::channel::<std::io::Result<DuplexStream>>(8);
    let acceptor = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a registration connection failed");
                    continue;
                }
            };
            let (server_end, client_end) = tokio::io::duplex(64 * 1024);
            if connections.send(Ok(server_end)).await.is_err() {
                return;
            }
            let (from_kubelet, mut to_kubelet) = stream.into_split();
            let (mut from_server, to_server) = tokio::io::split(client_end);
            tokio::spawn(async move {
                if let Err(error) = pump_client_to_server(from_kubelet, to_server).await {
                    tracing::warn!(%error, "registration connection from kubelet");
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_server, &mut to_kubelet).await;
            });
        }
    });
    let served = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            shutdown,
        )
        .await;
    acceptor.abort();
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %error, "could not remove the registration socket");
    }
    served.map_err(RegistrationError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::pluginregistration::registration_client::RegistrationClient;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Plays kubelet's plugin watcher: dial the registration socket, GetInfo,
    /// then report success and failure, and watch the state follow.
    #[tokio::test]
    async fn answers_kubelet_and_records_its_verdict() -> TestResult {
        let dir = tempfile::tempdir()?;
        let settings = RegistrationSettings {
            registry_dir: dir.path().join("plugins_registry"),
            csi_socket_for_kubelet: PathBuf::from(
                "/var/lib/kubelet/plugins/csi.scopehold.dev/csi.sock",
            ),
        };
        let state = RegistrationState::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let (settings, state) = (settings.clone(), state.clone());
            tokio::spawn(async move {
                serve(&settings, state, async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        let path = settings.socket_path();
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        let mut client = RegistrationClient::new(channel);
        let info = client.get_info(pr::InfoRequest {}).await?.into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.scopehold.dev");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/csi.scopehold.dev/csi.sock"
        );
        assert_eq!(info.supported_versions, vec!["1.0.0".to_owned()]);
        assert_eq!(state.status(), RegistrationStatus::Pending);

        client
            .notify_registration_status(pr::RegistrationStatus {
                plugin_registered: false,
                error: "version 9.9 unsupported".into(),
            })
            .await?;
        assert_eq!(
            state.status(),
            RegistrationStatus::Failed("version 9.9 unsupported".into())
        );
        client
            .notify_registration_status(pr::RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            })
            .await?;
        assert_eq!(state.status(), RegistrationStatus::Registered);

        let _ = stop.send(());
        server.await??;
        assert!(
            !settings.socket_path().exists(),
            "the socket is removed on shutdown, so kubelet deregisters"
        );
        Ok(())
    }

    #[tokio::test]
    async fn refuses_a_relative_csi_endpoint() -> TestResult {
        let dir = tempfile::tempdir()?;
        let settings = RegistrationSettings {
            registry_dir: dir.path().to_path_buf(),
            csi_socket_for_kubelet: PathBuf::from("csi.sock"),
        };
        let result = serve(&settings, RegistrationState::default(), async {}).await;
        assert!(matches!(
            result,
            Err(RegistrationError::RelativeEndpoint(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        Ok(())
    }
}

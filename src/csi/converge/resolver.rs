//! The node plugin's access to the custody service.
//!
//! [`Resolver`] is the seam between the CSI Node service and custody: the
//! real implementation, [`CustodyResolver`], is a tonic client of
//! `scopehold.v1.Custody` that authenticates with the node plugin's own
//! ServiceAccount token; unit tests substitute a fake.
//!
//! The token file is read again on every call: kubelet rotates projected
//! tokens in place, and a cached copy would expire under a long-running
//! plugin. Neither the token nor anything derived from it appears in an error
//! message or a log line.
//!
//! The invalidation stream runs on a channel of its own, without the request
//! timeout (it is meant to stay open) but with HTTP/2 keepalives, so that a
//! custody that vanished without closing the connection is noticed within
//! seconds rather than at the next TCP timeout.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::proto::scopehold::v1::custody_client::CustodyClient;
use crate::proto::scopehold::v1::{
    GrantRef, GrantState, GrantStatesRequest, Invalidation, NodeReport, ReportRequest,
    ResolveRequest, ResolveResponse, WatchRequest,
};

/// How long one connection attempt to custody may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one Resolve call may take (kubelet gives the whole
/// NodePublishVolume two minutes).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a reachability result is reused by [`Resolver::probe`].
pub const PROBE_CACHE_TTL: Duration = Duration::from_secs(5);
/// Largest token file accepted (a JWT is a few KiB).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// Largest ResolveResponse accepted from custody.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// HTTP/2 pings on the invalidation stream's connection: a dead custody is
/// noticed after at most interval + timeout.
const STREAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const STREAM_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The invalidations custody pushes, as the node plugin consumes them.
pub type InvalidationStream =
    Pin<Box<dyn Stream<Item = Result<Invalidation, Status>> + Send + 'static>>;

/// Resolves a pod's grants into files. Implemented over gRPC by
/// [`CustodyResolver`]; tests use fakes.
pub trait Resolver: Send + Sync + 'static {
    /// Calls custody's `Resolve`. Errors are custody's status (passed on to
    /// kubelet by the caller's error mapping) or a transport status
    /// (`UNAVAILABLE` when custody cannot be reached).
    fn resolve(
        &self,
        request: ResolveRequest,
    ) -> impl Future<Output = Result<ResolveResponse, Status>> + Send;

    /// Whether custody is reachable right now (may be a recent cached
    /// answer). Backs the CSI `Probe`.
    fn probe(&self) -> impl Future<Output = bool> + Send;

    /// Opens custody's `WatchInvalidations` stream for this node. The
    /// default (for resolvers without a push path, such as simple test
    /// fakes) is `UNIMPLEMENTED`.
    fn watch_invalidations(
        &self,
        node_name: String,
    ) -> impl Future<Output = Result<InvalidationStream, Status>> + Send {
        async move {
            let _ = node_name;
            Err(Status::unimplemented(
                "this resolver has no invalidation stream",
            ))
        }
    }

    /// Calls custody's `GrantStates`: whether each grant may still be held,
    /// without a pod token. The default is `UNIMPLEMENTED`.
    fn grant_states(
        &self,
        grants: Vec<GrantRef>,
    ) -> impl Future<Output = Result<Vec<GrantState>, Status>> + Send {
        async move {
            let _ = grants;
            Err(Status::unimplemented("this resolver has no GrantStates"))
        }
    }

    /// Calls custody's `Report` (best effort: custody turns the reports
    /// into Kubernetes Events). The default drops them.
    fn report(&self, reports: Vec<NodeReport>) -> impl Future<Output = Result<(), Status>> + Send {
        async move {
            let _ = reports;
            Ok(())
        }
    }
}

/// How to reach custody.
#[derive(Debug, Clone)]
pub struct CustodyClientConfig {
    /// `https://host:port`, or `http://host:port` with `plaintext`.
    pub endpoint: String,
    /// Explicit opt-in to an unencrypted `http://` endpoint (development
    /// only).
    pub plaintext: bool,
    /// PEM bundle of the CA that signed custody's certificate (for
    /// `https://`). Without it the endpoint cannot be verified and is refused.
    pub ca_file: Option<PathBuf>,
    /// The node plugin's projected ServiceAccount token, re-read per call.
    pub token_file: PathBuf,
}

/// Why the custody client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum CustodyClientError {
    #[error("invalid custody endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error(
        "custody endpoint {endpoint:?} is plaintext http://; pass --custody-plaintext to allow that (development only)"
    )]
    PlaintextNotAllowed { endpoint: String },
    #[error("--custody-plaintext was given but the custody endpoint {endpoint:?} is not http://")]
    PlaintextMismatch { endpoint: String },
    #[error(
        "custody endpoint {endpoint:?} uses TLS but no CA bundle was given (--custody-ca-file)"
    )]
    CaFileMissing { endpoint: String },
    #[error("reading the custody CA bundle {}", path.display())]
    ReadCaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring the channel to custody")]
    Transport(#[source] tonic::transport::Error),
}

/// The real [`Resolver`]: a tonic client of the custody service.
#[derive(Debug)]
pub struct CustodyResolver {
    client: CustodyClient<Channel>,
    /// A separate channel for the long-lived invalidation stream.
    watch_client: CustodyClient<Channel>,
    /// For [`Resolver::probe`]: an eager connection attempt on a fresh
    /// channel, so the answer reflects TCP, TLS and HTTP/2 right now.
    endpoint: Endpoint,
    token_file: PathBuf,
    probe_cache: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl CustodyResolver {
    /// Builds the client. Connects lazily: a custody that is down at start-up
    /// is not an error (Probe reports it, Resolve returns `UNAVAILABLE`).
    pub fn new(config: &CustodyClientConfig) -> Result<Self, CustodyClientError> {
        let endpoint_text = config.endpoint.as_str();
        let invalid = |reason| CustodyClientError::InvalidEndpoint {
            endpoint: endpoint_text.to_owned(),
            reason,
        };
        let uri: tonic::codegen::http::Uri =
            endpoint_text.parse().map_err(|_| invalid("not a URI"))?;
        let host = uri.host().ok_or_else(|| invalid("no host"))?.to_owned();
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(invalid("must not have a path"));
        }
        let tls = match uri.scheme_str() {
            Some("http") if config.plaintext => None,
            Some("http") => {
                return Err(CustodyClientError::PlaintextNotAllowed {
                    endpoint: endpoint_text.to_owned(),
                });
            }
            Some("https") if config.plaintext => {
                return Err(CustodyClientError::PlaintextMismatch {
                    endpoint: endpoint_text.to_owned(),
                });
            }
            Some("https") => {
                let ca_file =
                    config
                        .ca_file
                        .as_ref()
                        .ok_or_else(|| CustodyClientError::CaFileMissing {
                            endpoint: endpoint_text.to_owned(),
                        })?;
                let pem =
                    std::fs::read(ca_file).map_err(|source| CustodyClientError::ReadCaFile {
                        path: ca_file.clone(),
                        source,
                    })?;
                // Only the given CA is trusted: no system roots.
                Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(pem))
                        .domain_name(host.trim_start_matches('[').trim_end_matches(']')),
                )
            }
            _ => {
                return Err(invalid(
                    "the scheme must be https:// (or http:// for development)",
                ));
            }
        };
        let mut base = Endpoint::from_shared(endpoint_text.to_owned())
            .map_err(CustodyClientError::Transport)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            base = base
                .tls_config(tls)
                .map_err(CustodyClientError::Transport)?;
        }
        let endpoint = base.clone().timeout(REQUEST_TIMEOUT);
        let client = CustodyClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let watch_endpoint = base
            .http2_keep_alive_interval(STREAM_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(STREAM_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let watch_client = CustodyClient::new(watch_endpoint.connect_lazy());
        Ok(Self {
            client,
            watch_client,
            endpoint,
            token_file: config.token_file.clone(),
            probe_cache: tokio::sync::Mutex::new(None),
        })
    }

    async fn authorized<T>(&self, message: T) -> Result<tonic::Request<T>, Status> {
        let token = read_token(&self.token_file).await?;
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Status::internal(format!(
                "the node plugin's token file {} holds characters that cannot be sent in a header",
                self.token_file.display()
            ))
        })?;
        value.set_sensitive(true);
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

impl Resolver for CustodyResolver {
    async fn resolve(&self, request: ResolveRequest) -> Result<ResolveResponse, Status> {
        let request = self.authorized(request).await?;
        // The client is a cheap handle on the shared channel.
        let mut client = self.client.clone();
        client
            .resolve(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn probe(&self) -> bool {
        // Holding the lock across the check makes concurrent probes share one.
        let mut cache = self.probe_cache.lock().await;
        if let Some((checked_at, reachable)) = *cache
            && checked_at.elapsed() < PROBE_CACHE_TTL
        {
            return reachable;
        }
        let reachable = match self.endpoint.connect().await {
            Ok(_) => true,
            Err(error) => {
                tracing::debug!(error = %error, "custody is not reachable");
                false
            }
        };
        *cache = Some((Instant::now(), reachable));
        reachable
    }

    async fn watch_invalidations(&self, node_name: String) -> Result<InvalidationStream, Status> {
        let request = self.authorized(WatchRequest { node_name }).await?;
        let mut client = self.watch_client.clone();
        let stream = client.watch_invalidations(request).await?.into_inner();
        Ok(stream.boxed())
    }

    async fn grant_states(&self, grants: Vec<GrantRef>) -> Result<Vec<GrantState>, Status> {
        let request = self.authorized(GrantStatesRequest { grants }).await?;
        let mut client = self.client.clone();
        client
            .grant_states(request)
            .await
            .map(|response| response.into_inner().grants)
    }

    async fn report(&self, reports: Vec<NodeReport>) -> Result<(), Status> {
        let request = self.authorized(ReportRequest { reports }).await?;
        let mut client = self.client.clone();
        client.report(request).await.map(|_| ())
    }
}

/// Reads and trims the token file. Errors name the file, never its content.
async fn read_token(path: &Path) -> Result<String, Status> {
    let unreadable = |what: &str| {
        Status::internal(format!(
            "cannot read the node plugin's token file {}: {what}",
            path.display()
        ))
    };
    let metadata = tokio::fs::metadata(path)
        .await
        .map_err(|error| unreadable(&error.kind().to_string()))?;
    if metadata.len() > MAX_TOKEN_BYTES {
        return Err(unreadable("larger than 64 KiB"));
    }
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|error| unreadable(&error.kind().to_string()))?;
    let token = String::from_utf8(bytes).map_err(|_| unreadable("not UTF-8"))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(unreadable("empty"));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::proto::scopehold::v1::custody_server::{Custody, CustodyServer};
    use crate::proto::scopehold::v1::{
        GrantStatesRequest, GrantStatesResponse, Invalidation, ReportResponse, WatchRequest,
    };

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const NODE_TOKEN_1: &str = "eyJub2RlIjoxfQ.eyJub2RlIjoxfQ.c2lnLW5vZGUtMQ";
    const NODE_TOKEN_2: &str = "eyJub2RlIjoyfQ.eyJub2RlIjoyfQ.c2lnLW5vZGUtMg";

    /// A custody server that records the authorization header of each call.
    #[derive(Default)]
    struct RecordingCustody {
        authorizations: Arc<Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl Custody for RecordingCustody {
        async fn resolve(
            &self,
            request: tonic::Request<ResolveRequest>,
        ) -> Result<tonic::Response<ResolveResponse>, Status> {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if let Ok(mut seen) = self.authorizations.lock() {
                seen.push(header);
            }
            if request.get_ref().pod_name == "denied" {
                return Err(Status::permission_denied("no active grant"));
            }
            Ok(tonic::Response::new(ResolveResponse {
                agent: "claude".to_owned(),
                ..Default::default()
            }))
        }

        type WatchInvalidationsStream =
            Pin<Box<dyn futures::Stream<Item = Result<Invalidation, Status>> + Send>>;

        async fn watch_invalidations(
            &self,
            _request: tonic::Request<WatchRequest>,
        ) -> Result<tonic::Response<Self::WatchInvalidationsStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn grant_states(
            &self,
            _request: tonic::Request<GrantStatesRequest>,
        ) -> Result<tonic::Response<GrantStatesResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn report(
            &self,
            _request: tonic::Request<ReportRequest>,
        ) -> Result<tonic::Response<ReportResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    async fn start_custody(custody: RecordingCustody) -> Result<SocketAddr, std::io::Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CustodyServer::new(custody))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(address)
    }

    fn config(endpoint: String, token_file: PathBuf) -> CustodyClientConfig {
        CustodyClientConfig {
            endpoint,
            plaintext: true,
            ca_file: None,
            token_file,
        }
    }

    #[tokio::test]
    async fn sends_the_current_token_as_bearer_and_rereads_it_per_call() -> TestResult {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{NODE_TOKEN_1}\n"))?;
        let custody = RecordingCustody::default();
        let seen = custody.authorizations.clone();
        let address = start_custody(custody).await?;
        let resolver =
            CustodyResolver::new(&config(format!("http://{address}"), token_file.clone()))?;

        let response = resolver.resolve(ResolveRequest::default()).await?;
        assert_eq!(response.agent, "claude");
        // Kubelet rotates the token in place; the next call must use the new one.
        std::fs::write(&token_file, NODE_TOKEN_2)?;
        resolver.resolve(ResolveRequest::default()).await?;

        let denied = resolver
            .resolve(ResolveRequest {
                pod_name: "denied".to_owned(),
                ..Default::default()
            })
            .await;
        assert_eq!(
            denied.err().map(|status| status.code()),
            Some(tonic::Code::PermissionDenied)
        );
        let seen = seen.lock().map(|seen| seen.clone()).unwrap_or_default();
        assert_eq!(
            seen,
            vec![
                format!("Bearer {NODE_TOKEN_1}"),
                format!("Bearer {NODE_TOKEN_2}"),
                format!("Bearer {NODE_TOKEN_2}"),
            ]
        );
        assert!(resolver.probe().await);
        Ok(())
    }

    #[tokio::test]
    async fn unreachable_custody_is_unavailable_and_probe_says_so() -> TestResult {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, NODE_TOKEN_1)?;
        // Port 1 on loopback: nothing listens there.
        let resolver = CustodyResolver::new(&config("http://127.0.0.1:1".to_owned(), token_file))?;
        let status = resolver.resolve(ResolveRequest::default()).await.err();
        assert_eq!(
            status.as_ref().map(Status::code),
            Some(tonic::Code::Unavailable),
            "{status:?}"
        );
        assert!(!resolver.probe().await);
        Ok(())
    }

    #[tokio::test]
    async fn missing_or_empty_token_file_is_reported_without_content() -> TestResult {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("token");
        let resolver =
            CustodyResolver::new(&config("http://127.0.0.1:1".to_owned(), token_file.clone()))?;
        let status = resolver.resolve(ResolveRequest::default()).await.err();
        assert_eq!(
            status.as_ref().map(Status::code),
            Some(tonic::Code::Internal)
        );
        std::fs::write(&token_file, "  \n")?;
        let status = resolver.resolve(ResolveRequest::default()).await.err();
        let message = status
            .map(|status| status.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains("empty"), "{message}");
        // A token with a newline in the middle cannot be a header value.
        std::fs::write(&token_file, format!("{NODE_TOKEN_1}\n{NODE_TOKEN_2}"))?;
        let status = resolver.resolve(ResolveRequest::default()).await.err();
        let message = status
            .map(|status| status.message().to_owned())
            .unwrap_or_default();
        assert!(!message.contains("c2ln"), "{message}");
        Ok(())
    }

    #[test]
    fn endpoint_configuration_is_checked() {
        let token_file = PathBuf::from("/nonexistent/token");
        let with = |endpoint: &str, plaintext: bool, ca_file: Option<&str>| {
            CustodyResolver::new(&CustodyClientConfig {
                endpoint: endpoint.to_owned(),
                plaintext,
                ca_file: ca_file.map(PathBuf::from),
                token_file: token_file.clone(),
            })
        };
        assert!(matches!(
            with("http://127.0.0.1:9443", false, None),
            Err(CustodyClientError::PlaintextNotAllowed { .. })
        ));
        assert!(matches!(
            with("https://custody:9443", true, None),
            Err(CustodyClientError::PlaintextMismatch { .. })
        ));
        assert!(matches!(
            with("https://custody:9443", false, None),
            Err(CustodyClientError::CaFileMissing { .. })
        ));
        assert!(matches!(
            with("https://custody:9443", false, Some("/nonexistent/ca.pem")),
            Err(CustodyClientError::ReadCaFile { .. })
        ));
        for bad in [
            "ftp://custody:21",
            "custody:9443",
            "http://custody:9443/path",
            "",
        ] {
            assert!(
                matches!(
                    with(bad, true, None),
                    Err(CustodyClientError::InvalidEndpoint { .. })
                ),
                "{bad:?}"
            );
        }
    }
}

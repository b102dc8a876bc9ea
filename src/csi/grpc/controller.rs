//! The one Controller RPC the node plugin answers: ControllerGetCapabilities,
//! with no usable capability.
//!
//! ScopeHold is a node-only plugin. It advertises no CONTROLLER_SERVICE, so
//! by the CSI spec no CO calls the Controller service, and kubelet never does
//! for ephemeral inline volumes. The conformance suite does, though:
//! csi-test v5.4.0's "Node Service" `BeforeEach` calls
//! `ControllerGetCapabilities` unconditionally (to learn whether
//! EXPAND_VOLUME is supported) and requires a successful answer with a
//! non-nil capability list. Without this service every Node spec fails
//! before it starts.
//!
//! The answer is a single capability of type UNKNOWN (0): it claims no RPC
//! (an empty list would decode as nil in Go and fail the suite's check).
//! Every other `csi.v1.Controller` method returns UNIMPLEMENTED.
//!
//! `proto/csi/v1/csi.proto` carries only the Identity and Node services, so
//! the three messages are declared here with prost and the service is
//! written out by hand in the shape tonic generates.

use std::convert::Infallible;

use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};

/// `csi.v1.ControllerGetCapabilitiesRequest` (empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControllerGetCapabilitiesRequest {}

/// `csi.v1.ControllerGetCapabilitiesResponse`:
/// `repeated ControllerServiceCapability capabilities = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControllerGetCapabilitiesResponse {
    #[prost(message, repeated, tag = "1")]
    pub capabilities: Vec<ControllerServiceCapability>,
}

/// `csi.v1.ControllerServiceCapability`: `oneof type { RPC rpc = 1; }`. A
/// oneof with one member is an optional field on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControllerServiceCapability {
    #[prost(message, optional, tag = "1")]
    pub rpc: Option<ControllerServiceCapabilityRpc>,
}

/// `csi.v1.ControllerServiceCapability.RPC`: `Type type = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControllerServiceCapabilityRpc {
    /// `RPC.Type`; 0 is UNKNOWN.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
}

/// The answer: one capability of type UNKNOWN, claiming nothing.
pub fn capabilities() -> ControllerGetCapabilitiesResponse {
    ControllerGetCapabilitiesResponse {
        capabilities: vec![ControllerServiceCapability {
            rpc: Some(ControllerServiceCapabilityRpc { r#type: 0 }),
        }],
    }
}

/// The `csi.v1.Controller` service with only ControllerGetCapabilities.
#[derive(Debug, Clone, Copy, Default)]
pub struct ControllerCapabilitiesServer;

impl tonic::server::NamedService for ControllerCapabilitiesServer {
    const NAME: &'static str = "csi.v1.Controller";
}

const GET_CAPABILITIES_PATH: &str = "/csi.v1.Controller/ControllerGetCapabilities";

struct GetCapabilities;

impl tonic::server::UnaryService<ControllerGetCapabilitiesRequest> for GetCapabilities {
    type Response = ControllerGetCapabilitiesResponse;
    type Future = std::future::Ready<
        Result<tonic::Response<ControllerGetCapabilitiesResponse>, tonic::Status>,
    >;

    fn call(&mut self, _request: tonic::Request<ControllerGetCapabilitiesRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(capabilities())))
    }
}

impl<B> Service<http::Request<B>> for ControllerCapabilitiesServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == GET_CAPABILITIES_PATH {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(GetCapabilities, request).await)
            })
        } else {
            Box::pin(async {
                Ok(tonic::Status::unimplemented(
                    "csi.scopehold.dev is a node-only plugin: no Controller service",
                )
                .into_http())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn the_answer_is_one_unknown_capability_on_the_wire() {
        // capabilities (field 1, 2 bytes) = { rpc (field 1, 0 bytes) }: the
        // RPC message with type UNKNOWN (0) is empty.
        assert_eq!(capabilities().encode_to_vec(), vec![0x0a, 0x02, 0x0a, 0x00]);
    }

    #[tokio::test]
    async fn serves_get_capabilities_and_refuses_the_rest() -> Result<(), Box<dyn std::error::Error>>
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ControllerCapabilitiesServer)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await?;
        let response: tonic::Response<ControllerGetCapabilitiesResponse> = grpc
            .unary(
                tonic::Request::new(ControllerGetCapabilitiesRequest {}),
                http::uri::PathAndQuery::from_static(GET_CAPABILITIES_PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        assert_eq!(response.into_inner(), capabilities());

        grpc.ready().await?;
        let other: Result<tonic::Response<ControllerGetCapabilitiesResponse>, _> = grpc
            .unary(
                tonic::Request::new(ControllerGetCapabilitiesRequest {}),
                http::uri::PathAndQuery::from_static("/csi.v1.Controller/CreateVolume"),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        assert_eq!(
            other.err().map(|status| status.code()),
            Some(tonic::Code::Unimplemented)
        );
        Ok(())
    }
}

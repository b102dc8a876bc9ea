//! The CSI Identity service.
//!
//! A node-only plugin: no CONTROLLER_SERVICE capability (kubelet never calls
//! a controller for inline volumes), so GetPluginCapabilities is empty.
//! Probe reports `ready` honestly: true only while custody is reachable
//! (a result the resolver caches for a few seconds).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::resolver::Resolver;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::identity_server::Identity;

/// The CSI driver name (`CSIDriver.metadata.name`, `volumes[].csi.driver`).
pub const DRIVER_NAME: &str = "csi.scopehold.dev";

/// The CSI Identity service.
#[derive(Debug)]
pub struct IdentityService<R> {
    resolver: Arc<R>,
}

impl<R: Resolver> IdentityService<R> {
    pub fn new(resolver: Arc<R>) -> Self {
        Self { resolver }
    }
}

#[tonic::async_trait]
impl<R: Resolver> Identity for IdentityService<R> {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = self.resolver.probe().await;
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

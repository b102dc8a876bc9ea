//! The CSI Identity service.
//!
//! A node-only plugin: no CONTROLLER_SERVICE capability (kubelet never calls
//! a controller for inline volumes), so GetPluginCapabilities is empty.
//! Probe reports `ready` honestly: true only while custody is reachable
//! (a result the resolver caches for a few seconds). An open invalidation
//! stream proves that without a dial; without it, the resolver dials.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::converge::push::PushState;
use crate::csi::converge::resolver::Resolver;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::identity_server::Identity;

/// The CSI driver name (`CSIDriver.metadata.name`, `volumes[].csi.driver`).
pub const DRIVER_NAME: &str = "csi.scopehold.dev";

/// The CSI Identity service.
#[derive(Debug)]
pub struct IdentityService<R> {
    resolver: Arc<R>,
    push: Option<Arc<PushState>>,
}

impl<R: Resolver> IdentityService<R> {
    pub fn new(resolver: Arc<R>) -> Self {
        Self {
            resolver,
            push: None,
        }
    }

    /// Lets Probe use the invalidation stream's state.
    pub fn with_push_state(mut self, push: Arc<PushState>) -> Self {
        self.push = Some(push);
        self
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
        let streaming = self.push.as_ref().is_some_and(|push| push.connected());
        let ready = streaming || self.resolver.probe().await;
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

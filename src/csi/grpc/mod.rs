//! The gRPC surface kubelet (and csi-sanity) talks to.
//!
//! - [`node`]: the CSI Node service (NodePublishVolume and friends).
//! - [`identity`]: the CSI Identity service.
//! - [`controller`]: ControllerGetCapabilities only (for csi-sanity).
//! - [`metrics`]: Prometheus metrics of the Node service and the node's state.
//! - [`server`]: the unix socket and the wiring of `scopehold node`.

pub mod controller;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod server;

//! The gRPC surface kubelet (and csi-sanity) talks to.
//!
//! - [`node`]: the CSI Node service (NodePublishVolume and friends).
//! - [`identity`]: the CSI Identity service.
//! - [`controller`]: ControllerGetCapabilities only (for csi-sanity).
//! - [`server`]: the unix socket and the wiring of `scopehold node`.

pub mod controller;
pub mod identity;
pub mod node;
pub mod server;

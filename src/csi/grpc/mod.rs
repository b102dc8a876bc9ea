//! The gRPC surface kubelet (and csi-sanity) talks to.
//!
//! - [`node`]: the CSI Node service (NodePublishVolume and friends).
//! - [`identity`]: the CSI Identity service.
//! - [`controller`]: ControllerGetCapabilities only (for csi-sanity).
//! - [`metrics`]: Prometheus metrics of the Node service and the node's state.
//! - [`registration`]: kubelet's plugin registration service (no
//!   node-driver-registrar), behind [`authority`] (kubelet sends the socket
//!   path as `:authority`, which tonic refuses).
//! - [`health`]: `/healthz` (liveness) and `/readyz` (registered, custody
//!   reachable) for the DaemonSet's probes (no livenessprobe sidecar).
//! - [`server`]: the unix socket and the wiring of `scopehold node`.

pub mod authority;
pub mod controller;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod registration;
pub mod server;

#[cfg(test)]
mod tamper_tests;

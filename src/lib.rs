//! ScopeHold: scoped, audited, revocable delivery of Secret keys to coding
//! agents running in Kubernetes pods.
//!
//! Module rules: `api` imports nothing of ours; `controller` and `custody`
//! import `api`, `audit`, `policy` and `secrets`; `csi` talks to custody only
//! over gRPC.

pub mod api;
pub mod audit;
pub mod caches;
pub mod cli;
pub mod controller;
pub mod crdgen;
pub mod csi;
pub mod custody;
pub mod demo;
pub mod digest;
pub mod event_series;
pub mod policy;
pub mod proto;
pub mod proxy;
pub mod secrets;
pub mod store_versions;
pub mod telemetry;
pub mod usage;
pub mod webhook;

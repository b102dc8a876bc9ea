//! Usage of proxy grants: the sidecars' reports, checked against the
//! reporting pod's identity (`intake`), counted into grant statuses in
//! batches (`log`) and into one Event series per grant.

pub mod intake;
pub mod log;

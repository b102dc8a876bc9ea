//! The custody service: verifies a pod's bound ServiceAccount token and hands
//! out only the keys that the pod's agent is granted right now. It runs in the
//! controller process (every replica) and is called by the node plugins.

pub mod caller_cache;
pub mod decide;
pub mod delivered;
pub mod digest_key;
pub mod fanout;
pub mod invalidations;
pub mod metrics;
pub mod proxy_pod;
pub mod resolutions;
pub mod server;
pub mod tls;
pub mod token_review;

/// Server-side-apply field manager of the resolution fields in statuses,
/// distinct from the controller's so that neither removes the other's fields.
pub const FIELD_MANAGER: &str = "scopehold-custody";

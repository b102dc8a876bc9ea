//! The ScopeHold custom resources (`scopehold.dev/v1alpha1`): plain types,
//! condition builders and validation helpers. Nothing here talks to a cluster.

pub mod conditions;
pub mod delivery;
pub mod duration;
pub mod grant;
pub mod identity;
pub mod validation;

pub use delivery::{DeliveryMode, KeyProxy};
pub use grant::{GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec, SecretGrantStatus};
pub use identity::{AgentIdentity, AgentIdentitySpec, AgentIdentityStatus};

/// API group of every ScopeHold resource.
pub const GROUP: &str = "scopehold.dev";
/// Served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Audience that pod tokens must be issued for (CSIDriver `tokenRequests`).
pub const TOKEN_AUDIENCE: &str = "scopehold.dev";

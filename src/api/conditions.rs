//! Builders for the `Ready` condition both kinds carry.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";

/// Why a grant or identity is (not) Ready. The string form is the condition
/// reason and the audit record's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Active,
    SecretNotFound,
    KeyNotFound,
    AgentNotFound,
    AgentSuspended,
    Suspended,
    Conflict,
    Expired,
    Revoked,
    InvalidSpec,
    /// The granted keys' values cannot fit in a node plugin's volume.
    ValueTooLarge,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Active => "Active",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::KeyNotFound => "KeyNotFound",
            Reason::AgentNotFound => "AgentNotFound",
            Reason::AgentSuspended => "AgentSuspended",
            Reason::Suspended => "Suspended",
            Reason::Conflict => "Conflict",
            Reason::Expired => "Expired",
            Reason::Revoked => "Revoked",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ValueTooLarge => "ValueTooLarge",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds the Ready condition, keeping the previous `lastTransitionTime` when
/// the status did not change, so a reconcile that changes nothing produces an
/// identical condition (and therefore no write).
pub fn ready(
    ready: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.as_str().to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The Ready condition in a list, if present.
pub fn find_ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == READY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_transition_time_while_status_is_unchanged() {
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t1 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let first = ready(true, Reason::Active, "ok".into(), Some(1), &[], t0);
        let again = ready(
            true,
            Reason::Active,
            "ok".into(),
            Some(1),
            std::slice::from_ref(&first),
            t1,
        );
        assert_eq!(first, again);
        let flipped = ready(false, Reason::Revoked, "no".into(), Some(2), &[again], t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
        assert_eq!(flipped.reason, "Revoked");
    }
}

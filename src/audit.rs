//! Audit records: one JSON log line (tracing target `audit`) per decision or
//! transition. Records carry names, key names and digests, never values.

use k8s_openapi::jiff::Timestamp;

/// The tracing target of audit lines; log pipelines select on it.
pub const TARGET: &str = "audit";

/// What the record says about access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Access granted or content handed out.
    Allowed,
    /// Access refused or content withdrawn.
    Denied,
    /// A state change that neither grants nor refuses (such as a rotation).
    Changed,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Changed => "changed",
        }
    }
}

/// One audit record. Field names follow DESIGN.md's audit section.
#[derive(Clone, Debug, Default)]
pub struct AuditRecord {
    pub event: &'static str,
    pub decision: Option<Decision>,
    pub reason: Option<String>,
    pub namespace: String,
    pub agent: Option<String>,
    pub service_account: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub node: Option<String>,
    pub grant: Option<String>,
    pub secret: Option<String>,
    pub keys: Vec<String>,
    pub content_digest: Option<String>,
    pub request_id: Option<String>,
    pub message: Option<String>,
    /// Who presented the token (TokenReview user and its bound pod), where
    /// it differs in kind from what the request claimed: set on denials.
    pub caller_user: Option<String>,
    pub caller_pod: Option<String>,
    pub caller_pod_uid: Option<String>,
}

impl AuditRecord {
    pub fn new(event: &'static str, decision: Decision, namespace: impl Into<String>) -> Self {
        AuditRecord {
            event,
            decision: Some(decision),
            namespace: namespace.into(),
            ..Default::default()
        }
    }

    /// Writes the record as one log line on target `audit`.
    pub fn emit(&self) {
        let keys = self.keys.join(",");
        tracing::info!(
            target: TARGET,
            time = %Timestamp::now(),
            event = self.event,
            decision = self.decision.map(Decision::as_str),
            reason = self.reason.as_deref(),
            namespace = self.namespace.as_str(),
            agent = self.agent.as_deref(),
            serviceAccount = self.service_account.as_deref(),
            pod = self.pod.as_deref(),
            podUID = self.pod_uid.as_deref(),
            node = self.node.as_deref(),
            grant = self.grant.as_deref(),
            secret = self.secret.as_deref(),
            keys = keys.as_str(),
            contentDigest = self.content_digest.as_deref(),
            requestID = self.request_id.as_deref(),
            detail = self.message.as_deref(),
            callerUser = self.caller_user.as_deref(),
            callerPod = self.caller_pod.as_deref(),
            callerPodUID = self.caller_pod_uid.as_deref(),
        );
    }
}

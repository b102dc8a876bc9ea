//! Kubernetes Events and audit lines for controller transitions. Both carry
//! names, reasons and digests only.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::audit::{AuditRecord, Decision};

/// One transition worth telling users about.
pub struct Transition {
    /// Event reason, such as `GrantActivated`.
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
    pub audit: AuditRecord,
}

impl Transition {
    pub fn new(reason: &'static str, decision: Decision, namespace: &str, note: String) -> Self {
        let warning = decision == Decision::Denied;
        Transition {
            reason,
            warning,
            note,
            audit: AuditRecord::new(reason, decision, namespace),
        }
    }
}

/// Writes the audit line, then the Event. A failed Event is logged, not
/// retried: the status already records the state, and the audit line is out.
pub async fn publish(recorder: &Recorder, regarding: &ObjectReference, t: Transition) {
    let mut audit = t.audit;
    audit.message = Some(t.note.clone());
    audit.emit();
    let event = Event {
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: t.reason.to_owned(),
        note: Some(truncate(&t.note, 1000)),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, regarding).await {
        tracing::warn!(reason = t.reason, %error, "publishing Event failed");
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

//! Kubernetes Events and audit lines for controller transitions. Both carry
//! names, reasons and digests only.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;

use crate::audit::{AuditRecord, Decision};
use crate::event_series::{EventSink, Occurrence};

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

/// Writes the audit line at once and hands the Event to the process's
/// Event writer, which aggregates repeats into a series and writes it within
/// a flush interval, off the reconcile's path: at a bulk start one Event POST
/// per grant, awaited inside the reconcile, doubled each reconcile's time.
/// A failed Event is retried by the writer and counted if it is dropped; the
/// status already records the state, and the audit line is out.
pub fn publish(events: &EventSink, regarding: &ObjectReference, t: Transition) {
    let mut audit = t.audit;
    audit.message = Some(t.note.clone());
    audit.emit();
    events.record(Occurrence {
        regarding: regarding.clone(),
        related: None,
        reason: t.reason.to_owned(),
        action: "Reconcile".to_owned(),
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        note: t.note,
    });
}

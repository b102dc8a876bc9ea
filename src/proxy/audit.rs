//! One JSON audit line per proxied request (tracing target `audit`): who,
//! which grant and key names, where, what, outcome, size and time. Never a
//! value, a placeholder or a query string.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::jiff::Timestamp;

use crate::audit::{Decision, TARGET};

#[derive(Clone, Debug)]
pub struct ProxyUse {
    pub event: &'static str,
    pub decision: Decision,
    pub reason: Option<&'static str>,
    pub namespace: String,
    pub agent: String,
    pub pod: String,
    /// Grants whose keys went into (or were refused for) the request.
    pub grants: Vec<String>,
    pub keys: Vec<String>,
    pub host: String,
    pub method: String,
    /// Path only: queries can carry values or placeholders.
    pub path: String,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub started: Instant,
    /// Time until the response head (upstream latency plus the proxy's).
    pub latency_ms: f64,
    pub usage: Option<Arc<Usage>>,
}

impl Default for ProxyUse {
    fn default() -> Self {
        ProxyUse {
            event: "ProxyRequest",
            decision: Decision::Allowed,
            reason: None,
            namespace: String::new(),
            agent: String::new(),
            pod: String::new(),
            grants: vec![],
            keys: vec![],
            host: String::new(),
            method: String::new(),
            path: String::new(),
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
            started: Instant::now(),
            latency_ms: 0.0,
            usage: None,
        }
    }
}

impl ProxyUse {
    pub fn emit(&self) {
        if self.decision == Decision::Allowed
            && let Some(usage) = &self.usage
        {
            usage.record(&self.grants, &self.host);
        }
        tracing::info!(
            target: TARGET,
            time = %Timestamp::now(),
            event = self.event,
            decision = self.decision.as_str(),
            reason = self.reason,
            namespace = self.namespace.as_str(),
            agent = self.agent.as_str(),
            pod = self.pod.as_str(),
            grant = self.grants.join(",").as_str(),
            keys = self.keys.join(",").as_str(),
            host = self.host.as_str(),
            method = self.method.as_str(),
            path = self.path.as_str(),
            status = self.status,
            requestBytes = self.request_bytes,
            responseBytes = self.response_bytes,
            latencyMs = (self.latency_ms * 1000.0).round() / 1000.0,
            durationMs = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
        );
    }
}

/// Uses per grant and host since the last report: what `uses`,
/// `lastUsedAt` and `recentUses` in the grant's status are built from.
#[derive(Default, Debug)]
pub struct Usage {
    counts: Mutex<BTreeMap<(String, String), UseCount>>,
}

/// Requests of one grant to one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UseCount {
    pub count: u64,
    pub first: Timestamp,
    pub last: Timestamp,
}

impl Usage {
    pub fn record(&self, grants: &[String], host: &str) {
        let now = Timestamp::now();
        let mut counts = self.lock();
        for g in grants {
            let entry = counts
                .entry((g.clone(), host.to_owned()))
                .or_insert(UseCount {
                    count: 0,
                    first: now,
                    last: now,
                });
            entry.count += 1;
            entry.last = now;
        }
    }

    /// Takes the counts gathered since the last call, by (grant, host).
    pub fn take(&self) -> BTreeMap<(String, String), UseCount> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back counts that could not be reported, merged with newer ones.
    pub fn restore(&self, older: BTreeMap<(String, String), UseCount>) {
        let mut counts = self.lock();
        for (key, old) in older {
            counts
                .entry(key)
                .and_modify(|new| {
                    new.count += old.count;
                    new.first = old.first;
                })
                .or_insert(old);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), UseCount>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreported_counts_are_not_lost() {
        let usage = Usage::default();
        usage.record(&["a".into(), "b".into()], "h:443");
        usage.record(&["a".into()], "h:443");
        let first = usage.take();
        assert_eq!(first[&("a".into(), "h:443".into())].count, 2);
        usage.record(&["a".into()], "h:443");
        usage.restore(first);
        let merged = usage.take();
        assert_eq!(merged[&("a".into(), "h:443".into())].count, 3);
        assert_eq!(merged[&("b".into(), "h:443".into())].count, 1);
        assert!(usage.take().is_empty());
    }
}

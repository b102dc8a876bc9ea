//! Reports of what the node plugin changed in running pods, sent to custody
//! so that they become Kubernetes Events (the node plugin itself has no
//! Kubernetes API access, by design).
//!
//! Best effort and never in the way: a report is queued without waiting
//! (a full queue drops it), a background task sends them in batches, and a
//! failed send is logged and dropped. The node plugin's JSON audit line,
//! written before the report is queued, is the record of truth; custody may
//! well be down when the plugin withdraws files on its own (local expiry).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::resolver::Resolver;
use crate::proto::scopehold::v1::NodeReport;

/// Reports waiting to be sent; beyond this they are dropped.
const QUEUE: usize = 4096;
/// Reports per Report call (custody accepts up to 256).
const BATCH: usize = 256;

/// Where the Node service puts its reports. Cheap to clone; the default
/// sink drops everything (no task runs behind it).
#[derive(Debug, Clone, Default)]
pub struct ReportSink {
    sender: Option<mpsc::Sender<NodeReport>>,
}

impl ReportSink {
    /// A sink and the receiver that [`run`] drains.
    pub fn channel() -> (Self, mpsc::Receiver<NodeReport>) {
        let (sender, receiver) = mpsc::channel(QUEUE);
        (
            Self {
                sender: Some(sender),
            },
            receiver,
        )
    }

    /// Queues a report without waiting.
    pub fn send(&self, report: NodeReport) {
        if let Some(sender) = &self.sender
            && sender.try_send(report).is_err()
        {
            tracing::debug!(
                "report queue full or closed; dropping a report (the audit line stays)"
            );
        }
    }
}

/// Sends queued reports in batches until the sink side is gone.
pub async fn run<R: Resolver>(resolver: Arc<R>, mut receiver: mpsc::Receiver<NodeReport>) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let count = batch.len();
        if let Err(status) = resolver.report(std::mem::take(&mut batch)).await {
            tracing::warn!(
                code = ?status.code(),
                reports = count,
                "custody did not take the reports; their Events are lost (the audit lines stay)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tonic::Status;

    use super::*;
    use crate::proto::scopehold::v1::{ResolveRequest, ResolveResponse};

    #[derive(Default)]
    struct Collecting {
        batches: Mutex<Vec<usize>>,
    }

    impl Resolver for Collecting {
        async fn resolve(&self, _request: ResolveRequest) -> Result<ResolveResponse, Status> {
            Err(Status::unimplemented("not here"))
        }

        async fn probe(&self) -> bool {
            true
        }

        async fn report(&self, reports: Vec<NodeReport>) -> Result<(), Status> {
            if let Ok(mut batches) = self.batches.lock() {
                batches.push(reports.len());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn reports_are_batched_and_a_default_sink_drops_them() {
        ReportSink::default().send(NodeReport::default());
        let (sink, receiver) = ReportSink::channel();
        for _ in 0..300 {
            sink.send(NodeReport::default());
        }
        drop(sink);
        let resolver = Arc::new(Collecting::default());
        run(resolver.clone(), receiver).await;
        let batches = resolver
            .batches
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        assert_eq!(batches, vec![256, 44]);
    }
}

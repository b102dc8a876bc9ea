//! Leader election on a `coordination.k8s.io` Lease. Every replica keeps its
//! caches warm and serves custody; only the lease holder reconciles and writes
//! controller status.
//!
//! Written here rather than taken from kube-lease-manager (0.13): that crate
//! keeps reporting "leader" while its renewals fail (it logs the error and
//! retries), so a leader cut off from the API server went on reconciling after
//! its lease had run out and another replica had taken over. Here, as in
//! client-go's leaderelection, the holder steps down on its own clock once it
//! has not renewed for the renew deadline (`duration - grace`), which is before
//! any other replica may take the lease (`duration` after it last saw the Lease
//! change, also on its own clock, so clock skew between replicas is harmless).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where the lease lives and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's name in `holderIdentity` (the pod name in a cluster).
    pub identity: String,
    /// A holder that has not renewed for this long loses the lease.
    pub duration_seconds: u64,
    /// The holder steps down this long before the lease would run out if it
    /// could not renew meanwhile.
    pub grace_seconds: u64,
}

impl LeaseSettings {
    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_seconds.max(2))
    }

    /// How long a leader may go without a successful renewal.
    fn renew_deadline(&self) -> Duration {
        let duration = self.duration();
        duration
            .saturating_sub(Duration::from_secs(self.grace_seconds))
            .clamp(duration / 2, duration - Duration::from_millis(500))
    }

    /// How often to try: several attempts fit in the renew deadline.
    fn retry_period(&self) -> Duration {
        (self.renew_deadline() / 4).clamp(Duration::from_millis(200), Duration::from_secs(2))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Tells whether this replica leads, and lets it go on shutdown.
pub struct Leadership {
    pub is_leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Leadership {
    /// Always the leader: a single replica without election.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // The receiver reports "closed" once the sender is gone, but the last
        // value stays readable; leak nothing by dropping the sender here.
        drop(tx);
        Leadership {
            is_leader: rx,
            stop: None,
            task: None,
        }
    }

    /// Starts competing for the lease in the background. Fails only if the
    /// Lease cannot be read at all (e.g. no RBAC), so that a misconfigured
    /// replica says so at start.
    pub async fn elect(client: Client, settings: &LeaseSettings) -> Result<Self, LeaseError> {
        let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
        api.get_opt(&settings.name)
            .await
            .map_err(|source| LeaseError::Api {
                namespace: settings.namespace.clone(),
                name: settings.name.clone(),
                source,
            })?;
        let (tx, rx) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(compete(api, settings.clone(), tx, stopped));
        Ok(Leadership {
            is_leader: rx,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Releases the lease (so another replica takes over at once rather than
    /// after the lease duration) and waits briefly for that to happen.
    pub async fn release(mut self) {
        let (Some(stop), Some(task)) = (self.stop.take(), self.task.take()) else {
            return;
        };
        let _ = stop.send(());
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "lease task failed"),
            Err(_) => tracing::warn!("lease not released within 3 s"),
        }
    }
}

/// The last version of the Lease this replica saw, and when (its own clock).
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

async fn compete(
    api: Api<Lease>,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    mut stopped: oneshot::Receiver<()>,
) {
    let retry = settings.retry_period();
    let renew_deadline = settings.renew_deadline();
    let mut observed: Option<Observed> = None;
    // When the last successful acquisition or renewal was *sent*: the lease
    // runs from no earlier than that.
    let mut renewed_at: Option<Instant> = None;
    loop {
        let attempt = Instant::now();
        let outcome = tokio::time::timeout(
            retry.max(Duration::from_secs(1)),
            try_acquire_or_renew(&api, &settings, &mut observed),
        )
        .await;
        match outcome {
            Ok(Ok(true)) => {
                renewed_at = Some(attempt);
                if !*leading.borrow() {
                    leading.send_replace(true);
                }
            }
            Ok(Ok(false)) => {
                renewed_at = None;
                if *leading.borrow() {
                    leading.send_replace(false);
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(lease = %settings.name, %error, leader = *leading.borrow(), "lease renewal failed")
            }
            Err(_) => {
                tracing::warn!(lease = %settings.name, leader = *leading.borrow(), "lease request timed out")
            }
        }
        // Step down on our own clock, whatever the API server does.
        let deadline = renewed_at.map(|at| at + renew_deadline);
        if let Some(deadline) = deadline
            && Instant::now() >= deadline
        {
            renewed_at = None;
            if *leading.borrow() {
                tracing::warn!(
                    lease = %settings.name,
                    renew_deadline_seconds = renew_deadline.as_secs_f64(),
                    "lease not renewed within the renew deadline: stepping down before it runs out"
                );
                leading.send_replace(false);
            }
        }
        let mut next = attempt + retry;
        if let Some(deadline) = renewed_at.map(|at| at + renew_deadline) {
            next = next.min(deadline);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut stopped => {
                if *leading.borrow() {
                    leading.send_replace(false);
                    release(&api, &settings).await;
                }
                return;
            }
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn duration_field(settings: &LeaseSettings) -> i32 {
    i32::try_from(settings.duration().as_secs()).unwrap_or(i32::MAX)
}

/// One round: take the Lease if it is free or has run out, renew it if it is
/// ours. `Ok(true)` when we hold it now. Every write carries the version read
/// as a precondition, so two replicas can never both win a round.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(duration_field(settings)),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                remember(observed, &created);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        };
    };
    let changed =
        observed.as_ref().map(|o| &o.resource_version) != Some(&lease.metadata.resource_version);
    if changed {
        remember(observed, &lease);
    }
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == settings.identity;
    let held_for =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    let running_out = observed.as_ref().is_none_or(|o| o.at.elapsed() >= held_for);
    if !ours && !holder.is_empty() && !running_out {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(duration_field(settings)),
        acquire_time: if ours { spec.acquire_time } else { Some(now()) },
        renew_time: Some(now()),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..spec
    });
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(written) => {
            remember(observed, &written);
            if !ours {
                tracing::info!(lease = %settings.name, previous = %holder, "lease acquired");
            }
            Ok(true)
        }
        // Someone else wrote it first: they hold it this round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

fn remember(observed: &mut Option<Observed>, lease: &Lease) {
    *observed = Some(Observed {
        resource_version: lease.metadata.resource_version.clone(),
        at: Instant::now(),
    });
}

/// Gives the Lease up if we still hold it: the next replica takes it at its
/// next attempt instead of waiting for it to run out.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
    let result = async {
        let Some(mut lease) = api.get_opt(&settings.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(now()),
            ..spec
        });
        api.replace(&settings.name, &PostParams::default(), &lease)
            .await
            .map(|_| true)
    };
    match tokio::time::timeout(Duration::from_secs(2), result).await {
        Ok(Ok(true)) => tracing::info!("lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "releasing the lease failed"),
        Err(_) => tracing::warn!("releasing the lease timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(duration: u64, grace: u64) -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            duration_seconds: duration,
            grace_seconds: grace,
        }
    }

    #[test]
    fn the_leader_steps_down_before_the_lease_runs_out() {
        for (duration, grace) in [(15, 5), (4, 1), (2, 0), (2, 5), (60, 20)] {
            let s = settings(duration, grace);
            assert!(s.renew_deadline() < s.duration(), "{s:?}");
            assert!(s.retry_period() * 2 <= s.renew_deadline(), "{s:?}");
        }
        assert_eq!(settings(15, 5).renew_deadline(), Duration::from_secs(10));
    }
}

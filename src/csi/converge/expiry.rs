//! Local enforcement of grant expiry: one timer for the whole plugin.
//!
//! Every mounted grant's expiry is known from custody's answer (and kept in
//! the registry), so the node plugin withdraws a grant's files when it
//! expires without waiting for custody's EXPIRED invalidation, and also when
//! custody, the controller or the network is down. The timer sleeps until
//! the earliest expiry of any mounted grant, waking early whenever a volume
//! changes (a new grant may expire sooner) and at least every
//! [`MAX_SLEEP`] (the wall clock may jump under a monotonic sleep).

use std::time::Duration;

use super::resolver::Resolver;
use super::{NodeService, Work};

/// Longest uninterrupted sleep.
pub const MAX_SLEEP: Duration = Duration::from_secs(5);

/// Runs until the task is aborted.
pub async fn run<R: Resolver>(service: NodeService<R>) {
    loop {
        let now = jiff::Timestamp::now();
        for (volume_id, grants) in service.volumes().expired(now) {
            // Queued rather than done here: the volume's worker serialises it
            // with pushes and republishes. Once withdrawn, the grants leave
            // the entry and stop showing up here.
            service.enqueue(&volume_id, Work::withdraw_grants(grants, "Expired"));
        }
        let sleep = sleep_until_next(service.volumes().next_expiry_after(now), now);
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = service.volumes().changed() => {}
        }
    }
}

/// How long to sleep until `next` (at most [`MAX_SLEEP`]). Expiries carry
/// whole seconds; waking a millisecond late makes `now >= expiry` hold.
fn sleep_until_next(next: Option<jiff::Timestamp>, now: jiff::Timestamp) -> Duration {
    let Some(next) = next else {
        return MAX_SLEEP;
    };
    let until = next.duration_since(now);
    match Duration::try_from(until) {
        Ok(until) => (until + Duration::from_millis(1)).min(MAX_SLEEP),
        Err(_) => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_next_expiry_within_bounds() -> Result<(), jiff::Error> {
        let now: jiff::Timestamp = "2026-11-26T10:00:00Z".parse()?;
        assert_eq!(sleep_until_next(None, now), MAX_SLEEP);
        assert_eq!(
            sleep_until_next(Some("2026-11-26T10:00:02Z".parse()?), now),
            Duration::from_millis(2001)
        );
        assert_eq!(
            sleep_until_next(Some("2026-11-26T11:00:00Z".parse()?), now),
            MAX_SLEEP
        );
        assert_eq!(
            sleep_until_next(Some("2026-11-26T09:00:00Z".parse()?), now),
            Duration::ZERO
        );
        Ok(())
    }
}

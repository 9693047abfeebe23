//! The scheduler (reaper): reclaims expired leases, releases delayed tasks on time, and
//! removes expired sessions.
//!
//! It sleeps until the earliest timer (the first lease expiry, kept by the writer's lease
//! cache, or the first key of the DELAYED or SESSION_EXPIRY index), or until the writer
//! reports an earlier one, or shutdown. An idle server with leases outstanding therefore wakes
//! only when something is due: there are no periodic scans.
//! Invariant: a lease is reclaimed only once `now >= leaseExpiresAt` (checked again inside the
//! write by `lease::reclaim`), so no lease is ever reclaimed early; it is reclaimed within
//! milliseconds of expiry, well inside the project's `reaperIntervalMinutes`.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::store::access::sweep_sessions;
use crate::store::write::{promote_due, reclaim_expired, TIMER_BATCH};
use crate::store::Store;

/// Longest single sleep, so a clock jump is noticed within this bound even if nothing wakes us.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

pub async fn run(store: Arc<Store>) {
    let hub = store.hub.clone();
    loop {
        if hub.is_shutting_down() {
            return;
        }
        let next = match store.next_timer() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler could not read timers");
                Some(store.clock.now() + 1000)
            }
        };
        let now = store.clock.now();
        if next.is_some_and(|at| at <= now) {
            let result = store
                .write(|w| {
                    let promoted = promote_due(w, TIMER_BATCH)?;
                    let reclaimed = reclaim_expired(w, None, TIMER_BATCH)?;
                    let swept = sweep_sessions(w, TIMER_BATCH)?;
                    if swept > 0 {
                        tracing::info!(sessions = swept, "expired sessions removed");
                    }
                    Ok((promoted + swept, reclaimed))
                })
                .await;
            match result {
                Ok((0, reclaimed)) if reclaimed.is_empty() => {
                    // A timer looked due but the pass found nothing to do (the clock stepped
                    // back between the look and the batch). Such a pass commits nothing and
                    // costs almost nothing, so pause rather than spin on it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok((_, reclaimed)) => {
                    for r in reclaimed {
                        tracing::info!(
                            task = %r.task_id,
                            project = %Uuid::from_u128(r.project_id),
                            agent = %r.agent,
                            will_retry = r.will_retry,
                            "lease expired; task reclaimed"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler pass failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        }
        let deadline = next.unwrap_or(i64::MAX);
        hub.set_timer_deadline(deadline);
        let sleep = match next {
            Some(at) => Duration::from_millis((at - now).max(0) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = hub.timer.notified() => {}
            _ = hub.shutting_down() => return,
        }
    }
}

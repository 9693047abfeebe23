//! The scheduler (reaper): reclaims expired leases, releases delayed tasks on time, and
//! removes expired sessions.
//!
//! It sleeps until the earliest timer (the first lease expiry, kept by the writer's lease
//! cache, or the first key of the DELAYED or SESSION_EXPIRY index), or until the writer
//! reports an earlier one, or shutdown. An idle server with leases outstanding therefore wakes
//! only when something is due: there are no periodic scans.
//! Invariant: a lease is reclaimed only once `now >= leaseExpiresAt` (checked again inside the
//! write by `lease::reclaim`) and its duration has passed on the steady clock (a step of the
//! wall clock makes no lease due; see `store::leases`), so no lease is ever reclaimed early;
//! it is reclaimed within milliseconds of expiry, well inside the project's
//! `reaperIntervalMinutes`.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::hub::Hub;
use crate::model::Millis;
use crate::store::keys::sweep_sessions;
use crate::store::write::{promote_due, reclaim_expired, Reclaimed, TIMER_BATCH};
use crate::store::Store;

/// Reclaimed leases logged one line each per pass; the rest of a pass's share one line (a
/// fleet that dies at once must not flood the log: each task's attempts keep the detail).
const RECLAIMED_LOGGED: usize = 20;

fn log_reclaimed(reclaimed: &[Reclaimed]) {
    for r in reclaimed.iter().take(RECLAIMED_LOGGED) {
        tracing::info!(
            task = %r.task_id,
            project = %Uuid::from_u128(r.project_id),
            agent = %r.agent,
            will_retry = r.will_retry,
            "lease expired; task reclaimed"
        );
    }
    let rest = reclaimed.get(RECLAIMED_LOGGED..).unwrap_or_default();
    if !rest.is_empty() {
        let requeued = rest.iter().filter(|r| r.will_retry).count();
        tracing::info!(
            more = rest.len(),
            requeued,
            failed = rest.len() - requeued,
            "leases expired on more tasks in the same pass; reclaimed (see each task's attempts)"
        );
    }
}

/// Longest single sleep, so a clock jump is noticed within this bound even if nothing wakes us.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The pause after a pass that found nothing due, doubled for each such pass in a row up to
/// [`MAX_EMPTY_PASS_PAUSE`]. Such passes follow a timer that looked due but was not: the wall
/// clock stepped back between the look and the pass, or, after a step back with more leases
/// out than `Leases::next_due` looks at, its estimate is early for as long as the step.
const EMPTY_PASS_PAUSE: Duration = Duration::from_millis(50);
const MAX_EMPTY_PASS_PAUSE: Duration = Duration::from_secs(1);

pub async fn run(store: Arc<Store>) {
    let hub = store.hub.clone();
    let mut empty_pause = EMPTY_PASS_PAUSE;
    loop {
        if hub.is_shutting_down() {
            return;
        }
        hub.reading_timers();
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
                    // A timer looked due but the pass found nothing to do (see
                    // EMPTY_PASS_PAUSE). Such a pass commits nothing and costs little, but
                    // pause rather than spin on it, longer each time in a row; a timer that
                    // falls due within the pause still wakes it.
                    let pause_ms = empty_pause.as_millis() as i64;
                    hub.set_empty_pause_ms(pause_ms);
                    let until = store.clock.now().saturating_add(pause_ms);
                    if !wait(&hub, until, empty_pause).await {
                        return;
                    }
                    empty_pause = (empty_pause * 2).min(MAX_EMPTY_PASS_PAUSE);
                }
                Ok((_, reclaimed)) => {
                    empty_pause = EMPTY_PASS_PAUSE;
                    hub.set_empty_pause_ms(0);
                    log_reclaimed(&reclaimed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler pass failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        }
        empty_pause = EMPTY_PASS_PAUSE;
        hub.set_empty_pause_ms(0);
        let sleep = match next {
            Some(at) => Duration::from_millis((at - now).max(0) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        if !wait(&hub, next.unwrap_or(i64::MAX), sleep).await {
            return;
        }
    }
}

/// Sleeps for `sleep`, or until a timer earlier than `deadline` (wall clock) is set; false
/// when the server is shutting down.
async fn wait(hub: &Hub, deadline: Millis, sleep: Duration) -> bool {
    hub.set_timer_deadline(deadline);
    tokio::select! {
        _ = tokio::time::sleep(sleep) => true,
        _ = hub.timer.notified() => true,
        _ = hub.shutting_down() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    static OUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    struct Capture;

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            OUT.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// 5,000 agents that die together used to log 5,000 lines in a second.
    #[test]
    fn a_pass_logs_its_first_reclaimed_leases_and_one_line_for_the_rest() {
        let reclaimed: Vec<Reclaimed> = (0..30)
            .map(|i| Reclaimed {
                task_id: format!("task-{i}"),
                project_id: 1,
                agent: "a".into(),
                will_retry: i % 3 != 0,
            })
            .collect();
        let logs = tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(logs, || log_reclaimed(&reclaimed));
        let out = String::from_utf8(OUT.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), RECLAIMED_LOGGED + 1, "{out}");
        assert_eq!(out.matches("task reclaimed").count(), RECLAIMED_LOGGED);
        assert!(out.contains("task=task-19") && !out.contains("task=task-20"));
        // Of tasks 20-29, those whose number is a multiple of 3 failed for good: 21, 24, 27.
        assert!(out.contains("more=10 requeued=7 failed=3"), "{out}");
    }
}

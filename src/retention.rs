//! Retention: finished tasks are deleted once they are older than their project's retention
//! for their status (a project's override, else the server's `--retain-*` default; 0 keeps
//! them forever), by a pass on a timer (`--prune-interval-secs`, 30 s by default), never
//! lazily on a read.
//!
//! A pass seeks each project's ENDED index (finished tasks by end time, per status) up to the
//! cutoff and deletes in chunks of [`CHUNK`] tasks, one write each, yielding between them:
//! claims and completes queue behind one chunk at most, never behind a million-task prune.
//! Each deletion goes through `put_task`, so counters, indexes, attempts and executions move
//! with the rows, and a crash mid-pass loses nothing (every chunk is its own transaction; the
//! next pass finds what is left). Invariant: a task is deleted only when its end lies at or
//! before `now - retention` by the store's clock.

use std::sync::Arc;
use std::time::Duration;

use crate::model::{Millis, Project, ProjectStatus, TaskStatus};
use crate::store::write::delete_ended;
use crate::store::Store;

/// Tasks deleted per write: a write of 250 takes ~2 ms, so a claim queued behind one waits
/// little (1,000 a write deleted 1.4x faster but held claims up to ~8 ms; docs/BENCHMARKS.md).
pub const CHUNK: usize = 250;

/// The statuses retention applies to.
pub const FINAL: [TaskStatus; 3] = [
    TaskStatus::Completed,
    TaskStatus::Failed,
    TaskStatus::Cancelled,
];

/// The server's retention, per final status, in seconds (0 = forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl Default for Defaults {
    /// River's and Oban's order of magnitude: a week for completed and cancelled tasks, a
    /// month for failed ones (someone may still want to look at them).
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Defaults {
            completed: 7 * DAY,
            failed: 30 * DAY,
            cancelled: 7 * DAY,
        }
    }
}

impl Defaults {
    /// The retention of `status` in `project`, in seconds (0 = forever).
    pub fn for_project(&self, project: &Project, status: TaskStatus) -> u64 {
        project.retention.of(status).unwrap_or(match status {
            TaskStatus::Completed => self.completed,
            TaskStatus::Failed => self.failed,
            TaskStatus::Cancelled => self.cancelled,
            _ => 0,
        })
    }
}

/// Parses a duration as the `--retain-*` flags take it: `7d`, `12h`, `30m`, `90s`, or a bare
/// number of seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (7d, 12h, 30m, 90s or seconds)"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is one of d, h, m, s")),
    };
    n.checked_mul(unit)
        .filter(|s| *s <= 315_360_000)
        .ok_or_else(|| format!("{text:?} is longer than ten years"))
}

/// Runs passes every `every` until shutdown.
pub async fn run(store: Arc<Store>, defaults: Defaults, every: Duration) {
    let hub = store.hub.clone();
    loop {
        tokio::select! {
            _ = hub.shutting_down() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match prune(&store, &defaults).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                tasks = n,
                "retention: finished tasks past their age deleted"
            ),
            Err(e) if hub.is_shutting_down() => {
                tracing::debug!(error = %e, "retention pass cut short by shutdown");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "retention pass failed; the next one retries"),
        }
    }
}

/// One pass over every project: deletes what is past its retention. Returns how many tasks.
/// A project with nothing due costs one index seek per status and no write.
pub async fn prune(store: &Arc<Store>, defaults: &Defaults) -> crate::error::Result<u64> {
    // Snapshots are taken and dropped at once: one held through the pass would keep every
    // page its deletes free from being reused until it ended.
    let (projects, _) = store.read()?.projects(None, &|_| true, usize::MAX, 0)?;
    let mut total = 0u64;
    for (p, _) in projects {
        if p.status == ProjectStatus::Deleting {
            continue;
        }
        for status in FINAL {
            let secs = defaults.for_project(&p, status);
            if secs == 0 {
                continue;
            }
            let cutoff: Millis = store
                .clock
                .now()
                .saturating_sub((secs as i64).saturating_mul(1000));
            if !store.read()?.has_ended_by(p.id, status, cutoff)? {
                continue;
            }
            let n = delete_all_ended(store, p.id, status, cutoff).await?;
            crate::telemetry::tasks_pruned(p.id, status, n);
            total += n;
        }
    }
    Ok(total)
}

/// Deletes every task of `project` in final `status` that ended at or before `cutoff`,
/// [`CHUNK`] a write, yielding between writes (retention and delete by filter). How many.
pub async fn delete_all_ended(
    store: &Arc<Store>,
    project: u128,
    status: TaskStatus,
    cutoff: Millis,
) -> crate::error::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = store
            .write(move |w| delete_ended(w, project, status, cutoff, CHUNK))
            .await?;
        total += n as u64;
        if n < CHUNK || store.hub.is_shutting_down() {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_the_flags_take_them() {
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("30m"), Ok(1_800));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration(" 45 "), Ok(45));
        for bad in ["", "d", "7w", "-1d", "1.5h", "99999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

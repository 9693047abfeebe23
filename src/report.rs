//! What a committed write batch did, as plain data: the writer fills a [`BatchReport`] as its
//! operations change rows, and after the commit one place (`store::writer`) hands it to the
//! metrics (`telemetry::record_batch`) and to the wake-ups (`Hub::publish`).
//!
//! Boundary: knows the rows (`model`) and nothing else, so the store, the hub and the
//! metrics can each depend on it without depending on one another.

use std::collections::HashMap;

use crate::model::{Millis, Outcome, Task, TaskStatus};

/// Everything a committed batch did that someone outside the store acts on.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Tasks that became available to claim, by project and task type (None: untyped).
    pub ready: HashMap<(u128, Option<u128>), usize>,
    pub earliest_timer: Option<Millis>,
    /// Projects whose pollers all look again: no task event announces their ready tasks (a
    /// closed project reopened with tasks queued).
    pub wake_all: Vec<u128>,
    /// How long each task handed out in the batch had waited, ready, in ms.
    pub waits: Vec<Millis>,
    /// How each lease that ended in the batch ended, and how long it had run, in ms.
    pub runs: Vec<(Outcome, Millis)>,
    /// Task transitions by project, for the counters.
    pub events: HashMap<(u128, TaskEvent), u64>,
}

impl BatchReport {
    pub fn ready(&mut self, project: u128, type_id: Option<u128>) {
        *self.ready.entry((project, type_id)).or_default() += 1;
    }

    pub fn timer(&mut self, at: Millis) {
        self.earliest_timer = Some(self.earliest_timer.map_or(at, |t| t.min(at)));
    }
}

/// What one task transition counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskEvent {
    Created,
    Claimed,
    Completed,
    Failed,
    Retried,
    LeaseExpired,
    Cancelled,
}

impl TaskEvent {
    pub const ALL: [TaskEvent; 7] = [
        TaskEvent::Created,
        TaskEvent::Claimed,
        TaskEvent::Completed,
        TaskEvent::Failed,
        TaskEvent::Retried,
        TaskEvent::LeaseExpired,
        TaskEvent::Cancelled,
    ];
}

/// How long a task that this change hands out had waited, ready (ms).
pub fn claim_wait(old: &Task, new: &Task, now: Millis) -> Option<Millis> {
    let claimed = old.status == TaskStatus::Queued && new.status == TaskStatus::Running;
    claimed.then(|| now.saturating_sub(old.ready_since()).max(0))
}

/// How a lease that this change ends ended, and how long it had run (ms).
pub fn lease_run(old: &Task, new: &Task) -> Option<(Outcome, Millis)> {
    if old.status != TaskStatus::Running || new.status == TaskStatus::Running {
        return None;
    }
    let a = new.attempts.last()?;
    let ran = a.ended_at?.saturating_sub(a.started_at).max(0);
    Some((a.outcome, ran))
}

/// The events a row change means (deletions count as nothing).
pub fn task_events(old: Option<&Task>, new: Option<&Task>, out: &mut Vec<TaskEvent>) {
    let Some(n) = new else { return };
    let Some(o) = old else {
        out.push(TaskEvent::Created);
        return;
    };
    if o.status == n.status {
        return;
    }
    let timed_out = o.status == TaskStatus::Running
        && n.attempts
            .last()
            .is_some_and(|a| a.outcome == Outcome::Timeout);
    if timed_out {
        out.push(TaskEvent::LeaseExpired);
    }
    out.push(match n.status {
        TaskStatus::Running => TaskEvent::Claimed,
        TaskStatus::Completed => TaskEvent::Completed,
        TaskStatus::Failed => TaskEvent::Failed,
        TaskStatus::Cancelled => TaskEvent::Cancelled,
        TaskStatus::Queued => TaskEvent::Retried,
    });
}

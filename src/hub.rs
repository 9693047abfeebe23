//! Wake-ups between the writer, long-polling agents, the scheduler and shutdown.
//!
//! The writer reports, after each commit, which projects gained available tasks and the
//! earliest new timer (lease expiry or `notBefore`). Long-pollers wait on their project's
//! [`Notify`]; the scheduler waits on [`Hub::timer`]. Nothing here polls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::model::Millis;
use crate::telemetry::{self, TaskEvent};

/// What one committed batch changed that someone may be waiting for.
#[derive(Debug, Default)]
pub struct Effects {
    pub ready_projects: Vec<u128>,
    pub earliest_timer: Option<Millis>,
    /// Task transitions by project, for the counters.
    pub events: HashMap<(u128, TaskEvent), u64>,
}

impl Effects {
    pub fn ready(&mut self, project: u128) {
        if self.ready_projects.last() != Some(&project) {
            self.ready_projects.push(project);
        }
    }

    pub fn timer(&mut self, at: Millis) {
        self.earliest_timer = Some(self.earliest_timer.map_or(at, |t| t.min(at)));
    }
}

pub struct Hub {
    projects: Mutex<HashMap<u128, Arc<Notify>>>,
    /// Wakes the scheduler (reaper) when a timer earlier than its deadline appears.
    pub timer: Notify,
    /// The instant the scheduler currently sleeps until (`i64::MAX` when it has nothing).
    timer_deadline: AtomicI64,
    shutdown: watch::Sender<bool>,
    waiters: AtomicUsize,
    /// When the first committed lease expires (`i64::MAX`: none). The writer keeps the leases
    /// in memory and sets this after each batch; the scheduler sleeps until it.
    first_lease: AtomicI64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            projects: Mutex::default(),
            timer: Notify::new(),
            timer_deadline: AtomicI64::new(i64::MAX),
            shutdown: watch::channel(false).0,
            waiters: AtomicUsize::new(0),
            first_lease: AtomicI64::new(i64::MAX),
        }
    }
}

impl Hub {
    /// The notifier long-pollers of `project` wait on.
    pub fn project(&self, project: u128) -> Arc<Notify> {
        let mut map = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(project).or_default().clone()
    }

    pub fn forget_project(&self, project: u128) {
        let mut map = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.remove(&project) {
            n.notify_waiters();
        }
    }

    /// Called by the writer after a commit.
    pub fn publish(&self, fx: Effects) {
        if !fx.events.is_empty() {
            telemetry::publish_events(&fx.events);
        }
        if !fx.ready_projects.is_empty() {
            let map = self.projects.lock().unwrap_or_else(|e| e.into_inner());
            for p in fx.ready_projects {
                if let Some(n) = map.get(&p) {
                    n.notify_waiters();
                }
            }
        }
        if let Some(at) = fx.earliest_timer {
            if at < self.timer_deadline.load(Ordering::Acquire) {
                self.timer.notify_one();
            }
        }
    }

    pub fn set_first_lease(&self, at: Option<Millis>) {
        self.first_lease
            .store(at.unwrap_or(i64::MAX), Ordering::Release);
    }

    pub fn first_lease(&self) -> Option<Millis> {
        Some(self.first_lease.load(Ordering::Acquire)).filter(|at| *at != i64::MAX)
    }

    pub fn set_timer_deadline(&self, at: Millis) {
        self.timer_deadline.store(at, Ordering::Release);
    }

    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
        self.timer.notify_one();
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when shutdown has begun.
    pub async fn shutting_down(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    pub fn waiter_guard(self: &Arc<Self>) -> WaiterGuard {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        WaiterGuard(self.clone())
    }

    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }
}

/// Counts a long-poller while it waits.
pub struct WaiterGuard(Arc<Hub>);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

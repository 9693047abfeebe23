//! Wake-ups between the writer, long-polling agents, the scheduler and shutdown.
//!
//! The writer reports, after each commit, how many tasks became available per project and
//! task type, and the earliest new timer (lease expiry or `notBefore`). Long-pollers wait in
//! their project's queue ([`Hub::wait_for`]); each task that became available wakes the
//! longest-waiting poller that would accept it, one per task, not every poller of the
//! project. The scheduler waits on [`Hub::timer`]. Nothing here polls.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::model::Millis;
use crate::report::BatchReport;
use crate::telemetry;

pub struct Hub {
    /// Long-pollers by project, longest waiting first.
    waiting: Mutex<HashMap<u128, VecDeque<Arc<Waiter>>>>,
    /// Wakes the scheduler (reaper) when a timer earlier than its deadline appears.
    pub timer: Notify,
    /// The instant the scheduler currently sleeps until (`i64::MAX` when it has nothing).
    timer_deadline: AtomicI64,
    shutdown: watch::Sender<bool>,
    waiters: AtomicUsize,
    /// When the first committed lease expires (`i64::MAX`: none). The writer keeps the leases
    /// in memory and sets this after each batch; the scheduler sleeps until it.
    first_lease: AtomicI64,
    /// The scheduler's pause after its last pass that found nothing due, in ms (0: its last
    /// pass did something, or none ran). It doubles with each such pass in a row.
    empty_pause_ms: AtomicI64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            waiting: Mutex::default(),
            timer: Notify::new(),
            timer_deadline: AtomicI64::new(i64::MAX),
            shutdown: watch::channel(false).0,
            waiters: AtomicUsize::new(0),
            first_lease: AtomicI64::new(i64::MAX),
            empty_pause_ms: AtomicI64::new(0),
        }
    }
}

impl Hub {
    /// Queues a long-poller of `project` that accepts tasks of `types` (None: any task).
    /// Take the ticket *before* looking for a task, so that a task made available between
    /// the look and the wait still wakes it.
    pub fn wait_for(self: &Arc<Self>, project: u128, types: Option<&[u128]>) -> Ticket {
        let waiter = Arc::new(Waiter {
            types: types.map(Box::from),
            wake: Notify::new(),
            woken_for: Mutex::new(None),
        });
        self.lock_waiting()
            .entry(project)
            .or_default()
            .push_back(waiter.clone());
        Ticket {
            hub: self.clone(),
            project,
            waiter,
            used: false,
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u128, VecDeque<Arc<Waiter>>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes up to `n` of the project's pollers that accept a task of `type_id`, longest
    /// waiting first, and takes them out of the queue.
    fn wake(
        waiting: &mut HashMap<u128, VecDeque<Arc<Waiter>>>,
        project: u128,
        type_id: Option<u128>,
        mut n: usize,
    ) {
        Self::retain_waiting(waiting, project, |w| {
            if n == 0 || !w.accepts(type_id) {
                return true;
            }
            n -= 1;
            w.wake_for(type_id);
            false
        });
    }

    /// Keeps the project's pollers for which `keep` holds, and forgets an emptied queue.
    fn retain_waiting(
        waiting: &mut HashMap<u128, VecDeque<Arc<Waiter>>>,
        project: u128,
        keep: impl FnMut(&Arc<Waiter>) -> bool,
    ) {
        if let Some(queue) = waiting.get_mut(&project) {
            queue.retain(keep);
            if queue.is_empty() {
                waiting.remove(&project);
            }
        }
    }

    /// Wakes every poller of the project to look again, and takes them out of its queue
    /// (each looks, then queues again if it found nothing): the project was deleted (their
    /// look answers 404) or reopened with tasks waiting, which no task event announces.
    pub fn wake_all(&self, project: u128) {
        Self::wake_all_in(&mut self.lock_waiting(), project);
    }

    fn wake_all_in(waiting: &mut HashMap<u128, VecDeque<Arc<Waiter>>>, project: u128) {
        if let Some(queue) = waiting.remove(&project) {
            for w in queue {
                w.wake_for(None);
            }
        }
    }

    /// Wakes who a committed batch concerns: a poller for each task it made available, every
    /// poller of a project it asks to wake, and the scheduler for a timer earlier than its
    /// deadline. Called by the writer after each commit.
    pub fn publish(&self, fx: &BatchReport) {
        if !fx.ready.is_empty() || !fx.wake_all.is_empty() {
            let mut waiting = self.lock_waiting();
            if !waiting.is_empty() {
                for (&(project, type_id), &n) in &fx.ready {
                    Self::wake(&mut waiting, project, type_id, n);
                }
                for &project in &fx.wake_all {
                    Self::wake_all_in(&mut waiting, project);
                }
            }
        }
        if let Some(at) = fx.earliest_timer {
            if at < self.timer_deadline.load(Ordering::SeqCst) {
                self.timer.notify_one();
            }
        }
    }

    // The timer handshake between the writer and the scheduler (SeqCst: each side stores,
    // then loads what the other stores, and one of them must see the other's store). The
    // writer sets `first_lease` (and commits the stored timers), then compares its earliest
    // timer with `timer_deadline`. The scheduler sets `timer_deadline` to MAX
    // ([`Hub::reading_timers`]), then reads the timers, then sets the deadline it will sleep
    // to. A timer the read missed was published after the MAX was stored, so it wakes the
    // scheduler, which reads again.

    pub fn set_first_lease(&self, at: Option<Millis>) {
        self.first_lease
            .store(at.unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    /// The scheduler's current pause after passes that found nothing due, in ms (0: none).
    pub fn empty_pause_ms(&self) -> Millis {
        self.empty_pause_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn set_empty_pause_ms(&self, ms: Millis) {
        self.empty_pause_ms.store(ms, Ordering::Relaxed);
    }

    pub fn first_lease(&self) -> Option<Millis> {
        Some(self.first_lease.load(Ordering::SeqCst)).filter(|at| *at != i64::MAX)
    }

    /// The scheduler is about to read the timers: until it sets the deadline it will sleep
    /// to, any timer published wakes it, as it may be earlier than what the read finds.
    pub fn reading_timers(&self) {
        self.timer_deadline.store(i64::MAX, Ordering::SeqCst);
    }

    pub fn set_timer_deadline(&self, at: Millis) {
        self.timer_deadline.store(at, Ordering::SeqCst);
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
        WaiterGuard {
            hub: self.clone(),
            answered: false,
        }
    }

    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }
}

/// Counts a long-poller while it waits. Dropped before [`WaiterGuard::answered`], the
/// long-poll's request was dropped because its client left, which
/// `agentq_long_polls_abandoned_total` counts.
pub struct WaiterGuard {
    hub: Arc<Hub>,
    answered: bool,
}

impl WaiterGuard {
    /// The long-poll has its answer: a task, none, or an error.
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.hub.waiters.fetch_sub(1, Ordering::Relaxed);
        if !self.answered {
            telemetry::long_poll_abandoned();
        }
    }
}

/// One long-poller in its project's queue.
struct Waiter {
    /// The task types it accepts (None: any task, typed or not).
    types: Option<Box<[u128]>>,
    wake: Notify,
    /// Set, under the hub's lock, when a task of this type (None: untyped) woke it.
    woken_for: Mutex<Option<Option<u128>>>,
}

impl Waiter {
    /// Wakes it for a task of `type_id` (None: untyped, or its project was deleted).
    fn wake_for(&self, type_id: Option<u128>) {
        *self.woken_for.lock().unwrap_or_else(|e| e.into_inner()) = Some(type_id);
        self.wake.notify_one();
    }

    fn accepts(&self, type_id: Option<u128>) -> bool {
        match (&self.types, type_id) {
            (None, _) => true,
            (Some(types), Some(t)) => types.contains(&t),
            (Some(_), None) => false,
        }
    }
}

/// A long-poller's place in its project's queue, from [`Hub::wait_for`]. Dropping it leaves
/// the queue. A poller that was woken but does not finish looking again (it found a task
/// anyway, timed out, its client left, or its look failed) passes the wake-up on to the next
/// poller that accepts the task, so that no available task waits for a poller's deadline.
/// A woken ticket is kept until the look it calls for has ended, then given to
/// [`Ticket::looked`].
pub struct Ticket {
    hub: Arc<Hub>,
    project: u128,
    waiter: Arc<Waiter>,
    /// The look the wake-up called for has ended: nothing to pass on.
    used: bool,
}

impl Ticket {
    /// Resolves when a task this poller accepts became available (or its project was
    /// deleted). Look again after it, and hand the ticket to [`Ticket::looked`] when that
    /// look has ended.
    pub async fn woken(&mut self) {
        self.waiter.wake.notified().await;
    }

    /// The look after the wake-up ended, with a task or with none (another agent took it
    /// first): the wake-up was answered and is not passed on.
    pub fn looked(mut self) {
        self.used = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiting = self.hub.lock_waiting();
        let woken_for = self
            .waiter
            .woken_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match woken_for {
            Some(type_id) if !self.used => Hub::wake(&mut waiting, self.project, type_id, 1),
            Some(_) => {}
            None => Hub::retain_waiting(&mut waiting, self.project, |w| {
                !Arc::ptr_eq(w, &self.waiter)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether the ticket's wake-up is there without waiting (a stored wake-up resolves on
    /// the first poll; a missing one never will).
    async fn woken(t: &mut Ticket) -> bool {
        tokio::time::timeout(Duration::ZERO, t.woken())
            .await
            .is_ok()
    }

    fn ready(hub: &Hub, project: u128, type_id: Option<u128>, n: usize) {
        let mut fx = BatchReport::default();
        for _ in 0..n {
            fx.ready(project, type_id);
        }
        hub.publish(&fx);
    }

    #[tokio::test]
    async fn each_available_task_wakes_one_poller_the_longest_waiting() {
        let hub = Arc::new(Hub::default());
        let mut tickets: Vec<Ticket> = (0..5).map(|_| hub.wait_for(1, None)).collect();
        let mut other_project = hub.wait_for(2, None);
        ready(&hub, 1, None, 1);
        let mut woke = Vec::new();
        for t in tickets.iter_mut() {
            woke.push(woken(t).await);
        }
        assert_eq!(woke, [true, false, false, false, false]);
        ready(&hub, 1, Some(7), 2);
        for (i, t) in tickets.iter_mut().enumerate().skip(1) {
            assert_eq!(woken(t).await, i <= 2, "poller {i}");
        }
        assert!(!woken(&mut other_project).await);
    }

    #[tokio::test]
    async fn a_task_wakes_only_a_poller_that_accepts_its_type() {
        let hub = Arc::new(Hub::default());
        let mut a = hub.wait_for(1, Some(&[10]));
        let mut b = hub.wait_for(1, Some(&[20, 30]));
        let mut any = hub.wait_for(1, None);
        ready(&hub, 1, Some(30), 1);
        assert!(!woken(&mut a).await);
        assert!(woken(&mut b).await);
        assert!(!woken(&mut any).await);
        // An untyped task: only a poller without typeIds may take it.
        ready(&hub, 1, None, 1);
        assert!(!woken(&mut a).await);
        assert!(woken(&mut any).await);
    }

    #[tokio::test]
    async fn a_wake_up_left_unused_goes_to_the_next_poller() {
        let hub = Arc::new(Hub::default());
        let first = hub.wait_for(1, Some(&[10]));
        let mut only_20 = hub.wait_for(1, Some(&[20]));
        let mut second = hub.wait_for(1, None);
        ready(&hub, 1, Some(10), 1);
        // The first poller leaves without looking again (it timed out, say).
        drop(first);
        assert!(!woken(&mut only_20).await, "it does not take type 10");
        assert!(woken(&mut second).await, "the wake-up was passed on");
        // A wake-up whose look ended is not passed on.
        let mut third = hub.wait_for(1, None);
        second.looked();
        assert!(!woken(&mut third).await);
        // A poller that leaves unwoken just leaves the queue.
        drop(only_20);
        assert_eq!(hub.lock_waiting()[&1].len(), 1, "only the third is queued");
        ready(&hub, 1, Some(20), 1);
        assert!(woken(&mut third).await);
    }

    /// Whether the scheduler's `Notify` holds a wake-up.
    async fn scheduler_woken(hub: &Hub) -> bool {
        tokio::time::timeout(Duration::ZERO, hub.timer.notified())
            .await
            .is_ok()
    }

    fn publish_timer(hub: &Hub, at: Millis) {
        let mut fx = BatchReport::default();
        fx.timer(at);
        hub.publish(&fx);
    }

    /// A lease committed while the scheduler reads the timers (its read missed it; it has not
    /// yet set the deadline it will sleep to) must wake it. It used to be compared with the
    /// deadline the last sleep left behind, already past, so it woke nobody: the scheduler
    /// slept to the timer it had read (up to an hour when none) while the lease expired.
    #[tokio::test]
    async fn a_timer_published_while_the_scheduler_reads_wakes_it() {
        let hub = Hub::default();
        hub.set_timer_deadline(1_000);
        assert!(!scheduler_woken(&hub).await);
        hub.reading_timers();
        publish_timer(&hub, 60_000);
        hub.set_timer_deadline(i64::MAX);
        assert!(scheduler_woken(&hub).await, "it reads the timers again");
        // Once it sleeps to a deadline, only an earlier timer wakes it.
        hub.set_timer_deadline(60_000);
        publish_timer(&hub, 120_000);
        assert!(!scheduler_woken(&hub).await);
        publish_timer(&hub, 30_000);
        assert!(scheduler_woken(&hub).await);
    }

    #[tokio::test]
    async fn deleting_a_project_wakes_all_its_pollers() {
        let hub = Arc::new(Hub::default());
        let mut tickets: Vec<Ticket> = (0..3).map(|_| hub.wait_for(1, Some(&[5]))).collect();
        hub.wake_all(1);
        for t in tickets.iter_mut() {
            assert!(woken(t).await);
        }
        drop(tickets);
        assert!(hub.lock_waiting().is_empty());
    }
}

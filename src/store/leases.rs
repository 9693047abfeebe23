//! The leases held now, in memory: which task each agent holds, and the leases in the order
//! they fall due.
//!
//! The durable record of a lease is its task row (status `running`, with `lease`) and the
//! task's BY_STATUS index entry, whose value carries the lease's expiry and agent (see
//! [`super::schema::ix::lease_value`]). This cache is derived from those entries: the writer
//! loads it at start-up and again after a batch that did not commit, and keeps it in step in
//! [`super::tables::Tables::put_task`]. Running tasks are bounded by the agents working, so
//! loading it reads a few entries per agent, never all tasks.
//!
//! Keeping these two lookups out of the B-tree saves four of the ten index changes of a claim
//! and its complete, about a fifth of the writer's CPU per cycle (docs/STORAGE.md).
//!
//! **A step of the system clock never reclaims a lease early.** A lease's expiry is a wall-clock
//! instant (it is stored, shown to agents and must survive a restart), but a wall clock can
//! jump: an NTP step, a VM restored from a snapshot, an operator's `date -s`. Jumped forward by
//! an hour, it would make every lease look expired at once and hand every running task to a
//! second agent while the first still works on it. So each lease also has a deadline on the
//! steady clock ([`Clock::steady`], the machine's monotonic clock), set when the lease is taken
//! or extended, or when the cache is loaded (from the wall-clock time it had left then), and a
//! lease is due only when both its wall-clock expiry and its steady deadline have passed.
//! A step backward makes no lease due early either: it delays reclaiming by the step, which
//! loses nothing (the holder may still complete).

use std::collections::{BTreeSet, HashMap};

use redb::ReadableTable;

use super::schema::{ix, INDEX, PROJECTS};
use crate::error::Result;
use crate::model::{Millis, Task, TaskStatus};
use crate::time::Clock;

/// Most leases [`Leases::next_due`] looks at after each batch.
const NEXT_DUE_WALK: usize = 256;

#[derive(Debug, Default, Clone)]
pub struct Leases {
    /// project → agent → seq of the task the agent holds.
    by_agent: HashMap<u128, HashMap<String, u64>>,
    /// (steady deadline, seq): the first to pass its deadline first.
    by_deadline: BTreeSet<(Millis, u64)>,
    /// seq → (leaseExpiresAt, steady deadline).
    of_task: HashMap<u64, (Millis, Millis)>,
    /// The time of the batch being run: wall clock and steady clock ([`Self::set_time`]).
    now: Millis,
    steady: Millis,
}

/// Two caches are equal when they hold the same leases: the same holders and expiries. The
/// steady deadlines are not compared: they depend on when each cache saw the lease (a
/// lease loaded after its expiry is due at once, wherever its deadline fell before).
impl PartialEq for Leases {
    fn eq(&self, other: &Self) -> bool {
        let expiries = |l: &Leases| -> HashMap<u64, Millis> {
            l.of_task.iter().map(|(seq, e)| (*seq, e.0)).collect()
        };
        self.by_agent == other.by_agent && expiries(self) == expiries(other)
    }
}

impl Leases {
    /// An empty cache at the clock's current time.
    pub fn at(clock: &dyn Clock) -> Self {
        let mut leases = Leases::default();
        leases.set_time(clock.now(), clock.steady());
        leases
    }

    /// Loads the leases from the running tasks' BY_STATUS entries of every project; each gets
    /// a steady deadline as far off as its expiry is on the wall clock now.
    pub fn load<T>(
        projects: &T,
        index: &impl ReadableTable<&'static [u8], &'static [u8]>,
        clock: &dyn Clock,
    ) -> Result<Self>
    where
        T: ReadableTable<u128, &'static [u8]>,
    {
        let mut leases = Leases::at(clock);
        for p in projects.iter()? {
            let project = p?.0.value();
            let prefix = ix::K::new(ix::BY_STATUS)
                .u128(project)
                .u8(TaskStatus::Running.code());
            let end = ix::end_of(&prefix);
            for r in index.range::<&[u8]>(prefix.as_slice()..end.as_slice())? {
                let (k, v) = r?;
                if let Some((expires, agent)) = ix::parse_lease_value(v.value()) {
                    leases.insert(project, agent.to_string(), expires, ix::seq_of(k.value()));
                }
            }
        }
        Ok(leases)
    }

    /// Loads the leases from a read snapshot of `db` (after a batch that did not commit),
    /// keeping the deadlines `before` had ([`Self::keep_deadlines`]).
    pub fn reload(db: &redb::Database, clock: &dyn Clock, before: &Leases) -> Result<Self> {
        use redb::ReadableDatabase;
        let txn = db.begin_read()?;
        let mut fresh = Self::load(&txn.open_table(PROJECTS)?, &txn.open_table(INDEX)?, clock)?;
        fresh.keep_deadlines(before);
        Ok(fresh)
    }

    /// A lease that `before` also held, with the same expiry, keeps the steady deadline it
    /// had there: a cache loaded again (after a failed batch, or when the file is opened
    /// again after an I/O error) must not measure a lease again from a wall clock that may
    /// have stepped since.
    pub fn keep_deadlines(&mut self, before: &Leases) {
        for (&seq, (expires, deadline)) in self.of_task.iter_mut() {
            match before.of_task.get(&seq) {
                Some(&(e, old)) if e == *expires && old != *deadline => {
                    self.by_deadline.remove(&(*deadline, seq));
                    self.by_deadline.insert((old, seq));
                    *deadline = old;
                }
                _ => {}
            }
        }
    }

    /// Sets the time of the batch about to run: leases taken or extended in it get their
    /// steady deadline from it, and [`Self::due`] looks at it.
    pub fn set_time(&mut self, now: Millis, steady: Millis) {
        self.now = now;
        self.steady = steady;
    }

    fn insert(&mut self, project: u128, agent: String, expires: Millis, seq: u64) {
        let deadline = self
            .steady
            .saturating_add(expires.saturating_sub(self.now).max(0));
        self.by_agent.entry(project).or_default().insert(agent, seq);
        self.by_deadline.insert((deadline, seq));
        self.of_task.insert(seq, (expires, deadline));
    }

    fn remove(&mut self, seq: u64) {
        if let Some((_, deadline)) = self.of_task.remove(&seq) {
            self.by_deadline.remove(&(deadline, seq));
        }
    }

    /// Moves a task's lease from what `old` held to what `new` holds.
    pub fn apply(&mut self, old: Option<&Task>, new: Option<&Task>) {
        fn lease_of(t: Option<&Task>) -> Option<(&Task, &crate::model::Lease)> {
            t.and_then(|t| t.lease.as_ref().map(|l| (t, l)))
        }
        let (before, after) = (lease_of(old), lease_of(new));
        if before.map(|(t, l)| (t.project_id, l)) == after.map(|(t, l)| (t.project_id, l)) {
            return;
        }
        if let Some((t, l)) = before {
            if let Some(agents) = self.by_agent.get_mut(&t.project_id) {
                if agents.get(&l.agent) == Some(&t.seq) {
                    agents.remove(&l.agent);
                }
                if agents.is_empty() {
                    self.by_agent.remove(&t.project_id);
                }
            }
            self.remove(t.seq);
        }
        if let Some((t, l)) = after {
            self.insert(t.project_id, l.agent.clone(), l.expires_at, t.seq);
        }
    }

    /// The seq of the task `agent` holds in `project`.
    pub fn held(&self, project: u128, agent: &str) -> Option<u64> {
        self.by_agent.get(&project)?.get(agent).copied()
    }

    /// Seqs of the leases due at the batch's time (both `expiresAt <= now` and the steady
    /// deadline passed), in the order of their deadlines, at most `limit`.
    pub fn due(&self, limit: usize) -> Vec<u64> {
        self.by_deadline
            .range(..=(self.steady, u64::MAX))
            .filter(|(_, seq)| self.of_task.get(seq).is_some_and(|e| e.0 <= self.now))
            .take(limit)
            .map(|(_, seq)| *seq)
            .collect()
    }

    /// When, on the wall clock, the next lease becomes due: the earliest over the leases of
    /// the later of its expiry and the wall-clock time at which its steady deadline passes.
    /// Leases are walked in deadline order, and the walk stops at the first whose deadline
    /// alone comes after the best found, so it looks at one or two leases unless the wall
    /// clock stepped back (then every lease taken before the step is past its deadline and
    /// waits for its expiry). It looks at 256 leases at most (`NEXT_DUE_WALK`), and then answers
    /// the deadline it reached if that is earlier: never later than the true time, so the
    /// reaper may look early (and find nothing), never late.
    pub fn next_due(&self) -> Option<Millis> {
        let mut best = None::<Millis>;
        for (n, &(deadline, seq)) in self.by_deadline.iter().enumerate() {
            // No lease from here on is due before its steady deadline.
            let floor = self
                .now
                .saturating_add(deadline.saturating_sub(self.steady));
            if best.is_some_and(|b| floor >= b) {
                break;
            }
            if n == NEXT_DUE_WALK {
                return Some(floor);
            }
            let expires = self.of_task.get(&seq).map_or(floor, |e| e.0);
            let due = expires.max(floor);
            best = Some(best.map_or(due, |b| b.min(due)));
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lease;

    const MIN: Millis = 60_000;

    /// Task `seq` leased to `agent` until `expires`, as of the cache's batch time.
    fn lease(leases: &mut Leases, seq: u64, agent: &str, expires: Millis) {
        let mut t = Task::queued(seq, format!("t{seq}"), 1, 0);
        t.status = TaskStatus::Running;
        t.lease = Some(Lease {
            agent: agent.into(),
            token: 0,
            assigned_at: 0,
            expires_at: expires,
        });
        leases.apply(None, Some(&t));
    }

    #[test]
    fn without_a_step_a_lease_is_due_at_its_expiry() {
        let mut l = Leases::default();
        assert_eq!(l.next_due(), None);
        l.set_time(1_000, 0);
        lease(&mut l, 1, "a", 1_000 + MIN);
        lease(&mut l, 2, "b", 1_000 + 2 * MIN);
        assert_eq!(l.next_due(), Some(1_000 + MIN));
        l.set_time(1_000 + MIN - 1, MIN - 1);
        assert!(l.due(10).is_empty());
        l.set_time(1_000 + MIN, MIN);
        assert_eq!(l.due(10), vec![1]);
        assert_eq!(l.held(1, "b"), Some(2));
        l.set_time(1_000 + 2 * MIN, 2 * MIN);
        assert_eq!(l.due(10), vec![1, 2], "both held, both due");
    }

    #[test]
    fn a_wall_clock_stepped_forward_waits_for_the_steady_deadline() {
        let mut l = Leases::default();
        l.set_time(1_000, 0);
        lease(&mut l, 1, "a", 1_000 + MIN);
        // An hour's step, ten seconds later: expired on the wall clock, not in fact.
        let stepped = 1_000 + 10_000 + 3_600_000;
        l.set_time(stepped, 10_000);
        assert!(l.due(10).is_empty());
        assert_eq!(l.next_due(), Some(stepped + MIN - 10_000));
        l.set_time(stepped + MIN - 10_000, MIN);
        assert_eq!(l.due(10), vec![1]);
    }

    /// After a step back, the leases taken before it wait for their wall-clock expiry, and a
    /// lease taken after it, due sooner though its steady deadline is later, is the next.
    #[test]
    fn a_wall_clock_stepped_back_delays_the_older_leases_only() {
        let mut l = Leases::default();
        l.set_time(10 * MIN, 0);
        lease(&mut l, 1, "a", 11 * MIN);
        lease(&mut l, 2, "b", 11 * MIN + 1);
        // Back an hour, one second later; then a lease of a minute.
        let back = 10 * MIN + 1_000 - 3_600_000;
        l.set_time(back, 1_000);
        lease(&mut l, 3, "c", back + MIN);
        assert_eq!(l.next_due(), Some(back + MIN));
        l.set_time(back + MIN, 1_000 + MIN);
        assert_eq!(
            l.due(10),
            vec![3],
            "the older leases are past their deadline only"
        );
        l.remove(3); // reclaimed
        assert_eq!(l.next_due(), Some(11 * MIN));
        l.set_time(11 * MIN, 1_000 + MIN + 3_600_000);
        assert_eq!(l.due(10), vec![1]);
    }

    /// After a step back, past the walk's bound, the next look is early rather than late.
    #[test]
    fn a_long_walk_answers_no_later_than_the_next_lease_due() {
        let mut l = Leases::default();
        l.set_time(10 * MIN, 0);
        let n = NEXT_DUE_WALK as u64 + 10;
        for seq in 0..n {
            lease(&mut l, seq, &format!("a{seq}"), 11 * MIN + seq as Millis);
        }
        // Back an hour, after the leases' minute: all past their deadline, none expired.
        let back = 11 * MIN + n as Millis - 3_600_000;
        l.set_time(back, MIN + n as Millis);
        lease(&mut l, n, "late", back + 10);
        assert!(l.due(usize::MAX).is_empty());
        let next = l.next_due().unwrap();
        assert!(next <= back + 10, "{next} is after the new lease's expiry");
    }

    /// A cache loaded again keeps the deadlines of the leases it still holds unchanged.
    #[test]
    fn a_reloaded_cache_keeps_the_deadlines_it_had() {
        let mut before = Leases::default();
        before.set_time(0, 0);
        lease(&mut before, 1, "a", MIN);
        lease(&mut before, 2, "b", MIN);
        // Loaded an hour's step later (the wall clock only): measured again, both look due.
        let mut fresh = Leases::default();
        fresh.set_time(3_600_000, 1_000);
        lease(&mut fresh, 1, "a", MIN);
        lease(&mut fresh, 2, "b", 3_600_000 + MIN); // extended meanwhile: measured anew
        assert_eq!(fresh.due(10), vec![1]);
        fresh.keep_deadlines(&before);
        assert!(fresh.due(10).is_empty());
        fresh.set_time(3_600_000 + MIN - 1_000, MIN);
        assert_eq!(fresh.due(10), vec![1]);
        // Task 2's lease changed (extended), so it keeps its new deadline, not the old one: a
        // second forward step does not make it due before that.
        fresh.set_time(2 * 3_600_000, MIN);
        assert_eq!(fresh.due(10), vec![1]);
        fresh.set_time(3_600_000 + MIN, 1_000 + MIN);
        assert_eq!(fresh.due(10), vec![1, 2]);
    }

    /// The cache compared with the committed leases (the store model's check) compares holders
    /// and expiries, not when each cache saw a lease.
    #[test]
    fn equal_caches_hold_the_same_leases_whatever_their_deadlines() {
        let mut a = Leases::default();
        a.set_time(0, 0);
        lease(&mut a, 1, "a", MIN);
        let mut b = Leases::default();
        b.set_time(0, 500);
        lease(&mut b, 1, "a", MIN);
        assert_eq!(a, b);
        lease(&mut b, 2, "b", MIN);
        assert_ne!(a, b);
        // The same holder under another expiry, and another holder under the same expiry,
        // are other leases.
        let mut later = Leases::default();
        lease(&mut later, 1, "a", MIN + 1);
        assert_ne!(a, later);
        let mut other = Leases::default();
        lease(&mut other, 1, "z", MIN);
        assert_ne!(a, other);
    }
}

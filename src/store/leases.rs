//! The leases held now, in memory: which task each agent holds, and the leases by expiry.
//!
//! The durable record of a lease is its task row (status `running`, with `lease`) and the
//! task's BY_STATUS index entry, whose value carries the lease's expiry and agent (see
//! [`super::tables::ix::lease_value`]). This cache is derived from those entries: the writer
//! loads it at start-up and again after a batch that did not commit, and keeps it in step in
//! [`super::tables::Tables::put_task`]. Running tasks are bounded by the agents working, so
//! loading it reads a few entries per agent, never all tasks.
//!
//! Keeping these two lookups out of the B-tree saves four of the ten index changes of a claim
//! and its complete (measured in docs/BENCHMARKS.md).

use std::collections::{BTreeSet, HashMap};

use redb::ReadableTable;

use super::tables::{ix, INDEX, PROJECTS};
use crate::error::Result;
use crate::model::{Millis, Task, TaskStatus};

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Leases {
    /// project → agent → seq of the task the agent holds.
    by_agent: HashMap<u128, HashMap<String, u64>>,
    /// (leaseExpiresAt, seq): the first expires next.
    by_expiry: BTreeSet<(Millis, u64)>,
}

impl Leases {
    /// Loads the leases from the running tasks' BY_STATUS entries of every project.
    pub fn load<T>(
        projects: &T,
        index: &impl ReadableTable<&'static [u8], &'static [u8]>,
    ) -> Result<Self>
    where
        T: ReadableTable<u128, &'static [u8]>,
    {
        let mut leases = Leases::default();
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

    /// Loads the leases from a read snapshot of `db`.
    pub fn load_db(db: &redb::Database) -> Result<Self> {
        use redb::ReadableDatabase;
        let txn = db.begin_read()?;
        Self::load(&txn.open_table(PROJECTS)?, &txn.open_table(INDEX)?)
    }

    fn insert(&mut self, project: u128, agent: String, expires: Millis, seq: u64) {
        self.by_agent.entry(project).or_default().insert(agent, seq);
        self.by_expiry.insert((expires, seq));
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
            self.by_expiry.remove(&(l.expires_at, t.seq));
        }
        if let Some((t, l)) = after {
            self.insert(t.project_id, l.agent.clone(), l.expires_at, t.seq);
        }
    }

    /// The seq of the task `agent` holds in `project`.
    pub fn held(&self, project: u128, agent: &str) -> Option<u64> {
        self.by_agent.get(&project)?.get(agent).copied()
    }

    /// Seqs of leases expired at `now` (`expiresAt <= now`), oldest first, at most `limit`.
    pub fn due(&self, now: Millis, limit: usize) -> Vec<u64> {
        self.by_expiry
            .range(..=(now, u64::MAX))
            .take(limit)
            .map(|(_, seq)| *seq)
            .collect()
    }

    /// When the next lease expires.
    pub fn first_expiry(&self) -> Option<Millis> {
        self.by_expiry.first().map(|(at, _)| *at)
    }

    pub fn len(&self) -> usize {
        self.by_expiry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_expiry.is_empty()
    }
}

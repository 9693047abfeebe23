//! The tables of one write batch: every write to the database goes through [`Tables`], whose
//! [`Tables::put_task`] is the only code that writes task rows and bodies, and [`Tracked`],
//! which notes every write so that a batch that wrote nothing is not committed. Also the
//! migrations of older files. The layout itself is in [`super::schema`].
//!
//! Invariant: for every task row, exactly the index entries that [`index_entries`] derives
//! from it exist, the project's counters equal the rows they count, and there is one body in
//! [`TASK_BODIES`] (and no other); `put_task` keeps all of it in step by diffing old and new.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::ops::Deref;

use redb::{Key, ReadableTable, Table, TableDefinition, Value, WriteTransaction};

use super::leases::Leases;
pub use super::schema::*;
use crate::error::Result;
use crate::model::{Activity, ApiKey, Project, Session, Stats, Task, TaskStatus, TaskType};

/// A table of the batch's write transaction that notes whether the batch wrote to it.
///
/// Reads go to the redb table (through `Deref`); the only ways to change it are
/// [`Tracked::insert`] and [`Tracked::remove`], because there is no `DerefMut`: the compiler
/// sees to it that no write escapes the note. A batch that wrote nothing is not committed
/// (no fsync): see [`Tables::written`].
pub struct Tracked<'txn, K: Key + 'static, V: Value + 'static> {
    table: Table<'txn, K, V>,
    written: bool,
}

impl<'txn, K: Key + 'static, V: Value + 'static> Tracked<'txn, K, V> {
    fn open(txn: &'txn WriteTransaction, def: TableDefinition<K, V>) -> Result<Self> {
        Ok(Tracked {
            table: txn.open_table(def)?,
            written: false,
        })
    }

    pub fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<()> {
        self.written = true;
        self.table.insert(key, value)?;
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn remove<'k>(&mut self, key: impl Borrow<K::SelfType<'k>>) -> Result<bool> {
        let found = self.table.remove(key)?.is_some();
        self.written |= found;
        Ok(found)
    }
}

impl<'txn, K: Key + 'static, V: Value + 'static> Deref for Tracked<'txn, K, V> {
    type Target = Table<'txn, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// Every table, opened once per write transaction (one batch of the writer), and the
/// writer's lease cache, which [`Tables::put_task`] keeps in step with the rows.
pub struct Tables<'txn> {
    pub meta: Tracked<'txn, &'static str, u64>,
    pub projects: Tracked<'txn, u128, &'static [u8]>,
    pub project_names: Tracked<'txn, &'static str, u128>,
    pub types: Tracked<'txn, u128, &'static [u8]>,
    pub type_names: Tracked<'txn, (u128, &'static str), u128>,
    pub tasks: Tracked<'txn, u64, &'static [u8]>,
    pub bodies: Tracked<'txn, u64, &'static [u8]>,
    pub executions: Tracked<'txn, (u64, u32), &'static [u8]>,
    pub task_ids: Tracked<'txn, &'static str, u64>,
    pub index: Tracked<'txn, &'static [u8], &'static [u8]>,
    pub keys: Tracked<'txn, u128, &'static [u8]>,
    pub sessions: Tracked<'txn, [u8; 32], &'static [u8]>,
    pub sessions_by_key: Tracked<'txn, (u128, u128), [u8; 32]>,
    pub session_expiry: Tracked<'txn, (i64, u128), [u8; 32]>,
    pub leases: &'txn mut Leases,
    /// Project counters changed in this batch, written once by [`Tables::flush`] rather than
    /// read and rewritten on every transition (a claim and a complete each move a counter).
    stats: HashMap<u128, Option<Stats>>,
    /// Activity of this batch by (project, minute), added to the stored rows by
    /// [`Tables::flush`].
    activity: HashMap<(u128, i64), Activity>,
}

/// The minutes of activity `/stats` reports: the current one and the 59 before it.
pub const ACTIVITY_REPORTED_MINUTES: i64 = 60;
/// How many minutes of activity a project keeps: the reported hour, and one more so that the
/// oldest reported minute is never pruned while it is being read.
pub const ACTIVITY_MINUTES: i64 = ACTIVITY_REPORTED_MINUTES + 1;

impl<'txn> Tables<'txn> {
    pub fn open(txn: &'txn WriteTransaction, leases: &'txn mut Leases) -> Result<Self> {
        Ok(Tables {
            meta: Tracked::open(txn, META)?,
            projects: Tracked::open(txn, PROJECTS)?,
            project_names: Tracked::open(txn, PROJECT_NAMES)?,
            types: Tracked::open(txn, TYPES)?,
            type_names: Tracked::open(txn, TYPE_NAMES)?,
            tasks: Tracked::open(txn, TASKS)?,
            bodies: Tracked::open(txn, TASK_BODIES)?,
            executions: Tracked::open(txn, EXECUTIONS)?,
            task_ids: Tracked::open(txn, TASK_IDS)?,
            index: Tracked::open(txn, INDEX)?,
            keys: Tracked::open(txn, KEYS)?,
            sessions: Tracked::open(txn, SESSIONS)?,
            sessions_by_key: Tracked::open(txn, SESSIONS_BY_KEY)?,
            session_expiry: Tracked::open(txn, SESSION_EXPIRY)?,
            leases,
            stats: HashMap::new(),
            activity: HashMap::new(),
        })
    }

    pub fn project(&self, id: u128) -> Result<Option<Project>> {
        match self.projects.get(id)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn project_id_by_name(&self, name: &str) -> Result<Option<u128>> {
        Ok(self.project_names.get(name)?.map(|v| v.value()))
    }

    pub fn put_project(&mut self, p: &Project) -> Result<()> {
        self.projects.insert(p.id, encode(p)?.as_slice())?;
        Ok(())
    }

    pub fn stats(&self, project: u128) -> Result<Stats> {
        if let Some(pending) = self.stats.get(&project) {
            return Ok(pending.unwrap_or_default());
        }
        Ok(self
            .index
            .get(ix::stats(project).as_slice())?
            .map(|v| Stats::from_bytes(v.value()))
            .unwrap_or_default())
    }

    pub fn put_stats(&mut self, project: u128, stats: Stats) {
        self.stats.insert(project, Some(stats));
    }

    /// Removes a (deleted) project's counters and activity.
    pub fn drop_counters(&mut self, project: u128) -> Result<()> {
        self.stats.insert(project, None);
        self.activity.retain(|(p, _), _| *p != project);
        self.remove_prefix(&ix::K::new(ix::ACTIVITY).u128(project))
    }

    /// Removes the index entries with keys in `from..to`.
    fn remove_index_range(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        for k in self.keys_in(from, to, usize::MAX)? {
            self.index.remove(k.as_slice())?;
        }
        Ok(())
    }

    /// Removes the index entries under `prefix`.
    fn remove_prefix(&mut self, prefix: &[u8]) -> Result<()> {
        self.remove_index_range(prefix, &ix::end_of(prefix))
    }

    /// Whether the batch changed anything (call after [`Tables::flush`]). One that did not,
    /// say every claim in it found no task, has nothing to make durable and is not committed.
    pub fn written(&self) -> bool {
        self.meta.written
            || self.projects.written
            || self.project_names.written
            || self.types.written
            || self.type_names.written
            || self.tasks.written
            || self.task_ids.written
            || self.index.written
            || self.keys.written
            || self.sessions.written
            || self.sessions_by_key.written
            || self.session_expiry.written
    }

    /// Writes what the batch left pending. The writer calls it once, before commit.
    pub fn flush(&mut self) -> Result<()> {
        for (project, stats) in std::mem::take(&mut self.stats) {
            let key = ix::stats(project);
            match stats {
                Some(s) => self.index.insert(key.as_slice(), s.to_bytes().as_slice())?,
                None => {
                    self.index.remove(key.as_slice())?;
                }
            }
        }
        for ((project, minute), delta) in std::mem::take(&mut self.activity) {
            let key = ix::activity(project, minute);
            let stored = self
                .index
                .get(key.as_slice())?
                .map(|v| Activity::from_bytes(v.value()));
            if stored.is_none() {
                // A project's first activity in a new minute: forget the minutes that have
                // left the window (a seek, at most once a minute per project).
                let from = ix::K::new(ix::ACTIVITY).u128(project);
                let to = ix::activity(project, minute - ACTIVITY_MINUTES + 1);
                self.remove_index_range(&from, &to)?;
            }
            let mut total = stored.unwrap_or_default();
            total.add(delta);
            self.index
                .insert(key.as_slice(), total.to_bytes().as_slice())?;
        }
        Ok(())
    }

    /// Keys under `prefix`, in order.
    pub fn keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.first_keys(prefix, usize::MAX)
    }

    /// The first `limit` keys under `prefix`, in order.
    pub fn first_keys(&self, prefix: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        self.keys_in(prefix, &ix::end_of(prefix), limit)
    }

    /// The first `limit` keys in `from..to`, in order.
    fn keys_in(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for r in self.index.range::<&[u8]>(from..to)?.take(limit) {
            out.push(r?.0.value().to_vec());
        }
        Ok(out)
    }

    /// Seqs of a time-ordered index (DELAYED or LEASES) whose time is `<= now`, oldest first.
    pub fn due(&self, kind: u8, now: i64, limit: usize) -> Result<Vec<u64>> {
        let start = [kind];
        let end = ix::K::new(kind).i64(now).u64(u64::MAX);
        let mut out = Vec::new();
        for r in self.index.range::<&[u8]>(&start[..]..=end.as_slice())? {
            if out.len() >= limit {
                break;
            }
            out.push(ix::seq_of(r?.0.value()));
        }
        Ok(out)
    }

    /// Up to `limit` seqs of `project`'s tasks in final `status` that ended at or before
    /// `cutoff`, oldest end first (the ENDED index).
    pub fn ended_by(
        &self,
        project: u128,
        status: u8,
        cutoff: i64,
        limit: usize,
    ) -> Result<Vec<u64>> {
        let start = ix::K::new(ix::ENDED).u128(project).u8(status);
        let end = start.i64(cutoff).u64(u64::MAX);
        let mut out = Vec::new();
        for r in self
            .index
            .range::<&[u8]>(start.as_slice()..=end.as_slice())?
            .take(limit)
        {
            out.push(ix::seq_of(r?.0.value()));
        }
        Ok(out)
    }

    /// The first key under `prefix`, if any.
    pub fn first_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>> {
        let end = ix::end_of(prefix);
        match self.index.range::<&[u8]>(prefix..end.as_slice())?.next() {
            Some(r) => Ok(Some(r?.0.value().to_vec())),
            None => Ok(None),
        }
    }

    pub fn task_type(&self, id: u128) -> Result<Option<TaskType>> {
        match self.types.get(id)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn put_type(&mut self, t: &TaskType) -> Result<()> {
        self.types.insert(t.id, encode(t)?.as_slice())?;
        Ok(())
    }

    pub fn key(&self, id: u128) -> Result<Option<ApiKey>> {
        match self.keys.get(id)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn session(&self, token_hash: &[u8; 32]) -> Result<Option<Session>> {
        match self.sessions.get(token_hash)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes a session and its two index entries (moving the expiry entry if it changed).
    pub fn put_session(
        &mut self,
        hash: &[u8; 32],
        old: Option<&Session>,
        s: &Session,
    ) -> Result<()> {
        if let Some(o) = old {
            self.session_expiry.remove((o.expires_at, o.id))?;
        }
        self.sessions.insert(hash, encode(s)?.as_slice())?;
        self.sessions_by_key.insert((s.key_id, s.id), hash)?;
        self.session_expiry.insert((s.expires_at, s.id), hash)?;
        Ok(())
    }

    pub fn delete_session(&mut self, hash: &[u8; 32], s: &Session) -> Result<()> {
        self.sessions.remove(hash)?;
        self.sessions_by_key.remove((s.key_id, s.id))?;
        self.session_expiry.remove((s.expires_at, s.id))?;
        Ok(())
    }

    pub fn task(&self, seq: u64) -> Result<Option<Task>> {
        load_task(&*self.tasks, &*self.bodies, seq)
    }

    pub fn task_by_id(&self, id: &str) -> Result<Option<Task>> {
        match self.task_ids.get(id)? {
            Some(seq) => self.task(seq.value()),
            None => Ok(None),
        }
    }

    /// Writes (or deletes, with `new = None`) a task row and moves its index entries and its
    /// project's counters from what `old` implied to what `new` implies.
    pub fn put_task(&mut self, old: Option<&Task>, new: Option<&Task>) -> Result<()> {
        let (project, seq) = match (old, new) {
            (_, Some(t)) | (Some(t), None) => (t.project_id, t.seq),
            (None, None) => return Ok(()),
        };
        let before = old.map(index_entries).unwrap_or_default();
        let after = new.map(index_entries).unwrap_or_default();
        for (k, _) in &before {
            // A key that stays with a new value is overwritten by the insert below.
            if !after.iter().any(|(k2, _)| k2 == k) {
                self.index.remove(k.as_slice())?;
            }
        }
        for (k, v) in &after {
            if !before.iter().any(|(k2, v2)| k2 == k && v2 == v) {
                self.index.insert(k.as_slice(), v.as_slice())?;
            }
        }
        match (old, new) {
            (None, Some(t)) => {
                self.task_ids.insert(t.id.as_str(), t.seq)?;
            }
            (Some(t), None) => {
                self.task_ids.remove(t.id.as_str())?;
            }
            _ => {}
        }
        match new {
            Some(t) => {
                self.tasks.insert(seq, encode(t)?.as_slice())?;
                let same_body = old.is_some_and(|o| {
                    o.instructions == t.instructions
                        && o.variables == t.variables
                        && o.script == t.script
                });
                if !same_body {
                    self.bodies.insert(seq, encode_body(t)?.as_slice())?;
                }
            }
            None => {
                self.tasks.remove(seq)?;
                self.bodies.remove(seq)?;
                // By range, not by the attempts listed: the oldest fall out of a long history.
                let attempts: Vec<u32> = self
                    .executions
                    .range((seq, 0)..=(seq, u32::MAX))?
                    .map(|r| r.map(|(k, _)| k.value().1))
                    .collect::<std::result::Result<_, _>>()?;
                for attempt in attempts {
                    self.executions.remove((seq, attempt))?;
                }
            }
        }
        self.leases.apply(old, new);
        if let Some((minute, a)) = Activity::of(old, new) {
            self.activity.entry((project, minute)).or_default().add(a);
        }
        let so = old.map(|t| (t.status, t.status == TaskStatus::Queued && t.delayed));
        let sn = new.map(|t| (t.status, t.status == TaskStatus::Queued && t.delayed));
        if so != sn {
            let mut stats = self.stats(project)?;
            stats.apply(so, sn);
            self.put_stats(project, stats);
        }
        Ok(())
    }
}

/// Turns a schema 1 file into schema 2 inside the caller's transaction: each leased task's
/// lease moves into the value of its BY_STATUS entry, the LEASES and AGENT entries go, and so
/// do the READY_TYPE entries of untyped tasks.
/// Returns the number of leases moved.
pub fn migrate_v1(t: &mut Tables) -> Result<usize> {
    let leased: Vec<u64> = t
        .keys(&[ix::LEASES])?
        .iter()
        .map(|k| ix::seq_of(k))
        .collect();
    for seq in &leased {
        if let Some(task) = t.task(*seq)? {
            if let Some(l) = &task.lease {
                let key = ix::by_status(
                    task.project_id,
                    task.status.code(),
                    task.created_at,
                    task.seq,
                );
                t.index.insert(
                    key.as_slice(),
                    ix::lease_value(l.expires_at, &l.agent).as_slice(),
                )?;
            }
        }
    }
    for kind in [ix::LEASES, ix::AGENT] {
        t.remove_prefix(&[kind])?;
    }
    // Untyped tasks' READY_TYPE entries (type 0): no claim with `typeIds` may match them.
    let projects: Vec<u128> = t
        .projects
        .iter()?
        .map(|r| r.map(|(k, _)| k.value()))
        .collect::<std::result::Result<_, _>>()?;
    for p in projects {
        t.remove_prefix(&ix::K::new(ix::READY_TYPE).u128(p).u128(0))?;
    }
    Ok(leased.len())
}

/// Turns a schema 3 file (or older) into schema 4 inside the caller's transaction: each
/// task's body moves from its row to [`TASK_BODIES`]. Runs before the older migrations, which
/// read rows the current way. Returns the number of tasks.
pub fn migrate_v3(t: &mut Tables) -> Result<usize> {
    const CHUNK: usize = 10_000;
    let mut n = 0;
    let mut from = 0u64;
    loop {
        let rows: Vec<(u64, Vec<u8>)> = t
            .tasks
            .range(from..)?
            .take(CHUNK)
            .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
            .collect::<std::result::Result<_, _>>()?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(n);
        };
        for (seq, bytes) in &rows {
            let (row, body) = split_inline_row(bytes)?;
            t.tasks.insert(*seq, row.as_slice())?;
            t.bodies.insert(*seq, body.as_slice())?;
        }
        n += rows.len();
        match last.checked_add(1) {
            Some(next) => from = next,
            None => return Ok(n),
        }
    }
}

/// Turns a schema 4 file (or older) into schema 5 inside the caller's transaction: each task
/// type row gets its `script` (none) and each key row its `allowScripts` (false), both
/// appended as postcard's one-byte encoding of `None` and `false`. Task bodies need nothing
/// ([`super::schema::decode_body`]). Returns the number of rows rewritten.
pub fn migrate_v4(t: &mut Tables) -> Result<usize> {
    Ok(append_none(&mut t.types)? + append_none(&mut t.keys)?)
}

/// Turns a schema 5 file (or older) into schema 6 inside the caller's transaction: each
/// project row gets its `retention` (three `None`s, the server's defaults), and each finished
/// task its ENDED entry. Returns the number of entries made.
pub fn migrate_v5(t: &mut Tables) -> Result<usize> {
    append_zeros(&mut t.projects, 3)?;
    let mut n = 0;
    for r in t.tasks.iter()? {
        let (_, v) = r?;
        let task = decode::<Task>(v.value())?;
        if let Some(ended) = task.ended_at() {
            let key = ix::ended(task.project_id, task.status.code(), ended, task.seq);
            t.index.insert(key.as_slice(), &[][..])?;
            n += 1;
        }
    }
    Ok(n)
}

/// Appends postcard's `None` (and `false`), a zero byte, to every row of `table`.
fn append_none(table: &mut Tracked<'_, u128, &'static [u8]>) -> Result<usize> {
    append_zeros(table, 1)
}

/// Appends `n` zero bytes to every row of `table`.
fn append_zeros(table: &mut Tracked<'_, u128, &'static [u8]>, n: usize) -> Result<usize> {
    let rows: Vec<(u128, Vec<u8>)> = table
        .iter()?
        .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
        .collect::<std::result::Result<_, _>>()?;
    for (id, row) in &rows {
        let mut row = row.clone();
        row.extend(std::iter::repeat_n(0, n));
        table.insert(*id, row.as_slice())?;
    }
    Ok(rows.len())
}

/// Turns a schema 2 file into schema 3 inside the caller's transaction: every task with a
/// `batchId` gets its BATCH entry. Returns how many.
pub fn migrate_v2(t: &mut Tables) -> Result<usize> {
    let mut n = 0;
    for r in t.tasks.iter()? {
        let (_, v) = r?;
        if let Some(key) = ix::batch(&decode::<Task>(v.value())?) {
            t.index.insert(key.as_slice(), &[][..])?;
            n += 1;
        }
    }
    Ok(n)
}

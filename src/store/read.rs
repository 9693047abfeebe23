//! Read queries on one MVCC snapshot. Nothing here writes or waits for the writer.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use redb::{ReadOnlyTable, ReadTransaction, ReadableTable};
use uuid::Uuid;

use super::tables::*;
use crate::error::{Error, Result};
use crate::model::{
    Activity, Execution, Millis, Project, ProjectStatus, Stats, Task, TaskStatus, TaskType,
};

pub struct Reader {
    txn: ReadTransaction,
}

impl Reader {
    /// The snapshot itself (the online backup copies every table from it).
    pub fn transaction(&self) -> &ReadTransaction {
        &self.txn
    }
}

/// Which tasks a listing wants and in which order.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub statuses: Vec<TaskStatus>,
    pub type_id: Option<u128>,
    pub assigned_to: Option<String>,
    pub batch_id: Option<String>,
    /// Strictly after / strictly before, in creation time.
    pub created_after: Option<Millis>,
    pub created_before: Option<Millis>,
    /// Filters no index serves: each task's row is read to apply them.
    pub priority: Option<u8>,
    /// Strictly after / strictly before, in last-change time.
    pub updated_after: Option<Millis>,
    pub updated_before: Option<Millis>,
    pub sort: Sort,
    pub desc: bool,
    pub limit: usize,
    pub offset: usize,
    pub cursor: Option<Cursor>,
}

impl TaskQuery {
    /// Whether a filter needs each task's row (no index holds its field).
    fn reads_rows(&self) -> bool {
        self.type_id.is_some()
            || self.assigned_to.is_some()
            || self.batch_id.is_some()
            || self.priority.is_some()
            || self.updated_after.is_some()
            || self.updated_before.is_some()
    }

    /// How many matching tasks come before the page when it is found by position: an
    /// offset cursor plus `offset`.
    fn offset_start(&self) -> usize {
        match self.cursor {
            Some(Cursor::Offset(o)) => o.saturating_add(self.offset),
            _ => self.offset,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sort {
    #[default]
    CreatedAt,
    UpdatedAt,
    Priority,
}

/// Where the previous page ended. For creation order it is the last key, so a deep page costs
/// what the first did; for the other orders it is an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    After(i64, u64),
    Offset(usize),
}

impl Cursor {
    pub fn encode(self) -> String {
        match self {
            Cursor::After(c, s) => format!("k{c}.{s}"),
            Cursor::Offset(o) => format!("o{o}"),
        }
    }

    /// Reads what [`Cursor::encode`] wrote. A key beyond the range of real keys, which the
    /// document's pattern allows, is clamped to that range's end: no task lies between the
    /// two, so the page is the same.
    pub fn decode(s: &str) -> Option<Cursor> {
        if let Some(rest) = s.strip_prefix('k') {
            let (c, q) = rest.split_once('.')?;
            let c = c
                .parse::<i128>()
                .ok()?
                .clamp(i64::MIN.into(), i64::MAX.into());
            let q = q.parse::<u128>().ok()?.min(u64::MAX.into());
            return Some(Cursor::After(c as i64, q as u64));
        }
        s.strip_prefix('o')?.parse().ok().map(Cursor::Offset)
    }
}

/// The (createdAt, seq) key right after `k`, if there is one.
fn key_after((c, s): (i64, u64)) -> Option<(i64, u64)> {
    match s.checked_add(1) {
        Some(s) => Some((c, s)),
        None => Some((c.checked_add(1)?, 0)),
    }
}

/// The (createdAt, seq) key right before `k`, if there is one.
fn key_before((c, s): (i64, u64)) -> Option<(i64, u64)> {
    match s.checked_sub(1) {
        Some(s) => Some((c, s)),
        None => Some((c.checked_sub(1)?, u64::MAX)),
    }
}

pub struct Page {
    pub tasks: Vec<Task>,
    pub total: u64,
    pub next: Option<Cursor>,
}

type KeyIter = Box<dyn Iterator<Item = Result<(i64, u64)>>>;
/// One source of a merge: its next key (peeked) and the rest.
type Head = (Option<Result<(i64, u64)>>, KeyIter);

impl Reader {
    pub fn new(txn: ReadTransaction) -> Self {
        Reader { txn }
    }

    fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: redb::TableDefinition<K, V>,
    ) -> Result<ReadOnlyTable<K, V>> {
        Ok(self.txn.open_table(def)?)
    }

    /// A project by id, else by unique name. A project being deleted is not found.
    pub fn project(&self, key: &str) -> Result<Project> {
        let projects = self.table(PROJECTS)?;
        let get = |id: u128| -> Result<Option<Project>> {
            match projects.get(id)? {
                Some(v) => Ok(Some(decode::<Project>(v.value())?)
                    .filter(|p| p.status != ProjectStatus::Deleting)),
                None => Ok(None),
            }
        };
        if let Ok(id) = Uuid::parse_str(key) {
            if let Some(p) = get(id.as_u128())? {
                return Ok(p);
            }
        }
        if let Some(id) = self.table(PROJECT_NAMES)?.get(key)? {
            if let Some(p) = get(id.value())? {
                return Ok(p);
            }
        }
        Err(Error::NotFound(format!("project {key} not found")))
    }

    pub fn stats(&self, project: u128) -> Result<Stats> {
        Ok(self
            .table(INDEX)?
            .get(ix::stats(project).as_slice())?
            .map(|v| Stats::from_bytes(v.value()))
            .unwrap_or_default())
    }

    /// What the project's tasks did in the hour up to `now` (its last 60 minutes, the current
    /// one included), minute by minute, oldest first: 60 entries of (minute, as Unix minutes;
    /// what ended in it), a minute without activity included as zeros.
    pub fn activity_by_minute(&self, project: u128, now: Millis) -> Result<Vec<(i64, Activity)>> {
        let minute = now.div_euclid(60_000);
        let first = minute - ACTIVITY_REPORTED_MINUTES + 1;
        let mut out: Vec<(i64, Activity)> =
            (first..=minute).map(|m| (m, Activity::default())).collect();
        for r in self.index_range(
            ix::activity(project, first).to_vec(),
            ix::activity(project, minute).to_vec(),
        )? {
            let (k, v) = r?;
            let at = ix::i64_at(k.value(), 17);
            if let Some(slot) = out.get_mut((at - first) as usize) {
                slot.1.add(Activity::from_bytes(v.value()));
            }
        }
        Ok(out)
    }

    /// When the project's oldest queued task was created (one seek on the status index).
    pub fn oldest_queued(&self, project: u128) -> Result<Option<Millis>> {
        let prefix = ix::K::new(ix::BY_STATUS)
            .u128(project)
            .u8(TaskStatus::Queued.code());
        let from = prefix.to_vec();
        let to = ix::end_of(&prefix);
        let first = self
            .table(INDEX)?
            .range::<&[u8]>(from.as_slice()..to.as_slice())?
            .next()
            .transpose()?;
        Ok(first.map(|(k, _)| ix::i64_at(k.value(), 18)))
    }

    /// Index entries under `prefix`, in key order (the iterator borrows nothing).
    fn index_range(
        &self,
        from: Vec<u8>,
        to_inclusive: Vec<u8>,
    ) -> Result<redb::Range<'static, &'static [u8], &'static [u8]>> {
        Ok(self
            .table(INDEX)?
            .range::<&[u8]>(from.as_slice()..=to_inclusive.as_slice())?)
    }

    /// Whether `project` has a task in final `status` that ended at or before `cutoff` (one
    /// seek on the ENDED index): retention writes only when there is something to delete.
    pub fn has_ended_by(&self, project: u128, status: TaskStatus, cutoff: i64) -> Result<bool> {
        let lo = ix::K::new(ix::ENDED).u128(project).u8(status.code());
        let hi = lo.i64(cutoff).u64(u64::MAX);
        Ok(self.index_range(lo.to_vec(), hi.to_vec())?.next().is_some())
    }

    /// The id of a project (by id) whose delete is running or was cut short.
    pub fn project_being_deleted(&self, key: &str) -> Result<Option<u128>> {
        let Ok(id) = Uuid::parse_str(key) else {
            return Ok(None);
        };
        Ok(match self.table(PROJECTS)?.get(id.as_u128())? {
            Some(v) if decode::<Project>(v.value())?.status == ProjectStatus::Deleting => {
                Some(id.as_u128())
            }
            _ => None,
        })
    }

    /// The projects marked for deletion whose delete has not finished.
    pub fn projects_being_deleted(&self) -> Result<Vec<u128>> {
        let mut out = Vec::new();
        for r in self.table(PROJECTS)?.iter()? {
            let (k, v) = r?;
            if decode::<Project>(v.value())?.status == ProjectStatus::Deleting {
                out.push(k.value());
            }
        }
        Ok(out)
    }

    /// Projects in creation order, filtered by status (None = all but those being deleted),
    /// with the total.
    pub fn projects(
        &self,
        status: Option<ProjectStatus>,
        visible: &dyn Fn(u128) -> bool,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<(Project, Stats)>, u64)> {
        let mut out = Vec::new();
        let mut total = 0u64;
        for r in self.table(PROJECTS)?.iter()? {
            let (_, v) = r?;
            let p: Project = decode(v.value())?;
            let shown = match status {
                Some(s) => s == p.status,
                None => p.status != ProjectStatus::Deleting,
            };
            if !shown || !visible(p.id) {
                continue;
            }
            total += 1;
            if total as usize > offset && out.len() < limit {
                let stats = self.stats(p.id)?;
                out.push((p, stats));
            }
        }
        Ok((out, total))
    }

    pub fn task_type(&self, id: &str) -> Result<TaskType> {
        let found = match Uuid::parse_str(id) {
            Ok(u) => self
                .table(TYPES)?
                .get(u.as_u128())?
                .map(|v| v.value().to_vec()),
            Err(_) => None,
        };
        match found {
            Some(bytes) => decode(&bytes),
            None => Err(Error::NotFound(format!("task type {id} not found"))),
        }
    }

    /// The id of the task type named `name` in `project`, if any.
    pub fn type_id_by_name(&self, project: u128, name: &str) -> Result<Option<u128>> {
        Ok(self
            .table(TYPE_NAMES)?
            .get((project, name))?
            .map(|v| v.value()))
    }

    /// A project's task types, by name.
    pub fn task_types(&self, project: u128) -> Result<Vec<TaskType>> {
        let types = self.table(TYPES)?;
        let mut out = Vec::new();
        for r in self.table(TYPE_NAMES)?.range((project, "")..)? {
            let (k, v) = r?;
            if k.value().0 != project {
                break;
            }
            if let Some(row) = types.get(v.value())? {
                out.push(decode(row.value())?);
            }
        }
        Ok(out)
    }

    pub fn task_by_seq(&self, seq: u64) -> Result<Option<Task>> {
        load_task(&self.table(TASKS)?, &self.table(TASK_BODIES)?, seq)
    }

    pub fn task(&self, id: &str) -> Result<Task> {
        with_body(&self.table(TASK_BODIES)?, self.task_row(id)?)
    }

    /// What the worker of each attempt of task `seq` reported, by attempt number.
    pub fn executions(&self, seq: u64) -> Result<BTreeMap<u32, Execution>> {
        let mut out = BTreeMap::new();
        for r in self.table(EXECUTIONS)?.range((seq, 0)..=(seq, u32::MAX))? {
            let (k, v) = r?;
            out.insert(k.value().1, decode(v.value())?);
        }
        Ok(out)
    }

    /// A task without its body (see [`load_row`]): enough for its project, status or attempts.
    pub fn task_row(&self, id: &str) -> Result<Task> {
        let seq = self.table(TASK_IDS)?.get(id)?.map(|v| v.value());
        match seq {
            Some(s) => load_row(&self.table(TASKS)?, s)?,
            None => None,
        }
        .ok_or_else(|| Error::NotFound(format!("task {id} not found")))
    }

    /// The running tasks of a project, one per agent, by agent name.
    pub fn leases(&self, project: u128) -> Result<Vec<Task>> {
        let mut out = Vec::new();
        let prefix = ix::K::new(ix::BY_STATUS)
            .u128(project)
            .u8(TaskStatus::Running.code());
        let end = ix::end_of(&prefix);
        for r in self
            .table(INDEX)?
            .range::<&[u8]>(prefix.as_slice()..end.as_slice())?
        {
            let (k, v) = r?;
            if ix::parse_lease_value(v.value()).is_none() {
                continue;
            }
            if let Some(t) = self.task_by_seq(ix::seq_of(k.value()))? {
                out.push(t);
            }
        }
        fn agent(t: &Task) -> Option<&str> {
            t.lease.as_ref().map(|l| l.agent.as_str())
        }
        out.sort_by(|a, b| agent(a).cmp(&agent(b)));
        Ok(out)
    }

    /// Tasks of the project that next-task could hand out now.
    pub fn available(&self, project: u128, now: Millis) -> Result<u64> {
        let stats = self.stats(project)?;
        let mut due = 0u64;
        let tasks = self.table(TASKS)?;
        let due_keys = self.index_range(
            vec![ix::DELAYED],
            ix::K::new(ix::DELAYED).i64(now).u64(u64::MAX).to_vec(),
        )?;
        for r in due_keys {
            let seq = ix::seq_of(r?.0.value());
            if let Some(v) = tasks.get(seq)? {
                let t: Task = decode(v.value())?;
                due += (t.project_id == project) as u64;
            }
        }
        Ok(stats.queued.saturating_sub(stats.delayed) + due)
    }

    /// For each of `projects`, how long, in ms up to `now`, the longest-waiting task at the
    /// front of its ready queue has waited: at each priority level, the task next-task would
    /// take first at that level, waiting since [`Task::ready_since`]. A project with no ready
    /// task is left out. A task stuck behind a `typeIds` filter no agent asks for, or a
    /// priority level starved by higher ones, keeps this growing.
    ///
    /// The tables are opened once for all projects; one seek and one row read per priority
    /// level that holds a ready task (at most 11 per project).
    pub fn longest_front_waits(
        &self,
        projects: impl IntoIterator<Item = u128>,
        now: Millis,
    ) -> Result<HashMap<u128, Millis>> {
        let index = self.table(INDEX)?;
        let tasks = self.table(TASKS)?;
        let mut waits = HashMap::new();
        for project in projects {
            let ready = ix::K::new(ix::READY).u128(project);
            let level_at = ready.len();
            let end = ix::end_of(&ready);
            let mut level = 0u8;
            while level <= 10 {
                let from = ready.u8(level);
                let Some(first) = index
                    .range::<&[u8]>(from.as_slice()..end.as_slice())?
                    .next()
                else {
                    break;
                };
                let key = first?.0;
                let key = key.value();
                if let Some(v) = tasks.get(ix::seq_of(key))? {
                    let t: Task = decode(v.value())?;
                    let waited = now.saturating_sub(t.ready_since()).max(0);
                    let longest = waits.entry(project).or_insert(waited);
                    *longest = (*longest).max(waited);
                }
                level = key[level_at] + 1;
            }
        }
        Ok(waits)
    }

    /// The earliest stored timer: a delayed task's `notBefore` or a session expiry. Lease
    /// expiries are in the writer's memory: [`super::Store::next_timer`] adds them.
    pub fn next_timer(&self) -> Result<Option<Millis>> {
        let first_time = |kind: u8| -> Result<Option<Millis>> {
            let mut it = self.index_range(vec![kind], ix::end_of(&[kind]))?;
            match it.next() {
                Some(r) => {
                    let k = r?.0.value().to_vec();
                    Ok((k.first() == Some(&kind)).then(|| ix::i64_at(&k, 1)))
                }
                None => Ok(None),
            }
        };
        let delay = first_time(ix::DELAYED)?;
        let session = super::keys::next_session_expiry(&self.txn)?;
        Ok([delay, session].into_iter().flatten().min())
    }

    /// Lists a project's tasks. Creation order walks an index from the cursor; the other
    /// orders collect the matching tasks and sort them.
    pub fn list_tasks(&self, project: u128, q: &TaskQuery) -> Result<Page> {
        // Only a running task has a lease (lease invariant 1), so `assignedTo` can match
        // running tasks only: walk those, not the whole project.
        let narrowed;
        let q = match q.assigned_to {
            Some(_) if q.statuses != [TaskStatus::Running] => {
                if !q.statuses.is_empty() && !q.statuses.contains(&TaskStatus::Running) {
                    return Ok(Page {
                        tasks: Vec::new(),
                        total: 0,
                        next: None,
                    });
                }
                narrowed = TaskQuery {
                    statuses: vec![TaskStatus::Running],
                    ..q.clone()
                };
                &narrowed
            }
            _ => q,
        };
        let l = Listing::new(self, project, q)?;
        // Queued tasks (of one type or all) are in the ready indexes or DELAYED: their order
        // by priority and their number need not read the tasks.
        let queued_only = q.statuses == [TaskStatus::Queued]
            && q.assigned_to.is_none()
            && q.batch_id.is_none()
            && q.priority.is_none()
            && q.updated_after.is_none()
            && q.updated_before.is_none()
            && !l.ranged;
        if queued_only && q.sort == Sort::Priority {
            return self.queued_by_priority(project, q, &|seq| l.row(seq), &|seq| l.load(seq));
        }
        let total = l.total(queued_only)?;
        match q.sort {
            Sort::CreatedAt => l.by_creation(total),
            Sort::UpdatedAt | Sort::Priority => l.by_sort_key(total),
        }
    }

    /// (priority, seq) of the project's queued tasks (of one type) that wait for their
    /// `notBefore`. They are filed by time for all projects together, and are few: back-offs
    /// and scheduled tasks.
    fn delayed_queued(
        &self,
        project: u128,
        type_id: Option<u128>,
        row: &dyn Fn(u64) -> Result<Option<Task>>,
    ) -> Result<Vec<(u8, u64)>> {
        let mut out = Vec::new();
        for r in self.index_range(vec![ix::DELAYED], ix::end_of(&[ix::DELAYED]))? {
            if let Some(t) = row(ix::seq_of(r?.0.value()))? {
                if t.project_id == project && type_id.is_none_or(|ty| t.type_id == Some(ty)) {
                    out.push((t.priority, t.seq));
                }
            }
        }
        Ok(out)
    }

    /// How many of the project's tasks (of one type) are queued, given how many of them are
    /// delayed: from the counters, or for one type by counting its ready index keys (a queued
    /// task is either ready or delayed) without reading the tasks.
    fn queued_total(&self, project: u128, type_id: Option<u128>, delayed: usize) -> Result<u64> {
        let Some(ty) = type_id else {
            return Ok(self.stats(project)?.queued);
        };
        let prefix = ix::K::new(ix::READY_TYPE).u128(project).u128(ty);
        let mut n = delayed as u64;
        for r in self.index_range(prefix.to_vec(), ix::end_of(&prefix))? {
            r?;
            n += 1;
        }
        Ok(n)
    }

    /// A page of a project's queued tasks by priority (of one type with `typeId`), from the
    /// ready index (one range per priority level, oldest first inside one) merged with the
    /// project's delayed tasks, which are queued but not in it: a page costs its offset and
    /// length, not the number of queued tasks. The order is the general path's: (priority,
    /// seq), both reversed for `desc`.
    fn queued_by_priority(
        &self,
        project: u128,
        q: &TaskQuery,
        row: &dyn Fn(u64) -> Result<Option<Task>>,
        load: &dyn Fn(u64) -> Result<Option<Task>>,
    ) -> Result<Page> {
        type Ranked = ((i16, i128), u64);
        let rank = |priority: u8, seq: u64| -> Ranked {
            let (p, s) = (i16::from(priority), i128::from(seq));
            (if q.desc { (-p, -s) } else { (p, s) }, seq)
        };
        let mut delayed: Vec<Ranked> = self
            .delayed_queued(project, q.type_id, row)?
            .into_iter()
            .map(|(priority, seq)| rank(priority, seq))
            .collect();
        let total = self.queued_total(project, q.type_id, delayed.len())?;
        let ready_key = |inv: u8, seq: u64| match q.type_id {
            Some(ty) => ix::ready_type(project, ty, inv, seq),
            None => ix::ready(project, inv, seq),
        };
        delayed.sort_unstable();
        let mut delayed = delayed.into_iter().peekable();
        // The ready index orders by 10 - priority, then seq: walk it level by level.
        let levels: Vec<u8> = if q.desc {
            (0..=10).collect()
        } else {
            (0..=10).rev().collect()
        };
        let mut ranges = Vec::with_capacity(levels.len());
        for inv in levels {
            let range = self.index_range(
                ready_key(inv, 0).to_vec(),
                ready_key(inv, u64::MAX).to_vec(),
            )?;
            ranges.push((inv, range));
        }
        let desc = q.desc;
        let mut ready = ranges
            .into_iter()
            .flat_map(move |(inv, range)| {
                let it: Box<dyn Iterator<Item = _>> = if desc {
                    Box::new(range.rev())
                } else {
                    Box::new(range)
                };
                it.map(move |r| r.map(|(k, _)| (10 - inv, ix::seq_of(k.value()))))
            })
            .map(|r| {
                r.map(|(priority, seq)| rank(priority, seq))
                    .map_err(Error::from)
            })
            .peekable();

        let start = q.offset_start();
        let merged = std::iter::from_fn(|| {
            let from_ready = match (ready.peek(), delayed.peek()) {
                (Some(Err(_)), _) => true,
                (Some(Ok(r)), Some(d)) => r < d,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return None,
            };
            let next = if from_ready {
                ready.next()?
            } else {
                delayed.next().map(Ok)?
            };
            Some(next.map(|(_, seq)| seq))
        });
        let (page, more) = take_page(merged, start, q.limit)?;
        let tasks = load_all(page, load)?;
        let next = more.then_some(Cursor::Offset(start.saturating_add(q.limit)));
        Ok(Page { tasks, total, next })
    }
}

/// One task listing being answered: the query (as narrowed) and what its steps share.
struct Listing<'r> {
    reader: &'r Reader,
    project: u128,
    q: &'r TaskQuery,
    tasks: ReadOnlyTable<u64, &'static [u8]>,
    bodies: ReadOnlyTable<u64, &'static [u8]>,
    /// The batch whose BATCH entries are walked: a batch's tasks, all statuses together
    /// (unless `assignedTo` narrowed the walk to the running tasks, fewer than a batch).
    batch: Option<u64>,
    /// The creation times asked for, inclusive.
    lo: i64,
    hi: i64,
    /// Whether a filter needs each task's row ([`TaskQuery::reads_rows`]).
    post_filtered: bool,
    /// Whether a range of creation times is asked for.
    ranged: bool,
}

impl<'r> Listing<'r> {
    fn new(reader: &'r Reader, project: u128, q: &'r TaskQuery) -> Result<Listing<'r>> {
        Ok(Listing {
            reader,
            project,
            q,
            tasks: reader.table(TASKS)?,
            bodies: reader.table(TASK_BODIES)?,
            batch: q
                .batch_id
                .as_deref()
                .filter(|_| q.assigned_to.is_none())
                .map(ix::batch_hash),
            lo: q.created_after.map_or(i64::MIN, |t| t.saturating_add(1)),
            hi: q.created_before.map_or(i64::MAX, |t| t.saturating_sub(1)),
            post_filtered: q.reads_rows(),
            ranged: q.created_after.is_some() || q.created_before.is_some(),
        })
    }

    /// A task's row, without its body: filtering and ordering read rows only.
    fn row(&self, seq: u64) -> Result<Option<Task>> {
        load_row(&self.tasks, seq)
    }

    /// A task whole, for the page answered.
    fn load(&self, seq: u64) -> Result<Option<Task>> {
        load_task(&self.tasks, &self.bodies, seq)
    }

    /// Whether a task read from the walk matches the filters the index did not apply.
    fn keep(&self, t: &Task) -> bool {
        let q = self.q;
        (self.batch.is_none() || q.statuses.is_empty() || q.statuses.contains(&t.status))
            && q.type_id.is_none_or(|ty| t.type_id == Some(ty))
            && q.assigned_to
                .as_deref()
                .is_none_or(|a| t.lease.as_ref().is_some_and(|l| l.agent == a))
            && q.batch_id
                .as_deref()
                .is_none_or(|b| t.batch_id.as_deref() == Some(b))
            && q.priority.is_none_or(|p| t.priority == p)
            && q.updated_after.is_none_or(|a| t.updated_at > a)
            && q.updated_before.is_none_or(|b| t.updated_at < b)
    }

    /// The index ranges to walk, each yielding (createdAt, seq) in the order asked, starting
    /// after `from` (exclusive: the last key of the previous page).
    fn sources(&self, from: Option<(i64, u64)>) -> Result<Vec<KeyIter>> {
        let (q, project) = (self.q, self.project);
        let (mut a, mut b) = ((self.lo, 0u64), (self.hi, u64::MAX));
        let mut out: Vec<KeyIter> = Vec::new();
        if let Some(k) = from {
            // No key lies beyond the ends of the key space: the page is empty.
            let next = if q.desc { key_before(k) } else { key_after(k) };
            match next {
                Some(n) if q.desc => b = n,
                Some(n) => a = n,
                None => return Ok(out),
            }
        }
        if a > b {
            return Ok(out);
        }
        // Each source is one index range: a prefix (project, project and status, or project
        // and batch) followed by (createdAt, seq), which the iterator yields.
        let prefixes: Vec<ix::K> = if let Some(hash) = self.batch {
            vec![ix::batch_prefix(project, hash)]
        } else if q.statuses.is_empty() {
            vec![ix::K::new(ix::BY_PROJECT).u128(project)]
        } else {
            q.statuses
                .iter()
                .map(|s| ix::K::new(ix::BY_STATUS).u128(project).u8(s.code()))
                .collect()
        };
        for prefix in prefixes {
            let at = prefix.len();
            let lo = prefix.i64(a.0).u64(a.1).to_vec();
            let hi = prefix.i64(b.0).u64(b.1).to_vec();
            let it = self.reader.index_range(lo, hi)?.map(move |r| {
                r.map(|(k, _)| {
                    let k = k.value();
                    (ix::i64_at(k, at), ix::u64_at(k, at + 8))
                })
                .map_err(Error::from)
            });
            out.push(if q.desc {
                Box::new(it.rev())
            } else {
                Box::new(it)
            });
        }
        Ok(out)
    }

    /// How many tasks match: from the counters when no filter needs the rows, else by
    /// walking the matching range.
    fn total(&self, queued_only: bool) -> Result<u64> {
        let (q, project, reader) = (self.q, self.project, self.reader);
        if queued_only && q.type_id.is_some() {
            let delayed = reader.delayed_queued(project, q.type_id, &|seq| self.row(seq))?;
            return reader.queued_total(project, q.type_id, delayed.len());
        }
        if !self.post_filtered && !self.ranged {
            let stats = reader.stats(project)?;
            return Ok(if q.statuses.is_empty() {
                stats.total
            } else {
                q.statuses.iter().map(|s| stats.get(*s)).sum()
            });
        }
        let mut n = 0u64;
        for it in self.sources(None)? {
            for k in it {
                let k = k?;
                if !self.post_filtered || self.row(k.1)?.is_some_and(|t| self.keep(&t)) {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// The page in creation order: a k-way merge of the index ranges from the cursor.
    fn by_creation(&self, total: u64) -> Result<Page> {
        let q = self.q;
        let (from, skip) = match q.cursor {
            Some(Cursor::After(c, s)) => (Some((c, s)), q.offset),
            _ => (None, q.offset_start()),
        };
        let merged = Merge::new(self.sources(from)?, q.desc);
        let (page, more) = if self.post_filtered {
            let matching = merged.filter_map(|k| match k.and_then(|k| self.row(k.1)) {
                Ok(Some(t)) if self.keep(&t) => Some(Ok(t)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            });
            let (page, more) = take_page(matching, skip, q.limit)?;
            let page = page.into_iter().map(|t| with_body(&self.bodies, t));
            (page.collect::<Result<Vec<_>>>()?, more)
        } else {
            // Every key matches: an offset skips keys, and only the page is read.
            let (seqs, more) = take_page(merged.map(|k| k.map(|k| k.1)), skip, q.limit)?;
            (load_all(seqs, &|seq| self.load(seq))?, more)
        };
        let next = if more {
            page.last().map(|t| Cursor::After(t.created_at, t.seq))
        } else {
            None
        };
        Ok(Page {
            tasks: page,
            total,
            next,
        })
    }

    /// The page in an order no index keeps (`updatedAt`, `priority`): walk the matching
    /// tasks and keep only the keys of the first `offset + limit` in a heap, so memory follows
    /// the page asked for, not the project's size. The page's tasks are loaded at the end.
    fn by_sort_key(&self, total: u64) -> Result<Page> {
        let q = self.q;
        let start = q.offset_start();
        let want = start.saturating_add(q.limit);
        // Ascending rank = the order of the answer; the heap's top is the worst rank kept.
        let rank = |t: &Task| -> (i128, i128) {
            let k = match q.sort {
                Sort::UpdatedAt => i128::from(t.updated_at),
                _ => i128::from(t.priority),
            };
            let seq = i128::from(t.seq);
            if q.desc {
                (-k, -seq)
            } else {
                (k, seq)
            }
        };
        let mut kept: BinaryHeap<((i128, i128), u64)> = BinaryHeap::new();
        let mut matched = 0usize;
        for it in self.sources(None)? {
            for k in it {
                if let Some(t) = self.row(k?.1)? {
                    if self.keep(&t) {
                        matched += 1;
                        kept.push((rank(&t), t.seq));
                        if kept.len() > want {
                            kept.pop();
                        }
                    }
                }
            }
        }
        let end = want.min(matched);
        let next = (end < matched).then_some(Cursor::Offset(end));
        let page = kept
            .into_sorted_vec()
            .into_iter()
            .skip(start)
            .map(|(_, seq)| seq);
        let tasks = load_all(page, &|seq| self.load(seq))?;
        Ok(Page { tasks, total, next })
    }
}

/// The tasks of `seqs`, in that order (a seq whose row is gone is left out).
fn load_all(
    seqs: impl IntoIterator<Item = u64>,
    load: &dyn Fn(u64) -> Result<Option<Task>>,
) -> Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for seq in seqs {
        tasks.extend(load(seq)?);
    }
    Ok(tasks)
}

/// Skips `skip` items, then takes up to `limit`: answers them, and whether more follow.
/// Errors of skipped items are not skipped.
fn take_page<T>(
    items: impl Iterator<Item = Result<T>>,
    skip: usize,
    limit: usize,
) -> Result<(Vec<T>, bool)> {
    let mut page = Vec::new();
    let mut skipped = 0usize;
    for item in items {
        let item = item?;
        if skipped < skip {
            skipped += 1;
        } else if page.len() == limit {
            return Ok((page, true));
        } else {
            page.push(item);
        }
    }
    Ok((page, false))
}

/// Merges key streams that are each sorted (ascending, or descending when `desc`).
struct Merge {
    heads: Vec<Head>,
    desc: bool,
}

impl Merge {
    fn new(iters: Vec<KeyIter>, desc: bool) -> Self {
        let heads = iters.into_iter().map(|mut it| (it.next(), it)).collect();
        Merge { heads, desc }
    }
}

impl Iterator for Merge {
    type Item = Result<(i64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut pick: Option<usize> = None;
        for (i, (head, _)) in self.heads.iter().enumerate() {
            match head {
                None => continue,
                Some(Err(_)) => {
                    pick = Some(i);
                    break;
                }
                Some(Ok(k)) => {
                    let better = match pick.and_then(|p| self.heads[p].0.as_ref()) {
                        Some(Ok(b)) => {
                            if self.desc {
                                k > b
                            } else {
                                k < b
                            }
                        }
                        _ => true,
                    };
                    if better {
                        pick = Some(i);
                    }
                }
            }
        }
        let i = pick?;
        let (head, it) = &mut self.heads[i];
        let out = head.take();
        *head = it.next();
        out
    }
}

//! Offline tools on a database file no server has open: `agentq check` (the rows against their
//! indexes and counters) and `agentq compact` (the file rewritten to its live size); and the
//! online backup's copy of one snapshot into a new file ([`copy_snapshot`]).
//!
//! The check reads one snapshot and holds no more than a count per index kind and the
//! counters per project: each task's expected entries are looked up one by one, and each kind
//! is counted once, so an entry the rows do not imply shows as a surplus. Memory stays flat
//! whatever the file's size.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::schema::{
    decode, index_entries, ix, load_task, EXECUTIONS, INDEX, META, PROJECTS, SCHEMA_VERSION, TASKS,
    TASK_BODIES, TASK_IDS,
};
use crate::error::{Error, Result};
use crate::model::{Project, Stats, TaskStatus};

/// Problems listed one by one; past this many only their number grows.
const LISTED: usize = 20;

/// What `agentq check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub schema_version: u64,
    pub projects: u64,
    pub tasks: u64,
    pub index_entries: u64,
    pub file_bytes: u64,
    /// The first problems found (up to 20); `problem_count` has them all.
    pub problems: Vec<String>,
    pub problem_count: u64,
}

impl CheckReport {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < LISTED {
            self.problems.push(p);
        }
    }
}

fn db_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!(
        "{}: {e} (is a server running on it? stop it first)",
        path.display()
    ))
}

/// Checks the file at `path`: every task has its body and id entry and a live project, every
/// index entry its rows imply is there with the right value and no other, and the counters
/// equal the rows.
pub fn check(path: &Path) -> Result<CheckReport> {
    let db = redb::Database::open(path).map_err(|e| db_error(path, e))?;
    let txn = db.begin_read().map_err(|e| db_error(path, e))?;
    let mut r = CheckReport {
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        ..CheckReport::default()
    };
    r.schema_version = txn
        .open_table(META)?
        .get("schema_version")?
        .map(|v| v.value())
        .unwrap_or(0);
    if r.schema_version != SCHEMA_VERSION {
        r.problem(format!(
            "schema {} where this agentq reads {SCHEMA_VERSION}: start a server on it once to \
             migrate it, then check",
            r.schema_version
        ));
        return Ok(r);
    }
    let projects = txn.open_table(PROJECTS)?;
    let mut live: HashMap<u128, bool> = HashMap::new();
    for row in projects.iter()? {
        let (id, v) = row?;
        let p: Project = decode(v.value())?;
        live.insert(
            id.value(),
            p.status != crate::model::ProjectStatus::Deleting,
        );
        r.projects += 1;
    }
    let tasks = txn.open_table(TASKS)?;
    let bodies = txn.open_table(TASK_BODIES)?;
    let ids = txn.open_table(TASK_IDS)?;
    let index = txn.open_table(INDEX)?;
    let mut expected_by_kind: BTreeMap<u8, u64> = BTreeMap::new();
    let mut counts: HashMap<u128, Stats> = HashMap::new();
    for row in tasks.iter()? {
        let seq = row?.0.value();
        r.tasks += 1;
        let t = match load_task(&tasks, &bodies, seq) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                r.problem(format!("task {seq}: its row or body cannot be read: {e}"));
                continue;
            }
        };
        if ids.get(t.id.as_str())?.map(|v| v.value()) != Some(seq) {
            r.problem(format!("task {}: its id does not lead to it", t.id));
        }
        if !live.contains_key(&t.project_id) {
            r.problem(format!("task {}: its project is gone", t.id));
        }
        for (k, v) in index_entries(&t) {
            *expected_by_kind.entry(k[0]).or_default() += 1;
            match index.get(k.as_slice())? {
                Some(stored) if stored.value() == v.as_slice() => {}
                Some(_) => r.problem(format!(
                    "task {}: its index entry of kind {} holds another value",
                    t.id, k[0]
                )),
                None => r.problem(format!(
                    "task {}: its index entry of kind {} is missing",
                    t.id, k[0]
                )),
            }
        }
        let c = counts.entry(t.project_id).or_default();
        c.total += 1;
        match t.status {
            TaskStatus::Queued => c.queued += 1,
            TaskStatus::Running => c.running += 1,
            TaskStatus::Completed => c.completed += 1,
            TaskStatus::Failed => c.failed += 1,
            TaskStatus::Cancelled => c.cancelled += 1,
        }
        c.delayed += (t.status == TaskStatus::Queued && t.delayed) as u64;
    }
    let id_entries = ids.len()?;
    if id_entries != r.tasks {
        r.problem(format!("{id_entries} task ids for {} tasks", r.tasks));
    }
    if bodies.len()? != r.tasks {
        r.problem(format!("{} bodies for {} tasks", bodies.len()?, r.tasks));
    }
    for row in txn.open_table(EXECUTIONS)?.iter()? {
        let ((seq, attempt), _) = {
            let (k, v) = row?;
            (k.value(), v.value().len())
        };
        if tasks.get(seq)?.is_none() {
            r.problem(format!(
                "an execution (attempt {attempt}) of task {seq}, which is gone"
            ));
        }
    }
    let mut stored_by_kind: BTreeMap<u8, u64> = BTreeMap::new();
    for row in index.iter()? {
        let (k, v) = row?;
        let k = k.value();
        r.index_entries += 1;
        match k[0] {
            ix::STATS => {
                let project = u128::from_be_bytes(k[1..17].try_into().unwrap_or_default());
                let stored = Stats::from_bytes(v.value());
                let implied = counts.remove(&project).unwrap_or_default();
                if live.get(&project) == Some(&true) && stored != implied {
                    r.problem(format!(
                        "project {}: counters {stored:?} where its tasks make {implied:?}",
                        uuid::Uuid::from_u128(project)
                    ));
                }
            }
            ix::ACTIVITY => {}
            kind => *stored_by_kind.entry(kind).or_default() += 1,
        }
    }
    for (project, implied) in counts {
        if implied != Stats::default() && live.get(&project) == Some(&true) {
            r.problem(format!(
                "project {}: no counters for its {} tasks",
                uuid::Uuid::from_u128(project),
                implied.total
            ));
        }
    }
    for kind in expected_by_kind
        .keys()
        .chain(stored_by_kind.keys())
        .copied()
        .collect::<std::collections::BTreeSet<u8>>()
    {
        let (want, have) = (
            expected_by_kind.get(&kind).copied().unwrap_or(0),
            stored_by_kind.get(&kind).copied().unwrap_or(0),
        );
        if want != have {
            r.problem(format!(
                "index kind {kind}: {have} entries where the tasks imply {want}"
            ));
        }
    }
    Ok(r)
}

/// Rewrites the file at `path` to its live size (redb's compaction); the sizes before and
/// after, in bytes.
pub fn compact(path: &Path) -> Result<(u64, u64)> {
    let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let before = size();
    let mut db = redb::Database::open(path).map_err(|e| db_error(path, e))?;
    // Compaction moves pages toward the start; it may need more than one pass.
    while db.compact().map_err(|e| db_error(path, e))? {}
    drop(db);
    Ok((before, size()))
}

/// Rows copied per destination transaction: the copy's memory stays bounded on a big file
/// (the snapshot it reads from is what makes it consistent, not the destination's commits).
const COPY_CHUNK: u64 = 50_000;

/// Copies every table of the snapshot `src` into a new database file at `dest`: the copy is a
/// normal agentq database as of the snapshot. Returns the rows copied.
pub fn copy_snapshot(src: &redb::ReadTransaction, dest: &Path) -> Result<u64> {
    use super::schema::*;
    let db = redb::Database::create(dest).map_err(|e| db_error(dest, e))?;
    let mut n = 0;
    n += copy_table(src, &db, META)?;
    n += copy_table(src, &db, PROJECTS)?;
    n += copy_table(src, &db, PROJECT_NAMES)?;
    n += copy_table(src, &db, TYPES)?;
    n += copy_table(src, &db, TYPE_NAMES)?;
    n += copy_table(src, &db, TASKS)?;
    n += copy_table(src, &db, TASK_BODIES)?;
    n += copy_table(src, &db, EXECUTIONS)?;
    n += copy_table(src, &db, TASK_IDS)?;
    n += copy_table(src, &db, INDEX)?;
    n += copy_table(src, &db, KEYS)?;
    n += copy_table(src, &db, SESSIONS)?;
    n += copy_table(src, &db, SESSIONS_BY_KEY)?;
    n += copy_table(src, &db, SESSION_EXPIRY)?;
    Ok(n)
}

/// One table, in destination transactions of [`COPY_CHUNK`] rows; the last is durable.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &redb::ReadTransaction,
    dst: &redb::Database,
    def: redb::TableDefinition<K, V>,
) -> Result<u64> {
    let from = match src.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut rows = from.iter()?.peekable();
    let mut n = 0u64;
    loop {
        let mut txn = dst.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| Error::Storage(e.to_string()))?;
        {
            let mut to = txn.open_table(def)?;
            let mut chunk = 0;
            while chunk < COPY_CHUNK {
                let Some(row) = rows.next() else { break };
                let (k, v) = row?;
                to.insert(k.value(), v.value())?;
                chunk += 1;
            }
            n += chunk;
        }
        if rows.peek().is_none() {
            txn.set_durability(redb::Durability::Immediate)
                .map_err(|e| Error::Storage(e.to_string()))?;
            txn.commit()?;
            return Ok(n);
        }
        txn.commit()?;
    }
}

//! The storage layout: every redb table, its key and what it indexes, in one place.
//!
//! Rows are postcard-encoded domain structs; index tables map composite keys to `()` (or a
//! seq) so that every lookup on a request path, in the reaper and at start-up is a B-tree
//! seek, never a scan of all tasks.
//!
//! Invariant: for every task row, exactly the index entries that [`IndexKeys::of`] derives
//! from it exist, and the project's STATS equal the rows it counts. [`Tables::put_task`] is
//! the only code that writes task rows, and it keeps both in step by diffing old and new.

use redb::{
    MultimapTable, MultimapTableDefinition, ReadableTable, Table, TableDefinition, WriteTransaction,
};

use crate::error::Result;
use crate::model::{ApiKey, Project, Session, Stats, Task, TaskStatus, TaskType};

/// The on-disk schema version. Bump on any change of tables or row encoding; a file with a
/// newer version is refused at start-up.
pub const SCHEMA_VERSION: u64 = 1;

/// `"schema_version"`, `"next_seq"`.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// project id → Project.
pub const PROJECTS: TableDefinition<u128, &[u8]> = TableDefinition::new("projects");
/// project name → project id (names are unique).
pub const PROJECT_NAMES: TableDefinition<&str, u128> = TableDefinition::new("project_names");
/// project id → Stats (56 bytes of little-endian counters).
pub const STATS: TableDefinition<u128, &[u8]> = TableDefinition::new("project_stats");
/// type id → TaskType.
pub const TYPES: TableDefinition<u128, &[u8]> = TableDefinition::new("task_types");
/// (project id, type name) → type id: unique names and the per-project listing.
pub const TYPE_NAMES: TableDefinition<(u128, &str), u128> = TableDefinition::new("type_names");
/// seq → Task. seq is assigned in creation order.
pub const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
/// task id (client-supplied or UUIDv7) → seq.
pub const TASK_IDS: TableDefinition<&str, u64> = TableDefinition::new("task_ids");
/// (project, createdAt, seq): listing a project's tasks by creation time.
pub const BY_PROJECT: TableDefinition<(u128, i64, u64), ()> = TableDefinition::new("by_project");
/// (project, status code, createdAt, seq): listing by status and creation time.
pub const BY_STATUS: TableDefinition<(u128, u8, i64, u64), ()> = TableDefinition::new("by_status");
/// (project, 10 - priority, seq): queued tasks available now. First key = next task.
pub const READY: TableDefinition<(u128, u8, u64), ()> = TableDefinition::new("ready");
/// (project, type id or 0, 10 - priority, seq): the same, per type, for `typeIds`.
pub const READY_TYPE: TableDefinition<(u128, u128, u8, u64), ()> =
    TableDefinition::new("ready_by_type");
/// (notBefore, seq): queued tasks waiting for their time. First key = next promotion.
pub const DELAYED: TableDefinition<(i64, u64), ()> = TableDefinition::new("delayed");
/// (leaseExpiresAt, seq): running tasks. First key = next lease to expire.
pub const LEASES: TableDefinition<(i64, u64), ()> = TableDefinition::new("leases");
/// (project, agent name) → seq of the task the agent holds in the project (resume).
pub const AGENT_LEASES: TableDefinition<(u128, &str), u64> = TableDefinition::new("agent_leases");
/// (type id, hash of canonical variables) → seqs: duplicate detection.
pub const DUPES: MultimapTableDefinition<(u128, u128), u64> =
    MultimapTableDefinition::new("duplicates");

/// key id → ApiKey (with the argon2id hash of its secret).
pub const KEYS: TableDefinition<u128, &[u8]> = TableDefinition::new("api_keys");
/// BLAKE2s-256 of a session token → Session.
pub const SESSIONS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("sessions");
/// (key id, session id) → token hash: a key's sessions end with it.
pub const SESSIONS_BY_KEY: TableDefinition<(u128, u128), [u8; 32]> =
    TableDefinition::new("sessions_by_key");
/// (expiresAt, session id) → token hash: the sweep of expired sessions.
pub const SESSION_EXPIRY: TableDefinition<(i64, u128), [u8; 32]> =
    TableDefinition::new("session_expiry");

pub fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(postcard::to_allocvec(value)?)
}

pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    Ok(postcard::from_bytes(bytes)?)
}

/// The index entries one task row implies.
#[derive(Debug, PartialEq)]
pub struct IndexKeys<'a> {
    by_status: (u128, u8, i64, u64),
    ready: Option<(u128, u8, u64)>,
    ready_type: Option<(u128, u128, u8, u64)>,
    delayed: Option<(i64, u64)>,
    lease: Option<(i64, u64)>,
    agent: Option<(u128, &'a str)>,
}

impl<'a> IndexKeys<'a> {
    pub fn of(t: &'a Task) -> Self {
        let queued = t.status == TaskStatus::Queued;
        let ready = queued && !t.delayed;
        let prio = 10u8.saturating_sub(t.priority);
        IndexKeys {
            by_status: (t.project_id, t.status.code(), t.created_at, t.seq),
            ready: ready.then_some((t.project_id, prio, t.seq)),
            ready_type: ready.then_some((t.project_id, t.type_id.unwrap_or(0), prio, t.seq)),
            delayed: (queued && t.delayed).then(|| (t.not_before.unwrap_or(0), t.seq)),
            lease: t.lease.as_ref().map(|l| (l.expires_at, t.seq)),
            agent: t.lease.as_ref().map(|l| (t.project_id, l.agent.as_str())),
        }
    }
}

/// Every table, opened once per write transaction (one batch of the writer).
pub struct Tables<'txn> {
    pub meta: Table<'txn, &'static str, u64>,
    pub projects: Table<'txn, u128, &'static [u8]>,
    pub project_names: Table<'txn, &'static str, u128>,
    pub stats: Table<'txn, u128, &'static [u8]>,
    pub types: Table<'txn, u128, &'static [u8]>,
    pub type_names: Table<'txn, (u128, &'static str), u128>,
    pub tasks: Table<'txn, u64, &'static [u8]>,
    pub task_ids: Table<'txn, &'static str, u64>,
    pub by_project: Table<'txn, (u128, i64, u64), ()>,
    pub by_status: Table<'txn, (u128, u8, i64, u64), ()>,
    pub ready: Table<'txn, (u128, u8, u64), ()>,
    pub ready_type: Table<'txn, (u128, u128, u8, u64), ()>,
    pub delayed: Table<'txn, (i64, u64), ()>,
    pub leases: Table<'txn, (i64, u64), ()>,
    pub agent_leases: Table<'txn, (u128, &'static str), u64>,
    pub dupes: MultimapTable<'txn, (u128, u128), u64>,
    pub keys: Table<'txn, u128, &'static [u8]>,
    pub sessions: Table<'txn, [u8; 32], &'static [u8]>,
    pub sessions_by_key: Table<'txn, (u128, u128), [u8; 32]>,
    pub session_expiry: Table<'txn, (i64, u128), [u8; 32]>,
}

impl<'txn> Tables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self> {
        Ok(Tables {
            meta: txn.open_table(META)?,
            projects: txn.open_table(PROJECTS)?,
            project_names: txn.open_table(PROJECT_NAMES)?,
            stats: txn.open_table(STATS)?,
            types: txn.open_table(TYPES)?,
            type_names: txn.open_table(TYPE_NAMES)?,
            tasks: txn.open_table(TASKS)?,
            task_ids: txn.open_table(TASK_IDS)?,
            by_project: txn.open_table(BY_PROJECT)?,
            by_status: txn.open_table(BY_STATUS)?,
            ready: txn.open_table(READY)?,
            ready_type: txn.open_table(READY_TYPE)?,
            delayed: txn.open_table(DELAYED)?,
            leases: txn.open_table(LEASES)?,
            agent_leases: txn.open_table(AGENT_LEASES)?,
            dupes: txn.open_multimap_table(DUPES)?,
            keys: txn.open_table(KEYS)?,
            sessions: txn.open_table(SESSIONS)?,
            sessions_by_key: txn.open_table(SESSIONS_BY_KEY)?,
            session_expiry: txn.open_table(SESSION_EXPIRY)?,
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
        Ok(self
            .stats
            .get(project)?
            .map(|v| Stats::from_bytes(v.value()))
            .unwrap_or_default())
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
        match self.tasks.get(seq)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
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
        let before = old.map(IndexKeys::of);
        let after = new.map(IndexKeys::of);
        macro_rules! sync {
            ($table:ident, $field:ident) => {{
                let o = before.as_ref().and_then(|k| k.$field);
                let n = after.as_ref().and_then(|k| k.$field);
                if o != n {
                    if let Some(k) = o {
                        self.$table.remove(k)?;
                    }
                    if let Some(k) = n {
                        self.$table.insert(k, ())?;
                    }
                }
            }};
        }
        sync!(ready, ready);
        sync!(ready_type, ready_type);
        sync!(delayed, delayed);
        sync!(leases, lease);
        let (o, n) = (
            before.as_ref().map(|k| k.by_status),
            after.as_ref().map(|k| k.by_status),
        );
        if o != n {
            if let Some(k) = o {
                self.by_status.remove(k)?;
            }
            if let Some(k) = n {
                self.by_status.insert(k, ())?;
            }
        }
        let (o, n) = (
            before.as_ref().and_then(|k| k.agent),
            after.as_ref().and_then(|k| k.agent),
        );
        if o != n {
            if let Some(k) = o {
                self.agent_leases.remove(k)?;
            }
            if let Some(k) = n {
                self.agent_leases.insert(k, seq)?;
            }
        }
        match (old, new) {
            (None, Some(t)) => {
                self.task_ids.insert(t.id.as_str(), t.seq)?;
                self.by_project
                    .insert((t.project_id, t.created_at, t.seq), ())?;
                if let Some(ty) = t.type_id {
                    let h = crate::model::variables_hash(&t.variables);
                    self.dupes.insert((ty, h), t.seq)?;
                }
            }
            (Some(t), None) => {
                self.task_ids.remove(t.id.as_str())?;
                self.by_project
                    .remove((t.project_id, t.created_at, t.seq))?;
                if let Some(ty) = t.type_id {
                    let h = crate::model::variables_hash(&t.variables);
                    self.dupes.remove((ty, h), t.seq)?;
                }
            }
            (Some(o), Some(n)) if o.variables != n.variables => {
                if let Some(ty) = o.type_id {
                    self.dupes
                        .remove((ty, crate::model::variables_hash(&o.variables)), o.seq)?;
                    self.dupes
                        .insert((ty, crate::model::variables_hash(&n.variables)), n.seq)?;
                }
            }
            _ => {}
        }
        match new {
            Some(t) => {
                self.tasks.insert(seq, encode(t)?.as_slice())?;
            }
            None => {
                self.tasks.remove(seq)?;
            }
        }
        let so = old.map(|t| (t.status, t.status == TaskStatus::Queued && t.delayed));
        let sn = new.map(|t| (t.status, t.status == TaskStatus::Queued && t.delayed));
        if so != sn {
            let mut stats = self.stats(project)?;
            stats.apply(so, sn);
            self.stats.insert(project, stats.to_bytes().as_slice())?;
        }
        Ok(())
    }
}

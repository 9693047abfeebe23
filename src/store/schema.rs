//! The storage layout: every redb table, its key and what it indexes, the row encoding and
//! the index key encoding, in one place (docs/STORAGE.md has the tables side by side).
//!
//! Rows are postcard-encoded domain structs; every index lives in the INDEX table under
//! ordered byte keys (see [`ix`]), so that every lookup on a request path, in the reaper and
//! at start-up is a B-tree seek, never a scan of all tasks.
//!
//! Invariant: for every task row, exactly the index entries that [`index_entries`] derives
//! from it exist, the project's counters equal the rows they count, and there is one body in
//! [`TASK_BODIES`] (and no other). [`super::tables::Tables::put_task`] is the only code that writes task rows
//! and bodies, and it keeps all of it in step by diffing old and new.

use std::collections::BTreeMap;

use redb::{ReadableTable, TableDefinition};

use crate::error::Result;
use crate::model::{Script, Task, TaskStatus};

/// The on-disk schema version. Bump on any change of tables or row encoding; a file with a
/// newer version is refused at start-up.
///
/// History: 1 kept LEASES and AGENT index entries; 2 keeps a running task's lease (expiry and
/// agent) in the value of its BY_STATUS entry and the lookups in memory
/// ([`super::leases::Leases`]), and no READY_TYPE entries for untyped tasks. [`super::tables::migrate_v1`]
/// turns a version 1 file into version 2. 3 adds the BATCH index ([`super::tables::migrate_v2`]). 4 keeps a
/// task's body (instructions and variables) in [`TASK_BODIES`] instead of its row
/// ([`super::tables::migrate_v3`]). 5 adds a script to task types and bodies, `allowScripts`
/// to keys and the [`EXECUTIONS`] table ([`super::tables::migrate_v4`]; a body of schema 4
/// reads as one without a script, see [`decode_body`]). 6 adds a project's retention and the
/// ENDED index ([`super::tables::migrate_v5`]).
pub const SCHEMA_VERSION: u64 = 6;

/// `"schema_version"`, `"next_seq"`.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// project id → Project.
pub const PROJECTS: TableDefinition<u128, &[u8]> = TableDefinition::new("projects");
/// project name → project id (names are unique).
pub const PROJECT_NAMES: TableDefinition<&str, u128> = TableDefinition::new("project_names");
/// type id → TaskType.
pub const TYPES: TableDefinition<u128, &[u8]> = TableDefinition::new("task_types");
/// (project id, type name) → type id: unique names and the per-project listing.
pub const TYPE_NAMES: TableDefinition<(u128, &str), u128> = TableDefinition::new("type_names");
/// seq → Task without its body (the row). seq is assigned in creation order.
pub const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
/// seq → the task's body: `(instructions, variables)`. Written when the task is created or its
/// body changes (an update), never by a lease transition: an agent's prompt is often kilobytes,
/// and a claim or a complete rewrote it with the row (measured: 2 KB of instructions took the
/// writer from 22 to 35 µs per cycle).
pub const TASK_BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("task_bodies");
/// (seq, attempt) → Execution: how the process of one attempt ran, as its worker reported it.
/// Apart from the row for the same reason as the body (tails are up to 128 KiB); written by
/// the complete or fail that ends the attempt, removed with the task.
pub const EXECUTIONS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("executions");
/// task id (client-supplied or UUIDv7) → seq.
pub const TASK_IDS: TableDefinition<&str, u64> = TableDefinition::new("task_ids");
/// Every index and the per-project counters, in one table of byte-string keys (see [`ix`]).
///
/// One table rather than one per index because a durable commit costs roughly in proportion to
/// the number of B-trees it touched: measured here, 20 writes into 7 tables commit in ~750 µs,
/// into 1 table in ~230 µs. A claim or a complete now touches two trees (TASKS and INDEX).
pub const INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("index");
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
    // Sized for a typical task row up front: growing from empty cost ~5 allocations a row.
    Ok(postcard::to_extend(
        value,
        Vec::with_capacity(ENCODE_CAPACITY),
    )?)
}

/// The buffer a row is first encoded into (bytes); larger rows grow it.
const ENCODE_CAPACITY: usize = 512;

pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    Ok(postcard::from_bytes(bytes)?)
}

/// A task's [`TASK_BODIES`] value: `(instructions, variables, script)`.
pub fn encode_body(t: &Task) -> Result<Vec<u8>> {
    encode(&(&t.instructions, &t.variables, &t.script))
}

/// The inverse of [`encode_body`]. Schema 4 wrote `(instructions, variables)` alone, so a body
/// that ends there has no script (postcard writes a tuple as its fields one after the other).
pub fn decode_body(bytes: &[u8]) -> Result<(String, BTreeMap<String, String>, Option<Script>)> {
    let ((instructions, variables), rest) = postcard::take_from_bytes::<Body>(bytes)?;
    let script = if rest.is_empty() { None } else { decode(rest)? };
    Ok((instructions, variables, script))
}

/// A task, from its row in [`TASKS`] and its body in [`TASK_BODIES`].
pub fn load_task(
    tasks: &impl ReadableTable<u64, &'static [u8]>,
    bodies: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<Option<Task>> {
    load_row(tasks, seq)?
        .map(|t| with_body(bodies, t))
        .transpose()
}

/// A task from its row alone: everything but `instructions` and `variables` (left empty).
/// Enough to filter and order tasks; [`with_body`] completes the ones answered.
pub fn load_row(tasks: &impl ReadableTable<u64, &'static [u8]>, seq: u64) -> Result<Option<Task>> {
    match tasks.get(seq)? {
        Some(row) => Ok(Some(decode(row.value())?)),
        None => Ok(None),
    }
}

/// The task read by [`load_row`], with its body.
pub fn with_body(bodies: &impl ReadableTable<u64, &'static [u8]>, mut t: Task) -> Result<Task> {
    if let Some(body) = bodies.get(t.seq)? {
        (t.instructions, t.variables, t.script) = decode_body(body.value())?;
    }
    Ok(t)
}

/// The fields a row begins with (seq, id, project, type), after which schemas 1 to 3 wrote
/// the body; and the body (instructions, variables).
type RowHead = (u64, String, u128, Option<u128>);
type Body = (String, BTreeMap<String, String>);

/// The row and the body of a task row as schemas 1 to 3 wrote it: the body inline, after the
/// `RowHead`. Postcard writes a struct as its fields one after the other, so the row is the
/// head followed by the rest, as they were.
pub fn split_inline_row(bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let ((head, body), rest) = postcard::take_from_bytes::<(RowHead, Body)>(bytes)?;
    let mut row = encode(&head)?;
    row.extend_from_slice(rest);
    Ok((row, encode(&body)?))
}

/// The inverse of [`split_inline_row`]: a row as schemas 1 to 3 wrote it, from a row and a
/// body of today's (the migration tests make old files with it).
pub fn inline_row(row: &[u8], body: &[u8]) -> Result<Vec<u8>> {
    let (head, rest) = postcard::take_from_bytes::<RowHead>(row)?;
    let mut old = encode(&(head, decode::<Body>(body)?))?;
    old.extend_from_slice(rest);
    Ok(old)
}

/// Index keys: one kind byte, then fixed-width big-endian fields, so that byte order is the
/// order of the fields (i64 times with the sign bit flipped). Values are empty unless noted.
pub mod ix {
    pub const BY_PROJECT: u8 = 1;
    pub const BY_STATUS: u8 = 2;
    pub const READY: u8 = 3;
    pub const READY_TYPE: u8 = 4;
    pub const DELAYED: u8 = 5;
    /// Schema 1 only (removed by the migration to 2): (leaseExpiresAt, seq).
    pub const LEASES: u8 = 6;
    /// Schema 1 only (removed by the migration to 2): (project, agent name) → seq.
    pub const AGENT: u8 = 7;
    pub const DUPES: u8 = 8;
    pub const STATS: u8 = 9;
    pub const ACTIVITY: u8 = 10;
    /// Schema 3 on.
    pub const BATCH: u8 = 11;
    /// Schema 6 on: (project, status, endedAt, seq) of finished tasks, oldest end first:
    /// retention and delete by age seek here.
    pub const ENDED: u8 = 12;

    /// A key under construction: fixed-width fields in an inline buffer, so building one
    /// allocates nothing (a transition builds about ten). Orders like its bytes.
    #[derive(Clone, Copy)]
    pub struct K {
        b: [u8; K::MAX],
        n: u8,
    }

    impl K {
        /// The longest key: READY_TYPE, 1 + 16 + 16 + 1 + 8 bytes.
        const MAX: usize = 48;

        pub fn new(kind: u8) -> K {
            K {
                b: [0; K::MAX],
                n: 0,
            }
            .u8(kind)
        }
        fn put(mut self, bytes: &[u8]) -> K {
            let at = self.n as usize;
            self.b[at..at + bytes.len()].copy_from_slice(bytes);
            self.n += bytes.len() as u8;
            self
        }
        pub fn u128(self, x: u128) -> K {
            self.put(&x.to_be_bytes())
        }
        pub fn u64(self, x: u64) -> K {
            self.put(&x.to_be_bytes())
        }
        pub fn i64(self, x: i64) -> K {
            self.put(&i64_bytes(x))
        }
        pub fn u8(self, x: u8) -> K {
            self.put(&[x])
        }
        pub fn as_slice(&self) -> &[u8] {
            &self.b[..self.n as usize]
        }
    }

    impl std::ops::Deref for K {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            self.as_slice()
        }
    }

    impl PartialEq for K {
        fn eq(&self, other: &K) -> bool {
            self.as_slice() == other.as_slice()
        }
    }

    impl Eq for K {}

    impl PartialOrd for K {
        fn partial_cmp(&self, other: &K) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    impl Ord for K {
        fn cmp(&self, other: &K) -> std::cmp::Ordering {
            self.as_slice().cmp(other.as_slice())
        }
    }

    impl std::fmt::Debug for K {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "K({:?})", self.as_slice())
        }
    }

    /// (project, createdAt, seq): a project's tasks by creation time.
    pub fn by_project(p: u128, created: i64, seq: u64) -> K {
        K::new(BY_PROJECT).u128(p).i64(created).u64(seq)
    }
    /// (project, status, createdAt, seq): by status and creation time. The value is empty,
    /// or for a task holding a lease (status running) its [`lease_value`].
    pub fn by_status(p: u128, status: u8, created: i64, seq: u64) -> K {
        K::new(BY_STATUS).u128(p).u8(status).i64(created).u64(seq)
    }
    /// (project, status, ended, seq): a finished task, by when it ended.
    pub fn ended(p: u128, status: u8, ended: i64, seq: u64) -> K {
        K::new(ENDED).u128(p).u8(status).i64(ended).u64(seq)
    }
    /// (project, 10 - priority, seq): queued tasks available now; the first is the next.
    pub fn ready(p: u128, prio_inv: u8, seq: u64) -> K {
        K::new(READY).u128(p).u8(prio_inv).u64(seq)
    }
    /// (project, type, 10 - priority, seq): the same for typed tasks, per type, for `typeIds`.
    /// (Schema 1 also kept untyped tasks here, under type 0.)
    pub fn ready_type(p: u128, ty: u128, prio_inv: u8, seq: u64) -> K {
        K::new(READY_TYPE).u128(p).u128(ty).u8(prio_inv).u64(seq)
    }
    /// (notBefore, seq): queued tasks waiting for their time.
    pub fn delayed(at: i64, seq: u64) -> K {
        K::new(DELAYED).i64(at).u64(seq)
    }
    /// A lease in a BY_STATUS value: leaseExpiresAt (8 bytes, as in keys), then the agent name.
    pub fn lease_value(expires: i64, agent: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + agent.len());
        v.extend_from_slice(&i64_bytes(expires));
        v.extend_from_slice(agent.as_bytes());
        v
    }
    /// The (leaseExpiresAt, agent) of a BY_STATUS value, if it holds a lease.
    pub fn parse_lease_value(v: &[u8]) -> Option<(i64, &str)> {
        if v.len() < 8 {
            return None;
        }
        let agent = std::str::from_utf8(&v[8..]).ok()?;
        Some((i64_at(v, 0), agent))
    }
    /// (type, hash of canonical variables, seq): duplicate detection.
    pub fn dupe(ty: u128, hash: u128, seq: u64) -> K {
        K::new(DUPES).u128(ty).u128(hash).u64(seq)
    }
    /// (project, hash of batchId, createdAt, seq): the tasks of a bulk batch, in creation
    /// order. A listing by `batchId` walks these and confirms the id on the task.
    pub fn batch(t: &crate::model::Task) -> Option<K> {
        let b = t.batch_id.as_deref()?;
        Some(
            batch_prefix(t.project_id, batch_hash(b))
                .i64(t.created_at)
                .u64(t.seq),
        )
    }
    pub fn batch_prefix(p: u128, batch_hash: u64) -> K {
        K::new(BATCH).u128(p).u64(batch_hash)
    }
    /// The 64-bit FNV-1a hash of a batch id.
    pub fn batch_hash(id: &str) -> u64 {
        id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
    /// project → Stats (56 bytes).
    pub fn stats(p: u128) -> K {
        K::new(STATS).u128(p)
    }
    /// (project, minute since the epoch) → Activity (24 bytes): what the project's tasks did
    /// in that minute. Only the last hour's minutes are kept.
    pub fn activity(p: u128, minute: i64) -> K {
        K::new(ACTIVITY).u128(p).i64(minute)
    }

    /// The smallest key after every key that starts with `prefix`.
    pub fn end_of(prefix: &[u8]) -> Vec<u8> {
        let mut e = prefix.to_vec();
        while let Some(last) = e.pop() {
            if last < u8::MAX {
                e.push(last + 1);
                return e;
            }
        }
        vec![u8::MAX; 64]
    }

    /// The u64 at byte `at`.
    pub fn u64_at(k: &[u8], at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&k[at..at + 8]);
        u64::from_be_bytes(b)
    }

    /// An i64 as key bytes: big-endian with the sign bit flipped, so byte order is numeric
    /// order.
    fn i64_bytes(x: i64) -> [u8; 8] {
        ((x as u64) ^ (1 << 63)).to_be_bytes()
    }

    /// The i64 at byte `at`.
    pub fn i64_at(k: &[u8], at: usize) -> i64 {
        (u64_at(k, at) ^ (1 << 63)) as i64
    }

    /// The seq that ends a task index key.
    pub fn seq_of(k: &[u8]) -> u64 {
        u64_at(k, k.len() - 8)
    }
}

/// The index entries (key, value) one task row implies.
pub fn index_entries(t: &Task) -> Vec<(ix::K, Vec<u8>)> {
    let queued = t.status == TaskStatus::Queued;
    let ready = queued && !t.delayed;
    let prio = 10u8.saturating_sub(t.priority);
    let mut e = Vec::with_capacity(7);
    e.push((ix::by_project(t.project_id, t.created_at, t.seq), vec![]));
    e.push((
        ix::by_status(t.project_id, t.status.code(), t.created_at, t.seq),
        t.lease
            .as_ref()
            .map(|l| ix::lease_value(l.expires_at, &l.agent))
            .unwrap_or_default(),
    ));
    if ready {
        e.push((ix::ready(t.project_id, prio, t.seq), vec![]));
        if let Some(ty) = t.type_id {
            e.push((ix::ready_type(t.project_id, ty, prio, t.seq), vec![]));
        }
    }
    if queued && t.delayed {
        e.push((ix::delayed(t.not_before.unwrap_or(0), t.seq), vec![]));
    }
    if let Some(ty) = t.type_id {
        let h = crate::model::variables_hash(&t.variables);
        e.push((ix::dupe(ty, h, t.seq), vec![]));
    }
    if let Some(k) = ix::batch(t) {
        e.push((k, vec![]));
    }
    if let Some(ended) = t.ended_at() {
        e.push((
            ix::ended(t.project_id, t.status.code(), ended, t.seq),
            vec![],
        ));
    }
    e
}

#[cfg(test)]
mod tests {
    use super::ix;

    #[test]
    fn index_keys_sort_like_their_fields() {
        let mut times = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        let keys: Vec<ix::K> = times.iter().map(|t| ix::delayed(*t, 3)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "i64 times keep their order");
        times.reverse();
        for t in times {
            assert_eq!(ix::i64_at(&ix::delayed(t, 9), 1), t);
            assert_eq!(ix::seq_of(&ix::delayed(t, 9)), 9);
            let v = ix::lease_value(t, "agent-1");
            assert_eq!(ix::parse_lease_value(&v), Some((t, "agent-1")));
        }
        // Priority before age: a higher priority (smaller 10 - p) wins over an older task.
        assert!(ix::ready(1, 0, 99) < ix::ready(1, 5, 1));
        assert!(ix::ready(1, 5, 1) < ix::ready(1, 5, 2));
        assert!(
            ix::ready(1, 10, 1) < ix::ready(2, 0, 0),
            "projects never interleave"
        );
        assert_eq!(ix::end_of(&[3, 255]), vec![4]);
        assert_eq!(ix::parse_lease_value(&[]), None, "no lease");
    }

    #[test]
    fn inline_keys_order_and_hold_like_their_bytes() {
        let short = ix::K::new(ix::READY).u128(7);
        let long = short.u8(0).u64(0);
        assert!(short < long, "a prefix sorts before its extensions");
        assert_eq!(short.cmp(&long), short.as_slice().cmp(long.as_slice()));
        assert!(ix::K::new(ix::READY).u8(0).u8(1) > ix::K::new(ix::READY).u8(0));
        // The longest key fits, field for field.
        let k = ix::ready_type(u128::MAX, 5, 3, 42);
        assert_eq!(k.len(), 1 + 16 + 16 + 1 + 8);
        assert_eq!(ix::seq_of(&k), 42);
        assert_eq!(k[33], 3);
        assert_eq!(ix::dupe(1, 2, 3).len(), 1 + 16 + 16 + 8);
    }
}

//! Keys and sessions in storage: write operations (run by the writer) and reads.
//!
//! Secrets never reach this module: keys arrive as argon2id hashes, session tokens as their
//! BLAKE2s-256 digests. Hashing happens in `crate::auth`, outside the writer thread.

use redb::ReadableTable;

use super::tables::*;
use super::write::resolve_project;
use super::{Store, WriteCtx};
use crate::error::{Error, Result};
use crate::model::{ApiKey, Millis, Role, Session};

/// META entry naming the key given by `AGENTQ_ADMIN_KEY` / `--admin-key-file`, whose text
/// need not follow agentq's key format (so its id cannot be read from it).
const BOOTSTRAP_KEY: &str = "bootstrap_key_id";

pub struct NewKey {
    pub id: u128,
    pub name: String,
    pub role: Role,
    /// Project ids or names; None = all projects.
    pub projects: Option<Vec<String>>,
    pub hash: String,
    pub allow_scripts: bool,
}

pub fn create_key(w: &mut WriteCtx, n: NewKey) -> Result<ApiKey> {
    let projects = match n.projects {
        None => None,
        Some(refs) => {
            let mut ids = Vec::with_capacity(refs.len());
            for r in &refs {
                ids.push(resolve_project(w.tables, r)?.id);
            }
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
    };
    let key = ApiKey {
        id: n.id,
        name: n.name,
        role: n.role,
        projects,
        hash: n.hash,
        created_at: w.now,
        last_used_at: None,
        allow_scripts: n.allow_scripts,
    };
    w.tables.keys.insert(key.id, encode(&key)?.as_slice())?;
    Ok(key)
}

/// On an empty key table, stores the first admin key. Returns whether it did.
pub fn bootstrap_admin(
    w: &mut WriteCtx,
    id: u128,
    hash: String,
    foreign_format: bool,
) -> Result<bool> {
    if w.tables.keys.first()?.is_some() {
        return Ok(false);
    }
    let key = ApiKey {
        id,
        name: "admin".into(),
        role: Role::Admin,
        projects: None,
        hash,
        created_at: w.now,
        last_used_at: None,
        allow_scripts: false,
    };
    w.tables.keys.insert(key.id, encode(&key)?.as_slice())?;
    if foreign_format {
        // The meta table holds u64 values: store the id's two halves.
        w.tables
            .meta
            .insert(format!("{BOOTSTRAP_KEY}_hi").as_str(), (id >> 64) as u64)?;
        w.tables
            .meta
            .insert(format!("{BOOTSTRAP_KEY}_lo").as_str(), id as u64)?;
    }
    Ok(true)
}

/// Whether a request's credential is still good, checked inside a write. A long-poll
/// authenticated up to a minute ago must not be handed a task once its key was revoked or its
/// session ended (logout, the key's revocation) or expired: the writer orders this look
/// after any revocation that committed first.
pub fn credential_live(w: &mut WriteCtx, key_id: u128, session: Option<&[u8; 32]>) -> Result<()> {
    let live = match session {
        Some(h) => w.tables.session(h)?.is_some_and(|s| s.live_at(w.now)),
        None => w.tables.keys.get(key_id)?.is_some(),
    };
    if live {
        Ok(())
    } else {
        Err(Error::Unauthorized(
            "the credential was revoked, or its session ended, while this request waited".into(),
        ))
    }
}

/// Deletes a key and every session made with it. The last admin key cannot be deleted.
pub fn delete_key(w: &mut WriteCtx, id: u128) -> Result<ApiKey> {
    let key = w
        .tables
        .key(id)?
        .ok_or_else(|| Error::NotFound(format!("key {} not found", uuid::Uuid::from_u128(id))))?;
    if key.role == Role::Admin {
        let mut admins = 0;
        for r in w.tables.keys.iter()? {
            let (_, v) = r?;
            let k: ApiKey = decode(v.value())?;
            admins += (k.role == Role::Admin) as usize;
        }
        if admins <= 1 {
            return Err(Error::Conflict(
                "the last admin key cannot be deleted; create another admin key first".into(),
            ));
        }
    }
    let sessions: Vec<[u8; 32]> = w
        .tables
        .sessions_by_key
        .range((id, 0u128)..=(id, u128::MAX))?
        .map(|r| r.map(|(_, v)| v.value()))
        .collect::<Result<_, _>>()?;
    for h in sessions {
        if let Some(s) = w.tables.session(&h)? {
            w.tables.delete_session(&h, &s)?;
        }
    }
    w.tables.keys.remove(id)?;
    Ok(key)
}

pub fn touch_key(w: &mut WriteCtx, id: u128) -> Result<()> {
    if let Some(mut k) = w.tables.key(id)? {
        k.last_used_at = Some(w.now);
        w.tables.keys.insert(id, encode(&k)?.as_slice())?;
    }
    Ok(())
}

/// The server's rules for new sessions (the default, all zero, is for a tool that makes
/// none).
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionLimits {
    /// Lifetime of a new session.
    pub ttl_ms: i64,
    /// Sessions one key may hold; 0: no limit.
    pub per_key: u32,
}

/// Starts a session of key `key_id`, unless the key already holds `limits.per_key` of them
/// (409: a client that logs in without ever logging out would otherwise grow the tables
/// without bound for as long as the key lives). Sessions past their expiry count until the
/// scheduler sweeps them, which it does as they expire.
/// A new session of `key_id`: bound to `scope` (an agent name and a project, by id or name),
/// or with None key-scoped (see [`Session::scope`]).
pub fn create_session(
    w: &mut WriteCtx,
    key_id: u128,
    scope: Option<(String, String)>,
    limits: SessionLimits,
    token_hash: [u8; 32],
) -> Result<Session> {
    let (agent, project_id) = match scope {
        Some((agent, project)) => (agent, resolve_project(w.tables, &project)?.id),
        None => (String::new(), 0),
    };
    if limits.per_key > 0 {
        let cap = limits.per_key as usize;
        let mut held = 0;
        for r in w
            .tables
            .sessions_by_key
            .range((key_id, 0u128)..=(key_id, u128::MAX))?
            .take(cap)
        {
            r?;
            held += 1;
        }
        if held >= cap {
            return Err(Error::Conflict(format!(
                "this key already holds {cap} live sessions, the most one key may hold \
                 (--max-sessions-per-key); end sessions that are no longer used (logout), or \
                 wait for them to expire"
            )));
        }
    }
    let s = Session {
        id: uuid::Uuid::now_v7().as_u128(),
        key_id,
        agent_name: agent,
        project_id,
        created_at: w.now,
        expires_at: w.now.saturating_add(limits.ttl_ms),
        last_activity: w.now,
    };
    w.tables.put_session(&token_hash, None, &s)?;
    w.timer(s.expires_at);
    Ok(s)
}

/// Ends a session. Returns false when there was none.
pub fn end_session(w: &mut WriteCtx, token_hash: [u8; 32]) -> Result<bool> {
    match w.tables.session(&token_hash)? {
        Some(s) => {
            w.tables.delete_session(&token_hash, &s)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Pushes a session's expiry `by_ms` later.
pub fn extend_session(w: &mut WriteCtx, token_hash: [u8; 32], by_ms: i64) -> Result<Session> {
    let old = w
        .tables
        .session(&token_hash)?
        .filter(|s| s.live_at(w.now))
        .ok_or_else(|| Error::NotFound("session not found or expired".into()))?;
    let mut s = old.clone();
    s.expires_at = s.expires_at.saturating_add(by_ms);
    s.last_activity = w.now;
    w.tables.put_session(&token_hash, Some(&old), &s)?;
    Ok(s)
}

pub fn touch_session(w: &mut WriteCtx, token_hash: [u8; 32]) -> Result<()> {
    if let Some(old) = w.tables.session(&token_hash)? {
        let mut s = old.clone();
        s.last_activity = w.now;
        w.tables.put_session(&token_hash, Some(&old), &s)?;
    }
    Ok(())
}

/// Removes up to `limit` sessions that have expired.
pub fn sweep_sessions(w: &mut WriteCtx, limit: usize) -> Result<usize> {
    let due: Vec<[u8; 32]> = w
        .tables
        .session_expiry
        .range((i64::MIN, 0u128)..=(w.now, u128::MAX))?
        .take(limit)
        .map(|r| r.map(|(_, v)| v.value()))
        .collect::<Result<_, _>>()?;
    let n = due.len();
    for h in due {
        if let Some(s) = w.tables.session(&h)? {
            w.tables.delete_session(&h, &s)?;
        }
    }
    Ok(n)
}

impl Store {
    pub fn key(&self, id: u128) -> Result<Option<ApiKey>> {
        let txn = self.begin_read_txn()?;
        match txn.open_table(KEYS)?.get(id)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn keys(&self) -> Result<Vec<ApiKey>> {
        let txn = self.begin_read_txn()?;
        let mut out = Vec::new();
        for r in txn.open_table(KEYS)?.iter()? {
            out.push(decode(r?.1.value())?);
        }
        Ok(out)
    }

    /// Live sessions (expired ones not yet swept are not counted).
    pub fn session_count(&self) -> Result<u64> {
        // All the sessions less the expired ones, which the scheduler sweeps as they expire:
        // a few at most, where counting the live ones read every session (`/metrics/json`
        // needs no key).
        let txn = self.begin_read_txn()?;
        let now = self.clock.now();
        let table = txn.open_table(SESSION_EXPIRY)?;
        let mut expired = 0;
        for r in table.range(..(now + 1, 0u128))? {
            r?;
            expired += 1;
        }
        Ok(redb::ReadableTableMetadata::len(&table)?.saturating_sub(expired))
    }

    pub fn bootstrap_key_id(&self) -> Result<Option<u128>> {
        let txn = self.begin_read_txn()?;
        let meta = txn.open_table(META)?;
        let hi = meta
            .get(format!("{BOOTSTRAP_KEY}_hi").as_str())?
            .map(|v| v.value());
        let lo = meta
            .get(format!("{BOOTSTRAP_KEY}_lo").as_str())?
            .map(|v| v.value());
        Ok(match (hi, lo) {
            (Some(h), Some(l)) => Some(((h as u128) << 64) | l as u128),
            _ => None,
        })
    }

    pub fn session(&self, token_hash: &[u8; 32]) -> Result<Option<Session>> {
        let txn = self.begin_read_txn()?;
        match txn.open_table(SESSIONS)?.get(token_hash)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }
}

/// The earliest session expiry (for the scheduler's sweep).
pub fn next_session_expiry(txn: &redb::ReadTransaction) -> Result<Option<Millis>> {
    Ok(txn
        .open_table(SESSION_EXPIRY)?
        .first()?
        .map(|(k, _)| k.value().0))
}

//! Who is calling and what they may do: API keys, sessions, rights, rate limits.
//!
//! What it owns: turning a presented credential into a [`Caller`] (once per request, in the
//! HTTP frame), the role → rights table, project scoping, and the per-key and per-address
//! limits. What it must not do: store secrets. Keys are kept as argon2id hashes, session
//! tokens as BLAKE2s-256 digests; neither the secret nor a hash ever leaves in a response,
//! a log line or an error message.
//!
//! Invariants:
//! 1. A credential is accepted only if it verifies against a stored key (argon2id) or names a
//!    live session of a live key. The verification cache is keyed by a digest of the full
//!    presented credential, and a key's entries are dropped the moment it is revoked.
//! 2. Argon2 runs off the async runtime with at most [`ARGON2_CONCURRENCY`] at once (each
//!    hash takes ~19 MiB and tens of ms).
//! 3. A project-scoped caller (a key's project list, or a session's project) sees only those
//!    projects: anything else is "not found", never "forbidden".

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use blake2::{Blake2s256, Digest};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::{ApiKey, Millis, Role, Session};
use crate::store::{keys, Store};

/// At most this many argon2 computations at once.
pub const ARGON2_CONCURRENCY: usize = 2;
/// How long a verified key stays in the cache.
pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// Failed authentications allowed per client address and minute before the address is slowed.
pub const AUTH_FAILURES_PER_MINUTE: u32 = 60;
/// Past that, each attempt from the address with a credential not verified recently waits
/// this long, one at a time: guessing runs at about one try a second per address, and the
/// answer stays the honest one (401 for a bad credential).
pub const AUTH_TARPIT: Duration = Duration::from_secs(1);
/// `last_used_at` / `last_activity` are written at most this often per key or session.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(60);
/// Largest `extendBy` of a session, in seconds (30 days).
pub const MAX_SESSION_EXTEND_SECS: i64 = 30 * 86_400;
/// Live sessions one key may hold by default (`--max-sessions-per-key`): far above a fleet
/// that logs in once per agent process, low enough that a client logging in in a loop meets
/// it long before the sessions cost memory or disk (each is ~200 bytes in three tables).
pub const DEFAULT_MAX_SESSIONS_PER_KEY: u32 = 1000;
/// Shortest admin key accepted from `AGENTQ_ADMIN_KEY` / `--admin-key-file`.
pub const MIN_ADMIN_KEY_LEN: usize = 16;

const KEY_PREFIX: &str = "aq_";
const SESSION_PREFIX: &str = "aqs_";

/// What an operation needs. Each role grants a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Read and list anything visible.
    Read,
    /// Create, update and delete projects and task types; clean up leases.
    ManageProjects,
    /// Create, update, delete, cancel and retry tasks.
    ManageTasks,
    /// The agent side of the lease protocol: next-task, complete, fail, extend, progress.
    Work,
    /// API keys.
    Admin,
}

pub fn grants(role: Role, right: Right) -> bool {
    use Right::*;
    match role {
        Role::Admin => true,
        Role::Producer => matches!(right, Read | ManageProjects | ManageTasks),
        Role::Agent => matches!(right, Read | Work),
        Role::Viewer => matches!(right, Read),
    }
}

/// The session a request was made under.
#[derive(Debug, Clone)]
pub struct SessionBinding {
    pub id: u128,
    pub token_hash: [u8; 32],
    /// The agent and project of a bound session; None for a key-scoped one.
    pub agent: Option<String>,
    pub project: Option<u128>,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: u128,
    pub role: Role,
    /// The key's project list; None = all projects.
    pub projects: Option<Vec<u128>>,
    /// The key's `allowScripts`.
    pub allow_scripts: bool,
    pub session: Option<SessionBinding>,
}

impl Caller {
    /// Whether `project` exists for this caller at all.
    pub fn sees(&self, project: u128) -> bool {
        self.projects.as_ref().is_none_or(|p| p.contains(&project))
            && self
                .session
                .as_ref()
                .is_none_or(|s| s.project.is_none_or(|p| p == project))
    }

    /// Whether the caller is limited to some projects (then lists are filtered).
    pub fn scoped(&self) -> bool {
        self.projects.is_some() || self.session.as_ref().is_some_and(|s| s.project.is_some())
    }

    /// A right that does not depend on a project.
    pub fn require(&self, right: Right) -> Result<()> {
        if grants(self.role, right) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "the {} role may not do this",
                self.role.as_str()
            )))
        }
    }

    /// A right on something inside `project`: 404 when the project is not visible to the
    /// caller, 403 when it is but the right is missing.
    pub fn require_in(&self, right: Right, project: u128, what: &str) -> Result<()> {
        if !self.sees(project) {
            return Err(Error::NotFound(format!("{what} not found")));
        }
        self.require(right)
    }

    /// Giving a task or a task type a script: admin keys, and keys created with
    /// `allowScripts`, since a worker started with `--scripts` runs what it says.
    pub fn require_scripts(&self) -> Result<()> {
        if self.role == Role::Admin || self.allow_scripts {
            Ok(())
        } else {
            Err(Error::Forbidden(
                "only admin keys and keys created with allowScripts may give a task or a task \
                 type a script"
                    .into(),
            ))
        }
    }

    /// Under a session, the agent name in the path or body must be the session's.
    pub fn require_agent(&self, agent: &str) -> Result<()> {
        match self.session.as_ref().and_then(|s| s.agent.as_deref()) {
            Some(bound) if bound != agent => Err(Error::Forbidden(format!(
                "this session acts as agent {bound}, not {agent}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The credential of an HTTP request: `X-API-Key`, else `Authorization: Bearer`.
pub fn credential(headers: &poem::http::HeaderMap) -> Option<&str> {
    if let Some(k) = headers.get("x-api-key") {
        return k.to_str().ok().map(str::trim);
    }
    let v = headers
        .get(poem::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A 256-bit digest: the cache key of a presented key, the stored form of a session token.
pub fn digest(secret: &str) -> [u8; 32] {
    let d = Blake2s256::digest(secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(&d);
    out
}

fn random_hex32() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the operating system's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new key's clear text: `aq_<key id>_<256 random bits>`, both in hex.
pub fn new_key_text(id: u128) -> String {
    format!("{KEY_PREFIX}{id:032x}_{}", random_hex32())
}

/// A new session token: `aqs_<256 random bits>`.
pub fn new_session_token() -> String {
    format!("{SESSION_PREFIX}{}", random_hex32())
}

/// The key id inside a key of agentq's format.
fn key_id_of(text: &str) -> Option<u128> {
    let rest = text.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.len() != 64 {
        return None;
    }
    u128::from_str_radix(id, 16).ok()
}

/// The argon2id PHC string of a secret (slow: call through [`Authenticator::hash`]).
fn hash_blocking(secret: &str) -> Result<String> {
    Argon2::default()
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::Storage(format!("argon2: {e}")))
}

fn verify_blocking(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// What a rate limit decided, for the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct RateInfo {
    pub allowed: bool,
    /// This is the first request refused in the window (to report once, not per request).
    pub first_refused: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the window ends.
    pub reset: u64,
    /// Seconds until a request may pass again.
    pub retry_after: u64,
}

/// A fixed-window limiter: `limit` requests per key in each 60-second window, starting at the
/// key's first request. It is a token bucket of `limit` tokens refilled in full once a
/// minute, so exactly `limit` requests pass in a window, as the contract asks.
pub struct Limiter<K> {
    limit: u32,
    windows: Mutex<HashMap<K, (Instant, u32)>>,
}

const WINDOW: Duration = Duration::from_secs(60);

/// Past this many keys, a check first drops the windows that have ended, so that a flood of
/// distinct keys (client addresses, for failed authentications) cannot grow the map without
/// bound.
const PRUNE_PAST: usize = 100_000;

impl<K: Hash + Eq + Copy> Limiter<K> {
    pub fn new(limit: u32) -> Self {
        Limiter {
            limit,
            windows: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Counts one request of `key` (when `take`) and says whether it may pass.
    pub fn check(&self, key: K, take: bool) -> RateInfo {
        self.check_at(key, take, Instant::now())
    }

    fn check_at(&self, key: K, take: bool, now: Instant) -> RateInfo {
        let mut map = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > PRUNE_PAST {
            map.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = map.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        let allowed = entry.1 < self.limit;
        // Refused requests count too (past `limit`), so the first refusal can be told apart.
        let first_refused = !allowed && take && entry.1 == self.limit;
        if take {
            entry.1 = entry.1.saturating_add(1);
        }
        let left = WINDOW.saturating_sub(now.duration_since(entry.0));
        let unix_now = crate::time::Clock::now(&crate::time::SystemClock) as u64 / 1000;
        RateInfo {
            allowed,
            first_refused,
            limit: self.limit,
            remaining: self.limit.saturating_sub(entry.1),
            reset: unix_now + left.as_secs_f64().ceil() as u64,
            retry_after: if allowed {
                0
            } else {
                left.as_secs_f64().ceil().max(1.0) as u64
            },
        }
    }

    /// Counts a request that already happened (a failed authentication).
    pub fn record(&self, key: K) {
        self.check(key, true);
    }
}

struct Cached {
    caller: Arc<Caller>,
    until: Instant,
    /// A session's expiry as it was read. An extend only moves it later, so past it the
    /// entry is a miss (the store has the answer), never a refusal.
    expires_at: Option<Millis>,
}

impl Cached {
    /// Whether the entry may still answer: inside the cache's TTL and, for a session, before
    /// its expiry (`now` by the store's clock).
    fn live(&self, at: Instant, now: Millis) -> bool {
        self.until > at && self.expires_at.is_none_or(|e| e > now)
    }
}

/// Credentials kept in the cache at most (a few hundred bytes each): past that, entries out
/// of date are dropped, and if that is not enough, all of them (the store still answers; a
/// fleet of more live credentials than this reads them from storage, as before the cache).
const MAX_CACHED: usize = 20_000;

/// Why authentication failed. The message never says which part was wrong.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send X-API-Key or Authorization: Bearer")]
    Missing,
    #[error("invalid or expired credentials")]
    Invalid,
    #[error("{0}")]
    Store(Error),
}

/// Why the first admin key was not created.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] crate::error::Error),
    /// The generated key could not be shown (stdout closed or full), so it was not stored.
    #[error("cannot show the key: {0}")]
    Show(std::io::Error),
}

pub struct Authenticator {
    store: Arc<Store>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    argon: Semaphore,
    touched: Mutex<HashMap<u128, Instant>>,
    pub failures: Limiter<IpAddr>,
    tarpits: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
    /// One verification per presented credential at a time: a fleet starting with one new
    /// key pays argon2 once, not once per connection.
    verifying: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    pub limiter: Limiter<u128>,
    /// The lifetime of new sessions and how many one key may hold.
    pub sessions: keys::SessionLimits,
}

impl Authenticator {
    pub fn new(
        store: Arc<Store>,
        rate_limit_per_minute: u32,
        sessions: keys::SessionLimits,
    ) -> Self {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
            argon: Semaphore::new(ARGON2_CONCURRENCY),
            touched: Mutex::new(HashMap::new()),
            failures: Limiter::new(AUTH_FAILURES_PER_MINUTE),
            tarpits: Mutex::new(HashMap::new()),
            verifying: Mutex::new(HashMap::new()),
            limiter: Limiter::new(rate_limit_per_minute),
            sessions,
        }
    }

    /// Hashes a secret with argon2id on the blocking pool, bounded.
    pub async fn hash(&self, secret: String) -> Result<String> {
        let _permit = self
            .argon
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::task::spawn_blocking(move || hash_blocking(&secret))
            .await
            .map_err(|e| Error::Storage(e.to_string()))?
    }

    async fn verify(&self, secret: &str, phc: &str) -> bool {
        let Ok(_permit) = self.argon.acquire().await else {
            return false;
        };
        let (s, p) = (secret.to_string(), phc.to_string());
        tokio::task::spawn_blocking(move || verify_blocking(&s, &p))
            .await
            .unwrap_or(false)
    }

    /// Creates the first admin key on an empty database. Returns the key text when it was
    /// generated here; None when keys exist or one was given. A generated key is handed to
    /// `show` before it is stored: if that fails, nothing is stored.
    pub async fn bootstrap(
        &self,
        given: Option<String>,
        show: impl FnOnce(&str) -> std::io::Result<()>,
    ) -> Result<Option<String>, BootstrapError> {
        if !self.store.keys()?.is_empty() {
            if given.is_some() {
                // Said, because an operator may expect the file to replace the keys.
                tracing::info!(
                    "the database has API keys: the given admin key (--admin-key, \
                     --admin-key-file) is used only on an empty database"
                );
            }
            return Ok(None);
        }
        let fresh = Uuid::now_v7().as_u128();
        // (text, id, text lacks agentq's format, generated here)
        let (text, id, foreign, generated) = match given {
            Some(k) => match key_id_of(&k) {
                Some(id) => (k, id, false, false),
                None => (k, fresh, true, false),
            },
            None => (new_key_text(fresh), fresh, false, true),
        };
        if generated {
            show(&text).map_err(BootstrapError::Show)?;
        }
        let hash = self.hash(text.clone()).await?;
        let created = self
            .store
            .write(move |w| keys::bootstrap_admin(w, id, hash, foreign))
            .await?;
        Ok((created && generated).then_some(text))
    }

    /// Slows an address that failed too often: one attempt at a time, [`AUTH_TARPIT`] each.
    /// Returns the guard to hold while the attempt is verified.
    pub async fn tarpit(&self, ip: IpAddr) -> tokio::sync::OwnedMutexGuard<()> {
        let lane = {
            let mut map = self.tarpits.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 10_000 {
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            map.entry(ip).or_default().clone()
        };
        let guard = lane.lock_owned().await;
        tokio::time::sleep(AUTH_TARPIT).await;
        guard
    }

    /// A key verified, or a session read, recently (no storage, no argon2).
    pub fn cached(&self, credential: &str) -> Option<Arc<Caller>> {
        let d = digest(credential);
        let now = self.store.clock.now();
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let caller = cache
            .get(&d)
            .filter(|c| c.live(Instant::now(), now))?
            .caller
            .clone();
        drop(cache);
        match &caller.session {
            Some(s) => self.touch_session(s.id, s.token_hash),
            None => self.touch_key(caller.key_id),
        }
        Some(caller)
    }

    fn remember(&self, d: [u8; 32], caller: Arc<Caller>, expires_at: Option<Millis>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            let (at, now) = (Instant::now(), self.store.clock.now());
            cache.retain(|_, c| c.live(at, now));
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        let until = Instant::now() + CACHE_TTL;
        cache.insert(
            d,
            Cached {
                caller,
                until,
                expires_at,
            },
        );
    }

    /// Drops the cached session of this token digest (it was ended).
    pub fn forget_session(&self, token_hash: &[u8; 32]) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token_hash);
    }

    /// Resolves a credential to its caller.
    pub async fn authenticate(&self, credential: &str) -> Result<Arc<Caller>, AuthError> {
        if credential.starts_with(SESSION_PREFIX) {
            if let Some(c) = self.cached(credential) {
                return Ok(c);
            }
            return self.session_caller(credential).await;
        }
        let d = digest(credential);
        let lane = {
            let mut map = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(d).or_default().clone()
        };
        let result = {
            let _turn = lane.lock().await;
            match self.cached(credential) {
                Some(c) => Ok(c),
                None => self.verify_key(credential, d).await,
            }
        };
        {
            let mut map = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
            if Arc::strong_count(&lane) <= 2 {
                map.remove(&d);
            }
        }
        result
    }

    async fn verify_key(&self, credential: &str, d: [u8; 32]) -> Result<Arc<Caller>, AuthError> {
        let id = match key_id_of(credential) {
            Some(id) => id,
            None => match self.store.bootstrap_key_id().map_err(AuthError::Store)? {
                Some(id) => id,
                None => return Err(AuthError::Invalid),
            },
        };
        let key = self
            .store
            .key(id)
            .map_err(AuthError::Store)?
            .ok_or(AuthError::Invalid)?;
        if !self.verify(credential, &key.hash).await {
            return Err(AuthError::Invalid);
        }
        let caller = Arc::new(key_caller(&key));
        self.remember(d, caller.clone(), None);
        // The key may have been revoked while argon2 ran. Looking again after caching leaves
        // no gap: a revocation either commits before this look, or its `forget_key` comes
        // after the entry was made.
        if self.store.key(id).map_err(AuthError::Store)?.is_none() {
            self.forget_key(id);
            return Err(AuthError::Invalid);
        }
        self.touch_key(key.id);
        Ok(caller)
    }

    /// A session's caller, read from the store and cached until the session's expiry (or the
    /// cache's TTL). Logout and key revocation drop the entry ([`Self::forget_session`],
    /// [`Self::forget_key`]); an extend needs not, as it only moves the expiry later.
    async fn session_caller(&self, token: &str) -> Result<Arc<Caller>, AuthError> {
        let h = digest(token);
        let live = |s: &Session| s.live_at(self.store.clock.now());
        let s = self
            .store
            .session(&h)
            .map_err(AuthError::Store)?
            .filter(live)
            .ok_or(AuthError::Invalid)?;
        let key = self
            .store
            .key(s.key_id)
            .map_err(AuthError::Store)?
            .ok_or(AuthError::Invalid)?;
        let mut caller = key_caller(&key);
        caller.session = Some(SessionBinding {
            id: s.id,
            token_hash: h,
            agent: s.scope().map(|(a, _)| a.to_string()),
            project: s.scope().map(|(_, p)| p),
        });
        let caller = Arc::new(caller);
        self.remember(h, caller.clone(), Some(s.expires_at));
        // As for keys: a logout or revocation that committed after the first read is seen
        // here, or its forget comes after the entry was made.
        if self.store.session(&h).map_err(AuthError::Store)?.is_none() {
            self.forget_session(&h);
            return Err(AuthError::Invalid);
        }
        self.touch_session(s.id, h);
        Ok(caller)
    }

    /// Records the session's `last_activity`, at most once per [`TOUCH_INTERVAL`].
    fn touch_session(&self, id: u128, token_hash: [u8; 32]) {
        if self.due(id) {
            let store = self.store.clone();
            tokio::spawn(async move {
                let _ = store
                    .write(move |w| keys::touch_session(w, token_hash))
                    .await;
            });
        }
    }

    /// Drops every cached verification of a revoked key.
    pub fn forget_key(&self, id: u128) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, c| c.caller.key_id != id);
    }

    /// Whether the key or session `id` is due a `last_used_at` / `last_activity` write.
    fn due(&self, id: u128) -> bool {
        let now = Instant::now();
        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        match t.get(&id) {
            Some(last) if now.duration_since(*last) < TOUCH_INTERVAL => false,
            _ => {
                // Each login adds a session id: forget the ones not touched for an interval
                // (they are due anyway), so that the map follows the credentials in use.
                if t.len() >= MAX_CACHED {
                    t.retain(|_, last| now.duration_since(*last) < TOUCH_INTERVAL);
                }
                t.insert(id, now);
                true
            }
        }
    }

    fn touch_key(&self, id: u128) {
        if self.due(id) {
            let store = self.store.clone();
            tokio::spawn(async move {
                let _ = store.write(move |w| keys::touch_key(w, id)).await;
            });
        }
    }
}

fn key_caller(key: &ApiKey) -> Caller {
    Caller {
        key_id: key.id,
        role: key.role,
        projects: key.projects.clone(),
        allow_scripts: key.allow_scripts,
        session: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_contract_says() {
        use Right::*;
        let table = [
            (Role::Admin, [true, true, true, true, true]),
            (Role::Producer, [true, true, true, false, false]),
            (Role::Agent, [true, false, false, true, false]),
            (Role::Viewer, [true, false, false, false, false]),
        ];
        for (role, want) in table {
            let got = [Read, ManageProjects, ManageTasks, Work, Admin].map(|r| grants(role, r));
            assert_eq!(got, want, "{role:?}");
        }
    }

    /// The windows of a flood of distinct keys are dropped once they have ended; live ones stay.
    #[test]
    fn a_limiter_drops_ended_windows_past_its_size() {
        let limiter = Limiter::<u64>::new(10);
        let start = Instant::now();
        for k in 0..=PRUNE_PAST as u64 {
            limiter.check_at(k, true, start);
        }
        let len = || limiter.windows.lock().unwrap().len();
        assert_eq!(len(), PRUNE_PAST + 1, "all windows still running");
        limiter.check_at(0, true, start + WINDOW / 2);
        assert_eq!(len(), PRUNE_PAST + 1, "no window has ended yet");
        let later = start + WINDOW + Duration::from_secs(1);
        let info = limiter.check_at(u64::MAX, true, later);
        assert!(info.allowed);
        assert_eq!(len(), 1, "only the new key's window is left");

        // Up to the size, ended windows are left alone (each is reset on its key's next use).
        let small = Limiter::<u64>::new(10);
        for k in 0..PRUNE_PAST as u64 {
            small.check_at(k, true, start);
        }
        small.check_at(u64::MAX, true, later);
        assert_eq!(small.windows.lock().unwrap().len(), PRUNE_PAST + 1);
    }

    #[test]
    fn key_text_carries_its_id() {
        let id = Uuid::now_v7().as_u128();
        let k = new_key_text(id);
        assert_eq!(key_id_of(&k), Some(id));
        assert_eq!(key_id_of("aq_zz"), None);
        assert_eq!(key_id_of("some-operator-chosen-key"), None);
        // Either part of the wrong length: not our format (such a text can only be the
        // operator-supplied admin key, checked against that key's hash).
        let (head, secret) = k.rsplit_once('_').unwrap();
        assert_eq!(key_id_of(&format!("{head}_{}", &secret[1..])), None);
        assert_eq!(key_id_of(&format!("{head}0_{secret}")), None);
        assert_ne!(new_session_token(), new_session_token());
    }

    #[test]
    fn argon2_round_trip() {
        let phc = hash_blocking("s3cret-value").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_blocking("s3cret-value", &phc));
        assert!(!verify_blocking("s3cret-valuE", &phc));
    }

    #[test]
    fn limiter_lets_exactly_n_through_per_window() {
        let l = Limiter::new(3);
        let results: Vec<(bool, bool)> = (0..5)
            .map(|_| l.check(1u128, true))
            .map(|i| (i.allowed, i.first_refused))
            .collect();
        assert_eq!(
            results,
            vec![
                (true, false),
                (true, false),
                (true, false),
                (false, true),
                (false, false)
            ],
            "exactly 3 pass; the first refusal is marked once"
        );
        assert!(!l.check(1u128, false).first_refused, "a look is no refusal");
        let info = l.check(1u128, true);
        assert_eq!(info.remaining, 0);
        assert!(info.retry_after >= 1);
        assert!(l.check(2u128, true).allowed, "keys have their own windows");
    }

    #[test]
    fn scoping_and_sessions() {
        let mut c = Caller {
            key_id: 1,
            role: Role::Agent,
            projects: Some(vec![10]),
            allow_scripts: false,
            session: None,
        };
        assert!(c.sees(10) && !c.sees(11));
        assert!(matches!(
            c.require_in(Right::Read, 11, "project"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            c.require_in(Right::ManageTasks, 10, "project"),
            Err(Error::Forbidden(_))
        ));
        c.projects = None;
        c.session = Some(SessionBinding {
            id: 1,
            token_hash: [0; 32],
            agent: Some("a".into()),
            project: Some(12),
        });
        assert!(c.sees(12) && !c.sees(10) && c.scoped());
        assert!(c.require_agent("a").is_ok());
        assert!(matches!(c.require_agent("b"), Err(Error::Forbidden(_))));
        // A key-scoped session has its key's reach: here, every project and any agent.
        c.session = Some(SessionBinding {
            id: 2,
            token_hash: [0; 32],
            agent: None,
            project: None,
        });
        assert!(c.sees(10) && c.sees(12) && !c.scoped());
        assert!(c.require_agent("b").is_ok());
    }
}

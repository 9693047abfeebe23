//! Storage on redb: the file, the single group-commit writer, and read transactions.
//!
//! What it owns: the database file and every byte in it. What it must not do: know about HTTP.
//!
//! Writes: every mutation is a closure sent to one writer thread. The writer takes everything
//! queued meanwhile (up to [`MAX_BATCH`]; under load, after a short wait for the callers of its
//! last batch, see `writer_loop`) into one write transaction, runs each closure, commits
//! once with redb's default (durable) durability, and only then answers each caller with its
//! own result. Rules that keep batching safe:
//! 1. An operation checks everything that can fail for domain reasons *before* it changes a
//!    row, so a refused operation leaves nothing behind and never affects its batch-mates.
//! 2. A storage error inside any operation aborts the whole batch: nothing is committed and
//!    every caller in it gets the error, so no half-applied operation is ever made durable.
//! 3. A caller hears "success" only after the commit returned. A batch that changed nothing
//!    (every claim in it found no task, say) has nothing to make durable: it is not
//!    committed, which saves the fsync. [`tables::Tracked`] notes every write, and the
//!    compiler allows no other way to write.
//! 4. An operation that panics fails its batch like a storage error; after an I/O error
//!    (which redb makes permanent for the open file) the writer opens the file again
//!    (`reopen`), refusing writes meanwhile, so the server recovers without a restart.
//!
//! Reads open their own read transaction (MVCC snapshots) and never wait for the writer.

pub mod access;
pub mod disk;
pub mod leases;
pub mod read;
pub mod tables;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::hub::{Effects, Hub};
use crate::model::{Millis, Task, TaskStatus};
use crate::time::Clock;
use disk::Disk;
use leases::Leases;
use tables::{Tables, SCHEMA_VERSION};

/// Default size of redb's page cache (read cache and write buffer together). The hot pages
/// of the queue fit easily; redb's own default (1 GiB) lets a large database grow the
/// resident set far past what a queue needs. Measured trade-off in docs/BENCHMARKS.md.
pub const DEFAULT_CACHE_BYTES: usize = 96 * 1024 * 1024;

/// The most operations one write transaction takes.
pub const MAX_BATCH: usize = 4096;

/// How long the writer may wait for the callers of its last batch to come back before it
/// commits a batch that holds only a few of them (see [`writer_loop`]).
const LINGER: std::time::Duration = std::time::Duration::from_micros(300);

/// The smallest last batch after which the writer lingers: below it (a few agents, tasks
/// trickling in) a commit costs each operation less than the wait would.
const LINGER_FROM: usize = 24;

type Reply = Box<dyn FnOnce(Result<()>) + Send>;
/// A write operation: runs inside the batch, returns whether it hit a storage error and how
/// to answer its caller once the batch's fate is known. Called with `None` it does not run
/// and only hands over its reply (the batch could not start, or the file is being reopened).
type Job = Box<dyn FnOnce(Option<&mut W<'_, '_>>) -> (bool, Reply) + Send>;

/// Opens the database file as redb's storage backend: [`disk::file_backend`], or in tests a
/// backend that can be made to fail.
pub type Opener = Arc<dyn Fn(&Path) -> Result<disk::Backend, redb::DatabaseError> + Send + Sync>;

/// What the store and its writer share.
struct Shared {
    /// The open file; `None` while the writer reopens it after an I/O error.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Why the file failed, from the I/O error until it is open again.
    failure: Mutex<Option<String>>,
    /// Whether `failure` is set: every write looks, so it reads no lock.
    failed: std::sync::atomic::AtomicBool,
    /// Set by [`Store::close`]: a write dropped unanswered after it was stopped by the stop.
    stopped: std::sync::atomic::AtomicBool,
    /// Writes are failing: from an I/O error until a batch commits a write again (which may
    /// be long after the file is open again: a disk that stays full). See [`Outage`].
    outage: Mutex<Option<Outage>>,
    /// Whether `outage` is set: every batch looks, so it reads no lock.
    failing: std::sync::atomic::AtomicBool,
}

/// Why writes are failing, and since when: what `/health` reports during a write outage.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    /// The storage error that began it (for operators; never a client's answer).
    pub cause: String,
    /// When it began (the store's clock).
    pub since: Millis,
}

impl Shared {
    fn failure(&self) -> Option<Error> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        let f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.as_ref().map(|cause| {
            Error::Unavailable(format!(
                "the database file failed ({cause}); it is being reopened"
            ))
        })
    }

    fn set_failure(&self, cause: Option<String>) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        self.failed.store(cause.is_some(), Ordering::Release);
        *f = cause;
    }

    fn outage(&self) -> Option<Outage> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.outage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that writes fail (the first cause of a run of failures is kept).
    fn writes_failed(&self, cause: &str, now: Millis) {
        let mut o = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some(Outage {
                cause: cause.to_string(),
                since: now,
            });
            self.failing.store(true, Ordering::Release);
        }
    }

    /// Records that a write reached the disk: the outage, if any, is over.
    fn write_succeeded(&self) {
        if self.failing.load(Ordering::Acquire) {
            let mut o = self.outage.lock().unwrap_or_else(|e| e.into_inner());
            self.failing.store(false, Ordering::Release);
            if let Some(o) = o.take() {
                tracing::info!(
                    cause = %o.cause,
                    "writes succeed again; the storage outage is over"
                );
            }
        }
    }
}

enum Msg {
    Job(Job),
    Stop,
}

/// The write context handed to every operation: the open tables, the batch's clock reading,
/// and the effects to publish after commit.
pub struct W<'a, 'txn> {
    pub t: &'a mut Tables<'txn>,
    pub now: Millis,
    next_seq: &'a mut u64,
    /// No DELAYED index entry is due before this time, so a claim can skip looking for tasks
    /// to promote. A lower bound: [`Millis::MIN`] means "unknown, look".
    delayed_from: &'a mut Millis,
    fx: &'a mut Effects,
}

impl W<'_, '_> {
    pub fn alloc_seq(&mut self) -> u64 {
        let s = *self.next_seq;
        *self.next_seq += 1;
        s
    }

    /// Asks the scheduler to wake at `at` (if that is earlier than it planned).
    pub fn timer(&mut self, at: Millis) {
        self.fx.timer(at);
    }

    /// Has every long-poller of `project` look again once this batch is committed.
    pub fn wake_all(&mut self, project: u128) {
        self.fx.wake_all.push(project);
    }

    /// Whether a delayed task may be due now (false means certainly none is).
    pub fn delayed_may_be_due(&self) -> bool {
        *self.delayed_from <= self.now
    }

    /// Records the time of the earliest delayed task left after a promotion pass
    /// (`None`: there is none).
    pub fn set_delayed_from(&mut self, at: Option<Millis>) {
        *self.delayed_from = at.unwrap_or(Millis::MAX);
    }

    /// Writes a task through [`Tables::put_task`] and records who must be woken.
    pub fn put_task(&mut self, old: Option<&Task>, new: Option<&Task>) -> Result<()> {
        self.t.put_task(old, new)?;
        let mut events = Vec::new();
        crate::telemetry::task_events(old, new, &mut events);
        if let Some(project) = new.or(old).map(|t| t.project_id) {
            for e in events {
                *self.fx.events.entry((project, e)).or_default() += 1;
            }
        }
        if let Some(n) = new {
            let was_ready = old.is_some_and(is_ready);
            if let Some(o) = old {
                self.fx
                    .waits
                    .extend(crate::telemetry::claim_wait(o, n, self.now));
                self.fx.runs.extend(crate::telemetry::lease_run(o, n));
            }
            if is_ready(n) && !was_ready {
                self.fx.ready(n.project_id, n.type_id);
            }
            if let Some(l) = &n.lease {
                if old.and_then(|o| o.lease.as_ref()).map(|l| l.expires_at) != Some(l.expires_at) {
                    self.fx.timer(l.expires_at);
                }
            }
            if n.status == TaskStatus::Queued && n.delayed {
                let at = n.not_before.unwrap_or(0);
                self.fx.timer(at);
                *self.delayed_from = (*self.delayed_from).min(at);
            }
        }
        Ok(())
    }
}

fn is_ready(t: &Task) -> bool {
    t.status == TaskStatus::Queued && !t.delayed
}

pub struct Store {
    shared: Arc<Shared>,
    path: PathBuf,
    tx: mpsc::Sender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// How the writer's batches ended.
    pub batches: Arc<BatchCounts>,
    pub hub: Arc<Hub>,
    pub clock: Arc<dyn Clock>,
}

impl Store {
    /// Opens (or creates) the database at `path`, checks its schema version and starts the
    /// writer thread.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<Arc<Store>, OpenError> {
        Self::open_with_cache(path, clock, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        path: &Path,
        clock: Arc<dyn Clock>,
        cache_bytes: usize,
    ) -> Result<Arc<Store>, OpenError> {
        Self::open_with(path, clock, cache_bytes, Arc::new(disk::file_backend))
    }

    /// [`Store::open`] through `opener`, which the writer also uses to open the file again
    /// after an I/O error (see the module doc, rule 4).
    pub fn open_with(
        path: &Path,
        clock: Arc<dyn Clock>,
        cache_bytes: usize,
        opener: Opener,
    ) -> Result<Arc<Store>, OpenError> {
        let file = File {
            path: path.to_path_buf(),
            cache_bytes,
            opener,
            failed_syncs: Arc::default(),
            shared: Arc::new(Shared {
                db: std::sync::RwLock::new(None),
                failure: Mutex::new(None),
                failed: Default::default(),
                stopped: Default::default(),
                outage: Mutex::new(None),
                failing: Default::default(),
            }),
        };
        let db = file.open().map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::Locked(path.to_path_buf()),
            other => OpenError::Io(path.to_path_buf(), other.to_string()),
        })?;
        let state = init_schema(&db, path, clock.as_ref())?;
        let batches = state.counts.clone();
        let db = Arc::new(db);
        *file.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
        let shared = file.shared.clone();
        let hub = Arc::new(Hub::default());
        hub.set_first_lease(state.leases.next_due());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let hub = hub.clone();
            let clock = clock.clone();
            std::thread::Builder::new()
                .name("agentq-writer".into())
                .spawn(move || writer_loop(db, &file, rx, &hub, clock.as_ref(), state))
                .map_err(|e| OpenError::Io(path.to_path_buf(), e.to_string()))?
        };
        Ok(Arc::new(Store {
            shared,
            path: path.to_path_buf(),
            tx,
            writer: Mutex::new(Some(writer)),
            batches,
            hub,
            clock,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Runs `op` in the next write batch and answers after the batch committed.
    pub async fn write<R: Send + 'static>(
        &self,
        op: impl FnOnce(&mut W<'_, '_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.submit(op, false).await
    }

    /// [`Store::write`] for an operation worth doing only for a caller still waiting for its
    /// answer: a claim. When the writer reaches it and its caller has stopped waiting (the
    /// client went away and its request was dropped), `op` does not run: a task leased to
    /// nobody listening would sit until its lease expired, and cost a retry. Once the
    /// operation has run, its answer can still be lost on the way out; the same agent name
    /// then resumes the task (see API-NOTES, "The lease protocol").
    pub async fn write_awaited<R: Send + 'static>(
        &self,
        op: impl FnOnce(&mut W<'_, '_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.submit(op, true).await
    }

    async fn submit<R: Send + 'static>(
        &self,
        op: impl FnOnce(&mut W<'_, '_>) -> Result<R> + Send + 'static,
        unless_abandoned: bool,
    ) -> Result<R> {
        if let Some(e) = self.shared.failure() {
            return Err(e);
        }
        let (reply_tx, reply_rx) = oneshot::channel::<Result<R>>();
        let job: Job = Box::new(move |w| {
            if unless_abandoned && reply_tx.is_closed() {
                // Nobody is waiting for the answer: change nothing.
                let nobody: Reply = Box::new(|_| {});
                return (false, nobody);
            }
            // Not run (`None`): the batch's error is the answer, `result` is never seen.
            let result = w.map_or(Err(Error::ShuttingDown), op);
            let failed = matches!(result, Err(Error::Storage(_)));
            let reply: Reply = Box::new(move |commit: Result<()>| {
                let _ = reply_tx.send(commit.and(result));
            });
            (failed, reply)
        });
        self.tx
            .send(Msg::Job(job))
            .map_err(|_| Error::ShuttingDown)?;
        reply_rx.await.map_err(|_| {
            if self.shared.stopped.load(Ordering::Acquire) {
                Error::ShuttingDown
            } else {
                // Its operation panicked (see `run_batch`), taking the answer with it.
                Error::Storage(
                    "the operation stopped with a panic; its batch was not written".into(),
                )
            }
        })?
    }

    /// Why the database file cannot be used now: an I/O error the writer is recovering from
    /// by opening the file again. `None` when it works.
    pub fn failure(&self) -> Option<Error> {
        self.shared.failure()
    }

    /// Whether writes are failing now: from a storage error until a write is committed again
    /// (the writer tries one of its own when nobody writes, see [`PROBE_EVERY`], so the
    /// outage ends by itself once the cause is gone). `None` when writes work.
    pub fn outage(&self) -> Option<Outage> {
        self.shared.outage()
    }

    /// A read transaction on the open file, begun under the slot's read lock (no clone of the
    /// handle, so the writer's reopen finds it unshared as soon as it has emptied the slot).
    fn begin_read_txn(&self) -> Result<ReadTransaction> {
        let slot = self.shared.db.read().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(db) => Ok(db.begin_read()?),
            None if self.shared.stopped.load(Ordering::Acquire) => Err(Error::ShuttingDown),
            None => Err(self
                .shared
                .failure()
                .unwrap_or_else(|| Error::Storage("the database file is closed".into()))),
        }
    }

    /// Deletes a project with everything in it. The first write marks it as being deleted
    /// (from then on nothing finds it, and its long-pollers are woken to a 404); its tasks
    /// then go in chunks of [`write::DELETE_CHUNK`], each its own write, so that other writes
    /// are not held for the whole project; the last write removes what is left with the
    /// project, atomically. It runs on a task of its own, so a caller that stops waiting (a
    /// client that gave up, a dropped connection) does not stop it half way; a delete cut
    /// short by a crash or a stop is resumed at the next start.
    pub async fn delete_project(self: &Arc<Self>, project: u128) -> Result<()> {
        let store = self.clone();
        let delete = async move {
            store
                .write(move |w| write::begin_project_delete(w, project))
                .await?;
            store.hub.wake_all(project);
            store.finish_delete(project).await
        };
        to_the_end(delete).await
    }

    /// The chunks and the last write of a project delete (see [`Store::delete_project`]).
    /// Logs the project and how many tasks went, and how long it took.
    async fn finish_delete(&self, project: u128) -> Result<()> {
        let started = std::time::Instant::now();
        let mut tasks = 0;
        loop {
            let n = self
                .write(move |w| write::delete_project_tasks(w, project, write::DELETE_CHUNK))
                .await?;
            tasks += n;
            if n < write::DELETE_CHUNK {
                break;
            }
        }
        tasks += self
            .write(move |w| write::finish_project_delete(w, project))
            .await?;
        tracing::info!(
            project = %uuid::Uuid::from_u128(project),
            tasks,
            ms = started.elapsed().as_millis() as u64,
            "project deleted"
        );
        Ok(())
    }

    /// Ends the project deletes a crash or a stop cut short: the projects still marked
    /// [`ProjectStatus::Deleting`](crate::model::ProjectStatus::Deleting). The server runs it
    /// in the background at start-up; answers how many it finished.
    pub async fn resume_deletes(&self) -> Result<usize> {
        let pending = self.read()?.projects_being_deleted()?;
        for &project in &pending {
            tracing::info!(
                project = %uuid::Uuid::from_u128(project),
                "resuming a project delete cut short"
            );
            self.finish_delete(project).await?;
        }
        Ok(pending.len())
    }

    /// The earliest pending timer: a lease expiry, a delayed task's `notBefore`, or a session
    /// expiry.
    pub fn next_timer(&self) -> Result<Option<Millis>> {
        let stored = self.read()?.next_timer()?;
        Ok(stored.into_iter().chain(self.hub.first_lease()).min())
    }

    /// A read snapshot. Cheap; never waits for the writer.
    pub fn read(&self) -> Result<read::Reader> {
        Ok(read::Reader::new(self.begin_read_txn()?))
    }

    pub fn begin_read(&self) -> Result<ReadTransaction> {
        self.begin_read_txn()
    }

    /// Stops the writer after it has committed and answered everything already queued.
    pub fn close(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        let _ = self.tx.send(Msg::Stop);
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("database file {0} is already in use by another agentq process (only one server may open a file)")]
    Locked(PathBuf),
    #[error("database file {0} has schema version {1}, newer than this agentq understands ({2}); upgrade agentq")]
    TooNew(PathBuf, u64, u64),
    #[error("cannot open database file {0}: {1}")]
    Io(PathBuf, String),
}

/// Creates every table, records the schema version on a new file, refuses a newer one,
/// migrates an older one, and returns what the writer starts from: the next task seq and the
/// leases held.
fn init_schema(db: &Database, path: &Path, clock: &dyn Clock) -> Result<WriterState, OpenError> {
    let io = |e: Error| OpenError::Io(path.to_path_buf(), e.to_string());
    let run = || -> Result<Result<WriterState, OpenError>> {
        let txn = db.begin_write()?;
        let next_seq;
        let mut migrated = None;
        let mut leases = Leases::at(clock);
        {
            let mut t = Tables::open(&txn, &mut leases)?;
            let version = t.meta.get("schema_version")?.map(|v| v.value());
            match version {
                Some(v) if v > SCHEMA_VERSION => {
                    return Ok(Err(OpenError::TooNew(
                        path.to_path_buf(),
                        v,
                        SCHEMA_VERSION,
                    )))
                }
                Some(v @ 1..=3) => {
                    // Rows first: the older migrations read them the current way.
                    let tasks = tables::migrate_v3(&mut t)?;
                    let leases = if v == 1 {
                        tables::migrate_v1(&mut t)?
                    } else {
                        0
                    };
                    let batched = if v <= 2 {
                        tables::migrate_v2(&mut t)?
                    } else {
                        0
                    };
                    migrated = Some((v, tasks, leases, batched));
                    t.meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(_) => {}
                None => {
                    t.meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            next_seq = t.tasks.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            *t.leases = Leases::load(&*t.projects, &*t.index, clock)?;
        }
        txn.commit()?;
        if let Some((from, tasks, leases, batched)) = migrated {
            tracing::info!(
                database = %path.display(),
                tasks,
                leases,
                batched_tasks = batched,
                "database migrated from schema {from} to {SCHEMA_VERSION}"
            );
        }
        Ok(Ok(WriterState {
            counts: Arc::default(),
            next_seq,
            delayed_from: Millis::MIN,
            leases,
            reopened: None,
            hold: std::time::Duration::ZERO,
            clock_offset: None,
        }))
    };
    run().map_err(io)?
}

/// Runs `work` on a task of its own and waits for it: a caller that stops waiting (a client
/// that gave up, a dropped connection) does not stop it half way, say between a write and
/// what must follow it.
pub async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| Error::Storage(format!("stopped half way: {e}")))?
}

/// The database file as the writer knows it: where it is, how to open it, and the slot the
/// readers take it from.
struct File {
    path: PathBuf,
    cache_bytes: usize,
    opener: Opener,
    /// Syncs of the file that failed (see [`disk`]).
    failed_syncs: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl File {
    fn open(&self) -> Result<Database, redb::DatabaseError> {
        let disk = Disk::new((self.opener)(&self.path)?, self.failed_syncs.clone());
        let repair = Arc::new(RepairLog::default());
        let (log, path) = (repair.clone(), self.path.clone());
        let db = Database::builder()
            .set_cache_size(self.cache_bytes)
            .set_repair_callback(move |session| log.progress(&path, session.progress()))
            .create_with_backend(disk)?;
        if let Some(started) = repair.started.get() {
            tracing::info!(
                database = %self.path.display(),
                ms = started.elapsed().as_millis() as u64,
                "database repaired"
            );
        }
        Ok(db)
    }
}

/// Says what redb is doing when it opens a file that was not closed (a crash, a power loss, a
/// SIGKILL): it reads the whole file to check it and rebuild its free-page state, which takes
/// seconds on a large file (3 s for 1 GB from a cold page cache here), and nothing is served
/// meanwhile. Without this an operator sees a server that is up but not yet healthy, silently.
#[derive(Default)]
struct RepairLog {
    started: std::sync::OnceLock<std::time::Instant>,
    /// The last quarter of the work logged (1-3).
    quarter: std::sync::atomic::AtomicU8,
}

impl RepairLog {
    fn progress(&self, path: &Path, done: f64) {
        if self.started.set(std::time::Instant::now()).is_ok() {
            tracing::warn!(
                database = %path.display(),
                "the database was not closed cleanly: checking and repairing it before serving"
            );
        }
        let quarter = (done.clamp(0.0, 1.0) * 4.0) as u8;
        if (1..4).contains(&quarter) && self.quarter.fetch_max(quarter, Ordering::Relaxed) < quarter
        {
            tracing::info!(database = %path.display(), "repairing the database: {}%", quarter * 25);
        }
    }
}

/// The longest pause between two attempts to open the file again after an I/O error.
const MAX_REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// A failure this soon after the file was last opened again counts as a repeat (see
/// [`reopen`]), and how long writes stay refused after the first repeat.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
const FIRST_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

fn writer_loop(
    mut db: Arc<Database>,
    file: &File,
    rx: mpsc::Receiver<Msg>,
    hub: &Hub,
    clock: &dyn Clock,
    mut state: WriterState,
) {
    let mut stopping = false;
    let mut last = 0usize;
    let mut probe_wait = PROBE_EVERY.0;
    while !stopping {
        let Some(first) = next_message(&rx, &file.shared, &mut probe_wait) else {
            break;
        };
        let mut jobs = Vec::new();
        match first {
            Msg::Job(j) => jobs.push(j),
            Msg::Stop => stopping = true,
        }
        stopping |= take_queued(&rx, &mut jobs);
        // Agents loop: most callers of the last batch send their next operation within
        // moments, one after another as their clients get to them. Committing the first
        // arrivals alone costs a whole commit (an fsync) for a few operations while the
        // rest queue behind it, and the batches then alternate between a handful and
        // dozens (a third of the commits of a 64-agent cycle held four operations or
        // fewer). So when fewer than half of them are back, wait a moment for the others.
        if last >= LINGER_FROM && jobs.len() < last / 2 && !stopping {
            std::thread::sleep(LINGER);
            stopping |= take_queued(&rx, &mut jobs);
        }
        last = jobs.len();
        if jobs.is_empty() {
            continue;
        }
        let Some(cause) = run_batch(&db, file, jobs, hub, clock, &mut state) else {
            continue;
        };
        if stopping {
            continue;
        }
        match reopen(db, file, &rx, hub, clock, &mut state, cause) {
            Some(again) => db = again,
            None => return,
        }
    }
    // Anything sent after Stop is dropped with the receiver: its caller sees ShuttingDown.
    // The file is closed here, not when the last handle on the store goes: a task that has
    // not yet noticed the stop (a scheduler pass, a background write's caller) would hold it
    // open past `close`, and a new store on the same file would find it locked.
    close_file(db, file, "closing the database file");
}

/// How long the writer waits, while writes are failing and nobody writes, before it tries a
/// write of its own (first, and longest: the wait doubles after each probe). So the outage
/// ends (and `/health` says so) soon after its cause is gone, without waiting for a client,
/// and a disk that stays full is not reopened (and logged) more than twice a minute for it.
pub const PROBE_EVERY: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(30),
);

/// The writer's next message: the next one sent, or during an outage, after `probe_wait`
/// without one, a probe. `None`: every sender is gone.
fn next_message(
    rx: &mpsc::Receiver<Msg>,
    shared: &Shared,
    probe_wait: &mut std::time::Duration,
) -> Option<Msg> {
    if !shared.failing.load(Ordering::Acquire) {
        *probe_wait = PROBE_EVERY.0;
        return rx.recv().ok();
    }
    match rx.recv_timeout(*probe_wait) {
        Ok(msg) => Some(msg),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            *probe_wait = (*probe_wait * 2).min(PROBE_EVERY.1);
            Some(Msg::Job(probe()))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
    }
}

/// A write that proves the file takes writes again: the time of the probe, in the meta table.
fn probe() -> Job {
    Box::new(|w| {
        let failed = w.is_some_and(|w| w.t.meta.insert("write_probe", w.now as u64).is_err());
        let nobody: Reply = Box::new(|_| {});
        (failed, nobody)
    })
}

/// Moves what is queued into `jobs`, up to [`MAX_BATCH`]; whether a stop was among it.
#[inline]
fn take_queued(rx: &mpsc::Receiver<Msg>, jobs: &mut Vec<Job>) -> bool {
    let mut stop = false;
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(Msg::Job(j)) => jobs.push(j),
            Ok(Msg::Stop) => stop = true,
            Err(_) => break,
        }
    }
    stop
}

/// Empties the slot and closes the file. The slot held the only other handle (readers begin
/// under its lock and keep none), so the file is released at once; a read still in progress
/// gets an error.
fn close_file(db: Arc<Database>, file: &File, context: &str) {
    *file.shared.db.write().unwrap_or_else(|e| e.into_inner()) = None;
    if let Ok(db) = Arc::try_unwrap(db) {
        if let Err(e) = db.close() {
            tracing::warn!(error = %e, "{context}");
        }
    }
}

/// Whether the file must be opened again: after an I/O error (a full disk, a failing
/// device) redb refuses every write transaction until then.
fn poisoned(db: &Database) -> bool {
    match db.begin_write() {
        Ok(txn) => {
            let _ = txn.abort();
            false
        }
        Err(_) => true,
    }
}

/// Opens the file again after an I/O error (whose `cause` [`run_batch`] has recorded), so that
/// the server recovers by itself once the cause is gone (space freed, say). Meanwhile writes
/// fail at once with the cause and reads find no file: both answer 503, and `/health` says
/// unhealthy. It empties the readers' slot and closes the file, then opens it (redb repairs
/// it if needed) and rereads what the writer keeps, retrying with back-off; after a failure
/// soon after the last reopen it first pauses (see below). `None`: the store was stopped
/// meanwhile.
fn reopen(
    db: Arc<Database>,
    file: &File,
    rx: &mpsc::Receiver<Msg>,
    hub: &Hub,
    clock: &dyn Clock,
    st: &mut WriterState,
    cause: String,
) -> Option<Arc<Database>> {
    tracing::error!(
        database = %file.path.display(),
        error = %cause,
        "the database file failed; writes are refused until it is open again"
    );
    crate::telemetry::storage_failed();
    st.counts.reopens.fetch_add(1, Ordering::Relaxed);
    close_file(db, file, "closing the failed database file");
    let started = std::time::Instant::now();
    // A disk that stays full can still let the file be opened (its free pages take the
    // start-up write) and then fail the next write that grows it. Without a pause, each
    // batch of a busy fleet would close and open the file again (with its log lines); so
    // after a failure soon after the last reopen, writes stay refused for a while once the
    // file is open again (reads work meanwhile), twice as long each time in a row.
    st.hold = match st.reopened {
        Some(at) if at.elapsed() < REPEAT_WINDOW => {
            (st.hold * 2).clamp(FIRST_HOLD, MAX_REOPEN_WAIT)
        }
        _ => std::time::Duration::ZERO,
    };
    let mut opened = None::<Database>;
    let mut wait = std::time::Duration::from_millis(10);
    loop {
        if opened.is_none() {
            match file.open() {
                Ok(db) => opened = Some(db),
                Err(e) => tracing::warn!(error = %e, "opening the database file again failed"),
            }
        }
        if let Some(db) = opened.take() {
            match init_schema(&db, &file.path, clock) {
                Ok(fresh) => {
                    st.next_seq = fresh.next_seq;
                    st.delayed_from = Millis::MIN;
                    let mut leases = fresh.leases;
                    leases.keep_deadlines(&st.leases);
                    st.leases = leases;
                    hub.set_first_lease(st.leases.next_due());
                    let db = Arc::new(db);
                    *file.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
                    st.reopened = Some(std::time::Instant::now());
                    tracing::info!(
                        database = %file.path.display(),
                        ms = started.elapsed().as_millis() as u64,
                        writes_in_ms = st.hold.as_millis() as u64,
                        "the database file is open again"
                    );
                    if !refuse_for(st.hold, file, rx) {
                        close_file(db, file, "closing the database file");
                        return None;
                    }
                    file.shared.set_failure(None);
                    return Some(db);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the database file opened again but cannot be written");
                    if poisoned(&db) {
                        let _ = db.close();
                    } else {
                        opened = Some(db);
                    }
                }
            }
        }
        if !refuse_for(wait, file, rx) {
            return None;
        }
        wait = (wait * 2).min(MAX_REOPEN_WAIT);
    }
}

/// Answers every write sent in the next `hold` with the recorded failure (writes queued
/// before the failure was known included). `false`: the store was stopped meanwhile.
fn refuse_for(hold: std::time::Duration, file: &File, rx: &mpsc::Receiver<Msg>) -> bool {
    let until = std::time::Instant::now() + hold;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(left) {
            Ok(Msg::Job(job)) => {
                let (_, reply) = job(None);
                reply(Err(file.shared.failure().unwrap_or(Error::ShuttingDown)));
            }
            Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            Err(mpsc::RecvTimeoutError::Timeout) => return true,
        }
    }
}

/// How the writer's batches ended, since the store opened.
#[derive(Debug, Default)]
pub struct BatchCounts {
    pub committed: AtomicU64,
    /// Batches that changed nothing and were not committed.
    pub unwritten: AtomicU64,
    /// Operations run, in batches of any outcome.
    pub operations: AtomicU64,
    /// Failures after which the file was (or is being) opened again.
    pub reopens: AtomicU64,
}

/// What the writer keeps between batches.
struct WriterState {
    counts: Arc<BatchCounts>,
    next_seq: u64,
    /// See [`W::delayed_may_be_due`].
    delayed_from: Millis,
    leases: Leases,
    /// When the file was last opened again after a failure, and how long writes stayed
    /// refused after that (see [`reopen`]).
    reopened: Option<std::time::Instant>,
    hold: std::time::Duration,
    /// The wall clock less the steady clock at the last batch (see [`note_clock_step`]).
    clock_offset: Option<Millis>,
}

/// Smallest change of the wall clock against the steady clock reported as a step.
const CLOCK_STEP_MS: Millis = 1000;

/// Notes a step of the system clock since the last batch: the wall clock moved against the
/// steady one by a second or more (NTP slews smaller corrections). Leases are not cut short
/// by it (`leases`), but an operator should know why `leaseExpiresAt` reads as past, or why
/// timestamps jumped.
fn note_clock_step(last: &mut Option<Millis>, offset: Millis) {
    if let Some(before) = last.replace(offset) {
        let step = offset - before;
        if step.abs() >= CLOCK_STEP_MS {
            crate::telemetry::clock_stepped();
            tracing::warn!(
                step_ms = step,
                "the system clock stepped; leases keep their real durations (a lease's \
                 leaseExpiresAt may read as past, or lie further off, by the step)"
            );
        }
    }
}

/// Runs one batch and answers its callers. Returns the cause when the batch failed on an I/O
/// error after which the file must be opened again; by then the failure is recorded, so that
/// a caller who hears of it finds `/health` unhealthy and later writes refused at once.
fn run_batch(
    db: &Database,
    file: &File,
    jobs: Vec<Job>,
    hub: &Hub,
    clock: &dyn Clock,
    st: &mut WriterState,
) -> Option<String> {
    let started = std::time::Instant::now();
    let seq_before = st.next_seq;
    let mut fx = Effects::default();
    let mut replies = Vec::with_capacity(jobs.len());
    let mut written = false;
    // Taken when the jobs run; left here if the batch fails before that.
    let mut pending = Some(jobs);
    let mut reopen_cause = None;
    let outcome: Result<()> = (|| {
        let txn = db.begin_write()?;
        let mut failed = false;
        {
            let (now, steady) = (clock.now(), clock.steady());
            note_clock_step(&mut st.clock_offset, now - steady);
            st.leases.set_time(now, steady);
            let mut tables = Tables::open(&txn, &mut st.leases)?;
            let jobs = pending.take().unwrap_or_default();
            let mut w = W {
                t: &mut tables,
                now,
                next_seq: &mut st.next_seq,
                delayed_from: &mut st.delayed_from,
                fx: &mut fx,
            };
            for job in jobs {
                // A bug that panics in one operation must not end the writer, which would
                // leave the server refusing every write: the panic fails the batch like a
                // storage error (nothing of it is written), and the writer goes on.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Some(&mut w)))) {
                    Ok((f, reply)) => {
                        failed |= f;
                        replies.push(reply);
                    }
                    Err(_) => failed = true,
                }
            }
            if !failed {
                tables.flush()?;
                written = tables.written();
            }
        }
        if failed {
            let _ = txn.abort();
            return Err(Error::Storage("an operation in the batch failed".into()));
        }
        if written {
            // A commit that failed in its writes left the file as it was; one that failed in
            // its fsync may have reached the disk, to be seen once the file is open again.
            let syncs = file.failed_syncs.load(Ordering::SeqCst);
            txn.commit().map_err(|e| {
                if file.failed_syncs.load(Ordering::SeqCst) == syncs {
                    Error::Storage(e.to_string())
                } else {
                    Error::CommitUnknown(e.to_string())
                }
            })?;
        } else {
            // Nothing changed, so nothing needs to become durable: skip the commit's fsync.
            // (redb commits an empty transaction like any other.)
            let _ = txn.abort();
        }
        Ok(())
    })();
    if let Err(e) = &outcome {
        for job in pending.into_iter().flatten() {
            replies.push(job(None).1);
        }
        tracing::error!(error = %e, batch = replies.len(), "write batch failed; nothing committed");
        st.next_seq = seq_before;
        // The batch's promotions were rolled back with it: look again next time.
        st.delayed_from = Millis::MIN;
        if poisoned(db) {
            let cause = match e {
                Error::Storage(cause) | Error::CommitUnknown(cause) => cause.clone(),
                other => other.to_string(),
            };
            file.shared.writes_failed(&cause, clock.now());
            file.shared.set_failure(Some(cause.clone()));
            reopen_cause = Some(cause);
        } else {
            // Its lease changes were rolled back too: reload the cache from what is committed
            // (a reopen rereads it anyway).
            match Leases::reload(db, clock, &st.leases) {
                Ok(l) => st.leases = l,
                Err(e) => {
                    tracing::error!(error = %e, "could not reload leases after a failed batch")
                }
            }
        }
        fx = Effects::default();
    }
    let n = replies.len();
    if outcome.is_ok() && written {
        file.shared.write_succeeded();
    }
    if outcome.is_ok() && !written {
        crate::telemetry::unwritten_batch();
        st.counts.unwritten.fetch_add(1, Ordering::Relaxed);
    } else {
        crate::telemetry::commit(started.elapsed().as_secs_f64(), n);
        if outcome.is_ok() {
            st.counts.committed.fetch_add(1, Ordering::Relaxed);
        }
    }
    st.counts.operations.fetch_add(n as u64, Ordering::Relaxed);
    hub.set_first_lease(st.leases.next_due());
    // Counters and wake-ups first, so that a caller who reads /metrics after its answer sees
    // its own transition counted.
    hub.publish(fx);
    for reply in replies {
        reply(outcome.clone());
    }
    tracing::trace!(batch = n, "write batch committed");
    reopen_cause
}

#[cfg(test)]
mod tests {
    use super::tables::META;
    use super::*;
    use crate::time::SystemClock;

    #[test]
    fn a_file_from_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = match Store::open(&path, Arc::new(SystemClock)) {
            Err(e) => e,
            Ok(_) => panic!("a newer schema was opened"),
        };
        assert!(matches!(err, OpenError::TooNew(_, v, _) if v == SCHEMA_VERSION + 1));
        assert!(err.to_string().contains("future.redb"));
    }

    #[test]
    fn a_new_file_records_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.redb");
        let store = Store::open(&path, Arc::new(SystemClock)).unwrap();
        store.close();
        drop(store);
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let v = txn.open_table(META).unwrap().get("schema_version").unwrap();
        assert_eq!(v.map(|v| v.value()), Some(SCHEMA_VERSION));
    }

    /// `close` releases the file although other handles on the store live on (tasks that have
    /// not yet seen the stop): a new store opens it at once, and the old one refuses reads.
    #[test]
    fn close_releases_the_file_while_the_store_is_still_shared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.redb");
        let store = Store::open(&path, Arc::new(SystemClock)).unwrap();
        let lingering = store.clone();
        store.close();
        let again = Store::open(&path, Arc::new(SystemClock)).expect("the file was released");
        assert!(matches!(lingering.read(), Err(Error::ShuttingDown)));
        again.close();
    }
}

#[cfg(test)]
mod batch_tests {
    use super::write::{self, Claim, NewProject, NewTask};
    use super::*;
    use crate::time::SystemClock;

    /// A store on a new file `b.redb` in `dir`, a runtime to drive it, and the id of its one
    /// project.
    fn with_project(dir: &tempfile::TempDir) -> (Arc<Store>, tokio::runtime::Runtime, String) {
        let store = Store::open(&dir.path().join("b.redb"), Arc::new(SystemClock)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (project, _) = rt
            .block_on(store.write(|w| write::create_project(w, NewProject::named("p"))))
            .unwrap();
        (store, rt, uuid::Uuid::from_u128(project.id).to_string())
    }

    fn add_tasks(rt: &tokio::runtime::Runtime, store: &Store, project: &str, n: usize) {
        let key = project.to_string();
        let tasks = (0..n)
            .map(|_| NewTask {
                instructions: Some("x".into()),
                ..NewTask::default()
            })
            .collect();
        rt.block_on(store.write(move |w| write::create_tasks(w, &key, tasks)))
            .unwrap();
    }

    fn claim(
        rt: &tokio::runtime::Runtime,
        store: &Store,
        project: &str,
        agent: &str,
    ) -> Option<String> {
        let (p, a) = (project.to_string(), agent.to_string());
        match rt
            .block_on(store.write(move |w| write::next_task(w, &p, &a, None, write::no_check)))
            .unwrap()
        {
            Claim::Task(t, _) => Some(t.id),
            Claim::None => None,
        }
    }

    /// A claim whose caller stopped waiting before the writer reached it (its request was
    /// dropped: the client went away) leases nothing with `write_awaited`; with `write` it
    /// would have leased the task to nobody.
    #[test]
    fn a_claim_nobody_waits_for_leases_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, pid) = with_project(&dir);
        add_tasks(&rt, &store, &pid, 2);
        let queued = |store: &Store| {
            let id = uuid::Uuid::parse_str(&pid).unwrap().as_u128();
            store.read().unwrap().stats(id).unwrap().queued
        };
        for awaited in [true, false] {
            // Hold the writer in an operation until the claim is queued behind it and dropped.
            let (hold, held) = std::sync::mpsc::channel::<()>();
            let (started, holding) = std::sync::mpsc::channel::<()>();
            let blocker = std::thread::spawn({
                let store = store.clone();
                move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(store.write(move |_| {
                        started.send(()).unwrap();
                        held.recv().unwrap();
                        Ok(())
                    }))
                }
            });
            holding.recv().unwrap();
            let (p, s) = (pid.clone(), store.clone());
            let claim = async move {
                let op =
                    move |w: &mut W<'_, '_>| write::next_task(w, &p, "a", None, write::no_check);
                match awaited {
                    true => s.write_awaited(op).await,
                    false => s.write(op).await,
                }
            };
            // Polled until it waits for its answer, then dropped, as hyper drops a request
            // whose client has gone.
            let wait = std::time::Duration::from_millis(50);
            let gone = rt.block_on(async { tokio::time::timeout(wait, claim).await });
            assert!(
                gone.is_err(),
                "the claim cannot be answered while the writer is held"
            );
            hold.send(()).unwrap();
            blocker.join().unwrap().unwrap();
            // Any later write runs after the dropped claim in the writer's order.
            rt.block_on(store.write(|_| Ok(()))).unwrap();
            assert_eq!(
                queued(&store),
                if awaited { 2 } else { 1 },
                "awaited: {awaited}"
            );
        }
    }

    /// A delete cut short (here: marked and one chunk gone, as when the next chunk's write
    /// meets a storage error) leaves the project hidden; deleting it again by id takes the
    /// delete up and ends it; after that the project is not found.
    #[test]
    fn a_delete_cut_short_is_taken_up_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, pid) = with_project(&dir);
        add_tasks(&rt, &store, &pid, 2 * write::DELETE_CHUNK + 10);
        let id = uuid::Uuid::parse_str(&pid).unwrap().as_u128();
        rt.block_on(store.write(move |w| {
            write::begin_project_delete(w, id)?;
            write::delete_project_tasks(w, id, write::DELETE_CHUNK)
        }))
        .unwrap();
        let r = store.read().unwrap();
        assert!(matches!(r.project(&pid), Err(Error::NotFound(_))));
        assert_eq!(r.project_being_deleted(&pid).unwrap(), Some(id));
        assert_eq!(r.stats(id).unwrap().total, write::DELETE_CHUNK as u64 + 10);
        drop(r);
        rt.block_on(store.delete_project(id)).unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.project_being_deleted(&pid).unwrap(), None);
        drop(r);
        let txn = store.begin_read().unwrap();
        let tasks = txn.open_table(tables::TASKS).unwrap();
        assert_eq!(redb::ReadableTableMetadata::len(&tasks).unwrap(), 0);
        drop((tasks, txn));
        let again = rt.block_on(store.delete_project(id));
        assert!(matches!(again, Err(Error::NotFound(_))), "{again:?}");
        store.close();
    }

    /// An operation that panics (a bug) fails with a storage error and nothing of it is
    /// written; the writer goes on with the next batch.
    #[test]
    fn a_panicking_operation_writes_nothing_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, pid) = with_project(&dir);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = rt.block_on(store.write(|w| -> Result<()> {
            write::create_project(w, NewProject::named("q"))?;
            panic!("a bug")
        }));
        std::panic::set_hook(hook);
        assert!(
            matches!(&r, Err(Error::Storage(m)) if m.contains("panic")),
            "{r:?}"
        );
        assert!(store.read().unwrap().project("q").is_err());
        add_tasks(&rt, &store, &pid, 1);
        assert!(claim(&rt, &store, &pid, "a").is_some());
        store.close();
    }

    /// A batch that fails after a claim rolls the claim back, in the file and in the writer's
    /// lease cache: the agent holds nothing, and the task goes to the next agent that asks.
    /// The leases committed before it stay in the cache: their holder resumes.
    #[test]
    fn a_failed_batch_leaves_no_lease_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, pid) = with_project(&dir);
        add_tasks(&rt, &store, &pid, 2);
        let c = claim(&rt, &store, &pid, "c").expect("a task for c");
        assert!(store.hub.first_lease().is_some());
        let key = pid.clone();
        let failed = rt.block_on(store.write(move |w| {
            write::next_task(w, &key, "a", None, write::no_check)?;
            Err::<(), _>(Error::Storage("injected after the claim".into()))
        }));
        assert!(matches!(failed, Err(Error::Storage(_))));
        // c's lease is still outstanding. (Not compared to the time before: the reloaded
        // cache reads the wall and steady clocks anew, and the next look can move by the
        // millisecond between those two reads.)
        assert!(
            store.hub.first_lease().is_some(),
            "c's lease is outstanding"
        );
        let b = claim(&rt, &store, &pid, "b");
        assert!(b.is_some(), "the task is still queued");
        assert_ne!(b.as_ref(), Some(&c));
        assert_eq!(claim(&rt, &store, &pid, "a"), None, "agent a holds nothing");
        assert_eq!(claim(&rt, &store, &pid, "b"), b, "agent b resumes its task");
        assert_eq!(
            claim(&rt, &store, &pid, "c"),
            Some(c),
            "agent c resumes the task it held before the failed batch"
        );
        store.close();
    }

    /// A batch whose operations changed nothing (a claim on an empty queue, an agent asking
    /// again for the task it holds) is not committed; one that changed something is, and
    /// stays committed across a restart.
    #[test]
    fn a_batch_that_changed_nothing_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, pid) = with_project(&dir);
        let counts = |store: &Store| {
            let b = &store.batches;
            (
                b.committed.load(Ordering::Relaxed),
                b.unwritten.load(Ordering::Relaxed),
            )
        };
        assert_eq!(counts(&store), (1, 0));
        assert_eq!(claim(&rt, &store, &pid, "a"), None);
        assert_eq!(counts(&store), (1, 1), "an empty claim commits nothing");
        add_tasks(&rt, &store, &pid, 1);
        let id = claim(&rt, &store, &pid, "a");
        assert!(id.is_some());
        assert_eq!(counts(&store), (3, 1), "a create and a claim commit");
        assert_eq!(claim(&rt, &store, &pid, "a"), id, "resumed");
        assert_eq!(
            counts(&store),
            (3, 2),
            "resuming the task held writes nothing"
        );
        store.close();
        drop(store);
        let store = Store::open(&dir.path().join("b.redb"), Arc::new(SystemClock)).unwrap();
        assert_eq!(claim(&rt, &store, &pid, "a"), id, "the claim was committed");
        assert_eq!(claim(&rt, &store, &pid, "b"), None);
        store.close();
    }

    /// Deleting a project deletes its activity rows with it: those already stored, and those
    /// of the batch that deletes it.
    #[test]
    fn a_deleted_project_leaves_no_activity_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, pid) = with_project(&dir);
        let activity_rows = |store: &Store| {
            let txn = store.begin_read().unwrap();
            let index = txn.open_table(tables::INDEX).unwrap();
            let from = [tables::ix::ACTIVITY];
            let to = [tables::ix::ACTIVITY + 1];
            index.range::<&[u8]>(&from[..]..&to[..]).unwrap().count()
        };
        add_tasks(&rt, &store, &pid, 2);
        let first = claim(&rt, &store, &pid, "a").unwrap();
        let second = claim(&rt, &store, &pid, "b").unwrap();
        rt.block_on(
            store
                .write(move |w| write::complete(w, &first, "a", None, None, None, write::no_check)),
        )
        .unwrap();
        assert_eq!(activity_rows(&store), 1, "a completion is counted");
        let id = uuid::Uuid::parse_str(&pid).unwrap().as_u128();
        rt.block_on(store.write(move |w| {
            write::complete(w, &second, "b", None, None, None, write::no_check)?;
            write::begin_project_delete(w, id)?;
            write::finish_project_delete(w, id)
        }))
        .unwrap();
        assert_eq!(
            activity_rows(&store),
            0,
            "the project's activity went with it"
        );
        store.close();
    }
}

#[cfg(test)]
mod reopen_tests {
    use super::write::{self, Claim, NewProject, NewTask};
    use super::*;
    use crate::time::SystemClock;

    fn tasks(n: usize) -> Vec<NewTask> {
        (0..n)
            .map(|_| NewTask {
                instructions: Some("x".into()),
                ..NewTask::default()
            })
            .collect()
    }

    /// A store on a [`disk::Faulty`] file in `dir`, its switches, a runtime, and its one
    /// project's id.
    fn flaky_store(
        dir: &tempfile::TempDir,
    ) -> (Arc<Store>, disk::Faults, tokio::runtime::Runtime, u128) {
        let switches = disk::Faults::default();
        let opener = disk::faulty_opener(switches.clone());
        let path = dir.path().join("f.redb");
        let store =
            Store::open_with(&path, Arc::new(SystemClock), DEFAULT_CACHE_BYTES, opener).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (project, _) = rt
            .block_on(store.write(|w| write::create_project(w, NewProject::named("p"))))
            .unwrap();
        (store, switches, rt, project.id)
    }

    fn create(rt: &tokio::runtime::Runtime, store: &Store, pid: u128, n: usize) -> Result<()> {
        let key = uuid::Uuid::from_u128(pid).to_string();
        rt.block_on(store.write(move |w| write::create_tasks(w, &key, tasks(n))))
            .map(|_| ())
    }

    fn claim(
        rt: &tokio::runtime::Runtime,
        store: &Store,
        pid: u128,
        agent: &'static str,
    ) -> Result<Option<String>> {
        let key = uuid::Uuid::from_u128(pid).to_string();
        let claim = store.write(move |w| write::next_task(w, &key, agent, None, write::no_check));
        match rt.block_on(claim)? {
            Claim::Task(t, _) => Ok(Some(t.id)),
            Claim::None => Ok(None),
        }
    }

    /// Waits up to `secs` for `f` to hold.
    fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        f()
    }

    /// A write that meets an I/O error (the disk full) fails, and so does every write after
    /// it, with the cause, while the file cannot be written; reads find no file. Once the
    /// writes succeed again the writer has opened the file again by itself: what was
    /// committed is all there, the failed batch left nothing, and the leases are as
    /// committed (the holder resumes its task, another agent gets another).
    #[test]
    fn a_full_disk_fails_writes_until_the_file_can_be_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, rt, pid) = flaky_store(&dir);
        let full = faults.full;
        create(&rt, &store, pid, 3).unwrap();
        let held = claim(&rt, &store, pid, "a").unwrap().expect("a task");

        full.store(true, Ordering::SeqCst);
        let failed = create(&rt, &store, pid, 5);
        // The writes failed, so the commit left the file as it was: "not applied".
        assert!(matches!(failed, Err(Error::Storage(_))), "{failed:?}");
        assert!(eventually(5, || store.failure().is_some()));
        let cause = store.failure().expect("the failure is known").to_string();
        assert!(cause.contains("os error 28"), "{cause}");
        // Past the first reopen attempts, which fail as the disk is still full.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let refused = claim(&rt, &store, pid, "b");
        assert!(
            matches!(&refused, Err(Error::Unavailable(m)) if m.contains("being reopened")),
            "{refused:?}"
        );
        assert!(
            store.read().is_err(),
            "reads find no file while it is being reopened"
        );

        full.store(false, Ordering::SeqCst);
        let mut other = None;
        assert!(
            eventually(10, || {
                other = claim(&rt, &store, pid, "b").ok().flatten();
                other.is_some()
            }),
            "never recovered"
        );
        assert!(store.failure().is_none());
        assert_ne!(other.unwrap(), held);
        assert_eq!(
            claim(&rt, &store, pid, "a").unwrap(),
            Some(held),
            "a resumes its task"
        );
        let stats = store.read().unwrap().stats(pid).unwrap();
        assert_eq!((stats.total, stats.running), (3, 2), "{stats:?}");
        create(&rt, &store, pid, 1).unwrap();
        assert_eq!(store.read().unwrap().stats(pid).unwrap().total, 4);
        store.close();
    }

    /// A disk that stays full under a file with free pages inside: the file opens again (its
    /// start-up write fits) and the next write that grows it fails again. After each repeated
    /// failure the writer refuses writes for longer before it tries one, so a stream of writes
    /// does not turn into a reopen each, and reads work meanwhile; once the file can grow
    /// again, writes succeed and nothing failed was kept.
    #[test]
    fn a_disk_that_stays_full_is_not_reopened_for_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, rt, pid) = flaky_store(&dir);
        create(&rt, &store, pid, 10).unwrap();
        faults.no_growth.store(true, Ordering::SeqCst);
        let big = |n: usize| -> Vec<NewTask> {
            (0..n)
                .map(|_| NewTask {
                    instructions: Some("x".repeat(10_000)),
                    ..NewTask::default()
                })
                .collect()
        };
        let key = uuid::Uuid::from_u128(pid).to_string();
        let started = std::time::Instant::now();
        let (mut refused, mut read) = (0, 0);
        while started.elapsed() < std::time::Duration::from_millis(1500) {
            let (key, tasks) = (key.clone(), big(100));
            let r = rt.block_on(store.write(move |w| write::create_tasks(w, &key, tasks)));
            assert!(
                matches!(r, Err(Error::Storage(_) | Error::Unavailable(_))),
                "{r:?}"
            );
            refused += 1;
            // Reads work while writes are held off (the file is open), not only between
            // reopens.
            if store.read().is_ok_and(|r| r.stats(pid).is_ok()) {
                read += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(read * 2 > refused, "{read} reads of {refused} worked");
        let reopens = store.batches.reopens.load(Ordering::Relaxed);
        // Pauses of 0, 50, 100, 200, 400 and 800 ms: at most six reopens in 1.5 s, where
        // one per write would be one per refused write.
        assert!(
            (2..=6).contains(&reopens),
            "{reopens} reopens for {refused} writes"
        );
        assert!(refused > 3 * reopens, "{refused} writes, {reopens} reopens");

        faults.no_growth.store(false, Ordering::SeqCst);
        assert!(
            eventually(10, || {
                let (key, tasks) = (key.clone(), big(100));
                rt.block_on(store.write(move |w| write::create_tasks(w, &key, tasks)))
                    .is_ok()
            }),
            "never recovered"
        );
        assert_eq!(store.read().unwrap().stats(pid).unwrap().total, 110);
        store.close();
    }

    /// A commit whose fsync fails may have reached the file anyway: its callers hear that it
    /// may have been applied (not "not applied"), and after the file is open again the store
    /// works and its counters agree with its rows, whichever way it went.
    #[test]
    fn a_failed_sync_answers_that_the_write_may_have_been_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, rt, pid) = flaky_store(&dir);
        let bad_sync = faults.bad_sync;
        create(&rt, &store, pid, 3).unwrap();
        bad_sync.store(true, Ordering::SeqCst);
        let failed = create(&rt, &store, pid, 2);
        assert!(matches!(failed, Err(Error::CommitUnknown(_))), "{failed:?}");
        bad_sync.store(false, Ordering::SeqCst);
        assert!(
            eventually(10, || create(&rt, &store, pid, 1).is_ok()),
            "never recovered"
        );
        let r = store.read().unwrap();
        let total = r.stats(pid).unwrap().total;
        assert!(total == 4 || total == 6, "{total}");
        let query = read::TaskQuery {
            limit: 100,
            ..read::TaskQuery::default()
        };
        let listed = r.list_tasks(pid, &query).unwrap();
        assert_eq!((listed.total, listed.tasks.len() as u64), (total, total));
        drop(r);
        store.close();
    }
}

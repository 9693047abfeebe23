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

pub mod check;
mod delete;
pub mod disk;
pub mod keys;
pub mod leases;
mod open;
pub mod read;
pub mod schema;
pub mod tables;
pub mod write;
mod writer;

use open::{init_schema, File};
use writer::{writer_loop, Job, Msg, Reply, WriterState};
pub use writer::{BatchCounts, WriteCtx, MAX_BATCH, PROBE_EVERY};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::{Millis, Task, TaskStatus};
use crate::report::BatchReport;
use crate::time::Clock;
use disk::Disk;
use leases::Leases;
use tables::{Tables, SCHEMA_VERSION};

/// Default size of redb's page cache (read cache and write buffer together). The hot pages
/// of the queue fit easily; redb's own default (1 GiB) lets a large database grow the
/// resident set far past what a queue needs: with 1M tasks stored the server's resident set
/// is about 45 MiB plus 1.5-1.8 times this (docs/OPERATIONS.md, memory sizing).
pub const DEFAULT_CACHE_BYTES: usize = 96 * 1024 * 1024;

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
        let opened = init_schema(&db, path, clock.as_ref())?;
        let batches = Arc::new(BatchCounts::default());
        let db = Arc::new(db);
        *file.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
        let shared = file.shared.clone();
        let hub = Arc::new(Hub::default());
        hub.set_first_lease(opened.leases.next_due());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let hub = hub.clone();
            let clock = clock.clone();
            let state = WriterState::new(opened, batches.clone());
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
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<R> + Send + 'static,
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
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.submit(op, true).await
    }

    async fn submit<R: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<R> + Send + 'static,
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

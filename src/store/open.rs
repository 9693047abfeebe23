//! Opening the database file: redb's repair of a file that was not closed (logged as it
//! goes), the schema check, the migrations of an older file, and what the writer starts from.

use super::*;

/// What the writer starts from, read from the file: the next task seq and the leases held.
pub(super) struct Opened {
    pub(super) next_seq: u64,
    pub(super) leases: Leases,
}

/// Creates every table, records the schema version on a new file, refuses a newer one,
/// migrates an older one, and returns what the writer starts from: the next task seq and the
/// leases held.
pub(super) fn init_schema(
    db: &Database,
    path: &Path,
    clock: &dyn Clock,
) -> Result<Opened, OpenError> {
    let io = |e: Error| OpenError::Io(path.to_path_buf(), e.to_string());
    let run = || -> Result<Result<Opened, OpenError>> {
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
                Some(v @ 1..=5) => {
                    // Rows first: the older migrations read them the current way.
                    let (tasks, leases, batched) = if v <= 3 {
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
                        (tasks, leases, batched)
                    } else {
                        (0, 0, 0)
                    };
                    if v <= 4 {
                        tables::migrate_v4(&mut t)?;
                    }
                    let ended = tables::migrate_v5(&mut t)?;
                    migrated = Some((v, tasks, leases, batched, ended));
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
        if let Some((from, tasks, leases, batched, ended)) = migrated {
            tracing::info!(
                database = %path.display(),
                tasks,
                leases,
                batched_tasks = batched,
                finished_tasks = ended,
                "database migrated from schema {from} to {SCHEMA_VERSION}"
            );
        }
        Ok(Ok(Opened { next_seq, leases }))
    };
    run().map_err(io)?
}

/// The database file as the writer knows it: where it is, how to open it, and the slot the
/// readers take it from.
pub(super) struct File {
    pub(super) path: PathBuf,
    pub(super) cache_bytes: usize,
    pub(super) opener: Opener,
    /// Syncs of the file that failed (see [`disk`]).
    pub(super) failed_syncs: Arc<AtomicU64>,
    pub(super) shared: Arc<Shared>,
}

impl File {
    pub(super) fn open(&self) -> Result<Database, redb::DatabaseError> {
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

//! Opening the database file again after an I/O error, so that the server recovers by itself
//! once the cause is gone (space freed): the writer calls [`reopen`] after a batch that left
//! redb refusing every write transaction. See docs/STORAGE.md, "I/O errors and the write
//! outage".

use super::super::open::{init_schema, File};
use super::*;

/// The longest pause between two attempts to open the file again after an I/O error.
const MAX_REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// A failure this soon after the file was last opened again counts as a repeat (see
/// [`reopen`]), and how long writes stay refused after the first repeat.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
const FIRST_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

/// Empties the slot and closes the file. The slot held the only other handle (readers begin
/// under its lock and keep none), so the file is released at once; a read still in progress
/// gets an error.
pub(super) fn close_file(db: Arc<Database>, file: &File, context: &str) {
    *file.shared.db.write().unwrap_or_else(|e| e.into_inner()) = None;
    if let Ok(db) = Arc::try_unwrap(db) {
        if let Err(e) = db.close() {
            tracing::warn!(error = %e, "{context}");
        }
    }
}

/// Whether the file must be opened again: after an I/O error (a full disk, a failing
/// device) redb refuses every write transaction until then.
pub(super) fn poisoned(db: &Database) -> bool {
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
pub(super) fn reopen(
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

#[cfg(test)]
mod reopen_tests {
    use super::*;
    use crate::store::write::{self, Claim, NewProject, NewTask};
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

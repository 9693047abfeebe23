//! The writer thread: every write transaction, in batches (group commit).
//!
//! Operations arrive as closures ([`Job`]) over a channel; the writer takes everything queued
//! into one transaction, runs each against the batch's [`W`], commits once, hands what the
//! batch did to the hub, and only then answers each caller. The rules that keep batching safe
//! are in the store's module doc; the file's reopening after an I/O error is in `reopen`.

mod reopen;

use super::open::{File, Opened};
use super::*;
use reopen::{close_file, poisoned, reopen};

/// The most operations one write transaction takes.
pub const MAX_BATCH: usize = 4096;

/// How long the writer may wait for the callers of its last batch to come back before it
/// commits a batch that holds only a few of them (see [`writer_loop`]).
const LINGER: std::time::Duration = std::time::Duration::from_micros(300);

/// The smallest last batch after which the writer lingers: below it (a few agents, tasks
/// trickling in) a commit costs each operation less than the wait would.
const LINGER_FROM: usize = 24;

pub(super) type Reply = Box<dyn FnOnce(Result<()>) + Send>;
/// A write operation: runs inside the batch, returns whether it hit a storage error and how
/// to answer its caller once the batch's fate is known. Called with `None` it does not run
/// and only hands over its reply (the batch could not start, or the file is being reopened).
pub(super) type Job = Box<dyn FnOnce(Option<&mut WriteCtx<'_, '_>>) -> (bool, Reply) + Send>;

pub(super) enum Msg {
    Job(Job),
    Stop,
}

/// The write context handed to every operation: the open tables, the batch's clock reading,
/// and the effects to publish after commit.
pub struct WriteCtx<'a, 'txn> {
    pub tables: &'a mut Tables<'txn>,
    pub now: Millis,
    next_seq: &'a mut u64,
    /// No DELAYED index entry is due before this time, so a claim can skip looking for tasks
    /// to promote. A lower bound: [`Millis::MIN`] means "unknown, look".
    delayed_from: &'a mut Millis,
    /// What the batch did, for the hub to act on after the commit.
    effects: &'a mut BatchReport,
}

impl WriteCtx<'_, '_> {
    pub fn alloc_seq(&mut self) -> u64 {
        let s = *self.next_seq;
        *self.next_seq += 1;
        s
    }

    /// Asks the scheduler to wake at `at` (if that is earlier than it planned).
    pub fn timer(&mut self, at: Millis) {
        self.effects.timer(at);
    }

    /// Has every long-poller of `project` look again once this batch is committed.
    pub fn wake_all(&mut self, project: u128) {
        self.effects.wake_all.push(project);
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
        self.tables.put_task(old, new)?;
        let mut events = Vec::new();
        crate::report::task_events(old, new, &mut events);
        if let Some(project) = new.or(old).map(|t| t.project_id) {
            for e in events {
                *self.effects.events.entry((project, e)).or_default() += 1;
            }
        }
        if let Some(n) = new {
            let was_ready = old.is_some_and(is_ready);
            if let Some(o) = old {
                self.effects
                    .waits
                    .extend(crate::report::claim_wait(o, n, self.now));
                self.effects.runs.extend(crate::report::lease_run(o, n));
            }
            if is_ready(n) && !was_ready {
                self.effects.ready(n.project_id, n.type_id);
            }
            if let Some(l) = &n.lease {
                if old.and_then(|o| o.lease.as_ref()).map(|l| l.expires_at) != Some(l.expires_at) {
                    self.effects.timer(l.expires_at);
                }
            }
            if n.status == TaskStatus::Queued && n.delayed {
                let at = n.not_before.unwrap_or(0);
                self.effects.timer(at);
                *self.delayed_from = (*self.delayed_from).min(at);
            }
        }
        Ok(())
    }
}

fn is_ready(t: &Task) -> bool {
    t.status == TaskStatus::Queued && !t.delayed
}

pub(super) fn writer_loop(
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
        let failed = w.is_some_and(|w| w.tables.meta.insert("write_probe", w.now as u64).is_err());
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
pub(super) struct WriterState {
    pub(super) counts: Arc<BatchCounts>,
    pub(super) next_seq: u64,
    /// See [`W::delayed_may_be_due`].
    pub(super) delayed_from: Millis,
    pub(super) leases: Leases,
    /// When the file was last opened again after a failure, and how long writes stayed
    /// refused after that (see [`reopen`]).
    pub(super) reopened: Option<std::time::Instant>,
    pub(super) hold: std::time::Duration,
    /// The wall clock less the steady clock at the last batch (see [`note_clock_step`]).
    pub(super) clock_offset: Option<Millis>,
}

impl WriterState {
    pub(super) fn new(opened: Opened, counts: Arc<BatchCounts>) -> WriterState {
        WriterState {
            counts,
            next_seq: opened.next_seq,
            delayed_from: Millis::MIN,
            leases: opened.leases,
            reopened: None,
            hold: std::time::Duration::ZERO,
            clock_offset: None,
        }
    }
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
    let mut fx = BatchReport::default();
    let mut replies = Vec::with_capacity(jobs.len());
    // Taken when the jobs run; left here if the batch fails before that.
    let mut pending = Some(jobs);
    let outcome = run_and_commit(db, file, clock, st, &mut pending, &mut replies, &mut fx);
    let mut reopen_cause = None;
    if let Err(e) = &outcome {
        for job in pending.into_iter().flatten() {
            replies.push(job(None).1);
        }
        tracing::error!(error = %e, batch = replies.len(), "write batch failed; nothing committed");
        st.next_seq = seq_before;
        reopen_cause = after_failure(db, file, clock, st, e);
        fx = BatchReport::default();
    }
    let written = *outcome.as_ref().unwrap_or(&false);
    count_batch(file, st, &outcome, replies.len(), started);
    hub.set_first_lease(st.leases.next_due());
    // The one place a batch's report leaves the store: to the metrics and to the wake-ups,
    // both before the answers, so that a caller who reads /metrics after its answer sees its
    // own transition counted.
    crate::telemetry::record_batch(&fx);
    hub.publish(&fx);
    let n = replies.len();
    let answer = outcome.map(|_| ());
    for reply in replies {
        reply(answer.clone());
    }
    tracing::trace!(batch = n, written, "write batch done");
    reopen_cause
}

/// Runs the jobs in one write transaction and commits it if they wrote anything: whether it
/// was committed. A job that hit a storage error or panicked aborts the whole batch.
fn run_and_commit(
    db: &Database,
    file: &File,
    clock: &dyn Clock,
    st: &mut WriterState,
    pending: &mut Option<Vec<Job>>,
    replies: &mut Vec<Reply>,
    fx: &mut BatchReport,
) -> Result<bool> {
    let txn = db.begin_write()?;
    let mut failed = false;
    let mut written = false;
    {
        let (now, steady) = (clock.now(), clock.steady());
        note_clock_step(&mut st.clock_offset, now - steady);
        st.leases.set_time(now, steady);
        let mut tables = Tables::open(&txn, &mut st.leases)?;
        let mut w = WriteCtx {
            tables: &mut tables,
            now,
            next_seq: &mut st.next_seq,
            delayed_from: &mut st.delayed_from,
            effects: fx,
        };
        for job in pending.take().unwrap_or_default() {
            // A bug that panics in one operation must not end the writer, which would leave
            // the server refusing every write: the panic fails the batch like a storage error
            // (nothing of it is written), and the writer goes on.
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
    if !written {
        // Nothing changed, so nothing needs to become durable: skip the commit's fsync.
        // (redb commits an empty transaction like any other.)
        let _ = txn.abort();
        return Ok(false);
    }
    // A commit that failed in its writes left the file as it was; one that failed in its
    // fsync may have reached the disk, to be seen once the file is open again.
    let syncs = file.failed_syncs.load(Ordering::SeqCst);
    txn.commit().map_err(|e| {
        if file.failed_syncs.load(Ordering::SeqCst) == syncs {
            Error::Storage(e.to_string())
        } else {
            Error::CommitUnknown(e.to_string())
        }
    })?;
    Ok(true)
}

/// After a batch that failed: what it changed in the writer's state is rolled back, and when
/// redb refuses writes from now on (an I/O error), the outage is recorded and its cause
/// returned, for the file to be opened again.
fn after_failure(
    db: &Database,
    file: &File,
    clock: &dyn Clock,
    st: &mut WriterState,
    e: &Error,
) -> Option<String> {
    // The batch's promotions were rolled back with it: look again next time.
    st.delayed_from = Millis::MIN;
    if poisoned(db) {
        let cause = match e {
            Error::Storage(cause) | Error::CommitUnknown(cause) => cause.clone(),
            other => other.to_string(),
        };
        file.shared.writes_failed(&cause, clock.now());
        file.shared.set_failure(Some(cause.clone()));
        return Some(cause);
    }
    // Its lease changes were rolled back too: reload the cache from what is committed (a
    // reopen rereads it anyway).
    match Leases::reload(db, clock, &st.leases) {
        Ok(l) => st.leases = l,
        Err(e) => tracing::error!(error = %e, "could not reload leases after a failed batch"),
    }
    None
}

/// Counts how a batch ended (committed, unwritten or failed) in the metrics and the store's
/// counters; a committed write ends a write outage.
fn count_batch(
    file: &File,
    st: &WriterState,
    outcome: &Result<bool>,
    n: usize,
    started: std::time::Instant,
) {
    match outcome {
        Ok(false) => {
            crate::telemetry::unwritten_batch();
            st.counts.unwritten.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true) => {
            file.shared.write_succeeded();
            crate::telemetry::commit(started.elapsed().as_secs_f64(), n);
            st.counts.committed.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => crate::telemetry::commit(started.elapsed().as_secs_f64(), n),
    }
    st.counts.operations.fetch_add(n as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::store::write::{self, Claim, Done, NewProject, NewTask};
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
                let op = move |w: &mut WriteCtx<'_, '_>| {
                    write::next_task(w, &p, "a", None, write::no_check)
                };
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
        let txn = store.begin_read_txn().unwrap();
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
            let txn = store.begin_read_txn().unwrap();
            let index = txn.open_table(tables::INDEX).unwrap();
            let from = [tables::ix::ACTIVITY];
            let to = [tables::ix::ACTIVITY + 1];
            index.range::<&[u8]>(&from[..]..&to[..]).unwrap().count()
        };
        add_tasks(&rt, &store, &pid, 2);
        let first = claim(&rt, &store, &pid, "a").unwrap();
        let second = claim(&rt, &store, &pid, "b").unwrap();
        rt.block_on(
            store.write(move |w| write::complete(w, Done::new(&first), "a", write::no_check)),
        )
        .unwrap();
        assert_eq!(activity_rows(&store), 1, "a completion is counted");
        let id = uuid::Uuid::parse_str(&pid).unwrap().as_u128();
        rt.block_on(store.write(move |w| {
            write::complete(w, Done::new(&second), "b", write::no_check)?;
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

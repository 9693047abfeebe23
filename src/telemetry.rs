//! Metrics: what agentq counts, and the two ways to read it (`/metrics`, `/metrics/json`).
//!
//! Counters and histograms are recorded where things happen (the HTTP frame, the writer, the
//! auth layer) through the `metrics` facade; gauges that mirror stored state (tasks by status,
//! active leases, database size) are set from the store when `/metrics` is scraped, so they
//! cost nothing between scrapes and are exact when read. The Prometheus recorder is installed
//! once per process.
//!
//! Names follow Prometheus conventions: `agentq_` prefix, base units (seconds, bytes), `_total`
//! on counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::model::{Millis, Outcome, Stats, TaskStatus};
use crate::report::{BatchReport, TaskEvent};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ];
            let batch = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
            ];
            // Task waits and lease runs: from a moment to a day.
            let task_times = [
                0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0,
                3600.0, 21_600.0, 86_400.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("agentq_http_request_duration_seconds".into()),
                    &latency,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("agentq_storage_commit_duration_seconds".into()),
                        &latency,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("agentq_storage_commit_batch_size".into()),
                        &batch,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("agentq_task_wait_seconds".into()),
                        &task_times,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("agentq_task_run_seconds".into()),
                        &task_times,
                    )
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .inspect(|_| describe())
                .unwrap_or_else(|_| {
                    // Another recorder is installed (an embedding program's): keep ours local.
                    PrometheusBuilder::new().build_recorder().handle()
                })
        })
        .clone()
}

/// HELP and unit of every series, and the process-wide counters at zero, so that a scrape
/// shows every series from the start (an absent counter cannot be alerted on).
fn describe() {
    describe_http();
    describe_queue();
    describe_storage();
    describe_process();
    for event in TaskEvent::ALL {
        let (name, help) = family(event);
        describe_counter!(name, help);
    }
    describe_counter!(
        "agentq_tasks_pruned_total",
        "Finished tasks deleted by retention (their project's --retain-* age passed), by project and status."
    );
    counter!("agentq_rate_limited_total").increment(0);
    counter!("agentq_auth_failures_total").increment(0);
    counter!("agentq_storage_batches_unwritten_total").increment(0);
    counter!("agentq_storage_failures_total").increment(0);
    counter!("agentq_http_connections_total").increment(0);
    counter!("agentq_http_connections_idle_closed_total").increment(0);
    counter!("agentq_http_accept_errors_total").increment(0);
    counter!("agentq_http_body_timeouts_total").increment(0);
    counter!("agentq_long_polls_abandoned_total").increment(0);
    counter!("agentq_clock_steps_total").increment(0);
    gauge!("agentq_http_connections_open").increment(0.0);
}

/// The HTTP families: requests, connections, refused requests.
fn describe_http() {
    describe_counter!(
        "agentq_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "agentq_http_request_duration_seconds",
        Unit::Seconds,
        "Time from request received to response ready, by method and route template."
    );
    describe_gauge!(
        "agentq_http_connections_open",
        "HTTP connections open now (each agent holds one)."
    );
    describe_counter!(
        "agentq_http_connections_total",
        "HTTP connections accepted."
    );
    describe_counter!(
        "agentq_http_connections_idle_closed_total",
        "HTTP connections closed after the idle limit (--idle-timeout-secs) without a request in progress."
    );
    describe_counter!(
        "agentq_http_accept_errors_total",
        "Failed accepts of new connections (most often: out of file descriptors); accepting pauses and retries."
    );
    describe_counter!(
        "agentq_http_unparsed_requests_total",
        "Requests the HTTP parser refused before any handler ran, by status: 400 (malformed \
         request line, path or header), 414 (URI too long), 431 (headers too large)."
    );
    describe_counter!(
        "agentq_http_body_timeouts_total",
        "Requests whose body stalled (--body-timeout-secs without a byte) or came slower than \
         500 bytes/s; answered 408 and their connection closed."
    );
}

/// The queue's families: tasks, leases, waits, long-polls.
fn describe_queue() {
    describe_gauge!(
        "agentq_long_poll_waiters",
        "Requests waiting in next-task with waitSeconds."
    );
    describe_gauge!("agentq_tasks", "Tasks stored, by project and status.");
    describe_histogram!(
        "agentq_task_wait_seconds",
        Unit::Seconds,
        "How long each task handed out had waited, ready, before an agent took it (since it \
         was queued, requeued or last edited, or since its notBefore if later)."
    );
    describe_histogram!(
        "agentq_task_run_seconds",
        Unit::Seconds,
        "How long each lease ran, from the claim to its end, by how it ended: completed, \
         failed (requeued or not), timeout (reclaimed by the reaper) or cancelled."
    );
    describe_gauge!(
        "agentq_queue_wait_seconds",
        Unit::Seconds,
        "How long the longest-waiting task at the front of the project's queue (the first of \
         each priority level) has been ready and not handed out; 0 when no task is ready or \
         the project is closed."
    );
    describe_gauge!(
        "agentq_active_leases",
        "Tasks running under a lease, by project."
    );
    describe_counter!(
        "agentq_long_polls_abandoned_total",
        "Long-polls (next-task with waitSeconds) whose client left before the answer; a client \
         timeout shorter than waitSeconds shows here."
    );
}

/// The storage families: commits, failures, the outage, the log.
fn describe_storage() {
    describe_histogram!(
        "agentq_storage_commit_duration_seconds",
        Unit::Seconds,
        "Wall time of one durable write batch: its operations and the commit (fsync)."
    );
    describe_histogram!(
        "agentq_storage_commit_batch_size",
        Unit::Count,
        "Write operations committed together in one durable commit."
    );
    describe_counter!(
        "agentq_storage_batches_unwritten_total",
        "Write batches that changed nothing (say, every claim in them found no task) and so were not committed: no fsync."
    );
    describe_counter!(
        "agentq_storage_failures_total",
        "I/O errors on the database file after which it had to be opened again (writes answer 503 until it is)."
    );
    describe_gauge!(
        "agentq_storage_size_bytes",
        Unit::Bytes,
        "Size of the database file."
    );
    describe_gauge!(
        "agentq_storage_writable",
        "1 while writes reach the disk; 0 from a storage error (a full disk, a failed sync) \
         until a write succeeds again, as /health's \"degraded\"."
    );
    describe_counter!(
        "agentq_log_lines_dropped_total",
        "Log lines that could not be written to stderr (a full disk, a closed pipe) and were \
         dropped; the server goes on."
    );
    describe_counter!(
        "agentq_clock_steps_total",
        "Steps of the system clock of a second or more that the writer saw between two batches \
         (NTP, a restored VM). Leases keep their real durations across them."
    );
}

/// The process, build and access families.
fn describe_process() {
    describe_gauge!(
        "agentq_build_info",
        "Always 1; the version label names the build."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the agentq process."
    );
    describe_counter!(
        "agentq_rate_limited_total",
        "Requests refused with 429 by the per-key rate limit."
    );
    describe_counter!(
        "agentq_auth_failures_total",
        "Requests refused with 401 (missing, unknown or revoked key or session)."
    );
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds until shutdown.
/// The exporter keeps raw samples until a render or an upkeep; without this, a server that is
/// never scraped would hold every request's duration in memory.
pub async fn upkeep(handle: PrometheusHandle, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
            _ = &mut shutdown => return,
        }
    }
}

/// Request totals for `/metrics/json`.
#[derive(Default)]
pub struct RequestTotals {
    pub total: AtomicU64,
    pub errors: AtomicU64,
    pub micros: AtomicU64,
}

impl RequestTotals {
    pub fn record(&self, status: u16, micros: u64) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if status >= 400 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// A request series: method label, route template and status.
type SeriesKey = (&'static str, &'static str, u16);

thread_local! {
    /// Handles of the request series this worker thread has seen, so that a request costs one
    /// small map lookup rather than building labelled keys and looking them up in the registry.
    static HTTP_SERIES: std::cell::RefCell<HashMap<SeriesKey, (Counter, Histogram)>> =
        std::cell::RefCell::new(HashMap::new());
}

/// The `method` label: the standard methods by name, any other token as `OTHER`, so that a
/// client inventing methods cannot create series without bound.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

/// Records one HTTP request.
pub fn http_request(method: &str, route: &'static str, status: u16, seconds: f64) {
    let method = method_label(method);
    HTTP_SERIES.with(|series| {
        let mut series = series.borrow_mut();
        let (count, duration) = series.entry((method, route, status)).or_insert_with(|| {
            (
                counter!(
                    "agentq_http_requests_total",
                    "method" => method,
                    "route" => route,
                    "status" => status.to_string()
                ),
                histogram!(
                    "agentq_http_request_duration_seconds",
                    "method" => method,
                    "route" => route
                ),
            )
        });
        count.increment(1);
        duration.record(seconds);
    });
}

pub fn commit(seconds: f64, batch: usize) {
    histogram!("agentq_storage_commit_duration_seconds").record(seconds);
    histogram!("agentq_storage_commit_batch_size").record(batch as f64);
}

/// A write batch that changed nothing and was not committed.
pub fn unwritten_batch() {
    counter!("agentq_storage_batches_unwritten_total").increment(1);
}

/// An I/O error on the database file; the writer opens it again.
pub fn storage_failed() {
    counter!("agentq_storage_failures_total").increment(1);
}

/// A connection accepted; its [`OpenConnection`] counts it open until dropped.
pub fn connection_opened() -> OpenConnection {
    counter!("agentq_http_connections_total").increment(1);
    gauge!("agentq_http_connections_open").increment(1.0);
    OpenConnection
}

/// Counts one connection open for as long as it lives.
pub struct OpenConnection;

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!("agentq_http_connections_open").decrement(1.0);
    }
}

/// A connection closed for having no request in progress for the idle limit.
pub fn connection_idle_closed() {
    counter!("agentq_http_connections_idle_closed_total").increment(1);
}

/// A failed accept.
/// A request the HTTP parser refused before any handler ran (400, 414 or 431).
pub fn request_unparsed(status: u16) {
    counter!("agentq_http_unparsed_requests_total", "status" => status.to_string()).increment(1);
}

/// A request body that stalled or trickled past its limit (answered 408).
pub fn body_timed_out() {
    counter!("agentq_http_body_timeouts_total").increment(1);
}

pub fn accept_failed() {
    counter!("agentq_http_accept_errors_total").increment(1);
}

pub fn rate_limited() {
    counter!("agentq_rate_limited_total").increment(1);
}

pub fn long_poll_abandoned() {
    counter!("agentq_long_polls_abandoned_total").increment(1);
}

pub fn clock_stepped() {
    counter!("agentq_clock_steps_total").increment(1);
}

pub fn auth_failed() {
    counter!("agentq_auth_failures_total").increment(1);
}

/// A task event's counter: its name and its help text.
fn family(event: TaskEvent) -> (&'static str, &'static str) {
    match event {
        TaskEvent::Created => ("agentq_tasks_created_total", "Tasks created, by project."),
        TaskEvent::Claimed => (
            "agentq_tasks_claimed_total",
            "Tasks handed to an agent under a lease, by project.",
        ),
        TaskEvent::Completed => (
            "agentq_tasks_completed_total",
            "Tasks completed by their agent, by project.",
        ),
        TaskEvent::Failed => (
            "agentq_tasks_failed_total",
            "Tasks failed for good (no retries left), by project.",
        ),
        TaskEvent::Retried => (
            "agentq_tasks_retried_total",
            "Failed or expired attempts put back in the queue, by project.",
        ),
        TaskEvent::LeaseExpired => (
            "agentq_tasks_lease_expired_total",
            "Leases that ran out before the agent answered, by project.",
        ),
        TaskEvent::Cancelled => (
            "agentq_tasks_cancelled_total",
            "Tasks cancelled, by project.",
        ),
    }
}

fn metric(event: TaskEvent) -> &'static str {
    family(event).0
}

/// Records what a committed batch did: its task events, the waits of the tasks it handed
/// out and the run times of the leases it ended.
pub fn record_batch(report: &BatchReport) {
    if !report.events.is_empty() {
        publish_events(&report.events);
    }
    if !report.waits.is_empty() {
        publish_waits(&report.waits);
    }
    if !report.runs.is_empty() {
        publish_runs(&report.runs);
    }
}

/// Counts tasks deleted by retention (`agentq_tasks_pruned_total{project,status}`).
pub fn tasks_pruned(project: u128, status: crate::model::TaskStatus, n: u64) {
    if n > 0 {
        counter!(
            "agentq_tasks_pruned_total",
            "project" => uuid::Uuid::from_u128(project).to_string(),
            "status" => status.as_str()
        )
        .increment(n);
    }
}

/// Adds a committed batch's task events to the counters.
fn publish_events(events: &HashMap<(u128, TaskEvent), u64>) {
    for ((project, event), n) in events {
        counter!(metric(*event), "project" => uuid::Uuid::from_u128(*project).to_string())
            .increment(*n);
    }
}

/// Records how long each task of a committed batch's claims had waited (ms). The handle is
/// looked up once per batch, not kept: a handle taken before the recorder is installed would
/// record nowhere for good.
fn publish_waits(waits: &[Millis]) {
    let waited = histogram!("agentq_task_wait_seconds");
    for ms in waits {
        waited.record(*ms as f64 / 1000.0);
    }
}

/// Records how long each lease that ended in a committed batch had run (ms), by its outcome.
/// Each outcome's handle is looked up once per batch, as in [`publish_waits`].
fn publish_runs(runs: &[(Outcome, Millis)]) {
    let mut handles: [Option<metrics::Histogram>; 5] = Default::default();
    for (outcome, ms) in runs {
        handles[*outcome as usize]
            .get_or_insert_with(
                || histogram!("agentq_task_run_seconds", "outcome" => outcome.as_str()),
            )
            .record(*ms as f64 / 1000.0);
    }
}

/// What `/metrics` shows of the stored state, gathered by its caller at scrape time: plain
/// numbers, so that this module knows nothing of the store.
pub struct Snapshot {
    /// Every live project in creation order; `None` when the database could not be read.
    pub projects: Option<Vec<ProjectGauges>>,
    pub long_poll_waiters: usize,
    pub storage_size_bytes: u64,
    /// Whether writes reach the disk (no write outage).
    pub storage_writable: bool,
}

/// One project's gauges.
pub struct ProjectGauges {
    pub id: u128,
    pub name: String,
    pub stats: Stats,
    /// How long the longest-waiting task at the front of its queue has waited, ready (ms).
    pub queue_wait_ms: Millis,
}

/// Sets the gauges that mirror stored state, then renders the Prometheus text.
///
/// Series of deleted projects are left out: the exporter cannot unregister a series, and a
/// deleted project's gauges would otherwise report its last task counts forever.
pub fn render(handle: &PrometheusHandle, state: Snapshot, started: std::time::Instant) -> String {
    // The live projects' names by id (ids of UUIDv7, so in creation order).
    let live: Option<BTreeMap<String, String>> = state.projects.map(|projects| {
        let mut live = BTreeMap::new();
        for p in projects {
            let id = uuid::Uuid::from_u128(p.id).to_string();
            // Every project shows every counter, at zero until its first event.
            for event in TaskEvent::ALL {
                counter!(metric(event), "project" => id.clone()).increment(0);
            }
            for status in TaskStatus::ALL {
                gauge!("agentq_tasks", "project" => id.clone(), "status" => status.as_str())
                    .set(p.stats.get(status) as f64);
            }
            gauge!("agentq_queue_wait_seconds", "project" => id.clone())
                .set(p.queue_wait_ms as f64 / 1000.0);
            gauge!("agentq_active_leases", "project" => id.clone()).set(p.stats.running as f64);
            live.insert(id, p.name);
        }
        live
    });
    gauge!("agentq_long_poll_waiters").set(state.long_poll_waiters as f64);
    gauge!("process_resident_memory_bytes").set(resident_bytes() as f64);
    gauge!("agentq_storage_size_bytes").set(state.storage_size_bytes as f64);
    gauge!("agentq_storage_writable").set(if state.storage_writable { 1.0 } else { 0.0 });
    counter!("agentq_log_lines_dropped_total").absolute(crate::logs::lines_dropped());
    gauge!("agentq_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle.run_upkeep();
    let text = handle.render();
    let mut text = match &live {
        Some(live) => without_dead_projects(text, &|id| live.contains_key(id)),
        None => text,
    };
    append_own_families(&mut text, &live.unwrap_or_default(), started);
    text
}

/// Families rendered here rather than through the exporter, whose series cannot be removed:
/// a project's name (a rename must not leave the old name's series behind) and the standard
/// process figures that are not gauges of ours.
fn append_own_families(
    text: &mut String,
    names: &BTreeMap<String, String>,
    started: std::time::Instant,
) {
    use std::fmt::Write;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(started.elapsed());
    // Names are letters, digits, `-` and `_` (validated), so they need no escaping as labels.
    let _ = writeln!(
        text,
        "# HELP agentq_project_info A project's name, to join on the project label: always 1.\n\
         # TYPE agentq_project_info gauge"
    );
    for (id, name) in names {
        let _ = writeln!(
            text,
            "agentq_project_info{{project=\"{id}\",name=\"{name}\"}} 1"
        );
    }
    let _ = writeln!(
        text,
        "# HELP process_cpu_seconds_total User and system CPU time of the server, in seconds.\n\
         # TYPE process_cpu_seconds_total counter\n\
         process_cpu_seconds_total {}\n\
         # HELP process_start_time_seconds When the server started, in seconds since the Unix epoch.\n\
         # TYPE process_start_time_seconds gauge\n\
         process_start_time_seconds {:.3}",
        cpu_seconds(),
        since_epoch.as_secs_f64()
    );
}

/// Drops the sample lines labelled with a project that is not `live`.
fn without_dead_projects(text: String, live: &dyn Fn(&str) -> bool) -> String {
    const LABEL: &str = "project=\"";
    let dead = |line: &str| {
        line.find(LABEL).is_some_and(|at| {
            let rest = &line[at + LABEL.len()..];
            rest.find('"').is_some_and(|end| !live(&rest[..end]))
        })
    };
    if !text.lines().any(dead) {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|l| !dead(l)) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Resident memory and CPU seconds of this process (Linux; zeros elsewhere).
pub fn process_usage() -> (u64, f64) {
    (resident_bytes(), cpu_seconds())
}

/// Resident memory of this process (Linux; 0 elsewhere).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| status_resident_bytes(&s))
        .unwrap_or(0)
}

/// The resident memory in the text of a `/proc/.../status` file.
pub fn status_resident_bytes(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU seconds (user plus system) this process has used (Linux; 0 elsewhere).
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_seconds(&s))
        .unwrap_or(0.0)
}

/// The CPU seconds (user plus system) in the text of a `/proc/.../stat` file, of a process or
/// of one of its threads.
pub fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_dead_projects_are_dropped() {
        let text = "# HELP agentq_tasks Tasks by status.\n\
                    agentq_tasks{project=\"a\",status=\"queued\"} 3\n\
                    agentq_tasks{project=\"b\",status=\"queued\"} 5\n\
                    agentq_long_poll_waiters 0\n";
        let live: std::collections::HashSet<String> = ["a".to_string()].into();
        let kept = without_dead_projects(text.to_string(), &|id| live.contains(id));
        assert_eq!(
            kept,
            "# HELP agentq_tasks Tasks by status.\n\
             agentq_tasks{project=\"a\",status=\"queued\"} 3\n\
             agentq_long_poll_waiters 0\n"
        );
        let all: std::collections::HashSet<String> = ["a".to_string(), "b".to_string()].into();
        assert_eq!(
            without_dead_projects(text.to_string(), &|id| all.contains(id)),
            text
        );
    }
}

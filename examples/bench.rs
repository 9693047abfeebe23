//! The agentq benchmark: real HTTP on loopback against a release server.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench -- [--agents 64] [--tasks 20000]
//!     [--backlog 1000000] [--url http://host:port]
//! ```
//!
//! Without `--url` it starts `target/release/agentq serve` on a temporary database as a
//! separate process, with keys on (rate limit off unless `--rate-limit`); with `--url` give an admin key with
//! `--key`. Producers use the admin key; agents use an `agent` key made for the run. The client
//! is a single-threaded tokio runtime (one core), one keep-alive connection per agent. It
//! prints a table and one machine-readable `BENCH {json}` line.
//! `AGENTQ_BIN=path` measures another agentq build instead of `target/release/agentq`.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq::telemetry::{stat_cpu_seconds, status_resident_bytes};
use serde_json::{json, Value};

/// The agentq benchmark: real HTTP on loopback against a release server, with keys on.
#[derive(clap::Parser)]
#[command(name = "bench")]
struct Opts {
    /// Agents looping next-task → complete, one keep-alive connection each.
    #[arg(long, default_value_t = 64)]
    agents: usize,
    /// Tasks the agents drain in each cycle phase.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Tasks of another type queued beside the agents for the backlog phase (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// Measure a running server instead of starting one (give an admin key with --key).
    #[arg(long)]
    url: Option<String>,
    /// The admin key for --url.
    #[arg(long)]
    key: Option<String>,
    /// Seconds of GET /health for the HTTP ceiling.
    #[arg(long, default_value_t = 5.0)]
    ceiling_secs: f64,
    /// Tasks created one at a time for the long-poll wake-up figure.
    #[arg(long, default_value_t = 200)]
    wake_samples: usize,
    /// Agents long-polling (waitSeconds) for those tasks.
    #[arg(long, default_value_t = 16)]
    waiters: usize,
    /// In the agent cycle, agents use a key limited to the cycle's project (a fleet's usual
    /// key) instead of an agent key for every project.
    #[arg(long)]
    scoped_key: bool,
    /// In the agent cycles, agents send next-task with this `waitSeconds` (a long-polling
    /// fleet); cycles/s then counts up to the last complete, not the final empty wait.
    #[arg(long, default_value_t = 0.0)]
    cycle_wait: f64,
    /// In the bulk-create figure, each request carries a `batchId` of its own.
    #[arg(long)]
    bulk_batch_ids: bool,
    /// Instructions of this many bytes in the bulk and cycle tasks (an agent's prompt; the
    /// backlog's tasks stay short). 0: a few bytes.
    #[arg(long, default_value_t = 0)]
    instructions_bytes: usize,
    /// A `result` of this many bytes in each complete. 0: "ok".
    #[arg(long, default_value_t = 0)]
    result_bytes: usize,
    /// In the agent cycles, each agent logs in (`POST /api/auth/login`) and works under its
    /// session token (`Authorization: Bearer`) instead of the key.
    #[arg(long)]
    sessions: bool,
    /// The started server's `--rate-limit-per-minute` (0: off). Set one higher than the run
    /// makes to measure what counting requests per key costs.
    #[arg(long, default_value_t = 0)]
    rate_limit: u64,
    /// In the agent cycles, each next-task completes the agent's previous task (next-task's
    /// `complete`): one request per cycle instead of two. The next-task figures are then
    /// those of the combined request.
    #[arg(long)]
    combined: bool,
}

/// `head`, padded with words to `len` bytes when it is shorter.
fn padded(head: String, len: usize) -> String {
    let mut s = head;
    if s.len() < len {
        while s.len() < len {
            s.push_str(" lorem ipsum");
        }
        s.truncate(len);
    }
    s
}

fn parse_opts() -> Opts {
    <Opts as clap::Parser>::parse()
}

struct Target {
    base: String,
    child: Option<Child>,
    db: Option<std::path::PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

const BENCH_ADMIN_KEY: &str = "bench-admin-key-not-secret";

fn keyed_client(key: &str) -> reqwest::Client {
    client_with("x-api-key", key)
}

/// A client that sends `header: value` with every request.
fn client_with(header: &'static str, value: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(header, value.parse().expect("a header-safe value"));
    reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .default_headers(h)
        .build()
        .unwrap()
}

fn server_binary() -> std::path::PathBuf {
    // AGENTQ_BIN names another build to measure (to compare two builds on one machine).
    if let Some(bin) = std::env::var_os("AGENTQ_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/release/examples/bench -> target/release/agentq
    let bin = exe.parent().unwrap().parent().unwrap().join("agentq");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --release` first",
        bin.display()
    );
    bin
}

fn spawn_server(db: &std::path::Path, rate_limit: u64) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(server_binary())
        .args(["serve", "--db"])
        .arg(db)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args([
            "--admin-key",
            BENCH_ADMIN_KEY,
            "--rate-limit-per-minute",
            &rate_limit.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

async fn wait_healthy(c: &reqwest::Client, base: &str) -> Duration {
    let t = Instant::now();
    loop {
        if let Ok(r) = c.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return t.elapsed();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "server never healthy"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

/// The server's commit totals from its own `/metrics`: (commits, operations committed,
/// seconds spent in commit batches).
async fn commit_totals(c: &reqwest::Client, base: &str) -> Option<(f64, f64, f64)> {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    Some((
        value("agentq_storage_commit_batch_size_count")?,
        value("agentq_storage_commit_batch_size_sum")?,
        value("agentq_storage_commit_duration_seconds_sum")?,
    ))
}

/// What the server's metrics say about its commits between two readings over `secs`.
struct Commits {
    ops_each: f64,
    ms_each: f64,
    writer_busy: f64,
}

fn commits_between(
    a: Option<(f64, f64, f64)>,
    b: Option<(f64, f64, f64)>,
    secs: f64,
) -> Option<Commits> {
    let ((n0, ops0, s0), (n1, ops1, s1)) = (a?, b?);
    let n = n1 - n0;
    (n > 0.0).then(|| Commits {
        ops_each: (ops1 - ops0) / n,
        ms_each: (s1 - s0) / n * 1000.0,
        writer_busy: (s1 - s0) / secs,
    })
}

async fn post(c: &reqwest::Client, url: String, body: &Value) -> Value {
    post_typed(c, &url, serde_json::to_vec(body).unwrap()).await
}

#[derive(serde::Deserialize)]
struct Envelope<T> {
    success: bool,
    data: Option<T>,
}

#[derive(serde::Deserialize)]
struct NextData {
    task: Option<TaskRef>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskRef {
    id: String,
    lease_token: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkData {
    tasks_created: usize,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NewTask<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    type_id: Option<&'a str>,
    instructions: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BulkBody<'a> {
    tasks: Vec<NewTask<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_id: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CompleteBody<'a> {
    agent_name: &'a str,
    result: &'a str,
    lease_token: Option<&'a str>,
}

/// A next-task that completes the agent's previous task first.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NextAfter<'a> {
    project_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    type_ids: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<CompleteFirst<'a>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CompleteFirst<'a> {
    task_id: &'a str,
    result: &'a str,
    lease_token: Option<&'a str>,
}

async fn post_typed<T: serde::de::DeserializeOwned>(
    c: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> T {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let bytes = r.bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("json")
}

/// How the bulk requests go: how many at once, with a batch id each or not, and the size
/// of each task's instructions (0: a few bytes).
#[derive(Clone, Copy)]
struct Bulk {
    in_flight: usize,
    batch_ids: bool,
    instructions_bytes: usize,
}

async fn bulk_create(
    c: &reqwest::Client,
    base: &str,
    project: &str,
    type_id: Option<&str>,
    n: usize,
    shape: Bulk,
) -> Duration {
    let Bulk {
        in_flight,
        batch_ids,
        instructions_bytes,
    } = shape;
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let per = 1000;
    let requests = n.div_ceil(per);
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let (c, base, project, next) = (
            c.clone(),
            base.to_string(),
            project.to_string(),
            next.clone(),
        );
        let type_id = type_id.map(str::to_string);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let count = per.min(n - i * per);
                let tasks: Vec<NewTask> = (0..count)
                    .map(|k| NewTask {
                        type_id: type_id.as_deref(),
                        instructions: padded(format!("task {}", i * per + k), instructions_bytes),
                    })
                    .collect();
                let batch_id = batch_ids.then(|| format!("batch-{i}"));
                let body = serde_json::to_vec(&BulkBody { tasks, batch_id }).unwrap();
                let r: Envelope<BulkData> = post_typed(
                    &c,
                    &format!("{base}/api/projects/{project}/tasks/bulk"),
                    body,
                )
                .await;
                let created = r.data.map(|d| d.tasks_created);
                assert_eq!(created, Some(count), "bulk request {i} created {created:?}");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    t.elapsed()
}

struct Cycle {
    cycles: usize,
    secs: f64,
    next: Vec<u32>,
    complete: Vec<u32>,
}

/// How the agents of a cycle work: the `waitSeconds` of their next-task, the `result` of their
/// completes, and whether each logs in and works under a session.
#[derive(Clone)]
struct Agents {
    wait: f64,
    result: Arc<str>,
    sessions: bool,
    combined: bool,
}

/// `agents` agents loop next-task → complete until the queue (of `type_ids`) drains.
async fn agent_cycle(
    c: &reqwest::Client,
    base: &str,
    project: &str,
    agents: usize,
    type_ids: Option<Vec<String>>,
    how: Agents,
) -> Cycle {
    let Agents {
        wait,
        result,
        sessions,
        combined,
    } = how;
    let t = Instant::now();
    let mut handles = Vec::new();
    for a in 0..agents {
        let (c, base, project, type_ids, result) = (
            c.clone(),
            base.to_string(),
            project.to_string(),
            type_ids.clone(),
            result.clone(),
        );
        handles.push(tokio::spawn(async move {
            let agent = format!("bench-{a}");
            let c = if sessions {
                let login = post(
                    &c,
                    format!("{base}/api/auth/login"),
                    &json!({"agentName": agent, "projectId": project}),
                )
                .await;
                let token = login["data"]["token"].as_str().expect("a session token");
                client_with("authorization", &format!("Bearer {token}"))
            } else {
                c
            };
            let mut next_lat = Vec::new();
            let mut done_lat = Vec::new();
            let mut body = match &type_ids {
                Some(ids) => json!({"projectId": project, "typeIds": ids}),
                None => json!({"projectId": project}),
            };
            if wait > 0.0 {
                body["waitSeconds"] = json!(wait);
            }
            let mut last_done = Instant::now();
            let next_url = format!("{base}/api/agents/{agent}/next-task");
            if combined {
                let mut held: Option<TaskRef> = None;
                loop {
                    let body = serde_json::to_vec(&NextAfter {
                        project_id: &project,
                        type_ids: type_ids.as_deref(),
                        wait_seconds: (wait > 0.0).then_some(wait),
                        complete: held.as_ref().map(|t| CompleteFirst {
                            task_id: &t.id,
                            result: &result,
                            lease_token: t.lease_token.as_deref(),
                        }),
                    })
                    .unwrap();
                    let s = Instant::now();
                    let r: Envelope<NextData> = post_typed(&c, &next_url, body).await;
                    let took = s.elapsed().as_micros() as u32;
                    // An error answer has no `data`; "no task" has one, with a null task.
                    let answered = r.data.is_some();
                    let task = r.data.and_then(|d| d.task);
                    if held.take().is_some() {
                        assert!(answered, "the completion failed");
                        done_lat.push(took);
                        last_done = Instant::now();
                    }
                    match task {
                        Some(t) => {
                            next_lat.push(took);
                            held = Some(t);
                        }
                        None => break,
                    }
                }
                return (next_lat, done_lat, last_done);
            }
            // The cycle reads only what an agent needs (typed, the rest skipped), so that the
            // client's own JSON work does not crowd the server out of the shared cores.
            let body = serde_json::to_vec(&body).unwrap();
            loop {
                let s = Instant::now();
                let r: Envelope<NextData> = post_typed(&c, &next_url, body.clone()).await;
                let Some(task) = r.data.and_then(|d| d.task) else {
                    if wait <= 0.0 {
                        next_lat.push(s.elapsed().as_micros() as u32);
                    }
                    break;
                };
                next_lat.push(s.elapsed().as_micros() as u32);
                let done = serde_json::to_vec(&CompleteBody {
                    agent_name: &agent,
                    result: &result,
                    lease_token: task.lease_token.as_deref(),
                })
                .unwrap();
                let s = Instant::now();
                let r: Envelope<serde::de::IgnoredAny> =
                    post_typed(&c, &format!("{base}/api/tasks/{}/complete", task.id), done).await;
                done_lat.push(s.elapsed().as_micros() as u32);
                last_done = Instant::now();
                assert!(r.success, "complete failed");
            }
            (next_lat, done_lat, last_done)
        }));
    }
    let mut next = Vec::new();
    let mut complete = Vec::new();
    let mut end = t;
    for h in handles {
        let (n, d, last) = h.await.unwrap();
        next.extend(n);
        complete.extend(d);
        end = end.max(last);
    }
    let end = if wait > 0.0 { end } else { Instant::now() };
    Cycle {
        cycles: complete.len(),
        secs: (end - t).as_secs_f64(),
        next,
        complete,
    }
}

/// Requests/s of `GET /health`, and how many were made.
async fn ceiling(c: &reqwest::Client, base: &str, agents: usize, secs: f64) -> (f64, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let mut hs = Vec::new();
    for _ in 0..agents {
        let (c, url, stop, count) = (
            c.clone(),
            format!("{base}/health"),
            stop.clone(),
            count.clone(),
        );
        hs.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c.get(&url).send().await.unwrap();
                let _ = r.bytes().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed);
    let el = t.elapsed().as_secs_f64();
    for h in hs {
        h.await.unwrap();
    }
    (n as f64 / el, count.load(Ordering::Relaxed))
}

/// Waiters long-poll; tasks are created one at a time; time from create to delivery.
async fn wakeup(
    c: &reqwest::Client,
    agents: &reqwest::Client,
    base: &str,
    project: &str,
    samples: usize,
    waiters: usize,
) -> Vec<u32> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for w in 0..waiters {
        let (c, base, project, tx, stop) = (
            agents.clone(),
            base.to_string(),
            project.to_string(),
            tx.clone(),
            stop.clone(),
        );
        hs.push(tokio::spawn(async move {
            let agent = format!("waiter-{w}");
            while !stop.load(Ordering::Relaxed) {
                let r = post(
                    &c,
                    format!("{base}/api/agents/{agent}/next-task"),
                    &json!({"projectId": project, "waitSeconds": 2}),
                )
                .await;
                let got = Instant::now();
                if let Some(id) = r["data"]["task"]["id"].as_str() {
                    let _ = tx.send((id.to_string(), got));
                    post(
                        &c,
                        format!("{base}/api/tasks/{id}/complete"),
                        &json!({"agentName": agent, "result": "ok"}),
                    )
                    .await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::new();
    for i in 0..samples {
        let s = Instant::now();
        let r = post(
            c,
            format!("{base}/api/projects/{project}/tasks"),
            &json!({"instructions": format!("wake {i}")}),
        )
        .await;
        let id = r["data"]["id"].as_str().unwrap().to_string();
        let (got_id, at) = rx.recv().await.unwrap();
        assert_eq!(got_id, id);
        lat.push(at.duration_since(s).as_micros() as u32);
        // Let the agent complete and wait again.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.await.unwrap();
    }
    lat
}

/// CPU seconds (user plus system) and resident KiB of process `pid`.
fn proc_stat(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        stat_cpu_seconds(&stat)?,
        status_resident_bytes(&status)? / 1024,
    ))
}

fn main() {
    let opts = parse_opts();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(opts));
}

async fn run(o: Opts) {
    let admin_key = o.key.clone().unwrap_or_else(|| BENCH_ADMIN_KEY.to_string());
    let client = keyed_client(&admin_key);
    let mut target = match &o.url {
        Some(u) => Target {
            base: u.trim_end_matches('/').to_string(),
            child: None,
            db: None,
            _dir: None,
        },
        None => {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("bench.redb");
            let (child, base) = spawn_server(&db, o.rate_limit);
            Target {
                base,
                child: Some(child),
                db: Some(db),
                _dir: Some(dir),
            }
        }
    };
    let c = &client;
    wait_healthy(c, &target.base).await;
    let base = target.base.clone();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "agentq bench: {} agents, {} tasks, backlog {}, {} cores, server {}",
        o.agents, o.tasks, o.backlog, cores, base
    );

    // Agents work with a key of the agent role, as a fleet would.
    let agent_key: Value = post(
        c,
        format!("{base}/api/keys"),
        &json!({"name": format!("bench-{}", std::process::id()), "role": "agent"}),
    )
    .await;
    let agent_client = keyed_client(agent_key["data"]["key"].as_str().expect("agent key"));
    let ac = &agent_client;
    let server_pid = target.child.as_ref().map(Child::id);
    let cpu_seconds = || {
        let server = server_pid.and_then(proc_stat).map(|(t, _)| t);
        let client = proc_stat(std::process::id()).map(|(t, _)| t);
        (server, client)
    };
    let (s0, c0) = cpu_seconds();
    let (ceiling, health_n) = ceiling(c, &base, o.agents, o.ceiling_secs).await;
    let (s1, c1) = cpu_seconds();
    println!("HTTP ceiling (GET /health):        {ceiling:>10.0} req/s");
    // CPU time per unit of work is steadier than a rate on a shared VM: it does not move
    // when a neighbour takes the other core. (/proc's resolution is 10 ms.)
    let cpu_per =
        |a: Option<f64>, b: Option<f64>, n: usize| Some((b? - a?) * 1_000_000.0 / n as f64);
    if let (Some(s), Some(cl)) = (cpu_per(s0, s1, health_n), cpu_per(c0, c1, health_n)) {
        println!("  CPU per request: server {s:.0} µs, client {cl:.0} µs");
    }

    let shape = Bulk {
        in_flight: 4,
        batch_ids: false,
        instructions_bytes: o.instructions_bytes,
    };
    let how = Agents {
        wait: o.cycle_wait,
        result: padded("ok".into(), o.result_bytes).into(),
        sessions: o.sessions,
        combined: o.combined,
    };
    let run_id = std::process::id();
    let mk_project = |name: String| {
        let c = c.clone();
        let base = base.clone();
        async move {
            let r = post(
                &c,
                format!("{base}/api/projects"),
                &json!({"name": name, "description": "bench"}),
            )
            .await;
            r["data"]["id"].as_str().expect("project").to_string()
        }
    };

    // Bulk create.
    let p = mk_project(format!("bulk-{run_id}")).await;
    let bulk_n = 100_000;
    let (s0, c0) = cpu_seconds();
    let d = bulk_create(
        c,
        &base,
        &p,
        None,
        bulk_n,
        Bulk {
            batch_ids: o.bulk_batch_ids,
            ..shape
        },
    )
    .await;
    let (s1, c1) = cpu_seconds();
    let bulk_rate = bulk_n as f64 / d.as_secs_f64();
    println!("bulk create (1000/request, 4 in flight): {bulk_rate:>8.0} tasks/s");
    if let (Some(s), Some(cl)) = (cpu_per(s0, s1, bulk_n), cpu_per(c0, c1, bulk_n)) {
        println!("  CPU per task: server {s:.1} µs, client {cl:.1} µs");
    }

    // Agent cycle.
    let p = mk_project(format!("cycle-{run_id}")).await;
    bulk_create(c, &base, &p, None, o.tasks, shape).await;
    let m0 = commit_totals(c, &base).await;
    let (s0, c0) = cpu_seconds();
    let scoped_client = if o.scoped_key {
        let key: Value = post(
            c,
            format!("{base}/api/keys"),
            &json!({"name": format!("bench-scoped-{run_id}"), "role": "agent", "projects": [p]}),
        )
        .await;
        Some(keyed_client(
            key["data"]["key"].as_str().expect("scoped key"),
        ))
    } else {
        None
    };
    let cycle_client = scoped_client.as_ref().unwrap_or(ac);
    let mut cy = agent_cycle(cycle_client, &base, &p, o.agents, None, how.clone()).await;
    let (s1, c1) = cpu_seconds();
    let commits = commits_between(m0, commit_totals(c, &base).await, cy.secs);
    let server_us = cpu_per(s0, s1, o.tasks);
    let client_us = cpu_per(c0, c1, o.tasks);
    assert_eq!(cy.cycles, o.tasks, "every task completed once");
    let cycle_rate = cy.cycles as f64 / cy.secs;
    let (n50, n99) = (pct(&mut cy.next, 0.50), pct(&mut cy.next, 0.99));
    let nmax = cy.next.last().copied().unwrap_or(0) as f64 / 1000.0;
    let (c50, c99) = (pct(&mut cy.complete, 0.50), pct(&mut cy.complete, 0.99));
    let cmax = cy.complete.last().copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "agent cycle:                       {cycle_rate:>10.0} cycles/s ({:.0}% of ceiling/2)",
        100.0 * cycle_rate / (ceiling / 2.0)
    );
    println!("  next-task  p50 {n50:.2} ms  p99 {n99:.2} ms  max {nmax:.2} ms");
    println!("  complete   p50 {c50:.2} ms  p99 {c99:.2} ms  max {cmax:.2} ms");
    if let (Some(s), Some(cl)) = (server_us, client_us) {
        println!("  CPU per cycle: server {s:.0} µs, client {cl:.0} µs");
    }
    if let Some(m) = &commits {
        // Read from the server's /metrics, as Prometheus would.
        println!(
            "  commits: {:.1} operations each, {:.2} ms each, writer busy {:.0}% of the time",
            m.ops_each,
            m.ms_each,
            m.writer_busy * 100.0
        );
    }

    // The same cycle beside a backlog of another type.
    let mut backlog_rate = None;
    let mut backlog_next_p99 = None;
    let mut backlog_server_us = None;
    if o.backlog > 0 {
        let p = mk_project(format!("backlog-{run_id}")).await;
        let mk_type = |name: &str| {
            let c = c.clone();
            let url = format!("{base}/api/projects/{p}/task-types");
            let body = json!({"name": name});
            async move {
                post(&c, url, &body).await["data"]["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        let other = mk_type("other").await;
        let work = mk_type("work").await;
        let t = Instant::now();
        bulk_create(
            c,
            &base,
            &p,
            Some(&other),
            o.backlog,
            Bulk {
                instructions_bytes: 0,
                ..shape
            },
        )
        .await;
        println!(
            "  (backlog of {} created in {:.1} s)",
            o.backlog,
            t.elapsed().as_secs_f64()
        );
        bulk_create(c, &base, &p, Some(&work), o.tasks, shape).await;
        let (s0, c0) = cpu_seconds();
        let mut cy = agent_cycle(ac, &base, &p, o.agents, Some(vec![work]), how.clone()).await;
        let (s1, c1) = cpu_seconds();
        assert_eq!(cy.cycles, o.tasks);
        let rate = cy.cycles as f64 / cy.secs;
        let p99 = pct(&mut cy.next, 0.99);
        println!(
            "agent cycle, {} backlog:      {rate:>10.0} cycles/s ({:.0}% of no backlog), next-task p99 {p99:.2} ms",
            o.backlog,
            100.0 * rate / cycle_rate
        );
        if let (Some(s), Some(cl)) = (cpu_per(s0, s1, o.tasks), cpu_per(c0, c1, o.tasks)) {
            println!("  CPU per cycle: server {s:.0} µs, client {cl:.0} µs");
            backlog_server_us = Some(s);
        }
        backlog_rate = Some(rate);
        backlog_next_p99 = Some(p99);
    }

    // Long-poll wake-up.
    let p = mk_project(format!("wake-{run_id}")).await;
    let (s0, _) = cpu_seconds();
    let mut lat = wakeup(c, ac, &base, &p, o.wake_samples, o.waiters).await;
    let (s1, _) = cpu_seconds();
    let (w50, w99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!(
        "long-poll wake-up ({} waiters):    p50 {w50:.2} ms  p99 {w99:.2} ms",
        o.waiters
    );
    // Everything the server did while tasks were trickling in, per task delivered: with
    // many waiters this shows whether one task wakes one waiter or all of them.
    let wake_server_us = cpu_per(s0, s1, o.wake_samples);
    if let Some(s) = wake_server_us {
        println!("  server CPU per task delivered: {s:.0} µs");
    }

    // Idle CPU with leases outstanding, RSS, then start-up time on this database.
    let mut idle_cpu = None;
    let mut rss_mib = None;
    let mut startup_ms = None;
    if let Some(child) = target.child.as_mut() {
        let pid = child.id();
        let p = mk_project(format!("idle-{run_id}")).await;
        bulk_create(
            c,
            &base,
            &p,
            None,
            100,
            Bulk {
                in_flight: 1,
                batch_ids: false,
                instructions_bytes: 0,
            },
        )
        .await;
        for a in 0..50 {
            post(
                ac,
                format!("{base}/api/agents/idle-{a}/next-task"),
                &json!({"projectId": p}),
            )
            .await;
        }
        let (t0, _) = proc_stat(pid).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (t1, rss) = proc_stat(pid).unwrap();
        let cpu = (t1 - t0) / 10.0 * 100.0;
        println!("idle CPU, 50 leases outstanding:   {cpu:>9.2} % of one core over 10 s");
        println!(
            "server RSS at the end:             {:>9.1} MiB",
            rss as f64 / 1024.0
        );
        idle_cpu = Some(cpu);
        rss_mib = Some(rss as f64 / 1024.0);

        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        child.wait().unwrap();
        let db = target.db.clone().unwrap();
        let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
        let t = Instant::now();
        let (new_child, new_base) = spawn_server(&db, o.rate_limit);
        let _ = wait_healthy(c, &new_base).await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        println!(
            "start-up to healthy ({:.0} MiB database): {ms:.0} ms",
            size as f64 / 1048576.0
        );
        startup_ms = Some(ms);
        if let Some((_, rss)) = proc_stat(new_child.id()) {
            println!(
                "RSS after start-up:                {:>9.1} MiB",
                rss as f64 / 1024.0
            );
        }
        *child = new_child;
    }

    let line = json!({
        "cores": cores,
        "agents": o.agents,
        "tasks": o.tasks,
        "backlog": o.backlog,
        "ceiling_rps": ceiling.round(),
        "bulk_tasks_per_s": bulk_rate.round(),
        "cycles_per_s": cycle_rate.round(),
        "cycle_vs_half_ceiling": (cycle_rate / (ceiling / 2.0) * 100.0).round() / 100.0,
        "next_p50_ms": n50, "next_p99_ms": n99, "next_max_ms": nmax,
        "complete_p50_ms": c50, "complete_p99_ms": c99, "complete_max_ms": cmax,
        "server_cpu_us_per_cycle": server_us.map(f64::round),
        "commit_ops_avg": commits.as_ref().map(|m| (m.ops_each * 10.0).round() / 10.0),
        "commit_ms_avg": commits.as_ref().map(|m| (m.ms_each * 1000.0).round() / 1000.0),
        "writer_busy": commits.as_ref().map(|m| (m.writer_busy * 100.0).round() / 100.0),
        "client_cpu_us_per_cycle": client_us.map(f64::round),
        "backlog_cycles_per_s": backlog_rate.map(f64::round),
        "backlog_next_p99_ms": backlog_next_p99,
        "backlog_server_cpu_us_per_cycle": backlog_server_us.map(f64::round),
        "wake_p50_ms": w50, "wake_p99_ms": w99,
        "waiters": o.waiters,
        "cycle_wait_s": o.cycle_wait,
        "instructions_bytes": o.instructions_bytes,
        "result_bytes": o.result_bytes,
        "sessions": o.sessions,
        "wake_server_cpu_us_per_task": wake_server_us.map(f64::round),
        "idle_cpu_pct": idle_cpu,
        "rss_mib": rss_mib,
        "startup_ms": startup_ms,
    });
    println!("BENCH {line}");
    if let Some(mut child) = target.child.take() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}

//! The storage path alone: agents loop next-task → complete straight against the store, with
//! no HTTP, so that a change to the writer, the tables or the encoding can be compared with
//! less noise than the full benchmark allows.
//!
//! ```sh
//! cargo run --release --example store_bench -- [--agents 64] [--tasks 50000] [--rounds 5]
//!     [--typed] [--backlog N]
//! ```
//!
//! Each round drains `--tasks` tasks on a fresh database in a temporary directory (full
//! durability, the default page cache) and prints cycles/s and CPU time per cycle: of the
//! whole process and of the writer thread alone. One `STORE-BENCH {json}` line per round.

use std::sync::Arc;
use std::time::Instant;

use agentq::model::DuplicateHandling;
use agentq::store::write::{self, Claim, NewProject, NewTask, NewTaskType};
use agentq::store::Store;
use agentq::telemetry::{cpu_seconds, stat_cpu_seconds};
use agentq::time::SystemClock;

/// The server's allocator, so the writer's costs are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser)]
#[command(name = "store_bench")]
struct Opts {
    /// Agents looping next-task → complete.
    #[arg(long, default_value_t = 64)]
    agents: usize,
    /// Tasks drained per round.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Rounds, each on a fresh database.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instructions of this many bytes in each task (0: a few bytes).
    #[arg(long, default_value_t = 0)]
    instructions_bytes: usize,
    /// The tasks are of a task type and the agents claim with its id (`typeIds`), as the
    /// HTTP benchmark's backlog phase does.
    #[arg(long)]
    typed: bool,
    /// Tasks of another type queued beside them before the round (implies `--typed`).
    #[arg(long, default_value_t = 0)]
    backlog: usize,
}

/// A task type named `name` in `project`; its id.
async fn task_type(store: &Store, project: &str, name: &str) -> u128 {
    let (key, name) = (project.to_string(), name.to_string());
    let ty = store
        .write(move |w| {
            write::create_type(
                w,
                &key,
                NewTaskType {
                    name,
                    template: None,
                    variables: Vec::new(),
                    duplicate_handling: DuplicateHandling::Allow,
                    max_retries: None,
                    lease_duration_minutes: None,
                    retry_delay_seconds: 0.0,
                    backoff_multiplier: 1.0,
                    script: None,
                },
            )
        })
        .await
        .unwrap();
    ty.id
}

/// Creates `n` tasks (of `type_id`, if given) in `project`, 1,000 per write.
async fn add_tasks(store: &Store, project: &str, n: usize, type_id: Option<u128>, bytes: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let tasks: Vec<NewTask> = chunk
            .iter()
            .map(|i| NewTask {
                type_key: type_id.map(agentq::store::write::TypeKey::Id),
                instructions: Some(format!("task {i} {}", "x".repeat(bytes))),
                ..NewTask::default()
            })
            .collect();
        let key = project.to_string();
        store
            .write(move |w| write::create_tasks(w, &key, tasks))
            .await
            .unwrap();
    }
}

/// CPU seconds of this process, and of its thread named `agentq-writer` (Linux).
fn process_and_writer_cpu() -> (f64, f64) {
    let process = cpu_seconds();
    let mut writer = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "agentq-writer" {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                writer = stat_cpu_seconds(&stat).unwrap_or(0.0);
            }
        }
    }
    (process, writer)
}

async fn round(o: &Opts) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store-bench.redb"), Arc::new(SystemClock)).unwrap();
    let (project, _) = store
        .write(|w| write::create_project(w, NewProject::named("bench")))
        .await
        .unwrap();
    let pid = uuid::Uuid::from_u128(project.id).to_string();
    let work = if o.typed || o.backlog > 0 {
        Some(task_type(&store, &pid, "work").await)
    } else {
        None
    };
    if o.backlog > 0 {
        let other = task_type(&store, &pid, "other").await;
        add_tasks(&store, &pid, o.backlog, Some(other), 0).await;
    }
    add_tasks(&store, &pid, o.tasks, work, o.instructions_bytes).await;
    let (cpu0, writer0) = process_and_writer_cpu();
    let started = Instant::now();
    let mut agents = Vec::new();
    for a in 0..o.agents {
        let store = store.clone();
        let key = pid.clone();
        agents.push(tokio::spawn(async move {
            let agent = format!("agent-{a}");
            let mut done = 0u64;
            loop {
                let (k, name) = (key.clone(), agent.clone());
                let claim = store
                    .write(move |w| {
                        let types = work.map(|t| [t]);
                        write::next_task(
                            w,
                            &k,
                            &name,
                            types.as_ref().map(|t| &t[..]),
                            write::no_check,
                        )
                    })
                    .await
                    .unwrap();
                let Claim::Task(task, _) = claim else { break };
                let token = task.lease.as_ref().map(|l| l.token);
                let name = agent.clone();
                store
                    .write(move |w| {
                        let done = write::Done {
                            token,
                            ..write::Done::new(&task.id)
                        };
                        write::complete(w, done, &name, write::no_check)
                    })
                    .await
                    .unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut cycles = 0u64;
    for a in agents {
        cycles += a.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let (cpu1, writer1) = process_and_writer_cpu();
    store.close();
    assert_eq!(
        cycles as usize, o.tasks,
        "every task completed exactly once"
    );
    let per = |s: f64| (s * 1e6 / cycles as f64 * 10.0).round() / 10.0;
    serde_json::json!({
        "agents": o.agents,
        "tasks": o.tasks,
        "typed": work.is_some(),
        "backlog": o.backlog,
        "cycles_per_s": (cycles as f64 / secs).round(),
        "cpu_us_per_cycle": per(cpu1 - cpu0),
        "writer_cpu_us_per_cycle": per(writer1 - writer0),
    })
}

fn main() {
    let o = <Opts as clap::Parser>::parse();
    // One thread for the agents, as in the HTTP benchmark; the writer has its own. A
    // multi-thread runtime (of one worker) like the server's: the writer's replies wake it
    // only when it sleeps, where a current-thread runtime would take a syscall per reply.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "agentq store bench: {} agents, {} tasks per round, {cores} cores",
        o.agents, o.tasks
    );
    for _ in 0..o.rounds {
        let r = rt.block_on(round(&o));
        println!(
            "{:>8} cycles/s   CPU per cycle: process {:>5} µs, writer {:>5} µs",
            r["cycles_per_s"], r["cpu_us_per_cycle"], r["writer_cpu_us_per_cycle"]
        );
        println!("STORE-BENCH {r}");
    }
}

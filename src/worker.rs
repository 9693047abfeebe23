//! `agentq work`: an agent that runs a process per task. It long-polls a project for tasks,
//! runs the given command (or, with `--scripts`, the task's own script) with the task on
//! stdin and in the environment, keeps the lease alive while the process runs, and reports
//! the outcome with its execution (exit code, output tails, duration).
//!
//! Each of `--concurrency N` slots is one agent name (`NAME-1` ... `NAME-N`), since an agent
//! holds one task at a time. A process runs in a process group of its own, so that a timeout,
//! a lost lease or the end of the grace period stops everything it started; the group is
//! killed after the process exits too, so nothing it left in the background outlives it.
//! A [`Guard`], a small process of its own, kills the groups still running if the worker
//! dies, even by SIGKILL.
//!
//! Boundary: a client of the HTTP API like any agent ([`crate::client`]); nothing here reads
//! the store.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::client::{segment, Client, ClientError, Method};

/// How long one next-task call waits for a task: short enough that a stop is noticed soon
/// (a task handed out meanwhile is given back at once), long enough to cost nothing idle.
const POLL_SECONDS: u64 = 5;
/// Between SIGTERM and SIGKILL of a process group, on a timeout or at the end of a drain.
const KILL_AFTER: Duration = Duration::from_secs(5);
/// The most of a process's stdout kept as a task's `result`: the server's limit, in
/// characters. The end is kept: a long output usually ends with its answer.
const MAX_RESULT_CHARS: usize = 100_000;
/// The most of stdout and of stderr kept as an execution's tails: the server's limit.
const MAX_TAIL_BYTES: usize = 64 << 10;
/// The most of stderr's tail quoted in a failure's `error`.
const ERROR_TAIL_BYTES: usize = 2_000;
/// The longest an agent name may be (the API's limit).
const MAX_AGENT_NAME: usize = 50;

/// The `work` subcommand: its arguments.
pub fn command() -> Command {
    Command::new("work")
        .about(
            "Run a command (or, with --scripts, the task's own script) for each task of a project",
        )
        .arg(
            Arg::new("PROJECT")
                .required(true)
                .help("Project name or id"),
        )
        .arg(
            Arg::new("agent")
                .long("agent")
                .help("Agent name (default: the hostname and the pid); slots are NAME-1..NAME-N"),
        )
        .arg(
            Arg::new("type")
                .long("type")
                .action(ArgAction::Append)
                .help("Only tasks of this type (repeatable)"),
        )
        .arg(
            Arg::new("concurrency")
                .long("concurrency")
                .default_value("1")
                .value_parser(clap::value_parser!(u16).range(1..=1024))
                .help("Tasks run at once, one agent name each"),
        )
        .arg(
            Arg::new("scripts")
                .long("scripts")
                .action(ArgAction::SetTrue)
                .help("Run tasks' scripts (code anyone allowed to create scripted tasks wrote)"),
        )
        .arg(
            Arg::new("timeout")
                .long("timeout")
                .help("Stop a task's process after this long, <n>[smhd] (default: no limit)"),
        )
        .arg(
            Arg::new("grace")
                .long("grace")
                .default_value("30s")
                .help("On SIGTERM or SIGINT, how long running tasks may still finish"),
        )
        .arg(
            Arg::new("command")
                .num_args(1..)
                .last(true)
                .value_name("CMD")
                .help("The command to run per task, after --"),
        )
}

/// What the command line asks the worker to do (beside the server and the project).
struct Options {
    types: Option<Vec<String>>,
    scripts: bool,
    command: Vec<String>,
    timeout: Option<Duration>,
    grace: Duration,
}

/// A running worker, shared by its slots.
struct Worker {
    client: Client,
    project: String,
    options: Options,
    phase: watch::Receiver<Phase>,
    counts: Counts,
    tty: bool,
    guard: Guard,
}

/// Where the worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Running,
    /// Stopping: no new task; running ones may finish until then.
    Draining {
        until: Instant,
    },
}

#[derive(Default)]
struct Counts {
    running: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
}

/// Runs `agentq work` until it is stopped. Exit code 0 after a stop, 2 for bad arguments,
/// the client's code when the project cannot be reached at start.
pub async fn run(client: Client, m: &ArgMatches) -> ExitCode {
    let options = match options(m) {
        Ok(o) => o,
        Err(why) => {
            crate::logs::say(format!("agentq: {why}\n"));
            return ExitCode::from(2);
        }
    };
    let project = m.get_one::<String>("PROJECT").cloned().unwrap_or_default();
    // The project must be there (and visible to the key) before any process runs.
    let path = format!("/api/projects/{}", segment(&project));
    if let Err(e) = client.call(Method::Get, &path, None).await {
        crate::logs::say(format!("agentq: {e}\n"));
        return ExitCode::from(e.exit_code());
    }
    let guard = match Guard::start() {
        Ok(g) => g,
        Err(e) => {
            crate::logs::say(format!("agentq: cannot start the process guard: {e}\n"));
            return ExitCode::FAILURE;
        }
    };
    let (phase_tx, phase) = watch::channel(Phase::Running);
    let worker = Arc::new(Worker {
        client,
        project,
        options,
        phase,
        counts: Counts::default(),
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        guard,
    });
    let name = m
        .get_one::<String>("agent")
        .cloned()
        .unwrap_or_else(default_agent_name);
    let slots: u16 = *m.get_one::<u16>("concurrency").unwrap_or(&1);
    let mut handles = Vec::new();
    for i in 1..=slots {
        let agent = format!("{name}-{i}");
        handles.push(tokio::spawn(slot(worker.clone(), agent)));
    }
    let status = tokio::spawn(status_line(worker.clone()));
    let signals = tokio::spawn(stop_on_signal(phase_tx, worker.options.grace));
    for h in handles {
        let _ = h.await;
    }
    status.abort();
    signals.abort();
    if worker.tty {
        crate::logs::say("\n");
    }
    ExitCode::SUCCESS
}

/// The options of `agentq work` (all but the client and the project).
fn options(m: &ArgMatches) -> Result<Options, String> {
    let duration = |name: &str| -> Result<Option<Duration>, String> {
        m.get_one::<String>(name)
            .map(|text| {
                crate::time::duration_of(text)
                    .ok_or_else(|| format!("--{name}: a duration <n>[smhd], not {text:?}"))
            })
            .transpose()
    };
    let command: Vec<String> = m
        .get_many::<String>("command")
        .map(|c| c.cloned().collect())
        .unwrap_or_default();
    let scripts = m.get_flag("scripts");
    if command.is_empty() && !scripts {
        return Err("nothing to run: give a command after --, or --scripts".into());
    }
    Ok(Options {
        types: m.get_many::<String>("type").map(|t| t.cloned().collect()),
        scripts,
        command,
        timeout: duration("timeout")?,
        grace: duration("grace")?.unwrap_or(Duration::from_secs(30)),
    })
}

/// The hostname in the API's agent-name characters, then `-pid`.
fn default_agent_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "worker".into());
    let pid = std::process::id();
    let mut clean: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    // Room for "-pid" and the slot's "-N".
    clean.truncate(MAX_AGENT_NAME - 18);
    if clean.is_empty() {
        clean = "worker".into();
    }
    format!("{clean}-{pid}")
}

/// Waits for SIGTERM or SIGINT, then drains: the slots take no new task and running ones may
/// finish for `grace`. A second signal ends the grace at once.
async fn stop_on_signal(phase: watch::Sender<Phase>, grace: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        crate::logs::say("agentq: cannot listen for signals\n");
        return;
    };
    let mut first = true;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let until = if first {
            Instant::now() + grace
        } else {
            Instant::now()
        };
        crate::logs::say(format!(
            "agentq work: stopping; running tasks may finish for {} s\n",
            until.saturating_duration_since(Instant::now()).as_secs()
        ));
        phase.send_replace(Phase::Draining { until });
        first = false;
    }
}

/// A person's view of the worker on a terminal: one line, rewritten every second.
async fn status_line(w: Arc<Worker>) {
    if !w.tty {
        return;
    }
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = &w.counts;
        let (running, done, failed) = (
            c.running.load(Ordering::Relaxed),
            c.done.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
        );
        let rate = (done + failed) as f64 / start.elapsed().as_secs_f64().max(1e-3);
        crate::logs::say(format!(
            "\ragentq work: {running} running · {done} done · {failed} failed · {rate:.1}/s   "
        ));
    }
}

/// What a finished task is reported as.
enum Report {
    /// A complete, sent with the slot's next next-task call (one round trip for both).
    Complete(Value),
    /// A fail, sent at once.
    Fail(Value),
    /// Nothing: the lease was lost, so the task is no longer this agent's to report.
    Lost,
}

/// One slot: claims, runs and reports tasks as agent `agent` until the worker stops.
async fn slot(w: Arc<Worker>, agent: String) {
    let next = format!("/api/agents/{}/next-task", segment(&agent));
    let mut complete: Option<Value> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        if w.draining() {
            if let Some(body) = complete.take() {
                w.report(&agent, Report::Complete(body)).await;
            }
            return;
        }
        let mut body = json!({"projectId": w.project, "waitSeconds": POLL_SECONDS});
        if let Some(types) = &w.options.types {
            body["typeIds"] = json!(types);
        }
        if let Some(c) = &complete {
            body["complete"] = c.clone();
        }
        let task = match w.client.call(Method::Post, &next, Some(&body)).await {
            Ok(mut answer) => {
                complete = None;
                backoff = Duration::from_millis(250);
                answer["data"]["task"].take()
            }
            Err(e) => {
                if let (Some(body), ClientError::Server { status, .. }) = (&complete, &e) {
                    if *status != 429 && *status < 500 {
                        // Refused before anything was written: report the complete alone,
                        // so that its own answer says what became of it.
                        let body = body.clone();
                        complete = None;
                        w.report(&agent, Report::Complete(body)).await;
                        continue;
                    }
                }
                crate::logs::say(format!("agentq work: {agent}: next-task: {e}\n"));
                w.pause(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if task.is_null() {
            continue;
        }
        if w.draining() {
            let body = fail_body(&agent, &task, "worker stopped before it ran", true, None);
            w.report(&agent, Report::Fail(body)).await;
            return;
        }
        w.counts.running.fetch_add(1, Ordering::Relaxed);
        let report = w.run_task(&agent, &task).await;
        w.counts.running.fetch_sub(1, Ordering::Relaxed);
        match report {
            Report::Complete(body) => {
                w.counts.done.fetch_add(1, Ordering::Relaxed);
                if !w.tty {
                    let ms = &body["execution"]["durationMs"];
                    let id = task["id"].as_str().unwrap_or_default();
                    crate::logs::say(format!("agentq work: {agent}: task {id} done in {ms} ms\n"));
                }
                complete = Some(body);
            }
            fail @ Report::Fail(_) => {
                w.counts.failed.fetch_add(1, Ordering::Relaxed);
                w.report(&agent, fail).await;
            }
            Report::Lost => {}
        }
    }
}

impl Worker {
    fn draining(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Draining { .. })
    }

    /// Sleeps `d`, or less when a stop begins.
    async fn pause(&self, d: Duration) {
        let mut phase = self.phase.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = phase.changed() => {}
        }
    }

    /// Sends a complete or a fail, retrying while the server cannot be reached (both are
    /// idempotent: a repeat is answered as the first was).
    async fn report(&self, agent: &str, report: Report) {
        let (verb, body) = match report {
            Report::Complete(body) => ("complete", body),
            Report::Fail(body) => ("fail", body),
            Report::Lost => return,
        };
        let id = body["taskId"].as_str().unwrap_or_default().to_string();
        let path = format!("/api/tasks/{}/{verb}", segment(&id));
        let mut body = body;
        body.as_object_mut().map(|o| o.remove("taskId"));
        body["agentName"] = Value::from(agent);
        for attempt in 0.. {
            match self.client.call(Method::Post, &path, Some(&body)).await {
                Ok(_) => return,
                Err(ClientError::Server { status, .. }) if status != 429 && status < 500 => {
                    crate::logs::say(format!("agentq work: {agent}: {verb} {id} refused\n"));
                    return;
                }
                Err(e) if attempt < 20 => {
                    crate::logs::say(format!("agentq work: {agent}: {verb} {id}: {e}\n"));
                    tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))).await;
                }
                Err(e) => {
                    crate::logs::say(format!(
                        "agentq work: {agent}: gave up on {verb} {id}: {e}\n"
                    ));
                    return;
                }
            }
        }
    }

    /// Runs one leased task to its end and says how to report it.
    async fn run_task(&self, agent: &str, task: &Value) -> Report {
        let script = task["script"]["content"].as_str().map(|content| {
            let python = task["script"]["type"] == "python";
            (python, content)
        });
        let script_timeout = task["script"]["timeoutSeconds"]
            .as_u64()
            .map(Duration::from_secs);
        let o = &self.options;
        let (program, timeout) = match (script, o.scripts, o.command.is_empty()) {
            (Some((python, content)), true, _) => (
                Program::Script { python, content },
                min_some(script_timeout, o.timeout),
            ),
            (Some(_), false, true) => {
                let why = "this worker does not run scripts (start agentq work with --scripts)";
                return Report::Fail(fail_body(agent, task, why, false, None));
            }
            (None, _, true) => {
                let why = "the task has no script, and this worker runs only scripts";
                return Report::Fail(fail_body(agent, task, why, false, None));
            }
            (_, _, false) => (Program::Command(&o.command), o.timeout),
        };
        let dir = match scratch_dir() {
            Ok(d) => d,
            Err(e) => {
                let why = format!("cannot make a working directory: {e}");
                return Report::Fail(fail_body(agent, task, &why, true, None));
            }
        };
        let report = self.run_in(agent, task, &program, timeout, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        report
    }

    async fn run_in(
        &self,
        agent: &str,
        task: &Value,
        program: &Program<'_>,
        timeout: Option<Duration>,
        dir: &Path,
    ) -> Report {
        let outputs_file = dir.join("outputs.json");
        let mut cmd = match program.command(dir) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot write the script: {e}");
                return Report::Fail(fail_body(agent, task, &why, true, None));
            }
        };
        cmd.envs(task_env(task, agent, &self.project, &outputs_file));
        let started = Instant::now();
        let mut child = match spawn(&mut cmd) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot start {}: {e}", program.name());
                return Report::Fail(fail_body(agent, task, &why, true, None));
            }
        };
        let group = child.id().map(|pid| pid as i32);
        self.guard.watch(group);
        if let Some(mut stdin) = child.stdin.take() {
            let input = task.to_string();
            // A process that does not read its stdin must not hold the task up.
            tokio::spawn(async move {
                let _ = stdin.write_all(input.as_bytes()).await;
            });
        }
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child
            .stdout
            .take()
            .map(|out| tokio::spawn(read_stdout(out, progress_tx)));
        let stderr = child.stderr.take().map(|err| tokio::spawn(read_tail(err)));
        let id = task["id"].as_str().unwrap_or_default().to_string();
        let token = task["leaseToken"].clone();
        let beat = heartbeat_every(task);
        let mut next_beat = tokio::time::Instant::now() + beat;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut phase = self.phase.clone();
        let mut ended_by: Option<String> = None;
        let status = loop {
            let drain_until = match *phase.borrow() {
                Phase::Draining { until } => Some(tokio::time::Instant::from_std(until)),
                Phase::Running => None,
            };
            tokio::select! {
                status = child.wait() => break status.ok(),
                _ = tokio::time::sleep_until(next_beat) => {
                    next_beat = tokio::time::Instant::now() + beat;
                    if self.extend(agent, &id, &token, beat).await.is_err() {
                        crate::logs::say(format!("agentq work: {agent}: lost the lease of {id}; stopping its process\n"));
                        kill_group(group, &mut child, Duration::ZERO).await;
                        return Report::Lost;
                    }
                }
                Some(p) = progress_rx.recv() => self.progress(agent, &id, &token, p).await,
                _ = sleep_until_opt(deadline) => {
                    let secs = timeout.unwrap_or_default().as_secs_f64();
                    ended_by = Some(format!("timed out after {secs} s"));
                    break kill_group(group, &mut child, KILL_AFTER).await;
                }
                _ = sleep_until_opt(drain_until) => {
                    ended_by = Some("worker stopped".into());
                    break kill_group(group, &mut child, KILL_AFTER).await;
                }
                _ = phase.changed() => {}
            }
        };
        // Whatever the process left running in its group goes with it.
        signal_group(group, libc::SIGKILL);
        self.guard.release(group);
        let duration_ms = started.elapsed().as_millis() as u64;
        let (result, stdout_tail) = match stdout {
            Some(h) => settle(h).await.unwrap_or_default(),
            None => Default::default(),
        };
        let stderr_tail = match stderr {
            Some(h) => settle(h).await.unwrap_or_default(),
            None => String::new(),
        };
        // The last progress the process reported before it ended, if not yet sent.
        let mut last = None;
        while let Ok(p) = progress_rx.try_recv() {
            last = Some(p);
        }
        if let Some(p) = last {
            self.progress(agent, &id, &token, p).await;
        }
        let exit_code = status.map_or(-1, |s| {
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        });
        let execution = json!({"exitCode": exit_code, "stdoutTail": stdout_tail,
                               "stderrTail": stderr_tail, "durationMs": duration_ms});
        if let Some(why) = ended_by {
            // A timeout or a stop is a failure like any other: retried while retries remain.
            return Report::Fail(fail_body(agent, task, &why, true, Some(execution)));
        }
        if exit_code != 0 {
            let why = format!("exit code {exit_code}{}", error_tail(&stderr_tail));
            return Report::Fail(fail_body(agent, task, &why, true, Some(execution)));
        }
        let mut body = json!({"taskId": id, "leaseToken": token, "execution": execution});
        match read_outputs(&outputs_file) {
            Ok(Some(outputs)) => body["outputs"] = outputs,
            Ok(None) => body["result"] = Value::from(result.trim_end_matches('\n')),
            Err(why) => {
                return Report::Fail(fail_body(agent, task, &why, true, Some(execution)));
            }
        }
        Report::Complete(body)
    }

    /// Reports a `::progress` line (a failure to do so is not the task's).
    async fn progress(&self, agent: &str, id: &str, token: &Value, p: Progress) {
        let (current, total, message) = p;
        let body = json!({"agentName": agent, "leaseToken": token,
                          "current": current, "total": total, "message": message});
        let path = format!("/api/tasks/{}/progress", segment(id));
        let _ = self.client.call(Method::Post, &path, Some(&body)).await;
    }

    /// Extends the lease by the heartbeat's period three times over. Err: the lease is lost.
    async fn extend(&self, agent: &str, id: &str, token: &Value, beat: Duration) -> Result<(), ()> {
        let minutes = (beat.as_secs_f64() * 3.0 / 60.0).clamp(0.1, 1440.0);
        let body = json!({"agentName": agent, "leaseToken": token, "extensionMinutes": minutes});
        let path = format!("/api/tasks/{}/extend-lease", segment(id));
        match self.client.call(Method::Post, &path, Some(&body)).await {
            Ok(_) => Ok(()),
            // 409: another holder now, or the task ended (cancelled); 404: deleted.
            Err(ClientError::Server {
                status: 409 | 404, ..
            }) => Err(()),
            // Anything else (the server away for a moment): the next beat tries again.
            Err(_) => Ok(()),
        }
    }
}

/// What a task runs.
enum Program<'a> {
    Command(&'a [String]),
    Script { python: bool, content: &'a str },
}

impl Program<'_> {
    fn name(&self) -> String {
        match self {
            Program::Command(c) => c[0].clone(),
            Program::Script { python: true, .. } => "python3".into(),
            Program::Script { .. } => "bash".into(),
        }
    }

    /// The command, ready but for the task's environment. A script is written into `dir`
    /// and runs there.
    fn command(&self, dir: &Path) -> std::io::Result<tokio::process::Command> {
        Ok(match self {
            Program::Command(c) => {
                let mut cmd = tokio::process::Command::new(&c[0]);
                cmd.args(&c[1..]);
                cmd
            }
            Program::Script { python, content } => {
                let file = dir.join(if *python { "script.py" } else { "script.sh" });
                std::fs::write(&file, content)?;
                let mut cmd = tokio::process::Command::new(self.name());
                cmd.arg(&file).current_dir(dir);
                cmd
            }
        })
    }
}

/// Starts `cmd` with piped stdio in a process group of its own. Nothing runs in the child
/// before `exec`, so the standard library can start it with `posix_spawn` (a vfork), not a
/// fork of the whole worker: measured, 30% more tasks a second running `true`.
fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The worker's key is not the task's: code a task runs does not get it.
        .env_remove("AGENTQ_KEY")
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
}

/// The first argument that runs the binary as a worker's [`Guard`].
pub const GUARD_ARG: &str = "__work-guard";

/// A process that outlives the worker to kill the process groups of its tasks: the worker
/// tells it each group it starts and each it has ended (`+PGID`, `-PGID` lines on its stdin),
/// and when its stdin closes (the worker exited, or was killed: the kernel closes the pipe)
/// it kills every group still listed. It runs in a process group of its own, so that a signal
/// to the worker's group does not take it along.
struct Guard {
    stdin: std::sync::Mutex<std::process::ChildStdin>,
}

impl Guard {
    fn start() -> std::io::Result<Guard> {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg(GUARD_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        // Not waited for: it ends after the worker, and init reaps it.
        drop(child);
        Ok(Guard {
            stdin: std::sync::Mutex::new(stdin),
        })
    }

    fn tell(&self, line: String) {
        use std::io::Write;
        if let Ok(mut stdin) = self.stdin.lock() {
            let _ = stdin.write_all(line.as_bytes());
        }
    }

    fn watch(&self, group: Option<i32>) {
        if let Some(pgid) = group {
            self.tell(format!("+{pgid}\n"));
        }
    }

    fn release(&self, group: Option<i32>) {
        if let Some(pgid) = group {
            self.tell(format!("-{pgid}\n"));
        }
    }
}

/// The guard's life (`agentq __work-guard`): follows the worker's lines until its stdin
/// closes, then kills the groups still listed.
pub fn guard_main() -> ExitCode {
    use std::io::BufRead;
    let mut live = std::collections::HashSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (sign, pgid) = line.split_at(1.min(line.len()));
        match (sign, pgid.parse::<i32>()) {
            ("+", Ok(p)) if p > 1 => {
                live.insert(p);
            }
            ("-", Ok(p)) => {
                live.remove(&p);
            }
            _ => {}
        }
    }
    for pgid in live {
        signal_group(Some(pgid), libc::SIGKILL);
    }
    ExitCode::SUCCESS
}

/// The task's environment: its id, instructions, attempt and variables, and where outputs go.
fn task_env(task: &Value, agent: &str, project: &str, outputs: &Path) -> Vec<(String, String)> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let attempt = task["attempts"]
        .as_array()
        .map_or(task["retryCount"].as_u64().unwrap_or(0) + 1, |a| {
            a.len() as u64
        });
    let mut env = vec![
        ("AGENTQ_TASK_ID".into(), text(&task["id"])),
        (
            "AGENTQ_TASK_INSTRUCTIONS".into(),
            text(&task["instructions"]),
        ),
        ("AGENTQ_ATTEMPT".into(), attempt.to_string()),
        ("AGENTQ_PROJECT".into(), project.to_string()),
        ("AGENTQ_AGENT".into(), agent.to_string()),
        ("AGENTQ_OUTPUTS_FILE".into(), outputs.display().to_string()),
    ];
    if let Some(vars) = task["variables"].as_object() {
        for (name, value) in vars {
            env.push((format!("AGENTQ_VAR_{name}"), text(value)));
        }
    }
    env
}

/// A fresh, empty directory for one task.
fn scratch_dir() -> std::io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("agentq-work-{}-{n}", std::process::id()));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Reads stdout to its end: progress lines go to `progress`, the rest is the result (its
/// last [`MAX_RESULT_CHARS`]) and the tail (its last [`MAX_TAIL_BYTES`], progress included).
async fn read_stdout(
    out: tokio::process::ChildStdout,
    progress: tokio::sync::mpsc::UnboundedSender<Progress>,
) -> (String, String) {
    let mut lines = BufReader::new(out);
    let mut result = String::new();
    let mut tail = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        push_tail(&mut tail, &text, MAX_TAIL_BYTES);
        match parse_progress(&text) {
            Some(p) => {
                let _ = progress.send(p);
            }
            None => push_tail(&mut result, &text, MAX_RESULT_CHARS),
        }
    }
    (result, tail)
}

/// Reads a stream to its end and keeps its last [`MAX_TAIL_BYTES`].
async fn read_tail(mut err: tokio::process::ChildStderr) -> String {
    let mut tail = String::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match err.read(&mut buf).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => push_tail(
                &mut tail,
                &String::from_utf8_lossy(&buf[..n]),
                MAX_TAIL_BYTES,
            ),
        }
    }
}

/// Appends `text` and keeps the last `max` bytes, cut at a character boundary.
fn push_tail(buf: &mut String, text: &str, max: usize) {
    buf.push_str(text);
    if buf.len() > max {
        let mut cut = buf.len() - max;
        while !buf.is_char_boundary(cut) {
            cut += 1;
        }
        buf.drain(..cut);
    }
}

/// A `::progress` line: (current, total, message).
type Progress = (i64, i64, Option<String>);

/// `::progress CURRENT/TOTAL message` as (current, total, message).
fn parse_progress(line: &str) -> Option<Progress> {
    let rest = line.trim_end().strip_prefix("::progress ")?;
    let (counts, message) = match rest.split_once(' ') {
        Some((c, m)) => (c, Some(m.trim().to_string()).filter(|m| !m.is_empty())),
        None => (rest, None),
    };
    let (current, total) = counts.split_once('/')?;
    Some((current.parse().ok()?, total.parse().ok()?, message))
}

/// The JSON object a process wrote to its outputs file, if it wrote one.
fn read_outputs(file: &Path) -> Result<Option<Value>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read AGENTQ_OUTPUTS_FILE: {e}")),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => Ok(Some(v)),
        _ => Err("AGENTQ_OUTPUTS_FILE does not hold a JSON object".into()),
    }
}

/// ": " and the end of stderr, for a failure's message.
fn error_tail(stderr: &str) -> String {
    let trimmed = stderr.trim_end();
    if trimmed.is_empty() {
        return String::new();
    }
    let mut tail = String::new();
    push_tail(&mut tail, trimmed, ERROR_TAIL_BYTES);
    format!(": {tail}")
}

/// A fail's body (with `taskId`, which [`Worker::report`] moves into the path).
fn fail_body(agent: &str, task: &Value, why: &str, retry: bool, execution: Option<Value>) -> Value {
    crate::logs::say(format!(
        "agentq work: {agent}: task {} failed: {}\n",
        task["id"].as_str().unwrap_or_default(),
        why.lines().next().unwrap_or_default()
    ));
    let mut body = json!({"taskId": task["id"], "leaseToken": task["leaseToken"],
                          "error": why, "canRetry": retry});
    if let Some(e) = execution {
        body["execution"] = e;
    }
    body
}

/// A third of the task's lease: how often its lease is extended while it runs.
fn heartbeat_every(task: &Value) -> Duration {
    let at = |field: &str| task[field].as_str().and_then(crate::time::parse);
    let lease_ms = match (at("assignedAt"), at("leaseExpiresAt")) {
        (Some(a), Some(e)) if e > a => (e - a) as u64,
        _ => 60_000,
    };
    Duration::from_millis((lease_ms / 3).max(1_000))
}

fn min_some(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a reader task gathered; nothing if it does not end soon after the process (a
/// descendant that left its group and kept the pipe open).
async fn settle<T: Default>(h: tokio::task::JoinHandle<T>) -> Option<T> {
    match tokio::time::timeout(Duration::from_secs(2), h).await {
        Ok(Ok(v)) => Some(v),
        _ => None,
    }
}

#[allow(unsafe_code)]
fn signal_group(group: Option<i32>, signal: i32) {
    if let Some(pgid) = group {
        // SAFETY: killpg only sends a signal; pgid is the group this worker created.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// SIGTERM to the process group, SIGKILL `after` later if the process is still there; its
/// exit status.
async fn kill_group(
    group: Option<i32>,
    child: &mut tokio::process::Child,
    after: Duration,
) -> Option<std::process::ExitStatus> {
    if !after.is_zero() {
        signal_group(group, libc::SIGTERM);
        if let Ok(status) = tokio::time::timeout(after, child.wait()).await {
            return status.ok();
        }
    }
    signal_group(group, libc::SIGKILL);
    child.wait().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress("::progress 3/10 reading files\n"),
            Some((3, 10, Some("reading files".into())))
        );
        assert_eq!(parse_progress("::progress 1/2"), Some((1, 2, None)));
        assert_eq!(parse_progress("::progress x/2"), None);
        assert_eq!(parse_progress("progress 1/2"), None);
    }

    #[test]
    fn tails_keep_the_end_at_a_character_boundary() {
        let mut t = String::new();
        push_tail(&mut t, "abc", 4);
        push_tail(&mut t, "éé", 4);
        assert_eq!(t, "éé");
        push_tail(&mut t, "x", 4);
        assert_eq!(t, "éx");
    }

    #[test]
    fn the_default_agent_name_fits_the_api() {
        let name = default_agent_name();
        assert!(name.len() + 6 <= MAX_AGENT_NAME, "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}

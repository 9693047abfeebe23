//! `agentq work` with real processes against a real server: scripts and commands that
//! succeed and fail, stdout as the result, the outputs file, progress lines, heartbeats that
//! outlive the lease, timeouts that leave no process behind, a drain on SIGTERM, a worker
//! killed with SIGKILL whose task another worker finishes, and a worker without `--scripts`
//! that never runs a script.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::binary::{agentq_bin, send, Reaped};
use common::*;
use serde_json::{json, Value};

/// `agentq work ARGS` as a client of `app`, its stderr in `log`.
fn worker(app: &TestApp, log: &Path, args: &[&str]) -> Reaped {
    let child = Command::new(agentq_bin())
        .arg("work")
        .args(args)
        .env("AGENTQ_URL", &app.base)
        .env("AGENTQ_KEY", &app.admin_key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Reaped(child)
}

/// Waits (up to a minute) for task `id` to reach one of `statuses`; its JSON.
async fn wait_for(app: &TestApp, id: &str, statuses: &[&str], log: &Path) -> Value {
    for _ in 0..600 {
        let t = app.get(&format!("/api/tasks/{id}")).await;
        if statuses.iter().any(|s| t.data()["status"] == *s) {
            return t.data().clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "task {id} never reached {statuses:?}; worker log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Waits (up to a minute) for the worker to exit; its exit code.
async fn exit_code(mut w: Reaped) -> i32 {
    for _ in 0..600 {
        if let Some(status) = w.0.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the worker never exited");
}

async fn attempts(app: &TestApp, id: &str) -> Vec<Value> {
    let r = app.get(&format!("/api/tasks/{id}/attempts")).await;
    r.data().as_array().unwrap().clone()
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet: it runs nothing).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (up to 5 s) for a script to write `file`; its contents.
async fn wait_for_file(file: &Path) -> String {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(file) {
            if !text.is_empty() {
                return text;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} was never written", file.display());
}

async fn wait_gone(pid: &str) {
    for _ in 0..100 {
        if gone(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("process {pid} outlived its task");
}

struct Setup {
    app: TestApp,
    project: String,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(max_retries: u32) -> Setup {
        let app = spawn_app().await;
        let r = app
            .post(
                "/api/projects",
                json!({"name": "w", "description": "",
                       "config": {"defaultMaxRetries": max_retries}}),
            )
            .await;
        assert_eq!(r.status, 201);
        Setup {
            project: r.data()["id"].as_str().unwrap().to_string(),
            app,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A task type `short` whose lease is 6 s.
    async fn short_lease_type(&self) {
        self.app
            .task_type(
                &self.project,
                json!({"name": "short", "leaseDurationMinutes": 0.1}),
            )
            .await;
    }

    async fn script(&self, kind: &str, content: &str, extra: Value) -> String {
        let mut body = json!({"script": {"type": kind, "content": content}});
        for (k, v) in extra.as_object().unwrap() {
            match k.as_str() {
                "timeoutSeconds" => body["script"][k] = v.clone(),
                _ => body[k] = v.clone(),
            }
        }
        self.app.task(&self.project, body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_succeed_and_fail_with_their_output_and_history() {
    let s = Setup::new(0).await;
    let ok = s
        .script(
            "bash",
            "echo '::progress 1/2 half way'\necho \"hello $AGENTQ_VAR_who\"\necho warn >&2\n",
            json!({"variables": {"who": "world"}}),
        )
        .await;
    let py = s
        .script(
            "python",
            "import json, os\nprint('ignored: outputs win')\n\
             json.dump({'sum': 3, 'cwd_empty': os.listdir('.') == ['script.py']},\n\
             open(os.environ['AGENTQ_OUTPUTS_FILE'], 'w'))\n",
            json!({}),
        )
        .await;
    let bad = s
        .script(
            "bash",
            "echo partial\necho 'it broke' >&2\nexit 3\n",
            json!({}),
        )
        .await;
    let log = s.path("worker.log");
    let w = worker(
        &s.app,
        &log,
        &["w", "--scripts", "--concurrency", "2", "--agent", "box"],
    );

    let t = wait_for(&s.app, &ok, &["completed"], &log).await;
    assert_eq!(t["result"], "hello world", "stdout without progress lines");
    assert_eq!(t["progress"]["current"], 1);
    assert_eq!(t["progress"]["message"], "half way");
    let a = attempts(&s.app, &ok).await;
    assert!(a[0]["agentName"].as_str().unwrap().starts_with("box-"));
    let e = &a[0]["execution"];
    assert_eq!(e["exitCode"], 0);
    assert_eq!(e["stderrTail"], "warn\n");
    assert!(e["stdoutTail"].as_str().unwrap().contains("::progress 1/2"));

    let t = wait_for(&s.app, &py, &["completed"], &log).await;
    assert_eq!(t["outputs"], json!({"sum": 3, "cwd_empty": true}));

    let t = wait_for(&s.app, &bad, &["failed"], &log).await;
    let error = t["error"].as_str().unwrap();
    assert!(
        error.contains("exit code 3") && error.contains("it broke"),
        "{error}"
    );
    let a = attempts(&s.app, &bad).await;
    assert_eq!(a[0]["execution"]["exitCode"], 3);
    assert_eq!(a[0]["execution"]["stdoutTail"], "partial\n");

    let pid = w.id();
    send("TERM", &w);
    assert_eq!(exit_code(w).await, 0, "a stopped worker exits 0");
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.starts_with(&format!("agentq-work-{pid}-"))
        })
        .count();
    assert_eq!(leftovers, 0, "each task's directory is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_gets_the_task_on_stdin_and_in_its_environment() {
    let s = Setup::new(0).await;
    let id = s
        .app
        .task(
            &s.project,
            json!({"instructions": "add them", "variables": {"a": "2", "b": "5"}}),
        )
        .await;
    let agent = s.path("agent.py");
    std::fs::write(
        &agent,
        "import json, os, sys\n\
         task = json.load(sys.stdin)\n\
         assert task['id'] == os.environ['AGENTQ_TASK_ID']\n\
         assert os.environ['AGENTQ_TASK_INSTRUCTIONS'] == 'add them'\n\
         assert os.environ['AGENTQ_ATTEMPT'] == '1'\n\
         assert 'AGENTQ_KEY' not in os.environ, 'the key stays with the worker'\n\
         print(int(os.environ['AGENTQ_VAR_a']) + int(task['variables']['b']))\n",
    )
    .unwrap();
    let log = s.path("worker.log");
    let w = worker(
        &s.app,
        &log,
        &["w", "--", "python3", agent.to_str().unwrap()],
    );
    let t = wait_for(&s.app, &id, &["completed", "failed"], &log).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["result"], "7");
    send("INT", &w);
    assert_eq!(exit_code(w).await, 0);
}

/// A task that runs more than twice as long as its lease is kept by heartbeats: one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_task_longer_than_its_lease() {
    let s = Setup::new(0).await;
    s.short_lease_type().await;
    let id = s
        .script("bash", "sleep 14\necho done\n", json!({"typeId": "short"}))
        .await;
    let log = s.path("worker.log");
    let w = worker(&s.app, &log, &["w", "--scripts"]);
    let t = wait_for(&s.app, &id, &["completed", "failed"], &log).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(attempts(&s.app, &id).await.len(), 1, "never reclaimed");
    drop(w);
}

/// A timeout stops the whole process group: what the script started in the background too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_process_group_and_fails_the_task() {
    let s = Setup::new(0).await;
    let pids = s.path("pids");
    let content = format!(
        "sleep 300 &\necho $! > {p}.bg\necho $$ > {p}.main\nsleep 300\n",
        p = pids.display()
    );
    let id = s
        .script("bash", &content, json!({"timeoutSeconds": 1}))
        .await;
    let log = s.path("worker.log");
    let w = worker(&s.app, &log, &["w", "--scripts"]);
    let t = wait_for(&s.app, &id, &["failed"], &log).await;
    assert_eq!(t["error"], "timed out after 1 s");
    let a = attempts(&s.app, &id).await;
    assert_eq!(a[0]["execution"]["exitCode"], 128 + 15, "SIGTERM ended it");
    for which in ["main", "bg"] {
        let pid = std::fs::read_to_string(format!("{}.{which}", pids.display())).unwrap();
        wait_gone(&pid).await;
    }
    drop(w);
}

/// SIGTERM: no new task; a running one finishes within the grace period, and one that does
/// not is stopped and failed with "worker stopped" (retried elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_for_the_grace_period() {
    let s = Setup::new(1).await;
    let started = s.path("started");
    let quick = s
        .script(
            "bash",
            &format!("touch {}.q\nsleep 2\necho finished\n", started.display()),
            json!({"priority": 9}),
        )
        .await;
    let log = s.path("worker.log");
    let w = worker(&s.app, &log, &["w", "--scripts", "--grace", "20s"]);
    wait_for(&s.app, &quick, &["running"], &log).await;
    let later = s.script("bash", "echo never\n", json!({})).await;
    send("TERM", &w);
    let t = wait_for(&s.app, &quick, &["completed"], &log).await;
    assert_eq!(t["result"], "finished");
    assert_eq!(exit_code(w).await, 0);
    let t = s.app.get(&format!("/api/tasks/{later}")).await;
    assert_eq!(t.data()["status"], "queued", "no task taken while stopping");

    // Past the grace period the process is stopped and the task failed, to be retried.
    let slow = s
        .script(
            "bash",
            &format!("echo $$ > {}.s\nsleep 300\n", started.display()),
            json!({"priority": 10}),
        )
        .await;
    let w = worker(&s.app, &log, &["w", "--scripts", "--grace", "1s"]);
    wait_for(&s.app, &slow, &["running"], &log).await;
    let pid_file = PathBuf::from(format!("{}.s", started.display()));
    let pid = wait_for_file(&pid_file).await;
    send("TERM", &w);
    assert_eq!(exit_code(w).await, 0);
    let t = s.app.get(&format!("/api/tasks/{slow}")).await;
    assert_eq!(t.data()["status"], "queued", "requeued for another worker");
    assert_eq!(t.data()["error"], "worker stopped");
    wait_gone(&pid).await;
}

/// A worker killed with SIGKILL takes its process with it; the lease expires and another
/// worker runs the task again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_a_killed_worker_is_run_by_another() {
    let s = Setup::new(2).await;
    s.short_lease_type().await;
    let pid_file = s.path("first");
    let content = format!(
        "if [ \"$AGENTQ_ATTEMPT\" = 1 ]; then echo $$ > {p}; sleep 300; fi\necho second\n",
        p = pid_file.display()
    );
    let id = s.script("bash", &content, json!({"typeId": "short"})).await;
    let log = s.path("first.log");
    let mut first = worker(&s.app, &log, &["w", "--scripts", "--agent", "first"]);
    wait_for(&s.app, &id, &["running"], &log).await;
    let pid = wait_for_file(&pid_file).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    wait_gone(&pid).await;
    let log = s.path("second.log");
    let second = worker(&s.app, &log, &["w", "--scripts", "--agent", "second"]);
    let t = wait_for(&s.app, &id, &["completed"], &log).await;
    assert_eq!(t["result"], "second");
    let a = attempts(&s.app, &id).await;
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["outcome"], "timeout");
    assert!(a[1]["agentName"].as_str().unwrap().starts_with("second-"));
    drop(second);
}

/// Without `--scripts` a script is never run: the task goes to the command like any other,
/// or fails with a clear error when there is no command. A worker with neither refuses to
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_scripts_no_script_runs() {
    let s = Setup::new(0).await;
    let marker = s.path("ran");
    let content = format!("touch {}\n", marker.display());
    let id = s.script("bash", &content, json!({})).await;
    let log = s.path("worker.log");
    let w = worker(&s.app, &log, &["w", "--", "cat"]);
    let t = wait_for(&s.app, &id, &["completed", "failed"], &log).await;
    assert_eq!(t["status"], "completed");
    let task: Value = serde_json::from_str(t["result"].as_str().unwrap()).unwrap();
    assert_eq!(
        task["script"]["content"], content,
        "the command got the task"
    );
    assert!(!marker.exists(), "the script itself never ran");
    send("TERM", &w);
    exit_code(w).await;

    let plain = s.app.task(&s.project, json!({"instructions": "x"})).await;
    let w = worker(&s.app, &log, &["w", "--scripts"]);
    let t = wait_for(&s.app, &plain, &["failed"], &log).await;
    assert!(t["error"].as_str().unwrap().contains("runs only scripts"));
    send("TERM", &w);
    exit_code(w).await;

    let w = worker(&s.app, &log, &["w"]);
    assert_eq!(exit_code(w).await, 2, "nothing to run");
    let w = worker(&s.app, &log, &["nope", "--", "true"]);
    assert_eq!(exit_code(w).await, 3, "no such project");
}

/// A task cancelled while it runs: the next heartbeat finds the lease gone (409), and the
/// worker stops the process without reporting anything for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_stops_the_process() {
    let s = Setup::new(0).await;
    s.short_lease_type().await;
    let pid_file = s.path("pid");
    let content = format!("echo $$ > {}\nsleep 300\n", pid_file.display());
    let id = s.script("bash", &content, json!({"typeId": "short"})).await;
    let log = s.path("worker.log");
    let w = worker(&s.app, &log, &["w", "--scripts"]);
    wait_for(&s.app, &id, &["running"], &log).await;
    let pid = wait_for_file(&pid_file).await;
    let r = s
        .app
        .post(
            &format!("/api/tasks/{id}/cancel"),
            json!({"reason": "enough"}),
        )
        .await;
    assert_eq!(r.status, 200);
    wait_gone(&pid).await;
    let t = s.app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(
        t.data()["status"],
        "cancelled",
        "nothing reported over the cancel"
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("lost the lease"));
    drop(w);
}

//! The client verbs of the `agentq` binary against a real server: `--json` output field by
//! field, names in place of ids, exit codes, and a bulk of JSON lines sent in chunks.

mod common;

use std::process::Command;

use common::binary::agentq_bin;
use common::*;
use serde_json::{json, Value};

/// What one run of the binary did.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("{e}: stdout {:?}, stderr {:?}", self.out, self.err))
    }
}

/// Runs `agentq ARGS` as a client of `app` (URL and key from the environment).
async fn agentq(app: &TestApp, args: &[&str]) -> Run {
    let (base, key) = (app.base.clone(), app.admin_key.clone());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(agentq_bin())
            .args(&args)
            .env("AGENTQ_URL", base)
            .env("AGENTQ_KEY", key)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&out.stdout).to_string(),
            err: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    })
    .await
    .unwrap()
}

/// A project, a task type and tasks made and read with the CLI, by name all along; `--json`
/// prints the server's `data` exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_types_and_tasks_by_name() {
    let app = spawn_app().await;
    let r = agentq(
        &app,
        &["project", "create", "demo", "--description", "d", "--json"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    let project = r.json();
    assert_eq!(project["name"], "demo");
    assert_eq!(project["description"], "d");
    let same = app.get("/api/projects/demo").await;
    assert_eq!(same.data()["id"], project["id"]);

    let r = agentq(
        &app,
        &[
            "type",
            "create",
            "demo",
            "summarize",
            "--template",
            "Sum {{url}}",
            "--var",
            "url",
            "--max-retries",
            "2",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    let ty = r.json();
    assert_eq!(
        (ty["name"].clone(), ty["maxRetries"].clone()),
        (json!("summarize"), json!(2))
    );
    assert_eq!(ty["variables"], json!(["url"]));

    let r = agentq(
        &app,
        &[
            "task",
            "create",
            "demo",
            "--type",
            "summarize",
            "--var",
            "url=https://x",
            "--priority",
            "9",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    let task = r.json();
    assert_eq!(task["instructions"], "Sum https://x");
    assert_eq!(task["typeId"], ty["id"]);
    assert_eq!(task["priority"], 9);

    let r = agentq(&app, &["type", "show", "demo", "summarize", "--json"]).await;
    assert_eq!(r.json()["id"], ty["id"]);
    let r = agentq(
        &app,
        &["task", "list", "demo", "--type", "summarize", "--json"],
    )
    .await;
    let listed = r.json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], task["id"]);
    // Without --json: a table with a header and one row.
    let r = agentq(&app, &["task", "list", "demo"]).await;
    assert_eq!(r.code, 0);
    assert!(r.out.starts_with("id"), "{}", r.out);
    assert!(r.out.contains(task["id"].as_str().unwrap()), "{}", r.out);
}

/// The agent verbs: next, complete, fail, with the exit codes of an empty queue (5), a lost
/// lease (4) and a missing task (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_verbs_and_their_exit_codes() {
    let app = spawn_app().await;
    let p = app.project("work").await;
    app.task(&p, json!({"instructions": "one"})).await;
    let r = agentq(&app, &["peek", "work", "--json"]).await;
    assert_eq!((r.code, r.json()["tasksAvailable"].clone()), (0, json!(1)));
    let r = agentq(&app, &["next", "work", "--agent", "w1", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let task = r.json()["task"].clone();
    let (id, token) = (
        task["id"].as_str().unwrap(),
        task["leaseToken"].as_str().unwrap(),
    );
    let r = agentq(&app, &["next", "work", "--agent", "w2"]).await;
    assert_eq!(r.code, 5, "nothing to do: {} {}", r.out, r.err);
    let r = agentq(&app, &["peek", "work"]).await;
    assert_eq!(r.code, 5);
    let r = agentq(&app, &["complete", id, "--agent", "w2", "--result", "x"]).await;
    assert_eq!(r.code, 4, "not the holder: {}", r.err);
    assert!(r.err.contains("LEASE_LOST"), "{}", r.err);
    let r = agentq(
        &app,
        &[
            "complete",
            id,
            "--agent",
            "w1",
            "--token",
            token,
            "--result",
            "done",
            "--outputs",
            r#"{"n": 1}"#,
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    let done = r.json();
    assert_eq!(
        (done["status"].clone(), done["result"].clone()),
        (json!("completed"), json!("done"))
    );
    assert_eq!(done["outputs"], json!({"n": 1}));
    let r = agentq(&app, &["task", "show", "no-such-task"]).await;
    assert_eq!(r.code, 3, "{}", r.err);
    // A bad flag value is a usage error: 2, nothing sent.
    let r = agentq(&app, &["task", "create", "work", "--priority", "high"]).await;
    assert_eq!(r.code, 2, "{}", r.err);
    // A field rule the server enforces: 1, with the field named.
    let r = agentq(
        &app,
        &[
            "task",
            "create",
            "work",
            "--priority",
            "11",
            "--instructions",
            "x",
        ],
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("priority"), "{}", r.err);

    app.task(&p, json!({"instructions": "two"})).await;
    let r = agentq(&app, &["next", "work", "--agent", "w3", "--json"]).await;
    let id = r.json()["task"]["id"].as_str().unwrap().to_string();
    let r = agentq(
        &app,
        &[
            "fail",
            &id,
            "--agent",
            "w3",
            "--error",
            "boom",
            "--no-retry",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        (r.json()["status"].clone(), r.json()["willRetry"].clone()),
        (json!("failed"), json!(false))
    );
    let r = agentq(&app, &["task", "attempts", &id, "--json"]).await;
    assert_eq!(r.json()[0]["error"], "boom");
}

/// `task bulk` of more than 1,000 tasks as JSON lines: sent in chunks, one summed answer,
/// errors indexed over the whole file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_of_json_lines_is_sent_in_chunks() {
    let app = spawn_app().await;
    let p = app.project("bulk").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tasks.jsonl");
    let mut lines: Vec<String> = (0..1500)
        .map(|i| json!({"instructions": format!("t{i}")}).to_string())
        .collect();
    lines[1200] = json!({"instructions": "x", "priority": 99}).to_string();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let r = agentq(
        &app,
        &["task", "bulk", "bulk", file.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(r.code, 1, "an item failed: {}", r.err);
    let answer = r.json();
    assert_eq!(answer["tasksCreated"], 1499);
    assert_eq!(answer["createdTasks"].as_array().unwrap().len(), 1499);
    assert_eq!(answer["errors"][0]["index"], 1200);
    assert_eq!(app.stats(&p).await["totalTasks"], 1499);
    // Every page, following the cursor.
    let r = agentq(
        &app,
        &["task", "list", "bulk", "--all", "--limit", "1000", "--json"],
    )
    .await;
    assert_eq!(r.json().as_array().unwrap().len(), 1499);
}

/// Scripts from the command line: a task's from a file (its type from the extension), a
/// type's inline, a timeout as a duration; and a key that may write them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_keys_that_may_write_them() {
    let app = spawn_app().await;
    app.project("s").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.py");
    std::fs::write(&file, "print('hi')\n").unwrap();
    let at_file = format!("@{}", file.display());
    let r = agentq(
        &app,
        &[
            "task",
            "create",
            "s",
            "--script",
            &at_file,
            "--timeout",
            "90s",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    let task = r.json();
    assert_eq!(
        task["script"],
        json!({"type": "python", "content": "print('hi')\n", "size": 12, "timeoutSeconds": 90})
    );
    assert_eq!(task["instructions"], "");
    let r = agentq(
        &app,
        &["type", "create", "s", "sh", "--script", "echo hi", "--json"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.json()["script"]["type"], "bash");
    let r = agentq(
        &app,
        &["task", "create", "s", "--script", "x", "--timeout", "2h"],
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("script.timeoutSeconds"), "{}", r.err);

    let r = agentq(
        &app,
        &[
            "key",
            "create",
            "ci",
            "--role",
            "producer",
            "--allow-scripts",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.json()["allowScripts"], true);
    let (_, producer) = app.key("producer", None).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(agentq_bin())
            .args(["task", "create", "s", "--script", "true"])
            .env("AGENTQ_URL", app.base.clone())
            .env("AGENTQ_KEY", producer)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "403 is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("FORBIDDEN"));
}

/// Every other verb once, with `--json` checked: the project, type, task and key verbs, the
/// holder's extend and progress, agents, cleanup, health and status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_once() {
    let app = spawn_app().await;
    let ok = |r: &Run| assert_eq!(r.code, 0, "stdout {} stderr {}", r.out, r.err);
    let r = agentq(&app, &["project", "create", "p", "--json"]).await;
    ok(&r);
    let r = agentq(&app, &["project", "list", "--json"]).await;
    ok(&r);
    assert_eq!(r.json()[0]["name"], "p");
    let r = agentq(
        &app,
        &["project", "update", "p", "--description", "new", "--json"],
    )
    .await;
    ok(&r);
    assert_eq!(r.json()["description"], "new");
    let r = agentq(&app, &["project", "show", "p", "--json"]).await;
    assert_eq!(r.json()["description"], "new");
    let r = agentq(&app, &["type", "create", "p", "t", "--json"]).await;
    ok(&r);
    let r = agentq(
        &app,
        &["type", "update", "p", "t", "--max-retries", "0", "--json"],
    )
    .await;
    ok(&r);
    assert_eq!(r.json()["maxRetries"], 0);
    let r = agentq(&app, &["type", "list", "p", "--json"]).await;
    assert_eq!(r.json()[0]["name"], "t");

    let r = agentq(
        &app,
        &[
            "task",
            "create",
            "p",
            "--type",
            "t",
            "--instructions",
            "x",
            "--json",
        ],
    )
    .await;
    ok(&r);
    let r = agentq(&app, &["next", "p", "--agent", "a", "--json"]).await;
    ok(&r);
    let task = r.json()["task"].clone();
    let (id, token) = (
        task["id"].as_str().unwrap().to_string(),
        task["leaseToken"].as_str().unwrap().to_string(),
    );
    let holder = ["--agent", "a", "--token", token.as_str()];
    let mut args = vec!["extend", id.as_str()];
    args.extend(holder);
    args.extend(["--minutes", "30", "--json"]);
    let r = agentq(&app, &args).await;
    ok(&r);
    assert!(r.json()["leaseExpiresAt"].is_string());
    let mut args = vec!["progress", id.as_str()];
    args.extend(holder);
    args.extend(["--current", "1", "--total", "4", "--message", "m", "--json"]);
    let r = agentq(&app, &args).await;
    ok(&r);
    assert_eq!(r.json()["progress"]["total"], 4);
    let r = agentq(&app, &["agents", "p", "--json"]).await;
    ok(&r);
    assert_eq!(r.json()[0]["agentName"], "a");
    let r = agentq(&app, &["cleanup", "p", "--json"]).await;
    ok(&r);
    assert_eq!(r.json()["reclaimedTasks"], 0, "the lease has not expired");
    let r = agentq(
        &app,
        &["task", "cancel", &id, "--reason", "enough", "--json"],
    )
    .await;
    ok(&r);
    assert_eq!(r.json()["status"], "cancelled");
    let r = agentq(&app, &["task", "retry", &id, "--json"]).await;
    ok(&r);
    assert_eq!(r.json()["status"], "queued");
    let r = agentq(
        &app,
        &["task", "cancel-many", "p", "--status", "queued", "--json"],
    )
    .await;
    ok(&r);
    assert_eq!(r.json()["changed"], 1);
    let r = agentq(&app, &["task", "retry-many", "p", "--id", &id, "--json"]).await;
    ok(&r);
    assert_eq!(r.json()["changed"], 1);
    let r = agentq(&app, &["task", "delete", &id]).await;
    ok(&r);
    let r = agentq(&app, &["task", "show", &id]).await;
    assert_eq!(r.code, 3, "gone");
    let r = agentq(&app, &["health", "--json"]).await;
    ok(&r);
    assert_eq!(r.json()["status"], "healthy");
    let r = agentq(&app, &["status", "--json"]).await;
    ok(&r);
    assert_eq!(r.json()[0]["project"], "p");
    let r = agentq(&app, &["project", "stats", "p", "--json"]).await;
    ok(&r);
    assert_eq!(r.json()["project"]["stats"]["totalTasks"], 0);

    let r = agentq(&app, &["key", "create", "k", "--role", "viewer", "--json"]).await;
    ok(&r);
    let key_id = r.json()["id"].as_str().unwrap().to_string();
    let r = agentq(&app, &["key", "list", "--json"]).await;
    assert!(r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == key_id.as_str()));
    let r = agentq(&app, &["key", "delete", &key_id]).await;
    ok(&r);
    let r = agentq(&app, &["type", "delete", "p", "t"]).await;
    ok(&r);
    let r = agentq(&app, &["project", "delete", "p"]).await;
    ok(&r);
    let r = agentq(&app, &["project", "show", "p"]).await;
    assert_eq!(r.code, 3);
}

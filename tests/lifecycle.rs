//! Storage lifecycle: retention by status on a timer, a project's override, delete by filter,
//! and the ENDED index a schema-5 file gains at start-up.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentq::retention::Defaults;
use agentq::time::ManualClock;
use common::*;
use serde_json::{json, Value};

const MIN: i64 = 60_000;

/// A server on a manual clock whose retention runs every 20 ms: completed and cancelled
/// tasks kept an hour, failed ones two.
async fn pruning_app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    start_with_key(dir, Some(clock), None, |c| {
        c.retention = Defaults {
            completed: 3600,
            failed: 7200,
            cancelled: 3600,
        };
        c.prune_interval = Duration::from_millis(20);
    })
    .await
}

/// One task of each final status in `project`, ended now; their ids.
async fn finish_three(app: &TestApp, project: &str) -> [String; 3] {
    let ids = app
        .bulk(
            project,
            &[
                json!({"instructions": "done"}),
                json!({"instructions": "broken"}),
                json!({"instructions": "dropped"}),
            ],
        )
        .await;
    let t = app.next("a", json!({"projectId": project})).await;
    let r = app
        .post(
            &format!("/api/tasks/{}/complete", t["id"].as_str().unwrap()),
            json!({"agentName": "a", "leaseToken": t["leaseToken"], "result": "ok"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let t = app.next("a", json!({"projectId": project})).await;
    let r = app
        .post(
            &format!("/api/tasks/{}/fail", t["id"].as_str().unwrap()),
            json!({"agentName": "a", "leaseToken": t["leaseToken"], "error": "no", "canRetry": false}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = app
        .post(&format!("/api/tasks/{}/cancel", ids[2]), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    [ids[0].clone(), ids[1].clone(), ids[2].clone()]
}

async fn exists(app: &TestApp, id: &str) -> bool {
    app.get(&format!("/api/tasks/{id}")).await.status == 200
}

/// Lets a few retention passes run.
async fn passes() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn each_status_is_pruned_at_its_age_and_not_before() {
    let app = pruning_app().await;
    let p = app.project("p").await;
    let [done, failed, cancelled] = finish_three(&app, &p).await;
    let queued = app.task(&p, json!({"instructions": "waits"})).await;

    app.advance(59 * MIN).await;
    passes().await;
    for id in [&done, &failed, &cancelled, &queued] {
        assert!(exists(&app, id).await, "{id} kept before its age");
    }

    app.advance(2 * MIN).await;
    let gone = eventually(
        Duration::from_secs(10),
        || async { (exists(&app, &done).await, exists(&app, &cancelled).await) },
        |seen| *seen == (false, false),
    )
    .await;
    assert_eq!(
        gone,
        (false, false),
        "completed and cancelled pruned after an hour"
    );
    assert!(exists(&app, &failed).await, "failed kept two hours");
    assert!(exists(&app, &queued).await, "a queued task is never pruned");
    let attempts = app.get(&format!("/api/tasks/{done}/attempts")).await;
    assert_eq!(attempts.status, 404, "its attempts went with it");

    app.advance(60 * MIN).await;
    let failed_gone = eventually(
        Duration::from_secs(10),
        || async { exists(&app, &failed).await },
        |seen| !seen,
    )
    .await;
    assert!(!failed_gone, "failed pruned after two hours");

    // The counters and the listing agree with what is left.
    let stats = app.get(&format!("/api/projects/{p}/stats")).await;
    let s = &stats.data()["project"]["stats"];
    assert_eq!(
        (s["totalTasks"].clone(), s["queuedTasks"].clone()),
        (json!(1), json!(1))
    );
    for k in ["completedTasks", "failedTasks", "cancelledTasks"] {
        assert_eq!(s[k], 0, "{k}");
    }
    let listed = app.get(&format!("/api/projects/{p}/tasks")).await;
    assert_eq!(ids(&listed.body["data"]), vec![queued.clone()]);
    // The last hour's activity still counts what ended in it (events, not rows).
    assert_eq!(
        stats.data()["recentActivity"]["tasksCompletedLastHour"],
        0,
        "the completion is over two hours old by now"
    );
    // Counted right after each chunk's commit: a moment after the rows are gone.
    let lines: Vec<String> = ["completed", "failed", "cancelled"]
        .iter()
        .map(|s| format!("agentq_tasks_pruned_total{{project=\"{p}\",status=\"{s}\"}} 1"))
        .collect();
    let metrics = eventually(
        Duration::from_secs(10),
        || app.metrics_text(),
        |m| lines.iter().all(|l| m.contains(l)),
    )
    .await;
    for line in &lines {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_project_overrides_the_server_per_status() {
    let app = pruning_app().await;
    let keep = app.project("keep").await;
    let quick = app.project("quick").await;
    let r = app
        .put(
            &format!("/api/projects/{keep}"),
            json!({"config": {"retention": {"completedSeconds": 0, "cancelledSeconds": 0}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.data()["config"]["retention"],
        json!({"completedSeconds": 0, "failedSeconds": null, "cancelledSeconds": 0})
    );
    let r = app
        .put(
            &format!("/api/projects/{quick}"),
            json!({"config": {"retention": {"failedSeconds": 60}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let [k_done, k_failed, k_cancelled] = finish_three(&app, &keep).await;
    let [q_done, q_failed, _] = finish_three(&app, &quick).await;

    app.advance(2 * MIN).await;
    let q = eventually(
        Duration::from_secs(10),
        || async { exists(&app, &q_failed).await },
        |seen| !seen,
    )
    .await;
    assert!(!q, "quick's failed tasks go after a minute");
    assert!(
        exists(&app, &q_done).await,
        "its completed ones keep the server's hour"
    );

    app.advance(3 * 60 * MIN).await;
    let gone = eventually(
        Duration::from_secs(10),
        || async { (exists(&app, &k_failed).await, exists(&app, &q_done).await) },
        |seen| *seen == (false, false),
    )
    .await;
    assert_eq!(
        gone,
        (false, false),
        "keep's failed tasks follow the server's two hours, quick's completed its hour"
    );
    assert!(
        exists(&app, &k_done).await && exists(&app, &k_cancelled).await,
        "0 = forever"
    );

    for bad in [
        json!({"config": {"retention": {"completedSeconds": -1}}}),
        json!({"config": {"retention": {"completedSeconds": 315_360_001}}}),
        json!({"config": {"retention": {"doneSeconds": 5}}}),
    ] {
        let r = app.put(&format!("/api/projects/{keep}"), bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
    }
    assert_eq!(
        app.get(&format!("/api/projects/{keep}")).await.data()["config"]["retention"]
            ["completedSeconds"],
        0,
        "a refused update changed nothing"
    );
}

#[tokio::test]
async fn delete_by_filter_removes_only_what_matches() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    app.task_type(&p, json!({"name": "t"})).await;
    let [done, failed, cancelled] = finish_three(&app, &p).await;
    app.advance(10 * MIN).await;
    let cutoff = agentq::time::format(1_767_225_600_000 + 5 * MIN);
    let typed = app
        .bulk(
            &p,
            &[
                json!({"typeId": "t", "instructions": "a", "batchId": "b1"}),
                json!({"typeId": "t", "instructions": "b", "batchId": "b2"}),
            ],
        )
        .await;
    let later = app.task(&p, json!({"instructions": "later"})).await;
    let r = app
        .post(&format!("/api/tasks/{later}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 200);

    let purge = |q: String| {
        let (app, p) = (&app, p.clone());
        async move { app.delete(&format!("/api/projects/{p}/tasks?{q}")).await }
    };
    // Ended before the cutoff: the three finished first, not the one cancelled later.
    let r = purge(format!("endedBefore={cutoff}&status=completed,cancelled")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.data()["deletedTasks"], 2);
    assert!(!exists(&app, &done).await && !exists(&app, &cancelled).await);
    assert!(exists(&app, &failed).await && exists(&app, &later).await);

    // Without a status: finished tasks only; the queued ones stay.
    let r = purge(String::new()).await;
    assert_eq!(
        r.data()["deletedTasks"],
        2,
        "the failed and the later cancelled"
    );
    for id in &typed {
        assert!(
            exists(&app, id).await,
            "queued tasks need an explicit status"
        );
    }
    // Queued ones by type and batch, when named.
    let r = purge("status=queued&typeId=t&batchId=b1".into()).await;
    assert_eq!(r.data()["deletedTasks"], 1);
    assert!(!exists(&app, &typed[0]).await && exists(&app, &typed[1]).await);
    let stats = app.get(&format!("/api/projects/{p}/stats")).await;
    let s = &stats.data()["project"]["stats"];
    assert_eq!(
        (s["totalTasks"].clone(), s["queuedTasks"].clone()),
        (json!(1), json!(1))
    );

    // Refusals change nothing.
    for (q, status) in [
        ("status=done", 400),
        ("endedBefore=yesterday", 400),
        ("typeId=nope", 404),
    ] {
        let r = purge(q.into()).await;
        assert_eq!(r.status, status, "{q}: {:?}", r.body);
    }
    let (_, viewer) = app.key("viewer", None).await;
    let r = app
        .call_with(
            &client_with_key(&viewer),
            "DELETE",
            &format!("/api/projects/{p}/tasks?status=queued"),
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    assert!(exists(&app, &typed[1]).await);
}

#[tokio::test]
async fn a_schema_5_file_gains_retention_and_its_end_index() {
    use agentq::store::tables::META;

    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    let tune = |c: &mut agentq::Config| {
        c.retention = Defaults {
            completed: 3600,
            failed: 3600,
            cancelled: 3600,
        };
        c.prune_interval = Duration::from_millis(20);
    };
    let app = start_with_key(dir, Some(clock.clone()), None, tune).await;
    let p = app.project("p").await;
    let [done, failed, cancelled] = finish_three(&app, &p).await;
    let before: Value = app.get(&format!("/api/projects/{p}/tasks")).await.body;
    let app = app
        .restart_tuned(
            |file| {
                let db = redb::Database::create(file).unwrap();
                let txn = db.begin_write().unwrap();
                schema_5_rows(&txn);
                txn.open_table(META)
                    .unwrap()
                    .insert("schema_version", 5)
                    .unwrap();
                txn.commit().unwrap();
            },
            tune,
        )
        .await;
    assert_eq!(
        app.get(&format!("/api/projects/{p}/tasks")).await.body,
        before,
        "the tasks as they were"
    );
    let r = app.get(&format!("/api/projects/{p}")).await;
    assert_eq!(
        r.data()["config"]["retention"],
        json!({"completedSeconds": null, "failedSeconds": null, "cancelledSeconds": null})
    );
    // The finished tasks were indexed by their end: retention finds them.
    app.advance(61 * MIN).await;
    let left = eventually(
        Duration::from_secs(10),
        || async {
            let mut n = 0;
            for id in [&done, &failed, &cancelled] {
                n += exists(&app, id).await as u32;
            }
            n
        },
        |n| *n == 0,
    )
    .await;
    assert_eq!(left, 0);
}

/// `agentq check` and `agentq compact` on a file the server has let go of: a clean file passes,
/// a missing index entry or a counter off by one fails with the task or project named, and
/// compaction shrinks a file whose tasks were deleted, leaving it whole.
#[tokio::test]
async fn check_and_compact_work_offline() {
    use agentq::store::tables::{ix, INDEX, TASKS};
    use redb::ReadableTable;
    use std::process::Command;

    let app = spawn_app().await;
    let p = app.project("p").await;
    let tasks: Vec<Value> = (0..3000)
        .map(|i| json!({"instructions": format!("task {i} {}", "x".repeat(500))}))
        .collect();
    for chunk in tasks.chunks(1000) {
        app.bulk(&p, chunk).await;
    }
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks/cancel"),
            json!({"filter": {"status": "queued"}}),
        )
        .await;
    assert_eq!(r.data()["changed"], 3000);
    let kept = app.task(&p, json!({"instructions": "kept"})).await;
    let r = app
        .delete(&format!("/api/projects/{p}/tasks?status=cancelled"))
        .await;
    assert_eq!(r.data()["deletedTasks"], 3000);
    let file = app.dir.path().join("agentq.redb");
    let run = |verb: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentq"))
            .args([verb, "--db"])
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, _, err) = run("check");
    assert_eq!(code, Some(1), "the server holds the file: {err}");
    assert!(err.contains("stop it first"), "{err}");

    let mut app = app;
    app.server.take().unwrap().stop().await;

    let (code, out, err) = run("check");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 tasks") && out.contains("ok:"), "{out}");

    let (code, out, err) = run("compact");
    assert_eq!(code, Some(0), "{out}{err}");
    let sizes: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(sizes.len() == 2 && sizes[1] < sizes[0], "{out}");
    let (code, out, _) = run("check");
    assert_eq!(code, Some(0), "still whole after compaction: {out}");

    // Damage: the queued task's BY_PROJECT entry goes.
    {
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let tasks = txn.open_table(TASKS).unwrap();
            let seq = tasks.iter().unwrap().next().unwrap().unwrap().0.value();
            let mut index = txn.open_table(INDEX).unwrap();
            let prefix = [ix::BY_PROJECT];
            let key: Vec<u8> = index
                .range(&prefix[..]..)
                .unwrap()
                .map(|r| r.unwrap().0.value().to_vec())
                .find(|k| ix::seq_of(k) == seq)
                .unwrap();
            index.remove(key.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let (code, out, _) = run("check");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "task {kept}: its index entry of kind 1 is missing"
        )),
        "{out}"
    );
    assert!(out.contains("FAILED"), "{out}");
}

/// An online backup taken while agents work: the copy passes `agentq check`, and a server
/// started on it has every completion acknowledged before the backup began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_is_a_consistent_database() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let app = spawn_app().await;
    let p = app.project("p").await;
    let tasks: Vec<Value> = (0..2000)
        .map(|i| json!({"instructions": format!("t{i}")}))
        .collect();
    for chunk in tasks.chunks(1000) {
        app.bulk(&p, chunk).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut agents = Vec::new();
    for i in 0..4 {
        let (client, base, p) = (app.client.clone(), app.base.clone(), p.clone());
        let (stop, done) = (stop.clone(), done.clone());
        agents.push(tokio::spawn(async move {
            let name = format!("agent-{i}");
            while !stop.load(Ordering::Relaxed) {
                let (_, r) = post_json(
                    &client,
                    format!("{base}/api/agents/{name}/next-task"),
                    &json!({"projectId": p}),
                )
                .await;
                let Some(t) = r["data"]["task"].as_object() else {
                    break;
                };
                let id = t["id"].as_str().unwrap().to_string();
                let (status, _) = post_json(
                    &client,
                    format!("{base}/api/tasks/{id}/complete"),
                    &json!({"agentName": name, "leaseToken": t["leaseToken"], "result": "ok"}),
                )
                .await;
                assert_eq!(status, 200);
                done.lock().unwrap().push(id);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acknowledged: Vec<String> = done.lock().unwrap().clone();
    assert!(!acknowledged.is_empty(), "the agents are at work");
    let r = app
        .client
        .get(format!("{}/api/admin/backup", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let announced: u64 = r.headers()["x-backup-bytes"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment; filename=\"agentq-backup-"));
    let bytes = r.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, announced);
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        a.await.unwrap();
    }
    // Nothing of the copy is left beside the database.
    let leftovers: Vec<_> = std::fs::read_dir(app.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".backup-"))
        .collect();
    assert!(leftovers.is_empty());

    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("agentq.redb");
    std::fs::write(&copy, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentq"))
        .args(["check", "--db"])
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("2000 tasks"), "{text}");

    let restored = start_with_key(copy_dir, None, Some(app.admin_key.clone()), |_| {}).await;
    for id in &acknowledged {
        let t = restored.get(&format!("/api/tasks/{id}")).await;
        assert_eq!(t.data()["status"], "completed", "{id}");
    }
    let total =
        restored.get(&format!("/api/projects/{p}")).await.data()["stats"]["totalTasks"].clone();
    assert_eq!(total, 2000);

    // The CLI's `agentq backup FILE` writes the same kind of copy.
    let saved = restored.dir.path().join("cli-backup.redb");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentq"))
        .arg("backup")
        .arg(&saved)
        .env("AGENTQ_URL", &app.base)
        .env("AGENTQ_KEY", &app.admin_key)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentq"))
        .args(["check", "--db"])
        .arg(&saved)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Only an admin key that reaches every project may take one.
    let (_, scoped) = app.key("admin", Some(vec![&p])).await;
    let (_, producer) = app.key("producer", None).await;
    for key in [scoped, producer] {
        let r = app
            .call_with(&client_with_key(&key), "GET", "/api/admin/backup", None)
            .await;
        assert_eq!(r.status, 403, "{:?}", r.body);
    }
}

/// A full disk under the file (growing it fails with ENOSPC, the `Faulty` backend's
/// `no_growth`): once writes are refused, deleting finished tasks makes room that new tasks
/// use, without a restart.
#[tokio::test]
async fn deleting_tasks_on_a_full_disk_makes_room_for_new_ones() {
    use std::sync::atomic::Ordering;

    let faults = agentq::store::disk::Faults::default();
    let no_growth = faults.no_growth.clone();
    let opener = agentq::store::disk::faulty_opener(faults);
    let app = start_with_key(tempfile::tempdir().unwrap(), None, None, |c| {
        c.opener = opener;
        c.retention = Defaults {
            completed: 0,
            failed: 0,
            cancelled: 0,
        };
    })
    .await;
    let p = app.project("p").await;
    let body = |i: usize| json!({"instructions": format!("task {i} {}", "x".repeat(400))});
    let tasks: Vec<Value> = (0..4000).map(body).collect();
    for chunk in tasks.chunks(1000) {
        app.bulk(&p, chunk).await;
    }
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks/cancel"),
            json!({"filter": {"status": "queued"}}),
        )
        .await;
    assert_eq!(r.data()["changed"], 4000);

    // The disk is full: create tasks, 100 and then one at a time, until the file cannot grow.
    no_growth.store(true, Ordering::SeqCst);
    let path = format!("/api/projects/{p}/tasks");
    let mut made = bulks_until_refused(&app, &p, 300_000, usize::MAX).await;
    loop {
        let r = app.call("POST", &path, Some(body(100_000 + made))).await;
        if r.status == 503 {
            break;
        }
        assert_eq!(r.status, 201, "{:?}", r.body);
        made += 1;
        assert!(made < 100_000, "the file never filled");
    }
    health_is(&app, 503).await;

    // Delete the cancelled tasks: the delete itself must fit, and frees their pages.
    let purge = format!("/api/projects/{p}/tasks?status=cancelled");
    let r = eventually(
        Duration::from_secs(20),
        || app.delete(&purge),
        |r| r.status == 200,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.data()["deletedTasks"], 4000);

    // New tasks take the freed room, the disk still full.
    let after = bulks_until_refused(&app, &p, 200_000, 30).await;
    assert!(
        after >= 2000,
        "deleting 4,000 tasks made room for only {after} new ones"
    );
    health_is(&app, 200).await;
}

/// Creates tasks of ~400 bytes, 100 a request, numbered from `from`, until a request is
/// refused or `rounds` are done; answers how many were created.
async fn bulks_until_refused(app: &TestApp, project: &str, from: usize, rounds: usize) -> usize {
    let mut made = 0;
    for _ in 0..rounds {
        let chunk: Vec<Value> = (0..100)
            .map(|i| json!({"instructions": format!("task {} {}", from + made + i, "x".repeat(400))}))
            .collect();
        let r = app
            .call(
                "POST",
                &format!("/api/projects/{project}/tasks/bulk"),
                Some(json!({"tasks": chunk})),
            )
            .await;
        if r.status != 201 {
            break;
        }
        made += 100;
    }
    made
}

async fn health_is(app: &TestApp, status: u16) {
    let seen = eventually(
        Duration::from_secs(10),
        || app.get("/health"),
        |r| r.status == status,
    )
    .await;
    assert_eq!(seen.status, status, "{:?}", seen.body);
}

//! Durability and the real binary: restarts keep everything; SIGKILL loses no acknowledged
//! write; one server per file; SIGTERM; the open-file limit.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::*;
use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn tasks_leases_and_attempts_survive_a_restart() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let ty = app
        .task_type(&p, json!({"name": "t", "maxRetries": 2}))
        .await;
    let running = app
        .task(
            &p,
            json!({"typeId": ty, "instructions": "a", "priority": 9}),
        )
        .await;
    let failed_once = app
        .task(
            &p,
            json!({"typeId": ty, "instructions": "b", "priority": 8}),
        )
        .await;
    let queued = app
        .task(&p, json!({"typeId": ty, "instructions": "c"}))
        .await;
    let lease = app.next("a", json!({"projectId": p})).await;
    assert_eq!(lease["id"], running.as_str());
    app.next("b", json!({"projectId": p})).await;
    app.fail(&failed_once, "b", "x").await;
    let before = app.stats(&p).await;

    let app = app.restart().await;
    assert_eq!(app.stats(&p).await, before);
    let t = app.get(&format!("/api/tasks/{running}")).await;
    assert_eq!(t.data()["status"], "running");
    assert_eq!(t.data()["leaseExpiresAt"], lease["leaseExpiresAt"]);
    // Resume after restart returns the same lease.
    let resumed = app.next("a", json!({"projectId": p})).await;
    assert_eq!(resumed["leaseToken"], lease["leaseToken"]);
    let t = app.get(&format!("/api/tasks/{failed_once}")).await;
    assert_eq!(t.data()["attempts"][0]["outcome"], "failed");
    assert_eq!(t.data()["retryCount"], 1);
    // FIFO and priority order survive too.
    assert_eq!(
        app.next("c", json!({"projectId": p})).await["id"],
        failed_once.as_str()
    );
    assert_eq!(
        app.next("d", json!({"projectId": p})).await["id"],
        queued.as_str()
    );
    // New tasks do not collide with old ones.
    let fresh = app.task(&p, json!({"instructions": "d"})).await;
    assert_eq!(
        app.get(&format!("/api/tasks/{fresh}")).await.data()["instructions"],
        "d"
    );
}

async fn active_agents(app: &TestApp, p: &str) -> Value {
    let s = app.get(&format!("/api/projects/{p}/stats")).await;
    let agents = app.get(&format!("/api/projects/{p}/agents")).await;
    let n = s.data()["activeAgents"].clone();
    assert_eq!(
        n,
        agents.data().as_array().unwrap().len(),
        "stats and agents agree"
    );
    n
}

/// Leases live in the writer's memory and are loaded again at start-up: after a restart the
/// reaper still reclaims an expired lease, and not before it expires.
#[tokio::test]
async fn a_lease_taken_before_a_restart_expires_after_it() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (_, id) = app.minute_task(&p).await;
    app.next("a", json!({"projectId": p})).await;
    let app = app.restart().await;
    assert_eq!(active_agents(&app, &p).await, 1);
    app.advance(59_999).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "running");
    app.advance(1).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    assert_eq!(t.data()["attempts"][0]["outcome"], "timeout");
    assert_eq!(active_agents(&app, &p).await, 0);
}

/// A file written by schema 1 (leases in LEASES and AGENT index entries) is migrated at
/// start-up: the held task, its expiry and the listing of leases all carry over.
#[tokio::test]
async fn a_schema_1_file_is_migrated_with_its_leases() {
    use agentq::store::tables::{ix, INDEX, META};
    use redb::{ReadableDatabase, ReadableTable};

    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (ty, id) = app.minute_task(&p).await;
    app.task(&p, json!({"typeId": ty, "instructions": "y"}))
        .await;
    let untyped = app.task(&p, json!({"instructions": "u"})).await;
    let lease = app.next("agent-a", json!({"projectId": p})).await;
    let app = app
        .restart_after(|file| {
            // Rewrite the running task's entries the way schema 1 kept them.
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut index = txn.open_table(INDEX).unwrap();
                let running: Vec<(Vec<u8>, Vec<u8>)> = index
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap())
                    .filter(|(k, v)| k.value()[0] == ix::BY_STATUS && !v.value().is_empty())
                    .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                    .collect();
                assert_eq!(running.len(), 1, "one lease is held");
                let (key, value) = &running[0];
                let (expires, agent) = ix::parse_lease_value(value).unwrap();
                let (expires, agent) = (expires, agent.to_string());
                let seq = ix::seq_of(key);
                let project = u128::from_be_bytes(key[1..17].try_into().unwrap());
                index.insert(key.as_slice(), &[][..]).unwrap();
                let lease_key = ix::K::new(ix::LEASES).i64(expires).u64(seq);
                index.insert(lease_key.as_slice(), &[][..]).unwrap();
                let mut agent_key = ix::K::new(ix::AGENT).u128(project).to_vec();
                agent_key.extend_from_slice(agent.as_bytes());
                index
                    .insert(agent_key.as_slice(), &seq.to_be_bytes()[..])
                    .unwrap();
                // Schema 1 also filed untyped ready tasks under type 0 in READY_TYPE.
                let ready: Vec<Vec<u8>> = index
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap().0.value().to_vec())
                    .filter(|k| k[0] == ix::READY)
                    .collect();
                let tasks = txn.open_table(agentq::store::tables::TASKS).unwrap();
                let mut untyped_entries = 0;
                for k in ready {
                    let seq = ix::seq_of(&k);
                    let row = tasks.get(seq).unwrap().unwrap();
                    let task: agentq::model::Task =
                        agentq::store::tables::decode(row.value()).unwrap();
                    if task.type_id.is_none() {
                        let v1 = ix::K::new(ix::READY_TYPE)
                            .u128(task.project_id)
                            .u128(0)
                            .u8(k[17])
                            .u64(seq);
                        index.insert(v1.as_slice(), &[][..]).unwrap();
                        untyped_entries += 1;
                    }
                }
                assert_eq!(untyped_entries, 1);
                txn.open_table(META)
                    .unwrap()
                    .insert("schema_version", 1)
                    .unwrap();
            }
            inline_bodies(&txn);
            txn.commit().unwrap();
        })
        .await;
    // The same agent resumes its lease; another agent gets the other task.
    let resumed = app.next("agent-a", json!({"projectId": p})).await;
    assert_eq!(resumed["id"], id.as_str());
    assert_eq!(resumed["leaseToken"], lease["leaseToken"]);
    assert_ne!(
        app.next("agent-b", json!({"projectId": p})).await["id"],
        id.as_str()
    );
    assert_eq!(active_agents(&app, &p).await, 2);
    // The untyped task's old type-0 entry is gone: `typeIds` never match an untyped task.
    let nil = "00000000-0000-0000-0000-000000000000";
    let none = app
        .next("agent-n", json!({"projectId": p, "typeIds": [nil]}))
        .await;
    assert_eq!(none, Value::Null);
    // The lease still expires on time.
    app.advance(60_000).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    assert_eq!(active_agents(&app, &p).await, 0);
    app.next("agent-c", json!({"projectId": p})).await;
    // No schema 1 entries are left, and the file says the current schema.
    let app = app
        .restart_after(|file| {
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_read().unwrap();
            let index = txn.open_table(INDEX).unwrap();
            for r in index.iter().unwrap() {
                let key = r.unwrap().0.value().to_vec();
                let kind = key[0];
                assert!(kind != ix::LEASES && kind != ix::AGENT, "kind {kind} left");
                assert!(
                    kind != ix::READY_TYPE || key[17..33] != [0u8; 16],
                    "an untyped task left in READY_TYPE"
                );
            }
            let v = txn.open_table(META).unwrap().get("schema_version").unwrap();
            assert_eq!(
                v.map(|v| v.value()),
                Some(agentq::store::tables::SCHEMA_VERSION)
            );
        })
        .await;
    assert_eq!(active_agents(&app, &p).await, 1);
    // The untyped task is still handed out to a claim without `typeIds`.
    let mut got = Vec::new();
    for agent in ["agent-d", "agent-e"] {
        got.push(app.next(agent, json!({"projectId": p})).await["id"].clone());
    }
    assert!(got.contains(&json!(untyped)), "{got:?}");
}

/// A schema 2 file (no BATCH index entries) is migrated at start-up: listing by `batchId`
/// finds the batch's tasks created before the upgrade.
#[tokio::test]
async fn a_schema_2_file_gets_its_batch_index() {
    use agentq::store::tables::{ix, INDEX, META};
    use redb::ReadableTable;

    let app = spawn_app().await;
    let p = app.project("p").await;
    let bulk = |batch: Option<&str>, n: usize| {
        let mut body = json!({"tasks": (0..n).map(|i| json!({"instructions": format!("t{i}")}))
            .collect::<Vec<_>>()});
        if let Some(b) = batch {
            body["batchId"] = json!(b);
        }
        body
    };
    let url = format!("/api/projects/{p}/tasks/bulk");
    assert_eq!(app.post(&url, bulk(Some("b-1"), 3)).await.status, 201);
    assert_eq!(app.post(&url, bulk(Some("b-2"), 2)).await.status, 201);
    assert_eq!(app.post(&url, bulk(None, 4)).await.status, 201);
    let held = app.next("a", json!({"projectId": p})).await;
    let app = app
        .restart_after(|file| {
            // Make it the file schema 2 wrote: no BATCH entries.
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut index = txn.open_table(INDEX).unwrap();
                let batch: Vec<Vec<u8>> = index
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap().0.value().to_vec())
                    .filter(|k| k[0] == ix::BATCH)
                    .collect();
                assert_eq!(batch.len(), 5, "one entry per batched task");
                for k in batch {
                    index.remove(k.as_slice()).unwrap();
                }
                txn.open_table(META)
                    .unwrap()
                    .insert("schema_version", 2)
                    .unwrap();
            }
            inline_bodies(&txn);
            txn.commit().unwrap();
        })
        .await;
    let list = |q: &str| format!("/api/projects/{p}/tasks?{q}");
    let r = app.get(&list("batchId=b-1&order=asc")).await;
    assert_eq!(r.body["pagination"]["total"], 3);
    let names: Vec<&str> = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["instructions"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t0", "t1", "t2"]);
    assert_eq!(
        app.get(&list("batchId=b-2")).await.body["pagination"]["total"],
        2
    );
    // The batch's first task is the one held: by status too.
    let r = app.get(&list("batchId=b-1&status=running")).await;
    assert_eq!(ids(r.data()), [held["id"].as_str().unwrap()]);
    assert_eq!(
        app.get(&list("batchId=b-1&status=queued")).await.body["pagination"]["total"],
        2
    );
    assert_eq!(
        app.get(&list("batchId=none")).await.body["pagination"]["total"],
        0
    );
}

/// A schema 3 file (each task's body inside its row) is migrated at start-up: every task
/// reads as it did, bodies and all, and a held lease can still be completed.
#[tokio::test]
async fn a_schema_3_file_moves_task_bodies_out_of_the_rows() {
    use agentq::store::tables::{decode, META, TASKS, TASK_BODIES};
    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

    let app = spawn_app().await;
    let p = app.project("p").await;
    let ty = app
        .task_type(
            &p,
            json!({"name": "sum", "template": "Summarize {{url}} in {{n}} words",
                   "variables": ["url", "n"]}),
        )
        .await;
    let url = format!("/api/projects/{p}/tasks/bulk");
    let tasks: Vec<Value> = (0..5)
        .map(|i| json!({"typeId": ty, "variables": {"url": format!("u{i}"), "n": "9"}}))
        .chain([json!({"instructions": "é".repeat(3000)})])
        .collect();
    let r = app
        .post(&url, json!({"tasks": tasks, "batchId": "b"}))
        .await;
    assert_eq!(r.status, 201);
    let held = app.next("a", json!({"projectId": p})).await;
    let done = app.next("b", json!({"projectId": p})).await;
    let r = app
        .post(
            &format!("/api/tasks/{}/complete", done["id"].as_str().unwrap()),
            json!({"agentName": "b", "leaseToken": done["leaseToken"], "result": "ok"}),
        )
        .await;
    assert_eq!(r.status, 200);
    let all = format!("/api/projects/{p}/tasks?order=asc&limit=100");
    let before = app.get(&all).await.data().clone();
    assert_eq!(before.as_array().unwrap().len(), 6);
    let app = app
        .restart_after(|file| {
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_write().unwrap();
            inline_bodies(&txn);
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 3)
                .unwrap();
            txn.commit().unwrap();
        })
        .await;
    assert_eq!(app.get(&all).await.data(), &before, "every task as it was");
    let r = app
        .post(
            &format!("/api/tasks/{}/complete", held["id"].as_str().unwrap()),
            json!({"agentName": "a", "leaseToken": held["leaseToken"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.data()["instructions"],
        held["instructions"],
        "the body stays with the task"
    );
    // The rows now leave the body out, and each task has its body apart.
    app.restart_after(|file| {
        let db = redb::Database::create(file).unwrap();
        let txn = db.begin_read().unwrap();
        let rows = txn.open_table(TASKS).unwrap();
        assert_eq!(txn.open_table(TASK_BODIES).unwrap().len().unwrap(), 6);
        for r in rows.iter().unwrap() {
            let t: agentq::model::Task = decode(r.unwrap().1.value()).unwrap();
            assert!(t.instructions.is_empty() && t.variables.is_empty());
        }
        let v = txn.open_table(META).unwrap().get("schema_version").unwrap();
        assert_eq!(
            v.map(|v| v.value()),
            Some(agentq::store::tables::SCHEMA_VERSION)
        );
    })
    .await;
}

/// A project delete cut short (the project marked, its tasks not yet all gone) is invisible
/// after a restart and is finished in the background; other projects are untouched.
#[tokio::test]
async fn a_project_delete_cut_short_is_finished_at_the_next_start() {
    use agentq::model::{Project, ProjectStatus};
    use agentq::store::tables::{decode, encode, PROJECTS, PROJECT_NAMES};
    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

    let app = spawn_app().await;
    let doomed = app.project("doomed").await;
    let other = app.project("other").await;
    let ty = app.task_type(&doomed, json!({"name": "t"})).await;
    let n = agentq::store::write::DELETE_CHUNK + 300;
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"instructions": format!("t{i}"), "typeId": ty}))
        .collect();
    let ids = app.bulk(&doomed, &tasks).await;
    app.next("x", json!({"projectId": doomed})).await;
    let kept = app.task(&other, json!({"instructions": "keep"})).await;
    let id = uuid::Uuid::parse_str(&doomed).unwrap().as_u128();
    let app = app
        .restart_after(|file| {
            // The state the first write of a delete leaves: the project marked, its name free.
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut projects = txn.open_table(PROJECTS).unwrap();
                let mut p: Project = decode(projects.get(id).unwrap().unwrap().value()).unwrap();
                p.status = ProjectStatus::Deleting;
                projects.insert(id, encode(&p).unwrap().as_slice()).unwrap();
                let mut names = txn.open_table(PROJECT_NAMES).unwrap();
                names.remove("doomed").unwrap();
            }
            txn.commit().unwrap();
        })
        .await;
    // Invisible at once, whether or not the background delete has ended.
    assert_eq!(
        app.get(&format!("/api/projects/{doomed}")).await.status,
        404
    );
    let listed = app.get("/api/projects?status=all").await;
    let names: Vec<&str> = listed
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other"]);
    let r = app
        .post("/api/agents/y/next-task", json!({"projectId": doomed}))
        .await;
    assert_eq!(r.status, 404);
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains(&doomed),
        "a deleted project has no series"
    );
    // The name is free for a new project.
    let again = app.project("doomed").await;
    assert_ne!(again, doomed);
    // The type goes in the delete's last write; by then every task has gone too, the first
    // chunk's and the last one's alike.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.get(&format!("/api/task-types/{ty}")).await.status != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the delete did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in [&ids[0], &ids[n - 1]] {
        assert_eq!(app.get(&format!("/api/tasks/{t}")).await.status, 404);
    }
    assert_eq!(app.get(&format!("/api/tasks/{kept}")).await.status, 200);
    assert_eq!(app.stats(&other).await["totalTasks"], 1);
    assert_eq!(app.stats(&again).await["totalTasks"], 0);
    // Nothing of it is left in the file.
    let app = app
        .restart_after(|file| {
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_read().unwrap();
            let projects = txn.open_table(PROJECTS).unwrap();
            assert!(projects.get(id).unwrap().is_none());
            let tasks = txn.open_table(agentq::store::tables::TASKS).unwrap();
            assert_eq!(tasks.len().unwrap(), 1, "only the other project's task");
        })
        .await;
    assert_eq!(app.stats(&other).await["totalTasks"], 1);
}

/// SIGKILL during a burst of completes: every complete that was answered 200 must be there
/// after a restart, and the counters must equal what the listing shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_complete() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.redb");
    let client = client_with_key(ADMIN_KEY);
    let (mut child, base) = start_binary(&db);
    wait_healthy(&client, &base).await;
    let post = |path: String, body: Value| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .post(format!("{base}{path}"))
                .json(&body)
                .send()
                .await
        }
    };
    let p: Value = post(
        "/api/projects".into(),
        json!({"name": "crash", "description": "d"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let p = p["data"]["id"].as_str().unwrap().to_string();
    let tasks: Vec<Value> = (0..1000)
        .map(|i| json!({"instructions": format!("{i}")}))
        .collect();
    post(
        format!("/api/projects/{p}/tasks/bulk"),
        json!({"tasks": tasks}),
    )
    .await
    .unwrap();

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    for n in 0..16 {
        let (client, base, p, acked, stop) = (
            client.clone(),
            base.clone(),
            p.clone(),
            acked.clone(),
            stop.clone(),
        );
        agents.push(tokio::spawn(async move {
            let agent = format!("a{n}");
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = client
                    .post(format!("{base}/api/agents/{agent}/next-task"))
                    .json(&json!({"projectId": p}))
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(v) = r.json::<Value>().await else {
                    return;
                };
                let Some(id) = v["data"]["task"]["id"].as_str() else {
                    return;
                };
                let Ok(r) = client
                    .post(format!("{base}/api/tasks/{id}/complete"))
                    .json(&json!({"agentName": agent, "result": "ok"}))
                    .send()
                    .await
                else {
                    return;
                };
                if r.status().as_u16() == 200 {
                    acked.lock().unwrap().push(id.to_string());
                }
            }
        }));
    }
    // Let the burst run, then kill without warning.
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        let _ = a.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200);

    let (mut child, base) = start_binary(&db);
    wait_healthy(&client, &base).await;
    for id in &acked {
        let v = get_json(&client, format!("{base}/api/tasks/{id}")).await;
        assert_eq!(
            v["data"]["status"], "completed",
            "acknowledged complete of {id} lost"
        );
    }
    let stats: Value = client
        .get(format!("{base}/api/projects/{p}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stats = &stats["data"]["stats"];
    assert_eq!(stats["totalTasks"], 1000);
    for status in ["queued", "running", "completed", "failed", "cancelled"] {
        let mut listed = 0u64;
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{base}/api/projects/{p}/tasks?status={status}&limit=1000");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            listed += v["data"].as_array().unwrap().len() as u64;
            match v["pagination"]["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(
            stats[format!("{status}Tasks")].as_u64().unwrap(),
            listed,
            "counter of {status} differs from the listing"
        );
    }
    assert!(stats["completedTasks"].as_u64().unwrap() >= acked.len() as u64);
    child.kill().unwrap();
    child.wait().unwrap();
    // The start after the kill said why it was not healthy at once.
    let log = read_all(child.stderr.take());
    assert!(
        log.contains("the database was not closed cleanly"),
        "no repair warning in:\n{log}"
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one.redb");
    let client = client_with_key(ADMIN_KEY);
    let (mut first, base) = start_binary(&db);
    wait_healthy(&client, &base).await;
    let (mut second, _) = start_binary(&db);
    let status = second.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    for line in BufReader::new(second.stderr.take().unwrap()).lines() {
        err.push_str(&line.unwrap());
    }
    assert!(err.contains("already in use"), "{err}");
    assert!(err.contains("one.redb"), "{err}");
    first.kill().unwrap();
    first.wait().unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_wakes_long_pollers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("term.redb");
    let client = client_with_key(ADMIN_KEY);
    let (mut child, base) = start_binary(&db);
    wait_healthy(&client, &base).await;
    let v: Value = client
        .post(format!("{base}/api/projects"))
        .json(&json!({"name": "t", "description": "d"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = v["data"]["id"].as_str().unwrap().to_string();
    let poll = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            client
                .post(format!("{base}/api/agents/w/next-task"))
                .json(&json!({"projectId": p, "waitSeconds": 60}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    send("TERM", &child);
    let answer = poll.await.unwrap();
    assert_eq!(answer["success"], false);
    assert_eq!(answer["data"]["task"], Value::Null);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The file is closed: a new server opens it, with no repair to do.
    opens_without_repair(&db, &client).await;
}

/// Closing the terminal a server runs in sends SIGHUP, whose default action ended the process
/// on the spot: the file was left unclosed, so the next start had to repair it. SIGHUP now
/// stops the server as SIGTERM does.
#[cfg(unix)]
#[tokio::test]
async fn sighup_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hup.redb");
    let client = client_with_key(ADMIN_KEY);
    let (mut child, base) = start_binary(&db);
    wait_healthy(&client, &base).await;
    send("HUP", &child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    opens_without_repair(&db, &client).await;
}

/// With `--log-format json` every line on stderr is a JSON object, which a collector can
/// parse; the first admin key, printed once as plain text, goes to stdout (it went to stderr,
/// in the middle of the JSON lines).
#[cfg(unix)]
#[tokio::test]
async fn json_logs_are_all_json_and_the_first_key_is_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Reaped(
        Command::new(agentq_bin())
            .args(["serve", "--log-format", "json", "--db"])
            .arg(dir.path().join("json.redb"))
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&reqwest::Client::new(), &base).await;
    send("TERM", &child);
    assert!(child.wait().unwrap().success());
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    assert!(out.contains("    aq_"), "no admin key on stdout: {out}");
    assert!(
        err.lines().count() >= 3,
        "start, stop and close lines: {err}"
    );
    for line in err.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
}

/// Starts a server on `db` after a stop and checks that it opened the file without a repair
/// (the stop had closed it).
async fn opens_without_repair(db: &std::path::Path, client: &reqwest::Client) {
    let (mut again, base) = start_binary(db);
    wait_healthy(client, &base).await;
    again.kill().unwrap();
    again.wait().unwrap();
    let log = read_all(again.stderr.take());
    assert!(!log.contains("not closed cleanly"), "{log}");
}

/// User and system CPU time of a process so far, in clock ticks (1/100 s on Linux).
#[cfg(target_os = "linux")]
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A fleet larger than the open-file limit: the connections past it wait in the backlog, the
/// server says why and does not spin (poem's accept loop would retry at once, using a core
/// for as long as it lasts), and it serves again as soon as descriptors are free.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn past_the_open_file_limit_the_server_waits_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut shell = Command::new("sh");
    // Soft and hard: the server cannot raise it.
    shell.args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\"", agentq_bin()]);
    let (mut cmd, base) = binary_command(shell, &dir.path().join("fd.redb"));
    let mut child = Reaped(cmd.env("RUST_LOG", "info").spawn().unwrap());
    let client = client_with_key(ADMIN_KEY);
    wait_healthy(&client, &base).await;
    let addr = base.trim_start_matches("http://").to_string();
    let fleet: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(child.id()) - before;
    // Spinning costs ~100 ticks a second; waiting, about none.
    assert!(
        spent < 50,
        "the server used {spent} ticks of CPU in 2 s while refused"
    );
    drop(fleet);
    // A new connection (the client above keeps the one it had).
    wait_healthy(&reqwest::Client::new(), &base).await;
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failed_accepts = metric_value(&metrics, "agentq_http_accept_errors_total");
    assert!(failed_accepts > 0.0, "{metrics}");
    send("TERM", &child);
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    child.wait().unwrap();
    assert!(log.contains("Too many open files"), "{log}");
    assert!(log.contains("accepting connections again"), "{log}");
}

/// An operator who lost every admin key adds one with the server stopped; while a server has
/// the file open, the command refuses and says so. The new key works at the next start.
#[tokio::test]
async fn add_admin_key_rescues_a_database_whose_keys_are_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.redb");
    let add = || {
        Command::new(agentq_bin())
            .args(["add-admin-key", "--db"])
            .arg(&db)
            .args(["--name", "rescue"])
            .output()
            .unwrap()
    };
    let missing = add();
    assert!(!missing.status.success(), "a missing file is refused");
    let (mut server, base) = start_binary(&db);
    wait_healthy(&client_with_key(ADMIN_KEY), &base).await;
    let busy = add();
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("already in use"), "{err}");
    send("TERM", &server);
    server.wait().unwrap();
    let added = add();
    assert!(added.status.success(), "{:?}", added);
    let key = String::from_utf8(added.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("aq_"), "{key}");
    let (_server, base) = start_binary(&db);
    let client = client_with_key(&key);
    wait_healthy(&client, &base).await;
    let keys: Value = client
        .get(format!("{base}/api/keys"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{keys}");
    assert!(names.contains(&"rescue"), "{keys}");
}

/// Polls `GET /health` until it answers `status`, for up to 10 s.
async fn health_becomes(app: &TestApp, status: u16) {
    for _ in 0..500 {
        if app.get("/health").await.status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/health never answered {status}");
}

/// The disk fills up, then a sync fails, under a running server: each refused write answers
/// 503 `UNAVAILABLE` with `Retry-After` and says whether it may have been applied, `/health`
/// says degraded until a write succeeds again, and the server recovers by itself each time.
/// (A full disk used to leave a server that refused every write as "shutting down" while
/// `/health` said healthy, until it was restarted.)
#[tokio::test]
async fn the_server_recovers_from_a_full_disk_and_a_failed_sync_by_itself() {
    let faults = agentq::store::disk::Faults::default();
    let (full, bad_sync) = (faults.full.clone(), faults.bad_sync.clone());
    let opener = agentq::store::disk::faulty_opener(faults);
    let app = start_with_key(tempfile::tempdir().unwrap(), None, None, |c| {
        c.opener = opener
    })
    .await;
    let p = app.project("disk").await;
    let path = format!("/api/projects/{p}/tasks");
    let create = || app.call("POST", &path, Some(json!({"instructions": "x"})));
    let says = |r: &Resp, text: &str| r.body["error"].as_str().is_some_and(|e| e.contains(text));
    assert_eq!(create().await.status, 201);

    full.store(true, Ordering::SeqCst);
    let r = create().await;
    assert_eq!((r.status, r.code()), (503, "UNAVAILABLE"), "{:?}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(says(&r, "not applied"), "{:?}", r.body);
    // Recorded before the 503 was sent: no window where /health still says healthy.
    let health = app.get("/health").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.data()["status"], "degraded");
    full.store(false, Ordering::SeqCst);
    health_becomes(&app, 200).await;
    assert_eq!(create().await.status, 201);
    assert_eq!(app.stats(&p).await["totalTasks"], 2);

    bad_sync.store(true, Ordering::SeqCst);
    let r = create().await;
    assert_eq!((r.status, r.code()), (503, "UNAVAILABLE"), "{:?}", r.body);
    assert!(says(&r, "may have been applied"), "{:?}", r.body);
    bad_sync.store(false, Ordering::SeqCst);
    health_becomes(&app, 200).await;
    assert_eq!(create().await.status, 201);
    let total = app.stats(&p).await["totalTasks"].as_u64().unwrap();
    assert!(total == 3 || total == 4, "{total}");
    let failures = app.metric("agentq_storage_failures_total").await;
    assert!(failures >= 2.0, "{failures}");
}

/// A schema 4 file (task types and keys without their last field, bodies without a script,
/// no executions table) is migrated at start-up: types, keys and tasks read as they did, the
/// keys still authenticate, and scripts and executions work on it.
#[tokio::test]
async fn a_schema_4_file_gains_scripts_and_executions() {
    use agentq::store::tables::META;

    let app = spawn_app().await;
    let p = app.project("p").await;
    app.task_type(&p, json!({"name": "t", "maxRetries": 2}))
        .await;
    let (_, producer) = app.key("producer", None).await;
    app.bulk(
        &p,
        &[json!({"typeId": "t", "variables": {"a": "1"}, "instructions": "x"})],
    )
    .await;
    let held = app.next("a", json!({"projectId": p})).await;
    let types = format!("/api/projects/{p}/task-types");
    let tasks = format!("/api/projects/{p}/tasks?limit=100");
    let keys = |mut body: Value| {
        // When a key was last used moves with every request.
        for k in body["data"].as_array_mut().unwrap() {
            k.as_object_mut().unwrap().remove("lastUsedAt");
        }
        body
    };
    let before = (
        app.get(&types).await.body,
        keys(app.get("/api/keys").await.body),
        app.get(&tasks).await.body,
    );
    let app = app
        .restart_after(|file| {
            let db = redb::Database::create(file).unwrap();
            let txn = db.begin_write().unwrap();
            schema_4_rows(&txn);
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 4)
                .unwrap();
            txn.commit().unwrap();
        })
        .await;
    let after = (
        app.get(&types).await.body,
        keys(app.get("/api/keys").await.body),
        app.get(&tasks).await.body,
    );
    assert_eq!(after, before, "types, keys and tasks as they were");
    let as_producer = client_with_key(&producer);
    let r = app.call_with(&as_producer, "GET", &types, None).await;
    assert_eq!(r.status, 200, "the producer key still works");
    let r = app
        .post(
            &format!("/api/tasks/{}/complete", held["id"].as_str().unwrap()),
            json!({"agentName": "a", "leaseToken": held["leaseToken"],
                   "execution": {"exitCode": 0, "stdoutTail": "hi", "durationMs": 5}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let attempts = app
        .get(&format!(
            "/api/tasks/{}/attempts",
            held["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(attempts.data()[0]["execution"]["stdoutTail"], "hi");
    let r = app
        .post(
            &types,
            json!({"name": "s", "script": {"type": "bash", "content": "true"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

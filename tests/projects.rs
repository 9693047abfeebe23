//! Projects: create, read, update, list, delete, stats.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn project_crud_and_lookup_by_name() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/projects",
            json!({"name": "alpha", "description": "d", "instructions": "be careful",
                   "config": {"defaultMaxRetries": 2, "defaultLeaseDurationMinutes": 5, "reaperIntervalMinutes": 2}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.data()["id"].as_str().unwrap().to_string();
    assert_eq!(r.data()["status"], "active");
    assert_eq!(r.data()["config"]["defaultMaxRetries"], 2);
    assert_eq!(r.data()["stats"]["totalTasks"], 0);
    let created = r.data()["createdAt"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 24, "{created}");

    assert_eq!(
        app.get(&format!("/api/projects/{id}")).await.data()["name"],
        "alpha"
    );
    assert_eq!(
        app.get("/api/projects/alpha").await.data()["id"],
        id.as_str()
    );

    let r = app
        .post(
            "/api/projects",
            json!({"name": "alpha", "description": "again"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));

    let r = app
        .put(
            "/api/projects/alpha",
            json!({"description": "new", "config": {"defaultMaxRetries": 5}}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.data()["description"], "new");
    assert_eq!(r.data()["config"]["defaultMaxRetries"], 5);
    assert_eq!(r.data()["config"]["defaultLeaseDurationMinutes"], 5);

    let r = app.get("/api/projects").await;
    assert_eq!(r.body["pagination"]["total"], 1);
    app.put("/api/projects/alpha", json!({"status": "closed"}))
        .await;
    assert_eq!(
        app.get("/api/projects").await.body["pagination"]["total"],
        0
    );
    assert_eq!(
        app.get("/api/projects?status=closed").await.body["pagination"]["total"],
        1
    );
    assert_eq!(
        app.get("/api/projects?status=all").await.body["pagination"]["total"],
        1
    );

    let r = app.delete(&format!("/api/projects/{id}")).await;
    assert_eq!(r.status, 200);
    let r = app.get(&format!("/api/projects/{id}")).await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"));
}

#[tokio::test]
async fn project_validation_reports_every_field() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/projects",
            json!({"name": "bad name!", "description": "x".repeat(501),
                   "config": {"defaultMaxRetries": 11, "defaultLeaseDurationMinutes": 0, "reaperIntervalMinutes": 61}}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "VALIDATION_ERROR"));
    let fields: Vec<&str> = r.body["validationDetails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        vec![
            "name",
            "description",
            "config.defaultMaxRetries",
            "config.defaultLeaseDurationMinutes",
            "config.reaperIntervalMinutes"
        ]
    );
    assert_eq!(r.body["validationDetails"][0]["value"], "bad name!");
    assert_eq!(
        app.get("/api/projects?status=all").await.body["pagination"]["total"],
        0
    );
}

/// A project could be named like another project's id; a `{projectId}` tries ids first, so
/// that project could then be reached by its id only. Names that read as a UUID are refused.
#[tokio::test]
async fn a_project_name_cannot_be_a_uuid() {
    let app = spawn_app().await;
    let first = app.project("first").await;
    for name in [first.as_str(), "01a22fee-0000-7000-8000-000000000000"] {
        let r = app
            .post("/api/projects", json!({"name": name, "description": "d"}))
            .await;
        assert_eq!((r.status, r.code()), (400, "VALIDATION_ERROR"), "{name}");
        assert_eq!(r.body["validationDetails"][0]["field"], "name");
    }
    let renamed = app
        .put(
            &format!("/api/projects/{first}"),
            json!({"name": uuid::Uuid::new_v4().simple().to_string()}),
        )
        .await;
    assert_eq!(renamed.status, 400, "{:?}", renamed.body);
    assert_eq!(app.get("/api/projects/first").await.status, 200);
    assert_eq!(
        app.get("/api/projects").await.body["pagination"]["total"],
        1
    );
}

#[tokio::test]
async fn closed_project_takes_no_tasks_and_hands_out_none() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    app.task(&p, json!({"instructions": "x"})).await;
    app.put(&format!("/api/projects/{p}"), json!({"status": "closed"}))
        .await;
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"instructions": "x"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));
    assert_eq!(app.next("a", json!({"projectId": p})).await, Value::Null);
    let r = app.get(&format!("/api/projects/{p}/tasks")).await;
    assert_eq!(r.body["pagination"]["total"], 1);
}

/// A project with more tasks than one delete chunk goes in several writes; the outcome is
/// the same as one: the project, its types, tasks and leases gone, other projects untouched.
#[tokio::test]
async fn deleting_a_big_project_removes_it_all_and_nothing_else() {
    let app = spawn_app().await;
    let big = app.project("big").await;
    let other = app.project("other").await;
    let ty = app.task_type(&big, json!({"name": "t"})).await;
    let kept = app.task(&other, json!({"instructions": "keep"})).await;
    app.task(&other, json!({"instructions": "keep too"})).await;
    let other_lease = app.next("y", json!({"projectId": other})).await;
    let n = 2 * agentq::store::write::DELETE_CHUNK + 500;
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"instructions": format!("t{i}"), "typeId": ty}))
        .collect();
    let ids = app.bulk(&big, &tasks).await;
    // The first and the last task: one goes in the first chunk, the other in the last write.
    let ends = [&ids[0], &ids[n - 1]];
    let held = app.next("x", json!({"projectId": big})).await;
    assert_eq!(app.stats(&big).await["totalTasks"], n);
    assert_eq!(
        app.delete(&format!("/api/projects/{big}")).await.status,
        200
    );
    assert_eq!(app.get(&format!("/api/projects/{big}")).await.status, 404);
    assert_eq!(app.get(&format!("/api/task-types/{ty}")).await.status, 404);
    for t in ends {
        assert_eq!(app.get(&format!("/api/tasks/{t}")).await.status, 404);
    }
    let r = app
        .post(
            &format!("/api/tasks/{}/complete", held["id"].as_str().unwrap()),
            json!({"agentName": "x", "leaseToken": held["leaseToken"], "result": "late"}),
        )
        .await;
    assert_eq!(r.status, 404);
    // The other project is as it was, its lease included.
    let s = app.stats(&other).await;
    assert_eq!(
        (s["totalTasks"].as_u64(), s["runningTasks"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(app.get(&format!("/api/tasks/{kept}")).await.status, 200);
    let r = app
        .post(
            &format!(
                "/api/tasks/{}/complete",
                other_lease["id"].as_str().unwrap()
            ),
            json!({"agentName": "y", "leaseToken": other_lease["leaseToken"], "result": "ok"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The name is free again, and the new project starts empty.
    let again = app.project("big").await;
    assert_eq!(app.stats(&again).await["totalTasks"], 0);
}

/// Agents working a project while it is deleted: every answer is a success or a 404 (the
/// project, or the task, gone), never a server error, and afterwards nothing of it is left
/// while the project beside it kept its work.
#[tokio::test]
async fn deleting_a_project_under_working_agents() {
    let app = spawn_app().await;
    let doomed = app.project("doomed").await;
    let other = app.project("other").await;
    let tasks: Vec<Value> = (0..3000)
        .map(|i| json!({"instructions": format!("t{i}")}))
        .collect();
    for p in [&doomed, &other] {
        app.bulk(p, &tasks).await;
    }
    let mut agents = Vec::new();
    for a in 0..8 {
        let (client, base) = (app.client.clone(), app.base.clone());
        let project = if a % 2 == 0 {
            doomed.clone()
        } else {
            other.clone()
        };
        agents.push(tokio::spawn(async move {
            let agent = format!("agent-{a}");
            let mut statuses = Vec::new();
            for _ in 0..60 {
                let r = client
                    .post(format!("{base}/api/agents/{agent}/next-task"))
                    .json(&json!({"projectId": project}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
                if r.status() != 200 {
                    continue;
                }
                let body: Value = r.json().await.unwrap();
                let Some(task) = body["data"]["task"].as_object() else {
                    continue;
                };
                let r = client
                    .post(format!(
                        "{base}/api/tasks/{}/complete",
                        task["id"].as_str().unwrap()
                    ))
                    .json(&json!({"agentName": agent, "leaseToken": task["leaseToken"]}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(
        app.delete(&format!("/api/projects/{doomed}")).await.status,
        200
    );
    for a in agents {
        for status in a.await.unwrap() {
            assert!(status == 200 || status == 404, "{status}");
        }
    }
    assert_eq!(
        app.get(&format!("/api/projects/{doomed}")).await.status,
        404
    );
    let s = app.stats(&other).await;
    assert_eq!(s["totalTasks"], 3000);
    assert_eq!(s["runningTasks"], 0);
    assert!(s["completedTasks"].as_u64().unwrap() > 0);
    // The name is free and the new project starts empty.
    let again = app.project("doomed").await;
    assert_eq!(app.stats(&again).await["totalTasks"], 0);
}

/// A client that gives up on a long project delete does not leave it half done. Over
/// HTTP/2 a request given up is reset, and the server drops its handler at once; the delete
/// goes on to its end anyway.
#[tokio::test]
async fn a_project_delete_ends_even_if_its_client_gives_up() {
    let app = spawn_app().await;
    let p = app.project("big").await;
    let ty = app.task_type(&p, json!({"name": "t"})).await;
    let tasks: Vec<Value> = (0..8 * agentq::store::write::DELETE_CHUNK)
        .map(|i| json!({"instructions": format!("t{i}"), "typeId": ty}))
        .collect();
    let ids = app.bulk(&p, &tasks).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .default_headers(
            [(
                reqwest::header::HeaderName::from_static("x-api-key"),
                reqwest::header::HeaderValue::from_str(&app.admin_key).unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let url = format!("{}/api/projects/{p}", app.base);
    let mut patience = 5;
    while app.get(&format!("/api/projects/{p}")).await.status != 404 {
        let sent = h2
            .delete(&url)
            .timeout(std::time::Duration::from_millis(patience))
            .send()
            .await;
        if let Ok(r) = sent {
            assert_eq!(r.status(), 200);
        }
        patience *= 2;
    }
    // The type goes in the delete's last write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.get(&format!("/api/task-types/{ty}")).await.status != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the delete stopped with its client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for t in [&ids[0], &ids[ids.len() - 1]] {
        assert_eq!(app.get(&format!("/api/tasks/{t}")).await.status, 404);
    }
}

/// A delete of a project already being deleted takes the delete up (it may have been cut
/// short) and answers 200 once the project is gone; its id alone names it by then.
#[tokio::test]
async fn deleting_a_project_being_deleted_answers_when_it_is_gone() {
    let app = spawn_app().await;
    let p = app.project("big").await;
    let tasks: Vec<Value> = (0..8 * agentq::store::write::DELETE_CHUNK)
        .map(|i| json!({"instructions": format!("t{i}")}))
        .collect();
    let ids = app.bulk(&p, &tasks).await;
    let first = {
        let (client, url) = (app.client.clone(), format!("{}/api/projects/{p}", app.base));
        tokio::spawn(async move { client.delete(url).send().await.unwrap().status() })
    };
    while app.get(&format!("/api/projects/{p}")).await.status != 404 {}
    let first_done = first.is_finished();
    let second = app.delete(&format!("/api/projects/{p}")).await;
    if !first_done {
        assert_eq!(second.status, 200, "{:?}", second.body);
        assert_eq!(second.data()["id"], p.as_str());
        // Answered after the end: nothing of the project is left.
        assert_eq!(
            app.get(&format!("/api/tasks/{}", ids[ids.len() - 1]))
                .await
                .status,
            404
        );
    }
    assert_eq!(first.await.unwrap(), 200);
    // Once it is gone, a delete is a 404, by id or by its old name.
    assert_eq!(app.delete(&format!("/api/projects/{p}")).await.status, 404);
    assert_eq!(app.delete("/api/projects/big").await.status, 404);
}

#[tokio::test]
async fn stats_report_the_last_hours_activity() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let once = app
        .task_type(&p, json!({"name": "once", "maxRetries": 0}))
        .await;
    let again = app
        .task_type(&p, json!({"name": "again", "maxRetries": 2}))
        .await;
    /// The hour's totals; the minutes are checked to add up to them, 60 of them.
    async fn activity(app: &TestApp, p: &str) -> Value {
        let stats = app.get(&format!("/api/projects/{p}/stats")).await;
        let mut hour = stats.data()["recentActivity"].clone();
        let minutes = hour.as_object_mut().unwrap().remove("perMinute").unwrap();
        let minutes = minutes.as_array().unwrap();
        assert_eq!(minutes.len(), 60);
        let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
        assert_eq!(sum("completed"), hour["tasksCompletedLastHour"]);
        assert_eq!(sum("failed"), hour["tasksFailedLastHour"]);
        hour
    }
    assert_eq!(
        activity(&app, &p).await,
        json!({"tasksCompletedLastHour": 0, "tasksFailedLastHour": 0, "averageTaskDuration": null})
    );
    let stats = app.get(&format!("/api/projects/{p}/stats")).await;
    assert!(
        stats.data()["oldestQueuedAt"].is_null()
            && stats.data()["oldestQueuedAgeSeconds"].is_null()
    );
    for _ in 0..3 {
        app.task(&p, json!({"typeId": once, "instructions": "x"}))
            .await;
    }
    app.task(&p, json!({"typeId": again, "instructions": "x"}))
        .await;
    // Two completions that ran 2 s and 4 s, one final failure, one failure that retries.
    for (agent, run_ms) in [("a", 2_000), ("b", 4_000)] {
        let t = app
            .next(agent, json!({"projectId": p, "typeIds": [once]}))
            .await;
        app.advance(run_ms).await;
        let r = app
            .post(
                &format!("/api/tasks/{}/complete", t["id"].as_str().unwrap()),
                json!({"agentName": agent}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    for (agent, ty, retries) in [("c", &once, false), ("d", &again, true)] {
        let t = app
            .next(agent, json!({"projectId": p, "typeIds": [ty]}))
            .await;
        let r = app
            .post(
                &format!("/api/tasks/{}/fail", t["id"].as_str().unwrap()),
                json!({"agentName": agent, "error": "e"}),
            )
            .await;
        assert_eq!(r.data()["willRetry"], retries);
    }
    let expected =
        json!({"tasksCompletedLastHour": 2, "tasksFailedLastHour": 1, "averageTaskDuration": 3.0});
    assert_eq!(activity(&app, &p).await, expected);
    // This minute holds them all; the oldest queued task is the one requeued for a retry.
    let stats = app.get(&format!("/api/projects/{p}/stats")).await;
    let last = &stats.data()["recentActivity"]["perMinute"][59];
    assert_eq!(
        (last["completed"].clone(), last["failed"].clone()),
        (json!(2), json!(1))
    );
    let queued = app
        .get(&format!("/api/projects/{p}/tasks?status=queued"))
        .await;
    assert_eq!(
        stats.data()["oldestQueuedAt"],
        queued.data()[0]["createdAt"]
    );
    assert!(stats.data()["oldestQueuedAgeSeconds"].as_f64().unwrap() >= 6.0);
    let app = app.restart().await;
    assert_eq!(
        activity(&app, &p).await,
        expected,
        "activity survives a restart"
    );
    app.advance(58 * 60_000).await;
    assert_eq!(
        activity(&app, &p).await,
        expected,
        "58 minutes later: still in the hour"
    );
    app.advance(2 * 60_000).await;
    assert_eq!(
        activity(&app, &p).await,
        json!({"tasksCompletedLastHour": 0, "tasksFailedLastHour": 0, "averageTaskDuration": null}),
        "an hour later the window has moved on"
    );
}

/// The lists read whole (a task's attempts, a project's agents and task types, the keys)
/// page by `limit` and `offset` like the others, with the whole list's length as the total.
#[tokio::test]
async fn short_lists_page_by_limit_and_offset() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    for name in ["t1", "t2", "t3"] {
        app.task_type(&p, json!({"name": name, "maxRetries": 5}))
            .await;
    }
    let ty = app
        .get(&format!("/api/projects/{p}/task-types"))
        .await
        .data()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // One task failed twice, then held: three attempts. Two more tasks held: three agents.
    let id = app
        .task(
            &p,
            json!({"typeId": ty, "instructions": "x", "priority": 9}),
        )
        .await;
    for _ in 0..2 {
        app.next("a", json!({"projectId": p})).await;
        let r = app.fail(&id, "a", "boom").await;
        assert_eq!(r.data()["willRetry"], true);
    }
    app.next("a", json!({"projectId": p})).await;
    for agent in ["b", "c"] {
        app.task(&p, json!({"instructions": "y"})).await;
        app.next(agent, json!({"projectId": p})).await;
    }
    app.key("viewer", None).await;

    for (path, total) in [
        (format!("/api/projects/{p}/task-types"), 3),
        (format!("/api/tasks/{id}/attempts"), 3),
        (format!("/api/projects/{p}/agents"), 3),
        ("/api/keys".to_string(), 2),
    ] {
        let whole = app.get(&path).await;
        assert_eq!(whole.status, 200, "{path}");
        assert_eq!(whole.data().as_array().unwrap().len(), total, "{path}");
        assert_eq!(
            whole.body["pagination"],
            json!({"total": total, "limit": 100, "offset": 0, "nextCursor": null}),
            "{path}"
        );
        let r = app.get(&format!("{path}?limit=1&offset=1")).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.data().as_array().unwrap(),
            &[whole.data()[1].clone()],
            "{path}"
        );
        assert_eq!(
            r.body["pagination"],
            json!({"total": total, "limit": 1, "offset": 1, "nextCursor": null}),
            "{path}"
        );
        let r = app.get(&format!("{path}?offset={total}")).await;
        assert_eq!(r.data(), &json!([]), "{path}");
        assert_eq!(r.body["pagination"]["total"], total, "{path}");
        for bad in ["limit=0", "limit=1001", "offset=-1"] {
            let r = app.get(&format!("{path}?{bad}")).await;
            assert_eq!(
                (r.status, r.code()),
                (400, "VALIDATION_ERROR"),
                "{path}?{bad}"
            );
        }
    }
}

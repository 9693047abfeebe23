//! The lease protocol under time and concurrency: the reaper, many agents at once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn reaper_reclaims_expired_leases_but_never_early() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let ty = app
        .task_type(
            &p,
            json!({"name": "t", "leaseDurationMinutes": 1, "maxRetries": 1}),
        )
        .await;
    let id = app
        .task(&p, json!({"typeId": ty, "instructions": "x"}))
        .await;
    let first = app.next("a", json!({"projectId": p})).await;
    app.advance(59_999).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "running", "reclaimed before expiry");
    app.advance(1).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    assert_eq!(t.data()["retryCount"], 1);
    assert_eq!(t.data()["attempts"][0]["outcome"], "timeout");
    assert!(t.data()["error"].as_str().unwrap().contains("expired"));

    // The stalled holder can no longer complete; a new holder of the same name with the old
    // token neither.
    let r = app
        .post(
            &format!("/api/tasks/{id}/complete"),
            json!({"agentName": "a"}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");
    let second = app.next("a", json!({"projectId": p})).await;
    assert_ne!(second["leaseToken"], first["leaseToken"]);
    let r = app
        .post(
            &format!("/api/tasks/{id}/complete"),
            json!({"agentName": "a", "leaseToken": first["leaseToken"]}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");

    // Out of retries: the next expiry ends the task failed.
    app.advance(60_000).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "failed");
    assert_eq!(t.data()["attempts"].as_array().unwrap().len(), 2);
    let s = app.stats(&p).await;
    assert_eq!(
        (s["failedTasks"].as_u64(), s["runningTasks"].as_u64()),
        (Some(1), Some(0))
    );
}

#[tokio::test]
async fn an_earlier_lease_wakes_the_sleeping_reaper() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let long = app
        .task_type(&p, json!({"name": "long", "leaseDurationMinutes": 60}))
        .await;
    let short = app
        .task_type(&p, json!({"name": "short", "leaseDurationMinutes": 1}))
        .await;
    app.task(&p, json!({"typeId": long, "instructions": "x"}))
        .await;
    app.next("a", json!({"projectId": p})).await;
    let id = app
        .task(&p, json!({"typeId": short, "instructions": "y"}))
        .await;
    app.next("b", json!({"projectId": p})).await;
    app.advance(60_000).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    let s = app.stats(&p).await;
    assert_eq!(s["runningTasks"], 1);
}

#[tokio::test]
async fn extend_keeps_the_reaper_away() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (_, id) = app.minute_task(&p).await;
    app.next("a", json!({"projectId": p})).await;
    app.advance(50_000).await;
    app.post(
        &format!("/api/tasks/{id}/extend-lease"),
        json!({"agentName": "a", "extensionMinutes": 1}),
    )
    .await;
    app.advance(50_000).await;
    assert_eq!(
        app.get(&format!("/api/tasks/{id}")).await.data()["status"],
        "running"
    );
    app.advance(10_000).await;
    assert_eq!(
        app.get(&format!("/api/tasks/{id}")).await.data()["status"],
        "queued"
    );
}

/// 48 agents race over 2,400 tasks: each task is completed exactly once, and no two agents
/// ever hold the same task at the same time (checked by a shared holder table that every
/// agent updates between its claim and its complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_agents_complete_each_task_exactly_once() {
    const AGENTS: usize = 48;
    const TASKS: usize = 2400;
    let app = Arc::new(spawn_app().await);
    let p = app.project("p").await;
    let tasks: Vec<Value> = (0..TASKS)
        .map(|i| json!({"instructions": format!("t{i}"), "priority": i % 11}))
        .collect();
    app.bulk(&p, &tasks).await;
    let holders: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let completed: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut handles = Vec::new();
    for n in 0..AGENTS {
        let (app, p, holders, completed) =
            (app.clone(), p.clone(), holders.clone(), completed.clone());
        handles.push(tokio::spawn(async move {
            let agent = format!("agent-{n}");
            loop {
                let t = app.next(&agent, json!({"projectId": p})).await;
                if t.is_null() {
                    break;
                }
                let id = t["id"].as_str().unwrap().to_string();
                if let Some(other) = holders.lock().unwrap().insert(id.clone(), agent.clone()) {
                    panic!("task {id} held by {other} and {agent} at once");
                }
                let r = app
                    .post(
                        &format!("/api/tasks/{id}/complete"),
                        json!({"agentName": agent, "result": "ok", "leaseToken": t["leaseToken"]}),
                    )
                    .await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                holders.lock().unwrap().remove(&id);
                completed.lock().unwrap().push(id);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let done = completed.lock().unwrap().clone();
    let unique: HashSet<&String> = done.iter().collect();
    assert_eq!(done.len(), TASKS, "completes");
    assert_eq!(unique.len(), TASKS, "each task once");
    let s = app.stats(&p).await;
    assert_eq!(s["completedTasks"], TASKS as u64);
    assert_eq!(s["runningTasks"], 0);
    assert_eq!(s["queuedTasks"], 0);
    let listed = app
        .get(&format!("/api/projects/{p}/tasks?status=completed&createdAfter=2000-01-01T00:00:00.000Z&limit=1"))
        .await;
    assert_eq!(listed.body["pagination"]["total"], TASKS as u64);
}

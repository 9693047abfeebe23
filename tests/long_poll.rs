//! Long-polling next-task: waits, wake-ups, time-outs.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// Starts agent `w` long-polling `project` for up to 30 s; answers its reply and how long it
/// waited. Returns once the server counts it as waiting.
async fn long_poller(
    app: &TestApp,
    project: &str,
) -> tokio::task::JoinHandle<(Value, std::time::Duration)> {
    let url = format!("{}/api/agents/w/next-task", app.base);
    let client = app.client.clone();
    let body = json!({"projectId": project, "waitSeconds": 30});
    let before = app.metric("agentq_long_poll_waiters").await;
    let waiter = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r: Value = client
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (r, started.elapsed())
    });
    for _ in 0..400 {
        if app.metric("agentq_long_poll_waiters").await > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    waiter
}

#[tokio::test]
async fn long_poll_wakes_when_a_task_appears() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let waiter = long_poller(&app, &p).await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    let (r, waited) = waiter.await.unwrap();
    assert_eq!(r["data"]["task"]["id"], id.as_str());
    assert!(
        waited < std::time::Duration::from_secs(25),
        "woke by timeout, not by the task"
    );
}

/// A closed project hands out nothing, so its agents wait. Reopening it makes its queued
/// tasks available without any task changing, and no task event woke the waiting agents:
/// they sat out their `waitSeconds` (up to a minute) beside ready work.
#[tokio::test]
async fn reopening_a_project_wakes_its_long_pollers() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    let project = format!("/api/projects/{p}");
    app.put(&project, json!({"status": "closed"})).await;
    let waiter = long_poller(&app, &p).await;
    assert_eq!(
        app.put(&project, json!({"status": "active"})).await.status,
        200
    );
    let (r, waited) = waiter.await.unwrap();
    assert_eq!(r["data"]["task"]["id"], id.as_str());
    assert!(
        waited < std::time::Duration::from_secs(25),
        "woke by timeout, not by the reopening"
    );
}

#[tokio::test]
async fn long_poll_times_out_with_the_no_task_answer() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let r = app
        .post(
            "/api/agents/w/next-task",
            json!({"projectId": p, "waitSeconds": 0.3}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["success"], false);
}

/// A task made available wakes one long-poller that accepts it, not every poller of the
/// project: the others stay queued, and no claim is tried for them.
#[tokio::test]
async fn a_task_wakes_one_long_poller_that_accepts_it() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let a = app.task_type(&p, json!({"name": "a"})).await;
    let b = app.task_type(&p, json!({"name": "b"})).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let mut pollers = Vec::new();
    let mut poll = |agent: String, types: Option<&String>| {
        let (client, tx) = (app.client.clone(), tx.clone());
        let url = format!("{}/api/agents/{agent}/next-task", app.base);
        let mut body = json!({"projectId": p, "waitSeconds": 30});
        if let Some(t) = types {
            body["typeIds"] = json!([t]);
        }
        pollers.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let _ = tx.send((agent, r.json().await.unwrap()));
        }));
    };
    for i in 0..10 {
        poll(format!("a{i}"), Some(&a));
    }
    poll("b".into(), Some(&b));
    let server = app.server.as_ref().unwrap();
    for _ in 0..500 {
        if server.store.hub.waiters() == 11 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(server.store.hub.waiters(), 11, "all pollers are waiting");
    // A poller is counted as it sends its first look to the writer; one more claim, queued
    // after those looks, returns once they have all run (on a loaded machine the writer may
    // not have got to them yet, and they would be counted below).
    assert_eq!(
        app.next("settle", json!({"projectId": p})).await,
        Value::Null
    );
    let ops = || server.store.batches.operations.load(Ordering::Relaxed);
    let before = ops();
    // A task of type b: the poller for b gets it, though ten pollers waited longer.
    let id = app
        .task(&p, json!({"typeId": b, "instructions": "x"}))
        .await;
    let (agent, r) = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("the b poller was woken")
        .unwrap();
    assert_eq!(
        (agent.as_str(), &r["data"]["task"]["id"]),
        ("b", &json!(id))
    );
    // A task of type a: exactly one of the a pollers gets it.
    let id = app
        .task(&p, json!({"typeId": a, "instructions": "x"}))
        .await;
    let (agent, r) = rx.recv().await.unwrap();
    assert!(agent.starts_with('a'));
    assert_eq!(r["data"]["task"]["id"], id.as_str());
    // One more claim through the writer, queued after any claim the wake-ups started.
    assert_eq!(
        app.next("probe", json!({"projectId": p})).await,
        Value::Null
    );
    // Two creates, two claims and the probe (and at most one background "key last used"
    // update); waking every poller would have tried nine more claims.
    let ops = ops() - before;
    assert!(
        (5..=6).contains(&ops),
        "{ops} operations: one claim per task made available"
    );
    assert_eq!(
        server.store.hub.waiters(),
        9,
        "the other pollers still wait"
    );
    assert!(rx.try_recv().is_err());
    for h in pollers {
        h.abort();
    }
}

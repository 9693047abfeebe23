//! The agent's calls one by one: next-task, complete, fail, extend-lease, progress, cleanup.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn next_task_orders_by_priority_then_age_and_resumes() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let low = app
        .task(&p, json!({"instructions": "low", "priority": 1}))
        .await;
    let old_high = app
        .task(&p, json!({"instructions": "h1", "priority": 9}))
        .await;
    let new_high = app
        .task(&p, json!({"instructions": "h2", "priority": 9}))
        .await;
    let a = app.next("a", json!({"projectId": p})).await;
    assert_eq!(a["id"], old_high.as_str());
    assert_eq!(a["status"], "running");
    assert_eq!(a["assignedTo"], "a");
    assert!(a["leaseToken"].as_str().is_some_and(|t| t.len() == 32));
    assert_eq!(a["attempts"][0]["outcome"], "running");
    // Resume: same task, same lease.
    let again = app.next("a", json!({"projectId": "p"})).await;
    assert_eq!(again["id"], a["id"]);
    assert_eq!(again["leaseToken"], a["leaseToken"]);
    assert_eq!(again["leaseExpiresAt"], a["leaseExpiresAt"]);
    assert_eq!(
        app.next("b", json!({"projectId": p})).await["id"],
        new_high.as_str()
    );
    assert_eq!(
        app.next("c", json!({"projectId": p})).await["id"],
        low.as_str()
    );
    let r = app
        .post("/api/agents/d/next-task", json!({"projectId": p}))
        .await;
    assert_eq!(r.body["success"], false);
    assert_eq!(r.body["error"], "No tasks available for assignment");
    assert_eq!(r.data()["agentName"], "d");
    assert_eq!(r.data()["task"], Value::Null);
    // Reads never show the lease token.
    let t = app
        .get(&format!("/api/tasks/{}", a["id"].as_str().unwrap()))
        .await;
    assert!(t.data().get("leaseToken").is_none());
    let agents = app.get(&format!("/api/projects/{p}/agents")).await;
    assert_eq!(agents.data().as_array().unwrap().len(), 3);
    let s = app.get(&format!("/api/projects/{p}/stats")).await;
    assert_eq!(s.data()["activeAgents"], 3);
    assert_eq!(s.data()["queueDepth"], 0);
}

#[tokio::test]
async fn next_task_validates_its_input() {
    let many = |n: u128| -> Vec<String> {
        (1..=n)
            .map(|i| uuid::Uuid::from_u128(i).to_string())
            .collect()
    };
    let app = spawn_app().await;
    let p = app.project("p").await;
    for (agent, body, want) in [
        ("bad agent", json!({"projectId": p}), 400),
        ("a", json!({"projectId": p, "waitSeconds": 61}), 400),
        ("a", json!({"projectId": p, "waitSeconds": -1}), 400),
        // A type id or name: not a name with a space; a name the project lacks is a 404.
        ("a", json!({"projectId": p, "typeIds": ["x y"]}), 400),
        ("a", json!({"projectId": p, "typeIds": ["x"]}), 404),
        ("a", json!({"projectId": p, "typeIds": many(101)}), 400),
        // An empty list would match no task: a long-poll would wait for nothing.
        ("a", json!({"projectId": p, "typeIds": []}), 400),
        ("a", json!({"projectId": p, "typeIds": many(100)}), 200),
        ("a", json!({"projectId": "missing"}), 404),
        ("a", json!({}), 400),
    ] {
        let r = app
            .post(
                &format!("/api/agents/{}/next-task", agent.replace(' ', "%20")),
                body,
            )
            .await;
        assert_eq!(r.status, want, "{:?}", r.body);
    }
}

#[tokio::test]
async fn type_ids_restrict_what_an_agent_takes() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let a = app.task_type(&p, json!({"name": "a"})).await;
    let b = app.task_type(&p, json!({"name": "b"})).await;
    let ta = app
        .task(&p, json!({"typeId": a, "instructions": "a", "priority": 9}))
        .await;
    let tb = app
        .task(&p, json!({"typeId": b, "instructions": "b", "priority": 1}))
        .await;
    let got = app.next("x", json!({"projectId": p, "typeIds": [b]})).await;
    assert_eq!(got["id"], tb.as_str());
    let got = app.next("y", json!({"projectId": p, "typeIds": [b]})).await;
    assert_eq!(got, Value::Null);
    let got = app
        .next("y", json!({"projectId": p, "typeIds": [b, a, b, a]}))
        .await;
    assert_eq!(got["id"], ta.as_str());
    // An untyped task has no type among any `typeIds`, not even the nil UUID.
    let untyped = app.task(&p, json!({"instructions": "u"})).await;
    let nil = "00000000-0000-0000-0000-000000000000";
    let got = app
        .next("z", json!({"projectId": p, "typeIds": [nil, a, b]}))
        .await;
    assert_eq!(got, Value::Null);
    assert_eq!(
        app.next("z", json!({"projectId": p})).await["id"],
        untyped.as_str()
    );
}

#[tokio::test]
async fn complete_is_holder_only_and_idempotent() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    app.task(&p, json!({"instructions": "x"})).await;
    let t = app.next("a", json!({"projectId": p})).await;
    let id = t["id"].as_str().unwrap();
    let token = t["leaseToken"].as_str().unwrap();
    let path = format!("/api/tasks/{id}/complete");
    let r = app
        .post(&path, json!({"agentName": "b", "result": "r"}))
        .await;
    assert_eq!((r.status, r.code()), (409, "LEASE_LOST"));
    let r = app
        .post(
            &path,
            json!({"agentName": "a", "result": "r", "leaseToken": "0".repeat(32)}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "LEASE_LOST"));
    let r = app
        .post(
            &path,
            json!({"agentName": "a", "result": "done", "outputs": {"n": 3}, "leaseToken": token}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.data()["status"], "completed");
    assert_eq!(r.data()["result"], "done");
    assert_eq!(r.data()["outputs"], json!({"n": 3}));
    assert_eq!(r.data()["assignedTo"], Value::Null);
    assert_eq!(r.data()["attempts"][0]["outcome"], "completed");
    // The same complete again: 200 with the same task, nothing changes.
    let again = app
        .post(&path, json!({"agentName": "a", "result": "done"}))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.data()["completedAt"], r.data()["completedAt"]);
    assert_eq!(again.data()["result"], "done");
    let r = app
        .post(&path, json!({"agentName": "b", "result": "x"}))
        .await;
    assert_eq!(r.status, 409);
    let r = app
        .post(&path, json!({"agentName": "a", "outputs": [1, 2]}))
        .await;
    assert_eq!(r.status, 400);
    let stats = app.stats(&p).await;
    assert_eq!(stats["completedTasks"], 1);
    assert_eq!(stats["runningTasks"], 0);
    let r = app
        .post("/api/tasks/nope/complete", json!({"agentName": "a"}))
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn fail_requeues_until_retries_run_out() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let ty = app
        .task_type(&p, json!({"name": "t", "maxRetries": 1}))
        .await;
    let id = app
        .task(&p, json!({"typeId": ty, "instructions": "x"}))
        .await;
    app.next("a", json!({"projectId": p})).await;
    let r = app.fail(&id, "a", "boom").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.data()["willRetry"], true);
    assert_eq!(r.data()["status"], "queued");
    assert_eq!(r.data()["retryCount"], 1);
    assert_eq!(r.data()["assignedTo"], Value::Null);
    assert_eq!(r.data()["leaseExpiresAt"], Value::Null);
    app.next("b", json!({"projectId": p})).await;
    let r = app.fail(&id, "b", "again").await;
    assert_eq!(r.data()["willRetry"], false);
    assert_eq!(r.data()["status"], "failed");
    assert_eq!(r.data()["error"], "again");
    let attempts = app.get(&format!("/api/tasks/{id}/attempts")).await;
    let outcomes: Vec<&str> = attempts
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["failed", "failed"]);
    assert_eq!(attempts.data()[0]["error"], "boom");
    // canRetry: false ends it at once; manual retry brings it back.
    let r = app.post(&format!("/api/tasks/{id}/retry"), json!({})).await;
    assert_eq!(r.data()["status"], "queued");
    app.next("c", json!({"projectId": p})).await;
    let r = app
        .post(
            &format!("/api/tasks/{id}/fail"),
            json!({"agentName": "c", "error": "x", "canRetry": false}),
        )
        .await;
    assert_eq!(r.data()["willRetry"], false);
    let r = app.post(&format!("/api/tasks/{id}/retry"), json!({})).await;
    assert_eq!(r.status, 200);
    let r = app.post(&format!("/api/tasks/{id}/retry"), json!({})).await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));
    let s = app.stats(&p).await;
    assert_eq!(
        (s["queuedTasks"].as_u64(), s["failedTasks"].as_u64()),
        (Some(1), Some(0))
    );
}

#[tokio::test]
async fn retry_back_off_delays_the_next_attempt() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let ty = app
        .task_type(
            &p,
            json!({"name": "t", "maxRetries": 3, "retryDelaySeconds": 10, "backoffMultiplier": 2}),
        )
        .await;
    let id = app
        .task(&p, json!({"typeId": ty, "instructions": "x"}))
        .await;
    for (n, delay_ms) in [(1, 10_000), (2, 20_000)] {
        app.next("a", json!({"projectId": p})).await;
        let r = app.fail(&id, "a", "e").await;
        assert_eq!(r.data()["retryCount"], n);
        assert_eq!(app.next("a", json!({"projectId": p})).await, Value::Null);
        let peek = app.get(&format!("/api/projects/{p}/peek-next-task")).await;
        assert_eq!(peek.data()["tasksAvailable"], 0);
        app.advance(delay_ms - 1).await;
        assert_eq!(app.next("a", json!({"projectId": p})).await, Value::Null);
        app.advance(1).await;
        let peek = app.get(&format!("/api/projects/{p}/peek-next-task")).await;
        assert_eq!(peek.data()["tasksAvailable"], 1);
        // Leave it queued for the loop's next claim.
    }
    assert_eq!(
        app.next("a", json!({"projectId": p})).await["id"],
        id.as_str()
    );
}

/// A claim promotes delayed tasks whose time has come itself, without waiting for the
/// scheduler: here the clock moves without waking it.
#[tokio::test]
async fn a_claim_finds_a_delayed_task_that_came_due() {
    let app = spawn_with_manual_clock().await;
    let clock = app.clock.clone().unwrap();
    let p = app.project("p").await;
    // An empty queue first, so the writer has looked and found no delayed task at all.
    assert_eq!(app.next("a", json!({"projectId": p})).await, Value::Null);
    for (agent, delay) in [("a", 30_000), ("b", 60_000)] {
        let at = agentq::time::format(agentq::time::Clock::now(clock.as_ref()) + delay);
        let id = app
            .task(&p, json!({"instructions": "x", "notBefore": at}))
            .await;
        assert_eq!(app.next(agent, json!({"projectId": p})).await, Value::Null);
        clock.advance(delay);
        assert_eq!(
            app.next(agent, json!({"projectId": p})).await["id"],
            id.as_str()
        );
    }
}

#[tokio::test]
async fn extend_lease_and_progress_for_the_holder() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    let t = app.next("a", json!({"projectId": p})).await;
    let before = t["leaseExpiresAt"].as_str().unwrap().to_string();
    let r = app
        .post(
            &format!("/api/tasks/{id}/extend-lease"),
            json!({"agentName": "a", "extensionMinutes": 60}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.data()["leaseExpiresAt"].as_str().unwrap() > before.as_str());
    let r = app
        .post(
            &format!("/api/tasks/{id}/extend-lease"),
            json!({"agentName": "b", "extensionMinutes": 60}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");
    let r = app
        .post(
            &format!("/api/tasks/{id}/extend-lease"),
            json!({"agentName": "a", "extensionMinutes": 0}),
        )
        .await;
    assert_eq!(r.status, 400);
    // No agent name and no session: the body fits the schema (a session may name the agent),
    // but the caller names no holder.
    let r = app
        .post(
            &format!("/api/tasks/{id}/extend-lease"),
            json!({"extensionMinutes": 5}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "LEASE_LOST"));
    assert!(r.body["error"].as_str().unwrap().contains("agentName"));
    let r = app
        .post(
            &format!("/api/tasks/{id}/progress"),
            json!({"agentName": "a", "current": 3, "total": 10, "message": "going"}),
        )
        .await;
    assert_eq!(
        r.data()["progress"],
        json!({"current": 3, "total": 10, "message": "going"})
    );
    let r = app
        .post(
            &format!("/api/tasks/{id}/progress"),
            json!({"agentName": "b", "current": 3, "total": 10}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");
}

#[tokio::test]
async fn cleanup_leases_reclaims_expired_leases_now() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (_, id) = app.minute_task(&p).await;
    app.next("a", json!({"projectId": p})).await;
    let r = app
        .post(&format!("/api/projects/{p}/cleanup-leases"), json!({}))
        .await;
    assert_eq!(r.data()["reclaimedTasks"], 0, "not expired yet");
    // Move the clock without waking the scheduler, then clean up by hand.
    app.clock.as_ref().unwrap().advance(60_000);
    let r = app
        .post(&format!("/api/projects/{p}/cleanup-leases"), json!({}))
        .await;
    assert_eq!(r.data()["reclaimedTasks"], 1);
    assert_eq!(r.data()["cleanedAgents"], 1);
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    assert_eq!(t.data()["attempts"][0]["outcome"], "timeout");
}

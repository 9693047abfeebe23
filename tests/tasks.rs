//! Tasks: create, bulk, update, cancel, delete, client ids.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn client_task_ids_are_unique_across_the_server() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let q = app.project("q").await;
    let id = app
        .task(&p, json!({"id": "job-1", "instructions": "x"}))
        .await;
    assert_eq!(id, "job-1");
    let r = app
        .post(
            &format!("/api/projects/{q}/tasks"),
            json!({"id": "job-1", "instructions": "x"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));
    let r = app
        .post(
            &format!("/api/projects/{q}/tasks"),
            json!({"id": "bad id", "instructions": "x"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        app.get("/api/tasks/job-1").await.data()["projectId"],
        p.as_str()
    );
    // An id is taken while its task exists: once deleted, it names nothing, and a new task
    // (in any project) may take it, starting afresh.
    app.post("/api/tasks/job-1/cancel", json!({})).await;
    assert_eq!(app.delete("/api/tasks/job-1").await.status, 200);
    assert_eq!(app.get("/api/tasks/job-1").await.status, 404);
    app.task(&q, json!({"id": "job-1", "instructions": "y"}))
        .await;
    let t = app.get("/api/tasks/job-1").await;
    assert_eq!(
        (
            &t.data()["projectId"],
            &t.data()["status"],
            &t.data()["cancelledAt"]
        ),
        (&json!(q), &json!("queued"), &json!(null))
    );
}

#[tokio::test]
async fn bulk_creates_what_it_can_in_order() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let t = app
        .task_type(
            &p,
            json!({"name": "t", "template": "{{x}}", "variables": ["x"]}),
        )
        .await;
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks/bulk"),
            json!({"batchId": "b1", "tasks": [
                {"typeId": t, "variables": {"x": "1"}},
                {"typeId": t, "variables": {}},
                {"typeId": t, "variables": {"x": "3"}, "priority": 99},
                {"typeId": t, "variables": {"x": "4"}},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.data()["tasksCreated"], 2);
    let errs: Vec<u64> = r.data()["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(errs, vec![1, 2]);
    assert_eq!(r.data()["createdTasks"][0]["instructions"], "1");
    assert_eq!(r.data()["createdTasks"][1]["instructions"], "4");
    assert_eq!(r.data()["createdTasks"][0]["batchId"], "b1");

    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"instructions": format!("{i}")}))
        .collect();
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks/bulk"),
            json!({"tasks": many}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(app.stats(&p).await["totalTasks"], 2);
    let batch = |b: &str| format!("/api/projects/{p}/tasks?batchId={b}");
    let r = app.get(&batch("b1")).await;
    assert_eq!(r.body["pagination"]["total"], 2);
    // A task moved to another batch, or deleted, leaves the first one's listing.
    let [first, second] = [0, 1].map(|i| r.data()[i]["id"].as_str().unwrap().to_string());
    let moved = app
        .put(&format!("/api/tasks/{first}"), json!({"batchId": "b2"}))
        .await;
    assert_eq!(moved.status, 200, "{:?}", moved.body);
    assert_eq!(
        ids(app.get(&batch("b1")).await.data()),
        std::slice::from_ref(&second)
    );
    assert_eq!(ids(app.get(&batch("b2")).await.data()), [first]);
    assert_eq!(
        app.delete(&format!("/api/tasks/{second}")).await.status,
        200
    );
    assert_eq!(app.get(&batch("b1")).await.body["pagination"]["total"], 0);
}

#[tokio::test]
async fn not_before_holds_a_task_back() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let now = app
        .clock
        .as_ref()
        .map(|c| agentq::time::Clock::now(c.as_ref()))
        .unwrap();
    let later = agentq::time::format(now + 60_000);
    let id = app
        .task(&p, json!({"instructions": "x", "notBefore": later}))
        .await;
    assert_eq!(app.next("a", json!({"projectId": p})).await, Value::Null);
    app.advance(60_000).await;
    assert_eq!(
        app.next("a", json!({"projectId": p})).await["id"],
        id.as_str()
    );
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"instructions": "x", "notBefore": "tomorrow"}),
        )
        .await;
    assert_eq!(r.status, 400);
}

/// `null` in an update clears a field that may be empty. It used to be read as "unchanged",
/// so a task given a `notBefore` could not be made available at once, nor a task type given
/// its own `maxRetries` sent back to the project's default.
#[tokio::test]
async fn null_in_an_update_clears_what_may_be_empty() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let id = app
        .task(
            &p,
            json!({"instructions": "x", "notBefore": "2099-01-01T00:00:00.000Z",
                   "batchId": "b1", "priority": 7}),
        )
        .await;
    assert_eq!(app.next("a", json!({"projectId": p})).await, Value::Null);
    let task = format!("/api/tasks/{id}");
    let r = app
        .put(
            &task,
            json!({"notBefore": null, "batchId": null, "priority": null}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.data()["notBefore"], Value::Null);
    assert_eq!(r.data()["batchId"], Value::Null);
    assert_eq!(
        r.data()["priority"],
        7,
        "a field that cannot be empty is left as it was"
    );
    let in_batch = app
        .get(&format!("/api/projects/{p}/tasks?batchId=b1"))
        .await;
    assert_eq!(in_batch.body["pagination"]["total"], 0);
    assert_eq!(
        app.next("a", json!({"projectId": p})).await["id"],
        id.as_str(),
        "available at once"
    );

    let project = format!("/api/projects/{p}");
    app.put(&project, json!({"instructions": "read me"})).await;
    let r = app.put(&project, json!({"instructions": null})).await;
    assert_eq!(r.data()["instructions"], Value::Null);

    let t = app
        .task_type(
            &p,
            json!({"name": "t", "template": "Do {{a}}", "variables": ["a"], "maxRetries": 7,
                   "leaseDurationMinutes": 2}),
        )
        .await;
    let r = app
        .put(
            &format!("/api/task-types/{t}"),
            json!({"template": null, "maxRetries": null, "leaseDurationMinutes": null}),
        )
        .await;
    assert_eq!(r.status, 200);
    for field in ["template", "maxRetries", "leaseDurationMinutes"] {
        assert_eq!(r.data()[field], Value::Null, "{field}");
    }
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": t, "variables": {"a": "1"}, "instructions": "own"}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.data()["instructions"], "own", "no template to render");
    assert_eq!(r.data()["maxRetries"], 3, "the project's default again");
}

#[tokio::test]
async fn cancel_ends_the_lease() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    app.next("a", json!({"projectId": p})).await;
    let r = app
        .post(
            &format!("/api/tasks/{id}/cancel"),
            json!({"reason": "not needed"}),
        )
        .await;
    assert_eq!(r.data()["status"], "cancelled");
    assert_eq!(r.data()["cancelReason"], "not needed");
    assert_eq!(r.data()["attempts"][0]["outcome"], "cancelled");
    let r = app
        .post(
            &format!("/api/tasks/{id}/complete"),
            json!({"agentName": "a"}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");
    let r = app
        .call("POST", &format!("/api/tasks/{id}/cancel"), None)
        .await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));
    let s = app.stats(&p).await;
    assert_eq!(s["cancelledTasks"], 1);
    assert_eq!(s["runningTasks"], 0);
}

#[tokio::test]
async fn delete_task_and_project_keep_counters_exact() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let a = app.task(&p, json!({"instructions": "a"})).await;
    app.task(&p, json!({"instructions": "b"})).await;
    app.next("x", json!({"projectId": p})).await;
    assert_eq!(app.delete(&format!("/api/tasks/{a}")).await.status, 200);
    assert_eq!(app.get(&format!("/api/tasks/{a}")).await.status, 404);
    let s = app.stats(&p).await;
    assert_eq!(
        (s["totalTasks"].as_u64(), s["runningTasks"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(
        app.get(&format!("/api/projects/{p}/agents")).await.data(),
        &json!([])
    );
    assert_eq!(app.delete(&format!("/api/projects/{p}")).await.status, 200);
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"instructions": "x"}),
        )
        .await;
    assert_eq!(r.status, 404);
    // The name is free again.
    app.project("p").await;
}

/// Bulk cancel and retry: by ids, by the listing's filter, by both (the ids the filter
/// matches); tasks of another project or in the wrong state are reported, not changed.
#[tokio::test]
async fn bulk_cancel_and_retry_by_ids_and_filter() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let other = app.project("other").await;
    let ids = app
        .bulk(
            &p,
            &(0..5)
                .map(|i| json!({"instructions": format!("t{i}"), "batchId": if i < 3 { "a" } else { "b" }}))
                .collect::<Vec<_>>(),
        )
        .await;
    let foreign = app.task(&other, json!({"instructions": "x"})).await;
    let cancel = format!("/api/projects/{p}/tasks/cancel");
    let retry = format!("/api/projects/{p}/tasks/retry");
    let r = app
        .post(
            &cancel,
            json!({"ids": [ids[0], ids[1], "nope", foreign], "reason": "enough"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.data()["matched"], 4);
    assert_eq!(r.data()["changed"], 2);
    let errors = r.data()["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[1]["id"], foreign.as_str());
    let t = app.get(&format!("/api/tasks/{foreign}")).await;
    assert_eq!(
        t.data()["status"],
        "queued",
        "another project's task is untouched"
    );
    let t = app.get(&format!("/api/tasks/{}", ids[0])).await;
    assert_eq!(t.data()["cancelReason"], "enough");

    // The same again: already cancelled, reported.
    let r = app.post(&cancel, json!({"ids": [ids[0]]})).await;
    assert_eq!(r.data()["changed"], 0);
    assert_eq!(r.data()["errors"].as_array().unwrap().len(), 1);

    let r = app
        .post(&retry, json!({"filter": {"status": "cancelled"}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (r.data()["matched"].clone(), r.data()["changed"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(r.data()["more"], false);
    assert_eq!(app.stats(&p).await["cancelledTasks"], 0);

    // Both: only the ids the filter matches.
    let r = app
        .post(
            &cancel,
            json!({"ids": [ids[0], ids[4]], "filter": {"batchId": "b"}}),
        )
        .await;
    assert_eq!(r.data()["matched"], 1);
    assert_eq!(r.data()["changed"], 1);
    let t = app.get(&format!("/api/tasks/{}", ids[4])).await;
    assert_eq!(t.data()["status"], "cancelled");
    let r = app
        .post(
            &cancel,
            json!({"filter": {"batchId": "a", "status": "queued"}}),
        )
        .await;
    assert_eq!(r.data()["changed"], 3);

    // Neither, too many, a bad filter, a viewer.
    assert_eq!(app.post(&cancel, json!({})).await.status, 400);
    let many: Vec<String> = (0..1001).map(|i| format!("x{i}")).collect();
    assert_eq!(app.post(&cancel, json!({"ids": many})).await.status, 400);
    let r = app
        .post(&retry, json!({"filter": {"status": "lost"}}))
        .await;
    assert_eq!(r.status, 400);
    let (_, viewer) = app.key("viewer", None).await;
    let r = app
        .call_with(
            &client_with_key(&viewer),
            "POST",
            &retry,
            Some(json!({"filter": {}})),
        )
        .await;
    assert_eq!(r.status, 403);
}

//! Task types: templates, variables, duplicate handling.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn task_types_crud_and_template_rules() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let r = app
        .post(
            &format!("/api/projects/{p}/task-types"),
            json!({"name": "t", "template": "Do {{a}} and {{b}}", "variables": ["a"]}),
        )
        .await;
    assert_eq!(r.status, 400, "placeholder b is not listed");
    let t = app
        .task_type(
            &p,
            json!({"name": "t", "template": "Do {{a}}", "variables": ["a"], "maxRetries": 2,
                   "leaseDurationMinutes": 0.5, "retryDelaySeconds": 1, "backoffMultiplier": 3}),
        )
        .await;
    let r = app
        .post(
            &format!("/api/projects/{p}/task-types"),
            json!({"name": "t"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));
    let r = app.get(&format!("/api/task-types/{t}")).await;
    assert_eq!(r.data()["duplicateHandling"], "allow");
    assert_eq!(r.data()["backoffMultiplier"], 3.0);
    let r = app
        .put(
            &format!("/api/task-types/{t}"),
            json!({"maxRetries": 4, "name": "t2"}),
        )
        .await;
    assert_eq!(r.data()["maxRetries"], 4);
    let list = app.get(&format!("/api/projects/{p}/task-types")).await;
    assert_eq!(list.data().as_array().unwrap().len(), 1);
    assert_eq!(list.data()[0]["name"], "t2");
    let r = app
        .post(
            &format!("/api/projects/{p}/task-types"),
            json!({"name": "x", "backoffMultiplier": 0.5}),
        )
        .await;
    assert_eq!(r.status, 400);
    // A number just under a bound is read exactly, not rounded onto the bound.
    let r = app
        .put(
            &format!("/api/task-types/{t}"),
            json!({"leaseDurationMinutes": 0.09999999999999999}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(
        app.delete(&format!("/api/task-types/{t}")).await.status,
        200
    );
    assert_eq!(app.get(&format!("/api/task-types/{t}")).await.status, 404);
    assert_eq!(app.get("/api/task-types/not-a-uuid").await.status, 404);
}

#[tokio::test]
async fn tasks_render_templates_and_require_variables() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let t = app
        .task_type(&p, json!({"name": "t", "template": "Review {{repo}} for {{aspect}}", "variables": ["repo", "aspect"]}))
        .await;
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": t, "variables": {"repo": "x"}}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "VALIDATION_ERROR"));
    assert_eq!(r.body["validationDetails"][0]["field"], "variables.aspect");
    let id = app
        .task(
            &p,
            json!({"typeId": t, "variables": {"repo": "r1", "aspect": "auth"}}),
        )
        .await;
    let task = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(task.data()["instructions"], "Review r1 for auth");
    assert_eq!(task.data()["status"], "queued");
    assert_eq!(task.data()["priority"], 5);
    assert_eq!(task.data()["progress"], Value::Null);
    assert_eq!(task.data()["attempts"], json!([]));
    assert!(task.data().get("leaseToken").is_none());

    // Updating variables re-renders the instructions.
    let r = app
        .put(
            &format!("/api/tasks/{id}"),
            json!({"variables": {"repo": "r2", "aspect": "io"}}),
        )
        .await;
    assert_eq!(r.data()["instructions"], "Review r2 for io");
    // ... and stores them: the body is written apart from the row.
    let stored = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(stored.data()["instructions"], "Review r2 for io");
    assert_eq!(
        stored.data()["variables"],
        json!({"repo": "r2", "aspect": "io"})
    );
    let claimed = app.next("a", json!({"projectId": p})).await;
    assert_eq!(claimed["instructions"], "Review r2 for io");

    // Unknown type, bad type id, no instructions at all.
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": "01a20255-defe-72af-8362-9529b90b3e2f"}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": "nope"}),
        )
        .await;
    // A name (see a_task_type_is_named_by_name_as_by_id) that the project does not have.
    assert_eq!(r.status, 404);
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": "no pe"}),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = app
        .post(&format!("/api/projects/{p}/tasks"), json!({}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(app.stats(&p).await["totalTasks"], 1);
}

#[tokio::test]
async fn duplicate_handling_ignore_fail_allow() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let ignore = app
        .task_type(
            &p,
            json!({"name": "i", "variables": ["a", "b"], "duplicateHandling": "ignore"}),
        )
        .await;
    let fail = app
        .task_type(
            &p,
            json!({"name": "f", "variables": ["a"], "duplicateHandling": "fail"}),
        )
        .await;
    let allow = app
        .task_type(&p, json!({"name": "a", "variables": ["a"]}))
        .await;
    let path = format!("/api/projects/{p}/tasks");

    let first = app
        .post(
            &path,
            json!({"typeId": ignore, "instructions": "x", "variables": {"a": "1", "b": "2"}}),
        )
        .await;
    assert_eq!(first.status, 201);
    // Same variables in another key order: the existing task, 200.
    let again = app
        .post(
            &path,
            json!({"typeId": ignore, "instructions": "x", "variables": {"b": "2", "a": "1"}}),
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.data()["id"], first.data()["id"]);

    app.task(
        &p,
        json!({"typeId": fail, "instructions": "x", "variables": {"a": "1"}}),
    )
    .await;
    let r = app
        .post(
            &path,
            json!({"typeId": fail, "instructions": "x", "variables": {"a": "1"}}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "CONFLICT"));

    app.task(
        &p,
        json!({"typeId": allow, "instructions": "x", "variables": {"a": "1"}}),
    )
    .await;
    app.task(
        &p,
        json!({"typeId": allow, "instructions": "x", "variables": {"a": "1"}}),
    )
    .await;
    assert_eq!(app.stats(&p).await["totalTasks"], 4);
}

/// A task type's name is taken wherever its id is, within the project: `typeId` on create and
/// bulk, `typeIds` on next-task (a long-poll too), the listing's `typeId` filter. A name the
/// project does not have is a 404 naming it; a UUID is taken as an id (an unknown one matches
/// nothing in the filters, as before).
#[tokio::test]
async fn a_task_type_is_named_by_name_as_by_id() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let other = app.project("other").await;
    let review = app
        .task_type(
            &p,
            json!({"name": "review", "template": "review {{doc}}", "variables": ["doc"]}),
        )
        .await;
    app.task_type(&other, json!({"name": "summary"})).await;
    let created = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": "review", "variables": {"doc": "a"}}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.data()["typeId"], review.as_str());
    assert_eq!(created.data()["instructions"], "review a");
    let bulk = app
        .post(
            &format!("/api/projects/{p}/tasks/bulk"),
            json!({"tasks": [
                {"typeId": "review", "variables": {"doc": "b"}},
                {"typeId": "summary", "instructions": "x"},
                {"typeId": review, "variables": {"doc": "c"}}
            ]}),
        )
        .await;
    assert_eq!(bulk.status, 201, "{:?}", bulk.body);
    assert_eq!(bulk.data()["tasksCreated"], 2, "{:?}", bulk.body);
    let errors = bulk.data()["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0]["index"], 1,
        "another project's type is not this one's"
    );
    // An untyped task beside them, which a filter by type must leave out.
    app.task(&p, json!({"instructions": "untyped"})).await;
    let listed = app
        .get(&format!("/api/projects/{p}/tasks?typeId=review"))
        .await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert_eq!(listed.body["pagination"]["total"], 3);
    let r = app
        .get(&format!("/api/projects/{p}/tasks?typeId=nothing"))
        .await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{:?}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("nothing"));
    let got = app
        .next("w", json!({"projectId": p, "typeIds": ["review"]}))
        .await;
    assert_eq!(got["typeId"], review.as_str());
    let polled = app
        .next(
            "w2",
            json!({"projectId": "p", "typeIds": ["review", review], "waitSeconds": 1}),
        )
        .await;
    assert_eq!(polled["typeId"], review.as_str());
    let r = app
        .post(
            "/api/agents/w3/next-task",
            json!({"projectId": p, "typeIds": ["summary"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{:?}", r.body);
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks"),
            json!({"typeId": "summary", "instructions": "x"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{:?}", r.body);
    let unknown_id = uuid::Uuid::from_u128(7).to_string();
    let listed = app
        .get(&format!("/api/projects/{p}/tasks?typeId={unknown_id}"))
        .await;
    assert_eq!(listed.body["pagination"]["total"], 0);
}

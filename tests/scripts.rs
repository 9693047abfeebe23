//! Script tasks (seed 000) through the API: who may create them, their rules, how tasks
//! inherit a type's script, how listings show them; and the execution history that complete
//! and fail keep per attempt.

mod common;

use common::*;
use serde_json::json;

fn bash(content: &str) -> serde_json::Value {
    json!({"type": "bash", "content": content, "timeoutSeconds": 30})
}

#[tokio::test]
async fn only_admins_and_allowed_keys_may_write_scripts() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let (_, producer) = app.key("producer", None).await;
    let r = app
        .post(
            "/api/keys",
            json!({"name": "scripter", "role": "producer", "allowScripts": true}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.data()["allowScripts"], true);
    let scripter = r.data()["key"].as_str().unwrap().to_string();
    let producer = client_with_key(&producer);
    let scripter = client_with_key(&scripter);
    let tasks = format!("/api/projects/{p}/tasks");
    let types = format!("/api/projects/{p}/task-types");

    let body = json!({"script": bash("echo hi")});
    let r = app
        .call_with(&producer, "POST", &tasks, Some(body.clone()))
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.code(), "FORBIDDEN");
    assert!(r.body["error"].as_str().unwrap().contains("allowScripts"));
    let r = app
        .call_with(
            &producer,
            "POST",
            &format!("{tasks}/bulk"),
            Some(json!({"tasks": [{"instructions": "plain"}, body.clone()]})),
        )
        .await;
    assert_eq!(r.status, 403, "a bulk with any script is refused whole");
    let r = app
        .call_with(
            &producer,
            "POST",
            &types,
            Some(json!({"name": "s", "script": bash("true")})),
        )
        .await;
    assert_eq!(r.status, 403);
    let stats = app.stats(&p).await;
    assert_eq!(stats["totalTasks"], 0, "nothing was created");

    // The allowed key and the admin may; a producer may then create tasks of such a type.
    let r = app.call_with(&scripter, "POST", &tasks, Some(body)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.data()["script"]["content"], "echo hi");
    assert_eq!(
        r.data()["instructions"],
        "",
        "a script task needs no instructions"
    );
    let ty = app
        .task_type(&p, json!({"name": "s", "script": bash("true")}))
        .await;
    let r = app
        .call_with(
            &producer,
            "POST",
            &tasks,
            Some(json!({"typeId": "s", "instructions": "go"})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        r.data()["script"]["content"],
        "true",
        "inherited from its type"
    );
    // Clearing a type's script is not writing one.
    let r = app
        .call_with(
            &producer,
            "PUT",
            &format!("/api/task-types/{ty}"),
            Some(json!({"script": bash("rm -rf ~")})),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = app
        .call_with(
            &producer,
            "PUT",
            &format!("/api/task-types/{ty}"),
            Some(json!({"script": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.data()["script"].is_null());
}

#[tokio::test]
async fn scripts_follow_the_seed_rules() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let tasks = format!("/api/projects/{p}/tasks");
    let cases = [
        (json!({"type": "ruby", "content": "x"}), "script"),
        (json!({"type": "bash", "content": ""}), "script.content"),
        (json!({"type": "bash"}), "script"),
        (
            json!({"type": "bash", "content": "x", "timeoutSeconds": 0}),
            "script.timeoutSeconds",
        ),
        (
            json!({"type": "python", "content": "x", "timeoutSeconds": 3601}),
            "script.timeoutSeconds",
        ),
        (
            json!({"type": "bash", "content": "x".repeat((1 << 20) + 1)}),
            "script.content",
        ),
        (
            json!({"type": "bash", "content": "x", "extra": 1}),
            "script",
        ),
    ];
    for (script, field) in cases {
        let r = app.post(&tasks, json!({"script": script})).await;
        assert_eq!(r.status, 400, "{script:.80}: {:?}", r.body);
        let details = r.body["validationDetails"].to_string();
        assert!(details.contains(field), "{field} in {}", r.body);
    }
    let r = app
        .post(
            &tasks,
            json!({"script": {"type": "python", "content": "x".repeat(1 << 20),
                              "timeoutSeconds": 3600}}),
        )
        .await;
    assert_eq!(r.status, 201, "1 MiB and 3600 s are allowed");
    assert_eq!(app.stats(&p).await["totalTasks"], 1);
}

#[tokio::test]
async fn listings_show_a_scripts_kind_and_size_and_a_task_shows_it_whole() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let id = app
        .task(
            &p,
            json!({"script": {"type": "python", "content": "print(1)"}}),
        )
        .await;
    let list = app.get(&format!("/api/projects/{p}/tasks")).await;
    let item = &list.data()[0]["script"];
    assert_eq!(item["type"], "python");
    assert_eq!(item["size"], 8);
    assert!(item.get("content").is_none(), "{item}");
    assert!(item["timeoutSeconds"].is_null());
    let one = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(one.data()["script"]["content"], "print(1)");
    let leased = app.next("a", json!({"projectId": p})).await;
    assert_eq!(leased["script"]["content"], "print(1)", "the agent gets it");
    let plain = app.task(&p, json!({"instructions": "x"})).await;
    let one = app.get(&format!("/api/tasks/{plain}")).await;
    assert!(one.data()["script"].is_null());
}

#[tokio::test]
async fn complete_and_fail_keep_each_attempts_execution() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    let t = app.next("a", json!({"projectId": p})).await;
    let execution = json!({"exitCode": 3, "stdoutTail": "out", "stderrTail": "boom",
                           "durationMs": 1234});
    let fail = format!("/api/tasks/{id}/fail");
    let r = app
        .post(
            &fail,
            json!({"agentName": "a", "leaseToken": t["leaseToken"], "error": "exit 3",
                   "execution": execution}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // A repeat of the same fail keeps the first report.
    let r = app
        .post(
            &fail,
            json!({"agentName": "a", "leaseToken": t["leaseToken"], "error": "exit 3",
                   "execution": {"exitCode": 9, "durationMs": 1}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let t = app.next("b", json!({"projectId": p})).await;
    assert_eq!(t["id"], id.as_str());
    let big = "é".repeat(40_000);
    let complete = format!("/api/tasks/{id}/complete");
    let r = app
        .post(
            &complete,
            json!({"agentName": "b", "leaseToken": t["leaseToken"],
                   "execution": {"exitCode": 0, "stdoutTail": big, "durationMs": 1}}),
        )
        .await;
    assert_eq!(r.status, 400, "a tail over 64 KiB");
    assert!(r.body["validationDetails"]
        .to_string()
        .contains("execution.stdoutTail"));
    let r = app
        .post(
            &complete,
            json!({"agentName": "b", "leaseToken": t["leaseToken"],
                   "execution": {"exitCode": 0, "stdoutTail": "done", "durationMs": 7}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let attempts = app.get(&format!("/api/tasks/{id}/attempts")).await;
    let a = attempts.data().as_array().unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["outcome"], "failed");
    assert_eq!(
        a[0]["execution"],
        json!({"exitCode": 3, "stdoutTail": "out", "stderrTail": "boom", "durationMs": 1234})
    );
    assert_eq!(a[1]["execution"]["stdoutTail"], "done");
    assert_eq!(a[1]["execution"]["stderrTail"], "");
    // Deleting the task deletes its history, executions included.
    assert_eq!(app.delete(&format!("/api/tasks/{id}")).await.status, 200);
    assert_eq!(
        app.get(&format!("/api/tasks/{id}/attempts")).await.status,
        404
    );
}

//! The HTTP contract, endpoint by endpoint: happy paths and error paths over real HTTP.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// Every page of a listing, following `nextCursor` from `url` (which has a query already);
/// each page must answer 200 with whole tasks (their instructions too, which the store keeps
/// apart from the rows it filters and orders), and `check` sees each answer.
async fn walk_pages(app: &TestApp, url: &str, check: impl Fn(&Resp)) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = app.get(&format!("{url}{cursor}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        for t in r.data().as_array().unwrap() {
            let text = t["instructions"].as_str().unwrap_or_default();
            assert!(!text.is_empty(), "a listed task without its body: {t}");
        }
        check(&r);
        seen.extend(ids(r.data()));
        match r.body["pagination"]["nextCursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return seen,
        }
    }
}

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
async fn framework_rejections_use_the_envelope_and_change_nothing() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (app.client.get(format!("{}/api/nope", app.base)), 404),
        (app.client.patch(format!("{}/api/projects", app.base)), 405),
        (
            app.client
                .post(format!("{}/api/projects/{p}/tasks", app.base))
                .header("content-type", "application/json")
                .body("{\"instructions\": "),
            400,
        ),
        (
            app.client
                .post(format!("{}/api/projects/{p}/tasks", app.base))
                .json(&json!({"instructions": "x", "colour": "red"})),
            400,
        ),
        (
            app.client
                .post(format!("{}/api/projects/{p}/tasks", app.base))
                .json(&json!({"instructions": 5})),
            400,
        ),
        (
            app.client
                .post(format!("{}/api/projects/{p}/tasks", app.base))
                .json(&json!({"instructions": "x", "priority": "high"})),
            400,
        ),
        (
            app.client
                .post(format!("{}/api/projects/{p}/tasks", app.base))
                .json(&json!({"instructions": "x", "priority": 11})),
            400,
        ),
        (
            app.client
                .post(format!("{}/api/projects/{p}/tasks", app.base))
                .json(&json!({"instructions": "x".repeat(3 * 1024 * 1024)})),
            413,
        ),
        (
            app.client
                .get(format!("{}/api/projects/{p}/tasks?limit=0", app.base)),
            400,
        ),
        (
            app.client
                .get(format!("{}/api/projects/{p}/tasks?limit=1001", app.base)),
            400,
        ),
        (
            app.client
                .get(format!("{}/api/projects/{p}/tasks?offset=-1", app.base)),
            400,
        ),
        (
            app.client
                .get(format!("{}/api/projects/{p}/tasks?limit=ten", app.base)),
            400,
        ),
        (
            app.client
                .get(format!("{}/api/projects/{p}/tasks?status=done", app.base)),
            400,
        ),
    ];
    for (req, want) in cases {
        let r = req
            .header("x-correlation-id", "test-123")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want);
        assert_eq!(r.headers()["x-correlation-id"], "test-123");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        let text = r.text().await.unwrap();
        // The contract's field order, so a person reading a raw answer sees it as documented.
        assert!(text.starts_with(r#"{"success":false,"error":"#), "{text}");
        let at: Vec<usize> = ["error", "code", "timestamp", "correlationId"]
            .iter()
            .map(|k| text.find(&format!("\"{k}\":")).expect("a contract field"))
            .collect();
        assert!(at.is_sorted(), "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["correlationId"], "test-123");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert!(body["code"].as_str().is_some());
        assert!(body["timestamp"].as_str().is_some());
    }
    assert_eq!(app.stats(&p).await["totalTasks"], 0);
}

#[tokio::test]
async fn unknown_field_is_named_in_the_error() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/projects",
            json!({"name": "a", "description": "d", "colour": 1}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"].as_str().unwrap().contains("colour"));
}

#[tokio::test]
async fn a_refused_body_names_the_fields_at_fault() {
    let app = spawn_app().await;
    let details = |r: &common::Resp| -> Vec<(String, String)> {
        assert_eq!(
            (r.status, r.code()),
            (400, "VALIDATION_ERROR"),
            "{}",
            r.body
        );
        r.body["validationDetails"]
            .as_array()
            .expect("validationDetails")
            .iter()
            .map(|d| {
                let field = d["field"].as_str().unwrap().to_string();
                (field, d["message"].as_str().unwrap().to_string())
            })
            .collect()
    };
    // A required field left out (the parser alone would only say "found null").
    let r = app.post("/api/projects", json!({"name": "a"})).await;
    assert_eq!(details(&r), [("description".into(), "is required".into())]);
    assert!(r.body["error"].as_str().unwrap().contains("description"));
    // Wrong types, nested, and a bulk item by index.
    let r = app
        .post(
            "/api/projects",
            json!({"name": 5, "description": "d", "config": {"defaultMaxRetries": "3"}}),
        )
        .await;
    assert_eq!(
        details(&r),
        [
            (
                "config.defaultMaxRetries".into(),
                "must be an integer, not a string".into()
            ),
            ("name".into(), "must be a string, not the integer 5".into())
        ]
    );
    let p = app.project("named").await;
    let r = app
        .post(
            &format!("/api/projects/{p}/tasks/bulk"),
            json!({"tasks": [{"instructions": "a"}, {"instructions": ["b"]}]}),
        )
        .await;
    assert_eq!(
        details(&r),
        [(
            "tasks[1].instructions".into(),
            "must be a string, not an array".into()
        )]
    );
    let r = app
        .post(
            "/api/agents/a1/next-task",
            json!({"projectId": p, "waitSeconds": "soon"}),
        )
        .await;
    assert_eq!(
        details(&r),
        [(
            "waitSeconds".into(),
            "must be a number, not a string".into()
        )]
    );
    // Not JSON at all.
    let r = app
        .client
        .post(format!("{}/api/projects", app.base))
        .header("content-type", "application/json")
        .body("{name: a}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["validationDetails"][0]["field"], "body", "{body}");
    // A query parameter that does not parse is named too.
    let r = app.get(&format!("/api/projects/{p}/tasks?limit=ten")).await;
    assert_eq!(details(&r), [("limit".into(), "must be an integer".into())]);
    // A form body (curl -d without a content type) is told what to send.
    let r = app
        .client
        .post(format!("{}/api/projects", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"name": "x", "description": "d"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let body: serde_json::Value = r.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("Content-Type: application/json"), "{error}");
    // An operation that takes no body ignores one, whatever its type (the document lists 415
    // only for operations with a body).
    let r = app
        .client
        .post(format!("{}/api/projects/{p}/cleanup-leases", app.base))
        .header("content-type", "text/plain")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Nothing was created.
    assert_eq!(app.stats(&p).await["totalTasks"], 0);
}

#[tokio::test]
async fn security_headers_and_generated_correlation_id() {
    let app = spawn_app().await;
    let r = app.get("/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-frame-options"], "DENY");
    assert_eq!(r.headers["referrer-policy"], "no-referrer");
    // As API-NOTES says: 16 hex digits (random per process), a dash, a 10-hex-digit counter.
    let cid = r.headers["x-correlation-id"].to_str().unwrap();
    let (prefix, counter) = cid.split_once('-').unwrap();
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(prefix.len() == 16 && hex(prefix), "{cid}");
    assert!(counter.len() == 10 && hex(counter), "{cid}");
    assert_eq!(r.data()["status"], "healthy");
    assert_eq!(r.data()["storage"]["provider"], "redb");
    assert!(r.data()["storage"]["sizeBytes"].as_u64().unwrap() > 0);
    assert!(r.data()["version"].is_string());
}

/// A write the store cannot take (here its writer was stopped under the server) answers 503
/// `UNAVAILABLE` in the envelope, with `Retry-After`.
#[tokio::test]
async fn a_write_the_store_cannot_take_answers_503_with_retry_after() {
    let app = spawn_app().await;
    app.server.as_ref().unwrap().store.close();
    let r = app
        .call(
            "POST",
            "/api/projects",
            Some(json!({"name": "p", "description": "d"})),
        )
        .await;
    assert_eq!((r.status, r.code()), (503, "UNAVAILABLE"), "{:?}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.body["success"], false);
}

#[tokio::test]
async fn openapi_document_and_ui_are_served() {
    let app = spawn_app().await;
    let r = app.get("/api/openapi.json").await;
    assert_eq!(r.status, 200);
    let paths = r.body["paths"].as_object().unwrap();
    for p in [
        "/api/projects",
        "/api/projects/{projectId}/tasks/bulk",
        "/api/agents/{agentName}/next-task",
        "/api/tasks/{taskId}/complete",
        "/health",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    // Only operations that create document a 201.
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let creates = method == "post"
                && [
                    "/api/keys",
                    "/api/projects",
                    "/task-types",
                    "/tasks",
                    "/tasks/bulk",
                ]
                .iter()
                .any(|end| path.ends_with(end));
            assert_eq!(
                op["responses"].get("201").is_some(),
                creates,
                "{method} {path}"
            );
            // 200 from a create only for a task that turns out a duplicate.
            if creates {
                assert_eq!(
                    op["responses"].get("200").is_some(),
                    path.ends_with("/tasks"),
                    "{method} {path}"
                );
            }
        }
    }
    // Each operation lists the error statuses it can answer, not every one.
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let has = |status: &str| op["responses"].get(status).is_some();
            let body = op.get("requestBody").is_some();
            assert!(!has("405"), "{method} {path}");
            assert_eq!(has("415"), body, "{method} {path}");
            assert_eq!(
                has("422"),
                ["createTask", "updateTask"].contains(&op["operationId"].as_str().unwrap()),
                "{method} {path}"
            );
            if path != "/health" {
                assert!(has("401") && has("429") && has("503"), "{method} {path}");
                for status in ["429", "503"] {
                    let h = &op["responses"][status]["headers"]["Retry-After"];
                    assert_eq!(h["required"], true, "{method} {path} {status}");
                }
            }
            assert_eq!(
                has("409"),
                method != "get" && path != "/health",
                "{method} {path}"
            );
        }
    }
    let list_keys = paths["/api/keys"]["get"]["responses"].as_object().unwrap();
    // listKeys names no resource; it refuses only its paging parameters.
    assert!(list_keys.contains_key("400") && !list_keys.contains_key("404"));
    // Every operation has an id of its own, and every link names one of them.
    let ops: Vec<&Value> = paths
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .collect();
    let mut ids: Vec<&str> = ops
        .iter()
        .map(|op| op["operationId"].as_str().expect("an operationId"))
        .collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "operationIds are unique");
    let mut links = 0;
    for op in &ops {
        for response in op["responses"].as_object().unwrap().values() {
            for link in response["links"]
                .as_object()
                .into_iter()
                .flat_map(|l| l.values())
            {
                let target = link["operationId"].as_str().unwrap();
                assert!(ids.contains(&target), "a link names {target}");
                links += 1;
            }
        }
    }
    assert!(links >= 6, "the lease hand-offs are linked ({links} links)");
    let ui = app
        .client
        .get(format!("{}/api/docs", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ui.status().as_u16(), 200);
}

/// Every request body refuses unknown fields (400), so the document must say so, nested
/// objects included: a fuzzer found next-task's `complete` documented as open.
#[tokio::test]
async fn every_request_body_schema_is_closed() {
    fn check(doc: &Value, schema: &Value, at: &str, seen: &mut Vec<String>) {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap();
            if seen.iter().any(|s| s == name) {
                return;
            }
            seen.push(name.to_string());
            let target = &doc["components"]["schemas"][name];
            if target["properties"].is_object() {
                assert_eq!(
                    target["additionalProperties"], false,
                    "{at}: {name} is open"
                );
            }
            return check(doc, target, at, seen);
        }
        for inner in schema["allOf"].as_array().into_iter().flatten() {
            check(doc, inner, at, seen);
        }
        for inner in schema["anyOf"].as_array().into_iter().flatten() {
            check(doc, inner, at, seen);
        }
        if schema["items"].is_object() {
            check(doc, &schema["items"], at, seen);
        }
        for (field, inner) in schema["properties"].as_object().into_iter().flatten() {
            check(doc, inner, &format!("{at}.{field}"), seen);
        }
    }
    let app = spawn_app().await;
    let doc = app.get("/api/openapi.json").await.body;
    let mut bodies = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (_, content) in op["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flatten()
            {
                let schema = &content["schema"];
                bodies += 1;
                check(&doc, schema, &format!("{method} {path}"), &mut Vec::new());
            }
        }
    }
    assert!(bodies >= 15, "{bodies} request bodies");
}

/// The document's links say how a next-task answer feeds the holder's calls; following
/// them literally must complete the task.
#[tokio::test]
async fn following_the_next_task_link_completes_the_task() {
    let app = spawn_app().await;
    let doc = app.get("/api/openapi.json").await.body;
    let link = &doc["paths"]["/api/agents/{agentName}/next-task"]["post"]["responses"]["200"]
        ["links"]["CompleteLeasedTask"];
    assert_eq!(link["operationId"], "completeTask");
    let p = app.project("p").await;
    app.task(&p, json!({"instructions": "x"})).await;
    let answer = app
        .post("/api/agents/a-1/next-task", json!({"projectId": p}))
        .await;
    assert!(answer.data()["task"].is_object());
    // The runtime expressions this link uses: the response body by JSON pointer, and the
    // request's path parameter.
    let eval = |expr: &Value| -> Value {
        let e = expr.as_str().unwrap();
        match e.strip_prefix("$response.body#") {
            Some(pointer) => answer.body.pointer(pointer).cloned().unwrap(),
            None => {
                assert_eq!(e, "$request.path.agentName");
                json!("a-1")
            }
        }
    };
    let task = eval(&link["parameters"]["taskId"]);
    let mut body: serde_json::Map<String, Value> = link["requestBody"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), eval(v)))
        .collect();
    body.insert("result".into(), json!("done"));
    let r = app
        .post(
            &format!("/api/tasks/{}/complete", task.as_str().unwrap()),
            Value::Object(body),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.data()["status"], "completed");
}

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

/// Queued tasks by priority come from the ready index merged with the delayed tasks; the
/// page must be the one the general path gives (asked here with a second status that no
/// task has, which takes the general path).
#[tokio::test]
async fn queued_by_priority_pages_like_the_general_listing() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let other = app.project("other").await;
    let now = app
        .clock
        .as_ref()
        .map(|c| agentq::time::Clock::now(c.as_ref()))
        .unwrap();
    let types = [
        app.task_type(&p, json!({"name": "one"})).await,
        app.task_type(&p, json!({"name": "two"})).await,
    ];
    for i in 0..60u32 {
        let mut body = json!({"instructions": format!("t{i}"), "priority": (i * 7) % 11});
        if i % 3 < 2 {
            body["typeId"] = json!(types[i as usize % 3]);
        }
        if i % 7 == 4 {
            // Queued, but not in the ready index until its time.
            body["notBefore"] = json!(agentq::time::format(now + 60_000 + i64::from(i)));
        }
        app.task(&p, body).await;
    }
    // Tasks that are not queued, and another project's delayed task, stay out.
    for agent in ["a", "b", "c"] {
        app.next(agent, json!({"projectId": p})).await;
    }
    let later = agentq::time::format(now + 60_000);
    app.task(
        &other,
        json!({"instructions": "x", "notBefore": later, "priority": 10}),
    )
    .await;
    let untyped = format!("/api/projects/{p}/tasks?sort=priority");
    let typed = format!("{untyped}&typeId={}", types[1]);
    for (path, order, n) in [
        (&untyped, "asc", 57),
        (&untyped, "desc", 57),
        // 20 of type two, less any the three agents hold.
        (&typed, "asc", 20),
        (&typed, "desc", 20),
    ] {
        let general = app
            .get(&format!(
                "{path}&order={order}&status=queued,cancelled&limit=100"
            ))
            .await;
        let all = ids(general.data());
        assert!(all.len() <= n && all.len() + 3 >= n, "{}", all.len());
        if path == &untyped {
            assert_eq!(all.len(), 57, "three of the 60 are held");
        }
        assert_eq!(general.body["pagination"]["total"], all.len());
        for (limit, offset) in [
            (100, 0),
            (10, 0),
            (10, 5),
            (7, 50),
            (3, 56),
            (5, 57),
            (5, 90),
        ] {
            let q = format!("&order={order}&limit={limit}&offset={offset}");
            let fast = app.get(&format!("{path}&status=queued{q}")).await;
            let slow = app.get(&format!("{path}&status=queued,cancelled{q}")).await;
            assert_eq!(fast.status, 200, "{:?}", fast.body);
            assert_eq!(ids(fast.data()), ids(slow.data()), "{order} {q}");
            assert_eq!(
                fast.body["pagination"], slow.body["pagination"],
                "{order} {q}"
            );
        }
        // Walking by cursor gives every queued task once, in the general order.
        let url = format!("{path}&status=queued&order={order}&limit=8");
        assert_eq!(walk_pages(&app, &url, |_| {}).await, all, "{order}");
    }
    // In creation order too, the total of one type's queued tasks (counted from the index)
    // is the general path's.
    for ty in &types {
        let path = format!("/api/projects/{p}/tasks?typeId={ty}&limit=5");
        let fast = app.get(&format!("{path}&status=queued")).await;
        let slow = app.get(&format!("{path}&status=queued,cancelled")).await;
        assert_eq!(ids(fast.data()), ids(slow.data()));
        assert_eq!(fast.body["pagination"], slow.body["pagination"]);
        assert!(fast.body["pagination"]["total"].as_u64() > Some(15));
    }
    // The order itself: priorities never rise going down a descending page.
    let r = app
        .get(&format!("{untyped}&status=queued&order=desc&limit=100"))
        .await;
    let prios: Vec<u64> = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["priority"].as_u64().unwrap())
        .collect();
    assert!(prios.windows(2).all(|w| w[0] >= w[1]), "{prios:?}");
}

#[tokio::test]
async fn listing_filters_sorts_and_pages() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(
            app.task(
                &p,
                json!({"instructions": format!("t{i}"), "priority": i % 3}),
            )
            .await,
        );
    }
    let path = format!("/api/projects/{p}/tasks");
    // Default: newest first.
    let r = app.get(&format!("{path}?limit=10")).await;
    assert_eq!(r.body["pagination"]["total"], 25);
    assert_eq!(ids(r.data())[0], created[24]);
    // Cursor paging walks everything exactly once, oldest first.
    let seen = walk_pages(&app, &format!("{path}?order=asc&limit=7"), |_| {}).await;
    assert_eq!(seen, created);
    // A cursor the document's pattern allows but beyond every real key is the range's end;
    // paging past either end of the key space (or far past the last offset) is empty.
    let huge_offset = "cursor=o999999999999999999&offset=9223372036854775807";
    for (query, expected) in [
        ("order=asc&cursor=k-9999999999999999999.0", 25),
        ("order=asc&cursor=k0006064.95561927770212144555", 25),
        (
            "order=asc&cursor=k9999999999999999999.99999999999999999999",
            0,
        ),
        (
            "order=asc&cursor=k9223372036854775807.18446744073709551615",
            0,
        ),
        ("order=desc&cursor=k-9223372036854775808.0", 0),
        ("order=desc&cursor=k-9999999999999999999.5", 0),
        ("order=desc&cursor=k9999999999999999999.0", 25),
        ("order=asc&cursor=o0", 25),
        ("order=asc&cursor=o999999999999999999", 0),
        (&format!("sort=createdAt&{huge_offset}"), 0),
        (&format!("sort=priority&{huge_offset}"), 0),
    ] {
        let r = app.get(&format!("{path}?{query}")).await;
        assert_eq!(r.status, 200, "{query}: {:?}", r.body);
        assert_eq!(r.data().as_array().unwrap().len(), expected, "{query}");
    }
    let r = app.get(&format!("{path}?cursor=k12")).await;
    assert_eq!(r.status, 400);
    // Offset paging.
    let r = app
        .get(&format!("{path}?order=asc&limit=5&offset=20"))
        .await;
    assert_eq!(ids(r.data()), created[20..].to_vec());
    // Status filters use the counters for totals.
    let claimed = app.next("a", json!({"projectId": p})).await;
    let r = app.get(&format!("{path}?status=running")).await;
    assert_eq!(r.body["pagination"]["total"], 1);
    assert_eq!(r.data()[0]["id"], claimed["id"]);
    let r = app.get(&format!("{path}?status=queued,running")).await;
    assert_eq!(r.body["pagination"]["total"], 25);
    // Only a running task is assigned, whatever the statuses asked for.
    for (query, total) in [
        ("assignedTo=b", 0),
        ("assignedTo=a&status=queued", 0),
        ("assignedTo=a&status=queued,running", 1),
        ("assignedTo=a&sort=priority", 1),
    ] {
        let r = app.get(&format!("{path}?{query}")).await;
        assert_eq!(r.body["pagination"]["total"], total, "{query}");
        assert_eq!(r.data().as_array().unwrap().len(), total, "{query}");
    }
    let r = app.get(&format!("{path}?assignedTo=a")).await;
    assert_eq!(r.body["pagination"]["total"], 1);
    assert_eq!(r.data()[0]["id"], claimed["id"]);
    // List items leave out attempts and outputs.
    assert!(r.data()[0].get("attempts").is_none());
    // Priority order, walked page by page with the cursor, is (priority, age) either way.
    for order in ["asc", "desc"] {
        let mut expected: Vec<usize> = (0..25).collect();
        expected.sort_by_key(|&i| (i % 3, i));
        if order == "desc" {
            expected.reverse();
        }
        let expected: Vec<String> = expected.into_iter().map(|i| created[i].clone()).collect();
        let url = format!("{path}?sort=priority&order={order}&limit=7");
        let seen = walk_pages(&app, &url, |r| {
            assert_eq!(r.body["pagination"]["total"], 25);
        })
        .await;
        assert_eq!(seen, expected, "{order}");
        let r = app
            .get(&format!(
                "{path}?sort=priority&order={order}&limit=4&offset=10"
            ))
            .await;
        assert_eq!(ids(r.data()), expected[10..14].to_vec(), "{order}");
        let r = app
            .get(&format!("{path}?sort=updatedAt&order={order}&offset=23"))
            .await;
        // The claimed task was updated last; the others tie or follow creation.
        let by_update: Vec<String> = if order == "asc" {
            vec![
                created[24].clone(),
                claimed["id"].as_str().unwrap().to_string(),
            ]
        } else {
            vec![created[1].clone(), created[0].clone()]
        };
        assert_eq!(ids(r.data()), by_update, "{order}");
    }
    // Priority sort.
    let r = app
        .get(&format!("{path}?sort=priority&order=desc&limit=3"))
        .await;
    assert!(r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["priority"] == 2));
    // Time range.
    let first_created = app.get(&format!("/api/tasks/{}", created[0])).await.data()["createdAt"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .get(&format!("{path}?createdBefore={first_created}"))
        .await;
    assert_eq!(r.body["pagination"]["total"], 0);
    let r = app.get(&format!("{path}?sort=name")).await;
    assert_eq!(r.status, 400);
}

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
        ("a", json!({"projectId": p, "typeIds": ["x"]}), 400),
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
    async fn activity(app: &TestApp, p: &str) -> Value {
        let stats = app.get(&format!("/api/projects/{p}/stats")).await;
        stats.data()["recentActivity"].clone()
    }
    assert_eq!(
        activity(&app, &p).await,
        json!({"tasksCompletedLastHour": 0, "tasksFailedLastHour": 0, "averageTaskDuration": null})
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

/// A preflight of `POST /api/projects` from `origin`: its status and the allowed origin.
async fn preflight(app: &TestApp, origin: &str) -> (u16, Option<String>) {
    let r = reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/projects", app.base),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-api-key, content-type")
        .send()
        .await
        .unwrap();
    let allowed = r
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), allowed)
}

async fn with_cors(origins: &str) -> TestApp {
    let origins = origins.to_string();
    start_with_key(tempfile::tempdir().unwrap(), None, None, |c| {
        c.cors_origin = Some(origins)
    })
    .await
}

/// CORS is off unless `--cors-origin` is given; it takes a comma-separated list of origins,
/// with `*` wildcards, or `*` alone for any origin (which answered 403 to every origin, as a
/// literal origin named `*`, before lists and wildcards were read).
#[tokio::test]
async fn cors_allows_the_configured_origins_only() {
    let off = spawn_app().await;
    assert_eq!(preflight(&off, "https://ui.example").await.1, None);

    let app = with_cors("https://ui.example, https://*.corp.example").await;
    for origin in ["https://ui.example", "https://team.corp.example"] {
        let (status, allowed) = preflight(&app, origin).await;
        assert_eq!(status, 200, "{origin}");
        assert_eq!(allowed.as_deref(), Some(origin));
    }
    let (status, allowed) = preflight(&app, "https://evil.example").await;
    assert_eq!((status, allowed), (403, None));
    // A real request from an allowed origin carries the header too.
    let r = app
        .client
        .get(format!("{}/api/projects", app.base))
        .header("origin", "https://ui.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://ui.example"
    );

    let any = with_cors("*").await;
    let (status, allowed) = preflight(&any, "https://evil.example").await;
    assert_eq!(status, 200);
    assert!(allowed.is_some());
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

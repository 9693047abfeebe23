//! The HTTP surface shared by every operation: the error envelope, refused bodies, headers, the OpenAPI document, CORS.

mod common;

use common::*;
use serde_json::{json, Value};

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

//! `/metrics` and `/metrics/json`.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn prometheus_metrics_name_routes_by_template_and_count_tasks() {
    let app = spawn_app().await;
    let p = app.project("obs").await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    let t = app.next("a", json!({"projectId": p})).await;
    assert_eq!(t["id"], id.as_str());
    app.post(
        &format!("/api/tasks/{id}/complete"),
        json!({"agentName": "a"}),
    )
    .await;
    let anon = reqwest::Client::new();
    let invented = reqwest::Method::from_bytes(b"BREW").unwrap();
    anon.request(invented, format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    let r = anon
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for needle in [
        r#"agentq_http_requests_total{method="POST",route="/api/projects",status="201"}"#,
        r#"route="/api/tasks/{taskId}/complete""#,
        r#"route="/api/agents/{agentName}/next-task""#,
        "agentq_http_request_duration_seconds_bucket",
        &format!(r#"agentq_tasks_created_total{{project="{p}"}} 1"#),
        &format!(r#"agentq_tasks_claimed_total{{project="{p}"}} 1"#),
        &format!(r#"agentq_tasks_completed_total{{project="{p}"}} 1"#),
        &format!(r#"agentq_tasks{{project="{p}",status="completed"}} 1"#),
        &format!(r#"agentq_active_leases{{project="{p}"}} 0"#),
        "agentq_storage_commit_duration_seconds_bucket",
        "agentq_storage_commit_batch_size_bucket",
        "agentq_storage_size_bytes",
        "agentq_long_poll_waiters",
        "agentq_build_info{version=",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
        &format!(r#"agentq_project_info{{project="{p}",name="obs"}} 1"#),
        "# HELP agentq_tasks_lease_expired_total ",
        "# HELP agentq_storage_commit_duration_seconds ",
        // Series that have seen no event yet are there, at zero, so they can be alerted on.
        &format!(r#"agentq_tasks_failed_total{{project="{p}"}} 0"#),
        &format!(r#"agentq_tasks_cancelled_total{{project="{p}"}} 0"#),
        "agentq_rate_limited_total ",
        "# HELP agentq_storage_batches_unwritten_total ",
        "agentq_storage_batches_unwritten_total ",
        "# HELP agentq_storage_failures_total ",
        "agentq_storage_failures_total 0",
        "agentq_http_connections_open ",
        "agentq_http_connections_total ",
        "# HELP agentq_http_connections_idle_closed_total ",
        "agentq_http_accept_errors_total ",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(
        !text.contains(&format!("/api/tasks/{id}")),
        "raw ids never become labels"
    );
    assert!(
        text.contains(r#"method="OTHER""#) && !text.contains("BREW"),
        "invented methods share one label"
    );
}

/// A deleted project's series leave `/metrics`: its gauges would otherwise show its last task
/// counts forever (and fire queue-depth alerts for a queue that no longer exists). A renamed
/// project's name series follows the rename.
#[tokio::test]
async fn a_deleted_or_renamed_project_leaves_the_metrics() {
    let app = spawn_app().await;
    let gone = app.project("gone").await;
    let kept = app.project("kept").await;
    app.task(&gone, json!({"instructions": "x"})).await;
    app.task(&kept, json!({"instructions": "x"})).await;
    let scrape = || async {
        let r = reqwest::Client::new()
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    };
    let queued = |p: &str| format!(r#"agentq_tasks{{project="{p}",status="queued"}} 1"#);
    let text = scrape().await;
    assert!(text.contains(&queued(&gone)) && text.contains(&queued(&kept)));
    assert_eq!(
        app.delete(&format!("/api/projects/{gone}")).await.status,
        200
    );
    let text = scrape().await;
    assert!(
        !text.contains(&gone),
        "a deleted project's series remain:\n{text}"
    );
    assert!(text.contains(&queued(&kept)));
    assert!(text.contains(&format!(
        r#"agentq_tasks_created_total{{project="{kept}"}} 1"#
    )));
    let renamed = app
        .put(&format!("/api/projects/{kept}"), json!({"name": "kept2"}))
        .await;
    assert_eq!(renamed.status, 200, "{:?}", renamed.body);
    let text = scrape().await;
    assert!(text.contains(&format!(
        r#"agentq_project_info{{project="{kept}",name="kept2"}} 1"#
    )));
    assert!(!text.contains(r#"name="kept""#), "{text}");
}

#[tokio::test]
async fn lease_expiry_and_auth_failures_are_counted() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("obs2").await;
    app.minute_task(&p).await;
    app.next("a", json!({"projectId": p})).await;
    app.advance(60_000).await;
    let bad = client_with_key("aq_00000000000000000000000000000001_nope");
    app.call_with(&bad, "GET", "/api/projects", None).await;
    // The reaper's counters are published just after its commit: look for up to 2 s.
    let want = format!(r#"agentq_tasks_lease_expired_total{{project="{p}"}} 1"#);
    let mut text = String::new();
    for _ in 0..200 {
        text = reqwest::get(format!("{}/metrics", app.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(&want) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(text.contains(&want), "{text}");
    assert!(text.contains(&format!(r#"agentq_tasks_retried_total{{project="{p}"}} 1"#)));
    let reclaimed = r#"agentq_task_run_seconds_count{outcome="timeout"}"#;
    assert!(metric_value(&text, reclaimed) >= 1.0, "{text}");
    assert!(text.contains("agentq_auth_failures_total"));
}

/// `GET /metrics/json`, without a key.
async fn json_metrics(app: &TestApp) -> serde_json::Value {
    reqwest::get(format!("{}/metrics/json", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn json_metrics_follow_the_seed() {
    let app = spawn_app().await;
    app.get("/api/projects").await;
    let v = json_metrics(&app).await;
    assert_eq!(v["success"], true);
    let d = &v["data"];
    assert!(d["requests_total"].as_u64().unwrap() >= 1);
    assert!(d["requests_success"].is_u64());
    assert!(d["requests_error"].is_u64());
    assert!(d["response_time_avg"].is_number());
    assert!(d["active_sessions"].is_u64());
    assert!(d["system"]["memory_usage"].as_f64().unwrap() > 0.0);
    assert!(d["system"]["cpu_usage"].is_number());
    assert!(d["system"]["uptime"].is_u64());
}

/// `active_sessions` counts the sessions not yet expired, without reading every session.
#[tokio::test]
async fn json_metrics_count_live_sessions() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("s").await;
    let active = || async {
        json_metrics(&app).await["data"]["active_sessions"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(active().await, 0);
    for agent in ["a", "b"] {
        let r = app
            .post(
                "/api/auth/login",
                json!({"agentName": agent, "projectId": p}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(active().await, 2);
    app.advance(24 * 3_600_000 + 1).await;
    assert_eq!(active().await, 0, "both expired");
}

/// The wait of the project's queue, as `/metrics` gives it.
async fn queue_wait(app: &TestApp, project: &str) -> f64 {
    let series = format!(r#"agentq_queue_wait_seconds{{project="{project}"}}"#);
    app.metric(&series).await
}

/// How long work has waited is the first thing to alert on in a queue (SQS's age of the
/// oldest message; `agentq_task_wait_seconds` is how long the tasks handed out waited). It
/// must show a low-priority task starved by higher ones, count a
/// delayed task from its `notBefore`, not from its creation, and not page anyone for a
/// project that was closed on purpose.
#[tokio::test]
async fn queue_wait_is_the_longest_wait_at_the_front_of_the_queue() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("waits").await;
    assert_eq!(queue_wait(&app, &p).await, 0.0, "nothing queued");
    app.task(&p, json!({"instructions": "low", "priority": 1}))
        .await;
    app.advance(30_000).await;
    app.task(&p, json!({"instructions": "high", "priority": 9}))
        .await;
    app.advance(10_000).await;
    assert_eq!(queue_wait(&app, &p).await, 40.0);
    let high = app.next("a", json!({"projectId": p})).await;
    assert_eq!(high["instructions"], "high");
    assert_eq!(queue_wait(&app, &p).await, 40.0, "the low task still waits");
    app.next("b", json!({"projectId": p})).await;
    assert_eq!(queue_wait(&app, &p).await, 0.0, "nothing ready");
    // The two claims recorded how long their tasks had waited: 10 s and 40 s. Other tests of
    // this process record waits under a second (the histogram has no project label).
    let bucket = |le: &str| format!(r#"agentq_task_wait_seconds_bucket{{le="{le}"}}"#);
    let between_30_and_60 = count_between(&app, bucket, "30", "60").await;
    assert_eq!(between_30_and_60, 1.0, "the low task waited 40 s");
    // The clock started at 2026-01-01T00:00:00Z and stands at 00:00:40.
    app.task(
        &p,
        json!({"instructions": "later", "notBefore": "2026-01-01T00:01:40.000Z"}),
    )
    .await;
    assert_eq!(
        queue_wait(&app, &p).await,
        0.0,
        "a delayed task is not ready"
    );
    app.advance(90_000).await;
    assert_eq!(
        queue_wait(&app, &p).await,
        30.0,
        "ready since its notBefore"
    );
    let project = format!("/api/projects/{p}");
    app.put(&project, json!({"status": "closed"})).await;
    let closed = queue_wait(&app, &p).await;
    assert_eq!(closed, 0.0, "a closed project hands out nothing");
}

/// The count in one bucket range of `agentq_task_run_seconds` for an outcome.
async fn runs_between(app: &TestApp, outcome: &str, above: &str, upto: &str) -> f64 {
    let bucket =
        |le: &str| format!(r#"agentq_task_run_seconds_bucket{{outcome="{outcome}",le="{le}"}}"#);
    count_between(app, bucket, above, upto).await
}

/// How many samples of a histogram fell in (`above`, `upto`], from one scrape: between two
/// scrapes, other tests of this process record samples below `above` too.
async fn count_between(
    app: &TestApp,
    bucket: impl Fn(&str) -> String,
    above: &str,
    upto: &str,
) -> f64 {
    let text = app.metrics_text().await;
    metric_value(&text, &bucket(upto)) - metric_value(&text, &bucket(above))
}

/// How long agents take is the other half of a queue's latency: a lease's run time is
/// recorded when it ends, under how it ended. No other test of this process holds a lease
/// for more than half an hour, so the long buckets count only this test's leases.
#[tokio::test]
async fn lease_run_times_are_recorded_by_outcome() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("runs").await;
    let ty = app
        .task_type(&p, json!({"name": "day", "leaseDurationMinutes": 1440}))
        .await;
    for i in 0..3 {
        app.task(&p, json!({"typeId": ty, "instructions": format!("t{i}")}))
            .await;
    }
    let done = app.next("a", json!({"projectId": p})).await;
    let failed = app.next("b", json!({"projectId": p})).await;
    let cancelled = app.next("c", json!({"projectId": p})).await;
    app.advance(45 * 60_000).await;
    let fail = format!("/api/tasks/{}/fail", failed["id"].as_str().unwrap());
    let r = app
        .post(
            &fail,
            json!({"agentName": "b", "error": "no", "canRetry": false}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.advance(75 * 60_000).await;
    let complete = format!("/api/tasks/{}/complete", done["id"].as_str().unwrap());
    let r = app
        .post(&complete, json!({"agentName": "a", "result": "ok"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let cancel = format!("/api/tasks/{}/cancel", cancelled["id"].as_str().unwrap());
    assert_eq!(app.post(&cancel, json!({})).await.status, 200);
    assert_eq!(
        runs_between(&app, "failed", "1800", "3600").await,
        1.0,
        "failed after 45 minutes"
    );
    assert_eq!(
        runs_between(&app, "completed", "3600", "21600").await,
        1.0,
        "completed after 2 hours"
    );
    assert_eq!(
        runs_between(&app, "cancelled", "3600", "21600").await,
        1.0,
        "cancelled after 2 hours"
    );
}

/// A long-poll whose client gives up before the answer is counted as abandoned; one that ends
/// with its answer (here: none after its wait) is not.
#[tokio::test]
async fn long_polls_whose_client_leaves_are_counted() {
    let app = spawn_app().await;
    let p = app.project("abandon").await;
    let name = "agentq_long_polls_abandoned_total";
    let before = app.metric(name).await;
    app.next("answered", json!({"projectId": p, "waitSeconds": 0.2}))
        .await;
    assert_eq!(app.metric(name).await, before, "an answered long-poll");
    // A client whose timeout is shorter than its waitSeconds.
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/api/agents/impatient/next-task", app.base))
        .header("X-API-Key", &app.admin_key)
        .json(&json!({"projectId": p, "waitSeconds": 30}))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    // The server notices the closed connection and drops the request.
    assert_eq!(app.metric_above(name, before).await, before + 1.0);
    assert_eq!(app.metric("agentq_long_poll_waiters").await, 0.0);
}

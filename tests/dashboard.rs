//! What the dashboard needs of the server: its pages and their headers, key-scoped sessions,
//! every project's stats in one answer, the listing filters it offers and agents' last seen.
//! The pages themselves are driven in a real browser by tests/dashboard.py.

mod common;

use common::*;
use serde_json::{json, Value};

fn bearer(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn anonymous() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn login(app: &TestApp, key: &str, body: Value) -> Resp {
    app.call_with(&client_with_key(key), "POST", "/api/auth/login", Some(body))
        .await
}

#[tokio::test]
async fn the_pages_are_served_with_a_strict_policy_and_redirects_that_keep_a_prefix() {
    let app = spawn_app().await;
    let c = anonymous();
    for path in ["/", "/ui"] {
        let r = app.call_with(&c, "GET", path, None).await;
        assert_eq!(r.status, 302, "{path}");
        // Relative: behind a proxy at /queue/, the browser goes to /queue/ui/.
        assert_eq!(r.headers["location"], "ui/", "{path}");
    }
    let page = app.call_with(&c, "GET", "/ui/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    let html = page.body.as_str().unwrap();
    assert!(html.contains(r#"src="app.js""#), "assets are relative");
    assert!(!html.contains("<script>"), "no inline script");
    for (file, kind) in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let r = app.call_with(&c, "GET", &format!("/ui/{file}"), None).await;
        assert_eq!(r.status, 200, "{file}");
        assert!(r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
        // Revalidated with its tag: 304 without a body.
        let tag = r.headers["etag"].to_str().unwrap().to_string();
        let again = c
            .get(format!("{}/ui/{file}", app.base))
            .header("if-none-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status().as_u16(), 304);
    }
    let missing = app.call_with(&c, "GET", "/ui/nothing.js", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.code(), "NOT_FOUND");
    assert_eq!(app.call_with(&c, "POST", "/ui/", None).await.status, 405);
}

#[tokio::test]
async fn no_ui_turns_the_pages_off() {
    let dir = tempfile::tempdir().unwrap();
    let app = start_with_key(dir, None, None, |c| c.ui = false).await;
    let c = anonymous();
    for path in ["/", "/ui", "/ui/", "/ui/app.js"] {
        assert_eq!(
            app.call_with(&c, "GET", path, None).await.status,
            404,
            "{path}"
        );
    }
    assert_eq!(app.get("/health").await.status, 200);
}

#[tokio::test]
async fn a_key_scoped_session_has_exactly_its_keys_rights() {
    let app = spawn_app().await;
    let p = app.project("mine").await;
    let other = app.project("theirs").await;
    let (_, producer) = app.key("producer", Some(vec![&p])).await;

    let r = login(&app, &producer, json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let token = r.data()["token"].as_str().unwrap().to_string();
    let s = bearer(&token);
    let me = app.call_with(&s, "GET", "/api/auth/session", None).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.data()["role"], "producer");
    assert_eq!(me.data()["projects"], json!([p]));
    assert_eq!(me.data()["allowScripts"], false);
    assert!(me.data().get("agentName").is_none() && me.data().get("projectId").is_none());

    // The key's projects, no others.
    let listed = app.call_with(&s, "GET", "/api/projects", None).await;
    assert_eq!(ids(&listed.body["data"]), vec![p.clone()]);
    let hidden = app
        .call_with(&s, "GET", &format!("/api/projects/{other}"), None)
        .await;
    assert_eq!(hidden.status, 404);
    // The key's rights: a producer creates and cancels, but is no agent.
    let t = app
        .call_with(
            &s,
            "POST",
            &format!("/api/projects/{p}/tasks"),
            Some(json!({"instructions": "x"})),
        )
        .await;
    assert_eq!(t.status, 201, "{:?}", t.body);
    let id = t.data()["id"].as_str().unwrap();
    let next = app
        .call_with(
            &s,
            "POST",
            "/api/agents/a1/next-task",
            Some(json!({"projectId": p})),
        )
        .await;
    assert_eq!(next.status, 403);
    let cancel = app
        .call_with(
            &s,
            "POST",
            &format!("/api/tasks/{id}/cancel"),
            Some(json!({})),
        )
        .await;
    assert_eq!(cancel.status, 200);

    // A viewer's session is refused every action, whatever the page shows.
    let (_, viewer) = app.key("viewer", None).await;
    let v = login(&app, &viewer, json!({})).await;
    let vs = bearer(v.data()["token"].as_str().unwrap());
    let retry = app
        .call_with(&vs, "POST", &format!("/api/tasks/{id}/retry"), None)
        .await;
    assert_eq!(retry.status, 403);
    assert_eq!(
        app.get(&format!("/api/tasks/{id}")).await.data()["status"],
        "cancelled"
    );

    // Half a binding is refused and makes no session.
    for body in [
        json!({"agentName": "a1"}),
        json!({"projectId": p}),
        json!({"agentName": null}),
        json!({"agentName": "a1", "projectId": null}),
    ] {
        let r = login(&app, &producer, body).await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.code(), "VALIDATION_ERROR");
    }
    // Logout ends it on the server.
    let out = app.call_with(&s, "POST", "/api/auth/logout", None).await;
    assert_eq!(out.status, 200);
    assert_eq!(
        app.call_with(&s, "GET", "/api/auth/session", None)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn an_agent_session_still_shows_its_binding() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let r = login(
        &app,
        &app.admin_key,
        json!({"agentName": "a1", "projectId": p}),
    )
    .await;
    let s = bearer(r.data()["token"].as_str().unwrap());
    let me = app.call_with(&s, "GET", "/api/auth/session", None).await;
    assert_eq!(me.data()["agentName"], "a1");
    assert_eq!(me.data()["projectId"], p.as_str());
    assert_eq!(me.data()["role"], "admin");
    assert_eq!(me.data()["projects"], Value::Null);
}

#[tokio::test]
async fn every_visible_projects_stats_come_in_one_answer() {
    let app = spawn_with_manual_clock().await;
    let a = app.project("a").await;
    let b = app.project("b").await;
    app.task(&a, json!({"instructions": "one"})).await;
    app.task(&a, json!({"instructions": "two"})).await;
    let all = app.get("/api/stats").await;
    assert_eq!(all.status, 200);
    assert_eq!(all.body["pagination"]["total"], 2);
    let first = &all.body["data"][0];
    assert_eq!(first["project"]["id"], a.as_str());
    assert_eq!(first["status"], "active");
    assert_eq!(first["queueDepth"], 2);
    assert_eq!(
        first["recentActivity"]["perMinute"]
            .as_array()
            .unwrap()
            .len(),
        60
    );
    assert!(first["oldestQueuedAgeSeconds"].as_f64().is_some());
    // What one project's stats answer says, the same.
    let one = app.get(&format!("/api/projects/{a}/stats")).await;
    assert_eq!(first, one.data());

    let (_, scoped) = app.key("viewer", Some(vec![&b])).await;
    let seen = app
        .call_with(&client_with_key(&scoped), "GET", "/api/stats", None)
        .await;
    assert_eq!(seen.body["pagination"]["total"], 1);
    assert_eq!(seen.body["data"][0]["project"]["id"], b.as_str());

    app.put(&format!("/api/projects/{b}"), json!({"status": "closed"}))
        .await;
    assert_eq!(app.get("/api/stats").await.body["pagination"]["total"], 1);
    let all = app.get("/api/stats?status=all").await;
    assert_eq!(all.body["data"][1]["status"], "closed");
    assert_eq!(app.get("/api/stats?limit=0").await.status, 400);
}

#[tokio::test]
async fn the_listing_filters_by_priority_and_last_change() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let low = app
        .task(&p, json!({"instructions": "low", "priority": 1}))
        .await;
    let high = app
        .task(&p, json!({"instructions": "high", "priority": 7}))
        .await;
    app.advance(60_000).await;
    let before_edit = app.get(&format!("/api/tasks/{high}")).await.data()["updatedAt"]
        .as_str()
        .unwrap()
        .to_string();
    app.advance(1_000).await;
    let r = app
        .post(&format!("/api/tasks/{low}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 200);
    let changed_at = r.data()["updatedAt"].as_str().unwrap().to_string();

    let list = |q: String| {
        let app = &app;
        let p = p.clone();
        async move {
            let r = app.get(&format!("/api/projects/{p}/tasks?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {:?}", r.body);
            (ids(&r.body["data"]), r.body["pagination"]["total"].clone())
        }
    };
    assert_eq!(
        list("priority=7".into()).await,
        (vec![high.clone()], json!(1))
    );
    assert_eq!(
        list("priority=7&sort=priority".into()).await,
        (vec![high.clone()], json!(1))
    );
    assert_eq!(
        list("priority=1&status=queued".into()).await,
        (vec![], json!(0))
    );
    assert_eq!(
        list(format!("updatedAfter={before_edit}")).await,
        (vec![low.clone()], json!(1))
    );
    assert_eq!(
        list(format!("updatedBefore={changed_at}")).await,
        (vec![high.clone()], json!(1))
    );
    assert_eq!(
        list(format!("updatedAfter={before_edit}&sort=updatedAt")).await,
        (vec![low.clone()], json!(1))
    );
    for bad in ["priority=11", "priority=x", "updatedAfter=yesterday"] {
        let r = app.get(&format!("/api/projects/{p}/tasks?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn agents_show_when_they_were_last_seen() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    app.task(&p, json!({"instructions": "x"})).await;
    let t = app.next("a1", json!({"projectId": p})).await;
    let id = t["id"].as_str().unwrap().to_string();
    let token = t["leaseToken"].as_str().unwrap().to_string();
    let first = app.get(&format!("/api/projects/{p}/agents")).await;
    let row = &first.body["data"][0];
    assert_eq!(row["agentName"], "a1");
    assert_eq!(row["lastSeenAt"], row["assignedAt"]);

    app.advance(90_000).await;
    let r = app
        .post(
            &format!("/api/tasks/{id}/progress"),
            json!({"agentName": "a1", "leaseToken": token, "current": 1, "total": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let later = app.get(&format!("/api/projects/{p}/agents")).await;
    let seen = later.body["data"][0]["lastSeenAt"].as_str().unwrap();
    let assigned = row["assignedAt"].as_str().unwrap();
    let ms = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
    };
    assert_eq!(
        (ms(seen) - ms(assigned)).whole_seconds(),
        90,
        "{seen} {assigned}"
    );
}

#[tokio::test]
async fn the_page_works_when_cors_lists_other_origins() {
    let dir = tempfile::tempdir().unwrap();
    let app = start_with_key(dir, None, None, |c| {
        c.cors_origin = Some("https://other.example".into())
    })
    .await;
    let own = app.base.clone();
    let host = own.trim_start_matches("http://").to_string();
    let login = |origin: String, forwarded: Option<&'static str>| {
        let mut req = client_with_key(&app.admin_key)
            .post(format!("{}/api/auth/login", app.base))
            .header("origin", origin)
            .json(&json!({}));
        if let Some(f) = forwarded {
            req = req.header("x-forwarded-host", f);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // The dashboard's own POSTs carry its origin: the same as the server's, so no CORS check.
    assert_eq!(login(own.clone(), None).await, 200);
    // Behind a proxy that names the public host.
    assert_eq!(
        login("https://queue.example".into(), Some("queue.example")).await,
        200
    );
    // Another origin is CORS's to judge: listed, it passes; not listed, refused.
    assert_eq!(login("https://other.example".into(), None).await, 200);
    assert_ne!(login("https://evil.example".into(), None).await, 200);
    assert!(host.starts_with("127.0.0.1:"));
}

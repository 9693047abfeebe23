//! Keys, sessions, roles, scoping and limits, from the outside.

mod common;

use common::*;
use serde_json::{json, Value};

/// Fresh objects for one probe, created with the admin key.
struct Fixture {
    project: String,
    type_id: String,
    task: String,
    leased: String,
}

async fn fixture(app: &TestApp, name: &str) -> Fixture {
    let project = app.project(name).await;
    let type_id = app.task_type(&project, json!({"name": "t"})).await;
    let leased = app.task(&project, json!({"instructions": "leased"})).await;
    let got = app.next("worker", json!({"projectId": project})).await;
    assert_eq!(got["id"], leased.as_str());
    let task = app.task(&project, json!({"instructions": "queued"})).await;
    Fixture {
        project,
        type_id,
        task,
        leased,
    }
}

const ROLES: [&str; 4] = ["admin", "producer", "agent", "viewer"];

/// Each role against each endpoint: allowed roles never get 401/403, the others get 403.
#[tokio::test]
async fn role_by_endpoint_matrix() {
    let app = spawn_app().await;
    let mut keys = Vec::new();
    for role in ROLES {
        let (_, k) = app.key(role, None).await;
        keys.push((role, client_with_key(&k)));
    }
    let (victim_key, _) = app.key("viewer", None).await;
    // (method, path, body, roles allowed)
    type Probe = (&'static str, String, Option<Value>, &'static [&'static str]);
    let all: &[&str] = &ROLES;
    let producers: &[&str] = &["admin", "producer"];
    let agents: &[&str] = &["admin", "agent"];
    let admins: &[&str] = &["admin"];
    let mut n = 0;
    for (role, client) in &keys {
        n += 1;
        let f = fixture(&app, &format!("m{n}")).await;
        let (p, t, x, l) = (&f.project, &f.type_id, &f.task, &f.leased);
        let probes: Vec<Probe> = vec![
            ("GET", "/api/projects".into(), None, all),
            (
                "POST",
                "/api/projects".into(),
                Some(json!({"name": format!("new{n}"), "description": "d"})),
                producers,
            ),
            ("GET", format!("/api/projects/{p}"), None, all),
            (
                "PUT",
                format!("/api/projects/{p}"),
                Some(json!({"description": "x"})),
                producers,
            ),
            ("GET", format!("/api/projects/{p}/stats"), None, all),
            ("GET", format!("/api/projects/{p}/task-types"), None, all),
            (
                "POST",
                format!("/api/projects/{p}/task-types"),
                Some(json!({"name": "t2"})),
                producers,
            ),
            ("GET", format!("/api/task-types/{t}"), None, all),
            (
                "PUT",
                format!("/api/task-types/{t}"),
                Some(json!({"maxRetries": 1})),
                producers,
            ),
            ("GET", format!("/api/projects/{p}/tasks"), None, all),
            (
                "POST",
                format!("/api/projects/{p}/tasks"),
                Some(json!({"instructions": "x"})),
                producers,
            ),
            (
                "POST",
                format!("/api/projects/{p}/tasks/bulk"),
                Some(json!({"tasks": [{"instructions": "x"}]})),
                producers,
            ),
            ("GET", format!("/api/tasks/{x}"), None, all),
            (
                "PUT",
                format!("/api/tasks/{x}"),
                Some(json!({"priority": 9})),
                producers,
            ),
            ("GET", format!("/api/tasks/{x}/attempts"), None, all),
            ("GET", format!("/api/projects/{p}/agents"), None, all),
            (
                "GET",
                format!("/api/projects/{p}/peek-next-task"),
                None,
                all,
            ),
            (
                "POST",
                "/api/agents/worker/next-task".into(),
                Some(json!({"projectId": p})),
                agents,
            ),
            (
                "POST",
                format!("/api/tasks/{l}/progress"),
                Some(json!({"agentName": "worker", "current": 1, "total": 2})),
                agents,
            ),
            (
                "POST",
                format!("/api/tasks/{l}/extend-lease"),
                Some(json!({"agentName": "worker", "extensionMinutes": 5})),
                agents,
            ),
            (
                "POST",
                format!("/api/tasks/{l}/complete"),
                Some(json!({"agentName": "worker", "result": "ok"})),
                agents,
            ),
            (
                "POST",
                format!("/api/tasks/{x}/fail"),
                Some(json!({"agentName": "worker", "error": "e"})),
                agents,
            ),
            (
                "POST",
                format!("/api/projects/{p}/cleanup-leases"),
                None,
                producers,
            ),
            ("POST", format!("/api/tasks/{x}/cancel"), None, producers),
            ("POST", format!("/api/tasks/{x}/retry"), None, producers),
            ("DELETE", format!("/api/tasks/{x}"), None, producers),
            ("DELETE", format!("/api/task-types/{t}"), None, producers),
            ("GET", "/api/keys".into(), None, admins),
            (
                "POST",
                "/api/keys".into(),
                Some(json!({"name": "k", "role": "viewer"})),
                admins,
            ),
            (
                "POST",
                "/api/auth/login".into(),
                Some(json!({"agentName": "worker", "projectId": p})),
                all,
            ),
            ("DELETE", format!("/api/projects/{p}"), None, producers),
        ];
        for (method, path, body, allowed) in probes {
            let r = app.call_with(client, method, &path, body).await;
            if allowed.contains(role) {
                assert!(
                    r.status != 401 && r.status != 403 && r.status < 500,
                    "{role} {method} {path}: {} {:?}",
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(
                    (r.status, r.code()),
                    (403, "FORBIDDEN"),
                    "{role} {method} {path}: {:?}",
                    r.body
                );
            }
        }
        let r = app
            .call_with(client, "DELETE", &format!("/api/keys/{victim_key}"), None)
            .await;
        if *role == "admin" {
            assert_eq!(r.status, 200);
        } else {
            assert_eq!(r.status, 403, "{role} may not revoke keys");
        }
    }
}

/// A first start that could not listen (its port taken) stored the generated admin key before
/// binding and stopped without showing it; the next start found a key and printed none, so a
/// new database was locked from its first minute. The key is now made only once the port is
/// bound, and the file such a start created is removed again.
#[tokio::test]
async fn a_first_start_that_cannot_listen_makes_no_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentq.redb");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = agentq::server::Config::new(db.clone(), taken.local_addr().unwrap().to_string());
    let refused = agentq::server::Server::start(config).await.err();
    assert!(
        matches!(refused, Some(agentq::server::StartError::Bind(..))),
        "the port is taken"
    );
    assert!(!db.exists(), "no empty database is left behind");
    drop(taken);
    // Panics unless this start generates (and so shows) the first admin key.
    let app = start_in(dir, None).await;
    assert_eq!(app.get("/api/keys").await.status, 200);
}

/// A typo in a path answered 401 "missing credentials" to a caller without a key, which sent
/// them looking for a key problem. Routes are public (the OpenAPI document lists them), so a
/// path or method that names no operation is a 404 or 405 without a key; every operation
/// still needs one, and a key that is sent is still checked.
#[tokio::test]
async fn a_path_that_names_no_operation_is_404_without_a_key() {
    let app = spawn_app().await;
    let anon = reqwest::Client::new();
    for (method, path, status) in [
        ("GET", "/nope", 404),
        ("GET", "/api/nope", 404),
        ("POST", "/api/projects/p/nope", 404),
        ("PATCH", "/api/projects", 405),
        ("DELETE", "/health", 405),
        ("OPTIONS", "/api/projects", 405),
        ("GET", "/api/projects", 401),
        ("HEAD", "/api/projects", 401),
        ("POST", "/api/agents/a/next-task", 401),
        ("DELETE", "/api/projects/p", 401),
    ] {
        let r = anon
            .request(method.parse().unwrap(), format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
    }
    let r = app.call_with(&anon, "GET", "/api/nope", None).await;
    assert_eq!(r.code(), "NOT_FOUND");
    // A credential is still checked (and counted) wherever it is sent.
    let bad = client_with_key("aq_00000000000000000000000000000000_nope");
    assert_eq!(
        app.call_with(&bad, "GET", "/api/nope", None).await.status,
        401
    );
    assert_eq!(app.get("/api/nope").await.status, 404);
}

#[tokio::test]
async fn requests_without_valid_credentials_get_401() {
    let app = spawn_app().await;
    let anon = reqwest::Client::new();
    let r = app.call_with(&anon, "GET", "/api/projects", None).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    assert!(r.body["correlationId"].is_string());
    let bad = client_with_key("aq_00000000000000000000000000000000_nope");
    assert_eq!(
        app.call_with(&bad, "GET", "/api/projects", None)
            .await
            .status,
        401
    );
    let bearer = reqwest::Client::new()
        .get(format!("{}/api/projects", app.base))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        bearer.status().as_u16(),
        200,
        "Authorization: Bearer works too"
    );
    for public in ["/health", "/api/openapi.json"] {
        assert_eq!(
            app.call_with(&anon, "GET", public, None).await.status,
            200,
            "{public}"
        );
    }
    let docs = anon
        .get(format!("{}/api/docs", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status().as_u16(), 200);
}

/// A key is its secret, not its id: the id of a real key with any other secret is refused,
/// and so is any text other than an operator-chosen admin key (which has no id to look up,
/// so every unformatted text is checked against its hash).
#[tokio::test]
async fn a_known_key_id_with_another_secret_gets_401() {
    let app = spawn_app().await;
    let (_, agent_key) = app.key("agent", None).await;
    for real in [app.admin_key.clone(), agent_key] {
        let (head, secret) = real.rsplit_once('_').unwrap();
        let last = secret.chars().last().unwrap();
        let flipped = if last == '0' { '1' } else { '0' };
        let forged = format!("{head}_{}{flipped}", &secret[..secret.len() - 1]);
        let r = app
            .call_with(&client_with_key(&forged), "GET", "/api/projects", None)
            .await;
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{forged}");
        let r = app
            .call_with(&client_with_key(&real), "GET", "/api/projects", None)
            .await;
        assert_eq!(r.status, 200);
    }

    let chosen = "an-operator-chosen-admin-key-0123";
    let dir = tempfile::tempdir().unwrap();
    let app = start_with_key(dir, None, Some(chosen.into()), |c| {
        c.admin_key = Some(chosen.into())
    })
    .await;
    for other in ["an-operator-chosen-admin-key-0124", "anything-else-at-all"] {
        let r = app
            .call_with(&client_with_key(other), "GET", "/api/projects", None)
            .await;
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{other}");
    }
    let r = app
        .call_with(&client_with_key(chosen), "GET", "/api/projects", None)
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_scoped_key_sees_only_its_projects() {
    let app = spawn_app().await;
    let a = fixture(&app, "alpha").await;
    let b = fixture(&app, "beta").await;
    let (_, key) = app.key("producer", Some(vec!["alpha"])).await;
    let c = client_with_key(&key);
    let get = |path: String| {
        let app = &app;
        let c = c.clone();
        async move { app.call_with(&c, "GET", &path, None).await }
    };
    assert_eq!(
        get(format!("/api/projects/{}", a.project)).await.status,
        200
    );
    for path in [
        format!("/api/projects/{}", b.project),
        "/api/projects/beta".to_string(),
        format!("/api/projects/{}/tasks", b.project),
        format!("/api/projects/{}/stats", b.project),
        format!("/api/projects/{}/task-types", b.project),
        format!("/api/projects/{}/agents", b.project),
        format!("/api/projects/{}/peek-next-task", b.project),
        format!("/api/tasks/{}", b.task),
        format!("/api/tasks/{}/attempts", b.task),
        format!("/api/task-types/{}", b.type_id),
    ] {
        let r = get(path.clone()).await;
        assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{path}");
    }
    // next-task checks the scope inside its write: the same answers as a read first would
    // give. Outside the scope 404 whatever the role; inside, a producer lacks the right.
    let (_, agent_key) = app.key("agent", Some(vec!["alpha"])).await;
    let agent = client_with_key(&agent_key);
    for (client, project, wait, status) in [
        (&c, &b.project, 0, 404),
        (&c, &a.project, 0, 403),
        (&agent, &b.project, 0, 404),
        (&agent, &"beta".to_string(), 0, 404),
        (&agent, &b.project, 1, 404),
        (&agent, &a.project, 0, 200),
    ] {
        let r = app
            .call_with(
                client,
                "POST",
                "/api/agents/w/next-task",
                Some(json!({"projectId": project, "waitSeconds": wait})),
            )
            .await;
        assert_eq!(r.status, status, "{project} wait {wait}: {:?}", r.body);
    }
    // The holder operations check the scope inside their writes too. In scope, the agent
    // holds the task it leased above: it reports, extends and completes it; then fail finds
    // it completed (409), refused by the lease, not the scope.
    for (op, body, own) in [
        (
            "progress",
            json!({"agentName": "w", "current": 1, "total": 2}),
            200,
        ),
        (
            "extend-lease",
            json!({"agentName": "w", "extensionMinutes": 5}),
            200,
        ),
        ("complete", json!({"agentName": "w"}), 200),
        ("fail", json!({"agentName": "w"}), 409),
    ] {
        for (client, task, status) in [
            (&agent, &b.task, 404),
            (&c, &b.task, 404),
            (&c, &a.task, 403),
            (&agent, &a.task, own),
        ] {
            let r = app
                .call_with(
                    client,
                    "POST",
                    &format!("/api/tasks/{task}/{op}"),
                    Some(body.clone()),
                )
                .await;
            assert_eq!(r.status, status, "{op} {task}: {:?}", r.body);
        }
    }
    let list = get("/api/projects?status=all".into()).await;
    assert_eq!(list.body["pagination"]["total"], 1);
    assert_eq!(list.data()[0]["name"], "alpha");
    for (method, path, body) in [
        (
            "POST",
            format!("/api/projects/{}/tasks", b.project),
            json!({"instructions": "x"}),
        ),
        (
            "PUT",
            format!("/api/tasks/{}", b.task),
            json!({"priority": 1}),
        ),
        ("POST", format!("/api/tasks/{}/cancel", b.task), json!({})),
        (
            "DELETE",
            format!("/api/task-types/{}", b.type_id),
            json!({}),
        ),
        (
            "PUT",
            "/api/projects/beta".to_string(),
            json!({"description": "x"}),
        ),
    ] {
        let r = app.call_with(&c, method, &path, Some(body)).await;
        assert_eq!(r.status, 404, "{method} {path}");
    }
    // A scoped key cannot make projects or keys.
    let r = app
        .call_with(
            &c,
            "POST",
            "/api/projects",
            Some(json!({"name": "gamma", "description": "d"})),
        )
        .await;
    assert_eq!(r.status, 403);
    // Nothing in beta changed.
    assert_eq!(
        app.get(&format!("/api/tasks/{}", b.task)).await.data()["status"],
        "queued"
    );
}

#[tokio::test]
async fn revoking_a_key_stops_it_and_its_sessions_at_once() {
    let app = spawn_app().await;
    let f = fixture(&app, "p").await;
    let (id, key) = app.key("agent", None).await;
    let c = client_with_key(&key);
    assert_eq!(
        app.call_with(&c, "GET", "/api/projects", None).await.status,
        200
    );
    let login = app
        .call_with(
            &c,
            "POST",
            "/api/auth/login",
            Some(json!({"agentName": "a1", "projectId": f.project})),
        )
        .await;
    let token = login.data()["token"].as_str().unwrap().to_string();
    let s = reqwest::Client::new();
    let sess = |client: &reqwest::Client| {
        client
            .get(format!("{}/api/auth/session", app.base))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(sess(&s).await.unwrap().status().as_u16(), 200);
    assert_eq!(app.delete(&format!("/api/keys/{id}")).await.status, 200);
    assert_eq!(
        app.call_with(&c, "GET", "/api/projects", None).await.status,
        401
    );
    assert_eq!(sess(&s).await.unwrap().status().as_u16(), 401);
    let keys = app.get("/api/keys").await;
    assert!(!keys
        .data()
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == id.as_str()));
    assert_eq!(app.delete(&format!("/api/keys/{id}")).await.status, 404);
}

#[tokio::test]
async fn keys_are_shown_once_and_never_stored_in_clear() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/keys",
            json!({"name": "ci", "role": "viewer", "projects": null}),
        )
        .await;
    assert_eq!(r.status, 201);
    let key = r.data()["key"].as_str().unwrap().to_string();
    let list = app.get("/api/keys").await;
    let text = list.body.to_string();
    assert!(!text.contains(&key));
    assert!(!text.contains("argon2"));
    assert!(list.data()[0].get("key").is_none());
    for bad in [
        json!({"name": "x", "role": "root"}),
        json!({"name": "bad name", "role": "viewer"}),
        json!({"name": "x", "role": "viewer", "projects": []}),
    ] {
        assert_eq!(app.post("/api/keys", bad).await.status, 400);
    }
    let r = app
        .post(
            "/api/keys",
            json!({"name": "x", "role": "viewer", "projects": ["nope"]}),
        )
        .await;
    assert_eq!(r.status, 404);
    // The file holds no clear key either.
    let server = app.server.as_ref().unwrap();
    let bytes = std::fs::read(server.store.path()).unwrap();
    let hay = String::from_utf8_lossy(&bytes);
    assert!(!hay.contains(&key));
    assert!(!hay.contains(&app.admin_key));
    // The last admin key cannot be revoked.
    let admin_id = app
        .get("/api/keys")
        .await
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.delete(&format!("/api/keys/{admin_id}")).await.status,
        409
    );
    // With a second admin key either may go, but not both; other keys do not count.
    let (second, second_key) = app.key("admin", None).await;
    app.key("agent", None).await;
    assert_eq!(app.delete(&format!("/api/keys/{second}")).await.status, 200);
    assert_eq!(
        app.delete(&format!("/api/keys/{admin_id}")).await.status,
        409,
        "the last admin key, beside agent and viewer keys"
    );
    app.key("admin", None).await;
    let second_client = client_with_key(&second_key);
    assert_eq!(
        app.call_with(&second_client, "GET", "/api/keys", None)
            .await
            .status,
        401,
        "a revoked admin key"
    );
    assert_eq!(
        app.delete(&format!("/api/keys/{admin_id}")).await.status,
        200
    );
    assert_eq!(
        app.get("/api/keys").await.status,
        401,
        "the test's own admin key is gone"
    );
}

/// A key records when it was last used (the key listing's `lastUsedAt`) and a session its
/// last activity (`GET /api/auth/session`), written just after the request that used them.
#[tokio::test]
async fn keys_and_sessions_record_their_last_use() {
    let app = spawn_with_manual_clock().await;
    app.project("p").await;
    let (id, key) = app.key("agent", None).await;
    let last_used = || async {
        let keys = app.get("/api/keys").await;
        keys.data()
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .expect("the key is listed")["lastUsedAt"]
            .clone()
    };
    assert_eq!(last_used().await, Value::Null, "never used");
    app.advance(5_000).await;
    let c = client_with_key(&key);
    assert_eq!(
        app.call_with(&c, "GET", "/api/projects", None).await.status,
        200
    );
    let limit = std::time::Duration::from_secs(5);
    let used = eventually(limit, last_used, |v| !v.is_null()).await;
    assert!(used.is_string(), "lastUsedAt was never written");

    let r = login(&app, &c, "p").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = bearer_client(r.data()["token"].as_str().unwrap());
    // The session's first use comes 7 s after its login, so its activity is then later than
    // its creation (the write follows the request: look until it shows).
    app.advance(7_000).await;
    let session = || async {
        let r = app.call_with(&s, "GET", "/api/auth/session", None).await;
        let field = |name: &str| r.data()[name].as_str().unwrap().to_string();
        (field("createdAt"), field("lastActivity"))
    };
    let (created, activity) = eventually(limit, session, |(c, a)| a != c).await;
    assert!(
        activity > created,
        "lastActivity {activity}, created {created}"
    );
}

#[tokio::test]
async fn sessions_bind_agent_and_project_and_expire() {
    let app = spawn_with_manual_clock().await;
    let a = fixture(&app, "alpha").await;
    let b = fixture(&app, "beta").await;
    let (_, key) = app.key("agent", None).await;
    let c = client_with_key(&key);
    let r = app
        .call_with(
            &c,
            "POST",
            "/api/auth/login",
            Some(json!({"agentName": "a1", "projectId": "alpha"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let token = r.data()["token"].as_str().unwrap().to_string();
    let expires = r.data()["expiresAt"].as_str().unwrap().to_string();
    let s = bearer_client(&token);

    let info = app.call_with(&s, "GET", "/api/auth/session", None).await;
    assert_eq!(info.data()["agentName"], "a1");
    assert_eq!(info.data()["projectId"], a.project.as_str());
    assert_eq!(info.data()["expiresAt"], expires.as_str());

    // Acting as another agent: 403. As itself: fine. Another project: not there.
    let r = app
        .call_with(
            &s,
            "POST",
            "/api/agents/a2/next-task",
            Some(json!({"projectId": a.project})),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = app
        .call_with(
            &s,
            "POST",
            "/api/agents/a1/next-task",
            Some(json!({"projectId": a.project})),
        )
        .await;
    assert_eq!(r.status, 200);
    let held = r.data()["task"]["id"].as_str().unwrap().to_string();
    let r = app
        .call_with(
            &s,
            "POST",
            &format!("/api/tasks/{held}/complete"),
            Some(json!({"agentName": "other"})),
        )
        .await;
    assert_eq!(r.status, 403);
    // The agent name of extend-lease may come from the session.
    let r = app
        .call_with(
            &s,
            "POST",
            &format!("/api/tasks/{held}/extend-lease"),
            Some(json!({"extensionMinutes": 5})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = app
        .call_with(&s, "GET", &format!("/api/projects/{}", b.project), None)
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .call_with(
            &s,
            "POST",
            "/api/auth/login",
            Some(json!({"agentName": "a1", "projectId": "alpha"})),
        )
        .await;
    assert_eq!(r.status, 403, "sessions do not log in");

    // Extend, then expire.
    let r = app
        .call_with(
            &s,
            "PUT",
            "/api/auth/session",
            Some(json!({"extendBy": 3600})),
        )
        .await;
    assert!(r.data()["expiresAt"].as_str().unwrap() > expires.as_str());
    let r = app
        .call_with(&s, "PUT", "/api/auth/session", Some(json!({"extendBy": 0})))
        .await;
    assert_eq!(r.status, 400);
    app.advance(25 * 3600 * 1000 - 1).await;
    assert_eq!(
        app.call_with(&s, "GET", "/api/auth/session", None)
            .await
            .status,
        200
    );
    let active_sessions = || async {
        let r = reqwest::get(format!("{}/metrics/json", app.base))
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["data"]["active_sessions"].clone()
    };
    assert_eq!(active_sessions().await, 1);
    app.advance(1).await;
    // Expired, whether or not the sweep has removed it yet.
    assert_eq!(active_sessions().await, 0);
    assert_eq!(
        app.call_with(&s, "GET", "/api/auth/session", None)
            .await
            .status,
        401
    );
    // And stays refused later on, whatever the credential cache holds.
    app.advance(60_000).await;
    assert_eq!(
        app.call_with(&s, "GET", "/api/auth/session", None)
            .await
            .status,
        401
    );
    // The sweep removed it from storage.
    let server = app.server.as_ref().unwrap();
    assert!(server
        .store
        .session(&agentq::auth::digest(&token))
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn logout_ends_the_session() {
    let app = spawn_app().await;
    let f = fixture(&app, "p").await;
    let r = app
        .post(
            "/api/auth/login",
            json!({"agentName": "a", "projectId": f.project}),
        )
        .await;
    let token = r.data()["token"].as_str().unwrap().to_string();
    let s = reqwest::Client::new();
    let out = s
        .post(format!("{}/api/auth/logout", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status().as_u16(), 200);
    let again = s
        .get(format!("{}/api/auth/session", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 401);
    // An API key has no session to show.
    assert_eq!(app.get("/api/auth/session").await.status, 404);
}

/// A key holds at most `--max-sessions-per-key` live sessions: a login past it is a 409 that
/// starts nothing, other keys are not affected, and a session that ends (logout or expiry)
/// makes room again.
#[tokio::test]
async fn a_key_holds_at_most_its_share_of_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(agentq::time::ManualClock::new(1_767_225_600_000));
    let app = start_with_key(dir, Some(clock), None, |c| {
        c.max_sessions_per_key = 3;
        c.session_ttl = std::time::Duration::from_secs(3600);
    })
    .await;
    let p = app.project("capped").await;
    let (_, agent_key) = app.key("agent", None).await;
    let agent = client_with_key(&agent_key);
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let r = login(&app, &agent, &p).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        tokens.push(r.data()["token"].as_str().unwrap().to_string());
    }
    let live = || async { app.get("/metrics/json").await.data()["active_sessions"].clone() };
    assert_eq!(live().await, 3);
    let refused = login(&app, &agent, &p).await;
    assert_eq!((refused.status, refused.code()), (409, "CONFLICT"));
    let why = refused.body["error"].as_str().unwrap();
    assert!(why.contains("3 live sessions"), "{why}");
    assert_eq!(live().await, 3, "a refused login starts nothing");
    // Another key has its own share.
    assert_eq!(login(&app, &app.client, &p).await.status, 200);
    assert_eq!(live().await, 4);
    // A logout makes room for one more.
    let out = reqwest::Client::new()
        .post(format!("{}/api/auth/logout", app.base))
        .bearer_auth(&tokens[0])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status().as_u16(), 200);
    assert_eq!(login(&app, &agent, &p).await.status, 200);
    assert_eq!(login(&app, &agent, &p).await.status, 409);
    // Sessions that expire are swept, and make room too.
    app.advance(3_600_001).await;
    assert_eq!(live().await, 0);
    for _ in 0..3 {
        assert_eq!(login(&app, &agent, &p).await.status, 200);
    }
    assert_eq!(login(&app, &agent, &p).await.status, 409);
}

#[tokio::test]
async fn rate_limit_lets_exactly_n_through_then_429() {
    let dir = tempfile::tempdir().unwrap();
    let app = start_with_key(dir, None, None, |c| c.rate_limit_per_minute = 5).await;
    for i in 0..5 {
        let r = app.get("/api/projects").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-ratelimit-limit"], "5");
        assert_eq!(
            r.headers["x-ratelimit-remaining"],
            (4 - i).to_string().as_str()
        );
        // The window's end, in Unix seconds: within the minute that started with the first
        // request.
        let reset: u64 = r.headers["x-ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            (unix_now..=unix_now + 61).contains(&reset),
            "reset {reset}, now {unix_now}"
        );
    }
    let r = app.get("/api/projects").await;
    assert_eq!((r.status, r.code()), (429, "RATE_LIMITED"));
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    // The answer says whose limit it is, for whoever runs a load test with one key.
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("per key reached (the server's --rate-limit-per-minute)"),
        "{:?}",
        r.body
    );
    assert_eq!(app.get("/api/projects").await.status, 429);
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        app.get("/health").await.status,
        200,
        "/health is never limited"
    );
}

#[tokio::test]
async fn failed_authentication_is_slowed_per_address() {
    let app = spawn_app().await;
    // Use the admin key once so it is cached.
    assert_eq!(app.get("/api/projects").await.status, 200);
    let bad = |i: u32| client_with_key(&format!("aq_{:032x}_{}", i, "0".repeat(64)));
    for i in 0..agentq::auth::AUTH_FAILURES_PER_MINUTE {
        let r = app.call_with(&bad(i), "GET", "/api/projects", None).await;
        assert_eq!(r.status, 401);
    }
    // Past the limit a guess still gets 401, but only after the tarpit.
    let started = std::time::Instant::now();
    let r = app
        .call_with(&bad(9999), "GET", "/api/projects", None)
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    assert!(started.elapsed() >= agentq::auth::AUTH_TARPIT);
    // A key verified before still works from the same address, at once.
    assert_eq!(app.get("/api/projects").await.status, 200);
}

#[tokio::test]
async fn hostile_bodies_and_headers_get_4xx_never_5xx() {
    let app = spawn_app().await;
    let f = fixture(&app, "hostile").await;
    // JSON nested far deeper than serde_json's recursion limit.
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let body = format!(r#"{{"agentName": "worker", "outputs": {{"x": {deep}}}}}"#);
    let r = app
        .client
        .post(format!("{}/api/tasks/{}/complete", app.base, f.leased))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // A header far over hyper's limit is refused before any handler.
    let r = app
        .client
        .get(format!("{}/api/projects", app.base))
        .header("x-padding", "a".repeat(512 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    // Strings over their limits, wrong content type, garbage bytes.
    let long = "x".repeat(10_001);
    let r = app
        .post(
            &format!("/api/projects/{}/tasks", f.project),
            json!({"instructions": long}),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = app
        .client
        .post(format!("{}/api/projects", app.base))
        .header("content-type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let r = app
        .client
        .post(format!("{}/api/projects", app.base))
        .header("content-type", "application/json")
        .body(vec![0xff, 0xfe, 0x00, 0x7b])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Nothing changed.
    assert_eq!(app.stats(&f.project).await["totalTasks"], 2);
}

/// Reads one HTTP/1.1 answer (head, then a `content-length` body) from a raw connection.
async fn read_answer(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut expected = None;
    loop {
        if expected.is_none() {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                expected = Some(end + 4 + length);
            }
        }
        if expected.is_some_and(|n| got.len() >= n) {
            return String::from_utf8_lossy(&got).to_string();
        }
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed in the middle of an answer");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits (up to 10 s) for the server to close `conn`; panics if it answers something.
async fn closed_by_server(conn: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the server closes an idle connection");
    match read {
        Ok(n) => assert_eq!(n, 0, "expected the connection closed, got an answer"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

/// The idle limit of the idle tests: short, so that they run in seconds.
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A server that closes connections idle for [`IDLE_LIMIT`].
async fn with_idle_limit() -> TestApp {
    start_with_key(tempfile::tempdir().unwrap(), None, None, |c| {
        c.idle_timeout = Some(IDLE_LIMIT)
    })
    .await
}

/// A connection with no request in progress for the idle limit is closed: one that sends
/// nothing, one that trickles a request head and stalls (slowloris), one left idle after an
/// answer. A connection used again within the limit stays open, and a long-poll that lasts
/// longer than the limit is answered.
#[tokio::test]
async fn idle_connections_are_closed_and_requests_in_progress_are_not() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let limit = IDLE_LIMIT;
    let app = with_idle_limit().await;
    let addr = app.server.as_ref().unwrap().addr;
    let project = app.project("idle").await;

    let idle_closed_before = app
        .metric("agentq_http_connections_idle_closed_total")
        .await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: agentq\r\n")
        .await
        .unwrap();

    let mut reused = TcpStream::connect(addr).await.unwrap();
    for _ in 0..3 {
        reused
            .write_all(b"GET /health HTTP/1.1\r\nHost: agentq\r\n\r\n")
            .await
            .unwrap();
        assert!(read_answer(&mut reused).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let mut polling = TcpStream::connect(addr).await.unwrap();
    let body = json!({"projectId": project, "waitSeconds": 2}).to_string();
    let request = format!(
        "POST /api/agents/a1/next-task HTTP/1.1\r\nHost: agentq\r\nX-API-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        app.admin_key,
        body.len()
    );
    // Counted open (the gauge is the process's: other tests' connections only add to it).
    assert!(app.metric("agentq_http_connections_open").await >= 4.0);
    let asked = std::time::Instant::now();
    polling.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(&mut polling).await;
    assert!(asked.elapsed() >= limit * 2 - std::time::Duration::from_millis(100));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("No tasks available for assignment"),
        "{answer}"
    );

    closed_by_server(&mut silent).await;
    closed_by_server(&mut slow).await;
    closed_by_server(&mut reused).await;
    closed_by_server(&mut polling).await;
    // The server still takes new connections.
    assert_eq!(app.get("/health").await.status, 200);
    // An HTTP/2 client whose connection was closed while idle carries on (it was told, with
    // GOAWAY, and opens a new one).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..2 {
        let r = h2.get(format!("{}/health", app.base)).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        tokio::time::sleep(limit * 2).await;
    }
    let idle_closed = app
        .metric("agentq_http_connections_idle_closed_total")
        .await;
    assert!(idle_closed >= idle_closed_before + 5.0, "{idle_closed}");
}

/// The idle limit counts from the end of an answer's sending, not from its making: a client
/// that stops reading a large answer for longer than the limit (a slow link, a client busy
/// with the first part) still gets all of it, and the connection is closed once idle.
#[tokio::test]
async fn a_large_answer_read_slowly_is_not_cut_by_the_idle_limit() {
    use tokio::io::AsyncWriteExt;
    let limit = IDLE_LIMIT;
    let app = with_idle_limit().await;
    let project = app.project("big").await;
    // ~10 MB of answer: more than the kernel's socket buffers take, so most of it waits in
    // the server while the client does not read.
    let prompt = "p".repeat(10_000);
    for _ in 0..8 {
        let tasks: Vec<Value> = (0..125).map(|_| json!({"instructions": prompt})).collect();
        app.bulk(&project, &tasks).await;
    }
    let mut conn = tokio::net::TcpStream::connect(app.server.as_ref().unwrap().addr)
        .await
        .unwrap();
    let request = format!(
        "GET /api/projects/{project}/tasks?limit=1000 HTTP/1.1\r\nHost: agentq\r\n\
         X-API-Key: {}\r\n\r\n",
        app.admin_key
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(limit * 3).await;
    let answer = read_answer(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..200]);
    let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1000);
    closed_by_server(&mut conn).await;
}

/// A body that nothing reads cost the connection. Sent to `retry` (which takes none), with a
/// key that is refused, to a path that names no operation, or with a content type other
/// than JSON, it was left unread; when its bytes came after the head, hyper sent the answer
/// and closed the connection, and the client's next request on it failed with a broken
/// pipe, which clients do not retry for a POST. Found by a load script: Python's http.client
/// sends the head and the body apart.
#[tokio::test]
async fn a_body_nothing_reads_does_not_cost_the_connection() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    let p = app.project("p").await;
    let id = app.task(&p, json!({"instructions": "x"})).await;
    let key = &app.admin_key;
    let addr = app.server.as_ref().unwrap().addr;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let json = "content-type: application/json\r\ncontent-length: 2";
    let text = "content-type: text/plain\r\ncontent-length: 2";
    let keyed = |key: &str| format!("host: t\r\nx-api-key: {key}");
    for (request_line, headers, status) in [
        (format!("POST /api/tasks/{id}/retry"), keyed(key), 409),
        (format!("POST /api/tasks/{id}/complete"), keyed("no"), 401),
        ("DELETE /api/nope".to_string(), "host: t".to_string(), 404),
        ("POST /api/projects".to_string(), keyed(key), 415),
    ] {
        let content = if status == 415 { text } else { json };
        let head = format!("{request_line} HTTP/1.1\r\n{headers}\r\n{content}\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        // The body comes after the head, as a separate write.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        conn.write_all(b"{}").await.unwrap();
        let answer = read_answer(&mut conn).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
    }
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    assert!(read_answer(&mut conn).await.starts_with("HTTP/1.1 200 "));
}

/// Starts `agent` long-polling `project` for up to 30 s with `client`; answers the reply's
/// status and body. Returns once the server counts it as waiting.
async fn poll_with(app: &TestApp, client: &reqwest::Client, agent: &str, project: &str) -> Poller {
    let request = client
        .post(format!("{}/api/agents/{agent}/next-task", app.base))
        .json(&json!({"projectId": project, "waitSeconds": 30}));
    let before = app.metric("agentq_long_poll_waiters").await;
    let poller = tokio::spawn(async move {
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    });
    app.metric_above("agentq_long_poll_waiters", before).await;
    poller
}

/// A client that sends `token` (a session's) as `Authorization: Bearer`.
fn bearer_client(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

/// Agent `a`'s login in `project` with `key_client`'s key.
async fn login(app: &TestApp, key_client: &reqwest::Client, project: &str) -> Resp {
    let body = json!({"agentName": "a", "projectId": project});
    app.call_with(key_client, "POST", "/api/auth/login", Some(body))
        .await
}

/// A session's client for `agent` in `project`, logged in with `key_client`.
async fn session_client(
    app: &TestApp,
    key_client: &reqwest::Client,
    agent: &str,
    project: &str,
) -> reqwest::Client {
    let body = json!({"agentName": agent, "projectId": project});
    let r = app
        .call_with(key_client, "POST", "/api/auth/login", Some(body))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    bearer_client(r.data()["token"].as_str().unwrap())
}

/// A long-poll lasts up to a minute after its credential was checked. A key revoked, or a
/// session ended or expired, in that minute must not be handed a task when one appears: the
/// poller gets 401 and the task stays queued for the next agent.
#[tokio::test]
async fn a_long_poll_outlived_by_its_credential_is_handed_no_task() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("lp").await;
    let (revoked_id, revoked) = app.key("agent", None).await;
    let (_, kept) = app.key("agent", None).await;
    let kept = client_with_key(&kept);
    let logged_out = session_client(&app, &kept, "s1", &p).await;
    let expiring = session_client(&app, &kept, "s2", &p).await;

    // In each case an agent with a good key long-polls behind the refused one.
    let admin = app.client.clone();

    let poller = poll_with(&app, &client_with_key(&revoked), "k", &p).await;
    let backup = poll_with(&app, &admin, "backup", &p).await;
    assert_eq!(
        app.delete(&format!("/api/keys/{revoked_id}")).await.status,
        200
    );
    refused_and_passed_on(&app, &p, poller, backup, "key revoked").await;

    let poller = poll_with(&app, &logged_out, "s1", &p).await;
    let backup = poll_with(&app, &admin, "backup", &p).await;
    let out = app
        .call_with(&logged_out, "POST", "/api/auth/logout", None)
        .await;
    assert_eq!(out.status, 200, "{:?}", out.body);
    refused_and_passed_on(&app, &p, poller, backup, "session logged out").await;

    let poller = poll_with(&app, &expiring, "s2", &p).await;
    let backup = poll_with(&app, &admin, "backup", &p).await;
    app.advance(24 * 3_600_000 + 1).await;
    refused_and_passed_on(&app, &p, poller, backup, "session expired").await;
}

type Poller = tokio::task::JoinHandle<(u16, Value)>;

/// Creates a task while `refused` (a long-poll whose credential is gone, queued first) and
/// `backup` wait. The task wakes `refused`, whose look is refused with 401; its wake-up must
/// pass to `backup`, which gets the task (else it would sit out its 30 s and answer none).
async fn refused_and_passed_on(
    app: &TestApp,
    project: &str,
    refused: Poller,
    backup: Poller,
    case: &str,
) {
    let id = app.task(project, json!({"instructions": case})).await;
    let (status, body) = refused.await.unwrap();
    assert_eq!(status, 401, "{case}: {body}");
    assert_eq!(body["code"], "UNAUTHORIZED", "{case}");
    let (status, body) = backup.await.unwrap();
    assert_eq!(status, 200, "{case}: {body}");
    assert_eq!(body["data"]["task"]["id"], id.as_str(), "{case}: {body}");
    let done = format!("/api/tasks/{id}/complete");
    let r = app
        .post(&done, json!({"agentName": "backup", "result": "ok"}))
        .await;
    assert_eq!(r.status, 200);
}

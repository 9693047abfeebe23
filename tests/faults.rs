//! Faults found from outside, each with the behaviour that replaced it: a log that cannot be
//! written, a first admin key that cannot be shown, a repeated fail whose answer was lost,
//! `/health` during a write outage, a request body that never ends, and the rejections the
//! HTTP parser makes before any handler runs.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::binary::*;
use common::*;
use serde_json::{json, Value};

/// A server whose stderr takes nothing.
fn dev_full() -> std::fs::File {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap()
}

/// A few requests of every kind a server logs at debug level (one line per request).
async fn some_requests(client: &reqwest::Client, base: &str) {
    for _ in 0..5 {
        let r = client.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .post(format!("{base}/api/projects"))
            .json(&json!({"name": 7}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
}

async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_value(&text, name)
}

/// stderr on a full disk: every log line fails to be written. The server drops them, counts
/// them, serves on, and stops cleanly (it aborted at its first log line).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_full_stderr_drops_log_lines_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cmd, base) = binary_command(Command::new(agentq_bin()), &dir.path().join("x.redb"));
    cmd.env("RUST_LOG", "debug").stderr(dev_full());
    let mut child = Reaped(cmd.spawn().unwrap());
    let client = client_with_key(ADMIN_KEY);
    wait_healthy(&client, &base).await;
    some_requests(&client, &base).await;
    assert!(child.try_wait().unwrap().is_none(), "the server stopped");
    let dropped = metric(&client, &base, "agentq_log_lines_dropped_total").await;
    assert!(dropped >= 10.0, "{dropped} lines dropped");
    send("TERM", &child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// stderr a pipe whose reader went away (`| head -n1`, a killed `tee`): the same.
#[cfg(unix)]
#[tokio::test]
async fn a_log_pipe_without_a_reader_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cmd, base) = binary_command(Command::new(agentq_bin()), &dir.path().join("x.redb"));
    cmd.env("RUST_LOG", "debug");
    let mut child = Reaped(cmd.spawn().unwrap());
    drop(child.stderr.take()); // the reader goes away
    let client = client_with_key(ADMIN_KEY);
    wait_healthy(&client, &base).await;
    some_requests(&client, &base).await;
    assert!(child.try_wait().unwrap().is_none(), "the server stopped");
    let dropped = metric(&client, &base, "agentq_log_lines_dropped_total").await;
    assert!(dropped >= 10.0, "{dropped} lines dropped");
    send("TERM", &child);
    assert!(child.wait().unwrap().success());
}

/// The first start of an empty database shows its generated admin key on stdout before it
/// stores it: when stdout cannot take it, the start fails and no key (and no file) is left;
/// the next start shows a key that works.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_first_admin_key_that_cannot_be_shown_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("first.redb");
    let port = free_port();
    let serve = || {
        let mut cmd = Command::new(agentq_bin());
        cmd.args(["serve", "--db"])
            .arg(&db)
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .env_remove("AGENTQ_ADMIN_KEY")
            .stderr(Stdio::piped());
        cmd
    };
    let out = serve().stdout(dev_full()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no key was created"), "{err}");
    assert!(!db.exists(), "the failed start left its file behind");

    let mut child = Reaped(serve().stdout(Stdio::piped()).spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&reqwest::Client::new(), &base).await;
    let mut out = child.stdout.take().unwrap();
    let mut text = Vec::new();
    let key = loop {
        let mut buf = [0u8; 512];
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "no key on stdout");
        text.extend_from_slice(&buf[..n]);
        let s = String::from_utf8_lossy(&text).to_string();
        if let Some(k) = s.split_whitespace().find(|w| w.starts_with("aq_")) {
            if s.contains("POST /api/keys") {
                break k.to_string();
            }
        }
    };
    let r = client_with_key(&key)
        .get(format!("{base}/api/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let keys: Value = r.json().await.unwrap();
    assert_eq!(keys["data"].as_array().unwrap().len(), 1, "{keys}");
}

/// Creates a project with one task (retried up to 3 times, the default), and leases it to
/// `agent`.
/// Returns the project, the task's id and the lease token.
async fn leased_task(
    client: &reqwest::Client,
    base: &str,
    agent: &str,
) -> (String, String, String) {
    let project = json!({"name": format!("p-{agent}"), "description": "d"});
    let (_, p) = post_json(client, format!("{base}/api/projects"), &project).await;
    let p = p["data"]["id"].as_str().unwrap().to_string();
    let task = json!({"instructions": "x"});
    post_json(client, format!("{base}/api/projects/{p}/tasks"), &task).await;
    let url = format!("{base}/api/agents/{agent}/next-task");
    let (_, next) = post_json(client, url, &json!({"projectId": p})).await;
    let task = &next["data"]["task"];
    (
        p,
        task["id"].as_str().unwrap().to_string(),
        task["leaseToken"].as_str().unwrap().to_string(),
    )
}

/// A fail whose answer a crash took away is repeated after the restart by the same agent
/// with the same token: 200 with the same answer, whether the first reached the disk or not;
/// nothing is applied twice. Another agent's repeat, or one after the task was claimed
/// again, still gets 409.
#[tokio::test]
async fn a_fail_repeated_across_a_sigkill_gets_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fail.redb");
    let client = client_with_key(ADMIN_KEY);
    let (mut child, mut base) = start_binary(&db);
    wait_healthy(&client, &base).await;
    // Killed at once after the request is sent, and after its answer: the commit lands
    // before or after the kill, and the repeat must not tell.
    for (round, wait_for_answer) in [(0, false), (1, false), (2, true), (3, true)] {
        let agent = format!("w{round}");
        let (_, id, token) = leased_task(&client, &base, &agent).await;
        let fail_body = json!({"agentName": agent, "leaseToken": token, "error": "boom"});
        let first = client
            .post(format!("{base}/api/tasks/{id}/fail"))
            .json(&fail_body)
            .send();
        if wait_for_answer {
            let r = first.await.unwrap();
            assert_eq!(r.status(), 200);
        } else {
            let sent = tokio::spawn(first);
            tokio::time::sleep(Duration::from_millis(round * 3)).await;
            sent.abort();
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        (child, base) = start_binary(&db);
        wait_healthy(&client, &base).await;
        let again = |body: Value| {
            let client = client.clone();
            let url = format!("{base}/api/tasks/{id}/fail");
            async move {
                let r = client.post(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        let (status, answer) = again(fail_body.clone()).await;
        assert_eq!(status, 200, "round {round}: {answer}");
        assert_eq!(answer["data"]["willRetry"], true, "{answer}");
        let task = &answer["data"];
        assert_eq!(task["status"], "queued", "{answer}");
        assert_eq!(task["retryCount"], 1, "{answer}");
        // Once more, and by agent name alone: the same, and still one failed attempt.
        let (status, again_answer) = again(json!({"agentName": agent})).await;
        assert_eq!(status, 200, "{again_answer}");
        assert_eq!(again_answer["data"]["retryCount"], 1);
        let attempts = get_json(&client, format!("{base}/api/tasks/{id}/attempts")).await;
        let outcomes: Vec<&str> = attempts["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(outcomes, ["failed"], "{attempts}");
        let (status, other) = again(json!({"agentName": "someone-else"})).await;
        assert_eq!((status, other["code"].as_str()), (409, Some("LEASE_LOST")));
    }
    // Claimed again since: the old lease's fail is no repeat.
    let (p, id, token) = leased_task(&client, &base, "x").await;
    let url = format!("{base}/api/tasks/{id}/fail");
    let body = json!({"agentName": "x", "leaseToken": token, "error": "boom"});
    let r = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, next) = post_json(
        &client,
        format!("{base}/api/agents/x/next-task"),
        &json!({"projectId": p}),
    )
    .await;
    assert_eq!(next["data"]["task"]["id"], id.as_str());
    let r = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 409);
}

/// A disk that stays full under a file with free pages inside: the file opens again after
/// the first failure but every write that grows it fails. `/health` answers 503 `degraded`
/// with the storage error (and `agentq_storage_writable` is 0) for as long as writes fail, not
/// only while the file is being reopened; once space is back it turns healthy by itself (the
/// writer's probe), with no client write.
#[tokio::test]
async fn health_is_degraded_until_a_write_succeeds_again() {
    let faults = agentq::store::disk::Faults::default();
    let no_growth = faults.no_growth.clone();
    let opener = agentq::store::disk::faulty_opener(faults);
    let app = start_with_key(tempfile::tempdir().unwrap(), None, None, |c| {
        c.opener = opener
    })
    .await;
    let p = app.project("disk").await;
    let path = format!("/api/projects/{p}/tasks/bulk");
    let tasks: Vec<Value> = (0..200)
        .map(|_| json!({"instructions": "x".repeat(9_000)}))
        .collect();
    let create = || app.call("POST", &path, Some(json!({"tasks": tasks})));
    assert_eq!(app.metric("agentq_storage_writable").await, 1.0);
    no_growth.store(true, Ordering::SeqCst);
    let mut refused = None;
    for _ in 0..50 {
        let r = create().await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the file had to grow within 90 MB");
    assert_eq!(r.code(), "UNAVAILABLE");
    // Past the reopen (which succeeds: opening does not grow the file) and its hold.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let health = app.get("/health").await;
        assert_eq!(health.status, 503, "{:?}", health.body);
        assert_eq!(health.body["success"], false);
        assert_eq!(health.data()["status"], "degraded");
        let storage = &health.data()["storage"];
        assert_eq!(storage["healthy"], false);
        let error = storage["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "{storage}");
        assert!(storage["failingSince"].is_string(), "{storage}");
        assert_eq!(health.headers["retry-after"], "1");
        assert_eq!(app.metric("agentq_storage_writable").await, 0.0);
        assert_eq!(create().await.status, 503);
    }
    no_growth.store(false, Ordering::SeqCst);
    let health = eventually(
        Duration::from_secs(20),
        || app.get("/health"),
        |h| h.status == 200,
    )
    .await;
    assert_eq!(health.data()["status"], "healthy", "{:?}", health.body);
    assert!(health.data()["storage"].get("error").is_none());
    assert_eq!(app.metric("agentq_storage_writable").await, 1.0);
    assert_eq!(create().await.status, 201);
}

/// Writes `head` on a new connection to `addr`, then the first `sent` bytes of `body`, and
/// keeps the connection open. Returns the stream.
fn raw(addr: &str, bytes: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Sends `request` on a new connection to `addr` and reads until the server closes it (or
/// `secs` pass): what it answered, and how long that took.
async fn send_and_read(addr: &str, request: Vec<u8>, secs: u64) -> (String, Duration) {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut s = raw(&addr, &request);
        let answer = read_until_closed(&mut s, Duration::from_secs(secs));
        (answer, started.elapsed())
    })
    .await
    .unwrap()
}

/// Everything the server sends on `s` until it closes the connection (or `limit` passes).
fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> String {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// A server whose bodies must keep coming: no byte for a second, or slower than 500 bytes/s
/// past the first second, is a timeout.
async fn impatient() -> TestApp {
    start_with_key(tempfile::tempdir().unwrap(), None, None, |c| {
        c.body_timeout = Some(Duration::from_secs(1));
    })
    .await
}

/// The request head of a POST to `path` with the test's admin key, ending with `headers`.
fn head(app: &TestApp, path: &str, headers: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\nContent-Type: application/json\r\n{headers}\r\n",
        app.admin_key
    )
}

/// What a timed-out body is answered: 408 `REQUEST_TIMEOUT` in the envelope, with the
/// correlation id, and the connection closed (read to its end well before the 10 s limit).
fn assert_timed_out(answer: &str, took: Duration) {
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"REQUEST_TIMEOUT\""), "{answer}");
    assert!(answer.contains("x-correlation-id: "), "{answer}");
    assert!(
        answer.contains("x-content-type-options: nosniff"),
        "{answer}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the connection stayed open {took:?}"
    );
}

/// A body that stops after one byte of its declared 100: 408 after the limit, closed. The
/// same on a path that names nothing, without a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_408_and_its_connection_closed() {
    let app = impatient().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    for request in [
        head(&app, "/api/projects", "Content-Length: 100\r\n") + "{",
        "POST /no/such/route HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{".to_string(),
    ] {
        let (answer, took) = send_and_read(&addr, request.into_bytes(), 10).await;
        assert_timed_out(&answer, took);
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
    // (The metrics are the process's: other tests' timeouts may be counted too.)
    assert!(app.metric("agentq_http_body_timeouts_total").await >= 2.0);
    assert_eq!(
        app.get("/api/projects")
            .await
            .data()
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

/// A chunked body that stops after its first chunk: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_chunked_body_is_answered_408() {
    let app = impatient().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let request = head(&app, "/api/projects", "Transfer-Encoding: chunked\r\n") + "1\r\n{\r\n";
    let (answer, took) = send_and_read(&addr, request.into_bytes(), 10).await;
    assert_timed_out(&answer, took);
}

/// A body that comes a byte every 300 ms never stalls for the limit, but trickles: cut once
/// it falls behind 500 bytes/s past its first second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408() {
    let app = impatient().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let request = head(&app, "/api/projects", "Content-Length: 1000\r\n");
    let (answer, took) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut s = raw(&addr, request.as_bytes());
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut answer = Vec::new();
        while started.elapsed() < Duration::from_secs(10) {
            if s.write_all(b" ").is_err() {
                break;
            }
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        answer.extend(read_until_closed(&mut s, Duration::from_secs(2)).bytes());
        (
            String::from_utf8_lossy(&answer).to_string(),
            started.elapsed(),
        )
    })
    .await
    .unwrap();
    assert_timed_out(&answer, took);
}

/// A large body that comes slowly but steadily (2 KB every 100 ms, for 3 s: three times the
/// limit in all) is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_body_is_taken() {
    let app = impatient().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let description = "d".repeat(400);
    let body =
        json!({"name": "slow", "description": description, "instructions": "x".repeat(9_000)})
            .to_string();
    let request = head(
        &app,
        "/api/projects",
        &format!("Content-Length: {}\r\n", body.len()),
    );
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = raw(&addr, request.as_bytes());
        for piece in body.as_bytes().chunks(body.len() / 30 + 1) {
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(piece).unwrap();
        }
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

/// Requests the HTTP parser refuses before any handler runs are answered in the envelope:
/// bad bytes in the path or request line, or a header without its colon (400
/// `VALIDATION_ERROR`), a 100 KB URI (414) and too many or too large headers (431, both
/// `PAYLOAD_TOO_LARGE`), each with a correlation id (the body's, in the header too) and the
/// security headers; then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_parser_refuses_get_the_envelope() {
    let app = spawn_app().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: a\r\n")).collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"GET /api/\x01projects HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "VALIDATION_ERROR",
        ),
        (
            b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "VALIDATION_ERROR",
        ),
        (
            b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            400,
            "VALIDATION_ERROR",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000)).into_bytes(),
            414,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            format!("GET /health HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
            431,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            format!(
                "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(500_000)
            )
            .into_bytes(),
            431,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (request, status, code) in cases {
        let addr = addr.clone();
        let (answer, _) = send_and_read(&addr, request, 5).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("no {name} in {head}"))
                .to_string()
        };
        assert_eq!(header("content-type"), "application/json; charset=utf-8");
        assert_eq!(header("connection"), "close");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("content-length"), body.len().to_string());
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["success"], false);
        assert_eq!(body["code"], code, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert!(body["timestamp"].is_string());
        assert_eq!(body["correlationId"], header("x-correlation-id").as_str());
    }
    // The server is none the worse.
    assert_eq!(app.get("/health").await.status, 200);
}

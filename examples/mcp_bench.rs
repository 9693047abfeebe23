//! The MCP figures of docs/BENCHMARKS.md: what a tool call costs beyond the REST call it
//! wraps, over `/mcp` (streamable HTTP) and over `agentq mcp` (stdio), and 64 concurrent `/mcp`
//! sessions running the claim/complete loop.
//!
//! `cargo build --release && cargo run --release --example mcp_bench -- [--calls 2000]
//! [--sessions 64] [--tasks 6400]`
//!
//! Starts target/release/agentq (AGENTQ_BIN=path for another build) on a temporary database,
//! then times `get_task` three ways, one call at a time: the REST call (`GET /api/tasks/{id}`),
//! the tool over `/mcp`, the tool over stdio; and prints p50/p99 of each and of the
//! differences. The client is this program, raw JSON-RPC over reqwest and pipes, so that an
//! SDK's own cost is not counted.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY: &str = "mcp-bench-admin-key-0123456789";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// One `/mcp` session: its id and the next request id.
struct HttpSession {
    http: reqwest::Client,
    url: String,
    session: String,
    next: u64,
}

impl HttpSession {
    async fn open(http: &reqwest::Client, base: &str) -> HttpSession {
        let url = format!("{base}/mcp");
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "mcp_bench", "version": "1"}}});
        let r = http
            .post(&url)
            .header("x-api-key", KEY)
            .header("accept", "application/json, text/event-stream")
            .json(&init)
            .send()
            .await
            .unwrap();
        let session = r
            .headers()
            .get("mcp-session-id")
            .expect("a session id")
            .to_str()
            .unwrap()
            .to_string();
        r.text().await.unwrap();
        let s = HttpSession {
            http: http.clone(),
            url,
            session,
            next: 1,
        };
        s.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        s
    }

    async fn post(&self, body: &Value) -> String {
        self.http
            .post(&self.url)
            .header("x-api-key", KEY)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", "2025-06-18")
            .json(body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A tool call's result (the JSON-RPC `result`).
    async fn call(&mut self, tool: &str, args: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                          "params": {"name": tool, "arguments": args}});
        let text = self.post(&body).await;
        answer(&text, id)
    }
}

/// The JSON-RPC answer with `id` in a response body (JSON, or server-sent events).
fn answer(text: &str, id: u64) -> Value {
    let candidates = std::iter::once(text).chain(
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim),
    );
    for c in candidates {
        if let Ok(v) = serde_json::from_str::<Value>(c) {
            if v["id"] == id {
                return v["result"].clone();
            }
        }
    }
    panic!("no answer {id} in {text:.300}");
}

#[tokio::main]
async fn main() {
    let calls = arg("--calls", 2000);
    let sessions = arg("--sessions", 64);
    let tasks = arg("--tasks", 6400);
    let bin = std::env::var("AGENTQ_BIN").unwrap_or_else(|_| "target/release/agentq".into());
    let dir = std::env::temp_dir().join(format!("agentq-mcp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Command::new(&bin)
        .args(["serve", "--db"])
        .arg(dir.join("q.redb"))
        .args(["--bind", &format!("127.0.0.1:{port}"), "--admin-key", KEY])
        .args(["--rate-limit-per-minute", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(format!("{base}/health")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let rest = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut r = http
            .request(method, format!("{base}{path}"))
            .header("x-api-key", KEY);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    rest(
        reqwest::Method::POST,
        "/api/projects".into(),
        Some(json!({"name": "b", "description": ""})),
    )
    .await
    .unwrap();
    let task: Value = rest(
        reqwest::Method::POST,
        "/api/projects/b/tasks".into(),
        Some(json!({"instructions": "x"})),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = task["data"]["id"].as_str().unwrap().to_string();

    // One call at a time, the three ways, interleaved.
    let mut via_rest = Vec::new();
    let mut via_http = Vec::new();
    let mut via_stdio = Vec::new();
    let mut session = HttpSession::open(&http, &base).await;
    let mut child = Command::new(&bin)
        .arg("mcp")
        .env("AGENTQ_URL", &base)
        .env("AGENTQ_KEY", KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut send = |msg: Value| {
        writeln!(stdin, "{msg}").unwrap();
        stdin.flush().unwrap();
    };
    send(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "mcp_bench", "version": "1"}}}),
    );
    stdout.read_line(&mut line).unwrap();
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    for n in 1..=calls as u64 {
        let t = Instant::now();
        let r = rest(reqwest::Method::GET, format!("/api/tasks/{id}"), None)
            .await
            .unwrap();
        r.bytes().await.unwrap();
        via_rest.push(t.elapsed().as_secs_f64() * 1000.0);

        let t = Instant::now();
        let r = session.call("get_task", json!({"taskId": id})).await;
        assert_eq!(r["isError"], false, "{r}");
        via_http.push(t.elapsed().as_secs_f64() * 1000.0);

        let t = Instant::now();
        send(json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                    "params": {"name": "get_task", "arguments": {"taskId": id}}}));
        line.clear();
        stdout.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"]["isError"], false, "{v}");
        via_stdio.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = child.kill();
    let _ = child.wait();
    let (r50, r99) = (
        percentile(&mut via_rest, 0.5),
        percentile(&mut via_rest, 0.99),
    );
    for (name, samples) in [("/mcp", &mut via_http), ("stdio", &mut via_stdio)] {
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        println!(
            "get_task over {name}: p50 {p50:.3} ms, p99 {p99:.3} ms; the REST call alone p50 \
             {r50:.3} ms, p99 {r99:.3} ms; beyond it: p50 {:.3} ms, p99 {:.3} ms",
            p50 - r50,
            p99 - r99
        );
    }

    // Many sessions, each looping get_next_task -> complete_task until the queue is empty.
    for chunk in 0..tasks.div_ceil(1000) {
        let n = (tasks - chunk * 1000).min(1000);
        let items: Vec<Value> = (0..n).map(|_| json!({"instructions": "t"})).collect();
        rest(
            reqwest::Method::POST,
            "/api/projects/b/tasks/bulk".into(),
            Some(json!({"tasks": items})),
        )
        .await
        .unwrap();
    }
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..sessions {
        let (http, base) = (http.clone(), base.clone());
        let (done, errors) = (done.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let mut s = HttpSession::open(&http, &base).await;
            loop {
                let r = s.call("get_next_task", json!({"projectId": "b"})).await;
                if r["isError"] != false {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let task = &r["structuredContent"]["task"];
                if task.is_null() {
                    break;
                }
                let r = s
                    .call(
                        "complete_task",
                        json!({"taskId": task["id"], "leaseToken": task["leaseToken"]}),
                    )
                    .await;
                if r["isError"] == false {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let took = start.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    println!(
        "{sessions} /mcp sessions, claim/complete loop: {done} tasks in {took:.2} s = {:.0} \
         cycles/s, {} errors",
        done as f64 / took,
        errors.load(Ordering::Relaxed)
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

//! The one way tests start a server: on 127.0.0.1:0 with a database in a temp dir.
#![allow(dead_code)]

use std::sync::Arc;

use agentq::time::{Clock, ManualClock};
use agentq::{Config, Server};
use serde_json::{json, Value};

pub struct TestApp {
    pub server: Option<Server>,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub clock: Option<Arc<ManualClock>>,
}

pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(None).await
}

/// A server whose clock only moves when the test says so.
pub async fn spawn_with_manual_clock() -> TestApp {
    spawn_with(Some(Arc::new(ManualClock::new(1_767_225_600_000)))).await
}

async fn spawn_with(clock: Option<Arc<ManualClock>>) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, clock).await
}

pub async fn start_in(dir: tempfile::TempDir, clock: Option<Arc<ManualClock>>) -> TestApp {
    let mut config = Config::new(dir.path().join("agentq.redb"), "127.0.0.1:0");
    if let Some(c) = &clock {
        config.clock = c.clone() as Arc<dyn Clock>;
    }
    let server = Server::start(config).await.expect("server starts");
    let base = format!("http://{}", server.addr);
    TestApp {
        server: Some(server),
        base,
        client: reqwest::Client::new(),
        dir,
        clock,
    }
}

impl TestApp {
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .client
            .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.call("POST", path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.call("PUT", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.call("DELETE", path, None).await
    }

    /// Creates a project and returns its id.
    pub async fn project(&self, name: &str) -> String {
        let r = self
            .post(
                "/api/projects",
                json!({"name": name, "description": "test"}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.data()["id"].as_str().unwrap().to_string()
    }

    /// Creates a task type and returns its id.
    pub async fn task_type(&self, project: &str, body: Value) -> String {
        let r = self
            .post(&format!("/api/projects/{project}/task-types"), body)
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.data()["id"].as_str().unwrap().to_string()
    }

    /// Creates a task and returns its id.
    pub async fn task(&self, project: &str, body: Value) -> String {
        let r = self
            .post(&format!("/api/projects/{project}/tasks"), body)
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.data()["id"].as_str().unwrap().to_string()
    }

    /// next-task for `agent`: the task (or Null) of the answer.
    pub async fn next(&self, agent: &str, body: Value) -> Value {
        let r = self
            .post(&format!("/api/agents/{agent}/next-task"), body)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.data()["task"].clone()
    }

    pub async fn stats(&self, project: &str) -> Value {
        self.get(&format!("/api/projects/{project}")).await.data()["stats"].clone()
    }

    /// Moves the manual clock and lets the scheduler look again.
    pub async fn advance(&self, ms: i64) {
        let clock = self.clock.as_ref().expect("manual clock");
        clock.advance(ms);
        let server = self.server.as_ref().unwrap();
        server.store.hub.timer.notify_one();
        // The scheduler runs its pass through the writer; give it a moment to commit.
        for _ in 0..200 {
            let pending = server
                .store
                .read()
                .unwrap()
                .next_timer()
                .unwrap()
                .is_some_and(|t| t <= clock.now());
            if !pending {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Stops the server gracefully and starts a new one on the same database file.
    pub async fn restart(mut self) -> TestApp {
        let server = self.server.take().unwrap();
        server.stop().await;
        start_in(self.dir, self.clock).await
    }
}

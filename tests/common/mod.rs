//! The one way tests start a server: on 127.0.0.1:0 with a database in a temp dir.
#![allow(dead_code)]

pub mod binary;

use std::sync::Arc;

use agentq::time::{Clock, ManualClock};
use agentq::{Config, Server};
use serde_json::{json, Value};

pub struct TestApp {
    pub server: Option<Server>,
    /// The admin key the server generated on its first start.
    pub admin_key: String,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub clock: Option<Arc<ManualClock>>,
}

/// What `look` answers once `done` holds for it, asking again every 10 ms for up to `limit`
/// (what the server writes or counts after an answer shows a moment later); the last answer
/// if it never does, for the caller's assertion to show.
pub async fn eventually<T, F: std::future::Future<Output = T>>(
    limit: std::time::Duration,
    mut look: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let start = std::time::Instant::now();
    loop {
        let seen = look().await;
        if done(&seen) || start.elapsed() >= limit {
            return seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The `id` of every item of a listing's `data`.
pub fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// The value of the unlabelled series `name` in a `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
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
    start_with_key(dir, clock, None, |_| {}).await
}

/// Starts a server; `key` is the admin key of an earlier start on the same file.
pub async fn start_with_key(
    dir: tempfile::TempDir,
    clock: Option<Arc<ManualClock>>,
    key: Option<String>,
    tune: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = Config::new(dir.path().join("agentq.redb"), "127.0.0.1:0");
    config.rate_limit_per_minute = 0;
    if let Some(c) = &clock {
        config.clock = c.clone() as Arc<dyn Clock>;
    }
    tune(&mut config);
    let server = Server::start(config).await.expect("server starts");
    let admin_key = server
        .generated_admin_key
        .clone()
        .or(key)
        .expect("a fresh database prints an admin key");
    let base = format!("http://{}", server.addr);
    TestApp {
        server: Some(server),
        client: client_with_key(&admin_key),
        admin_key,
        base,
        dir,
        clock,
    }
}

/// GET `url`: the answer's JSON.
pub async fn get_json(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// POST `body` to `url`: the answer's status and JSON.
pub async fn post_json(client: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A client that sends `key` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", key.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

impl TestApp {
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.call_with(&self.client, method, path, body).await
    }

    /// A request with another client (another key, a session, no credentials).
    pub async fn call_with(
        &self,
        client: &reqwest::Client,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        let mut req = client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
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

    /// Creates an API key and returns (id, key text).
    pub async fn key(&self, role: &str, projects: Option<Vec<&str>>) -> (String, String) {
        let r = self
            .post(
                "/api/keys",
                json!({"name": format!("{role}-key"), "role": role, "projects": projects}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        (
            r.data()["id"].as_str().unwrap().to_string(),
            r.data()["key"].as_str().unwrap().to_string(),
        )
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

    /// Creates `tasks` in bulk requests of up to 1,000, each answered 201 with every task
    /// created; returns their ids in order.
    pub async fn bulk(&self, project: &str, tasks: &[Value]) -> Vec<String> {
        let mut ids = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(1000) {
            let r = self
                .post(
                    &format!("/api/projects/{project}/tasks/bulk"),
                    serde_json::json!({"tasks": chunk}),
                )
                .await;
            assert_eq!(r.status, 201, "{:?}", r.body);
            assert_eq!(
                r.data()["tasksCreated"],
                chunk.len(),
                "{:?}",
                r.data()["errors"]
            );
            for t in r.data()["createdTasks"].as_array().unwrap() {
                ids.push(t["id"].as_str().unwrap().to_string());
            }
        }
        ids
    }

    /// next-task for `agent`: the task (or Null) of the answer.
    pub async fn next(&self, agent: &str, body: Value) -> Value {
        let r = self
            .post(&format!("/api/agents/{agent}/next-task"), body)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.data()["task"].clone()
    }

    /// `agent` fails task `id` with `error`.
    pub async fn fail(&self, id: &str, agent: &str, error: &str) -> Resp {
        self.post(
            &format!("/api/tasks/{id}/fail"),
            json!({"agentName": agent, "error": error}),
        )
        .await
    }

    /// A task type "t" whose leases last one minute, and one task of it: (type id, task id).
    pub async fn minute_task(&self, project: &str) -> (String, String) {
        let ty = self
            .task_type(project, json!({"name": "t", "leaseDurationMinutes": 1}))
            .await;
        let id = self
            .task(project, json!({"typeId": ty, "instructions": "x"}))
            .await;
        (ty, id)
    }

    /// The value of the unlabelled series `name` in this server's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics_text().await, name)
    }

    /// The value of the unlabelled series `name` once it is above `floor`, looking for up to
    /// 5 s (what the server counts after an answer or a disconnect shows a moment later); the
    /// last value seen if it never rises.
    pub async fn metric_above(&self, name: &str, floor: f64) -> f64 {
        let limit = std::time::Duration::from_secs(5);
        eventually(limit, || self.metric(name), |v| *v > floor).await
    }

    /// One scrape of this server's `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let scraped = self.get("/metrics").await;
        scraped.body.as_str().expect("/metrics is text").to_string()
    }

    pub async fn stats(&self, project: &str) -> Value {
        self.get(&format!("/api/projects/{project}")).await.data()["stats"].clone()
    }

    /// Moves the manual clock and lets the scheduler look again.
    pub async fn advance(&self, ms: i64) {
        self.clock.as_ref().expect("manual clock").advance(ms);
        self.scheduler_looks().await;
    }

    /// Steps the manual clock's wall time alone (an NTP step; negative: back) and lets the
    /// scheduler look again.
    pub async fn step_wall_clock(&self, ms: i64) {
        self.clock.as_ref().expect("manual clock").step(ms);
        self.scheduler_looks().await;
    }

    async fn scheduler_looks(&self) {
        let clock = self.clock.as_ref().expect("manual clock");
        let server = self.server.as_ref().unwrap();
        server.store.hub.timer.notify_one();
        // The scheduler runs its pass through the writer; give it a moment to commit.
        for _ in 0..200 {
            let pending = server
                .store
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
    pub async fn restart(self) -> TestApp {
        self.restart_after(|_| {}).await
    }

    /// Stops the server, hands the database file to `edit`, and starts again on it.
    pub async fn restart_after(self, edit: impl FnOnce(&std::path::Path)) -> TestApp {
        self.restart_tuned(edit, |_| {}).await
    }

    /// As [`Self::restart_after`], with `tune` applied to the new server's configuration.
    pub async fn restart_tuned(
        mut self,
        edit: impl FnOnce(&std::path::Path),
        tune: impl FnOnce(&mut Config),
    ) -> TestApp {
        let server = self.server.take().unwrap();
        server.stop().await;
        edit(&self.dir.path().join("agentq.redb"));
        start_with_key(self.dir, self.clock, Some(self.admin_key), tune).await
    }
}

/// Puts every task's body back into its row and drops the bodies table: the rows as schemas
/// 1 to 3 wrote them (tests of the migrations fake older files with it, inside `txn`).
pub fn inline_bodies(txn: &redb::WriteTransaction) {
    use agentq::store::tables::{inline_row, TASKS, TASK_BODIES};
    use redb::ReadableTable;
    schema_4_rows(txn);
    {
        let mut tasks = txn.open_table(TASKS).unwrap();
        let bodies = txn.open_table(TASK_BODIES).unwrap();
        let rows: Vec<(u64, Vec<u8>)> = tasks
            .iter()
            .unwrap()
            .map(|r| r.unwrap())
            .map(|(k, v)| (k.value(), v.value().to_vec()))
            .collect();
        for (seq, row) in rows {
            let body = bodies.get(seq).unwrap().expect("every task has a body");
            let old = inline_row(&row, body.value()).unwrap();
            tasks.insert(seq, old.as_slice()).unwrap();
        }
    }
    txn.delete_table(TASK_BODIES).unwrap();
}

/// Removes the last `n` bytes of every row of `def`, asserting they are zeros (postcard's
/// `None` and `false`: a field a migration appended and nothing set since).
fn drop_zero_tail(
    txn: &redb::WriteTransaction,
    def: redb::TableDefinition<u128, &'static [u8]>,
    n: usize,
    what: &str,
) {
    use redb::ReadableTable;
    let mut table = txn.open_table(def).unwrap();
    let rows: Vec<(u128, Vec<u8>)> = table
        .iter()
        .unwrap()
        .map(|r| r.unwrap())
        .map(|(k, v)| (k.value(), v.value().to_vec()))
        .collect();
    for (k, mut row) in rows {
        let tail = row.split_off(row.len() - n);
        assert!(tail.iter().all(|b| *b == 0), "{what}");
        table.insert(k, row.as_slice()).unwrap();
    }
}

/// Rewrites a file of today's schema into schema 5's rows (the caller sets the version):
/// project rows without their retention (asserted unset) and no ENDED index entries.
pub fn schema_5_rows(txn: &redb::WriteTransaction) {
    use agentq::store::tables::{ix, INDEX, PROJECTS};
    use redb::ReadableTable;
    drop_zero_tail(txn, PROJECTS, 3, "no retention set");
    let mut index = txn.open_table(INDEX).unwrap();
    let ended: Vec<Vec<u8>> = index
        .range(&[ix::ENDED][..]..&[ix::ENDED + 1][..])
        .unwrap()
        .map(|r| r.unwrap().0.value().to_vec())
        .collect();
    for k in ended {
        index.remove(k.as_slice()).unwrap();
    }
}

/// Rewrites a file of today's schema into schema 4's rows (the caller sets the version): as
/// schema 5's, and task types and keys without their last field (`script`, `allowScripts`,
/// asserted unset), bodies without their script, and no executions table.
pub fn schema_4_rows(txn: &redb::WriteTransaction) {
    schema_5_rows(txn);
    use agentq::store::tables::{decode_body, encode, EXECUTIONS, KEYS, TASK_BODIES, TYPES};
    use redb::ReadableTable;
    drop_zero_tail(txn, TYPES, 1, "no script");
    drop_zero_tail(txn, KEYS, 1, "no allowScripts");
    {
        let mut bodies = txn.open_table(TASK_BODIES).unwrap();
        let rows: Vec<(u64, Vec<u8>)> = bodies
            .iter()
            .unwrap()
            .map(|r| r.unwrap())
            .map(|(k, v)| (k.value(), v.value().to_vec()))
            .collect();
        for (seq, body) in rows {
            let (instructions, variables, script) = decode_body(&body).unwrap();
            assert!(script.is_none());
            let old = encode(&(instructions, variables)).unwrap();
            bodies.insert(seq, old.as_slice()).unwrap();
        }
    }
    txn.delete_table(EXECUTIONS).unwrap();
}

//! A minimal agent: ask for work, do it, report it, repeat.
//!
//! Run a server (`cargo run --release -- serve`), create a project named `demo` with a few
//! tasks (see the README), then:
//! `AGENTQ_KEY=<an agent or admin key> cargo run --example agent -- [BASE_URL] [PROJECT] [AGENT]`.

use std::time::Duration;

use serde_json::{json, Value};

/// POSTs `body`, waiting and sending again while the server is unreachable, over the rate
/// limit (429) or in storage trouble (503). Safe for the calls below: a repeated next-task
/// resumes the agent's task, and a repeated complete with the same lease token is answered 200.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<reqwest::Response, Box<dyn std::error::Error>> {
    for attempt in 0..10u32 {
        let wait = match client.post(url).json(body).send().await {
            Err(e) if e.is_connect() || e.is_timeout() || e.is_request() => {
                2u64.pow(attempt).min(30)
            }
            Err(e) => return Err(e.into()),
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1),
            Ok(r) => return Ok(r),
        };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    Err(format!("{url} kept failing").into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let project = args.next().unwrap_or_else(|| "demo".into());
    let agent = args.next().unwrap_or_else(|| "rust-agent".into());
    let key = std::env::var("AGENTQ_KEY").map_err(|_| "set AGENTQ_KEY to an API key")?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", key.parse()?);
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()?;
    loop {
        // Long-poll: the server answers as soon as a task appears, or after 20 s with none.
        let reply: Value = post(
            &client,
            &format!("{base}/api/agents/{agent}/next-task"),
            &json!({"projectId": project, "waitSeconds": 20}),
        )
        .await?
        .json()
        .await?;
        let task = &reply["data"]["task"];
        if task.is_null() {
            if let Some(err) = reply["error"]
                .as_str()
                .filter(|_| reply["code"].is_string())
            {
                return Err(err.into());
            }
            println!("no task yet; asking again");
            continue;
        }
        let id = task["id"].as_str().unwrap_or_default();
        let instructions = task["instructions"].as_str().unwrap_or_default();
        println!("working on {id}: {instructions}");

        // The work itself. Here: count the words. (Work that fails would POST .../fail with
        // `{"agentName", "leaseToken", "error"}`; the server retries it with back-off.)
        let words = instructions.split_whitespace().count();

        let done = post(
            &client,
            &format!("{base}/api/tasks/{id}/complete"),
            &json!({
                "agentName": agent,
                "leaseToken": task["leaseToken"],
                "result": format!("{words} words"),
                "outputs": {"words": words},
            }),
        )
        .await?;
        // 409 LEASE_LOST: the lease ran out (or the task was cancelled) before the report;
        // the task is someone else's now, and this result is not kept.
        println!("completed {id}: HTTP {}", done.status());
    }
}

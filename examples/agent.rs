//! A minimal agent: ask for work, do it, report it, repeat.
//!
//! Run a server (`cargo run --release -- serve`), create a project named `demo` with a few
//! tasks (see the README), then:
//! `AGENTQ_KEY=<an agent or admin key> cargo run --example agent -- [BASE_URL] [PROJECT] [AGENT]`.

use serde_json::{json, Value};

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
        .build()?;
    loop {
        // Long-poll: the server answers as soon as a task appears, or after 20 s with none.
        let r = client
            .post(format!("{base}/api/agents/{agent}/next-task"))
            .json(&json!({"projectId": project, "waitSeconds": 20}))
            .send()
            .await?;
        if matches!(r.status().as_u16(), 429 | 503) {
            // Over the rate limit, or storage trouble: wait as told, then ask again.
            let secs = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1);
            tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
            continue;
        }
        let reply: Value = r.json().await?;
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

        // The work itself. Here: count the words.
        let words = instructions.split_whitespace().count();

        let done = client
            .post(format!("{base}/api/tasks/{id}/complete"))
            .json(&json!({
                "agentName": agent,
                "leaseToken": task["leaseToken"],
                "result": format!("{words} words"),
                "outputs": {"words": words},
            }))
            .send()
            .await?;
        println!("completed {id}: HTTP {}", done.status());
    }
}

//! The client commands of the `agentq` binary (`agentq project create`, `agentq next`, ...),
//! built from the verb table ([`VERBS`], in `verbs`): each verb becomes a command with its
//! flags, its matches become the verb's REST request, and its answer prints as the verb says.
//! Beside the table: `task bulk` (a file in chunks), `task list --all`, `status`, and the
//! dispatch to `agentq work`.
//!
//! Output: `--json` prints the server's `data` exactly (a listing with `--all`: the merged
//! array; a bulk in chunks: one summed answer); without it, fields and tables for a person.
//! Exit codes: 0 success, 1 any other error, 2 usage, 3 not found, 4 conflict, 5 nothing to do.

use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{json, Map, Value};

use crate::client::{segment, Client, ClientError, Method};
use crate::time::duration_of;
pub use crate::verbs::{At, Kind, Param, Show, Verb, VERBS};

/// The options every client verb takes (and `agentq work` and `agentq mcp`).
pub fn connection_args() -> [Arg; 4] {
    [
        Arg::new("url")
            .long("url")
            .env("AGENTQ_URL")
            .default_value("http://127.0.0.1:3000")
            .global(true)
            .help("The server"),
        Arg::new("key")
            .long("key")
            .env("AGENTQ_KEY")
            .hide_env_values(true)
            .global(true)
            .help("API key"),
        Arg::new("key-file")
            .long("key-file")
            .global(true)
            .conflicts_with("key")
            .help("Read the API key from this file"),
        Arg::new("json")
            .long("json")
            .action(ArgAction::SetTrue)
            .global(true)
            .help("Print the server's data as JSON"),
    ]
}

/// The client subcommands, grouped by their first word, for the binary's command line.
pub fn commands() -> Vec<Command> {
    let mut groups: Vec<Command> = Vec::new();
    for verb in VERBS.iter().filter(|v| !v.words.is_empty()) {
        let leaf = verb_command(verb);
        match verb.words {
            [only] => groups.push(leaf.name(*only).args(connection_args())),
            [group, name] => {
                let leaf = leaf.name(*name);
                match groups.iter().position(|g| g.get_name() == *group) {
                    Some(i) => {
                        let g = groups.remove(i).subcommand(leaf);
                        groups.insert(i, g);
                    }
                    None => groups.push(
                        Command::new(*group)
                            .about(group_about(group))
                            .subcommand_required(true)
                            .arg_required_else_help(true)
                            .args(connection_args())
                            .subcommand(leaf),
                    ),
                }
            }
            _ => unreachable!("verbs have one or two words"),
        }
    }
    groups.push(crate::worker::command().args(connection_args()));
    // Served by `mcp::run_stdio`, which the binary calls for it.
    groups.push(
        Command::new("mcp")
            .about("Serve the queue as MCP tools on stdin and stdout, for an LLM agent")
            .args(connection_args()),
    );
    groups.push(
        Command::new("backup")
            .about("Save an online backup of the whole database to FILE (admin key)")
            .arg(
                Arg::new("FILE")
                    .required(true)
                    .help("Where to write the copy (a normal agentq database file)"),
            )
            .args(connection_args()),
    );
    groups.push(
        Command::new("status")
            .about("One screen over every project: counts, queue, agents, the last hour")
            .args(connection_args()),
    );
    if let Some(i) = groups.iter().position(|g| g.get_name() == "task") {
        let g = groups.remove(i).subcommand(
            Command::new("bulk")
                .about("Create tasks from a JSON array or JSON lines (FILE, or - for stdin)")
                .arg(
                    Arg::new("PROJECT")
                        .required(true)
                        .help("Project name or id"),
                )
                .arg(
                    Arg::new("FILE")
                        .required(true)
                        .help("A file, or - for stdin"),
                ),
        );
        groups.insert(i, g);
    }
    if let Some(i) = groups.iter().position(|g| g.get_name() == "task") {
        // `task list --all` follows the cursor to the end.
        let g = groups.remove(i).mut_subcommand("list", |list| {
            list.arg(
                Arg::new("all")
                    .long("all")
                    .action(ArgAction::SetTrue)
                    .help("Every page, following the cursor"),
            )
        });
        groups.insert(i, g);
    }
    groups
}

fn group_about(group: &str) -> &'static str {
    match group {
        "project" => "Projects: create, list, show, stats, update, delete",
        "type" => "Task types: create, list, show, update, delete",
        "task" => "Tasks: create, bulk, list, show, cancel, retry, delete, attempts",
        "key" => "API keys: create, list, delete",
        _ => "",
    }
}

fn verb_command(verb: &Verb) -> Command {
    let mut cmd = Command::new(verb.words[verb.words.len() - 1]).about(verb.about);
    for p in verb.params {
        let mut arg = Arg::new(p.name).help(p.help);
        if p.positional {
            arg = arg.required(p.required);
        } else {
            arg = arg.long(p.name).required(p.required);
            arg = match p.kind {
                Kind::Flag | Kind::FlagFalse => arg.action(ArgAction::SetTrue),
                Kind::List | Kind::Vars => arg.action(ArgAction::Append),
                _ => arg,
            };
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Whether `name` is a client subcommand (else the binary's own: serve, add-admin-key).
pub fn is_client_command(name: &str) -> bool {
    ["status", "work", "backup"].contains(&name)
        || VERBS.iter().any(|v| v.words.first() == Some(&name))
}

/// Runs the client subcommand `name` with its matches.
pub async fn run(name: &str, matches: &ArgMatches) -> ExitCode {
    let json_out = matches.get_flag("json");
    let client = match client_of(matches) {
        Ok(c) => c,
        Err(why) => return usage(&why),
    };
    let outcome = match (name, matches.subcommand()) {
        ("work", _) => return crate::worker::run(client, matches).await,
        ("status", _) => status(&client, json_out).await,
        ("backup", _) => backup(&client, matches, json_out).await,
        ("task", Some(("bulk", m))) => bulk(&client, m, json_out).await,
        (_, Some((leaf, m))) => match find(&[name, leaf]) {
            Some(verb) => run_verb(&client, verb, m, json_out).await,
            None => return usage(&format!("unknown command {name} {leaf}")),
        },
        (_, None) => match find(&[name]) {
            Some(verb) => run_verb(&client, verb, matches, json_out).await,
            None => return usage(&format!("unknown command {name}")),
        },
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Client(e)) => {
            crate::logs::say(format!("agentq: {e}\n"));
            if let ClientError::Server { details, .. } = &e {
                for d in details {
                    crate::logs::say(format!("  {d}\n"));
                }
            }
            ExitCode::from(e.exit_code())
        }
        Err(Failure::Usage(why)) => usage(&why),
    }
}

fn usage(why: &str) -> ExitCode {
    crate::logs::say(format!("agentq: {why}\n"));
    ExitCode::from(2)
}

/// Why a verb did not run to its end.
enum Failure {
    Client(ClientError),
    Usage(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

fn find(words: &[&str]) -> Option<&'static Verb> {
    VERBS.iter().find(|v| v.words == words)
}

/// The client the connection options name (`--url`, `--key`, `--key-file`).
pub fn client_of(m: &ArgMatches) -> Result<Client, String> {
    let url = m
        .get_one::<String>("url")
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let key = match (m.get_one::<String>("key"), m.get_one::<String>("key-file")) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the key file {path}: {e}"))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    Ok(Client::new(&url, key))
}

/// The request a verb's matches make: its path (with query) and body.
fn request(verb: &Verb, m: &ArgMatches) -> Result<(String, Option<Value>), String> {
    let mut path = verb.route.to_string();
    let mut query = Vec::new();
    let mut body = Map::new();
    for p in verb.params {
        let value = match p.kind {
            Kind::Flag => m.get_flag(p.name).then_some(Value::Bool(true)),
            Kind::FlagFalse => m.get_flag(p.name).then_some(Value::Bool(false)),
            Kind::List => m
                .get_many::<String>(p.name)
                .map(|vs| Value::from(vs.cloned().collect::<Vec<_>>())),
            Kind::Vars => match m.get_many::<String>(p.name) {
                Some(vs) => Some(vars(vs)?),
                None => None,
            },
            _ => match m.get_one::<String>(p.name) {
                Some(text) => Some(value_of(p, text)?),
                None => p.default.map(Value::from),
            },
        };
        let Some(value) = value else { continue };
        match p.at {
            At::Local => {}
            At::Path => {
                path = path.replace(&format!("{{{}}}", p.field), &segment(&plain(&value)));
            }
            At::Query => query.push(format!("{}={}", p.field, segment(&plain(&value)))),
            At::Body => match p.field.split_once('.') {
                Some((object, field)) => {
                    let inner = body.entry(object).or_insert_with(|| json!({}));
                    inner[field] = value;
                }
                None => {
                    body.insert(p.field.to_string(), value);
                }
            },
        }
    }
    if let Some(script) = body.get_mut("script") {
        if script.get("type").is_none() {
            let python = m
                .try_get_one::<String>("script")
                .ok()
                .flatten()
                .is_some_and(|s| s.starts_with('@') && s.ends_with(".py"));
            script["type"] = Value::from(if python { "python" } else { "bash" });
        }
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let body = matches!(verb.method, Method::Post | Method::Put).then_some(Value::Object(body));
    Ok((path, body))
}

/// A parameter's text as the JSON the server takes.
fn value_of(p: &Param, text: &str) -> Result<Value, String> {
    let bad = |what: &str| format!("--{}: {what}, not {text:?}", p.name);
    Ok(match p.kind {
        Kind::Int => Value::from(text.parse::<i64>().map_err(|_| bad("an integer"))?),
        Kind::Float => Value::from(text.parse::<f64>().map_err(|_| bad("a number"))?),
        Kind::Json => serde_json::from_str(text).map_err(|_| bad("JSON"))?,
        Kind::TextOrFile => Value::from(text_or_file(text)?),
        Kind::Time => {
            Value::from(time_of(text).ok_or_else(|| bad("an RFC 3339 time or +<n>[smhd]"))?)
        }
        Kind::Ago => {
            Value::from(time_of(&format!("-{text}")).ok_or_else(|| bad("a duration <n>[smhd]"))?)
        }
        Kind::Seconds => Value::from(
            duration_of(text)
                .ok_or_else(|| bad("a duration <n>[smhd]"))?
                .as_secs_f64()
                .ceil() as u64,
        ),
        _ => Value::from(text),
    })
}

/// `@FILE` as the file's contents; any other text as it is.
fn text_or_file(text: &str) -> Result<String, String> {
    match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}")),
        None => Ok(text.to_string()),
    }
}

/// `NAME=VALUE` pairs as a JSON object.
fn vars<'a>(pairs: impl Iterator<Item = &'a String>) -> Result<Value, String> {
    let mut out = Map::new();
    for pair in pairs {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--var: NAME=VALUE, not {pair:?}"))?;
        out.insert(name.to_string(), Value::from(value));
    }
    Ok(Value::Object(out))
}

/// An RFC 3339 time as it is, or `+<duration>` from now, as RFC 3339.
fn time_of(text: &str) -> Option<String> {
    let now = || crate::time::Clock::now(&crate::time::SystemClock);
    let ms = |d: &str| i64::try_from(duration_of(d)?.as_millis()).ok();
    if let Some(d) = text.strip_prefix('+') {
        return Some(crate::time::format(now().checked_add(ms(d)?)?));
    }
    if let Some(d) = text.strip_prefix('-') {
        return Some(crate::time::format(now().checked_sub(ms(d)?)?));
    }
    crate::time::parse(text).map(|_| text.to_string())
}

/// Runs one verb of the table: resolves names the server does not take itself, calls, and
/// prints. The exit code of a success (0, or 5 when there is nothing to do).
async fn run_verb(
    client: &Client,
    verb: &Verb,
    m: &ArgMatches,
    json_out: bool,
) -> Result<u8, Failure> {
    let (mut path, body) = request(verb, m).map_err(Failure::Usage)?;
    if path.contains("/api/task-types/") {
        // The type routes take an id: a name is looked up in the project.
        let project = m.get_one::<String>("PROJECT").cloned().unwrap_or_default();
        let ty = m.get_one::<String>("TYPE").cloned().unwrap_or_default();
        let id = client.type_id(&project, &ty).await?;
        // Only the type's own segment: a short name may also occur in the route's words.
        path = path.replacen(
            &format!("/api/task-types/{}", segment(&ty)),
            &format!("/api/task-types/{}", segment(&id)),
            1,
        );
    }
    let all = m.try_get_one::<bool>("all").ok().flatten().copied() == Some(true);
    let data = if all {
        every_page(client, &path).await?
    } else {
        client.call(verb.method, &path, body.as_ref()).await?["data"].take()
    };
    let nothing = match verb.tool {
        "get_next_task" => data["task"].is_null(),
        "peek_next_task" => data["tasksAvailable"].as_u64() == Some(0),
        _ => false,
    };
    if verb.tool == "get_next_task" && !json_out {
        // The task is what a person wants to see; an empty queue is said on stderr.
        match nothing {
            true => crate::logs::say("agentq: no task available\n"),
            false => print(verb.show, &data["task"], false),
        }
    } else {
        print(verb.show, &data, json_out);
    }
    Ok(if nothing { 5 } else { 0 })
}

/// Every page of a listing, following `pagination.nextCursor`.
async fn every_page(client: &Client, path: &str) -> Result<Value, Failure> {
    let mut items = Vec::new();
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut cursor: Option<String> = None;
    loop {
        let page = match &cursor {
            Some(c) => format!("{path}{sep}cursor={}", segment(c)),
            None => path.to_string(),
        };
        let answer = client.call(Method::Get, &page, None).await?;
        items.extend(answer["data"].as_array().cloned().unwrap_or_default());
        match answer["pagination"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(Value::from(items)),
        }
    }
}

/// `task bulk P FILE`: a JSON array or JSON lines, sent 1,000 tasks a request; the answers
/// summed into one, with `errors` indexed over the whole input. Exit 1 if any item failed.
async fn bulk(client: &Client, m: &ArgMatches, json_out: bool) -> Result<u8, Failure> {
    let project = m.get_one::<String>("PROJECT").cloned().unwrap_or_default();
    let file = m.get_one::<String>("FILE").cloned().unwrap_or_default();
    let text = if file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(&file)
            .map_err(|e| Failure::Usage(format!("cannot read {file}: {e}")))?
    };
    let tasks = tasks_of(&text).map_err(Failure::Usage)?;
    let path = format!("/api/projects/{}/tasks/bulk", segment(&project));
    // The created tasks pass through as the server wrote them: 100,000 of them as JSON trees
    // cost the client more than the server spent creating them.
    let (mut created, mut errors, mut count) = (Vec::new(), Vec::new(), 0u64);
    // A progress bar on a terminal, when there is more than one request to wait for.
    let bar = tasks.len() > BULK_CHUNK && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // One request at a time, so that the tasks are queued in the file's order.
    for (n, chunk) in tasks.chunks(BULK_CHUNK).enumerate() {
        if bar {
            progress_bar(n * BULK_CHUNK, tasks.len());
        }
        let body = format!("{{\"tasks\":[{}]}}", chunk.join(","));
        let text = client.call_text(Method::Post, &path, Some(body)).await?;
        let answer: BulkAnswer = serde_json::from_str(&text).map_err(|e| {
            Failure::Client(ClientError::Unexpected {
                url: path.clone(),
                status: 201,
                body: e.to_string(),
            })
        })?;
        count += answer.data.tasks_created;
        let items = answer.data.created_tasks.get().trim();
        let items = &items[1..items.len() - 1];
        if !items.trim().is_empty() && json_out {
            created.push(items.to_string());
        }
        for mut e in answer.data.errors {
            let index = e["index"].as_u64().unwrap_or(0) + (n * BULK_CHUNK) as u64;
            e["index"] = Value::from(index);
            errors.push(e);
        }
    }
    if bar {
        progress_bar(tasks.len(), tasks.len());
        crate::logs::say("\n");
    }
    let failed = !errors.is_empty();
    if json_out {
        let errors = Value::from(errors);
        say_out(&format!(
            "{{\"tasksCreated\":{count},\"createdTasks\":[{}],\"errors\":{errors}}}",
            created.join(",")
        ));
    } else {
        say_out(&format!("{count} tasks created"));
        for e in &errors {
            crate::logs::say(format!(
                "  task {}: {}\n",
                e["index"],
                e["error"].as_str().unwrap_or("")
            ));
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// Tasks a bulk request takes (the server's limit).
const BULK_CHUNK: usize = 1000;

/// The parts of a bulk's answer `task bulk` reads; the created tasks stay text.
#[derive(serde::Deserialize)]
struct BulkAnswer<'a> {
    #[serde(borrow)]
    data: BulkData<'a>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkData<'a> {
    tasks_created: u64,
    #[serde(borrow)]
    created_tasks: &'a serde_json::value::RawValue,
    errors: Vec<Value>,
}

/// `agentq backup FILE`: the server's snapshot, streamed into FILE with a progress bar on a
/// terminal.
async fn backup(client: &Client, m: &ArgMatches, json_out: bool) -> Result<u8, Failure> {
    let file = m.get_one::<String>("FILE").cloned().unwrap_or_default();
    let dest = std::path::PathBuf::from(&file);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut shown = 0u64;
    let bytes = client
        .download("/api/admin/backup", &dest, |done, total| {
            // A redraw per MiB at most.
            if tty && total > 0 && (done - shown >= 1 << 20 || done == total) {
                shown = done;
                bytes_bar(done, total);
            }
        })
        .await?;
    if tty {
        crate::logs::say("\n");
    }
    let out = if json_out {
        format!("{}\n", serde_json::json!({"file": file, "bytes": bytes}))
    } else {
        format!(
            "backup written to {file} ({:.1} MiB); `agentq check --db {file}` verifies it\n",
            bytes as f64 / 1048576.0
        )
    };
    print!("{out}");
    Ok(0)
}

/// `[#####     ] 12.0/24.0 MiB` on stderr, over the previous one.
fn bytes_bar(done: u64, total: u64) {
    const WIDTH: u64 = 30;
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    crate::logs::say(format!(
        "\r[{}{}] {:.1}/{:.1} MiB",
        "#".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize),
        done as f64 / 1048576.0,
        total as f64 / 1048576.0
    ));
}

/// `[#####     ] 5000/10000 tasks` on stderr, over the previous one.
fn progress_bar(done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    crate::logs::say(format!(
        "\r[{}{}] {done}/{total} tasks",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    ));
}

/// The tasks of a bulk file, each as its JSON text: a JSON array, or one JSON value a line.
fn tasks_of(text: &str) -> Result<Vec<&str>, String> {
    use serde_json::value::RawValue;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(trimmed).map_err(|e| format!("not a JSON array: {e}"))?;
        return Ok(items.into_iter().map(RawValue::get).collect());
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<&RawValue>(l)
                .map(RawValue::get)
                .map_err(|e| format!("line {}: {e}", i + 1))
        })
        .collect()
}

/// `agentq status`: every project's counts, queue, agents and the last hour.
async fn status(client: &Client, json_out: bool) -> Result<u8, Failure> {
    let projects = every_page(client, "/api/projects?status=all").await?;
    let mut rows = Vec::new();
    for p in projects.as_array().into_iter().flatten() {
        let id = p["id"].as_str().unwrap_or_default();
        let path = format!("/api/projects/{}/stats", segment(id));
        let stats = client.call(Method::Get, &path, None).await?["data"].take();
        rows.push(json!({"project": p["name"], "status": p["status"], "stats": stats}));
    }
    if json_out {
        say_out(&Value::from(rows).to_string());
        return Ok(0);
    }
    let mut table = vec![vec![
        "project".to_string(),
        "status".into(),
        "queued".into(),
        "depth".into(),
        "running".into(),
        "completed".into(),
        "failed".into(),
        "agents".into(),
        "done/h".into(),
        "failed/h".into(),
    ]];
    for r in &rows {
        let s = &r["stats"];
        let n = |v: &Value| match v {
            Value::Null => "-".to_string(),
            v => v.to_string(),
        };
        let stats = &s["project"]["stats"];
        let hour = &s["recentActivity"];
        table.push(vec![
            plain(&r["project"]),
            plain(&r["status"]),
            n(&stats["queuedTasks"]),
            n(&s["queueDepth"]),
            n(&stats["runningTasks"]),
            n(&stats["completedTasks"]),
            n(&stats["failedTasks"]),
            n(&s["activeAgents"]),
            n(&hour["tasksCompletedLastHour"]),
            n(&hour["tasksFailedLastHour"]),
        ]);
    }
    say_out(&render_table(&table));
    Ok(0)
}

/// Prints an answer: JSON as it came, or for a person.
fn print(show: Show, data: &Value, json_out: bool) {
    if json_out {
        say_out(&data.to_string());
        return;
    }
    match show {
        Show::Done(what) => say_out(what),
        Show::Fields => say_out(&fields(data)),
        Show::Table(columns) => {
            let mut rows = vec![columns.iter().map(|c| c.to_string()).collect::<Vec<_>>()];
            for item in data.as_array().into_iter().flatten() {
                rows.push(columns.iter().map(|c| cell(&item[*c])).collect());
            }
            say_out(&render_table(&rows));
        }
    }
}

/// An object's fields, one a line (`name: value`); a nested object's on one line as JSON.
fn fields(data: &Value) -> String {
    match data {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {}", plain(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => plain(other),
    }
}

/// A value as a person reads it: text without quotes, null as `-`, the rest as JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A table cell: one line, at most 60 characters.
fn cell(v: &Value) -> String {
    let text = plain(v).replace(['\n', '\r', '\t'], " ");
    match text.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    // Statuses in colour, for a person at a terminal only.
    let colour = colour_wanted();
    let coloured: Vec<bool> = rows.first().map_or(Vec::new(), |header| {
        header
            .iter()
            .map(|h| colour && (h == "status" || h == "outcome"))
            .collect()
    });
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            r.iter()
                .enumerate()
                .map(|(c, text)| {
                    let padded = format!("{text:<w$}", w = widths[c]);
                    match ansi_colour(text) {
                        Some(code) if i > 0 && coloured[c] => {
                            format!("\x1b[{code}m{padded}\x1b[0m")
                        }
                        _ => padded,
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Colour on stdout: when it is a terminal and `NO_COLOR` is not set (no-color.org).
fn colour_wanted() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
}

/// The ANSI colour of a status or an outcome.
fn ansi_colour(status: &str) -> Option<&'static str> {
    Some(match status {
        "completed" | "active" => "32",
        "running" => "33",
        "failed" | "timeout" => "31",
        "queued" => "36",
        "cancelled" | "closed" => "2",
        _ => return None,
    })
}

/// A line on stdout; a closed stdout is not a reason to panic.
fn say_out(text: &str) {
    let _ = crate::server::print_stdout(&format!("{text}\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every verb's route placeholders are filled by its path parameters, and its words and
    /// tool names are unique: the table is the one place they are declared.
    #[test]
    fn the_verb_table_is_consistent() {
        let mut tools = std::collections::HashSet::new();
        let mut words = std::collections::HashSet::new();
        for v in VERBS {
            assert!(tools.insert(v.tool), "tool {} twice", v.tool);
            assert!(
                v.words.is_empty() || words.insert(v.words),
                "{:?} twice",
                v.words
            );
            for p in v.params.iter().filter(|p| p.at == At::Path) {
                assert!(
                    v.route.contains(&format!("{{{}}}", p.field)),
                    "{} {}",
                    v.tool,
                    p.field
                );
            }
            let placeholders = v.route.matches('{').count();
            let path_params = v.params.iter().filter(|p| p.at == At::Path).count();
            assert_eq!(placeholders, path_params, "{}", v.tool);
        }
        // The command line builds from the table without clap's debug assertions failing.
        let cli = Command::new("agentq").subcommands(commands());
        cli.debug_assert();
    }

    #[test]
    fn bulk_files_are_a_json_array_or_json_lines() {
        assert_eq!(tasks_of("[{\"a\":1},{\"a\":2}]").unwrap().len(), 2);
        assert_eq!(tasks_of("{\"a\":1}\n\n{\"a\":2}\n").unwrap().len(), 2);
        assert!(tasks_of("{\"a\":1}\nnot json")
            .unwrap_err()
            .contains("line 2"));
    }
}

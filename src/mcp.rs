//! MCP: the queue as tools for LLM agents. One tool per entry of the verb table
//! ([`crate::verbs::VERBS`]) with TaskDriver's names, and a few prompts for the common loops,
//! served over stdio (`agentq mcp`, [`run_stdio`]) or by the server at `/mcp`
//! (`api::mcp`). A tool call is the verb's REST call to a running agentq ([`Client`]), so a
//! tool does exactly what its REST operation does, under the same key, role and project scope.
//!
//! Arguments are the REST API's camelCase fields (`projectId`, `taskId`, `agentName`,
//! `leaseToken`, `waitSeconds`); `agentName` may be left out of the agent tools, which then
//! act as one name per MCP session (`mcp-<short id>`). Results are structured content plus a
//! short text for the model; a refusal by the server is a tool error (`isError`) carrying its
//! code, message and validation details; protocol errors are kept for protocol faults (an
//! unknown tool).
//!
//! Boundary: a client of the HTTP API, like the CLI; it knows the table and the wire format.

use std::process::ExitCode;
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, Implementation, ListPromptsResult, ListToolsResult,
    PaginatedRequestParams, Prompt, PromptArgument, PromptMessage, Role, ServerCapabilities,
    ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{json, Map, Value};

use crate::client::{segment, Client, ClientError, Method};
use crate::verbs::{At, Kind, Param, Verb, VERBS};

/// One MCP session's view of the queue: the server it calls and the agent name it acts as
/// when a tool call gives none.
#[derive(Clone)]
pub struct Tools {
    client: Client,
    agent: String,
    /// The tools as `tools/list` answers them, made once per process.
    catalog: Arc<Vec<Tool>>,
}

impl Tools {
    /// A session's tools, calling the server `client` names; `catalog` from [`catalog`].
    pub fn new(client: Client, catalog: Arc<Vec<Tool>>) -> Tools {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Tools {
            client,
            agent: format!("mcp-{}", &id[..8]),
            catalog,
        }
    }

    /// Runs tool `name` with `args` through `client`: the verb's REST call, its answer as a
    /// tool result. `None`: no such tool.
    pub async fn call(
        &self,
        client: &Client,
        name: &str,
        args: &Map<String, Value>,
    ) -> Option<CallToolResult> {
        let verb = VERBS.iter().find(|v| v.tool == name)?;
        let mut args = args.clone();
        if verb.route.starts_with("/api/task-types/") {
            // The route takes the type's id: a name is looked up in the project.
            let ty = args.get("typeId").and_then(text_of).unwrap_or_default();
            if uuid::Uuid::parse_str(&ty).is_err() {
                let project = args.get("projectId").and_then(text_of).unwrap_or_default();
                match client.type_id(&project, &ty).await {
                    Ok(id) => args.insert("typeId".into(), Value::from(id)),
                    Err(e) => return Some(refusal(&e)),
                };
            }
        }
        let request = match self.request(verb, &args) {
            Ok(r) => r,
            Err(e) => return Some(refusal(&e)),
        };
        let (path, body) = request;
        Some(match client.call(verb.method, &path, body.as_ref()).await {
            Ok(mut answer) => success(verb, answer["data"].take(), &answer["pagination"]),
            Err(e) => refusal(&e),
        })
    }

    /// The REST request of `verb` with MCP arguments: the path with its ids, the query, the
    /// body (arguments that are body fields, as given).
    fn request(
        &self,
        verb: &Verb,
        args: &Map<String, Value>,
    ) -> Result<(String, Option<Value>), ClientError> {
        let mut path = verb.route.to_string();
        let mut query = Vec::new();
        let mut body = Map::new();
        for p in verb.params {
            let name = argument(p);
            let given = args.get(&name).filter(|v| !v.is_null()).cloned();
            let value = match given {
                Some(v) => v,
                None if is_agent(p) => Value::from(self.agent.clone()),
                None if p.required || p.positional => {
                    return Err(invalid(&name, "is required"));
                }
                None => continue,
            };
            match p.at {
                At::Path => {
                    let text = text_of(&value).ok_or_else(|| invalid(&name, "must be a string"))?;
                    path = path.replace(&format!("{{{}}}", p.field), &segment(&text));
                }
                At::Query => {
                    let text = text_of(&value).ok_or_else(|| invalid(&name, "must be a string"))?;
                    query.push(format!("{}={}", p.field, segment(&text)));
                }
                At::Body => {
                    body.insert(name, value);
                }
                At::Local => {}
            }
        }
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        Ok((path, has_body(verb).then_some(Value::Object(body))))
    }
}

fn has_body(verb: &Verb) -> bool {
    matches!(verb.method, Method::Post | Method::Put)
}

/// A path or query value as text: strings as they are, numbers written out.
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The agent name a tool acts as, which a session supplies when the call does not.
fn is_agent(p: &Param) -> bool {
    matches!(
        (p.at, p.field),
        (At::Path, "agent") | (At::Body, "agentName")
    )
}

/// The MCP argument of a parameter: the REST API's field, with route placeholders named as
/// the REST API names those ids (`projectId`, `taskId`, ...), and a dotted body field
/// (`script.content`) as its object (`script`).
fn argument(p: &Param) -> String {
    match (p.at, p.field) {
        (At::Path | At::Local, "project") => "projectId".into(),
        (At::Path, "task") => "taskId".into(),
        (At::Path, "type") => "typeId".into(),
        (At::Path, "agent") => "agentName".into(),
        (At::Path, "key") => "keyId".into(),
        (_, field) => field.split('.').next().unwrap_or(field).to_string(),
    }
}

/// Every tool, from the verb table; with the server's OpenAPI document `doc`, each argument
/// takes the schema of the REST field it is sent as (types, ranges, patterns, enumerations),
/// so that a tool and its REST operation take the same input.
pub fn catalog(doc: Option<&Value>) -> Arc<Vec<Tool>> {
    let tools = VERBS
        .iter()
        .map(|v| {
            let mut schema = input_schema(v);
            if let Some(doc) = doc {
                rest_schemas(&mut schema, v, doc);
            }
            let Value::Object(schema) = schema else {
                unreachable!("a schema is an object")
            };
            Tool::new(v.tool, v.model, schema)
        })
        .collect();
    Arc::new(tools)
}

/// Replaces each argument's schema in `schema` by its REST field's from `doc`, where the
/// document has it (the description stays the tool's when the field has none).
fn rest_schemas(schema: &mut Value, verb: &Verb, doc: &Value) {
    let mut path = verb.route.to_string();
    for p in verb.params.iter().filter(|p| p.at == At::Path) {
        path = path.replace(&format!("{{{}}}", p.field), &format!("{{{}}}", argument(p)));
    }
    let method = format!("{:?}", verb.method).to_lowercase();
    let Some(op) = doc.pointer(&format!("/paths/{}/{method}", pointer_token(&path))) else {
        return;
    };
    let body = op
        .pointer("/requestBody/content")
        .and_then(Value::as_object)
        .and_then(|c| c.values().next())
        .map(|media| inline(&media["schema"], doc, 0));
    for p in verb.params {
        let name = argument(p);
        let rest = match p.at {
            At::Body => body
                .as_ref()
                .and_then(|b| b["properties"].get(&name))
                .cloned(),
            At::Path | At::Query => {
                let wanted = if p.at == At::Path {
                    name.as_str()
                } else {
                    p.field
                };
                op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|param| param["name"] == wanted)
                    .map(|param| inline(&param["schema"], doc, 0))
            }
            At::Local => None,
        };
        let (Some(mut rest), Some(ours)) = (rest, schema["properties"].get_mut(&name)) else {
            continue;
        };
        if let Some(o) = rest.as_object_mut() {
            o.remove("nullable");
            if !o.contains_key("description") {
                o.insert("description".into(), ours["description"].clone());
            }
        }
        *ours = rest;
    }
}

/// `schema` with every `$ref` into the document's components replaced by the component (an
/// MCP client resolves no reference into a document it has not seen). `depth` counts the
/// references followed, against a cycle.
fn inline(schema: &Value, doc: &Value, depth: usize) -> Value {
    if depth > 8 {
        return json!({});
    }
    match schema {
        Value::Object(o) => {
            if let Some(name) = o
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
            {
                return inline(&doc["components"]["schemas"][name], doc, depth + 1);
            }
            // A nullable reference: `allOf: [{$ref}, {description}]`.
            let mut out = Map::new();
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("allOf", Value::Array(parts)) if parts.len() <= 2 => {
                        for part in parts {
                            if let Value::Object(m) = inline(part, doc, depth) {
                                out.extend(m);
                            }
                        }
                    }
                    _ => {
                        out.insert(k.clone(), inline(v, doc, depth));
                    }
                }
            }
            out.remove("nullable");
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| inline(v, doc, depth)).collect()),
        other => other.clone(),
    }
}

/// A JSON pointer's token for `text` (`/` and `~` escaped).
fn pointer_token(text: &str) -> String {
    text.replace('~', "~0").replace('/', "~1")
}

/// A verb's input schema: one property per argument, the verb's required ones required
/// (`agentName` never: the session supplies one).
fn input_schema(verb: &Verb) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for p in verb.params {
        let name = argument(p);
        if let Some((object, field)) = p.field.split_once('.') {
            let entry = props.entry(object).or_insert_with(
                || json!({"type": "object", "properties": {}, "additionalProperties": false}),
            );
            entry["properties"][field] = property(p);
            continue;
        }
        props.insert(name.clone(), property(p));
        if (p.required || p.positional) && !is_agent(p) && !required.contains(&name) {
            required.push(name);
        }
    }
    json!({"type": "object", "properties": props, "required": required})
}

/// The schema of one argument, from its kind.
fn property(p: &Param) -> Value {
    let help = p
        .help
        .replace(" (TEXT or @FILE)", "")
        .replace(", <n>[smhd] (1s-1h)", " in seconds (1-3600)");
    let mut schema = match (p.kind, p.field) {
        (Kind::Int | Kind::Seconds, _) => json!({"type": "integer"}),
        (Kind::Float, _) => json!({"type": "number"}),
        (Kind::Flag | Kind::FlagFalse, _) => json!({"type": "boolean"}),
        (Kind::Json, "tasks") => json!({"type": "array", "items": {"type": "object"}}),
        (Kind::Json, _) => json!({"type": "object"}),
        (Kind::List, _) => json!({"type": "array", "items": {"type": "string"}}),
        (Kind::Vars, _) => {
            json!({"type": "object", "additionalProperties": {"type": "string"}})
        }
        (Kind::Time | Kind::Ago, _) => json!({"type": "string", "format": "date-time"}),
        _ => json!({"type": "string"}),
    };
    let description = match (p.kind, p.field) {
        (Kind::FlagFalse, "canRetry") => "false: fail for good, without a retry".to_string(),
        (Kind::Ago, _) => "Only tasks that ended before this instant (RFC 3339)".to_string(),
        (_, "script.type") => "bash or python".to_string(),
        _ if is_agent(p) => {
            "Your agent name; left out, this MCP session's own name is used".to_string()
        }
        _ => help,
    };
    schema["description"] = Value::from(description);
    schema
}

/// A successful answer as a tool result: the data (a list inside `items`, with its
/// pagination) and a sentence for the model.
fn success(verb: &Verb, data: Value, pagination: &Value) -> CallToolResult {
    let (structured, text) = match (verb.tool, data) {
        ("get_next_task", data) => {
            let text = next_task_text(&data);
            (data, text)
        }
        (_, Value::Array(items)) => {
            let n = items.len();
            let mut s = json!({"items": items});
            if !pagination.is_null() {
                s["pagination"] = pagination.clone();
            }
            let text = format!("{n} item(s).\n{s}");
            (s, text)
        }
        (_, data @ Value::Object(_)) => {
            let text = data.to_string();
            (data, text)
        }
        (_, other) => (json!({"result": other}), "Done.".to_string()),
    };
    let mut result = CallToolResult::structured(structured);
    result.content = vec![rmcp::model::ContentBlock::text(text)];
    result
}

/// What a model should read from next-task's answer: the task and how to report it, or that
/// the queue is empty.
fn next_task_text(data: &Value) -> String {
    let task = &data["task"];
    if task.is_null() {
        return "No task is available now (task: null). Call get_next_task again later, or \
                with waitSeconds (up to 60) to wait for one."
            .to_string();
    }
    let agent = data["agentName"].as_str().unwrap_or_default();
    format!(
        "Task {id} is leased to agent {agent} until {until}. Pass agentName \"{agent}\", \
         taskId and leaseToken \"{token}\" back to complete_task, fail_task, extend_lease and \
         report_progress.\n\nInstructions:\n{instructions}\n\nThe whole task:\n{task}",
        id = task["id"].as_str().unwrap_or_default(),
        until = task["leaseExpiresAt"].as_str().unwrap_or_default(),
        token = task["leaseToken"].as_str().unwrap_or_default(),
        instructions = task["instructions"].as_str().unwrap_or_default(),
    )
}

/// A refusal (the server's, or an argument the tool could not send) as a tool error.
fn refusal(e: &ClientError) -> CallToolResult {
    let body = match e {
        ClientError::Server {
            status,
            code,
            message,
            details,
        } => json!({"code": code, "status": status, "error": message,
                    "validationDetails": details}),
        other => json!({"code": "UNAVAILABLE", "error": other.to_string()}),
    };
    let mut text = format!(
        "{}: {}",
        body["code"].as_str().unwrap_or_default(),
        body["error"].as_str().unwrap_or_default()
    );
    for d in body["validationDetails"].as_array().into_iter().flatten() {
        text.push_str(&format!("\n- {}", d.as_str().unwrap_or_default()));
    }
    let mut result = CallToolResult::structured_error(body);
    result.content = vec![rmcp::model::ContentBlock::text(text)];
    result
}

fn invalid(field: &str, message: &str) -> ClientError {
    ClientError::Server {
        status: 400,
        code: "VALIDATION_ERROR".into(),
        message: "the arguments do not fit the tool's input schema".into(),
        details: vec![format!("{field}: {message}")],
    }
}

/// The prompts: the common loops, as a first message to the model.
fn prompts() -> Vec<Prompt> {
    let project = || {
        PromptArgument::new("projectId")
            .with_description("The project's name or id")
            .with_required(true)
    };
    vec![
        Prompt::new(
            "work_queue",
            Some("Work through a project's queue: take a task, do it, report it, repeat."),
            Some(vec![project()]),
        ),
        Prompt::new(
            "plan_tasks",
            Some("Break a job into tasks and queue them in a project."),
            Some(vec![
                project(),
                PromptArgument::new("goal")
                    .with_description("The job to break down")
                    .with_required(true),
            ]),
        ),
        Prompt::new(
            "project_report",
            Some("Report on a project's progress: counts, agents, failures."),
            Some(vec![project()]),
        ),
    ]
}

fn prompt_text(name: &str, args: &Map<String, Value>) -> Option<String> {
    let arg = |k: &str| args.get(k).and_then(text_of).unwrap_or_default();
    let project = arg("projectId");
    Some(match name {
        "work_queue" => format!(
            "Work through the tasks of the agentq project \"{project}\".\n\
             1. Call get_project and read its instructions; follow them in every task.\n\
             2. Call get_next_task with projectId \"{project}\" (waitSeconds 30 to wait for \
             work). If task is null, the queue is empty: stop and say so.\n\
             3. Do what the task's instructions ask. On long work call extend_lease before \
             leaseExpiresAt, and report_progress as you go.\n\
             4. Call complete_task with the result (and outputs, a JSON object, when the task \
             asks for structured output), or fail_task with the error if you cannot do it. \
             Always pass the taskId and leaseToken from get_next_task.\n\
             5. Go back to step 2."
        ),
        "plan_tasks" => format!(
            "Break this job into independent tasks for agents, and queue them in the agentq \
             project \"{project}\":\n\n{goal}\n\n\
             Call get_project first and read its instructions, and list_task_types to reuse a \
             task type whose template fits. Each task must be doable on its own by an agent \
             that reads only its instructions. Queue them with create_tasks_bulk (up to 1,000 \
             a call; set priority 0-10 where order matters) and report how many were created \
             and any errors.",
            goal = arg("goal")
        ),
        "project_report" => format!(
            "Report on the agentq project \"{project}\": call get_project_stats for counts by \
             status, queue depth and the last hour, list_active_agents for who is working on \
             what, and list_tasks with status \"failed\" for what went wrong (read a failed \
             task's attempts with list_attempts). Summarise in a few lines: progress, \
             throughput, problems and what to do about them."
        ),
        _ => return None,
    })
}

impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .build(),
        )
        .with_server_info(Implementation::new("agentq", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "agentq is a task queue. Projects hold tasks; an agent takes one with \
             get_next_task (it is leased to the agent until its lease expires), does it, and \
             reports it with complete_task or fail_task, passing back the leaseToken. Read a \
             project's instructions (get_project) before working on its tasks.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.catalog.to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        // Over HTTP, each call acts with the credential of the request that carried it.
        let client = context
            .extensions
            .get::<poem::http::request::Parts>()
            .and_then(|parts| crate::auth::credential(&parts.headers))
            .map(|key| self.client.with_key(key));
        let client = client.as_ref().unwrap_or(&self.client);
        match self.call(client, &request.name, &args).await {
            Some(result) => Ok(result.into()),
            None => Err(ErrorData::invalid_params(
                format!("no tool named {}", request.name),
                None,
            )),
        }
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(prompts()))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let Some(text) = prompt_text(&request.name, &args) else {
            return Err(ErrorData::invalid_params(
                format!("no prompt named {}", request.name),
                None,
            ));
        };
        Ok(GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)]).into())
    }
}

/// `agentq mcp`: serves the tools on stdin and stdout until the client closes them. Nothing
/// but JSON-RPC goes to stdout; errors go to stderr.
pub async fn run_stdio(client: Client) -> ExitCode {
    // The server's own document gives the tools the REST API's field rules; without it (an
    // older server, say) they keep the table's plain types.
    let doc = client
        .call(Method::Get, "/api/openapi.json", None)
        .await
        .ok();
    let tools = Tools::new(client, catalog(doc.as_ref()));
    let service = match tools.serve(rmcp::transport::stdio()).await {
        Ok(s) => s,
        Err(e) => {
            crate::logs::say(format!("agentq mcp: {e}\n"));
            return ExitCode::FAILURE;
        }
    };
    match service.waiting().await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            crate::logs::say(format!("agentq mcp: {e}\n"));
            ExitCode::FAILURE
        }
    }
}

//! The OpenAPI document as served: poem-openapi's document of the operations, completed with
//! what the derive cannot say.
//!
//! 1. Optional fields of responses are `null` when absent, so every non-required property is
//!    marked `nullable`.
//! 2. The field rules that `validate` enforces (lengths, patterns, ranges, enumerations) are
//!    written into the schemas from the same constants, so a client (or a fuzzer) reading the
//!    document knows exactly what is accepted. `validate` stays the one place that enforces
//!    them, with field-by-field messages.
//! 3. Links between operations: how a next-task answer feeds the calls only the holder may
//!    make, and how a created project or task feeds the next step (see `links`).
//! 4. Each operation lists only the error statuses it can answer (see `trim_errors`): the
//!    error side of every operation is one type, which declares every status any may answer.
//! 5. The route table for the `Allow` header of 405 answers.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use serde_json::{json, Map, Value};

use super::validate::*;

const NAME_PATTERN: &str = "^[A-Za-z0-9_-]+$";
const VARIABLE_PATTERN: &str = "^[A-Za-z][A-Za-z0-9_]*$";
const TOKEN_PATTERN: &str = "^[0-9a-f]{32}$";
const STATUS_LIST_PATTERN: &str =
    "^(queued|running|completed|failed|cancelled)(,(queued|running|completed|failed|cancelled))*$";
/// RFC 3339 date-time, as `time` parses it.
const DATE_TIME_PATTERN: &str =
    "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

fn name(max: usize) -> Value {
    json!({"minLength": 1, "maxLength": max, "pattern": NAME_PATTERN})
}

fn text(max: usize) -> Value {
    json!({"maxLength": max})
}

fn int(range: &RangeInclusive<i64>) -> Value {
    json!({"minimum": range.start(), "maximum": range.end()})
}

fn num(range: &RangeInclusive<f64>) -> Value {
    json!({"minimum": range.start(), "maximum": range.end()})
}

fn one_of(values: &[&str]) -> Value {
    json!({"enum": values})
}

fn date_time() -> Value {
    json!({"pattern": DATE_TIME_PATTERN})
}

/// A field rule of a request body: (schema, property, constraints).
type BodyRule = (&'static str, &'static str, Value);

/// The field rules of every request body, as `validate` enforces them.
fn body_rules() -> Vec<BodyRule> {
    let mut rules = project_rules();
    rules.extend(type_rules());
    rules.extend(task_rules());
    rules.extend(lease_rules());
    rules.extend(key_rules());
    rules.extend(script_rules());
    rules
}

fn script_rules() -> Vec<BodyRule> {
    vec![
        (
            "ScriptIn",
            "content",
            json!({"minLength": 1, "maxLength": MAX_SCRIPT_BYTES}),
        ),
        ("ScriptIn", "timeoutSeconds", int(&SCRIPT_TIMEOUT_SECONDS)),
        ("ExecutionIn", "exitCode", int(&EXIT_CODE)),
        ("ExecutionIn", "stdoutTail", text(MAX_TAIL_BYTES)),
        ("ExecutionIn", "stderrTail", text(MAX_TAIL_BYTES)),
        ("ExecutionIn", "durationMs", int(&DURATION_MS)),
    ]
}

fn project_rules() -> Vec<BodyRule> {
    vec![
        ("CreateProject", "name", name(MAX_NAME)),
        ("CreateProject", "description", text(MAX_DESCRIPTION)),
        ("CreateProject", "instructions", text(MAX_INSTRUCTIONS)),
        ("UpdateProject", "name", name(MAX_NAME)),
        ("UpdateProject", "description", text(MAX_DESCRIPTION)),
        ("UpdateProject", "instructions", text(MAX_INSTRUCTIONS)),
        ("UpdateProject", "status", one_of(&["active", "closed"])),
        ("ConfigIn", "defaultMaxRetries", int(&MAX_RETRIES)),
        ("RetentionIn", "completedSeconds", int(&RETENTION_SECONDS)),
        ("RetentionIn", "failedSeconds", int(&RETENTION_SECONDS)),
        ("RetentionIn", "cancelledSeconds", int(&RETENTION_SECONDS)),
        (
            "ConfigIn",
            "defaultLeaseDurationMinutes",
            int(&PROJECT_LEASE_MINUTES),
        ),
        (
            "ConfigIn",
            "reaperIntervalMinutes",
            int(&REAPER_INTERVAL_MINUTES),
        ),
    ]
}

fn type_rules() -> Vec<BodyRule> {
    let type_vars = json!({
        "maxItems": MAX_TYPE_VARIABLES,
        "items": {"type": "string", "maxLength": MAX_NAME, "pattern": VARIABLE_PATTERN}
    });
    let duplicate = one_of(&["allow", "ignore", "fail"]);
    let mut rules = Vec::new();
    for schema in ["CreateTaskType", "UpdateTaskType"] {
        rules.extend([
            (schema, "name", name(MAX_NAME)),
            (schema, "template", text(MAX_TEMPLATE)),
            (schema, "variables", type_vars.clone()),
            (schema, "duplicateHandling", duplicate.clone()),
            (schema, "maxRetries", int(&MAX_RETRIES)),
            (schema, "leaseDurationMinutes", num(&LEASE_MINUTES)),
            (schema, "retryDelaySeconds", num(&RETRY_DELAY_SECONDS)),
            (schema, "backoffMultiplier", num(&BACKOFF_MULTIPLIER)),
        ]);
    }
    rules
}

fn task_rules() -> Vec<BodyRule> {
    let bulk_ids = json!({"minItems": 1, "maxItems": MAX_BULK});
    let task_vars = json!({
        "maxProperties": MAX_TASK_VARIABLES,
        "additionalProperties": {"type": "string", "maxLength": MAX_VARIABLE_VALUE}
    });
    vec![
        ("CreateTask", "id", name(MAX_NAME)),
        ("CreateTask", "typeId", name(MAX_NAME)),
        ("CreateTask", "instructions", text(MAX_INSTRUCTIONS)),
        ("CreateTask", "variables", task_vars.clone()),
        ("CreateTask", "batchId", text(MAX_BATCH_ID)),
        ("CreateTask", "priority", int(&PRIORITY)),
        ("CreateTask", "notBefore", date_time()),
        ("BulkCreate", "tasks", json!({"maxItems": MAX_BULK})),
        ("BulkCreate", "batchId", text(MAX_BATCH_ID)),
        ("UpdateTask", "instructions", text(MAX_INSTRUCTIONS)),
        ("UpdateTask", "variables", task_vars),
        ("UpdateTask", "priority", int(&PRIORITY)),
        ("UpdateTask", "notBefore", date_time()),
        ("UpdateTask", "batchId", text(MAX_BATCH_ID)),
        ("CancelIn", "reason", text(MAX_REASON)),
        ("BulkCancelIn", "ids", bulk_ids.clone()),
        ("BulkCancelIn", "reason", text(MAX_REASON)),
        ("BulkRetryIn", "ids", bulk_ids),
        (
            "TaskFilterIn",
            "status",
            json!({"pattern": STATUS_LIST_PATTERN}),
        ),
        ("TaskFilterIn", "typeId", name(MAX_NAME)),
    ]
}

fn lease_rules() -> Vec<BodyRule> {
    let agent = name(MAX_AGENT_NAME);
    let token = json!({"pattern": TOKEN_PATTERN});
    vec![
        (
            "NextTaskIn",
            "typeIds",
            json!({"items": name(MAX_NAME), "minItems": 1, "maxItems": MAX_TYPE_IDS}),
        ),
        ("NextTaskIn", "waitSeconds", num(&WAIT_SECONDS)),
        ("CompleteIn", "agentName", agent.clone()),
        ("CompleteIn", "result", text(MAX_RESULT)),
        ("CompleteIn", "outputs", json!({"type": "object"})),
        ("CompleteIn", "leaseToken", token.clone()),
        ("CompleteFirst", "result", text(MAX_RESULT)),
        ("CompleteFirst", "outputs", json!({"type": "object"})),
        ("CompleteFirst", "leaseToken", token.clone()),
        ("FailIn", "agentName", agent.clone()),
        ("FailIn", "error", text(MAX_ERROR)),
        ("FailIn", "leaseToken", token.clone()),
        ("ExtendIn", "agentName", agent.clone()),
        ("ExtendIn", "extensionMinutes", num(&EXTENSION_MINUTES)),
        ("ExtendIn", "leaseToken", token.clone()),
        ("ProgressIn", "agentName", agent),
        ("ProgressIn", "current", json!({"minimum": 0})),
        ("ProgressIn", "total", json!({"minimum": 0})),
        ("ProgressIn", "message", text(MAX_PROGRESS_MESSAGE)),
        ("ProgressIn", "leaseToken", token),
    ]
}

fn key_rules() -> Vec<BodyRule> {
    vec![
        ("CreateKeyIn", "name", name(MAX_NAME)),
        (
            "CreateKeyIn",
            "role",
            one_of(&["admin", "producer", "agent", "viewer"]),
        ),
        ("CreateKeyIn", "projects", json!({"minItems": 1})),
        ("LoginIn", "agentName", name(MAX_AGENT_NAME)),
        ("ExtendSessionIn", "extendBy", int(&SESSION_EXTEND_SECONDS)),
    ]
}

/// Request bodies: they refuse unknown fields (`deny_unknown_fields`).
const REQUEST_SCHEMAS: &[&str] = &[
    "RetentionIn",
    "CreateProject",
    "UpdateProject",
    "ConfigIn",
    "CreateTaskType",
    "UpdateTaskType",
    "CreateTask",
    "BulkCreate",
    "UpdateTask",
    "NextTaskIn",
    "CompleteIn",
    "CompleteFirst",
    "FailIn",
    "ExtendIn",
    "ProgressIn",
    "CancelIn",
    "CreateKeyIn",
    "LoginIn",
    "ExtendSessionIn",
    "ScriptIn",
    "ExecutionIn",
    "BulkCancelIn",
    "BulkRetryIn",
    "TaskFilterIn",
];

/// Operations whose body may be left out (it is read as `{}`).
const OPTIONAL_BODIES: &[&str] = &["/api/tasks/{taskId}/cancel", "/api/auth/login"];

/// OpenAPI links: how an answer feeds the next call, as (path, method, status, links). They
/// document the protocol's hand-offs (a leased task's id, holder and token go to the calls
/// only the holder may make), and a stateful fuzzer follows them to reach those calls with
/// values that work. Links by path id alone (read a created task, say) are left to inference.
fn links() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    let holder = |op: &str, description: &str| {
        json!({
            "operationId": op,
            "description": description,
            "parameters": {"taskId": "$response.body#/data/task/id"},
            "requestBody": {
                "agentName": "$request.path.agentName",
                "leaseToken": "$response.body#/data/task/leaseToken"
            }
        })
    };
    vec![
        (
            "/api/agents/{agentName}/next-task",
            "post",
            "200",
            json!({
                "CompleteLeasedTask": holder("completeTask", "Report the leased task done."),
                "FailLeasedTask": holder("failTask", "Report the leased task failed."),
                "ExtendLease": holder("extendLease", "Extend the lease (a heartbeat)."),
                "ReportProgress": holder("reportProgress", "Report progress on the leased task."),
            }),
        ),
        (
            "/api/projects",
            "post",
            "201",
            json!({
                "CreateTask": {
                    "operationId": "createTask",
                    "description": "Queue a task in the new project.",
                    "parameters": {"projectId": "$response.body#/data/id"}
                },
            }),
        ),
        (
            "/api/projects/{projectId}/tasks",
            "post",
            "201",
            json!({
                "NextTask": {
                    "operationId": "nextTask",
                    "description": "Ask for a task of this task's project, as an agent.",
                    "requestBody": {"projectId": "$response.body#/data/projectId"}
                },
            }),
        ),
    ]
}

/// Operations whose body can name a task type's missing variables (422).
const UNPROCESSABLE: &[&str] = &["createTask", "updateTask"];

/// Operations that name nothing that could be missing (no path id, no body).
const NOTHING_TO_FIND: &[&str] = &["listProjects", "listKeys"];

/// Drops the error statuses an operation cannot answer from its responses (`method`
/// uppercase). 415 comes from the JSON body extractor; 400
/// needs a parameter or a body to refuse; 422 comes from the template check of a task's
/// variables; 409 from a write; 404 from an id or name that is not there. The rest (401,
/// 403, 413, 429, 503) stays: the request frame checks the body size, the credentials and the
/// rate before routing.
fn trim_errors(method: &str, op: &mut Value) {
    let id = op.get("operationId").and_then(Value::as_str).unwrap_or("");
    let body = op.get("requestBody").is_some();
    let params = op
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    let drop = [
        ("415", !body),
        ("400", !body && !params),
        ("422", !UNPROCESSABLE.contains(&id)),
        ("409", method == "GET"),
        ("404", NOTHING_TO_FIND.contains(&id)),
    ];
    if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
        for (status, gone) in drop {
            if gone {
                responses.remove(status);
            }
        }
    }
}

/// (parameter name, constraints) for path and query parameters, wherever they appear.
fn param_rules() -> Vec<(&'static str, Value)> {
    vec![
        ("agentName", name(MAX_AGENT_NAME)),
        ("limit", int(&LIMIT)),
        ("offset", json!({"minimum": 0})),
        ("typeId", name(MAX_NAME)),
        ("createdAfter", date_time()),
        ("createdBefore", date_time()),
        ("updatedAfter", date_time()),
        ("endedBefore", date_time()),
        ("updatedBefore", date_time()),
        ("priority", int(&PRIORITY)),
        (
            "cursor",
            json!({"pattern": "^(k-?[0-9]{1,19}\\.[0-9]{1,20}|o[0-9]{1,18})$"}),
        ),
    ]
}

fn merge(target: &mut Value, extra: &Value) {
    // In OpenAPI 3.0 a nullable enumeration must list null itself.
    let nullable = target.get("nullable") == Some(&Value::Bool(true));
    if let (Some(t), Some(e)) = (target.as_object_mut(), extra.as_object()) {
        if let (true, Some(Value::Array(values))) = (nullable, e.get("enum")) {
            let mut values = values.clone();
            values.push(Value::Null);
            t.insert("enum".into(), Value::Array(values));
            let rest: Map<String, Value> = e
                .iter()
                .filter(|(k, _)| *k != "enum")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            return merge(target, &Value::Object(rest));
        }
        for (k, v) in e {
            match (t.get_mut(k), v) {
                (Some(existing @ Value::Object(_)), Value::Object(_)) => merge(existing, v),
                _ => {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// Marks every optional property nullable (wrapping `$ref`s in `allOf`).
fn nullable_optionals(schema: &mut Map<String, Value>) {
    let required: Vec<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, prop) in props.iter_mut() {
        if required.contains(name) {
            continue;
        }
        if let Some(r) = prop.get("$ref").cloned() {
            *prop = json!({"allOf": [{"$ref": r}], "nullable": true});
        } else if let Some(o) = prop.as_object_mut() {
            o.insert("nullable".into(), Value::Bool(true));
        }
    }
}

/// The schema of an operation's JSON request body, if it takes one.
fn json_body_schema(op: &Value) -> Option<&Value> {
    let content = op.pointer("/requestBody/content")?.as_object()?;
    content
        .iter()
        .find(|(t, _)| t.starts_with("application/json"))
        .and_then(|(_, m)| m.get("schema"))
}

/// The served document and the route table.
pub struct Spec {
    pub json: String,
    /// (path segments, methods, the path template as a metrics label).
    routes: Vec<(Vec<String>, Vec<String>, &'static str)>,
    /// Indices into `routes` by segment count, then by last segment (see [`Shape`]).
    shapes: Vec<Shape>,
    /// The JSON request body schema of each operation, by (method, path template); keyed by
    /// `'static` strings, so that the request path looks it up without allocating.
    bodies: HashMap<(&'static str, &'static str), Value>,
    /// The schema of each path and query parameter, by (method, path template, name).
    params: HashMap<(String, &'static str, String), Value>,
    /// The document's component schemas, which `bodies` refer to.
    schemas: Map<String, Value>,
    /// The patches that found nothing to patch (see [`Spec::build`]); empty for the served
    /// document, which `api::app` checks.
    pub unmatched: Vec<String>,
}

/// The routes of one segment count that a path may match, by the path's last segment: the
/// routes ending in that fixed segment or in a parameter (`by_last`), or, for any other last
/// segment, those ending in a parameter (`param_last`). Each list is in `routes` order.
#[derive(Default)]
struct Shape {
    by_last: HashMap<String, Vec<usize>>,
    param_last: Vec<usize>,
}

/// Completes the component schemas: nullable optionals, closed request bodies, the bulk item,
/// the field rules of `validate`, and what a task needs.
fn complete_schemas(schemas: &mut Map<String, Value>, unmatched: &mut Vec<String>) {
    for s in schemas.values_mut().filter_map(Value::as_object_mut) {
        nullable_optionals(s);
    }
    for name in REQUEST_SCHEMAS {
        match schemas.get_mut(*name).and_then(Value::as_object_mut) {
            Some(s) => {
                s.insert("additionalProperties".into(), Value::Bool(false));
            }
            None => unmatched.push(format!("schema {name}")),
        }
    }
    // Bulk items with a broken field rule are reported in `errors`, not refused: the items
    // are documented with their types but without the rules.
    if let Some(mut item) = schemas.get("CreateTask").cloned() {
        if let Some(o) = item.as_object_mut() {
            o.insert(
                "description".into(),
                "A task of a bulk request. Field rules are those of CreateTask; an item that breaks one is reported in `errors` by index.".into(),
            );
        }
        // Its script too: a copy of ScriptIn, taken before the rules are merged in.
        let item = serde_json::to_string(&item).unwrap_or_default().replace(
            "#/components/schemas/ScriptIn",
            "#/components/schemas/BulkScript",
        );
        schemas.insert(
            "BulkTask".into(),
            serde_json::from_str(&item).unwrap_or(Value::Null),
        );
        match schemas.get("ScriptIn").cloned() {
            Some(script) => {
                schemas.insert("BulkScript".into(), script);
            }
            None => unmatched.push("schema ScriptIn".into()),
        }
        match schemas
            .get_mut("BulkCreate")
            .and_then(|b| b.pointer_mut("/properties/tasks/items"))
        {
            Some(items) => *items = json!({"$ref": "#/components/schemas/BulkTask"}),
            None => unmatched.push("BulkCreate.tasks".into()),
        }
    }
    for (schema, prop, rule) in body_rules() {
        match schemas
            .get_mut(schema)
            .and_then(|s| s.pointer_mut(&format!("/properties/{prop}")))
        {
            Some(p) => merge(p, &rule),
            None => unmatched.push(format!("{schema}.{prop}")),
        }
    }
    // A bulk cancel or retry names its tasks, or filters them, or both.
    for name in ["BulkCancelIn", "BulkRetryIn"] {
        if let Some(o) = schemas.get_mut(name).and_then(Value::as_object_mut) {
            o.insert(
                "anyOf".into(),
                json!([
                    {"required": ["ids"], "properties": {"ids": {"type": "array"}}},
                    {"required": ["filter"], "properties": {"filter": {"type": "object"}}}
                ]),
            );
        }
    }
    // A login names an agent and a project (an agent's session), or neither (key-scoped);
    // a null is refused (400), so the document says strings.
    if let Some(o) = schemas.get_mut("LoginIn").and_then(Value::as_object_mut) {
        for field in ["agentName", "projectId"] {
            if let Some(p) = o
                .get_mut("properties")
                .and_then(|p| p.get_mut(field))
                .and_then(Value::as_object_mut)
            {
                p.remove("nullable");
            }
        }
        o.insert(
            "anyOf".into(),
            json!([{"required": ["agentName", "projectId"]}, {"maxProperties": 0}]),
        );
    }
    // A task needs instructions unless its type has a template or it has a script.
    if let Some(o) = schemas.get_mut("CreateTask").and_then(Value::as_object_mut) {
        o.insert(
            "anyOf".into(),
            json!([
                {"required": ["instructions"], "properties": {"instructions": {"type": "string"}}},
                {"required": ["typeId"], "properties": {"typeId": {"type": "string"}}},
                {"required": ["script"], "properties": {"script": {"type": "object"}}}
            ]),
        );
    }
}

/// What [`complete_paths`] finds in the paths.
struct Paths {
    routes: Vec<(Vec<String>, Vec<String>, &'static str)>,
    bodies: HashMap<(&'static str, &'static str), Value>,
    params: HashMap<(String, &'static str, String), Value>,
}

/// Completes each operation (optional bodies, parameter rules, its own error statuses) and
/// collects the route table, the body schemas and the parameter schemas.
fn complete_paths(doc: &mut Value, unmatched: &mut Vec<String>) -> Paths {
    let rules = param_rules();
    let mut used = vec![false; rules.len()];
    let mut found = Paths {
        routes: Vec::new(),
        bodies: HashMap::new(),
        params: HashMap::new(),
    };
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        unmatched.push("paths".into());
        return found;
    };
    for optional in OPTIONAL_BODIES {
        let body = paths
            .get_mut(*optional)
            .and_then(|item| item.pointer_mut("/post/requestBody"))
            .and_then(Value::as_object_mut);
        match body {
            Some(body) => {
                body.insert("required".into(), Value::Bool(false));
            }
            None => unmatched.push(format!("POST {optional} body")),
        }
    }
    for (path, item) in paths.iter_mut() {
        let segs: Vec<String> = path.split('/').map(String::from).collect();
        // A fixed set, made once per process start: leaking gives `'static` labels.
        let label: &'static str = Box::leak(path.clone().into_boxed_str());
        let mut methods = Vec::new();
        for (method, op) in item.as_object_mut().into_iter().flatten() {
            let method = method.to_uppercase();
            if let (Some(m), Some(schema)) = (static_method(&method), json_body_schema(op)) {
                found.bodies.insert((m, label), schema.clone());
            }
            let params = op.get_mut("parameters").and_then(Value::as_array_mut);
            for p in params.into_iter().flatten() {
                let Some(n) = p.get("name").and_then(Value::as_str).map(String::from) else {
                    continue;
                };
                if n == "status" && path.ends_with("/tasks") {
                    merge(p, &json!({"schema": {"pattern": STATUS_LIST_PATTERN}}));
                }
                if let Some(i) = rules.iter().position(|(r, _)| *r == n) {
                    merge(p, &json!({"schema": rules[i].1}));
                    used[i] = true;
                }
                if let Some(schema) = p.get("schema") {
                    found
                        .params
                        .insert((method.clone(), label, n), schema.clone());
                }
            }
            trim_errors(&method, op);
            methods.push(method);
        }
        found.routes.push((segs, methods, label));
    }
    for ((name, _), used) in rules.iter().zip(used) {
        if !used {
            unmatched.push(format!("parameter {name}"));
        }
    }
    found
}

/// Adds the links between operations (see [`links`]) to their responses.
fn add_links(doc: &mut Value, unmatched: &mut Vec<String>) {
    for (path, method, status, l) in links() {
        let pointer = format!(
            "/paths/{}/{method}/responses/{status}",
            path.replace('~', "~0").replace('/', "~1")
        );
        match doc.pointer_mut(&pointer).and_then(Value::as_object_mut) {
            Some(response) => {
                response.insert("links".into(), l);
            }
            None => unmatched.push(format!("{method} {path} {status}")),
        }
    }
}

/// The routes by segment count and last segment, for [`Spec::find`].
fn index_routes(routes: &[(Vec<String>, Vec<String>, &'static str)]) -> Vec<Shape> {
    let mut shapes: Vec<Shape> = Vec::new();
    for (i, (segs, _, _)) in routes.iter().enumerate() {
        if shapes.len() <= segs.len() {
            shapes.resize_with(segs.len() + 1, Shape::default);
        }
        let shape = &mut shapes[segs.len()];
        match segs.last() {
            Some(last) if !last.starts_with('{') => {
                // Later parameter routes join this list below; earlier ones now.
                let list = shape.by_last.entry(last.clone()).or_default();
                if list.is_empty() {
                    list.extend(&shape.param_last);
                }
                list.push(i);
            }
            _ => {
                shape.param_last.push(i);
                shape.by_last.values_mut().for_each(|list| list.push(i));
            }
        }
    }
    shapes
}

impl Spec {
    /// Completes poem-openapi's document (`generated`) and indexes it. Every patch that names
    /// a schema, property, parameter or path the document lacks is listed in `unmatched`:
    /// a renamed field must not silently lose its rule.
    pub fn build(generated: &str) -> Spec {
        let mut doc: Value = serde_json::from_str(generated).expect("poem-openapi emits JSON");
        let mut unmatched = Vec::new();
        if let Some(schemas) = doc
            .pointer_mut("/components/schemas")
            .and_then(Value::as_object_mut)
        {
            complete_schemas(schemas, &mut unmatched);
        }
        let paths = complete_paths(&mut doc, &mut unmatched);
        add_links(&mut doc, &mut unmatched);
        let shapes = index_routes(&paths.routes);
        let schemas = doc
            .pointer("/components/schemas")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        Spec {
            json: serde_json::to_string_pretty(&doc).expect("a JSON value serializes"),
            routes: paths.routes,
            shapes,
            bodies: paths.bodies,
            params: paths.params,
            schemas,
            unmatched,
        }
    }

    /// The JSON body schema of an operation, if it takes one.
    pub fn body_schema(&self, method: &str, template: &'static str) -> Option<&Value> {
        self.bodies.get(&(static_method(method)?, template))
    }

    /// Whether the operation at `template` for `method` takes a request body.
    pub fn takes_body(&self, method: &str, template: &'static str) -> bool {
        self.body_schema(method, template).is_some()
    }

    /// The schema of a path or query parameter of an operation.
    pub fn param_schema(&self, method: &str, template: &'static str, name: &str) -> Option<&Value> {
        self.params
            .get(&(method.to_string(), template, name.to_string()))
    }

    /// `schema` with a `$ref` (or a nullable `allOf` of one) followed to its component.
    pub fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        let reference = schema
            .get("$ref")
            .or_else(|| schema.pointer("/allOf/0/$ref"))
            .and_then(Value::as_str);
        match reference.and_then(|r| r.strip_prefix("#/components/schemas/")) {
            Some(name) => self.schemas.get(name).unwrap_or(schema),
            None => schema,
        }
    }

    fn find(&self, path: &str) -> Option<&(Vec<String>, Vec<String>, &'static str)> {
        // Called for every request (the metrics label): no allocation, and only the routes
        // with the path's segment count and last segment are compared, in table order.
        let shape = self.shapes.get(path.split('/').count())?;
        let last = path.rsplit('/').next().unwrap_or("");
        let candidates = shape.by_last.get(last).unwrap_or(&shape.param_last);
        candidates
            .iter()
            .map(|&i| &self.routes[i])
            .find(|(pattern, _, _)| {
                pattern
                    .iter()
                    .zip(path.split('/'))
                    .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
            })
    }

    /// The methods a path supports (for `Allow`), or None for an unknown path.
    pub fn allowed(&self, path: &str) -> Option<String> {
        self.find(path).map(|(_, m, _)| m.join(", "))
    }

    /// The route template of a path (for metrics labels, never the raw path), and whether
    /// `method` names one of its operations (HEAD counts as GET), in one look-up per request.
    /// Requests without a credential that name no operation are answered 404 or 405 without
    /// authentication: the route table is public (the document lists it), so a typo in a path
    /// should say so rather than ask for a key. The paths outside the document are public and
    /// answer false.
    pub fn route(&self, method: &str, path: &str) -> (&'static str, bool) {
        match path {
            "/metrics" => ("/metrics", false),
            "/metrics/json" => ("/metrics/json", false),
            "/api/openapi.json" => ("/api/openapi.json", false),
            // MCP's streamable HTTP transport: every request is authenticated.
            "/mcp" => ("/mcp", matches!(method, "GET" | "POST" | "DELETE")),
            p if p == "/api/docs" || p.starts_with("/api/docs/") => ("/api/docs", false),
            p if super::ui::is_ui_path(p) => ("/ui", false),
            p => match self.find(p) {
                Some((_, methods, template)) => {
                    let method = if method == "HEAD" { "GET" } else { method };
                    (template, methods.iter().any(|m| m == method))
                }
                None => ("unmatched", false),
            },
        }
    }
}

/// The methods an operation may have, as `'static` strings.
fn static_method(method: &str) -> Option<&'static str> {
    ["GET", "POST", "PUT", "DELETE", "PATCH"]
        .into_iter()
        .find(|m| *m == method)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule whose schema or property the document lacks (a field renamed in the code) is
    /// reported, not skipped; one that applied is not.
    #[test]
    fn patches_without_a_target_are_listed() {
        let generated = json!({
            "paths": {},
            "components": {"schemas": {
                "CreateProject": {"type": "object", "properties": {"title": {"type": "string"}}}
            }}
        });
        let spec = Spec::build(&generated.to_string());
        for missing in [
            "CreateProject.name",
            "ConfigIn.defaultMaxRetries",
            "parameter limit",
        ] {
            assert!(
                spec.unmatched.iter().any(|u| u == missing),
                "{missing}: {:?}",
                spec.unmatched
            );
        }
        assert!(!spec.unmatched.iter().any(|u| u == "schema CreateProject"));
    }

    #[test]
    fn optionals_become_nullable_and_rules_apply() {
        let generated = json!({
            "paths": {"/api/x/{id}": {"get": {"parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}]}, "post": {}}},
            "components": {"schemas": {
                "CreateProject": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"}, "instructions": {"type": "string"}, "config": {"$ref": "#/components/schemas/ConfigIn"}
                }}
            }}
        });
        let spec = Spec::build(&generated.to_string());
        let doc: Value = serde_json::from_str(&spec.json).unwrap();
        let p = &doc["components"]["schemas"]["CreateProject"]["properties"];
        assert_eq!(p["name"]["maxLength"], 100);
        assert!(p["name"].get("nullable").is_none());
        assert_eq!(p["instructions"]["nullable"], true);
        assert_eq!(
            p["config"]["allOf"][0]["$ref"],
            "#/components/schemas/ConfigIn"
        );
        assert_eq!(p["config"]["nullable"], true);
        let limit = &doc["paths"]["/api/x/{id}"]["get"]["parameters"][0]["schema"];
        assert_eq!(limit["maximum"], 1000);
        assert_eq!(spec.allowed("/api/x/abc").as_deref(), Some("GET, POST"));
        assert_eq!(spec.allowed("/api/y"), None);
        assert!(spec.route("POST", "/api/x/abc").1);
        assert!(spec.route("HEAD", "/api/x/abc").1);
        assert!(!spec.route("DELETE", "/api/x/abc").1);
        assert!(!spec.route("GET", "/api/y").1);
    }

    #[test]
    fn paths_map_to_their_route_template() {
        let generated = json!({"paths": {
            "/api/tasks/{taskId}": {"get": {}},
            "/api/tasks/{taskId}/complete": {"post": {}},
            "/api/tasks/{taskId}/{part}": {"get": {}},
            "/api/tasks/mine/complete": {"post": {}},
            "/health": {"get": {}}
        }});
        let spec = Spec::build(&generated.to_string());
        assert_eq!(spec.route("GET", "/api/tasks/abc").0, "/api/tasks/{taskId}");
        assert_eq!(
            spec.route("GET", "/api/tasks/abc/complete").0,
            "/api/tasks/{taskId}/complete"
        );
        assert_eq!(
            spec.route("GET", "/api/tasks/abc/x").0,
            "/api/tasks/{taskId}/{part}"
        );
        // Among patterns that both match, the first in table (name) order wins.
        assert_eq!(
            spec.route("GET", "/api/tasks/mine/complete").0,
            "/api/tasks/mine/complete"
        );
        assert_eq!(spec.route("GET", "/health").0, "/health");
        assert_eq!(spec.route("GET", "/metrics").0, "/metrics");
        // An empty segment does not fill a parameter; extra or missing segments do not match.
        assert_eq!(spec.route("GET", "/api/tasks/").0, "unmatched");
        assert_eq!(
            spec.route("GET", "/api/tasks/abc/complete/x").0,
            "unmatched"
        );
        assert_eq!(spec.route("GET", "/api/tasks").0, "unmatched");
    }

    #[test]
    fn operations_that_take_a_body_are_known() {
        let body = json!({"content": {"application/json; charset=utf-8": {"schema": {}}}});
        let generated = json!({"paths": {
            "/api/tasks/{taskId}/complete": {"post": {"requestBody": body}},
            "/api/tasks/{taskId}/retry": {"post": {}}
        }});
        let spec = Spec::build(&generated.to_string());
        let (complete, _) = spec.route("POST", "/api/tasks/a/complete");
        let (retry, _) = spec.route("POST", "/api/tasks/a/retry");
        assert!(spec.takes_body("POST", complete));
        assert!(!spec.takes_body("POST", retry));
        assert!(!spec.takes_body("PUT", complete));
        assert!(!spec.takes_body("BREW", complete));
    }
}

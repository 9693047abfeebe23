//! The wire types: request and response bodies as poem-openapi objects (camelCase), and their
//! conversions from the domain rows. The only module whose types derive `Object`.

use std::collections::BTreeMap;

use std::borrow::Cow;

use poem_openapi::registry::MetaSchemaRef;
use poem_openapi::types::{MaybeUndefined, ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{ApiResponse, Enum, Object};
use uuid::Uuid;

use crate::model::{
    Activity, Attempt, Execution, Project, Script, ScriptKind, Stats, Task, TaskType,
};
use crate::time::format;

/// A request string that must be a JSON string: poem-openapi's `String` would also take a
/// number or a boolean and stringify it, which the contract calls a wrong type (400).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Text(pub String);

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        t.0
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(std::iter::once(&self.0))
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<serde_json::Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            serde_json::Value::String(s) => Ok(Text(s)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<serde_json::Value> {
        Some(serde_json::Value::String(self.0.clone()))
    }
}

/// Strict task variables: names to string values.
pub type Vars = BTreeMap<String, Text>;

pub fn vars_plain(v: Vars) -> BTreeMap<String, String> {
    v.into_iter().map(|(k, v)| (k, v.0)).collect()
}

/// A JSON response body serialized straight from the struct with serde (poem-openapi's
/// `Json` builds a `serde_json::Value` tree first). The schema is the type's own, and field
/// names and optional fields are declared identically for both derives.
pub struct SerdeJson<T>(pub T);

impl<T: Type> poem_openapi::payload::Payload for SerdeJson<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        content_type.starts_with("application/json")
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        T::register(registry);
    }
}

impl<T: serde::Serialize + Send> poem::IntoResponse for SerdeJson<T> {
    fn into_response(self) -> poem::Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => poem::Response::builder()
                .content_type("application/json; charset=utf-8")
                .body(body),
            Err(_) => poem::Response::builder()
                .status(poem::http::StatusCode::INTERNAL_SERVER_ERROR)
                .finish(),
        }
    }
}

impl<T: Type + serde::Serialize + Send> ApiResponse for SerdeJson<T> {
    fn meta() -> poem_openapi::registry::MetaResponses {
        use poem_openapi::payload::Payload;
        poem_openapi::registry::MetaResponses {
            responses: vec![poem_openapi::registry::MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![poem_openapi::registry::MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        T::register(registry);
    }
}

// ---------------------------------------------------------------- envelopes

/// `{"success": true, "data": ...}`
#[derive(Object, serde::Serialize)]
pub struct Envelope<T: ParseFromJSON + ToJSON> {
    pub success: bool,
    pub data: T,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
    pub next_cursor: Option<String>,
}

/// A list: `{"success": true, "data": [...], "pagination": {...}}`
#[derive(Object, serde::Serialize)]
pub struct ListEnvelope<T: ParseFromJSON + ToJSON> {
    pub success: bool,
    pub data: Vec<T>,
    pub pagination: Pagination,
}

/// `{"success": true, "data": ...}`, serialized straight from the struct.
fn success<T: ParseFromJSON + ToJSON>(data: T) -> SerdeJson<Envelope<T>> {
    SerdeJson(Envelope {
        success: true,
        data,
    })
}

/// The answer of an operation that reads or changes something: 200.
#[derive(ApiResponse)]
pub enum Reply<T: ParseFromJSON + ToJSON + serde::Serialize + Send + Sync> {
    #[oai(status = 200)]
    Ok(SerdeJson<Envelope<T>>),
}

impl<T: ParseFromJSON + ToJSON + serde::Serialize + Send + Sync> Reply<T> {
    pub fn ok(data: T) -> Self {
        Reply::Ok(success(data))
    }
}

/// The online backup: the database file as of one snapshot.
#[derive(ApiResponse)]
pub enum BackupReply {
    /// A redb file: a normal agentq database (`agentq serve --db` it to restore).
    #[oai(status = 200)]
    Ok(
        poem_openapi::payload::Binary<poem::Body>,
        /// `attachment; filename="agentq-backup-<time>.redb"`.
        #[oai(header = "Content-Disposition")]
        String,
        /// The file's size in bytes (for a progress bar).
        #[oai(header = "X-Backup-Bytes")]
        u64,
    ),
}

/// The answer of an operation that creates: 201.
#[derive(ApiResponse)]
pub enum CreatedReply<T: ParseFromJSON + ToJSON + serde::Serialize + Send + Sync> {
    /// Created.
    #[oai(status = 201)]
    Created(SerdeJson<Envelope<T>>),
}

impl<T: ParseFromJSON + ToJSON + serde::Serialize + Send + Sync> CreatedReply<T> {
    pub fn created(data: T) -> Self {
        CreatedReply::Created(success(data))
    }
}

/// The answer of creating one task: 201, or 200 with the existing task when it is a
/// duplicate under its type's `duplicateHandling: ignore` (nothing is created).
#[derive(ApiResponse)]
pub enum TaskCreated {
    /// Created.
    #[oai(status = 201)]
    Created(SerdeJson<Envelope<TaskOut>>),
    /// A duplicate under `duplicateHandling: ignore`: the existing task, nothing created.
    #[oai(status = 200)]
    Existing(SerdeJson<Envelope<TaskOut>>),
}

impl TaskCreated {
    pub fn new(task: TaskOut, created: bool) -> Self {
        if created {
            TaskCreated::Created(success(task))
        } else {
            TaskCreated::Existing(success(task))
        }
    }
}

#[derive(ApiResponse)]
pub enum ListReply<T: ParseFromJSON + ToJSON + serde::Serialize + Send + Sync> {
    #[oai(status = 200)]
    Ok(SerdeJson<ListEnvelope<T>>),
}

impl<T: ParseFromJSON + ToJSON + serde::Serialize + Send + Sync> ListReply<T> {
    pub fn new(
        data: Vec<T>,
        total: u64,
        limit: usize,
        offset: usize,
        next: Option<String>,
    ) -> Self {
        ListReply::Ok(SerdeJson(ListEnvelope {
            success: true,
            data,
            pagination: Pagination {
                total,
                limit: limit as u64,
                offset: offset as u64,
                next_cursor: next,
            },
        }))
    }

    /// One page of a short list read whole (a task's attempts, a project's agents or task
    /// types, the keys): `total` is the list's length, paged by `limit` and `offset` only.
    pub fn page(items: Vec<T>, limit: usize, offset: usize) -> Self {
        let total = items.len() as u64;
        let data = items.into_iter().skip(offset).take(limit).collect();
        ListReply::new(data, total, limit, offset, None)
    }
}

/// Data of deletions.
#[derive(Object, serde::Serialize)]
pub struct Deleted {
    pub deleted: bool,
    pub id: String,
}

pub fn uuid_str(id: u128) -> String {
    Uuid::from_u128(id).hyphenated().to_string()
}

// ---------------------------------------------------------------- projects

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigIn {
    pub default_max_retries: Option<i64>,
    pub default_lease_duration_minutes: Option<i64>,
    pub reaper_interval_minutes: Option<i64>,
    /// How long finished tasks are kept; given whole (a field left out or null is the
    /// server's default).
    pub retention: Option<RetentionIn>,
}

/// Seconds a finished task is kept after it ended, per status: 0 = forever, null or left out
/// = the server's default (`--retain-completed`, `--retain-failed`, `--retain-cancelled`).
#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionIn {
    pub completed_seconds: Option<i64>,
    pub failed_seconds: Option<i64>,
    pub cancelled_seconds: Option<i64>,
}

/// The project's retention override: null = the server's default, 0 = forever.
#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct RetentionOut {
    pub completed_seconds: Option<u64>,
    pub failed_seconds: Option<u64>,
    pub cancelled_seconds: Option<u64>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProject {
    /// Unique; letters, digits, `-` and `_`, and not a UUID (a projectId takes an id or a name).
    pub name: Text,
    pub description: Text,
    pub instructions: Option<Text>,
    pub config: Option<ConfigIn>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateProject {
    /// A new name: unique, and not a UUID.
    pub name: Option<Text>,
    pub description: Option<Text>,
    /// `null` removes them.
    pub instructions: MaybeUndefined<Text>,
    /// `active` or `closed`.
    pub status: Option<Text>,
    pub config: Option<ConfigIn>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ConfigOut {
    pub default_max_retries: u32,
    pub default_lease_duration_minutes: u32,
    pub reaper_interval_minutes: u32,
    pub retention: RetentionOut,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct StatsOut {
    pub total_tasks: u64,
    pub queued_tasks: u64,
    pub running_tasks: u64,
    pub completed_tasks: u64,
    pub failed_tasks: u64,
    pub cancelled_tasks: u64,
}

impl From<Stats> for StatsOut {
    fn from(s: Stats) -> Self {
        StatsOut {
            total_tasks: s.total,
            queued_tasks: s.queued,
            running_tasks: s.running,
            completed_tasks: s.completed,
            failed_tasks: s.failed,
            cancelled_tasks: s.cancelled,
        }
    }
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ProjectOut {
    pub id: String,
    pub name: String,
    pub description: String,
    pub instructions: Option<String>,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    pub config: ConfigOut,
    pub stats: StatsOut,
}

impl ProjectOut {
    pub fn new(p: Project, s: Stats) -> Self {
        ProjectOut {
            id: uuid_str(p.id),
            name: p.name,
            description: p.description,
            instructions: p.instructions,
            status: p.status.as_str().to_string(),
            created_at: format(p.created_at),
            updated_at: format(p.updated_at),
            config: ConfigOut {
                default_max_retries: p.config.default_max_retries,
                default_lease_duration_minutes: p.config.default_lease_duration_minutes,
                reaper_interval_minutes: p.config.reaper_interval_minutes,
                retention: RetentionOut {
                    completed_seconds: p.retention.completed,
                    failed_seconds: p.retention.failed,
                    cancelled_seconds: p.retention.cancelled,
                },
            },
            stats: s.into(),
        }
    }
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ProjectRef {
    pub id: String,
    pub name: String,
    pub stats: StatsOut,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatsOut {
    pub project: ProjectRef,
    /// The project's status: `active` or `closed`.
    pub status: String,
    pub queue_depth: u64,
    pub active_agents: u64,
    pub recent_activity: RecentActivityOut,
    /// When the oldest queued task was created; null when none is queued.
    pub oldest_queued_at: Option<String>,
    /// Its age in seconds; null when none is queued.
    pub oldest_queued_age_seconds: Option<f64>,
}

/// The last hour (the current minute and the 59 before it).
#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct RecentActivityOut {
    /// Tasks that completed.
    pub tasks_completed_last_hour: u64,
    /// Tasks that failed for good (retries exhausted, or a failure that does not retry).
    pub tasks_failed_last_hour: u64,
    /// Mean seconds from the start of a completed task's last attempt to its completion;
    /// null when none completed.
    pub average_task_duration: Option<f64>,
    /// The same hour minute by minute, oldest first (60 entries; quiet minutes as zeros).
    pub per_minute: Vec<MinuteOut>,
}

/// What ended in one minute.
#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct MinuteOut {
    /// The minute's start.
    pub minute: String,
    pub completed: u64,
    pub failed: u64,
}

impl RecentActivityOut {
    /// From the hour's minutes (`store::read::Reader::activity_by_minute`).
    pub fn new(minutes: Vec<(i64, Activity)>) -> Self {
        let mut a = Activity::default();
        for (_, m) in &minutes {
            a.add(*m);
        }
        RecentActivityOut {
            tasks_completed_last_hour: a.completed,
            tasks_failed_last_hour: a.failed,
            average_task_duration: (a.completed > 0).then(|| {
                let ms = a.completed_run_ms as f64 / a.completed as f64;
                ms.round() / 1000.0
            }),
            per_minute: minutes
                .into_iter()
                .map(|(minute, m)| MinuteOut {
                    minute: format(minute * 60_000),
                    completed: m.completed,
                    failed: m.failed,
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------- task types

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTaskType {
    pub name: Text,
    pub template: Option<Text>,
    pub variables: Option<Vec<Text>>,
    /// `ignore`, `fail` or `allow` (default).
    pub duplicate_handling: Option<Text>,
    pub max_retries: Option<i64>,
    pub lease_duration_minutes: Option<f64>,
    pub retry_delay_seconds: Option<f64>,
    pub backoff_multiplier: Option<f64>,
    /// A script its tasks inherit (unless they carry their own). Only admin keys and keys
    /// with `allowScripts` may set it.
    pub script: Option<ScriptIn>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateTaskType {
    pub name: Option<Text>,
    /// `null` removes it: tasks of the type then give their own instructions.
    pub template: MaybeUndefined<Text>,
    pub variables: Option<Vec<Text>>,
    pub duplicate_handling: Option<Text>,
    /// `null`: the project's `defaultMaxRetries` again.
    pub max_retries: MaybeUndefined<i64>,
    /// `null`: the project's `defaultLeaseDurationMinutes` again.
    pub lease_duration_minutes: MaybeUndefined<f64>,
    pub retry_delay_seconds: Option<f64>,
    pub backoff_multiplier: Option<f64>,
    /// `null` removes it (tasks already created keep theirs). Setting it needs an admin key
    /// or one with `allowScripts`.
    pub script: MaybeUndefined<ScriptIn>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct TaskTypeOut {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub template: Option<String>,
    pub variables: Vec<String>,
    pub duplicate_handling: String,
    pub max_retries: Option<u32>,
    pub lease_duration_minutes: Option<f64>,
    pub retry_delay_seconds: f64,
    pub backoff_multiplier: f64,
    pub script: Option<ScriptOut>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<TaskType> for TaskTypeOut {
    fn from(t: TaskType) -> Self {
        TaskTypeOut {
            id: uuid_str(t.id),
            project_id: uuid_str(t.project_id),
            name: t.name,
            template: t.template,
            variables: t.variables,
            duplicate_handling: t.duplicate_handling.as_str().to_string(),
            max_retries: t.max_retries,
            lease_duration_minutes: t.lease_duration_minutes,
            retry_delay_seconds: t.retry_delay_seconds,
            backoff_multiplier: t.backoff_multiplier,
            script: t.script.map(|s| ScriptOut::new(s, true)),
            created_at: format(t.created_at),
            updated_at: format(t.updated_at),
        }
    }
}

// ---------------------------------------------------------------- scripts

/// The language of a script: how a worker started with `--scripts` runs it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ScriptType {
    /// Run with `bash`.
    Bash,
    /// Run with `python3`.
    Python,
}

impl From<ScriptType> for ScriptKind {
    fn from(t: ScriptType) -> Self {
        match t {
            ScriptType::Bash => ScriptKind::Bash,
            ScriptType::Python => ScriptKind::Python,
        }
    }
}

impl From<ScriptKind> for ScriptType {
    fn from(k: ScriptKind) -> Self {
        match k {
            ScriptKind::Bash => ScriptType::Bash,
            ScriptKind::Python => ScriptType::Python,
        }
    }
}

/// A script for `agentq work --scripts` to run (seed 000).
#[derive(Object, Clone)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScriptIn {
    #[oai(rename = "type")]
    pub kind: ScriptType,
    /// The script itself: at most 1 MiB (1,048,576 bytes of UTF-8).
    pub content: Text,
    /// 1-3600; the worker stops the script after this long. Absent: no limit but the
    /// worker's own `--timeout`.
    pub timeout_seconds: Option<i64>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ScriptOut {
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: ScriptType,
    /// The content's size in bytes.
    pub size: u64,
    /// Left out of list items.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    pub timeout_seconds: Option<u32>,
}

impl ScriptOut {
    pub fn new(s: Script, with_content: bool) -> Self {
        ScriptOut {
            kind: s.kind.into(),
            size: s.content.len() as u64,
            content: with_content.then_some(s.content),
            timeout_seconds: s.timeout_seconds,
        }
    }
}

/// How the process of one attempt ran: what a worker reports with its complete or fail,
/// kept with that attempt (`GET /api/tasks/{id}/attempts`).
#[derive(Object, Clone)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutionIn {
    /// The process's exit code; 128 + N when signal N ended it, as shells report it.
    pub exit_code: i64,
    /// The end of its standard output: at most 64 KiB (65,536 bytes).
    pub stdout_tail: Option<Text>,
    /// The end of its standard error: at most 64 KiB.
    pub stderr_tail: Option<Text>,
    /// How long it ran, in milliseconds.
    pub duration_ms: i64,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ExecutionOut {
    pub exit_code: i32,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub duration_ms: u64,
}

impl From<Execution> for ExecutionOut {
    fn from(e: Execution) -> Self {
        ExecutionOut {
            exit_code: e.exit_code,
            stdout_tail: e.stdout_tail,
            stderr_tail: e.stderr_tail,
            duration_ms: e.duration_ms,
        }
    }
}

// ---------------------------------------------------------------- tasks

#[derive(Object, Clone)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTask {
    /// Optional client-chosen id, unique across the server.
    pub id: Option<Text>,
    /// The task type, by id or by its name in the project (a UUID is taken as an id).
    pub type_id: Option<Text>,
    pub instructions: Option<Text>,
    pub variables: Option<Vars>,
    pub batch_id: Option<Text>,
    /// 0-10, default 5; higher runs first.
    pub priority: Option<i64>,
    /// Do not hand out before this instant (RFC 3339).
    pub not_before: Option<Text>,
    /// A script for `agentq work --scripts` (then `instructions` may be left out); without
    /// one, the task takes its type's. Only admin keys and keys with `allowScripts` may give
    /// one.
    pub script: Option<ScriptIn>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkCreate {
    pub tasks: Vec<CreateTask>,
    pub batch_id: Option<Text>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct BulkError {
    pub index: u64,
    pub error: String,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct BulkOut {
    pub tasks_created: u64,
    pub created_tasks: Vec<TaskOut>,
    pub errors: Vec<BulkError>,
}

/// Which tasks a bulk cancel or retry applies to: the listing's filters.
#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskFilterIn {
    /// One status or a comma-separated list.
    pub status: Option<Text>,
    /// A task type, by id or by its name in the project.
    pub type_id: Option<Text>,
    pub assigned_to: Option<Text>,
    pub batch_id: Option<Text>,
}

/// A bulk cancel: the tasks by id (up to 1,000), by filter (the first 10,000 matches, in
/// creation order), or the tasks named that the filter matches.
#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkCancelIn {
    pub ids: Option<Vec<Text>>,
    pub filter: Option<TaskFilterIn>,
    pub reason: Option<Text>,
}

/// A bulk retry: the tasks by id (up to 1,000), by filter (the first 10,000 matches, in
/// creation order), or the tasks named that the filter matches.
#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkRetryIn {
    pub ids: Option<Vec<Text>>,
    pub filter: Option<TaskFilterIn>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct BulkActionError {
    pub id: String,
    pub error: String,
}

/// What a delete by filter did.
#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct PurgeOut {
    /// Tasks deleted.
    pub deleted_tasks: u64,
}

/// What a bulk cancel or retry did.
#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct BulkActionOut {
    /// Tasks named or matched.
    pub matched: u64,
    /// Tasks cancelled or requeued.
    pub changed: u64,
    /// The tasks left as they were, and why (not in this project, or not in a state the
    /// action applies to).
    pub errors: Vec<BulkActionError>,
    /// True when a filter matched more tasks than one call takes: call again.
    pub more: bool,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateTask {
    pub instructions: Option<Text>,
    pub variables: Option<Vars>,
    pub priority: Option<i64>,
    /// `null` removes it: the task is available at once.
    pub not_before: MaybeUndefined<Text>,
    /// `null` takes the task out of its batch.
    pub batch_id: MaybeUndefined<Text>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ProgressOut {
    pub current: i64,
    pub total: i64,
    pub message: Option<String>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct AttemptOut {
    pub attempt: u32,
    pub agent_name: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
    /// How its process ran, when the agent reported it (`execution` on complete or fail).
    /// Shown by `GET /api/tasks/{id}/attempts`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<ExecutionOut>,
}

impl From<Attempt> for AttemptOut {
    fn from(a: Attempt) -> Self {
        AttemptOut {
            attempt: a.attempt,
            agent_name: a.agent_name,
            started_at: format(a.started_at),
            ended_at: a.ended_at.map(format),
            outcome: a.outcome.as_str().to_string(),
            error: a.error,
            execution: None,
        }
    }
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct TaskOut {
    pub id: String,
    pub project_id: String,
    pub type_id: Option<String>,
    pub instructions: String,
    pub variables: BTreeMap<String, String>,
    /// List items show its type, size and timeout; the task itself shows the content too.
    pub script: Option<ScriptOut>,
    pub batch_id: Option<String>,
    pub priority: u8,
    pub not_before: Option<String>,
    pub status: String,
    pub assigned_to: Option<String>,
    pub assigned_at: Option<String>,
    pub lease_expires_at: Option<String>,
    /// Present only in next-task answers: names this one lease.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
    pub retry_count: u32,
    pub max_retries: u32,
    pub result: Option<String>,
    /// Left out of list items.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<serde_json::Value>,
    pub error: Option<String>,
    pub progress: Option<ProgressOut>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub cancelled_at: Option<String>,
    pub cancel_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Left out of list items; see `GET /api/tasks/{id}/attempts`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptOut>>,
}

/// How much of a task to show.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Everything but the lease token (task reads, transitions).
    Full,
    /// Without attempts and outputs (list items).
    Brief,
    /// Everything plus the lease token (next-task).
    Leased,
}

impl TaskOut {
    pub fn new(t: Task, view: View) -> Self {
        let lease = t.lease.as_ref();
        TaskOut {
            id: t.id,
            project_id: uuid_str(t.project_id),
            type_id: t.type_id.map(uuid_str),
            instructions: t.instructions,
            variables: t.variables,
            script: t.script.map(|s| ScriptOut::new(s, view != View::Brief)),
            batch_id: t.batch_id,
            priority: t.priority,
            not_before: t.not_before.map(format),
            status: t.status.as_str().to_string(),
            assigned_to: lease.map(|l| l.agent.clone()),
            assigned_at: lease.map(|l| format(l.assigned_at)),
            lease_expires_at: lease.map(|l| format(l.expires_at)),
            lease_token: if view == View::Leased {
                lease.map(|l| format!("{:032x}", l.token))
            } else {
                None
            },
            retry_count: t.retry_count,
            max_retries: t.max_retries,
            result: t.result,
            outputs: if view == View::Brief {
                None
            } else {
                Some(
                    t.outputs
                        .as_deref()
                        .and_then(|o| serde_json::from_str(o).ok())
                        .unwrap_or(serde_json::Value::Null),
                )
            },
            error: t.error,
            progress: t.progress.map(|p| ProgressOut {
                current: p.current,
                total: p.total,
                message: p.message,
            }),
            started_at: t.started_at.map(format),
            completed_at: t.completed_at.map(format),
            cancelled_at: t.cancelled_at.map(format),
            cancel_reason: t.cancel_reason,
            created_at: format(t.created_at),
            updated_at: format(t.updated_at),
            attempts: if view == View::Brief {
                None
            } else {
                Some(t.attempts.into_iter().map(Into::into).collect())
            },
        }
    }
}

// ---------------------------------------------------------------- the lease protocol

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct NextTaskIn {
    pub project_id: Text,
    /// Hand out only tasks of these types (at most 100), each by id or by its name in the
    /// project; without it, tasks of any type.
    pub type_ids: Option<Vec<Text>>,
    /// Long-poll: wait up to this many seconds (0-60) for a task.
    pub wait_seconds: Option<f64>,
    /// Complete this task (one the agent holds) first, in the same write: an agent's whole
    /// cycle in one request. Refused (and nothing claimed) as `complete` would refuse it.
    pub complete: Option<CompleteFirst>,
}

/// next-task's `complete`: the fields of a complete, naming the task.
#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteFirst {
    pub task_id: Text,
    pub result: Option<Text>,
    pub outputs: Option<serde_json::Value>,
    pub lease_token: Option<Text>,
    /// How the attempt's process ran; kept with the attempt.
    pub execution: Option<ExecutionIn>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct NextTaskData {
    pub task: Option<TaskOut>,
    pub agent_name: String,
}

/// The seed's next-task body; `success: false` with `task: null` when nothing is available.
#[derive(Object, serde::Serialize)]
pub struct NextTaskOut {
    pub success: bool,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub data: NextTaskData,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteIn {
    pub agent_name: Text,
    pub result: Option<Text>,
    pub outputs: Option<serde_json::Value>,
    pub lease_token: Option<Text>,
    /// How the attempt's process ran; kept with the attempt.
    pub execution: Option<ExecutionIn>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailIn {
    pub agent_name: Text,
    pub error: Option<Text>,
    pub can_retry: Option<bool>,
    pub lease_token: Option<Text>,
    /// How the attempt's process ran; kept with the attempt.
    pub execution: Option<ExecutionIn>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct FailOut {
    #[oai(flatten)]
    #[serde(flatten)]
    pub task: TaskOut,
    pub will_retry: bool,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtendIn {
    /// The agent that holds the lease; may be left out with a session, which names it.
    pub agent_name: Option<Text>,
    pub extension_minutes: f64,
    pub lease_token: Option<Text>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProgressIn {
    pub agent_name: Text,
    pub current: i64,
    pub total: i64,
    pub message: Option<Text>,
    pub lease_token: Option<Text>,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelIn {
    pub reason: Option<Text>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct AgentOut {
    pub agent_name: String,
    pub task_id: String,
    pub assigned_at: String,
    pub lease_expires_at: String,
    /// The agent's last lease-protocol call (next-task, complete, fail, heartbeat, progress)
    /// seen by this server since it started, or the lease's start if later.
    pub last_seen_at: String,
    pub status: String,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct PeekOut {
    pub project_id: String,
    pub tasks_available: u64,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CleanupOut {
    pub reclaimed_tasks: u64,
    pub cleaned_agents: u64,
}

// ---------------------------------------------------------------- operations

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct StorageOut {
    /// False while writes fail or the file cannot be read.
    pub healthy: bool,
    pub provider: String,
    pub path: String,
    pub size_bytes: u64,
    /// While writes fail: the storage error that began the outage (a full disk, say).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// While writes fail: since when.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct HealthOut {
    /// `healthy`; `degraded` while writes fail (reads may still work); `unhealthy` when the
    /// database cannot be read.
    pub status: String,
    pub timestamp: String,
    pub version: String,
    pub uptime: u64,
    pub storage: StorageOut,
}

#[derive(ApiResponse)]
pub enum HealthReply {
    #[oai(status = 200)]
    Ok(SerdeJson<Envelope<HealthOut>>),
    #[oai(status = 503)]
    Unhealthy(SerdeJson<Envelope<HealthOut>>),
}

// ---------------------------------------------------------------- query enumerations

/// Which projects a listing shows.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[oai(rename_all = "lowercase")]
pub enum ProjectFilter {
    #[default]
    Active,
    Closed,
    All,
}

impl ProjectFilter {
    /// The status listed; None = every project but those being deleted.
    pub fn status(self) -> Option<crate::model::ProjectStatus> {
        match self {
            ProjectFilter::Active => Some(crate::model::ProjectStatus::Active),
            ProjectFilter::Closed => Some(crate::model::ProjectStatus::Closed),
            ProjectFilter::All => None,
        }
    }
}

/// What a task listing is sorted by.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[oai(rename_all = "camelCase")]
pub enum SortBy {
    #[default]
    CreatedAt,
    UpdatedAt,
    Priority,
}

/// The direction of a task listing.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[oai(rename_all = "lowercase")]
pub enum SortOrder {
    Asc,
    #[default]
    Desc,
}

//! Field rules of the contract, checked before anything reaches storage.
//!
//! Each function turns a request body into a domain input or a list of [`FieldError`]s (one
//! per broken rule, all reported at once). Every limit is a named constant here.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use poem_openapi::types::MaybeUndefined;
use uuid::Uuid;

use super::types::*;
use crate::error::{Error, FieldError};
use crate::model::{
    template_placeholders, DuplicateHandling, Execution, Millis, ProjectConfig, ProjectStatus,
    Script,
};
use crate::store::write::{
    NewProject, NewTask, NewTaskType, ProjectPatch, TaskPatch, TypeKey, TypePatch,
};

pub const MAX_NAME: usize = 100;
pub const MAX_AGENT_NAME: usize = 50;
pub const MAX_DESCRIPTION: usize = 500;
pub const MAX_INSTRUCTIONS: usize = 10_000;
pub const MAX_TEMPLATE: usize = 10_000;
pub const MAX_TYPE_VARIABLES: usize = 20;
pub const MAX_TASK_VARIABLES: usize = 50;
pub const MAX_VARIABLE_VALUE: usize = 1_000;
pub const MAX_RESULT: usize = 100_000;
pub const MAX_OUTPUTS_BYTES: usize = 1 << 20;
pub const MAX_ERROR: usize = 10_000;
pub const MAX_BULK: usize = 1000;
pub const MAX_WAIT_SECONDS: f64 = 60.0;
/// Task types one next-task may name: each costs the writer a seek per claim.
pub const MAX_TYPE_IDS: usize = 100;
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_PRIORITY: i64 = 10;
pub const MAX_BATCH_ID: usize = 100;
pub const MAX_REASON: usize = 1_000;
pub const MAX_PROGRESS_MESSAGE: usize = 1_000;
/// A script's `content`, in bytes (seed 000: "max 1MB").
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;
/// An execution's `stdoutTail` and `stderrTail`, in bytes.
pub const MAX_TAIL_BYTES: usize = 64 << 10;

// Ranges of numeric fields: `validate` enforces them and the OpenAPI document (`spec`)
// states them, both from here.
/// A task type's `maxRetries`, and a project's `defaultMaxRetries`.
pub const MAX_RETRIES: RangeInclusive<i64> = 0..=10;
/// A project's `defaultLeaseDurationMinutes` (whole minutes).
pub const PROJECT_LEASE_MINUTES: RangeInclusive<i64> = 1..=1440;
/// A project's `reaperIntervalMinutes`.
pub const REAPER_INTERVAL_MINUTES: RangeInclusive<i64> = 1..=60;
/// A task's `priority`.
pub const PRIORITY: RangeInclusive<i64> = 0..=MAX_PRIORITY;
/// A task type's `leaseDurationMinutes`.
pub const LEASE_MINUTES: RangeInclusive<f64> = 0.1..=1440.0;
/// extend-lease's `extensionMinutes`.
pub const EXTENSION_MINUTES: RangeInclusive<f64> = 0.1..=1440.0;
/// A task type's `retryDelaySeconds`.
pub const RETRY_DELAY_SECONDS: RangeInclusive<f64> = 0.0..=86_400.0;
/// A task type's `backoffMultiplier`.
pub const BACKOFF_MULTIPLIER: RangeInclusive<f64> = 1.0..=10.0;
/// A session's `extendBy`, in seconds.
pub const SESSION_EXTEND_SECONDS: RangeInclusive<i64> = 1..=crate::auth::MAX_SESSION_EXTEND_SECS;
/// A listing's `limit`.
pub const LIMIT: RangeInclusive<i64> = 1..=MAX_LIMIT as i64;
/// A script's `timeoutSeconds` (seed 000).
pub const SCRIPT_TIMEOUT_SECONDS: RangeInclusive<i64> = 1..=3600;
/// An execution's `exitCode`: what a process can exit with.
pub const EXIT_CODE: RangeInclusive<i64> = i32::MIN as i64..=i32::MAX as i64;
/// An execution's `durationMs` (up to a year).
pub const DURATION_MS: RangeInclusive<i64> = 0..=365 * 86_400_000;
/// next-task's `waitSeconds`.
pub const WAIT_SECONDS: RangeInclusive<f64> = 0.0..=MAX_WAIT_SECONDS;

/// Collects field errors.
#[derive(Default)]
pub struct Check(Vec<FieldError>);

impl Check {
    pub fn fail(
        &mut self,
        field: &str,
        msg: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) {
        self.0.push(FieldError::new(field, msg).with_value(value));
    }

    pub fn name(&mut self, field: &str, v: &str, max: usize, what: &str) {
        if v.is_empty() || v.chars().count() > max {
            self.fail(field, format!("{what} must be 1-{max} characters"), v);
        } else if !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.fail(
                field,
                format!("{what} can only contain letters, numbers, hyphens, and underscores"),
                v,
            );
        }
    }

    pub fn max_len(&mut self, field: &str, v: &str, max: usize) {
        if v.chars().count() > max {
            self.fail(
                field,
                format!("must be at most {max} characters"),
                v.chars().count(),
            );
        }
    }

    pub fn int_range(&mut self, field: &str, v: i64, range: &RangeInclusive<i64>) -> u32 {
        self.in_range(field, v, range).clamp(0, u32::MAX as i64) as u32
    }

    /// `v`, or a failure when it is outside `range` (then `v` clamped into it).
    pub fn in_range(&mut self, field: &str, v: i64, range: &RangeInclusive<i64>) -> i64 {
        let (lo, hi) = (*range.start(), *range.end());
        if !range.contains(&v) {
            self.fail(field, format!("must be between {lo} and {hi}"), v);
        }
        v.clamp(lo, hi)
    }

    pub fn float_range(&mut self, field: &str, v: f64, range: &RangeInclusive<f64>) -> f64 {
        let (lo, hi) = (*range.start(), *range.end());
        if !v.is_finite() || !range.contains(&v) {
            self.fail(field, format!("must be between {lo} and {hi}"), v);
        }
        v
    }

    /// A task type's id or name (see [`TypeKey`]): a UUID, or a name as task types have.
    pub fn type_key(&mut self, field: &str, v: &str) -> TypeKey {
        self.name(field, v, MAX_NAME, "A task type id or name");
        TypeKey::parse(v)
    }

    pub fn time(&mut self, field: &str, v: &str) -> Option<Millis> {
        let t = crate::time::parse(v);
        if t.is_none() {
            self.fail(field, "must be an RFC 3339 date-time", v);
        }
        t
    }

    pub fn uuid(&mut self, field: &str, v: &str) -> u128 {
        match Uuid::parse_str(v) {
            Ok(u) => u.as_u128(),
            Err(_) => {
                self.fail(field, "must be a UUID", v);
                0
            }
        }
    }

    pub fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(Error::Validation(self.0))
        }
    }
}

pub fn agent_name(name: &str) -> Result<(), Error> {
    let mut c = Check::default();
    c.name("agentName", name, MAX_AGENT_NAME, "Agent name");
    c.finish(())
}

fn config(c: &mut Check, input: Option<&ConfigIn>, base: ProjectConfig) -> ProjectConfig {
    let mut out = base;
    if let Some(cfg) = input {
        if let Some(v) = cfg.default_max_retries {
            out.default_max_retries = c.int_range("config.defaultMaxRetries", v, &MAX_RETRIES);
        }
        if let Some(v) = cfg.default_lease_duration_minutes {
            out.default_lease_duration_minutes = c.int_range(
                "config.defaultLeaseDurationMinutes",
                v,
                &PROJECT_LEASE_MINUTES,
            );
        }
        if let Some(v) = cfg.reaper_interval_minutes {
            out.reaper_interval_minutes =
                c.int_range("config.reaperIntervalMinutes", v, &REAPER_INTERVAL_MINUTES);
        }
    }
    out
}

/// The longest retention a project may set: ten years, in seconds.
pub const RETENTION_SECONDS: RangeInclusive<i64> = 0..=315_360_000;

/// A project's retention override.
fn retention(c: &mut Check, r: &RetentionIn) -> crate::model::Retention {
    let mut one = |field: &str, v: Option<i64>| {
        v.map(|v| c.int_range(&format!("config.retention.{field}"), v, &RETENTION_SECONDS) as u64)
    };
    crate::model::Retention {
        completed: one("completedSeconds", r.completed_seconds),
        failed: one("failedSeconds", r.failed_seconds),
        cancelled: one("cancelledSeconds", r.cancelled_seconds),
    }
}

/// A project name: a name, and not a UUID. A `{projectId}` takes an id or a name and an id
/// matches first, so a project named like another's id could not be reached by its name.
fn project_name(c: &mut Check, v: &str) {
    c.name("name", v, MAX_NAME, "Project name");
    if Uuid::parse_str(v).is_ok() {
        c.fail(
            "name",
            "Project name cannot be a UUID (a projectId takes an id or a name, ids first)",
            v,
        );
    }
}

pub fn create_project(b: CreateProject) -> Result<NewProject, Error> {
    let mut c = Check::default();
    project_name(&mut c, &b.name);
    c.max_len("description", &b.description, MAX_DESCRIPTION);
    if let Some(i) = &b.instructions {
        c.max_len("instructions", i, MAX_INSTRUCTIONS);
    }
    let cfg = config(&mut c, b.config.as_ref(), ProjectConfig::default());
    let retention = b
        .config
        .as_ref()
        .and_then(|cfg| cfg.retention.as_ref())
        .map(|r| retention(&mut c, r))
        .unwrap_or_default();
    c.finish(NewProject {
        name: b.name.0,
        description: b.description.0,
        instructions: b.instructions.map(String::from),
        config: cfg,
        retention,
    })
}

/// A field of an update that `null` clears: absent leaves it (`None`), `null` clears it
/// (`Some(None)`), a value sets it.
fn clearable<T, U>(field: MaybeUndefined<T>, set: impl FnOnce(T) -> U) -> Option<Option<U>> {
    match field {
        MaybeUndefined::Undefined => None,
        MaybeUndefined::Null => Some(None),
        MaybeUndefined::Value(v) => Some(Some(set(v))),
    }
}

pub fn update_project(b: UpdateProject) -> Result<ProjectPatch, Error> {
    let mut c = Check::default();
    if let Some(n) = &b.name {
        project_name(&mut c, n);
    }
    if let Some(d) = &b.description {
        c.max_len("description", d, MAX_DESCRIPTION);
    }
    if let Some(i) = b.instructions.value() {
        c.max_len("instructions", i, MAX_INSTRUCTIONS);
    }
    let status = match b.status.as_deref() {
        None => None,
        Some("active") => Some(ProjectStatus::Active),
        Some("closed") => Some(ProjectStatus::Closed),
        Some(other) => {
            c.fail("status", "must be active or closed", other);
            None
        }
    };
    let mut patch = ProjectPatch {
        name: b.name.map(String::from),
        description: b.description.map(String::from),
        instructions: clearable(b.instructions, String::from),
        status,
        ..ProjectPatch::default()
    };
    if let Some(cfg) = &b.config {
        if let Some(v) = cfg.default_max_retries {
            patch.default_max_retries =
                Some(c.int_range("config.defaultMaxRetries", v, &MAX_RETRIES));
        }
        if let Some(v) = cfg.default_lease_duration_minutes {
            patch.default_lease_duration_minutes = Some(c.int_range(
                "config.defaultLeaseDurationMinutes",
                v,
                &PROJECT_LEASE_MINUTES,
            ));
        }
        if let Some(v) = cfg.reaper_interval_minutes {
            patch.reaper_interval_minutes =
                Some(c.int_range("config.reaperIntervalMinutes", v, &REAPER_INTERVAL_MINUTES));
        }
        patch.retention = cfg.retention.as_ref().map(|r| retention(&mut c, r));
    }
    c.finish(patch)
}

fn duplicate_handling(c: &mut Check, v: &str) -> DuplicateHandling {
    match v {
        "allow" => DuplicateHandling::Allow,
        "ignore" => DuplicateHandling::Ignore,
        "fail" => DuplicateHandling::Fail,
        other => {
            c.fail("duplicateHandling", "must be ignore, fail or allow", other);
            DuplicateHandling::Allow
        }
    }
}

fn type_variables(c: &mut Check, vars: &[String]) {
    if vars.len() > MAX_TYPE_VARIABLES {
        c.fail(
            "variables",
            format!("at most {MAX_TYPE_VARIABLES} variables"),
            vars.len(),
        );
    }
    for (i, v) in vars.iter().enumerate() {
        let ok = v.len() <= MAX_NAME
            && v.chars().next().is_some_and(|ch| ch.is_ascii_alphabetic())
            && v.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !ok {
            c.fail(
                &format!("variables[{i}]"),
                "variable names must match [A-Za-z][A-Za-z0-9_]*",
                v.as_str(),
            );
        }
    }
}

fn template_rules(c: &mut Check, template: &str, vars: &[String]) {
    c.max_len("template", template, MAX_TEMPLATE);
    let missing: Vec<String> = template_placeholders(template)
        .into_iter()
        .filter(|p| !vars.contains(p))
        .collect();
    if !missing.is_empty() {
        c.fail(
            "template",
            format!(
                "placeholders not listed in variables: {}",
                missing.join(", ")
            ),
            template,
        );
    }
}

pub fn create_type(b: CreateTaskType) -> Result<NewTaskType, Error> {
    let mut c = Check::default();
    c.name("name", &b.name, MAX_NAME, "Task type name");
    let vars: Vec<String> = b
        .variables
        .unwrap_or_default()
        .into_iter()
        .map(String::from)
        .collect();
    type_variables(&mut c, &vars);
    if let Some(t) = &b.template {
        template_rules(&mut c, t, &vars);
    }
    let dh = b
        .duplicate_handling
        .as_deref()
        .map_or(DuplicateHandling::Allow, |v| duplicate_handling(&mut c, v));
    let max_retries = b
        .max_retries
        .map(|v| c.int_range("maxRetries", v, &MAX_RETRIES));
    let lease = b
        .lease_duration_minutes
        .map(|v| c.float_range("leaseDurationMinutes", v, &LEASE_MINUTES));
    let delay = b.retry_delay_seconds.map_or(0.0, |v| {
        c.float_range("retryDelaySeconds", v, &RETRY_DELAY_SECONDS)
    });
    let mult = b.backoff_multiplier.map_or(2.0, |v| {
        c.float_range("backoffMultiplier", v, &BACKOFF_MULTIPLIER)
    });
    let script = b.script.map(|s| script(&mut c, "script", s));
    c.finish(NewTaskType {
        script,
        name: b.name.0,
        template: b.template.map(String::from),
        variables: vars,
        duplicate_handling: dh,
        max_retries,
        lease_duration_minutes: lease,
        retry_delay_seconds: delay,
        backoff_multiplier: mult,
    })
}

pub fn update_type(b: UpdateTaskType) -> Result<TypePatch, Error> {
    let mut c = Check::default();
    if let Some(n) = &b.name {
        c.name("name", n, MAX_NAME, "Task type name");
    }
    let variables: Option<Vec<String>> = b
        .variables
        .map(|v| v.into_iter().map(String::from).collect());
    if let Some(v) = &variables {
        type_variables(&mut c, v);
    }
    if let Some(t) = b.template.value() {
        c.max_len("template", t, MAX_TEMPLATE);
    }
    let patch = TypePatch {
        name: b.name.map(String::from),
        duplicate_handling: b
            .duplicate_handling
            .as_deref()
            .map(|v| duplicate_handling(&mut c, v)),
        max_retries: clearable(b.max_retries, |v| {
            c.int_range("maxRetries", v, &MAX_RETRIES)
        }),
        lease_duration_minutes: clearable(b.lease_duration_minutes, |v| {
            c.float_range("leaseDurationMinutes", v, &LEASE_MINUTES)
        }),
        retry_delay_seconds: b
            .retry_delay_seconds
            .map(|v| c.float_range("retryDelaySeconds", v, &RETRY_DELAY_SECONDS)),
        backoff_multiplier: b
            .backoff_multiplier
            .map(|v| c.float_range("backoffMultiplier", v, &BACKOFF_MULTIPLIER)),
        template: clearable(b.template, String::from),
        variables,
        script: clearable(b.script, |s| script(&mut c, "script", s)),
    };
    c.finish(patch)
}

fn task_variables(c: &mut Check, prefix: &str, vars: &BTreeMap<String, String>) {
    if vars.len() > MAX_TASK_VARIABLES {
        c.fail(
            &format!("{prefix}variables"),
            format!("at most {MAX_TASK_VARIABLES} variables"),
            vars.len(),
        );
    }
    for (k, v) in vars {
        if v.chars().count() > MAX_VARIABLE_VALUE {
            c.fail(
                &format!("{prefix}variables.{k}"),
                format!("values must be at most {MAX_VARIABLE_VALUE} characters"),
                v.chars().count(),
            );
        }
    }
}

/// Validates one task of a create or bulk request; `prefix` names it in field paths.
pub fn create_task(
    b: CreateTask,
    batch_id: Option<&String>,
    prefix: &str,
) -> Result<NewTask, Error> {
    let mut c = Check::default();
    if let Some(id) = &b.id {
        c.name(&format!("{prefix}id"), id, MAX_NAME, "Task id");
    }
    let type_key = b
        .type_id
        .as_deref()
        .map(|t| c.type_key(&format!("{prefix}typeId"), t));
    if let Some(i) = &b.instructions {
        c.max_len(&format!("{prefix}instructions"), i, MAX_INSTRUCTIONS);
    }
    let vars = vars_plain(b.variables.unwrap_or_default());
    task_variables(&mut c, prefix, &vars);
    let batch = b.batch_id.map(String::from).or_else(|| batch_id.cloned());
    if let Some(bid) = &batch {
        c.max_len(&format!("{prefix}batchId"), bid, MAX_BATCH_ID);
    }
    let priority = b
        .priority
        .map(|p| c.int_range(&format!("{prefix}priority"), p, &PRIORITY) as u8);
    let not_before = b
        .not_before
        .as_deref()
        .and_then(|t| c.time(&format!("{prefix}notBefore"), t));
    let script = b
        .script
        .map(|s| script(&mut c, &format!("{prefix}script"), s));
    c.finish(NewTask {
        script,
        id: b.id.map(String::from),
        type_key,
        instructions: b.instructions.map(String::from),
        variables: vars,
        batch_id: batch,
        priority,
        not_before,
    })
}

pub fn update_task(b: UpdateTask) -> Result<TaskPatch, Error> {
    let mut c = Check::default();
    if let Some(i) = &b.instructions {
        c.max_len("instructions", i, MAX_INSTRUCTIONS);
    }
    let variables = b.variables.map(vars_plain);
    if let Some(v) = &variables {
        task_variables(&mut c, "", v);
    }
    if let Some(bid) = b.batch_id.value() {
        c.max_len("batchId", bid, MAX_BATCH_ID);
    }
    let patch = TaskPatch {
        priority: b
            .priority
            .map(|p| c.int_range("priority", p, &PRIORITY) as u8),
        // A time that does not parse is refused by `finish`, so its `None` is never applied.
        not_before: clearable(b.not_before, |t: Text| c.time("notBefore", &t)).map(Option::flatten),
        instructions: b.instructions.map(String::from),
        variables,
        batch_id: clearable(b.batch_id, String::from),
    };
    c.finish(patch)
}

/// Parses an optional lease token (32 hex digits).
pub fn lease_token(c: &mut Check, token: Option<&str>) -> Option<u128> {
    lease_token_at(c, "leaseToken", token)
}

fn lease_token_at(c: &mut Check, field: &str, token: Option<&str>) -> Option<u128> {
    let t = token?;
    match u128::from_str_radix(t, 16) {
        Ok(v) if t.len() == 32 => Some(v),
        _ => {
            c.fail(field, "not a lease token", t);
            None
        }
    }
}

/// What a complete carries: its result text, its outputs (a JSON object, kept serialized)
/// and its lease token. `at` prefixes the field names (`complete.` inside next-task).
pub fn completion(
    c: &mut Check,
    at: &str,
    result: Option<&str>,
    outputs: Option<&serde_json::Value>,
    token: Option<&str>,
) -> (Option<String>, Option<String>, Option<u128>) {
    if let Some(r) = result {
        c.max_len(&format!("{at}result"), r, MAX_RESULT);
    }
    let outputs = match outputs {
        None | Some(serde_json::Value::Null) => None,
        Some(v @ serde_json::Value::Object(_)) => {
            let s = v.to_string();
            if s.len() > MAX_OUTPUTS_BYTES {
                c.fail(
                    &format!("{at}outputs"),
                    "must be at most 1 MiB serialized",
                    s.len(),
                );
            }
            Some(s)
        }
        Some(_) => {
            c.fail(&format!("{at}outputs"), "must be a JSON object", "");
            None
        }
    };
    let token = lease_token_at(c, &format!("{at}leaseToken"), token);
    (result.map(String::from), outputs, token)
}

/// A task's or task type's `script`; `at` names it in field paths.
pub fn script(c: &mut Check, at: &str, s: ScriptIn) -> Script {
    if s.content.is_empty() {
        c.fail(&format!("{at}.content"), "is required", "");
    }
    if s.content.len() > MAX_SCRIPT_BYTES {
        c.fail(
            &format!("{at}.content"),
            format!("must be at most {MAX_SCRIPT_BYTES} bytes"),
            s.content.len(),
        );
    }
    let timeout_seconds = s
        .timeout_seconds
        .map(|t| c.int_range(&format!("{at}.timeoutSeconds"), t, &SCRIPT_TIMEOUT_SECONDS));
    Script {
        kind: s.kind.into(),
        content: s.content.0,
        timeout_seconds,
    }
}

/// complete's and fail's `execution`.
pub fn execution(c: &mut Check, e: ExecutionIn) -> Execution {
    let mut tail = |field: &str, text: Option<Text>| {
        let text = text.map(String::from).unwrap_or_default();
        if text.len() > MAX_TAIL_BYTES {
            c.fail(
                &format!("execution.{field}"),
                format!("must be at most {MAX_TAIL_BYTES} bytes"),
                text.len(),
            );
        }
        text
    };
    let stdout_tail = tail("stdoutTail", e.stdout_tail);
    let stderr_tail = tail("stderrTail", e.stderr_tail);
    let exit_code = c.in_range("execution.exitCode", e.exit_code, &EXIT_CODE);
    let duration_ms = c.in_range("execution.durationMs", e.duration_ms, &DURATION_MS);
    Execution {
        exit_code: exit_code as i32,
        stdout_tail,
        stderr_tail,
        duration_ms: duration_ms as u64,
    }
}

/// `limit` and `offset` of a list that takes no other parameter: a 400 naming both when
/// either is out of range.
pub fn page(limit: Option<i64>, offset: Option<i64>) -> Result<(usize, usize), Error> {
    let mut c = Check::default();
    let page = paging(&mut c, limit, offset);
    c.finish(page)
}

/// A listing's `status`: one status or a comma-separated list, without repeats.
pub fn status_list(c: &mut Check, s: &str) -> Vec<crate::model::TaskStatus> {
    let mut statuses = Vec::new();
    if s.trim().is_empty() {
        c.fail("status", "must name at least one status", s);
    }
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match crate::model::TaskStatus::parse(part) {
            Some(st) if !statuses.contains(&st) => statuses.push(st),
            Some(_) => {}
            None => c.fail(
                "status",
                "must be queued, running, completed, failed or cancelled",
                part,
            ),
        }
    }
    statuses
}

/// `limit` and `offset` query parameters.
pub fn paging(c: &mut Check, limit: Option<i64>, offset: Option<i64>) -> (usize, usize) {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(l) if LIMIT.contains(&l) => l as usize,
        Some(l) => {
            c.fail("limit", format!("must be between 1 and {MAX_LIMIT}"), l);
            DEFAULT_LIMIT
        }
    };
    let offset = match offset {
        None => 0,
        Some(o) if o >= 0 => o as usize,
        Some(o) => {
            c.fail("offset", "must be 0 or more", o);
            0
        }
    };
    (limit, offset)
}

//! Write operations: each runs inside one batch of the writer (see `store/mod.rs`).
//!
//! Rule: check first, then change. Every domain error (`NotFound`, `Conflict`, `LeaseLost`,
//! validation) is returned before the first row is written, so a refused operation leaves
//! its batch untouched. Status changes go through the lease state machine in `crate::lease`.

use std::collections::BTreeMap;

use redb::ReadableTable;
use uuid::Uuid;

use super::schema;
use super::tables::{ix, Tables};
use super::WriteCtx;
use crate::error::{Error, FieldError, Result};
use crate::lease::{self, Completion};
use crate::model::{
    render_template, variables_hash, DuplicateHandling, Execution, Progress, Project,
    ProjectConfig, ProjectStatus, Rules, Script, Stats, Task, TaskStatus, TaskType,
};

/// How many due timers (expired leases, delayed tasks) one pass handles, to bound a batch.
pub const TIMER_BATCH: usize = 1000;

/// Finds a project by id, else by unique name. A project being deleted is not found.
pub fn resolve_project(t: &Tables, key: &str) -> Result<Project> {
    let live = |p: Project| (p.status != ProjectStatus::Deleting).then_some(p);
    if let Ok(id) = Uuid::parse_str(key) {
        if let Some(p) = t.project(id.as_u128())?.and_then(live) {
            return Ok(p);
        }
    }
    if let Some(id) = t.project_id_by_name(key)? {
        if let Some(p) = t.project(id)?.and_then(live) {
            return Ok(p);
        }
    }
    Err(Error::NotFound(format!("project {key} not found")))
}

fn task_by_id(t: &Tables, id: &str) -> Result<Task> {
    t.task_by_id(id)?
        .ok_or_else(|| Error::NotFound(format!("task {id} not found")))
}

fn type_by_id(t: &Tables, id: &str) -> Result<TaskType> {
    Uuid::parse_str(id)
        .ok()
        .map(|u| t.task_type(u.as_u128()))
        .transpose()?
        .flatten()
        .ok_or_else(|| Error::NotFound(format!("task type {id} not found")))
}

/// Lease and retry rules for a task, from its type (if it still exists) and project.
fn rules_for(t: &Tables, task: &Task) -> Result<Rules> {
    let project = t
        .project(task.project_id)?
        .ok_or_else(|| Error::Storage(format!("task {} has no project", task.id)))?;
    let ty = match task.type_id {
        Some(id) => t.task_type(id)?,
        None => None,
    };
    Ok(Rules::resolve(&project, ty.as_ref()))
}

// ---------------------------------------------------------------- projects

pub struct NewProject {
    pub name: String,
    pub description: String,
    pub instructions: Option<String>,
    pub config: ProjectConfig,
    pub retention: crate::model::Retention,
}

impl NewProject {
    /// A project with a name only: no description or instructions, the default config.
    pub fn named(name: &str) -> Self {
        NewProject {
            name: name.to_string(),
            description: String::new(),
            instructions: None,
            config: ProjectConfig::default(),
            retention: Default::default(),
        }
    }
}

pub fn create_project(w: &mut WriteCtx, p: NewProject) -> Result<(Project, Stats)> {
    if w.tables.project_id_by_name(&p.name)?.is_some() {
        return Err(Error::Conflict(format!(
            "a project named {} already exists",
            p.name
        )));
    }
    let project = Project {
        id: Uuid::now_v7().as_u128(),
        name: p.name,
        description: p.description,
        instructions: p.instructions,
        status: ProjectStatus::Active,
        config: p.config,
        created_at: w.now,
        updated_at: w.now,
        retention: p.retention,
    };
    w.tables.put_project(&project)?;
    w.tables
        .project_names
        .insert(project.name.as_str(), project.id)?;
    w.tables.put_stats(project.id, Stats::default());
    Ok((project, Stats::default()))
}

#[derive(Default)]
pub struct ProjectPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub instructions: Option<Option<String>>,
    pub status: Option<ProjectStatus>,
    pub default_max_retries: Option<u32>,
    pub default_lease_duration_minutes: Option<u32>,
    pub reaper_interval_minutes: Option<u32>,
    /// Replaces the project's retention override whole.
    pub retention: Option<crate::model::Retention>,
}

pub fn update_project(
    w: &mut WriteCtx,
    key: &str,
    patch: ProjectPatch,
) -> Result<(Project, Stats)> {
    let mut p = resolve_project(w.tables, key)?;
    let old_name = p.name.clone();
    let was_closed = p.status == ProjectStatus::Closed;
    if let Some(name) = &patch.name {
        if *name != p.name && w.tables.project_id_by_name(name)?.is_some() {
            return Err(Error::Conflict(format!(
                "a project named {name} already exists"
            )));
        }
    }
    if let Some(v) = patch.name {
        p.name = v;
    }
    if let Some(v) = patch.description {
        p.description = v;
    }
    if let Some(v) = patch.instructions {
        p.instructions = v;
    }
    if let Some(v) = patch.status {
        p.status = v;
    }
    if let Some(v) = patch.default_max_retries {
        p.config.default_max_retries = v;
    }
    if let Some(v) = patch.default_lease_duration_minutes {
        p.config.default_lease_duration_minutes = v;
    }
    if let Some(v) = patch.reaper_interval_minutes {
        p.config.reaper_interval_minutes = v;
    }
    if let Some(v) = patch.retention {
        p.retention = v;
    }
    p.updated_at = w.now;
    if p.name != old_name {
        w.tables.project_names.remove(old_name.as_str())?;
        w.tables.project_names.insert(p.name.as_str(), p.id)?;
    }
    w.tables.put_project(&p)?;
    let stats = w.tables.stats(p.id)?;
    // A closed project hands out nothing, so its pollers wait; reopened, its queued tasks
    // are available again without any task changing.
    if was_closed && p.status == ProjectStatus::Active && stats.queued > stats.delayed {
        w.wake_all(p.id);
    }
    Ok((p, stats))
}

/// Tasks a project delete removes per write, so that other writes go between its batches
/// (~10 ms each here) instead of waiting for the whole project (a 1M-task project took 4 s
/// in one transaction).
pub const DELETE_CHUNK: usize = 2_000;

/// Deletes up to `limit` of a project's tasks, oldest first, and answers how many
/// ([`super::Store::delete_project`] runs it in chunks before [`finish_project_delete`]).
pub fn delete_project_tasks(w: &mut WriteCtx, project: u128, limit: usize) -> Result<usize> {
    let prefix = ix::K::new(ix::BY_PROJECT).u128(project);
    let keys = w.tables.first_keys(&prefix, limit)?;
    for k in &keys {
        if let Some(task) = w.tables.task(ix::seq_of(k))? {
            w.tables.put_task(Some(&task), None)?;
        }
    }
    Ok(keys.len())
}

/// The first step of a project delete: the project is marked [`ProjectStatus::Deleting`],
/// after which nothing finds it (no reads, claims, creates or updates), and its name is free
/// for a new project. [`finish_project_delete`] ends the delete, after
/// [`delete_project_tasks`] has removed the tasks in chunks. A project already marked is
/// taken up again as it is: its delete was cut short, or is still running.
pub fn begin_project_delete(w: &mut WriteCtx, project: u128) -> Result<()> {
    let Some(mut p) = w.tables.project(project)? else {
        return Err(Error::NotFound(format!(
            "project {} not found",
            Uuid::from_u128(project)
        )));
    };
    if p.status != ProjectStatus::Deleting {
        w.tables.project_names.remove(p.name.as_str())?;
        p.status = ProjectStatus::Deleting;
        p.updated_at = w.now;
        w.tables.put_project(&p)?;
    }
    Ok(())
}

/// Removes a project marked for deletion with its task types and remaining tasks (and so
/// their leases), in one write; answers how many tasks it removed. A project already gone
/// is not an error: the delete is done.
pub fn finish_project_delete(w: &mut WriteCtx, project: u128) -> Result<usize> {
    let Some(p) = w.tables.project(project)? else {
        return Ok(0);
    };
    if p.status != ProjectStatus::Deleting {
        return Err(Error::Storage(format!(
            "project {} is not being deleted",
            Uuid::from_u128(project)
        )));
    }
    let tasks = delete_project_tasks(w, p.id, usize::MAX)?;
    let types: Vec<(String, u128)> = w
        .tables
        .type_names
        .range((p.id, "")..)?
        .map(|r| r.map(|(k, v)| (k.value().0, k.value().1.to_string(), v.value())))
        .take_while(|r| r.as_ref().map_or(true, |(pid, _, _)| *pid == p.id))
        .map(|r| r.map(|(_, n, id)| (n, id)))
        .collect::<Result<_, _>>()?;
    for (name, id) in types {
        w.tables.type_names.remove((p.id, name.as_str()))?;
        w.tables.types.remove(id)?;
    }
    w.tables.drop_counters(p.id)?;
    w.tables.projects.remove(p.id)?;
    Ok(tasks)
}

// ---------------------------------------------------------------- task types

pub struct NewTaskType {
    pub name: String,
    pub template: Option<String>,
    pub variables: Vec<String>,
    pub duplicate_handling: DuplicateHandling,
    pub max_retries: Option<u32>,
    pub lease_duration_minutes: Option<f64>,
    pub retry_delay_seconds: f64,
    pub backoff_multiplier: f64,
    pub script: Option<Script>,
}

pub fn create_type(w: &mut WriteCtx, project_key: &str, n: NewTaskType) -> Result<TaskType> {
    let p = resolve_project(w.tables, project_key)?;
    if w.tables.type_names.get((p.id, n.name.as_str()))?.is_some() {
        return Err(Error::Conflict(format!(
            "a task type named {} already exists in project {}",
            n.name, p.name
        )));
    }
    let ty = TaskType {
        id: Uuid::now_v7().as_u128(),
        project_id: p.id,
        name: n.name,
        template: n.template,
        variables: n.variables,
        duplicate_handling: n.duplicate_handling,
        max_retries: n.max_retries,
        lease_duration_minutes: n.lease_duration_minutes,
        retry_delay_seconds: n.retry_delay_seconds,
        backoff_multiplier: n.backoff_multiplier,
        created_at: w.now,
        updated_at: w.now,
        script: n.script,
    };
    w.tables
        .type_names
        .insert((p.id, ty.name.as_str()), ty.id)?;
    w.tables.put_type(&ty)?;
    Ok(ty)
}

#[derive(Default)]
pub struct TypePatch {
    pub name: Option<String>,
    pub template: Option<Option<String>>,
    pub variables: Option<Vec<String>>,
    pub duplicate_handling: Option<DuplicateHandling>,
    pub max_retries: Option<Option<u32>>,
    pub lease_duration_minutes: Option<Option<f64>>,
    pub retry_delay_seconds: Option<f64>,
    pub backoff_multiplier: Option<f64>,
    pub script: Option<Option<Script>>,
}

pub fn update_type(w: &mut WriteCtx, id: &str, patch: TypePatch) -> Result<TaskType> {
    let mut ty = type_by_id(w.tables, id)?;
    let old_name = ty.name.clone();
    if let Some(name) = &patch.name {
        if *name != ty.name
            && w.tables
                .type_names
                .get((ty.project_id, name.as_str()))?
                .is_some()
        {
            return Err(Error::Conflict(format!(
                "a task type named {name} already exists in this project"
            )));
        }
    }
    if let Some(v) = patch.name {
        ty.name = v;
    }
    if let Some(v) = patch.template {
        ty.template = v;
    }
    if let Some(v) = patch.variables {
        ty.variables = v;
    }
    if let Some(t) = &ty.template {
        let missing: Vec<String> = crate::model::template_placeholders(t)
            .into_iter()
            .filter(|p| !ty.variables.contains(p))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Validation(vec![FieldError::new(
                "template",
                format!(
                    "placeholders not listed in variables: {}",
                    missing.join(", ")
                ),
            )]));
        }
    }
    if let Some(v) = patch.duplicate_handling {
        ty.duplicate_handling = v;
    }
    if let Some(v) = patch.max_retries {
        ty.max_retries = v;
    }
    if let Some(v) = patch.lease_duration_minutes {
        ty.lease_duration_minutes = v;
    }
    if let Some(v) = patch.retry_delay_seconds {
        ty.retry_delay_seconds = v;
    }
    if let Some(v) = patch.backoff_multiplier {
        ty.backoff_multiplier = v;
    }
    if let Some(v) = patch.script {
        ty.script = v;
    }
    ty.updated_at = w.now;
    if ty.name != old_name {
        w.tables
            .type_names
            .remove((ty.project_id, old_name.as_str()))?;
        w.tables
            .type_names
            .insert((ty.project_id, ty.name.as_str()), ty.id)?;
    }
    w.tables.put_type(&ty)?;
    Ok(ty)
}

/// Deletes a task type. Its tasks stay; they keep the type id and fall back to the project's
/// lease and retry defaults.
pub fn delete_type(w: &mut WriteCtx, id: &str) -> Result<()> {
    let ty = type_by_id(w.tables, id)?;
    w.tables
        .type_names
        .remove((ty.project_id, ty.name.as_str()))?;
    w.tables.types.remove(ty.id)?;
    Ok(())
}

// ---------------------------------------------------------------- tasks

/// A task type as a request names it: by id, or by name within the project. A text that
/// parses as a UUID is an id; any other text is a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKey {
    Id(u128),
    Name(String),
}

impl TypeKey {
    pub fn parse(text: &str) -> TypeKey {
        match Uuid::parse_str(text) {
            Ok(id) => TypeKey::Id(id.as_u128()),
            Err(_) => TypeKey::Name(text.to_string()),
        }
    }

    /// Whether `t` is the type this key names.
    fn names(&self, t: &TaskType) -> bool {
        match self {
            TypeKey::Id(id) => t.id == *id,
            TypeKey::Name(name) => t.name == *name,
        }
    }
}

impl std::fmt::Display for TypeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypeKey::Id(id) => write!(f, "{}", Uuid::from_u128(*id)),
            TypeKey::Name(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub id: Option<String>,
    /// The task type: its id, or its name in the project ([`TypeKey`]).
    pub type_key: Option<TypeKey>,
    pub instructions: Option<String>,
    pub variables: BTreeMap<String, String>,
    pub batch_id: Option<String>,
    pub priority: Option<u8>,
    pub not_before: Option<i64>,
    /// Its own script; without one, it takes its type's.
    pub script: Option<Script>,
}

/// Creates tasks in request order. Each entry is the task and whether it is new (false: an
/// existing duplicate returned under `duplicateHandling: ignore`), or why it was refused.
pub fn create_tasks(
    w: &mut WriteCtx,
    project_key: &str,
    tasks: Vec<NewTask>,
) -> Result<Vec<Result<(Task, bool)>>> {
    let p = resolve_project(w.tables, project_key)?;
    if p.status == ProjectStatus::Closed {
        return Err(Error::Conflict(format!(
            "project {} is closed and accepts no new tasks",
            p.name
        )));
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut type_cache: Option<TaskType> = None;
    for n in tasks {
        let r = create_one(w, &p, n, &mut type_cache);
        if let Err(Error::Storage(e)) = r {
            return Err(Error::Storage(e));
        }
        out.push(r);
    }
    Ok(out)
}

fn create_one(
    w: &mut WriteCtx,
    p: &Project,
    mut n: NewTask,
    type_cache: &mut Option<TaskType>,
) -> Result<(Task, bool)> {
    let ty = match &n.type_key {
        None => None,
        Some(key) => Some(type_in(w, p, key, type_cache)?),
    };
    let script = n
        .script
        .take()
        .or_else(|| ty.as_ref().and_then(|t| t.script.clone()));
    let instructions = match (n.instructions.take(), &script) {
        // A script is the work itself: its instructions may be left out.
        (None, Some(_)) if ty.as_ref().is_none_or(|t| t.template.is_none()) => Some(String::new()),
        (given, _) => given,
    };
    let instructions = instructions_for(ty.as_ref(), &n.variables, instructions)?;
    if let Some(id) = &n.id {
        if w.tables.task_ids.get(id.as_str())?.is_some() {
            return Err(Error::Conflict(format!(
                "a task with id {id} already exists"
            )));
        }
    }
    if let Some(ty) = &ty {
        if ty.duplicate_handling != DuplicateHandling::Allow {
            if let Some(existing) = find_duplicate(w.tables, ty.id, &n.variables)? {
                return match ty.duplicate_handling {
                    DuplicateHandling::Ignore => Ok((existing, false)),
                    _ => Err(Error::Conflict(format!(
                        "a task of type {} with the same variables already exists ({})",
                        ty.name, existing.id
                    ))),
                };
            }
        }
    }
    let seq = w.alloc_seq();
    let delayed = n.not_before.is_some_and(|t| t > w.now);
    let task = Task {
        type_id: ty.as_ref().map(|t| t.id),
        instructions,
        script,
        variables: n.variables,
        batch_id: n.batch_id,
        priority: n.priority.unwrap_or(5),
        not_before: n.not_before,
        delayed,
        max_retries: ty
            .as_ref()
            .and_then(|t| t.max_retries)
            .unwrap_or(p.config.default_max_retries),
        ..Task::queued(
            seq,
            n.id.unwrap_or_else(|| crate::ids::task_id().hyphenated().to_string()),
            p.id,
            w.now,
        )
    };
    w.put_task(None, Some(&task))?;
    Ok((task, true))
}

/// The task type `key` names in project `p` (404 if none there), read once per run of tasks
/// of the same type (`cache`).
fn type_in(
    w: &mut WriteCtx,
    p: &Project,
    key: &TypeKey,
    cache: &mut Option<TaskType>,
) -> Result<TaskType> {
    let cached = cache
        .as_ref()
        .is_some_and(|t| t.project_id == p.id && key.names(t));
    if !cached {
        *cache = type_of(w.tables, p.id, key)?;
    }
    match cache {
        Some(t) if t.project_id == p.id => Ok(t.clone()),
        _ => Err(Error::NotFound(format!(
            "task type {key} not found in project {}",
            p.name
        ))),
    }
}

/// The task type `key` names in `project`, if any.
pub fn type_of(t: &Tables, project: u128, key: &TypeKey) -> Result<Option<TaskType>> {
    let id = match key {
        TypeKey::Id(id) => Some(*id),
        TypeKey::Name(name) => t
            .type_names
            .get((project, name.as_str()))?
            .map(|v| v.value()),
    };
    Ok(id
        .map(|id| t.task_type(id))
        .transpose()?
        .flatten()
        .filter(|ty| ty.project_id == project))
}

/// A new task's instructions: its type's template rendered with its variables (every
/// variable the type names is required, 422), or its own instructions.
fn instructions_for(
    ty: Option<&TaskType>,
    variables: &BTreeMap<String, String>,
    instructions: Option<String>,
) -> Result<String> {
    if let Some(ty) = ty {
        let missing: Vec<FieldError> = ty
            .variables
            .iter()
            .filter(|v| !variables.contains_key(*v))
            .map(|v| FieldError::new(format!("variables.{v}"), "required by the task type"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Unprocessable(missing));
        }
    }
    match (ty.and_then(|t| t.template.as_ref()), instructions) {
        (Some(tpl), _) => Ok(render_template(tpl, variables)),
        (None, Some(i)) => Ok(i),
        (None, None) => Err(Error::validation(
            "instructions",
            "required when the task has no type with a template",
        )),
    }
}

fn find_duplicate(
    t: &Tables,
    type_id: u128,
    vars: &BTreeMap<String, String>,
) -> Result<Option<Task>> {
    let prefix = ix::K::new(ix::DUPES)
        .u128(type_id)
        .u128(variables_hash(vars));
    let seqs: Vec<u64> = t.keys(&prefix)?.iter().map(|k| ix::seq_of(k)).collect();
    for seq in seqs {
        if let Some(task) = t.task(seq)? {
            if task.variables == *vars {
                return Ok(Some(task));
            }
        }
    }
    Ok(None)
}

#[derive(Default)]
pub struct TaskPatch {
    pub instructions: Option<String>,
    pub variables: Option<BTreeMap<String, String>>,
    pub priority: Option<u8>,
    pub not_before: Option<Option<i64>>,
    pub batch_id: Option<Option<String>>,
}

/// Updates a queued task. New variables re-render the instructions from the type's template.
pub fn update_task(w: &mut WriteCtx, id: &str, patch: TaskPatch) -> Result<Task> {
    let old = task_by_id(w.tables, id)?;
    if old.status != TaskStatus::Queued {
        return Err(Error::Conflict(format!(
            "only queued tasks can be updated; task {id} is {}",
            old.status.as_str()
        )));
    }
    let mut t = old.clone();
    let ty = match t.type_id {
        Some(id) => w.tables.task_type(id)?,
        None => None,
    };
    if let Some(vars) = patch.variables {
        if let Some(ty) = &ty {
            let missing: Vec<FieldError> = ty
                .variables
                .iter()
                .filter(|v| !vars.contains_key(*v))
                .map(|v| FieldError::new(format!("variables.{v}"), "required by the task type"))
                .collect();
            if !missing.is_empty() {
                return Err(Error::Unprocessable(missing));
            }
        }
        t.variables = vars;
        if let Some(tpl) = ty.as_ref().and_then(|t| t.template.as_ref()) {
            t.instructions = render_template(tpl, &t.variables);
        }
    }
    if let Some(i) = patch.instructions {
        t.instructions = i;
    }
    if let Some(p) = patch.priority {
        t.priority = p;
    }
    if let Some(nb) = patch.not_before {
        t.not_before = nb;
        t.delayed = nb.is_some_and(|x| x > w.now);
    }
    if let Some(b) = patch.batch_id {
        t.batch_id = b;
    }
    t.updated_at = w.now;
    w.put_task(Some(&old), Some(&t))?;
    Ok(t)
}

pub fn delete_task(w: &mut WriteCtx, id: &str) -> Result<()> {
    let old = task_by_id(w.tables, id)?;
    w.put_task(Some(&old), None)
}

/// Deletes up to `limit` of `project`'s tasks in final `status` that ended at or before
/// `cutoff`, oldest first, with their attempts, executions and index entries; counters move
/// with them. Returns how many. Retention and delete by filter call it chunk by chunk.
pub fn delete_ended(
    w: &mut WriteCtx,
    project: u128,
    status: TaskStatus,
    cutoff: crate::model::Millis,
    limit: usize,
) -> Result<usize> {
    let seqs = w.tables.ended_by(project, status.code(), cutoff, limit)?;
    for &seq in &seqs {
        if let Some(old) = w.tables.task(seq)? {
            w.put_task(Some(&old), None)?;
        }
    }
    Ok(seqs.len())
}

/// Deletes the tasks of `ids` that are still in `project` and match `keep`; returns how many.
pub fn delete_matching(
    w: &mut WriteCtx,
    project: u128,
    ids: &[String],
    keep: impl Fn(&Task) -> bool,
) -> Result<usize> {
    let mut n = 0;
    for id in ids {
        if let Some(old) = w.tables.task_by_id(id)? {
            if old.project_id == project && keep(&old) {
                w.put_task(Some(&old), None)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------- the lease protocol

/// The answer of next-task.
pub enum Claim {
    /// A task newly leased (true) or the agent's current one resumed (false).
    Task(Box<Task>, bool),
    None,
}

/// The `check` of an operation whose caller's access was settled before the write.
pub fn no_check<T>(_: &T) -> Result<()> {
    Ok(())
}

/// Resume or lease the best available task: queued, `notBefore` passed, among `type_ids` if
/// given; highest priority first, then oldest. `check` runs on the project as soon as it is
/// found: the caller's access to it, which then costs no read of its own before the write
/// ([`no_check`] when that was settled before).
pub fn next_task(
    w: &mut WriteCtx,
    project_key: &str,
    agent: &str,
    type_ids: Option<&[u128]>,
    check: impl FnOnce(&Project) -> Result<()>,
) -> Result<Claim> {
    let p = resolve_project(w.tables, project_key)?;
    check(&p)?;
    claim_in(w, &p, agent, type_ids)
}

/// next-task's work once the project is found and the caller may work in it.
fn claim_in(
    w: &mut WriteCtx,
    p: &Project,
    agent: &str,
    type_ids: Option<&[u128]>,
) -> Result<Claim> {
    if let Some(seq) = w.tables.leases.held(p.id, agent) {
        if let Some(task) = w.tables.task(seq)? {
            return Ok(Claim::Task(Box::new(task), false));
        }
    }
    if p.status == ProjectStatus::Closed {
        return Ok(Claim::None);
    }
    promote_due(w, TIMER_BATCH)?;
    let best: Option<u64> = match type_ids {
        None => w
            .tables
            .first_key(&ix::K::new(ix::READY).u128(p.id))?
            .map(|k| ix::seq_of(&k)),
        Some(ids) => {
            // Keys of one project and kind order by (10 - priority, seq): the smallest key
            // over the listed types is the best task.
            let mut best: Option<Vec<u8>> = None;
            for &ty in ids {
                let prefix = ix::K::new(ix::READY_TYPE).u128(p.id).u128(ty);
                if let Some(k) = w.tables.first_key(&prefix)? {
                    let rank = k[prefix.len()..].to_vec();
                    if best.as_ref().is_none_or(|b| rank < *b) {
                        best = Some(rank);
                    }
                }
            }
            best.map(|r| ix::seq_of(&r))
        }
    };
    let Some(seq) = best else {
        return Ok(Claim::None);
    };
    let old = w
        .tables
        .task(seq)?
        .ok_or_else(|| Error::Storage(format!("ready index names missing task seq {seq}")))?;
    let ty = match old.type_id {
        Some(id) => w.tables.task_type(id)?,
        None => None,
    };
    let rules = Rules::resolve(p, ty.as_ref());
    let mut task = old.clone();
    lease::claim(&mut task, agent, crate::ids::lease_random(), &rules, w.now);
    w.put_task(Some(&old), Some(&task))?;
    Ok(Claim::Task(Box::new(task), true))
}

/// What [`complete`] takes: the task, the lease it was held under, and its results.
#[derive(Default)]
pub struct Done {
    pub id: String,
    pub token: Option<u128>,
    pub result: Option<String>,
    pub outputs: Option<String>,
    pub execution: Option<Execution>,
}

impl Done {
    /// A complete of task `id` with no result, under whatever lease the agent holds.
    pub fn new(id: &str) -> Self {
        Done {
            id: id.to_string(),
            ..Done::default()
        }
    }
}

/// What [`fail`] takes: the task, the lease it was held under, and why it failed.
pub struct Failed {
    pub id: String,
    pub token: Option<u128>,
    pub error: String,
    /// False: no retry, whatever retries remain.
    pub can_retry: bool,
    pub execution: Option<Execution>,
}

/// next-task, with next-task's `complete`: when `done` is given, completes it for `agent`
/// first, in the same write (one round trip and one commit share per agent cycle instead of
/// two), then resumes or leases the agent's next task in `project_key`. The project and
/// `check` (the caller's access to it) are settled before the complete, because a refusal
/// must come before an operation's first write: once the complete is written, only a storage
/// error (which fails the whole batch) can stop the claim.
pub fn next_task_after<F: FnOnce(&Task) -> Result<()>>(
    w: &mut WriteCtx,
    done: Option<(Done, F)>,
    project_key: &str,
    agent: &str,
    type_ids: Option<&[u128]>,
    check: impl FnOnce(&Project) -> Result<()>,
) -> Result<Claim> {
    let Some((done, check_done)) = done else {
        return next_task(w, project_key, agent, type_ids, check);
    };
    let p = resolve_project(w.tables, project_key)?;
    check(&p)?;
    complete(w, done, agent, check_done)?;
    claim_in(w, &p, agent, type_ids)
}

/// Loads a task for a holder operation, runs `check` on it before anything else (a scoped
/// caller's access, see [`next_task`]), applies `f`, writes it back.
fn holder_op<T>(
    w: &mut WriteCtx,
    id: &str,
    needs_rules: bool,
    execution: Option<Execution>,
    check: impl FnOnce(&Task) -> Result<()>,
    f: impl FnOnce(&mut Task, &Rules, i64) -> Result<T>,
) -> Result<(Task, T)> {
    let old = task_by_id(w.tables, id)?;
    check(&old)?;
    apply(w, old, needs_rules, execution, f)
}

/// Applies `f` to task `old` (already loaded and checked) and writes it back, with the
/// `execution` of the attempt it ended, if any.
fn apply<T>(
    w: &mut WriteCtx,
    old: Task,
    needs_rules: bool,
    execution: Option<Execution>,
    f: impl FnOnce(&mut Task, &Rules, i64) -> Result<T>,
) -> Result<(Task, T)> {
    // Only fail needs the back-off rules: the others skip reading the project and type.
    let rules = if needs_rules {
        rules_for(w.tables, &old)?
    } else {
        Rules {
            lease_ms: 0,
            retry_delay_seconds: 0.0,
            backoff_multiplier: 1.0,
        }
    };
    let mut task = old.clone();
    let out = f(&mut task, &rules, w.now)?;
    if task != old {
        w.put_task(Some(&old), Some(&task))?;
        // The attempt this operation ended (a repeat changes nothing and keeps the first).
        if let (Some(e), Some(a)) = (execution, old.attempts.last()) {
            w.tables
                .executions
                .insert((task.seq, a.attempt), schema::encode(&e)?.as_slice())?;
        }
    }
    Ok((task, out))
}

/// Completes a task for its lease holder. `check` runs on the task as soon as it is found,
/// before anything changes, as for [`next_task`]; the same for the other holder operations.
pub fn complete(
    w: &mut WriteCtx,
    d: Done,
    agent: &str,
    check: impl FnOnce(&Task) -> Result<()>,
) -> Result<(Task, Completion)> {
    holder_op(w, &d.id, false, d.execution, check, |t, _, now| {
        Ok(lease::complete(
            t, agent, d.token, d.result, d.outputs, now,
        )?)
    })
}

pub fn fail(
    w: &mut WriteCtx,
    f: Failed,
    agent: &str,
    check: impl FnOnce(&Task) -> Result<()>,
) -> Result<(Task, bool)> {
    holder_op(w, &f.id, true, f.execution, check, |t, rules, now| {
        Ok(lease::fail(
            t,
            agent,
            f.token,
            f.error,
            f.can_retry,
            rules,
            now,
        )?)
    })
}

pub fn extend(
    w: &mut WriteCtx,
    id: &str,
    agent: &str,
    token: Option<u128>,
    ms: i64,
    check: impl FnOnce(&Task) -> Result<()>,
) -> Result<Task> {
    holder_op(w, id, false, None, check, |t, _, now| {
        Ok(lease::extend(t, agent, token, ms, now)?)
    })
    .map(|r| r.0)
}

pub fn progress(
    w: &mut WriteCtx,
    id: &str,
    agent: &str,
    token: Option<u128>,
    p: Progress,
    check: impl FnOnce(&Task) -> Result<()>,
) -> Result<Task> {
    holder_op(w, id, false, None, check, |t, _, now| {
        Ok(lease::progress(t, agent, token, p, now)?)
    })
    .map(|r| r.0)
}

/// Cancels a queued or running task; `check` runs on it first, as for [`complete`].
pub fn cancel(
    w: &mut WriteCtx,
    id: &str,
    reason: Option<String>,
    check: impl FnOnce(&Task) -> Result<()>,
) -> Result<Task> {
    holder_op(w, id, false, None, check, |t, _, now| {
        Ok(lease::cancel(t, reason, now)?)
    })
    .map(|r| r.0)
}

/// Requeues a failed or cancelled task of an open project; `check` runs on it first.
pub fn retry(w: &mut WriteCtx, id: &str, check: impl FnOnce(&Task) -> Result<()>) -> Result<Task> {
    let old = task_by_id(w.tables, id)?;
    check(&old)?;
    if let Some(p) = w.tables.project(old.project_id)? {
        if p.status == ProjectStatus::Closed {
            return Err(Error::Conflict(format!(
                "project {} is closed; its tasks cannot be retried",
                p.name
            )));
        }
    }
    apply(w, old, false, None, |t, _, now| Ok(lease::retry(t, now)?)).map(|r| r.0)
}

/// What a bulk cancel or retry does to each task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAction {
    Cancel,
    Retry,
}

/// Cancels or retries each task of `ids` that is in `project`, in request order. Each entry
/// is the task's id and, when it was not changed, why (not found in the project, or not in a
/// state the action applies to). A storage error fails the whole write.
pub fn bulk_action(
    w: &mut WriteCtx,
    project: u128,
    ids: &[String],
    action: BulkAction,
    reason: Option<&str>,
) -> Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let in_project = |t: &Task| match t.project_id == project {
            true => Ok(()),
            false => Err(Error::NotFound(format!(
                "task {id} not found in this project"
            ))),
        };
        let r = match action {
            BulkAction::Cancel => cancel(w, id, reason.map(String::from), in_project),
            BulkAction::Retry => retry(w, id, in_project),
        };
        match r {
            Ok(_) => out.push((id.clone(), None)),
            Err(Error::Storage(e)) => return Err(Error::Storage(e)),
            Err(e) => out.push((id.clone(), Some(e.to_string()))),
        }
    }
    Ok(out)
}

/// Moves up to `limit` delayed tasks whose time has come into the ready indexes.
pub fn promote_due(w: &mut WriteCtx, limit: usize) -> Result<usize> {
    if !w.delayed_may_be_due() {
        return Ok(0);
    }
    let due = w.tables.due(ix::DELAYED, w.now, limit)?;
    let n = due.len();
    for seq in due {
        if let Some(old) = w.tables.task(seq)? {
            let mut t = old.clone();
            if lease::promote(&mut t, w.now) {
                w.put_task(Some(&old), Some(&t))?;
            }
        }
    }
    let next = w.tables.first_key(&[ix::DELAYED])?;
    w.set_delayed_from(next.map(|k| ix::i64_at(&k, 1)));
    Ok(n)
}

/// A reclaimed lease, for the reaper's log.
pub struct Reclaimed {
    pub task_id: String,
    pub project_id: u128,
    pub agent: String,
    pub will_retry: bool,
}

/// Reclaims up to `limit` expired leases, optionally of one project only.
pub fn reclaim_expired(
    w: &mut WriteCtx,
    project: Option<u128>,
    limit: usize,
) -> Result<Vec<Reclaimed>> {
    let cap = if project.is_none() { limit } else { usize::MAX };
    let expired = w.tables.leases.due(cap);
    let mut out = Vec::new();
    for seq in expired {
        let Some(old) = w.tables.task(seq)? else {
            continue;
        };
        if project.is_some_and(|p| p != old.project_id) {
            continue;
        }
        let rules = rules_for(w.tables, &old)?;
        let mut t = old.clone();
        let agent = old
            .lease
            .as_ref()
            .map(|l| l.agent.clone())
            .unwrap_or_default();
        if let Some(will_retry) = lease::reclaim(&mut t, &rules, w.now) {
            w.put_task(Some(&old), Some(&t))?;
            out.push(Reclaimed {
                task_id: t.id.clone(),
                project_id: t.project_id,
                agent,
                will_retry,
            });
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// `cleanup-leases`: reclaim every expired lease of one project now.
pub fn cleanup_leases(w: &mut WriteCtx, project_key: &str) -> Result<(usize, usize)> {
    let p = resolve_project(w.tables, project_key)?;
    let done = reclaim_expired(w, Some(p.id), usize::MAX)?;
    let mut agents: Vec<&str> = done.iter().map(|r| r.agent.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    Ok((done.len(), agents.len()))
}

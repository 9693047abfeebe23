//! The domain: projects, task types, tasks and their attempts, as stored.
//!
//! These are plain data with serde derives for the row encoding (postcard). They know nothing
//! of HTTP or JSON field names (the API layer maps them) and nothing of redb (the store keys
//! them). Times are Unix milliseconds ([`Millis`]) so that index keys sort by time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Unix time in milliseconds, UTC.
pub type Millis = i64;

/// A project: the unit of scoping for task types, tasks, leases and counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Project {
    pub id: u128,
    pub name: String,
    pub description: String,
    pub instructions: Option<String>,
    pub status: ProjectStatus,
    pub config: ProjectConfig,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// How long its finished tasks are kept (schema 6 on; the last field, so the migration
    /// appends it to older rows).
    pub retention: Retention,
}

/// A project's retention override, per final status, in seconds: `None` = the server's
/// default (`--retain-completed` ...), `Some(0)` = keep forever.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Retention {
    pub completed: Option<u64>,
    pub failed: Option<u64>,
    pub cancelled: Option<u64>,
}

impl Retention {
    /// The override for a final status (None for the others, which are never pruned).
    pub fn of(&self, status: TaskStatus) -> Option<u64> {
        match status {
            TaskStatus::Completed => self.completed,
            TaskStatus::Failed => self.failed,
            TaskStatus::Cancelled => self.cancelled,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ProjectStatus {
    Active,
    Closed,
    /// Being deleted: its tasks are removed in chunks. Nothing finds such a project; it is
    /// never shown (see `Store::delete_project`). Stored last so older rows keep their code.
    Deleting,
}

impl ProjectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectStatus::Active => "active",
            ProjectStatus::Closed => "closed",
            ProjectStatus::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProjectConfig {
    pub default_max_retries: u32,
    pub default_lease_duration_minutes: u32,
    pub reaper_interval_minutes: u32,
}

impl Default for ProjectConfig {
    fn default() -> Self {
        ProjectConfig {
            default_max_retries: 3,
            default_lease_duration_minutes: 10,
            reaper_interval_minutes: 1,
        }
    }
}

/// Exact per-project counters, updated in the same write transaction as the task they count.
///
/// Invariant: `total == queued + running + completed + failed + cancelled`, and each field
/// equals the number of task rows of the project in that status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub total: u64,
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Queued tasks waiting for their `notBefore` (internal: peek subtracts them).
    pub delayed: u64,
}

impl Stats {
    pub fn get(&self, status: TaskStatus) -> u64 {
        match status {
            TaskStatus::Queued => self.queued,
            TaskStatus::Running => self.running,
            TaskStatus::Completed => self.completed,
            TaskStatus::Failed => self.failed,
            TaskStatus::Cancelled => self.cancelled,
        }
    }

    fn slot(&mut self, status: TaskStatus) -> &mut u64 {
        match status {
            TaskStatus::Queued => &mut self.queued,
            TaskStatus::Running => &mut self.running,
            TaskStatus::Completed => &mut self.completed,
            TaskStatus::Failed => &mut self.failed,
            TaskStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// Applies one task's move from `old` to `new` (None = absent; the flag = delayed).
    pub fn apply(&mut self, old: Option<(TaskStatus, bool)>, new: Option<(TaskStatus, bool)>) {
        if let Some((s, d)) = old {
            *self.slot(s) = self.slot(s).saturating_sub(1);
            self.total = self.total.saturating_sub(1);
            self.delayed = self.delayed.saturating_sub(d as u64);
        }
        if let Some((s, d)) = new {
            *self.slot(s) += 1;
            self.total += 1;
            self.delayed += d as u64;
        }
    }

    pub fn to_bytes(self) -> [u8; 56] {
        u64s_to_bytes([
            self.total,
            self.queued,
            self.running,
            self.completed,
            self.failed,
            self.cancelled,
            self.delayed,
        ])
    }

    pub fn from_bytes(b: &[u8]) -> Stats {
        let [total, queued, running, completed, failed, cancelled, delayed] = u64s_from_bytes(b);
        Stats {
            total,
            queued,
            running,
            completed,
            failed,
            cancelled,
            delayed,
        }
    }
}

/// What a project's tasks did in one minute: tasks that ended `completed` or `failed` then,
/// and the summed run time (start of the last attempt to completion) of the completed ones.
/// Kept per minute so that "the last hour" is 60 small rows, whatever the traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    pub completed: u64,
    pub failed: u64,
    pub completed_run_ms: u64,
}

impl Activity {
    /// The activity of one task's move from `old` to `new`, and the minute it belongs to;
    /// `None` when the move neither completed nor finally failed the task.
    pub fn of(old: Option<&Task>, new: Option<&Task>) -> Option<(i64, Activity)> {
        let new = new?;
        if old.is_some_and(|o| o.status == new.status) {
            return None;
        }
        let at = new.completed_at.unwrap_or(new.updated_at);
        let activity = match new.status {
            TaskStatus::Completed => Activity {
                completed: 1,
                completed_run_ms: at.saturating_sub(new.started_at.unwrap_or(at)).max(0) as u64,
                ..Activity::default()
            },
            TaskStatus::Failed => Activity {
                failed: 1,
                ..Activity::default()
            },
            _ => return None,
        };
        Some((at.div_euclid(60_000), activity))
    }

    pub fn add(&mut self, other: Activity) {
        self.completed += other.completed;
        self.failed += other.failed;
        self.completed_run_ms += other.completed_run_ms;
    }

    pub fn to_bytes(self) -> [u8; 24] {
        u64s_to_bytes([self.completed, self.failed, self.completed_run_ms])
    }

    pub fn from_bytes(b: &[u8]) -> Activity {
        let [completed, failed, completed_run_ms] = u64s_from_bytes(b);
        Activity {
            completed,
            failed,
            completed_run_ms,
        }
    }
}

/// `N` little-endian u64s, as the fixed-width counter rows store them.
fn u64s_to_bytes<const N: usize, const B: usize>(values: [u64; N]) -> [u8; B] {
    const { assert!(B == N * 8) };
    let mut out = [0u8; B];
    for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The inverse of [`u64s_to_bytes`]; a short row reads as zeros past its end.
fn u64s_from_bytes<const N: usize>(b: &[u8]) -> [u64; N] {
    std::array::from_fn(|i| {
        b.get(i * 8..i * 8 + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    })
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DuplicateHandling {
    Allow,
    Ignore,
    Fail,
}

impl DuplicateHandling {
    pub fn as_str(self) -> &'static str {
        match self {
            DuplicateHandling::Allow => "allow",
            DuplicateHandling::Ignore => "ignore",
            DuplicateHandling::Fail => "fail",
        }
    }
}

/// A task type: a template, its variables, and the lease and retry rules of its tasks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskType {
    pub id: u128,
    pub project_id: u128,
    pub name: String,
    pub template: Option<String>,
    pub variables: Vec<String>,
    pub duplicate_handling: DuplicateHandling,
    pub max_retries: Option<u32>,
    pub lease_duration_minutes: Option<f64>,
    pub retry_delay_seconds: f64,
    pub backoff_multiplier: f64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The script its tasks inherit when they carry none of their own. Last, so that a row
    /// of schema 4 becomes one of schema 5 by a `None` appended (see `store::tables`).
    pub script: Option<Script>,
}

/// A script a worker started with `--scripts` runs for a task (seed 000).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Script {
    pub kind: ScriptKind,
    pub content: String,
    /// Run no longer than this; None = no limit but the worker's own `--timeout`.
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ScriptKind {
    Bash,
    Python,
}

impl ScriptKind {
    pub const ALL: [ScriptKind; 2] = [ScriptKind::Bash, ScriptKind::Python];

    pub fn as_str(self) -> &'static str {
        match self {
            ScriptKind::Bash => "bash",
            ScriptKind::Python => "python",
        }
    }

    pub fn parse(s: &str) -> Option<ScriptKind> {
        ScriptKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// How one attempt's process ran, as the worker that ran it reports it with its complete or
/// fail. Kept apart from the task row (`store::schema::EXECUTIONS`), one per attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Execution {
    pub exit_code: i32,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub duration_ms: u64,
}

/// Lease and retry rules in effect for one task, resolved from its type and project.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub lease_ms: i64,
    pub retry_delay_seconds: f64,
    pub backoff_multiplier: f64,
}

impl Rules {
    pub fn resolve(project: &Project, task_type: Option<&TaskType>) -> Rules {
        let minutes = task_type
            .and_then(|t| t.lease_duration_minutes)
            .unwrap_or(project.config.default_lease_duration_minutes as f64);
        Rules {
            lease_ms: (minutes * 60_000.0).round() as i64,
            retry_delay_seconds: task_type.map_or(0.0, |t| t.retry_delay_seconds),
            backoff_multiplier: task_type.map_or(2.0, |t| t.backoff_multiplier),
        }
    }

    /// Delay before the `n`-th retry (n ≥ 1): `retryDelaySeconds * multiplier^(n-1)`.
    pub fn backoff_ms(&self, n: u32) -> i64 {
        let exp = n.saturating_sub(1).min(64) as i32;
        let secs = self.retry_delay_seconds * self.backoff_multiplier.powi(exp);
        // Capped at 30 days so that a large multiplier cannot overflow the clock.
        (secs * 1000.0).clamp(0.0, 30.0 * 86_400_000.0) as i64
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Stable one-byte code used in index keys. Never renumber: it is on disk.
    pub fn code(self) -> u8 {
        match self {
            TaskStatus::Queued => 0,
            TaskStatus::Running => 1,
            TaskStatus::Completed => 2,
            TaskStatus::Failed => 3,
            TaskStatus::Cancelled => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Completed,
    Failed,
    Timeout,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One lease of a task, kept in the task's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub attempt: u32,
    pub agent_name: String,
    pub started_at: Millis,
    pub ended_at: Option<Millis>,
    pub outcome: Outcome,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub current: i64,
    pub total: i64,
    pub message: Option<String>,
}

/// The lease a running task is held under.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    pub agent: String,
    pub token: u128,
    pub assigned_at: Millis,
    pub expires_at: Millis,
}

/// A task. `seq` is the internal key: assigned in creation order, so it is also the FIFO
/// order within a priority.
///
/// Its serialized form is the task's row, which leaves out the body (`instructions` and
/// `variables`): the store keeps the body apart, written when the task is created or its body
/// changes, so that a lease transition rewrites only the small row (see
/// `store::tables::TASK_BODIES`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub seq: u64,
    pub id: String,
    pub project_id: u128,
    pub type_id: Option<u128>,
    #[serde(skip)]
    pub instructions: String,
    #[serde(skip)]
    pub variables: BTreeMap<String, String>,
    /// Its own script or the one its type had when it was created; kept in the body too.
    #[serde(skip)]
    pub script: Option<Script>,
    pub batch_id: Option<String>,
    pub priority: u8,
    pub not_before: Option<Millis>,
    /// True while the task is queued but waiting for `not_before` (it sits in the delayed
    /// index, not the ready indexes). Cleared when the scheduler promotes it.
    pub delayed: bool,
    pub status: TaskStatus,
    pub lease: Option<Lease>,
    pub retry_count: u32,
    pub max_retries: u32,
    pub result: Option<String>,
    /// The `outputs` JSON object, kept as its serialized text.
    pub outputs: Option<String>,
    pub error: Option<String>,
    pub progress: Option<Progress>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub cancelled_at: Option<Millis>,
    pub cancel_reason: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub attempts: Vec<Attempt>,
}

/// What a key may do. Each role grants a fixed set of [`crate::auth::Right`]s.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Role {
    Admin,
    Producer,
    Agent,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Producer => "producer",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Admin, Role::Producer, Role::Agent, Role::Viewer]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// An API key. The secret itself is never stored: `hash` is its argon2id PHC string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKey {
    pub id: u128,
    pub name: String,
    pub role: Role,
    /// Projects the key is limited to; None = all.
    pub projects: Option<Vec<u128>>,
    pub hash: String,
    pub created_at: Millis,
    pub last_used_at: Option<Millis>,
    /// Whether a non-admin key may create tasks and task types that carry a script. Last, so
    /// that a row of schema 4 becomes one of schema 5 by a `false` appended.
    pub allow_scripts: bool,
}

/// A login session: bound to one agent name and one project, with its key's rights.
/// Stored under a hash of its token; the token itself is never stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Session {
    pub id: u128,
    pub key_id: u128,
    /// The agent the session acts as; empty for a key-scoped session (see [`Session::scope`]).
    pub agent_name: String,
    /// The project the session is bound to; 0 for a key-scoped session.
    pub project_id: u128,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub last_activity: Millis,
}

impl Session {
    /// Whether the session has not yet expired at `now`.
    pub fn live_at(&self, now: Millis) -> bool {
        self.expires_at > now
    }

    /// The agent and project the session is bound to, or None for a key-scoped session
    /// (a login without either, as the dashboard makes): its rights are exactly its key's.
    /// No project has id 0 and no agent name is empty, so the row needs no field of its own.
    pub fn scope(&self) -> Option<(&str, u128)> {
        (self.project_id != 0).then_some((self.agent_name.as_str(), self.project_id))
    }
}

impl Task {
    /// When a finished task ended: its completion, its cancel, or its final failure (its last
    /// change). None while it is queued or running.
    pub fn ended_at(&self) -> Option<Millis> {
        match self.status {
            TaskStatus::Completed => Some(self.completed_at.unwrap_or(self.updated_at)),
            TaskStatus::Cancelled => Some(self.cancelled_at.unwrap_or(self.updated_at)),
            TaskStatus::Failed => Some(self.updated_at),
            TaskStatus::Queued | TaskStatus::Running => None,
        }
    }

    /// Since when a queued task has been waiting for an agent: its last change (it was
    /// queued, requeued or edited then) or its `notBefore`, whichever is later.
    pub fn ready_since(&self) -> Millis {
        self.updated_at.max(self.not_before.unwrap_or(Millis::MIN))
    }

    /// A new queued task with no history: what creation stores before the fields a request
    /// sets (type, instructions, variables, batch, priority, `notBefore`, retries).
    pub fn queued(seq: u64, id: String, project_id: u128, now: Millis) -> Task {
        Task {
            seq,
            id,
            project_id,
            type_id: None,
            instructions: String::new(),
            variables: BTreeMap::new(),
            script: None,
            batch_id: None,
            priority: 5,
            not_before: None,
            delayed: false,
            status: TaskStatus::Queued,
            lease: None,
            retry_count: 0,
            max_retries: 0,
            result: None,
            outputs: None,
            error: None,
            progress: None,
            started_at: None,
            completed_at: None,
            cancelled_at: None,
            cancel_reason: None,
            created_at: now,
            updated_at: now,
            attempts: Vec::new(),
        }
    }
}

/// Renders a template: every `{{name}}` is replaced by the variable's value. Placeholders
/// without a value are left as they are (creation has already checked they all have one).
pub fn render_template(template: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = after[..end].trim();
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The placeholder names used in a template, in order of first use.
pub fn template_placeholders(template: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].trim().to_string();
        if !names.contains(&name) {
            names.push(name);
        }
        rest = &after[end + 2..];
    }
    names
}

/// A 128-bit FNV-1a hash of the canonical (key-sorted) variables: the duplicate-detection key.
/// Hits are confirmed by comparing the variables themselves, so a collision cannot merge tasks.
pub fn variables_hash(vars: &BTreeMap<String, String>) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u128;
            h = h.wrapping_mul(PRIME);
        }
    };
    for (k, v) in vars {
        feed(&(k.len() as u64).to_le_bytes());
        feed(k.as_bytes());
        feed(&(v.len() as u64).to_le_bytes());
        feed(v.as_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn template_renders_every_placeholder() {
        let v = vars(&[("a", "1"), ("b", "two")]);
        assert_eq!(
            render_template("x {{a}} y {{ b }} {{a}}", &v),
            "x 1 y two 1"
        );
        assert_eq!(render_template("no vars", &v), "no vars");
        assert_eq!(render_template("open {{a", &v), "open {{a");
    }

    #[test]
    fn placeholders_are_listed_once() {
        assert_eq!(template_placeholders("{{a}} {{b}} {{a}}"), vec!["a", "b"]);
    }

    #[test]
    fn variables_hash_ignores_insertion_order() {
        let mut a = BTreeMap::new();
        a.insert("x".to_string(), "1".to_string());
        a.insert("y".to_string(), "2".to_string());
        let mut b = BTreeMap::new();
        b.insert("y".to_string(), "2".to_string());
        b.insert("x".to_string(), "1".to_string());
        assert_eq!(variables_hash(&a), variables_hash(&b));
        assert_ne!(variables_hash(&a), variables_hash(&vars(&[("x", "12")])));
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert_ne!(
            variables_hash(&vars(&[("ab", "c")])),
            variables_hash(&vars(&[("a", "bc")]))
        );
    }

    #[test]
    fn stats_round_trip_and_apply() {
        let mut s = Stats::default();
        s.apply(None, Some((TaskStatus::Queued, true)));
        s.apply(
            Some((TaskStatus::Queued, true)),
            Some((TaskStatus::Running, false)),
        );
        assert_eq!(s.delayed, 0);
        assert_eq!(s.total, 1);
        assert_eq!(s.running, 1);
        assert_eq!(Stats::from_bytes(&s.to_bytes()), s);
    }

    #[test]
    fn backoff_grows_geometrically() {
        let r = Rules {
            lease_ms: 1000,
            retry_delay_seconds: 2.0,
            backoff_multiplier: 3.0,
        };
        assert_eq!(r.backoff_ms(1), 2000);
        assert_eq!(r.backoff_ms(2), 6000);
        assert_eq!(r.backoff_ms(3), 18000);
    }
}

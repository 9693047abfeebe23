//! The verb table: every operation a person or a model may ask of a running agentq, declared
//! once. Each verb has its words on the command line (`agentq project create`), its MCP tool
//! name (TaskDriver's), a line of help and a description for a model, its REST route, and
//! each parameter's place in the request (path, query, body) and kind (how its text becomes
//! JSON). The CLI (`cli`) and the MCP tools (`mcp`) are built from it, so that a command, its
//! tool and its REST operation never drift.

use crate::client::Method;

/// Where a parameter goes in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// A `{name}` of the route.
    Path,
    /// A query parameter.
    Query,
    /// A field of the JSON body.
    Body,
    /// Not sent: used by the client itself (the project in which a type's name is looked up,
    /// for the routes that take a type's id).
    Local,
}

/// How a parameter's text becomes JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// Text, or `@FILE` for a file's contents.
    TextOrFile,
    Int,
    Float,
    /// A flag: true when given.
    Flag,
    /// A flag that sends `false` when given (`--no-retry` → `canRetry: false`).
    FlagFalse,
    /// JSON text.
    Json,
    /// Repeatable: a JSON array of texts.
    List,
    /// Comma-separated, as the server takes it (`--status queued,running`).
    Csv,
    /// Repeatable `NAME=VALUE`: a JSON object.
    Vars,
    /// An RFC 3339 time, or `+<n>[smhd]` from now.
    Time,
    /// A duration `<n>[smhd]`, sent as whole seconds.
    Seconds,
    /// A duration `<n>[smhd]`, sent as the RFC 3339 time that long ago (an MCP client sends
    /// the time itself).
    Ago,
}

/// One parameter of a verb.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// The CLI name (a positional's value name, or a `--flag`).
    pub name: &'static str,
    /// The JSON field, query parameter or route placeholder. A body field may be dotted
    /// (`script.content`): a field of an object field.
    pub field: &'static str,
    pub at: At,
    pub kind: Kind,
    pub positional: bool,
    pub required: bool,
    /// Sent when the parameter is not given.
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// How a verb's answer prints for a person.
#[derive(Clone, Copy, Debug)]
pub enum Show {
    /// The fields of one object.
    Fields,
    /// A table with these columns (JSON fields of each item).
    Table(&'static [&'static str]),
    /// A one-line confirmation.
    Done(&'static str),
}

/// One verb: its words on the command line, its MCP tool name, its REST operation.
#[derive(Clone, Copy, Debug)]
pub struct Verb {
    /// Its words on the command line; none for a tool with no verb of its own.
    pub words: &'static [&'static str],
    pub tool: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// The MCP tool's description: what it is for and when to call it, for a model.
    pub model: &'static str,
    pub method: Method,
    pub route: &'static str,
    pub params: &'static [Param],
    pub show: Show,
}

const fn pos(name: &'static str, field: &'static str, at: At, help: &'static str) -> Param {
    Param {
        name,
        field,
        at,
        kind: Kind::Text,
        positional: true,
        required: true,
        default: None,
        help,
    }
}

const fn opt(name: &'static str, field: &'static str, kind: Kind, help: &'static str) -> Param {
    Param {
        name,
        field,
        at: At::Body,
        kind,
        positional: false,
        required: false,
        default: None,
        help,
    }
}

const fn query(name: &'static str, field: &'static str, kind: Kind, help: &'static str) -> Param {
    Param {
        at: At::Query,
        ..opt(name, field, kind, help)
    }
}

const fn needed(p: Param) -> Param {
    Param {
        required: true,
        ..p
    }
}

const PROJECT: Param = pos("PROJECT", "project", At::Path, "Project name or id");
/// The project of a task type named by name (its routes take the type's id).
const TYPE_PROJECT: Param = pos("PROJECT", "project", At::Local, "Project name or id");
const TASK: Param = pos("ID", "task", At::Path, "Task id");
const TYPE: Param = pos("TYPE", "type", At::Path, "Task type name or id");
const AGENT: Param = needed(opt("agent", "agentName", Kind::Text, "Agent name"));
const TOKEN: Param = opt("token", "leaseToken", Kind::Text, "Lease token of the task");
const LIMIT: Param = query("limit", "limit", Kind::Int, "At most this many (1-1000)");

// A task type's rules, as create and update take them.
const TEMPLATE: Param = opt(
    "template",
    "template",
    Kind::TextOrFile,
    "Instructions template with {{variables}} (TEXT or @FILE)",
);
const VARIABLE: Param = opt(
    "var",
    "variables",
    Kind::List,
    "A variable tasks must give (repeatable)",
);
const MAX_RETRIES: Param = opt(
    "max-retries",
    "maxRetries",
    Kind::Int,
    "Retries after a failure (0-10)",
);
const LEASE_MINUTES: Param = opt(
    "lease-minutes",
    "leaseDurationMinutes",
    Kind::Float,
    "Lease length in minutes",
);
const DUPLICATES: Param = opt(
    "duplicates",
    "duplicateHandling",
    Kind::Text,
    "allow, ignore or fail",
);
const RETRY_DELAY: Param = opt(
    "retry-delay",
    "retryDelaySeconds",
    Kind::Float,
    "Seconds before a retry",
);
const BACKOFF: Param = opt(
    "backoff",
    "backoffMultiplier",
    Kind::Float,
    "Multiplier of the delay per retry",
);

// A script for `agentq work --scripts`, on tasks and task types.
const SCRIPT: Param = opt(
    "script",
    "script.content",
    Kind::TextOrFile,
    "A script for `agentq work --scripts` (TEXT or @FILE)",
);
const SCRIPT_TYPE: Param = opt(
    "script-type",
    "script.type",
    Kind::Text,
    "bash or python (default: python for a .py file, else bash)",
);
const SCRIPT_TIMEOUT: Param = opt(
    "timeout",
    "script.timeoutSeconds",
    Kind::Seconds,
    "Stop the script after this long, <n>[smhd] (1s-1h)",
);

// The listing's filters, as a bulk cancel or retry takes them.
const FILTER_STATUS: Param = opt(
    "status",
    "filter.status",
    Kind::Csv,
    "Statuses, comma-separated",
);
const FILTER_TYPE: Param = opt("type", "filter.typeId", Kind::Text, "Task type name or id");
const FILTER_AGENT: Param = opt(
    "agent",
    "filter.assignedTo",
    Kind::Text,
    "Agent holding the task",
);
const FILTER_BATCH: Param = opt("batch", "filter.batchId", Kind::Text, "Batch id");

const TASK_COLUMNS: &[&str] = &["id", "status", "priority", "assignedTo", "instructions"];

/// Every client verb. The order is the order of `agentq --help`.
pub const VERBS: &[Verb] = &[
    Verb {
        words: &["project", "create"],
        tool: "create_project",
        about: "Create a project",
        model: "Create a project: the queue that holds task types and tasks. Give it instructions that every agent working on it should read.",
        method: Method::Post,
        route: "/api/projects",
        params: &[
            Param {
                at: At::Body,
                ..pos("NAME", "name", At::Body, "Project name")
            },
            Param {
                default: Some(""),
                ..opt("description", "description", Kind::Text, "Description")
            },
            opt(
                "instructions",
                "instructions",
                Kind::TextOrFile,
                "Instructions for every task (TEXT or @FILE)",
            ),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["project", "list"],
        tool: "list_projects",
        about: "List projects",
        model: "List the projects this key can see, with their counts by status. Call it first to find the project to work on.",
        method: Method::Get,
        route: "/api/projects",
        params: &[
            query(
                "status",
                "status",
                Kind::Text,
                "active (default), closed or all",
            ),
            LIMIT,
        ],
        show: Show::Table(&["id", "name", "status", "description"]),
    },
    Verb {
        words: &["project", "show"],
        tool: "get_project",
        about: "Show a project",
        model: "Get one project (by name or id) with its instructions and counts by status. Read the project's instructions before working on its tasks.",
        method: Method::Get,
        route: "/api/projects/{project}",
        params: &[PROJECT],
        show: Show::Fields,
    },
    Verb {
        words: &["project", "stats"],
        tool: "get_project_stats",
        about: "Counters, queue depth, active agents and the last hour of a project",
        model: "Counts by status, queue depth, active agents and the last hour's completions and failures of a project: to report on progress.",
        method: Method::Get,
        route: "/api/projects/{project}/stats",
        params: &[PROJECT],
        show: Show::Fields,
    },
    Verb {
        words: &["project", "update"],
        tool: "update_project",
        about: "Update a project",
        model: "Change a project's name, description, instructions, status (active or closed) or config.",
        method: Method::Put,
        route: "/api/projects/{project}",
        params: &[
            PROJECT,
            opt("name", "name", Kind::Text, "New name"),
            opt("description", "description", Kind::Text, "Description"),
            opt(
                "instructions",
                "instructions",
                Kind::TextOrFile,
                "Instructions (TEXT or @FILE)",
            ),
            opt("status", "status", Kind::Text, "active or closed"),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["project", "delete"],
        tool: "delete_project",
        about: "Delete a project with its task types and tasks",
        model: "Delete a project with all its task types and tasks. Cannot be undone.",
        method: Method::Delete,
        route: "/api/projects/{project}",
        params: &[PROJECT],
        show: Show::Done("project deleted"),
    },
    Verb {
        words: &["type", "create"],
        tool: "create_task_type",
        about: "Create a task type",
        model: "Create a task type: a template of instructions with {{variables}} that each task fills in, and its retry and lease rules.",
        method: Method::Post,
        route: "/api/projects/{project}/task-types",
        params: &[
            PROJECT,
            pos("NAME", "name", At::Body, "Task type name"),
            TEMPLATE,
            VARIABLE,
            MAX_RETRIES,
            LEASE_MINUTES,
            DUPLICATES,
            RETRY_DELAY,
            BACKOFF,
            SCRIPT,
            SCRIPT_TYPE,
            SCRIPT_TIMEOUT,
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["type", "list"],
        tool: "list_task_types",
        about: "List a project's task types",
        model: "List a project's task types with their templates and variables.",
        method: Method::Get,
        route: "/api/projects/{project}/task-types",
        params: &[PROJECT, LIMIT],
        show: Show::Table(&["id", "name", "template", "maxRetries"]),
    },
    Verb {
        words: &["type", "show"],
        tool: "get_task_type",
        about: "Show a task type",
        model: "Get one task type (by name or id within the project).",
        method: Method::Get,
        route: "/api/task-types/{type}",
        params: &[TYPE_PROJECT, TYPE],
        show: Show::Fields,
    },
    Verb {
        words: &["type", "update"],
        tool: "update_task_type",
        about: "Update a task type",
        model: "Change a task type's template, variables or rules; existing tasks keep their instructions.",
        method: Method::Put,
        route: "/api/task-types/{type}",
        params: &[
            TYPE_PROJECT,
            TYPE,
            opt("name", "name", Kind::Text, "New name"),
            TEMPLATE,
            VARIABLE,
            MAX_RETRIES,
            LEASE_MINUTES,
            DUPLICATES,
            RETRY_DELAY,
            BACKOFF,
            SCRIPT,
            SCRIPT_TYPE,
            SCRIPT_TIMEOUT,
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["type", "delete"],
        tool: "delete_task_type",
        about: "Delete a task type",
        model: "Delete a task type; its tasks stay.",
        method: Method::Delete,
        route: "/api/task-types/{type}",
        params: &[TYPE_PROJECT, TYPE],
        show: Show::Done("task type deleted"),
    },
    Verb {
        words: &["task", "create"],
        tool: "create_task",
        about: "Create a task",
        model: "Queue one task in a project: its own instructions, or a task type (by name) and the variables its template needs. Priority 0-10, higher first.",
        method: Method::Post,
        route: "/api/projects/{project}/tasks",
        params: &[
            PROJECT,
            opt("type", "typeId", Kind::Text, "Task type name or id"),
            opt(
                "var",
                "variables",
                Kind::Vars,
                "A variable, NAME=VALUE (repeatable)",
            ),
            opt(
                "instructions",
                "instructions",
                Kind::TextOrFile,
                "Instructions (TEXT or @FILE)",
            ),
            opt(
                "priority",
                "priority",
                Kind::Int,
                "0-10, higher first (default 5)",
            ),
            opt(
                "not-before",
                "notBefore",
                Kind::Time,
                "Not before this time (RFC 3339, or +10m)",
            ),
            opt("id", "id", Kind::Text, "Your own task id"),
            opt("batch", "batchId", Kind::Text, "Batch id"),
            SCRIPT,
            SCRIPT_TYPE,
            SCRIPT_TIMEOUT,
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "list"],
        tool: "list_tasks",
        about: "List a project's tasks",
        model: "List a project's tasks, filtered by status (comma-separated), type, agent or batch, newest first unless order=asc.",
        method: Method::Get,
        route: "/api/projects/{project}/tasks",
        params: &[
            PROJECT,
            query("status", "status", Kind::Csv, "Statuses, comma-separated"),
            query("type", "typeId", Kind::Text, "Task type name or id"),
            query("agent", "assignedTo", Kind::Text, "Agent holding the task"),
            query("batch", "batchId", Kind::Text, "Batch id"),
            query("priority", "priority", Kind::Int, "Only this priority (0-10)"),
            query(
                "updated-after",
                "updatedAfter",
                Kind::Text,
                "Changed after this instant (RFC 3339)",
            ),
            query(
                "updated-before",
                "updatedBefore",
                Kind::Text,
                "Changed before this instant (RFC 3339)",
            ),
            query(
                "sort",
                "sort",
                Kind::Text,
                "createdAt, updatedAt or priority",
            ),
            query("order", "order", Kind::Text, "desc (default) or asc"),
            LIMIT,
        ],
        show: Show::Table(TASK_COLUMNS),
    },
    Verb {
        words: &["task", "show"],
        tool: "get_task",
        about: "Show a task",
        model: "Get one task with its instructions, result, outputs, error and attempts.",
        method: Method::Get,
        route: "/api/tasks/{task}",
        params: &[TASK],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "cancel"],
        tool: "cancel_task",
        about: "Cancel a queued or running task",
        model: "Cancel a queued or running task; a running task's agent loses its lease.",
        method: Method::Post,
        route: "/api/tasks/{task}/cancel",
        params: &[TASK, opt("reason", "reason", Kind::Text, "Why")],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "retry"],
        tool: "retry_task",
        about: "Put a failed or cancelled task back in the queue",
        model: "Put a failed or cancelled task back in the queue.",
        method: Method::Post,
        route: "/api/tasks/{task}/retry",
        params: &[TASK],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "delete"],
        tool: "delete_task",
        about: "Delete a task",
        model: "Delete a task and its history.",
        method: Method::Delete,
        route: "/api/tasks/{task}",
        params: &[TASK],
        show: Show::Done("task deleted"),
    },
    Verb {
        words: &["task", "purge"],
        tool: "delete_tasks",
        about: "Delete a project's finished tasks by filter (queued or running only with --status)",
        model: "Delete every task of a project that matches: finished tasks (completed, failed, cancelled) unless status names others, ended before endedBefore, of a type or a batch. Answers deletedTasks.",
        method: Method::Delete,
        route: "/api/projects/{project}/tasks",
        params: &[
            PROJECT,
            query(
                "status",
                "status",
                Kind::Csv,
                "Statuses, comma-separated (default completed,failed,cancelled)",
            ),
            query(
                "older-than",
                "endedBefore",
                Kind::Ago,
                "Ended longer ago than <n>[smhd]",
            ),
            query("type", "typeId", Kind::Text, "Task type name or id"),
            query("batch", "batchId", Kind::Text, "Batch id"),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "cancel-many"],
        tool: "cancel_tasks",
        about: "Cancel many tasks: by id (--id, repeatable) and/or by filter",
        model: "Cancel many tasks of a project at once: by id (up to 1,000), by the listing's filters (status, typeId, assignedTo, batchId; the first 10,000 matches), or the ids the filter matches.",
        method: Method::Post,
        route: "/api/projects/{project}/tasks/cancel",
        params: &[
            PROJECT,
            opt("id", "ids", Kind::List, "A task id (repeatable)"),
            FILTER_STATUS,
            FILTER_TYPE,
            FILTER_AGENT,
            FILTER_BATCH,
            opt("reason", "reason", Kind::Text, "Why"),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "retry-many"],
        tool: "retry_tasks",
        about: "Retry many failed or cancelled tasks: by id (--id, repeatable) and/or by filter",
        model: "Put many failed or cancelled tasks of a project back in the queue: by id (up to 1,000), by the listing's filters (the first 10,000 matches), or the ids the filter matches.",
        method: Method::Post,
        route: "/api/projects/{project}/tasks/retry",
        params: &[
            PROJECT,
            opt("id", "ids", Kind::List, "A task id (repeatable)"),
            FILTER_STATUS,
            FILTER_TYPE,
            FILTER_AGENT,
            FILTER_BATCH,
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["task", "attempts"],
        tool: "list_attempts",
        about: "A task's attempt history",
        model: "A task's attempt history: which agent held it, when, how it ended, and how its process ran.",
        method: Method::Get,
        route: "/api/tasks/{task}/attempts",
        params: &[TASK],
        show: Show::Table(&[
            "attempt",
            "agentName",
            "outcome",
            "startedAt",
            "endedAt",
            "error",
        ]),
    },
    Verb {
        words: &["next"],
        tool: "get_next_task",
        about: "Lease the next task to an agent (exit 5 when there is none)",
        model: "Take the next task to work on: it is leased to you (agentName) until leaseExpiresAt, and nobody else gets it. Read the project's instructions first. Pass the answer's leaseToken back to complete_task, fail_task, extend_lease and report_progress. waitSeconds (up to 60) waits for a task when the queue is empty; an empty queue answers task: null.",
        method: Method::Post,
        route: "/api/agents/{agent}/next-task",
        params: &[
            Param {
                at: At::Body,
                ..pos("PROJECT", "projectId", At::Body, "Project name or id")
            },
            Param {
                at: At::Path,
                field: "agent",
                ..AGENT
            },
            opt(
                "type",
                "typeIds",
                Kind::List,
                "Only tasks of this type (repeatable)",
            ),
            opt(
                "wait",
                "waitSeconds",
                Kind::Float,
                "Wait up to this many seconds (0-60)",
            ),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["peek"],
        tool: "peek_next_task",
        about: "How many tasks next-task could hand out now (exit 5 when none)",
        model: "How many tasks get_next_task could hand out now, without taking one.",
        method: Method::Get,
        route: "/api/projects/{project}/peek-next-task",
        params: &[PROJECT],
        show: Show::Fields,
    },
    Verb {
        words: &["complete"],
        tool: "complete_task",
        about: "Complete a task (its lease holder)",
        model: "Report your leased task done, with its result (text) and/or outputs (a JSON object). Give the leaseToken from get_next_task.",
        method: Method::Post,
        route: "/api/tasks/{task}/complete",
        params: &[
            TASK,
            AGENT,
            TOKEN,
            opt(
                "result",
                "result",
                Kind::TextOrFile,
                "Result (TEXT or @FILE)",
            ),
            opt("outputs", "outputs", Kind::Json, "Outputs, a JSON object"),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["fail"],
        tool: "fail_task",
        about: "Fail a task (its lease holder); retried while retries remain",
        model: "Report that your leased task failed, with the error; it is retried (maybe by another agent) while retries remain, unless canRetry is false.",
        method: Method::Post,
        route: "/api/tasks/{task}/fail",
        params: &[
            TASK,
            AGENT,
            TOKEN,
            needed(opt("error", "error", Kind::TextOrFile, "What went wrong")),
            opt(
                "no-retry",
                "canRetry",
                Kind::FlagFalse,
                "Fail for good, no retry",
            ),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["extend"],
        tool: "extend_lease",
        about: "Extend a task's lease (its holder)",
        model: "Keep your leased task: extend its lease by extensionMinutes from now. Call it well before leaseExpiresAt on long work, or the task is handed to another agent.",
        method: Method::Post,
        route: "/api/tasks/{task}/extend-lease",
        params: &[
            TASK,
            AGENT,
            TOKEN,
            needed(opt(
                "minutes",
                "extensionMinutes",
                Kind::Float,
                "Minutes from now",
            )),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["progress"],
        tool: "report_progress",
        about: "Report a task's progress (its holder)",
        model: "Report progress on your leased task (current of total, and a message) so people can follow it.",
        method: Method::Post,
        route: "/api/tasks/{task}/progress",
        params: &[
            TASK,
            AGENT,
            TOKEN,
            needed(opt("current", "current", Kind::Int, "Done so far")),
            needed(opt("total", "total", Kind::Int, "In all")),
            opt("message", "message", Kind::Text, "What is happening"),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["agents"],
        tool: "list_active_agents",
        about: "Agents holding a lease in a project, with their tasks",
        model: "List the agents that hold a task of the project now, with the task and when its lease ends.",
        method: Method::Get,
        route: "/api/projects/{project}/agents",
        params: &[PROJECT, LIMIT],
        show: Show::Table(&["agentName", "taskId", "assignedAt", "leaseExpiresAt"]),
    },
    Verb {
        words: &["cleanup"],
        tool: "cleanup_expired_leases",
        about: "Reclaim a project's expired leases now (the reaper does it by itself)",
        model: "Reclaim the project's expired leases at once, requeueing their tasks. Rarely needed: the server's reaper does it on time.",
        method: Method::Post,
        route: "/api/projects/{project}/cleanup-leases",
        params: &[PROJECT],
        show: Show::Fields,
    },
    Verb {
        words: &["health"],
        tool: "health_check",
        about: "The server's health, version, uptime and storage",
        model: "Check that the agentq server is up and its storage writable.",
        method: Method::Get,
        route: "/health",
        params: &[],
        show: Show::Fields,
    },
    // Tools without a verb of their own: the CLI's `task bulk` reads a file and sends it in
    // chunks to the same route; lease statistics are the project's stats.
    Verb {
        words: &[],
        tool: "create_tasks_bulk",
        about: "Create up to 1,000 tasks in one request",
        model: "Queue up to 1,000 tasks in one call (each as create_task takes it); problems are reported per task, by index, in errors.",
        method: Method::Post,
        route: "/api/projects/{project}/tasks/bulk",
        params: &[
            PROJECT,
            needed(opt("tasks", "tasks", Kind::Json, "The tasks, a JSON array")),
            opt("batch", "batchId", Kind::Text, "Batch id for tasks that give none"),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &[],
        tool: "get_lease_stats",
        about: "A project's leases: running tasks, active agents, queue depth",
        model: "Lease statistics of a project: running tasks, active agents and queue depth, with counts by status.",
        method: Method::Get,
        route: "/api/projects/{project}/stats",
        params: &[PROJECT],
        show: Show::Fields,
    },
    Verb {
        words: &["key", "create"],
        tool: "create_key",
        about: "Create an API key (admin); the key is shown once",
        model: "Create an API key (admin only); the key is shown once.",
        method: Method::Post,
        route: "/api/keys",
        params: &[
            pos("NAME", "name", At::Body, "Key name"),
            needed(opt(
                "role",
                "role",
                Kind::Text,
                "admin, producer, agent or viewer",
            )),
            opt(
                "project",
                "projects",
                Kind::List,
                "Limit the key to this project (repeatable)",
            ),
            opt(
                "allow-scripts",
                "allowScripts",
                Kind::Flag,
                "May create tasks and task types that carry a script",
            ),
        ],
        show: Show::Fields,
    },
    Verb {
        words: &["key", "list"],
        tool: "list_keys",
        about: "List API keys (admin)",
        model: "List API keys (admin only); keys themselves are never shown.",
        method: Method::Get,
        route: "/api/keys",
        params: &[LIMIT],
        show: Show::Table(&["id", "name", "role", "projects", "lastUsedAt"]),
    },
    Verb {
        words: &["key", "delete"],
        tool: "delete_key",
        about: "Revoke an API key (admin)",
        model: "Revoke an API key (admin only).",
        method: Method::Delete,
        route: "/api/keys/{key}",
        params: &[pos("ID", "key", At::Path, "Key id")],
        show: Show::Done("key deleted"),
    },
];

//! agentq: a durable, fast task queue for AI agents, in one binary and one redb file.
//!
//! # Layout
//! - [`model`]: the domain rows (projects, task types, tasks, attempts) and template rules.
//! - [`lease`]: the lease state machine, pure functions over a task row; the protocol's home.
//! - [`store`]: redb tables and indexes, the group-commit writer, and read queries.
//! - [`auth`]: API keys, sessions, roles and rights, project scoping, rate limits.
//! - [`report`]: what a committed write batch did, as plain data for the hub and the metrics.
//! - [`hub`]: wake-ups for long-pollers, the scheduler and shutdown.
//! - [`scheduler`]: the reaper, which reclaims expired leases and releases delayed tasks.
//! - [`api`]: the HTTP contract (poem-openapi), the error envelope and middleware.
//! - [`server`]: configuration, start-up and graceful shutdown.
//! - [`verbs`]: every verb, declared once: its command-line words, MCP tool, REST route and
//!   parameters. [`cli`]: the binary's client commands built from it; [`client`]: the HTTP
//!   client they call the server with.
//! - [`mcp`]: `agentq mcp`, the verb table's tools for LLM agents over MCP (stdio).
//! - [`worker`]: `agentq work`, an agent that runs a process (or a task's script) per task.
//! - [`spawn`]: work that must not stop half way when its caller stops waiting.
//! - [`listen`]: accepting connections and serving HTTP on them (idle limit, back-off).
//! - [`logs`]: the log's writer, which drops (and counts) what stderr refuses.
//! - [`telemetry`]: metrics (Prometheus and JSON) and what they count.
//! - [`time`]: the injected clock and the wire format of instants.
//! - [`ids`]: task ids and the random part of lease tokens, without a system call each.
//! - [`error`]: the domain error every layer returns.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod error;
pub mod hub;
pub mod ids;
pub mod lease;
pub mod listen;
pub mod logs;
pub mod mcp;
pub mod model;
pub mod report;
pub mod retention;
pub mod scheduler;
pub mod server;
pub mod spawn;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod verbs;
pub mod worker;

pub use server::{run, Config, Server};

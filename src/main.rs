//! The `agentq` binary: parses the command line into one [`agentq::Config`] and runs it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: the request path allocates small short-lived buffers on
/// several threads, where glibc spent ~15% of server CPU (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agentq",
    version,
    about = "A durable, fast task queue for AI agents"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "AGENTQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level: error, warn, info, debug (one line per request) or trace. RUST_LOG, when
    /// set, takes precedence and allows per-module filters.
    #[arg(long, global = true, env = "AGENTQ_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server on an embedded redb database.
    Serve(ServeArgs),
    /// Add an admin key to a database while its server is stopped (when every admin key is
    /// lost), and print it once on stdout.
    AddAdminKey(AddAdminKeyArgs),
    /// Verify a database file offline: every task's body, id and index entries, and the
    /// counters, against the rows. Exit 1 when something does not match.
    Check(FileArgs),
    /// Rewrite a database file to its live size (the server stopped), and print the sizes.
    Compact(FileArgs),
}

#[derive(clap::Args)]
struct FileArgs {
    /// Database file (no server may have it open).
    #[arg(long, env = "AGENTQ_DB", default_value = "agentq.redb")]
    db: PathBuf,
}

#[derive(clap::Args)]
struct AddAdminKeyArgs {
    /// Database file (it must exist, and no server may have it open).
    #[arg(long, env = "AGENTQ_DB", default_value = "agentq.redb")]
    db: PathBuf,
    /// Name of the new key, as `GET /api/keys` lists it.
    #[arg(long, default_value = "admin (added offline)")]
    name: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Database file (created if missing). Only one server may open a file at a time.
    #[arg(long, env = "AGENTQ_DB", default_value = "agentq.redb")]
    db: PathBuf,
    /// Address to listen on, host:port. Use 0.0.0.0:3000 to accept remote clients.
    #[arg(long, env = "AGENTQ_BIND", default_value = "127.0.0.1:3000")]
    bind: String,
    /// Largest request body accepted, in bytes (1 KiB to 1 GiB); larger bodies get 413.
    #[arg(long, env = "AGENTQ_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    max_body_bytes: u64,
    /// Allow browser requests from these origins (CORS), comma-separated: exact
    /// (https://ui.example), with wildcards (https://*.example.com), or * for any. Off unless
    /// given.
    #[arg(long, env = "AGENTQ_CORS_ORIGIN", value_parser = agentq::api::check_cors_origins)]
    cors_origin: Option<String>,
    /// Keep completed tasks this long after they ended (7d, 12h, 30m, 90s or seconds; 0 =
    /// forever). A project's config.retention overrides it.
    #[arg(long, env = "AGENTQ_RETAIN_COMPLETED", default_value = "7d",
          value_parser = agentq::retention::parse_duration)]
    retain_completed: u64,
    /// Keep failed tasks this long after their final failure (0 = forever).
    #[arg(long, env = "AGENTQ_RETAIN_FAILED", default_value = "30d",
          value_parser = agentq::retention::parse_duration)]
    retain_failed: u64,
    /// Keep cancelled tasks this long after they were cancelled (0 = forever).
    #[arg(long, env = "AGENTQ_RETAIN_CANCELLED", default_value = "7d",
          value_parser = agentq::retention::parse_duration)]
    retain_cancelled: u64,
    /// Seconds between retention passes.
    #[arg(long, env = "AGENTQ_PRUNE_INTERVAL_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    prune_interval_secs: u64,
    /// Do not serve the dashboard (`/` and `/ui/` then answer 404).
    #[arg(long, env = "AGENTQ_NO_UI")]
    no_ui: bool,
    /// On the first start of an empty database, use this admin key instead of generating one
    /// (at least 16 characters). Prefer --admin-key-file: environments leak.
    #[arg(long = "admin-key", env = "AGENTQ_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Read the first admin key from this file (see --admin-key).
    #[arg(long, env = "AGENTQ_ADMIN_KEY_FILE", conflicts_with = "admin_key")]
    admin_key_file: Option<PathBuf>,
    /// Requests per minute allowed to each API key (its sessions included); 0 = no limit.
    #[arg(long, env = "AGENTQ_RATE_LIMIT_PER_MINUTE", default_value_t = 6000)]
    rate_limit_per_minute: u32,
    /// Lifetime of a new login session, in seconds.
    #[arg(long, env = "AGENTQ_SESSION_TTL_SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(60..=2_592_000))]
    session_ttl_seconds: u64,
    /// Live login sessions one API key may hold at a time; a login past it gets 409 until one
    /// ends (logout, expiry, or the key's revocation). 0 = no limit.
    #[arg(long, env = "AGENTQ_MAX_SESSIONS_PER_KEY",
          default_value_t = agentq::auth::DEFAULT_MAX_SESSIONS_PER_KEY)]
    max_sessions_per_key: u32,
    /// Database page cache, in MiB. More keeps more of a large database in memory (faster
    /// reads of old tasks); the resident set is about 45 MiB plus 1.5-1.8 times this.
    #[arg(long, env = "AGENTQ_CACHE_MIB",
          default_value_t = (agentq::store::DEFAULT_CACHE_BYTES >> 20) as u64,
          value_parser = clap::value_parser!(u64).range(8..=65_536))]
    cache_mib: u64,
    /// Close a connection that has had no request in progress for this many seconds (since
    /// it opened or since its last answer); 0 = never. A request in progress, a long-poll
    /// included, is never cut.
    #[arg(long, env = "AGENTQ_IDLE_TIMEOUT_SECS",
          default_value_t = agentq::server::DEFAULT_IDLE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    idle_timeout_secs: u64,
    /// Answer 408 and close the connection when a request body stalls this many seconds
    /// without a byte, or arrives slower than 500 bytes/s on average past its first this many
    /// seconds; 0 = never.
    #[arg(long, env = "AGENTQ_BODY_TIMEOUT_SECS",
          default_value_t = agentq::server::DEFAULT_BODY_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    body_timeout_secs: u64,
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == agentq::worker::GUARD_ARG)
    {
        // `agentq work`'s guard process, not a command for people.
        return agentq::worker::guard_main();
    }
    // The binary's own commands (serve, add-admin-key) and the client verbs of `agentq::cli`,
    // which its table declares.
    let matches = Cli::command()
        .subcommands(agentq::cli::commands())
        .get_matches();
    if let Some(("mcp", sub)) = matches.subcommand() {
        let client = match agentq::cli::client_of(sub) {
            Ok(c) => c,
            Err(why) => {
                agentq::logs::say(format!("agentq: {why}\n"));
                return ExitCode::from(2);
            }
        };
        return match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(agentq::mcp::run_stdio(client)),
            Err(e) => {
                agentq::logs::say(format!("agentq: cannot start the runtime: {e}\n"));
                ExitCode::FAILURE
            }
        };
    }
    if let Some((name, sub)) = matches.subcommand() {
        if agentq::cli::is_client_command(name) {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    agentq::logs::say(format!("agentq: cannot start the runtime: {e}\n"));
                    return ExitCode::FAILURE;
                }
            };
            return rt.block_on(agentq::cli::run(name, sub));
        }
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(why) = init_logs(&cli) {
        agentq::logs::say(format!("agentq: {why}\n"));
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            return fatal(
                cli.log_format,
                format_args!("cannot start the runtime: {e}"),
            );
        }
    };
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::AddAdminKey(a) => return add_admin_key(&rt, cli.log_format, a),
        Command::Check(a) => return check(cli.log_format, &a.db),
        Command::Compact(a) => return compact(cli.log_format, &a.db),
    };
    let config = match serve_config(args) {
        Ok(config) => config,
        Err(why) => return fatal(cli.log_format, why),
    };
    // One descriptor per connected agent: a fleet larger than the soft limit (1,024 under
    // systemd by default) would be refused. Take what the hard limit allows, as Go and nginx
    // do; what is left is logged, and accepts past it back off (see server::Connections).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    match rt.block_on(agentq::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(cli.log_format, e),
    }
}

/// Logs on stderr, through the writer that drops what stderr refuses (`agentq::logs`), and a
/// panic hook that logs a panic like any error.
fn init_logs(cli: &Cli) -> Result<(), String> {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(_) => tracing_subscriber::EnvFilter::try_new(&cli.log_level)
            .map_err(|e| format!("invalid --log-level {}: {e}", cli.log_level))?,
    };
    // Colours only for a person at a terminal: a log file or the journal gets plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // A line stderr refuses is dropped and counted, never a panic (see `agentq::logs`).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .log_internal_errors(false)
        .with_writer(agentq::logs::Stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // A panic (a bug) goes to the log like any error, with the JSON format too; the request
    // or write batch it happened in fails and the server goes on (see `api::app`, `store`).
    std::panic::set_hook(Box::new(|info| {
        let trace = std::backtrace::Backtrace::capture();
        match trace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                tracing::error!(panic = %info, backtrace = %trace, "panic")
            }
            _ => tracing::error!(panic = %info, "panic"),
        }
    }));
    Ok(())
}

/// `agentq add-admin-key`: the new key on stdout, once.
fn add_admin_key(rt: &tokio::runtime::Runtime, format: LogFormat, a: AddAdminKeyArgs) -> ExitCode {
    match rt.block_on(agentq::server::add_admin_key(&a.db, &a.name)) {
        Ok(key) => {
            agentq::logs::say(format!(
                "agentq: added an admin key to {} (shown only now):\n",
                a.db.display()
            ));
            match agentq::server::print_stdout(&format!("{key}\n")) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fatal(format, format_args!("cannot print the key: {e}")),
            }
        }
        Err(e) => fatal(format, e),
    }
}

/// `agentq check`: a summary on stdout; exit 1 on any mismatch.
fn check(format: LogFormat, db: &std::path::Path) -> ExitCode {
    if !db.exists() {
        return fatal(format, format_args!("{}: no such file", db.display()));
    }
    let r = match agentq::store::check::check(db) {
        Ok(r) => r,
        Err(e) => return fatal(format, e),
    };
    let mut out = format!(
        "{}: schema {}, {} projects, {} tasks, {} index entries, {:.1} MiB\n",
        db.display(),
        r.schema_version,
        r.projects,
        r.tasks,
        r.index_entries,
        r.file_bytes as f64 / 1048576.0
    );
    for p in &r.problems {
        out.push_str(&format!("  problem: {p}\n"));
    }
    if r.problem_count > r.problems.len() as u64 {
        out.push_str(&format!("  ... {} problems in all\n", r.problem_count));
    }
    out.push_str(if r.problem_count == 0 {
        "ok: the counters and indexes match the rows\n"
    } else {
        "FAILED: the file does not match itself; restore a backup (docs/OPERATIONS.md)\n"
    });
    if agentq::server::print_stdout(&out).is_err() {
        return ExitCode::FAILURE;
    }
    if r.problem_count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `agentq compact`: the sizes before and after on stdout.
fn compact(format: LogFormat, db: &std::path::Path) -> ExitCode {
    if !db.exists() {
        return fatal(format, format_args!("{}: no such file", db.display()));
    }
    match agentq::store::check::compact(db) {
        Ok((before, after)) => {
            let mib = |b: u64| b as f64 / 1048576.0;
            let out = format!(
                "{}: {:.1} MiB before, {:.1} MiB after\n",
                db.display(),
                mib(before),
                mib(after)
            );
            match agentq::server::print_stdout(&out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(e) => fatal(format, e),
    }
}

/// The server's configuration from `agentq serve`'s arguments.
fn serve_config(args: ServeArgs) -> Result<agentq::Config, String> {
    let mut config = agentq::Config::new(args.db, args.bind);
    config.max_body_bytes = args.max_body_bytes as usize;
    config.cors_origin = args.cors_origin;
    config.ui = !args.no_ui;
    config.retention = agentq::retention::Defaults {
        completed: args.retain_completed,
        failed: args.retain_failed,
        cancelled: args.retain_cancelled,
    };
    config.prune_interval = std::time::Duration::from_secs(args.prune_interval_secs);
    config.rate_limit_per_minute = args.rate_limit_per_minute;
    config.cache_bytes = (args.cache_mib as usize) * 1024 * 1024;
    config.session_ttl = std::time::Duration::from_secs(args.session_ttl_seconds);
    config.max_sessions_per_key = args.max_sessions_per_key;
    let seconds = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
    config.idle_timeout = seconds(args.idle_timeout_secs);
    config.body_timeout = seconds(args.body_timeout_secs);
    config.admin_key = match (args.admin_key, args.admin_key_file) {
        (Some(k), _) => Some(k),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(k) => Some(k.trim().to_string()),
            Err(e) => {
                return Err(format!(
                    "cannot read the admin key file {}: {e}",
                    path.display()
                ))
            }
        },
        (None, None) => None,
    };
    if config
        .admin_key
        .as_ref()
        .is_some_and(|k| k.len() < agentq::auth::MIN_ADMIN_KEY_LEN)
    {
        return Err(format!(
            "the admin key must be at least {} characters",
            agentq::auth::MIN_ADMIN_KEY_LEN
        ));
    }
    Ok(config)
}

/// Reports an error that stops the program: one plain line for a person, or a log line with
/// `--log-format json`, so that stderr then carries only JSON.
fn fatal(format: LogFormat, message: impl std::fmt::Display) -> ExitCode {
    match format {
        LogFormat::Text => agentq::logs::say(format!("agentq: {message}\n")),
        LogFormat::Json => tracing::error!("{message}"),
    }
    ExitCode::FAILURE
}

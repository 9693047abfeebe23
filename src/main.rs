//! The `agentq` binary: parses the command line into one [`agentq::Config`] and runs it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentq",
    version,
    about = "A durable, fast task queue for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server on an embedded redb database.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Database file (created if missing). Only one server may open a file at a time.
    #[arg(long, env = "AGENTQ_DB", default_value = "agentq.redb")]
    db: PathBuf,
    /// Address to listen on, host:port. Use 0.0.0.0:3000 to accept remote clients.
    #[arg(long, env = "AGENTQ_BIND", default_value = "127.0.0.1:3000")]
    bind: String,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "AGENTQ_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Allow browser requests from this origin (CORS). Off unless given.
    #[arg(long, env = "AGENTQ_CORS_ORIGIN")]
    cors_origin: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Serve(args) = cli.command;
    let mut config = agentq::Config::new(args.db, args.bind);
    config.max_body_bytes = args.max_body_bytes;
    config.cors_origin = args.cors_origin;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(agentq::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentq: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Start-up and shutdown: one validated [`Config`] in, a running server out.
//!
//! Shutdown order (SIGINT/SIGTERM or [`Server::stop`]): long-pollers are woken and answer
//! "no task"; the listener stops accepting and in-flight requests finish; the writer commits
//! and answers what is queued; the database is closed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::api::{self, HttpOptions, State};
use crate::auth::Authenticator;
use crate::listen::{Limits, Listener};
use crate::store::keys::SessionLimits;
use crate::store::{OpenError, Store};
use crate::time::{Clock, SystemClock};

/// How long a connection may stay open without a request in progress (see [`crate::listen`]).
/// Longer than the longest long-poll, and than the usual heartbeat of a working agent.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest wait for more of a request body before it is answered 408 (see
/// [`crate::listen`]).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Config {
    pub db: PathBuf,
    pub bind: String,
    pub max_body_bytes: usize,
    pub cors_origin: Option<String>,
    /// Serve the dashboard at `/` and `/ui/` (`--no-ui` turns it off).
    pub ui: bool,
    /// How long finished tasks are kept, by status, unless a project says otherwise.
    pub retention: crate::retention::Defaults,
    /// How often retention runs.
    pub prune_interval: Duration,
    pub clock: Arc<dyn Clock>,
    /// The first admin key, when the database has none (else one is generated).
    pub admin_key: Option<String>,
    /// Requests per key and minute; 0 turns rate limiting off.
    pub rate_limit_per_minute: u32,
    /// Lifetime of a new session.
    pub session_ttl: Duration,
    /// Live sessions one key may hold; a login past it is refused (409). 0: no limit.
    pub max_sessions_per_key: u32,
    /// Size of the database page cache.
    pub cache_bytes: usize,
    /// How the database file is opened: the file itself, or (tests, drills) a
    /// [`Faulty`](crate::store::disk::Faulty) one.
    pub opener: crate::store::Opener,
    /// Close a connection after this long without a request in progress; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// The longest wait for more of a request body (408 after it); `None`: no limit.
    pub body_timeout: Option<Duration>,
    /// Shows the admin key generated on the first start of an empty database, before it is
    /// stored: if it fails, the start fails and no key is stored (a key shown to nobody must
    /// not exist). `None`: not shown (it is in [`Server::generated_admin_key`]); [`run`]
    /// prints it on stdout.
    pub show_admin_key: Option<ShowKey>,
}

/// See [`Config::show_admin_key`].
pub type ShowKey = Arc<dyn Fn(&str) -> std::io::Result<()> + Send + Sync>;

impl Config {
    pub fn new(db: impl Into<PathBuf>, bind: impl Into<String>) -> Self {
        Config {
            db: db.into(),
            bind: bind.into(),
            max_body_bytes: 2 * 1024 * 1024,
            cors_origin: None,
            ui: true,
            retention: Default::default(),
            prune_interval: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            admin_key: None,
            rate_limit_per_minute: 6000,
            session_ttl: Duration::from_secs(24 * 3600),
            max_sessions_per_key: crate::auth::DEFAULT_MAX_SESSIONS_PER_KEY,
            cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            opener: Arc::new(crate::store::disk::file_backend),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            body_timeout: Some(DEFAULT_BODY_TIMEOUT),
            show_admin_key: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("cannot create the admin key: {0}")]
    Bootstrap(crate::error::Error),
    #[error("cannot show the new admin key on stdout ({0}); no key was created")]
    ShowKey(std::io::Error),
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    pub auth: Arc<Authenticator>,
    /// The admin key generated at this start (first start on an empty database without a
    /// given key). Shown once; never stored in clear.
    pub generated_admin_key: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

/// Closes the database of a start that failed before serving, and removes its file when
/// that start created it (`created`), so that no empty database is left behind.
fn abandon(store: Arc<Store>, created: Option<&PathBuf>) {
    store.close();
    if let Some(path) = created {
        let _ = std::fs::remove_file(path);
    }
}

impl Server {
    /// Opens the database, binds, and starts serving and the scheduler in the background.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        // A file this start creates is removed again if the start fails before serving, so
        // that a typo in --bind leaves no empty database behind.
        let creates_file = !config.db.exists();
        let store = Store::open_with(
            &config.db,
            config.clock.clone(),
            config.cache_bytes,
            config.opener.clone(),
        )?;
        let auth = Arc::new(Authenticator::new(
            store.clone(),
            config.rate_limit_per_minute,
            SessionLimits {
                ttl_ms: config.session_ttl.as_millis() as i64,
                per_key: config.max_sessions_per_key,
            },
        ));
        // Bind before the first admin key is made: a start that cannot listen (the port is
        // taken) must not store a key that nobody is ever shown.
        let bound = async {
            let (listener, addr) = bind(&config.bind).await?;
            let key = first_admin_key(&auth, &config).await?;
            Ok((listener, addr, key))
        };
        let (listener, addr, generated_admin_key) = match bound.await {
            Ok(bound) => bound,
            Err(e) => {
                abandon(store, creates_file.then_some(&config.db));
                return Err(e);
            }
        };
        let state = Arc::new(State {
            metrics: crate::telemetry::install(),
            totals: Default::default(),
            store: store.clone(),
            auth: auth.clone(),
            started: Instant::now(),
            presence: Default::default(),
        });
        spawn_background(&state, &config);
        let (stop, done) = serve(listener, addr, state, &config);
        Ok(Server {
            addr,
            store,
            auth,
            generated_admin_key,
            stop: Some(stop),
            done,
        })
    }

    /// Graceful stop; returns once the database is closed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.done).await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

/// The listening socket for `--bind`, and its address.
async fn bind(addr: &str) -> Result<(Listener, SocketAddr), StartError> {
    let bound = async {
        let listener = Listener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    bound.await.map_err(|e: std::io::Error| {
        let e = match e.kind() {
            std::io::ErrorKind::InvalidInput => std::io::Error::new(
                e.kind(),
                format!("{e} (give host:port, e.g. 127.0.0.1:3000 or 0.0.0.0:3000)"),
            ),
            _ => e,
        };
        StartError::Bind(addr.to_string(), e)
    })
}

/// The first admin key of an empty database: the given one, or one generated and shown
/// (`Config::show_admin_key`) before it is stored. The generated key's text, once.
async fn first_admin_key(
    auth: &Authenticator,
    config: &Config,
) -> Result<Option<String>, StartError> {
    let show = config.show_admin_key.clone();
    let shown = move |key: &str| match show {
        Some(show) => show(key),
        None => Ok(()),
    };
    auth.bootstrap(config.admin_key.clone(), shown)
        .await
        .map_err(|e| match e {
            crate::auth::BootstrapError::Store(e) => StartError::Bootstrap(e),
            crate::auth::BootstrapError::Show(e) => StartError::ShowKey(e),
        })
}

/// The scheduler, the unfinished project deletes, and the metrics' upkeep.
fn spawn_background(state: &Arc<State>, config: &Config) {
    let store = &state.store;
    tokio::spawn(keep_scheduling(store.clone()));
    let (retention, every) = (config.retention, config.prune_interval);
    let pruner = store.clone();
    tokio::spawn(async move {
        supervise("retention", move || {
            crate::retention::run(pruner.clone(), retention, every)
        })
        .await
    });
    tokio::spawn(resume_deletes(store.clone()));
    let hub = store.hub.clone();
    tokio::spawn(crate::telemetry::upkeep(
        state.metrics.clone(),
        async move { hub.shutting_down().await },
    ));
}

/// Serves the API on `listener` until the returned sender is used (or dropped); the handle
/// ends once the connections are closed.
fn serve(
    listener: Listener,
    addr: SocketAddr,
    state: Arc<State>,
    config: &Config,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let app = api::app(
        state.clone(),
        &HttpOptions {
            max_body_bytes: config.max_body_bytes,
            cors_origin: config.cors_origin.clone(),
            addr,
            ui: config.ui,
        },
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let hub = state.store.hub.clone();
    let limits = Limits {
        idle: config.idle_timeout,
        body: config.body_timeout,
        grace: SHUTDOWN_GRACE,
    };
    let done = tokio::spawn(crate::listen::serve(
        listener,
        app,
        crate::api::error::rejected_request,
        async move {
            let _ = stop_rx.await;
            hub.shutdown();
        },
        limits,
    ));
    (stop_tx, done)
}

/// Finishes, in the background, the project deletes the last run left unfinished: their
/// projects are already invisible, so start-up need not wait for them.
async fn resume_deletes(store: Arc<Store>) {
    match store.resume_deletes().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(projects = n, "unfinished project deletes completed"),
        Err(e) if store.hub.is_shutting_down() => {
            tracing::info!(error = %e, "project deletes left for the next start")
        }
        Err(e) => tracing::warn!(error = %e, "could not finish the unfinished project deletes"),
    }
}

/// Runs the scheduler, and again if it panics (a bug): without it no lease would expire and
/// no delayed task would become available, silently.
async fn keep_scheduling(store: Arc<Store>) {
    supervise("scheduler", move || crate::scheduler::run(store.clone())).await
}

/// Runs `task()` on a task of its own until it returns; if it panics, logs it and runs a new
/// one a second later.
async fn supervise<F, Fut>(name: &'static str, task: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(task()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "the {name} stopped; starting it again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Adds an admin key to the database at `db` while no server has it open (for an operator
/// who lost every admin key), and returns its text, to be shown once. The file must exist.
pub async fn add_admin_key(db: &std::path::Path, name: &str) -> Result<String, StartError> {
    if !db.exists() {
        return Err(StartError::Open(OpenError::Io(
            db.to_path_buf(),
            "no such file".into(),
        )));
    }
    let store = Store::open(db, Arc::new(SystemClock))?;
    let auth = Authenticator::new(store.clone(), 0, SessionLimits::default());
    let id = uuid::Uuid::now_v7().as_u128();
    let text = crate::auth::new_key_text(id);
    let added = async {
        let hash = auth.hash(text.clone()).await?;
        let new = crate::store::keys::NewKey {
            id,
            name: name.to_string(),
            role: crate::model::Role::Admin,
            projects: None,
            hash,
            allow_scripts: false,
        };
        store
            .write(move |w| crate::store::keys::create_key(w, new))
            .await
    }
    .await;
    store.close();
    added.map_err(StartError::Bootstrap)?;
    Ok(text)
}

/// Writes `text` to stdout and flushes it: an error (a closed or full stdout) is returned,
/// never a panic as from `println!`.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Runs until SIGINT, SIGTERM or SIGHUP, then shuts down gracefully.
pub async fn run(mut config: Config) -> Result<(), StartError> {
    // Before the server answers: a signal sent as soon as `/health` is up must find the
    // handlers, not the default action (which ends the process without closing the file).
    let stop = StopSignals::install();
    // Printed once, on the first start of an empty database, before it is stored; only its
    // hash is. On stdout, as `add-admin-key` does: stderr carries only log lines, which a
    // collector may parse (`--log-format json`).
    config.show_admin_key.get_or_insert_with(|| {
        Arc::new(|key| {
            print_stdout(&format!(
                "\nagentq: created the first admin API key (shown only now, store it safely):\
                 \n\n    {key}\n\nSend it as `X-API-Key: <key>` or `Authorization: Bearer <key>`; \
                 create\nnarrower keys with POST /api/keys.\n\n"
            ))
        })
    });
    let server = Server::start(config.clone()).await?;
    tracing::info!(
        version = api::VERSION,
        db = %config.db.display(),
        addr = %server.addr,
        "agentq listening"
    );
    let signal = stop.wait().await;
    tracing::info!(signal, "shutting down: finishing in-flight requests");
    server.stop().await;
    tracing::info!("database closed; bye");
    Ok(())
}

/// The signals that stop the server: SIGINT (Ctrl-C), SIGTERM (a service manager) and SIGHUP
/// (the terminal closed, whose default would end the process without closing the file,
/// leaving a repair for the next start). Their handlers are in place from `install` on.
struct StopSignals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> StopSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let handle = |kind, name| {
                signal(kind)
                    .inspect_err(|e| tracing::warn!(signal = name, error = %e, "cannot handle"))
                    .ok()
            };
            StopSignals {
                int: handle(SignalKind::interrupt(), "SIGINT"),
                term: handle(SignalKind::terminate(), "SIGTERM"),
                hup: handle(SignalKind::hangup(), "SIGHUP"),
            }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// Waits for one of the signals and names it.
    async fn wait(mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = recv(&mut self.int) => "SIGINT",
                _ = recv(&mut self.term) => "SIGTERM",
                _ = recv(&mut self.hup) => "SIGHUP",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervised task that panics is run again (here it panics twice, then ends).
    #[tokio::test(start_paused = true)]
    async fn a_supervised_task_that_panics_runs_again() {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let counted = runs.clone();
        supervise("test task", move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { assert!(n >= 2, "a bug") }
        })
        .await;
        std::panic::set_hook(hook);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}

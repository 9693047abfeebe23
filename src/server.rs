//! Start-up and shutdown: one validated [`Config`] in, a running server out.
//!
//! Shutdown order (SIGINT/SIGTERM or [`Server::stop`]): long-pollers are woken and answer
//! "no task"; the listener stops accepting and in-flight requests finish; the writer commits
//! and answers what is queued; the database is closed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::web::{LocalAddr, RemoteAddr};
use tokio::sync::oneshot;

use crate::api::{self, HttpOptions, State};
use crate::auth::Authenticator;
use crate::store::{OpenError, Store};
use crate::time::{Clock, SystemClock};

/// How long shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Config {
    pub db: PathBuf,
    pub bind: String,
    pub max_body_bytes: usize,
    pub cors_origin: Option<String>,
    pub clock: Arc<dyn Clock>,
    /// The first admin key, when the database has none (else one is generated).
    pub admin_key: Option<String>,
    /// Requests per key and minute; 0 turns rate limiting off.
    pub rate_limit_per_minute: u32,
    /// Lifetime of a new session.
    pub session_ttl: Duration,
    /// Size of the database page cache.
    pub cache_bytes: usize,
    /// How the database file is opened: the file itself, or (tests, drills) a
    /// [`Faulty`](crate::store::disk::Faulty) one.
    pub opener: crate::store::Opener,
}

impl Config {
    pub fn new(db: impl Into<PathBuf>, bind: impl Into<String>) -> Self {
        Config {
            db: db.into(),
            bind: bind.into(),
            max_body_bytes: 2 * 1024 * 1024,
            cors_origin: None,
            clock: Arc::new(SystemClock),
            admin_key: None,
            rate_limit_per_minute: 6000,
            session_ttl: Duration::from_secs(24 * 3600),
            cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            opener: Arc::new(crate::store::disk::file_backend),
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
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Opens the database, binds, and starts serving and the scheduler in the background.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let store = Store::open_with(
            &config.db,
            config.clock.clone(),
            config.cache_bytes,
            config.opener.clone(),
        )?;
        let auth = Arc::new(Authenticator::new(
            store.clone(),
            config.rate_limit_per_minute,
            config.session_ttl.as_millis() as i64,
        ));
        let generated_admin_key = match auth.bootstrap(config.admin_key.clone()).await {
            Ok(k) => k,
            Err(e) => {
                store.close();
                return Err(StartError::Bootstrap(e));
            }
        };
        let acceptor = Connections {
            inner: TcpListener::bind(config.bind.clone())
                .into_acceptor()
                .await
                .map_err(|e| StartError::Bind(config.bind.clone(), e))?,
            failures: 0,
            logged: None,
        };
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .ok_or_else(|| {
                StartError::Bind(
                    config.bind.clone(),
                    std::io::Error::other("no local address"),
                )
            })?;
        let state = Arc::new(State {
            metrics: crate::telemetry::install(),
            totals: Default::default(),
            store: store.clone(),
            auth: auth.clone(),
            started: Instant::now(),
        });
        let app = api::app(
            state.clone(),
            &HttpOptions {
                max_body_bytes: config.max_body_bytes,
                cors_origin: config.cors_origin.clone(),
            },
        );
        tokio::spawn(keep_scheduling(store.clone()));
        tokio::spawn(resume_deletes(store.clone()));
        tokio::spawn(crate::telemetry::upkeep(
            state.metrics.clone(),
            store.hub.clone(),
        ));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let hub = store.hub.clone();
        let done = tokio::spawn(async move {
            poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    async move {
                        let _ = stop_rx.await;
                        hub.shutdown();
                    },
                    Some(SHUTDOWN_GRACE),
                )
                .await
        });
        Ok(Server {
            addr,
            store,
            auth,
            generated_admin_key,
            stop: Some(stop_tx),
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

/// Accepts TCP connections, with Nagle's algorithm off (every answer is one small write that
/// an agent is waiting for, so it must leave at once) and TCP keep-alive on. An accept that fails (out of file
/// descriptors, most often: a fleet larger than the open-file limit) is retried after a
/// pause that doubles up to a second, and logged; poem's own loop would retry at once, and
/// spin a core for as long as the condition lasts.
struct Connections {
    inner: TcpAcceptor,
    /// Failed accepts in the current run of failures, and when it was last logged.
    failures: u64,
    logged: Option<Instant>,
}

/// TCP keep-alive on every connection: an agent whose machine died without closing its
/// connection (power loss, a network partition) would otherwise hold its socket, and a file
/// descriptor, forever. Probes start after 60 s without traffic and a silent peer is dropped
/// about 50 s later; a live peer's kernel answers them, so idle agents keep their connection.
fn keepalive() -> socket2::TcpKeepalive {
    let k = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    let k = k.with_interval(Duration::from_secs(10)).with_retries(5);
    k
}

/// The first pause after a failed accept, and the longest.
const ACCEPT_PAUSE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

impl Acceptor for Connections {
    type Io = tokio::net::TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let mut pause = ACCEPT_PAUSE.0;
        loop {
            match self.inner.accept().await {
                Ok(accepted) => {
                    let _ = accepted.0.set_nodelay(true);
                    let _ = socket2::SockRef::from(&accepted.0).set_tcp_keepalive(&keepalive());
                    if self.failures > 0 {
                        tracing::info!(failed = self.failures, "accepting connections again");
                        (self.failures, self.logged) = (0, None);
                    }
                    return Ok(accepted);
                }
                // The peer gave up before we took it: nothing to wait for.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.failures += 1;
                    if self
                        .logged
                        .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
                    {
                        self.logged = Some(Instant::now());
                        tracing::warn!(
                            error = %e,
                            failed = self.failures,
                            "cannot accept connections; if the error is \"Too many open files\", \
                             raise the open-file limit (systemd: LimitNOFILE)"
                        );
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ACCEPT_PAUSE.1);
                }
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
    let auth = Authenticator::new(store.clone(), 0, 0);
    let id = uuid::Uuid::now_v7().as_u128();
    let text = crate::auth::new_key_text(id);
    let added = async {
        let hash = auth.hash(text.clone()).await?;
        let new = crate::store::access::NewKey {
            id,
            name: name.to_string(),
            role: crate::model::Role::Admin,
            projects: None,
            hash,
        };
        store
            .write(move |w| crate::store::access::create_key(w, new))
            .await
    }
    .await;
    store.close();
    added.map_err(StartError::Bootstrap)?;
    Ok(text)
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), StartError> {
    let server = Server::start(config.clone()).await?;
    if let Some(key) = &server.generated_admin_key {
        // Printed once, on the first start of an empty database; only its hash is stored.
        eprintln!("\nagentq: created the first admin API key (shown only now, store it safely):\n\n    {key}\n\nSend it as `X-API-Key: <key>` or `Authorization: Bearer <key>`; create\nnarrower keys with POST /api/keys.\n");
    }
    tracing::info!(
        version = api::VERSION,
        db = %config.db.display(),
        addr = %server.addr,
        "agentq listening"
    );
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    server.stop().await;
    tracing::info!("database closed; bye");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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

    /// Accepted connections have Nagle off and TCP keep-alive on, with our timings.
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let mut acceptor = Connections {
            inner: TcpListener::bind("127.0.0.1:0")
                .into_acceptor()
                .await
                .unwrap(),
            failures: 0,
            logged: None,
        };
        let addr = *acceptor.local_addr()[0].as_socket_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, ..) = acceptor.accept().await.unwrap();
        assert!(stream.nodelay().unwrap());
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(10)
            );
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), 5);
        }
    }
}

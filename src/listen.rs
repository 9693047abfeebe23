//! Accepting connections and serving HTTP on them: our own loop around hyper, in place of
//! `poem::Server`, for three things poem does not let us set.
//!
//! - **Accept errors back off.** An accept that fails (out of file descriptors, most often:
//!   a fleet larger than the open-file limit) is retried after a pause that doubles up to a
//!   second, and logged; poem's loop retries at once and spins a core meanwhile.
//! - **Idle connections are closed.** A connection with no request in progress for
//!   [`Limits::idle`] (counted from its opening or from its last answer) is closed. That
//!   bounds what a client that connects and sends nothing, or trickles a request head byte
//!   by byte, can hold; a request in progress, a long-poll included, is never cut, and
//!   neither is an answer still being sent (a client slowly reading a large listing).
//! - **Request bodies must keep arriving.** A body that stalls (no byte for
//!   [`Limits::body`]) or trickles (below [`MIN_BODY_RATE`] on average, past its first
//!   [`Limits::body`]) fails its reader; the request is marked ([`BodyTimer`]) and answered
//!   408, and its connection closed, by the request frame. Without it, a request whose body
//!   never ends holds its connection (and a descriptor) forever, since a request in progress
//!   is never idle.
//! - **Sockets are tuned** as they are accepted: Nagle off, TCP keep-alive on.
//! - **The parser's own rejections carry the envelope.** A request hyper cannot parse (bad
//!   bytes in the request line or a header: 400; a URI too long: 414; headers too large: 431)
//!   is answered by hyper itself with an empty body before any handler runs. [`Rewriting`]
//!   replaces that answer on its way out with the one [`Reject`] makes (the error envelope, a
//!   correlation id, the security headers).
//!
//! HTTP/1.1 and HTTP/2 (prior knowledge) are served as poem served them; every request goes
//! to the one poem endpoint built by [`crate::api::app`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use poem::endpoint::DynEndpoint;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The endpoint every request goes to.
pub type App = Arc<dyn DynEndpoint<Output = poem::Response>>;

/// Makes the whole answer (head and body, HTTP/1.1) to a request the HTTP parser refused
/// with the given status: 400, 414 or 431.
pub type Reject = fn(u16) -> Vec<u8>;

/// How connections are bounded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Close a connection after this long without a request in progress; `None`: never.
    pub idle: Option<Duration>,
    /// The longest wait for more of a request body; `None`: no limit (see [`TimedBody`]).
    pub body: Option<Duration>,
    /// How long shutdown waits for requests in progress before it drops them.
    pub grace: Duration,
}

/// The listening socket, with the accept loop's back-off.
pub struct Listener {
    inner: TcpListener,
    /// Failed accepts in the current run of failures, and when it was last logged.
    failures: u64,
    logged: Option<Instant>,
}

/// The first pause after a failed accept, and the longest.
const ACCEPT_PAUSE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

impl Listener {
    pub async fn bind(addr: &str) -> std::io::Result<Listener> {
        Ok(Listener {
            inner: TcpListener::bind(addr).await?,
            failures: 0,
            logged: None,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next connection, with Nagle's algorithm off (every answer is one small write that
    /// an agent is waiting for, so it must leave at once) and TCP keep-alive on. Never fails:
    /// failed accepts are retried after a pause.
    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
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
                    return accepted;
                }
                // The peer gave up before we took it: nothing to wait for.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.failures += 1;
                    crate::telemetry::accept_failed();
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

/// TCP keep-alive on every connection: an agent whose machine died without closing its
/// connection (power loss, a network partition) would otherwise hold its socket, and a file
/// descriptor, until the idle limit. Probes start after 60 s without traffic and a silent
/// peer is dropped about 50 s later; a live peer's kernel answers them.
fn keepalive() -> socket2::TcpKeepalive {
    let k = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    let k = k.with_interval(Duration::from_secs(10)).with_retries(5);
    k
}

/// Serves `app` on every connection `listener` accepts until `shutdown` completes; then
/// stops accepting, lets the requests in progress finish (up to `limits.grace`, then drops
/// them), and returns.
pub async fn serve(
    mut listener: Listener,
    app: App,
    reject: Reject,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    // No hyper timer: HTTP/1's own header-read limit (which needs one) would also cut idle
    // keep-alive connections after 30 s; our idle limit covers both.
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let (close, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        // Reap the tasks of closed connections as we go.
        while connections.try_join_next().is_some() {}
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let conn = Arc::new(Connection {
            app: app.clone(),
            local: LocalAddr(Addr::SocketAddr(local)),
            remote: RemoteAddr(Addr::SocketAddr(remote)),
            activity: Activity::new(),
        });
        connections.spawn(serve_connection(
            builder.clone(),
            Rewriting::new(stream, reject),
            conn,
            closing.clone(),
            limits,
        ));
    }
    drop(listener);
    let _ = close.send(true);
    let drained = tokio::time::timeout(limits.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "requests still in progress after the shutdown grace period; dropping them"
        );
        connections.shutdown().await;
    }
}

/// How long an idle connection being closed may take to say goodbye.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the requests of one connection share.
struct Connection {
    app: App,
    local: LocalAddr,
    remote: RemoteAddr,
    activity: Activity,
}

impl Connection {
    /// Marks a request in progress until the guard is dropped (its answer sent, or the
    /// request abandoned by its client). The guard holds the request's handle on the
    /// connection.
    fn begin(self: Arc<Self>) -> Busy {
        self.activity.in_progress.fetch_add(1, Ordering::AcqRel);
        self.activity.touch();
        Busy(self)
    }
}

async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: Rewriting<TcpStream>,
    conn: Arc<Connection>,
    mut closing: watch::Receiver<bool>,
    limits: Limits,
) {
    let _open = crate::telemetry::connection_opened();
    let service = hyper::service::service_fn({
        let conn = conn.clone();
        move |req: hyper::Request<hyper::body::Incoming>| {
            let busy = conn.clone().begin();
            async move {
                let conn = &busy.0;
                let req = match limits.body {
                    Some(limit) if !req.body().is_end_stream() => {
                        let (mut parts, body) = req.into_parts();
                        let timer = BodyTimer::default();
                        parts.extensions.insert(timer.clone());
                        let body = TimedBody::new(body, limit, timer);
                        poem::Request::from_parts(
                            (
                                parts,
                                conn.local.clone(),
                                conn.remote.clone(),
                                poem::http::uri::Scheme::HTTP,
                            )
                                .into(),
                            http_body_util::combinators::BoxBody::new(body).into(),
                        )
                    }
                    _ => poem::Request::from((
                        req,
                        conn.local.clone(),
                        conn.remote.clone(),
                        poem::http::uri::Scheme::HTTP,
                    )),
                };
                let resp = conn.app.get_response(req).await;
                // Busy until its answer has been handed to the socket, not only made.
                let resp = hyper::Response::from(resp).map(|body| Sending {
                    body,
                    busy: Some(busy),
                });
                Ok::<_, Infallible>(resp)
            }
        }
    });
    let http = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(http);
    let idle = async {
        match limits.idle {
            Some(limit) => conn.activity.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle);
    let went_idle = tokio::select! {
        biased;
        _ = http.as_mut() => return,
        _ = &mut idle => true,
        _ = closing.wait_for(|closing| *closing) => false,
    };
    http.as_mut().graceful_shutdown();
    if went_idle {
        // Nothing in progress: closed politely (HTTP/2 says GOAWAY, so the client knows not
        // to reuse it), but a client in the middle of a request head (slowloris) gets no
        // more than a second of it before the socket is dropped.
        tracing::debug!(remote = %conn.remote, "closing an idle connection");
        crate::telemetry::connection_idle_closed();
        let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, http).await;
    } else {
        // Shutting down: an idle connection closes now, a busy one after its answer.
        let _ = http.await;
    }
}

/// A connection's stream that replaces hyper's own answer to a request it could not parse
/// (a head alone: `HTTP/1.1 400|414|431`, `content-length: 0`, none of the headers each
/// answer of ours carries) with the one `reject` makes. hyper writes that answer in one
/// piece and then closes the connection, so this happens at most once per connection; every
/// other write passes through after a look at its first bytes.
pub struct Rewriting<S> {
    inner: S,
    reject: Reject,
    /// The answer being written in place of hyper's: its bytes, how many are written, and
    /// the length of hyper's, reported as written once all of ours are.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<S> Rewriting<S> {
    pub fn new(inner: S, reject: Reject) -> Rewriting<S> {
        Rewriting {
            inner,
            reject,
            replacing: None,
        }
    }
}

/// The status of `buf` if it is hyper's own answer to a request it could not parse.
fn parser_rejection(buf: &[u8]) -> Option<u16> {
    if !buf.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let status = [(400, b"400 "), (414, b"414 "), (431, b"431 ")]
        .into_iter()
        .find(|(_, text)| buf.get(9..13) == Some(&text[..]))?
        .0;
    let has = |needle: &[u8]| buf.windows(needle.len()).any(|w| w == needle);
    (buf.ends_with(b"\r\n\r\n") && has(b"\r\ncontent-length: 0\r\n") && !has(b"x-correlation-id"))
        .then_some(status)
}

impl<S: tokio::io::AsyncWrite + Unpin> Rewriting<S> {
    /// Writes the replacement on its way; hyper's length once it is all written.
    fn write_replacement(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some((bytes, written, claimed)) = &mut self.replacing else {
            return Poll::Ready(Ok(0));
        };
        while *written < bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let claimed = *claimed;
        self.replacing = None;
        Poll::Ready(Ok(claimed))
    }

    /// Starts replacing `buf` if it is hyper's rejection: whether it is.
    fn replaces(&mut self, buf: &[u8]) -> bool {
        if self.replacing.is_some() {
            return true;
        }
        match parser_rejection(buf) {
            Some(status) => {
                crate::telemetry::request_unparsed(status);
                self.replacing = Some(((self.reject)(status), 0, buf.len()));
                true
            }
            None => false,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewriting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewriting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.replaces(buf) {
            return self.write_replacement(cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // hyper's rejection is a head alone: one slice.
        if let [only] = bufs {
            if self.replaces(only) {
                return self.write_replacement(cx);
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.replacing.is_some() {
            std::task::ready!(self.write_replacement(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.replacing.is_some() {
            std::task::ready!(self.write_replacement(cx))?;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An answer's body that keeps its connection busy until hyper has taken its last frame,
/// so that the idle limit does not cut a large answer that a slow client is still reading.
/// hyper takes the next frame only when its write buffer has room (a few hundred KiB), so
/// at most that much is still queued when the connection turns idle.
struct Sending<B> {
    body: B,
    busy: Option<Busy>,
}

impl<B: Body + Unpin> Body for Sending<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.busy = None;
        }
        polled
    }

    // Not the body's own answer: hyper would then drop it with its last frame, before that
    // frame is written, and ask no more.
    fn is_end_stream(&self) -> bool {
        self.busy.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The slowest a request body may arrive on average, in bytes a second, past its first
/// [`Limits::body`]: Apache's `mod_reqtimeout` default. A body of the largest size the server
/// takes (2 MiB by default) may so take up to about 70 minutes; one that trickles a byte now
/// and then is cut after about [`Limits::body`].
pub const MIN_BODY_RATE: u64 = 500;

/// Set once a request's body took too long (see [`TimedBody`]); a request extension, which
/// the request frame reads to answer 408 and close the connection.
#[derive(Clone, Default, Debug)]
pub struct BodyTimer(Arc<std::sync::atomic::AtomicBool>);

impl BodyTimer {
    /// Whether the body took too long.
    pub fn expired(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A request body that fails its reader with a `TimedOut` error when no byte of it came for
/// `limit`, or when it came slower than [`MIN_BODY_RATE`] past its first `limit`. The timer
/// starts only when the reader has to wait: a body that came with its head costs none.
struct TimedBody {
    inner: hyper::body::Incoming,
    limit: Duration,
    started: tokio::time::Instant,
    received: u64,
    /// The current wait's deadline; `rearm` after bytes came, for the next wait.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    rearm: bool,
    timer: BodyTimer,
}

impl TimedBody {
    fn new(inner: hyper::body::Incoming, limit: Duration, timer: BodyTimer) -> TimedBody {
        TimedBody {
            inner,
            limit,
            started: tokio::time::Instant::now(),
            received: 0,
            sleep: None,
            rearm: false,
            timer,
        }
    }

    /// When the wait that begins now ends: `limit` from now, or sooner if the body is below
    /// the minimum rate by then.
    fn deadline(&self) -> tokio::time::Instant {
        let stalled = tokio::time::Instant::now() + self.limit;
        let slow = self.started
            + self.limit
            + Duration::from_millis(self.received.saturating_mul(1000) / MIN_BODY_RATE);
        stalled.min(slow)
    }
}

impl Body for TimedBody {
    type Data = hyper::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.timer.expired() {
            return Poll::Ready(Some(Err(body_timed_out())));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
                self.rearm = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = self.deadline();
                let this = &mut *self;
                let sleep = match &mut this.sleep {
                    Some(sleep) => {
                        if std::mem::take(&mut this.rearm) {
                            sleep.as_mut().reset(deadline);
                        }
                        sleep
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timer.0.store(true, Ordering::Release);
                        crate::telemetry::body_timed_out();
                        Poll::Ready(Some(Err(body_timed_out())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn body_timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the request body did not arrive in time",
    )
}

/// Whether a connection has requests in progress, and since when it has had none.
struct Activity {
    /// tokio's clock, which tests can pause and advance.
    opened: tokio::time::Instant,
    in_progress: AtomicUsize,
    /// When the last request began or ended, in ms after `opened`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: tokio::time::Instant::now(),
            in_progress: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once no request has been in progress for `limit`. Wakes about once per
    /// `limit`, not per request.
    async fn idle_for(&self, limit: Duration) {
        let mut at = tokio::time::Instant::now() + limit;
        loop {
            tokio::time::sleep_until(at).await;
            let quiet = if self.in_progress.load(Ordering::Acquire) == 0 {
                let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
                self.opened.elapsed().saturating_sub(last)
            } else {
                Duration::ZERO
            };
            if quiet >= limit {
                return;
            }
            at = tokio::time::Instant::now() + (limit - quiet);
        }
    }
}

struct Busy(Arc<Connection>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.activity.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only hyper's own rejection is taken for one: not our answers of the same statuses
    /// (which carry a correlation id and a body), nor other statuses.
    #[test]
    fn only_the_parsers_own_rejections_are_replaced() {
        let hyper = |status: &str| {
            format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 21:12:37 GMT\r\n\r\n")
        };
        assert_eq!(
            parser_rejection(hyper("400 Bad Request").as_bytes()),
            Some(400)
        );
        assert_eq!(
            parser_rejection(hyper("414 URI Too Long").as_bytes()),
            Some(414)
        );
        assert_eq!(
            parser_rejection(hyper("431 Request Header Fields Too Large").as_bytes()),
            Some(431)
        );
        assert_eq!(parser_rejection(hyper("404 Not Found").as_bytes()), None);
        assert_eq!(parser_rejection(hyper("200 OK").as_bytes()), None);
        let ours = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-correlation-id: a-1\r\n\r\n";
        assert_eq!(parser_rejection(ours.as_bytes()), None);
        let with_body = "HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n";
        assert_eq!(parser_rejection(with_body.as_bytes()), None);
    }

    /// Accepted connections have Nagle off and TCP keep-alive on, with our timings.
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let mut listener = Listener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await;
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

    /// The idle watch ends only after `limit` with nothing in progress, counted from the
    /// end of the last request; a request in progress holds it off however long it takes.
    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_answer_and_never_during_a_request() {
        let app: App = Arc::new(poem::endpoint::ToDynEndpoint(poem::endpoint::make_sync(
            |_| poem::Response::default(),
        )));
        let addr = || Addr::SocketAddr(([127, 0, 0, 1], 0).into());
        let conn = Arc::new(Connection {
            app,
            local: LocalAddr(addr()),
            remote: RemoteAddr(addr()),
            activity: Activity::new(),
        });
        let limit = Duration::from_secs(10);
        let watch = tokio::spawn({
            let conn = conn.clone();
            async move { conn.activity.idle_for(limit).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let busy = conn.clone().begin();
        // A long request: far past the limit, and the connection stays.
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(!watch.is_finished());
        drop(busy);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!watch.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(watch.is_finished());
    }
}

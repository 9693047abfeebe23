//! The HTTP layer: the only module that knows about HTTP and JSON.
//!
//! Request flow: `frame` (correlation id, body limit, error envelope, security headers)
//! → poem-openapi operation (parses and type-checks the body; a body that does not parse is
//! explained field by field, see [`body`] and [`explain`]) → `validate` (field rules)
//! → `store.write(...)` (one group-committed transaction) or `store.read()` → wire type.
//! Authentication and rate limits run in `frame`, before the operation; authorization (the
//! caller's role and projects) in each operation.

pub mod body;
pub mod error;
pub mod explain;
pub mod keys;
pub mod leases;
pub mod mcp;
pub mod presence;
pub mod projects;
pub mod spec;
pub mod tasks;
pub mod types;
pub mod ui;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use poem::endpoint::ToDynEndpoint;
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::middleware::Cors;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};
use poem_openapi::{OpenApi, OpenApiService, Tags};

use crate::auth::{AuthError, Authenticator, Caller, RateInfo, Right};
use crate::model::{Project, ProjectStatus};
use crate::store::Store;
use crate::telemetry::{self, RequestTotals};
use metrics_exporter_prometheus::PrometheusHandle;
use types::*;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What every handler shares.
pub struct State {
    pub store: Arc<Store>,
    pub auth: Arc<Authenticator>,
    pub started: Instant,
    pub metrics: PrometheusHandle,
    pub totals: RequestTotals,
    /// When each agent last called (the agents listing's `lastSeenAt`).
    pub presence: presence::Presence,
}

impl State {
    /// Records a lease-protocol call of `agent` (a name of a valid length only).
    pub fn saw(&self, agent: &str) {
        if !agent.is_empty() && agent.len() <= validate::MAX_AGENT_NAME {
            self.presence.saw(agent, self.store.clock.now());
        }
    }

    /// Resolves a project and checks `right` on it: 404 if the caller cannot see it.
    pub fn project_for(&self, c: &Caller, right: Right, key: &str) -> poem::Result<Project> {
        let p = self.store.read()?.project(key)?;
        c.require_in(right, p.id, &format!("project {key}"))?;
        Ok(p)
    }

    /// Checks `right` on a task (by id). Unscoped callers see everything, so only scoped ones
    /// pay for reading the task first.
    pub fn check_task(&self, c: &Caller, right: Right, id: &str) -> poem::Result<()> {
        if c.scoped() {
            let t = self.store.read()?.task_row(id)?;
            c.require_in(right, t.project_id, &format!("task {id}"))?;
        } else {
            c.require(right)?;
        }
        Ok(())
    }

    /// The access check of a holder operation on a task, for a write that reads the task
    /// anyway: an unscoped caller's right is settled now (403 before the body's 400); the
    /// returned check runs in the write on the task it found, where a scoped caller gets 404
    /// outside its projects and then 403, as from [`State::check_task`], without a read of its
    /// own.
    pub fn holder_check(
        auth: &keys::Auth,
        right: Right,
        id: &str,
    ) -> poem::Result<impl FnOnce(&crate::model::Task) -> crate::error::Result<()> + Send + 'static>
    {
        if !auth.caller().scoped() {
            auth.caller().require(right)?;
        }
        let (caller, id) = (auth.caller_arc(), id.to_string());
        Ok(move |t: &crate::model::Task| {
            caller.require_in(right, t.project_id, &format!("task {id}"))
        })
    }

    /// The id of the task type `key` names in a project: an id as it is (a type that does not
    /// exist matches no task), a name looked up (404 if the project has no such type).
    pub fn type_id_in(
        &self,
        project: u128,
        project_name: &str,
        key: crate::store::write::TypeKey,
    ) -> poem::Result<u128> {
        use crate::store::write::TypeKey;
        match key {
            TypeKey::Id(id) => Ok(id),
            TypeKey::Name(name) => match self.store.read()?.type_id_by_name(project, &name)? {
                Some(id) => Ok(id),
                None => Err(crate::error::Error::NotFound(format!(
                    "task type {name} not found in project {project_name}"
                ))
                .into()),
            },
        }
    }

    /// Checks `right` on a task type (by id).
    pub fn check_type(&self, c: &Caller, right: Right, id: &str) -> poem::Result<()> {
        let t = self.store.read()?.task_type(id)?;
        c.require_in(right, t.project_id, &format!("task type {id}"))?;
        Ok(())
    }
}

#[derive(Tags)]
pub enum ApiTags {
    /// Projects: scoping, configuration and counters.
    Projects,
    /// Task types: templates and lease and retry rules.
    TaskTypes,
    /// Tasks.
    Tasks,
    /// The lease protocol.
    Leases,
    /// API keys and sessions.
    Access,
    /// Health.
    Operations,
}

pub struct SystemApi(pub Arc<State>);

#[OpenApi]
impl SystemApi {
    /// Liveness and storage health.
    #[oai(
        path = "/health",
        method = "get",
        operation_id = "health",
        tag = "ApiTags::Operations"
    )]
    async fn health(&self) -> HealthReply {
        let store = &self.0.store;
        // Degraded from a storage error until a write succeeds again (a file that opens again
        // on a disk that is still full fails the next write; the outage spans the reopening
        // too); unhealthy when it cannot be read.
        let outage = store.outage();
        let status = if outage.is_some() {
            "degraded"
        } else if store.read().and_then(|r| r.next_timer()).is_err() {
            "unhealthy"
        } else {
            "healthy"
        };
        let healthy = status == "healthy";
        let out = HealthOut {
            status: status.to_string(),
            timestamp: crate::time::format(store.clock.now()),
            version: VERSION.to_string(),
            uptime: self.0.started.elapsed().as_secs(),
            storage: StorageOut {
                healthy,
                provider: "redb".to_string(),
                path: store.path().display().to_string(),
                size_bytes: store.size_bytes(),
                failing_since: outage.as_ref().map(|o| crate::time::format(o.since)),
                error: outage.map(|o| o.cause),
            },
        };
        let env = SerdeJson(Envelope {
            success: healthy,
            data: out,
        });
        if healthy {
            HealthReply::Ok(env)
        } else {
            HealthReply::Unhealthy(env)
        }
    }
}

/// HTTP options.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub max_body_bytes: usize,
    pub cors_origin: Option<String>,
    /// Where the server listens: `/mcp`'s tools call the REST API there.
    pub addr: std::net::SocketAddr,
    /// Serve the dashboard ([`ui`]).
    pub ui: bool,
}

/// The whole HTTP application.
pub fn app(state: Arc<State>, opts: &HttpOptions) -> crate::listen::App {
    let service = OpenApiService::new(
        (
            SystemApi(state.clone()),
            projects::ProjectsApi(state.clone()),
            tasks::TasksApi(state.clone()),
            leases::LeasesApi(state.clone()),
            keys::KeysApi(state.clone()),
        ),
        "agentq",
        VERSION,
    )
    .description("A durable, fast task queue for AI agents.");
    let swagger = service.swagger_ui();
    let spec = spec::Spec::build(&service.spec());
    // A patch of the document that found nothing to patch is a field renamed without its
    // rule: every test that starts a server fails on it.
    debug_assert!(
        spec.unmatched.is_empty(),
        "OpenAPI patches without a target: {:?}",
        spec.unmatched
    );
    if !spec.unmatched.is_empty() {
        tracing::error!(unmatched = ?spec.unmatched, "OpenAPI patches without a target");
    }
    let spec = Arc::new(spec);
    let document = spec.json.clone();
    let max = opts.max_body_bytes;
    let frame_state = state.clone();
    let (m_state, j_state) = (state.clone(), state.clone());
    let route = Route::new()
        .at(
            "/metrics",
            // Off the async workers: with thousands of projects a scrape takes a while (5,000
            // projects: ~130 ms, 5.5 MB), which would stall the requests queued behind it.
            poem::endpoint::make(move |_| {
                let state = m_state.clone();
                async move {
                    let text = tokio::task::spawn_blocking(move || {
                        telemetry::render(
                            &state.metrics,
                            metrics_snapshot(&state.store),
                            state.started,
                        )
                    })
                    .await
                    .map_err(|e| {
                        poem::Error::from_string(e.to_string(), StatusCode::INTERNAL_SERVER_ERROR)
                    })?;
                    Ok::<_, poem::Error>(
                        Response::builder()
                            .content_type("text/plain; version=0.0.4; charset=utf-8")
                            .body(text),
                    )
                }
            }),
        )
        .at(
            "/metrics/json",
            poem::endpoint::make_sync(move |_| metrics_json(&j_state)),
        )
        .at(
            "/mcp",
            mcp::McpEndpoint::new(opts.addr, opts.cors_origin.as_deref(), max, &spec.json),
        )
        .nest("/api/docs", swagger)
        .at(
            "/api/openapi.json",
            poem::endpoint::make_sync(move |_| {
                Response::builder()
                    .content_type("application/json; charset=utf-8")
                    .body(document.clone())
            }),
        );
    let ui_on = opts.ui;
    let route = if ui_on { ui::mount(route) } else { route };
    let route = route
        .nest("/", service)
        // `/` itself: poem's nest at `/` answers it before any route at `/`.
        .around(move |ep, req| async move {
            if ui_on && req.uri().path() == "/" {
                return Ok(ui::redirect(&req));
            }
            ep.call(req).await.map(IntoResponse::into_response)
        })
        // A handler that panics (a bug) answers 500 in the envelope, through `frame`, instead
        // of dropping the connection.
        .with(poem::middleware::CatchPanic::new())
        .around(move |ep, req| frame(ep, req, max, frame_state.clone(), spec.clone()));
    // One endpoint or the other, not poem's `with_if`: its future is an enum as large as the
    // larger branch (CORS adds ~1.5 KB), moved whole on every request.
    match opts.cors_origin.as_deref().map(cors) {
        Some(cors) => {
            let plain = Arc::new(route);
            let crossed = plain.clone().with(cors);
            Arc::new(ToDynEndpoint(SameOriginOrCors { plain, crossed }))
        }
        None => Arc::new(ToDynEndpoint(route)),
    }
}

/// With `--cors-origin`, a request from the server's own origin (the dashboard's: browsers send
/// `Origin` on its POSTs) skips the CORS check, which would refuse it unless the operator also
/// listed the origin the server is reached at. Same origin: `Origin`'s host and port are the
/// request's `Host` (or, behind a proxy, `X-Forwarded-Host`).
struct SameOriginOrCors<P, C> {
    plain: Arc<P>,
    crossed: C,
}

impl<P: Endpoint, C: Endpoint> Endpoint for SameOriginOrCors<P, C> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if same_origin(req.headers()) {
            self.plain.call(req).await.map(IntoResponse::into_response)
        } else {
            self.crossed
                .call(req)
                .await
                .map(IntoResponse::into_response)
        }
    }
}

fn same_origin(h: &poem::http::HeaderMap) -> bool {
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(authority) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    ["x-forwarded-host", "host"].iter().any(|name| {
        h.get(*name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|host| host.eq_ignore_ascii_case(authority))
    })
}

/// CORS for `--cors-origin`: a comma-separated list of origins, each exact
/// (`https://ui.example`) or with `*` wildcards (`https://*.example.com`); `*` alone allows any
/// origin (credentials are headers, never cookies, so no origin gains a caller's rights).
/// Every entry is a valid header value (checked when the command line is parsed).
fn cors(origins: &str) -> Cors {
    let mut cors = Cors::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            "content-type",
            "authorization",
            "x-api-key",
            "x-correlation-id",
        ])
        .expose_headers(["x-correlation-id"]);
    let list: Vec<&str> = listed_origins(origins).collect();
    // No origin listed: poem's Cors allows any.
    if !list.contains(&"*") {
        for origin in list {
            cors = match origin.contains('*') {
                true => cors.allow_origin_regex(origin),
                false => cors.allow_origin(origin),
            };
        }
    }
    cors
}

/// The origins of a `--cors-origin` value: comma-separated, blanks ignored.
fn listed_origins(origins: &str) -> impl Iterator<Item = &str> {
    origins.split(',').map(str::trim).filter(|o| !o.is_empty())
}

/// Checks a `--cors-origin` value: each origin must be a valid header value (poem's `Cors`
/// panics on one that is not).
pub fn check_cors_origins(origins: &str) -> Result<String, String> {
    for o in listed_origins(origins) {
        if HeaderValue::from_str(o).is_err() {
            return Err(format!("{o:?} is not a valid origin"));
        }
    }
    Ok(origins.to_string())
}

/// The headers every answer carries, errors included.
pub(crate) const SECURITY_HEADERS: [(&str, &str); 3] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
];

/// A fresh correlation id: a per-process random prefix and a counter (unique within the
/// process, no system call per request).
pub(crate) fn new_correlation_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    format!(
        "{prefix:016x}-{:010x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A correlation id attached to the request.
#[derive(Clone)]
pub struct CorrelationId(pub String);

fn valid_correlation_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| s.to_string())
}

/// The most of an unread request body that is read and dropped to keep its connection open
/// (see `frame`). A larger one is left unread and the connection closes after the answer:
/// cheaper than reading it, and nothing of it is kept in memory either way.
const DISCARD_LIMIT: u64 = 64 * 1024;

/// Reads a request body that nothing will read to its end (up to [`DISCARD_LIMIT`]) and
/// drops it as it comes.
pub(crate) async fn discard(body: poem::Body) {
    use tokio::io::AsyncReadExt;
    let mut rest = body.into_async_read().take(DISCARD_LIMIT);
    let _ = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await;
}

/// Every request passes here: correlation id, body limit, the error envelope for anything
/// that failed (ours or the framework's), and the security headers.
async fn frame<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    max_body: usize,
    state: Arc<State>,
    spec: Arc<spec::Spec>,
) -> poem::Result<Response> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let route = spec.route(method.as_str(), &path);
    let cid = req
        .headers()
        .get("x-correlation-id")
        .and_then(valid_correlation_id)
        .unwrap_or_else(new_correlation_id);
    req.extensions_mut().insert(CorrelationId(cid.clone()));
    let body_timer = req.extensions().get::<crate::listen::BodyTimer>().cloned();
    let mut rate: Option<RateInfo> = None;
    let result = handle(&*ep, req, max_body, &state.auth, &spec, route, &mut rate)
        .await
        .map_err(|e| explain_refusal(e, &spec, method.as_str(), route.0));
    let mut resp = answer(result, body_timer.as_ref(), &cid);
    add_headers(&mut resp, &spec, &path, rate, &cid);
    record(
        &state,
        &method,
        route.0,
        resp.status().as_u16(),
        started,
        &cid,
    );
    Ok(resp)
}

/// Takes the request to its operation: the body's size and shape, the credential and rate
/// limit (when the request names an operation or sends a credential), then the operation.
/// `route` is the route template and whether the method names one of its operations.
async fn handle<E: Endpoint>(
    ep: &E,
    mut req: Request,
    max_body: usize,
    auth: &Authenticator,
    spec: &spec::Spec,
    route: (&'static str, bool),
    rate: &mut Option<RateInfo>,
) -> poem::Result<Response> {
    let has_body = prepare_body(&mut req, max_body).await?;
    // A body that nothing will read is read here and dropped (`discard`): a body sent where
    // the operation takes none (`retry`, a DELETE, a path that names no operation), or one
    // whose request is refused before its operation runs (401, 429). Left unread, it made
    // hyper close the connection after the answer whenever its bytes came after the headers,
    // and the client's next request on that connection failed (a broken pipe, which clients
    // do not retry for a POST).
    if has_body && !spec.takes_body(req.method().as_str(), route.0) && route.0 != "/mcp" {
        discard(req.take_body()).await;
    }
    // A request without a credential whose method and path name no operation skips this
    // and gets the framework's 404 or 405 (see `Spec::route`); one with a credential is
    // authenticated and counted as usual, so it carries the rate-limit headers. An OPTIONS
    // request is such a request too: a CORS preflight, when `--cors-origin` is given, is
    // answered before this frame.
    let named = route.1 || credential(&req).is_some();
    if named && !is_public(req.uri().path()) {
        match authenticate(&req, auth, rate).await {
            Ok(caller) => req.extensions_mut().insert(caller),
            Err(refused) => {
                if has_body {
                    discard(req.take_body()).await;
                }
                return Err(refused);
            }
        };
    }
    let writes = matches!(*req.method(), Method::POST | Method::PUT);
    if writes && !req.headers().contains_key(header::CONTENT_TYPE) {
        // curl and many scripts send JSON without a content type; it is the only one we take.
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    // Boxed: the endpoints' future (~3 KB) is then moved once, into its box, instead of with
    // every future that holds this one as poem's layers box them.
    Box::pin(ep.call(req))
        .await
        .map(IntoResponse::into_response)
}

/// Checks the body's declared size (413 past `max_body`), reads an empty POST body as `{}`,
/// and reads a chunked body whole (to its limit). Whether the request has a body.
async fn prepare_body(req: &mut Request, max_body: usize) -> poem::Result<bool> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let posts = *req.method() == Method::POST;
    match declared {
        Some(n) if n > max_body => return Err(error::PayloadTooLarge(max_body).into()),
        // An empty POST body reads as `{}`: bodies whose fields are all optional (cancel) may
        // be left out, and a missing required field is named in the 400. A PUT needs its body.
        Some(0) if posts => {
            req.headers_mut().remove(header::CONTENT_LENGTH);
            req.set_body("{}");
        }
        Some(_) => {}
        None if !chunked => {
            if posts {
                req.set_body("{}");
            }
        }
        None => {
            // Boxed: this future (~4 KB) would otherwise size every request's frame, and only
            // a chunked body awaits it.
            let body = Box::pin(req.take_body().into_bytes_limit(max_body))
                .await
                .map_err(|_| error::PayloadTooLarge(max_body))?;
            req.set_body(body);
        }
    }
    Ok(declared.is_some_and(|n| n > 0) || chunked)
}

/// The answer to send: the operation's, or the envelope for its failure (or for a
/// framework answer that is not JSON); 408 and a closed connection when the body timed out,
/// whatever its reader made of that (a 400 for a body cut short, say), as the rest of the
/// body may never come.
fn answer(
    result: poem::Result<Response>,
    body_timer: Option<&crate::listen::BodyTimer>,
    cid: &str,
) -> Response {
    if body_timer.is_some_and(crate::listen::BodyTimer::expired) {
        let mut resp = error::error_response(&error::RequestTimeout.into(), cid);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    match result {
        Ok(resp) if resp.status().as_u16() >= 400 && !is_json(&resp) => {
            error::error_response(&poem::Error::from_status(resp.status()), cid)
        }
        Ok(resp) => resp,
        Err(e) => error::error_response(&e, cid),
    }
}

/// The headers every answer carries (correlation id, security), and those its status or the
/// rate limit call for (`Allow` on 405, `Retry-After` on 503 and 429, the rate-limit trio).
fn add_headers(
    resp: &mut Response,
    spec: &spec::Spec,
    path: &str,
    rate: Option<RateInfo>,
    cid: &str,
) {
    let status = resp.status();
    let h = resp.headers_mut();
    if status == StatusCode::METHOD_NOT_ALLOWED {
        if let Some(allow) = spec
            .allowed(path)
            .and_then(|a| HeaderValue::from_str(&a).ok())
        {
            h.insert(header::ALLOW, allow);
        }
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Storage being reopened, or shutting down: worth asking again shortly (clients'
        // retry policies honour this).
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let Some(r) = rate {
        h.insert("x-ratelimit-limit", HeaderValue::from(r.limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(r.remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(r.reset));
        if !r.allowed {
            h.insert(header::RETRY_AFTER, HeaderValue::from(r.retry_after));
        }
    }
    if let Ok(v) = HeaderValue::from_str(cid) {
        h.insert("x-correlation-id", v);
    }
    for (name, value) in SECURITY_HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
}

/// Counts the request in the metrics and `/metrics/json`, and logs it at debug level.
fn record(
    state: &State,
    method: &Method,
    route: &'static str,
    status: u16,
    started: Instant,
    cid: &str,
) {
    let elapsed = started.elapsed();
    telemetry::http_request(method.as_str(), route, status, elapsed.as_secs_f64());
    state.totals.record(status, elapsed.as_micros() as u64);
    match status {
        429 => telemetry::rate_limited(),
        401 => telemetry::auth_failed(),
        _ => {}
    }
    tracing::debug!(
        method = %method,
        route,
        status,
        // Whole microseconds: `0.073`, not `0.07336000000000001`.
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        correlation_id = %cid,
        "request"
    );
}

/// What `/metrics` shows of the stored state, read on a snapshot.
fn metrics_snapshot(store: &Store) -> telemetry::Snapshot {
    let projects = store.read().ok().and_then(|r| {
        let (projects, _) = r.projects(None, &|_| true, usize::MAX, 0).ok()?;
        // A closed project hands out nothing: its tasks are not ready (as peek says).
        let ready = projects
            .iter()
            .filter(|(p, s)| p.status == ProjectStatus::Active && s.queued > s.delayed);
        let waits = r
            .longest_front_waits(ready.map(|(p, _)| p.id), store.clock.now())
            .unwrap_or_default();
        Some(
            projects
                .into_iter()
                .map(|(p, stats)| telemetry::ProjectGauges {
                    id: p.id,
                    queue_wait_ms: waits.get(&p.id).copied().unwrap_or(0),
                    name: p.name,
                    stats,
                })
                .collect(),
        )
    });
    telemetry::Snapshot {
        projects,
        long_poll_waiters: store.hub.waiters(),
        storage_size_bytes: store.size_bytes(),
        storage_writable: store.outage().is_none(),
    }
}

/// The seed's `/metrics/json` body.
fn metrics_json(state: &State) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let total = state.totals.total.load(Relaxed);
    let errors = state.totals.errors.load(Relaxed);
    let micros = state.totals.micros.load(Relaxed);
    let uptime = state.started.elapsed().as_secs_f64();
    let (rss, cpu_secs) = telemetry::process_usage();
    let sessions = state.store.session_count().unwrap_or(0);
    // Structs rather than `json!`, so the fields come out in the seed's order.
    #[derive(serde::Serialize)]
    struct Body {
        success: bool,
        data: Data,
    }
    #[derive(serde::Serialize)]
    struct Data {
        requests_total: u64,
        requests_success: u64,
        requests_error: u64,
        response_time_avg: f64,
        active_sessions: u64,
        system: System,
    }
    #[derive(serde::Serialize)]
    struct System {
        memory_usage: f64,
        cpu_usage: f64,
        uptime: u64,
    }
    let body = Body {
        success: true,
        data: Data {
            requests_total: total,
            requests_success: total - errors,
            requests_error: errors,
            response_time_avg: if total == 0 {
                0.0
            } else {
                micros as f64 / total as f64 / 1000.0
            },
            active_sessions: sessions,
            system: System {
                memory_usage: rss as f64 / 1_048_576.0,
                cpu_usage: if uptime > 0.0 {
                    cpu_secs / uptime * 100.0
                } else {
                    0.0
                },
                uptime: uptime.floor() as u64,
            },
        },
    };
    Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(serde_json::to_vec(&body).expect("the body serializes"))
}

/// Paths anyone may call without credentials.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/metrics" | "/metrics/json" | "/api/openapi.json"
    ) || path == "/api/docs"
        || path.starts_with("/api/docs/")
        || ui::is_ui_path(path)
}

/// The credential of a request: `X-API-Key`, else `Authorization: Bearer`.
fn credential(req: &Request) -> Option<&str> {
    crate::auth::credential(req.headers())
}

/// Authenticates the request and applies the per-address failure limit and the per-key
/// rate limit. `rate` receives what the headers should say.
async fn authenticate(
    req: &Request,
    auth: &Authenticator,
    rate: &mut Option<RateInfo>,
) -> poem::Result<Arc<Caller>> {
    let Some(cred) = credential(req).filter(|c| !c.is_empty()) else {
        return Err(crate::error::Error::Unauthorized(AuthError::Missing.to_string()).into());
    };
    let ip = req
        .remote_addr()
        .as_socket_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let caller = match auth.cached(cred) {
        Some(c) => c,
        None => {
            let _slowed = match auth.failures.check(ip, false).allowed {
                true => None,
                false => Some(auth.tarpit(ip).await),
            };
            match auth.authenticate(cred).await {
                Ok(c) => c,
                Err(AuthError::Store(e)) => return Err(e.into()),
                Err(e) => {
                    auth.failures.record(ip);
                    return Err(crate::error::Error::Unauthorized(e.to_string()).into());
                }
            }
        }
    };
    if auth.limiter.enabled() {
        let info = auth.limiter.check(caller.key_id, true);
        *rate = Some(info);
        if !info.allowed {
            if info.first_refused {
                // Once per key and window: an operator sees why a fleet slowed down.
                tracing::info!(
                    key = %uuid::Uuid::from_u128(caller.key_id),
                    limit = info.limit,
                    "a key reached its rate limit; its requests get 429 until the minute ends"
                );
            }
            return Err(error::RateLimited(format!(
                "rate limit of {} requests a minute per key reached (the server's \
                 --rate-limit-per-minute); retry after {} s",
                info.limit, info.retry_after
            ))
            .into());
        }
    }
    Ok(caller)
}

/// A body or parameter the framework refused, as the `validationDetails` of a 400 that
/// name what is at fault (poem-openapi's messages name the type it expected, not the field).
fn explain_refusal(
    e: poem::Error,
    spec: &spec::Spec,
    method: &str,
    route: &'static str,
) -> poem::Error {
    use poem_openapi::error::{ParseParamError, ParsePathError};
    let param = e
        .downcast_ref::<ParseParamError>()
        .map(|p| (p.name, p.reason.as_str()))
        .or_else(|| {
            e.downcast_ref::<ParsePathError>()
                .map(|p| (p.name, p.reason.as_str()))
        });
    // Only these refusals are explained; others (domain errors included) pass untouched.
    let fields = if let Some(refused) = e.downcast_ref::<body::BodyRefused>() {
        explain::explain(spec, method, route, &refused.body)
    } else if let Some((name, reason)) = param {
        vec![explain::param(spec, method, route, name, reason)]
    } else {
        return e;
    };
    if fields.is_empty() {
        e
    } else {
        crate::error::Error::Validation(fields).into()
    }
}

fn is_json(resp: &Response) -> bool {
    resp.content_type()
        .is_some_and(|c| c.starts_with("application/json"))
        || resp.status() == StatusCode::NOT_MODIFIED
}

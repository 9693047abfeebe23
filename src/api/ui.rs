//! The dashboard: a page and its assets (`ui/` in the repository), embedded in the binary at
//! compile time and served at `/ui/`; `/` and `/ui` redirect there.
//!
//! Everything the page asks for is relative to its own address (`app.js`, `../api/...`), so
//! it works unchanged behind a reverse proxy that serves agentq under a path prefix. The page
//! holds no credential but a session token in `sessionStorage`; it talks to the API like any
//! client, so the server's rights decide what it may do. Its answers carry a strict
//! Content-Security-Policy: scripts, styles and requests from this origin only, no inline
//! script or style, no framing.

use poem::http::{header, Method, StatusCode};
use poem::{Request, Response, Route};

/// What the dashboard's answers may load and do.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// (file name, content type, contents).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/app.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../ui/favicon.svg"),
    ),
];

/// Whether `path` is the dashboard's (it needs no credential: the page signs in itself).
pub fn is_ui_path(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// Adds the dashboard's routes (`/` is answered by [`redirect`] in front of the router).
pub fn mount(route: Route) -> Route {
    route
        .at("/ui", poem::endpoint::make_sync(|req| redirect(&req)))
        .at(
            "/ui/",
            poem::endpoint::make_sync(|req| asset(&req, "index.html")),
        )
        .at(
            "/ui/:file",
            poem::endpoint::make_sync(|req| {
                let file = req.uri().path().trim_start_matches("/ui/").to_string();
                asset(&req, &file)
            }),
        )
}

fn readable(req: &Request) -> Result<(), StatusCode> {
    match *req.method() {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(StatusCode::METHOD_NOT_ALLOWED),
    }
}

/// To `ui/`, relative, so that a path prefix in front of agentq is kept.
pub fn redirect(req: &Request) -> Response {
    if let Err(s) = readable(req) {
        return s.into();
    }
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, "ui/")
        .finish()
}

fn asset(req: &Request, file: &str) -> Response {
    if let Err(s) = readable(req) {
        return s.into();
    }
    let Some((_, content_type, body)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return StatusCode::NOT_FOUND.into();
    };
    let tag = etag();
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, tag)
            .finish();
    }
    Response::builder()
        .content_type(*content_type)
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        // Revalidated on each load: a new binary's page is never mixed with an old script.
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::ETAG, tag)
        .body(*body)
}

/// One tag for every asset of this build (they change together): a digest of them all.
fn etag() -> &'static str {
    use std::hash::{Hash, Hasher};
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ASSETS.hash(&mut h);
        format!("\"{:016x}\"", h.finish())
    })
}

//! `/mcp`: the MCP tools ([`crate::mcp`]) over MCP's streamable HTTP transport, on the API's
//! own port. `frame` has authenticated the request (a key or a session, as for the REST
//! API), counted it against the key's rate limit and will record it in `/metrics`; a tool
//! call then makes its verb's REST call to this same server with the request's credential, so
//! roles and project scope are the REST API's own, checked in one place.
//!
//! Host and Origin (the MCP specification's guard against DNS rebinding): on a loopback bind
//! only loopback `Host` and `Origin` values pass; on another bind `Host` is free and a browser's
//! `Origin` must be one of `--cors-origin` (none given: no browser origin passes).

use std::net::SocketAddr;
use std::sync::Arc;

use poem::{Endpoint, Request, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::client::Client;
use crate::mcp::Tools;

/// The `/mcp` endpoint.
pub struct McpEndpoint {
    service: StreamableHttpService<Tools, LocalSessionManager>,
}

impl McpEndpoint {
    /// The endpoint of a server listening on `addr`, with the `--cors-origin` list.
    pub fn new(
        addr: SocketAddr,
        cors_origin: Option<&str>,
        max_body: usize,
        document: &str,
    ) -> McpEndpoint {
        let loopback = addr.ip().is_loopback();
        // The tools call the REST API of this same process.
        let host = match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_string(),
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let client = Client::new(&format!("http://{host}:{}", addr.port()), None);
        let mut config =
            StreamableHttpServerConfig::default().with_max_request_body_bytes(max_body);
        config = if loopback {
            config.with_allowed_origins([
                "http://localhost:*",
                "https://localhost:*",
                "http://127.0.0.1:*",
                "https://127.0.0.1:*",
                "http://[::1]:*",
                "https://[::1]:*",
            ])
        } else {
            let origins: Vec<String> = cors_origin
                .map(|list| {
                    list.split(',')
                        .map(|o| o.trim().to_string())
                        .filter(|o| !o.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            config
                .disable_allowed_hosts()
                .with_allowed_origins(origins)
                .enforce_origin_validation()
        };
        let doc: Option<serde_json::Value> = serde_json::from_str(document).ok();
        let catalog = crate::mcp::catalog(doc.as_ref());
        let service = StreamableHttpService::new(
            move || Ok(Tools::new(client.clone(), catalog.clone())),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        McpEndpoint { service }
    }
}

impl Endpoint for McpEndpoint {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let req: poem::http::Request<_> = req.into();
        let resp = self.service.handle(req).await;
        let (parts, body) = resp.into_parts();
        let body =
            http_body_util::BodyExt::map_err(body, |never| -> std::io::Error { match never {} });
        Ok(poem::http::Response::from_parts(parts, body).into())
    }
}

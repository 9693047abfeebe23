//! An HTTP client of a running agentq: what the CLI verbs (and later `agentq work` and
//! `agentq mcp`) share. One request at a time, JSON in and out, the server's error envelope
//! turned into a [`ClientError`] that says which exit code it means.
//!
//! Boundary: knows the wire format (paths, the envelope) and nothing of the server's code.

use serde_json::Value;

/// Where the server is and how to call it.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

/// Why a call failed, as a person and a script need it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with its error envelope.
    #[error("{code} ({status}): {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
        /// `validationDetails`, one line each: `field: message`.
        details: Vec<String>,
    },
    /// No answer: the server is not there, or the connection broke.
    #[error("cannot reach {url}: {cause}")]
    Connection { url: String, cause: String },
    /// An answer that is not agentq's JSON.
    #[error("unexpected answer from {url} ({status}): {body}")]
    Unexpected {
        url: String,
        status: u16,
        body: String,
    },
}

impl ClientError {
    /// The exit code of the CLI for this failure: 3 not found, 4 conflict (every 409), 1 for
    /// the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Server { status: 404, .. } => 3,
            ClientError::Server { status: 409, .. } => 4,
            _ => 1,
        }
    }
}

/// An HTTP method of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Client {
    /// A client of the server at `base` (`http://host:port`), sending `key` when given.
    pub fn new(base: &str, key: Option<String>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            key,
            http: reqwest::Client::new(),
        }
    }

    /// The same server, called with another key.
    pub fn with_key(&self, key: &str) -> Client {
        Client {
            key: Some(key.to_string()),
            ..self.clone()
        }
    }

    /// Calls `path` (with its query) and answers the whole JSON body of a success.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let body = match body {
            Some(b) => Some(b.to_string()),
            None if method == Method::Post => Some("{}".to_string()),
            None => None,
        };
        let text = self.call_text(method, path, body).await?;
        serde_json::from_str(&text).map_err(|_| ClientError::Unexpected {
            url: format!("{}{path}", self.base),
            status: 200,
            body: text.chars().take(200).collect(),
        })
    }

    /// Calls `path` with a body that is JSON text already, and answers a success's JSON text
    /// as it came (for answers too large to want as a [`Value`]).
    pub async fn call_text(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            Method::Get => self.http.get(&url),
            Method::Post => self.http.post(&url),
            Method::Put => self.http.put(&url),
            Method::Delete => self.http.delete(&url),
        };
        if let Some(key) = &self.key {
            req = req.header("x-api-key", key);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.map_err(|e| ClientError::Connection {
            url: url.clone(),
            cause: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| ClientError::Connection {
            url: url.clone(),
            cause: e.to_string(),
        })?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(error_of(url, status, &text))
    }

    /// GETs `path` into the file `dest` as it streams (through `dest.partial`, renamed when
    /// whole), calling `progress(bytes so far, bytes announced in X-Backup-Bytes or 0)`.
    /// Answers the bytes written.
    pub async fn download(
        &self,
        path: &str,
        dest: &std::path::Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        use std::io::Write;
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(key) = &self.key {
            req = req.header("x-api-key", key);
        }
        let failed = |cause: String| ClientError::Connection {
            url: url.clone(),
            cause,
        };
        let mut resp = req.send().await.map_err(|e| failed(e.to_string()))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.text().await.unwrap_or_default();
            return Err(error_of(url, status, &text));
        }
        let total = resp
            .headers()
            .get("x-backup-bytes")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let partial = dest.with_extension("partial");
        let mut file = std::fs::File::create(&partial)
            .map_err(|e| failed(format!("cannot write {}: {e}", partial.display())))?;
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e.to_string()))? {
            file.write_all(&chunk)
                .map_err(|e| failed(format!("cannot write {}: {e}", partial.display())))?;
            written += chunk.len() as u64;
            progress(written, total);
        }
        file.sync_all()
            .and_then(|_| std::fs::rename(&partial, dest))
            .map_err(|e| failed(format!("cannot write {}: {e}", dest.display())))?;
        Ok(written)
    }

    /// The id of the task type `ty` (a name or an id) of `project`.
    pub async fn type_id(&self, project: &str, ty: &str) -> Result<String, ClientError> {
        let path = format!("/api/projects/{}/task-types?limit=1000", segment(project));
        let list = self.call(Method::Get, &path, None).await?;
        let types = list["data"].as_array().cloned().unwrap_or_default();
        types
            .iter()
            .find(|t| t["id"] == ty)
            .or_else(|| types.iter().find(|t| t["name"] == ty))
            .and_then(|t| t["id"].as_str().map(String::from))
            .ok_or_else(|| ClientError::Server {
                status: 404,
                code: "NOT_FOUND".into(),
                message: format!("task type {ty} not found in project {project}"),
                details: Vec::new(),
            })
    }
}

/// `text` as one segment of a URL path (ids and names are ASCII letters, digits, `-`, `_`;
/// anything else is percent-encoded).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The error of a call that did not succeed: the server's envelope, or what came instead.
fn error_of(url: String, status: u16, text: &str) -> ClientError {
    let Ok(json) = serde_json::from_str::<Value>(text) else {
        return ClientError::Unexpected {
            url,
            status,
            body: text.chars().take(200).collect(),
        };
    };
    let text_of = |field: &str| json[field].as_str().unwrap_or_default().to_string();
    let details = json["validationDetails"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    let field = d["field"].as_str().unwrap_or_default();
                    let message = d["message"].as_str().unwrap_or_default();
                    format!("{field}: {message}")
                })
                .collect()
        })
        .unwrap_or_default();
    ClientError::Server {
        status,
        code: text_of("code"),
        message: text_of("error"),
        details,
    }
}

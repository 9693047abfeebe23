//! The error envelope: every non-2xx response leaves through [`error_response`].
//!
//! Domain errors ([`crate::error::Error`]) and the framework's own rejections (malformed JSON,
//! bad parameters, unknown routes, 405, oversize bodies) are both mapped here, and only here,
//! to the contract's status, `code` and JSON body. Internal causes are logged, never returned.

use poem::error::ResponseError;
use poem::http::StatusCode;
use poem::Response;

use crate::error::{Error, FieldError};

impl ResponseError for Error {
    fn status(&self) -> StatusCode {
        status_and_code(self).0
    }
}

fn status_and_code(e: &Error) -> (StatusCode, &'static str) {
    match e {
        Error::Validation(_) => (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
        Error::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR"),
        Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        Error::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Error::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
        Error::LeaseLost(_) => (StatusCode::CONFLICT, "LEASE_LOST"),
        Error::ShuttingDown
        | Error::Storage(_)
        | Error::Unavailable(_)
        | Error::CommitUnknown(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
    }
}

/// The body too large (413), raised by the request frame before any handler runs.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {0} bytes")]
pub struct PayloadTooLarge(pub usize);

impl ResponseError for PayloadTooLarge {
    fn status(&self) -> StatusCode {
        StatusCode::PAYLOAD_TOO_LARGE
    }
}

/// A request body that did not arrive in time (408), raised by the request frame.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled or came too slowly (see --body-timeout-secs); the connection is closed")]
pub struct RequestTimeout;

impl ResponseError for RequestTimeout {
    fn status(&self) -> StatusCode {
        StatusCode::REQUEST_TIMEOUT
    }
}

/// Too many requests (429), raised by the request frame.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RateLimited(pub String);

impl ResponseError for RateLimited {
    fn status(&self) -> StatusCode {
        StatusCode::TOO_MANY_REQUESTS
    }
}

fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 | 405 => "NOT_FOUND",
        408 => "REQUEST_TIMEOUT",
        409 => "CONFLICT",
        413 => "PAYLOAD_TOO_LARGE",
        429 => "RATE_LIMITED",
        503 => "UNAVAILABLE",
        400..=499 => "VALIDATION_ERROR",
        _ => "INTERNAL_ERROR",
    }
}

/// The contract's error body, its fields in the contract's order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    success: bool,
    error: &'a str,
    code: &'a str,
    timestamp: String,
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    validation_details: Option<&'a [FieldError]>,
}

/// The answer to a write the storage refused before applying it.
const NOT_APPLIED: &str = "storage is unavailable; the request was not applied";

/// Builds the envelope for any error a request produced.
pub fn error_response(err: &poem::Error, correlation_id: &str) -> Response {
    let (status, code, message, details) = if let Some(e) = err.downcast_ref::<Error>() {
        let (status, code) = status_and_code(e);
        let details = match e {
            Error::Validation(d) | Error::Unprocessable(d) => Some(d.as_slice()),
            _ => None,
        };
        let message = match e {
            Error::Storage(cause) => {
                tracing::error!(correlation_id, cause = %cause, "storage failure");
                NOT_APPLIED.to_string()
            }
            // Refused while the file is opened again: its failure is logged once, not per
            // request (a fleet retrying on a full disk would flood the log).
            Error::Unavailable(cause) => {
                tracing::debug!(correlation_id, cause = %cause, "refused: storage unavailable");
                NOT_APPLIED.to_string()
            }
            Error::CommitUnknown(cause) => {
                tracing::error!(correlation_id, cause = %cause, "commit failure");
                "storage failed while making the request durable; it may have been applied: \
                 check before repeating it"
                    .to_string()
            }
            other => other.to_string(),
        };
        (status, code, message, details)
    } else {
        let status = err.status();
        let message = if status.is_server_error() {
            tracing::error!(correlation_id, error = %err, "internal error");
            "internal server error".to_string()
        } else if status == StatusCode::NOT_FOUND {
            "no such route".to_string()
        } else if status == StatusCode::METHOD_NOT_ALLOWED {
            "method not allowed on this route".to_string()
        } else {
            err.to_string()
        };
        let code = code_for_status(status);
        (status, code, message, None)
    };
    envelope(status, code, &message, details, correlation_id)
}

fn envelope(
    status: StatusCode,
    code: &str,
    message: &str,
    details: Option<&[FieldError]>,
    correlation_id: &str,
) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(envelope_json(code, message, details, correlation_id))
}

/// The envelope's JSON, stamped now.
fn envelope_json(
    code: &str,
    message: &str,
    details: Option<&[FieldError]>,
    correlation_id: &str,
) -> Vec<u8> {
    let body = Envelope {
        success: false,
        error: message,
        code,
        timestamp: crate::time::format(crate::time::Clock::now(&crate::time::SystemClock)),
        correlation_id,
        validation_details: details,
    };
    serde_json::to_vec(&body).expect("the envelope serializes")
}

/// The whole HTTP/1.1 answer to a request that the HTTP parser refused before any handler
/// could see it (see [`crate::listen::Reject`]): `status` 400 (a malformed request line, path
/// or header), 414 (a URI past 65,534 bytes) or 431 (more than 100 headers, or a head past
/// about 400 KB). In the envelope like every error, with a fresh correlation id and the
/// security headers; the connection closes after it.
pub fn rejected_request(status: u16) -> Vec<u8> {
    let (reason, code, message) = match status {
        414 => (
            "URI Too Long",
            "PAYLOAD_TOO_LARGE",
            "the request URI is too long (at most 65,534 bytes)",
        ),
        431 => (
            "Request Header Fields Too Large",
            "PAYLOAD_TOO_LARGE",
            "the request headers are too large (at most 100 headers and about 400 KB in all)",
        ),
        _ => (
            "Bad Request",
            "VALIDATION_ERROR",
            "malformed request: its request line, path or a header is not valid HTTP/1.1",
        ),
    };
    let correlation_id = super::new_correlation_id();
    let body = envelope_json(code, message, None, &correlation_id);
    let date = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ))
        .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\nx-correlation-id: {correlation_id}\r\n",
        body.len()
    );
    for (name, value) in super::SECURITY_HEADERS {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("date: {date}\r\n\r\n"));
    let mut answer = head.into_bytes();
    answer.extend_from_slice(&body);
    answer
}

/// The error side of every operation: any failure, carried to `frame` as a
/// `poem::Error` so that the envelope (with the request's correlation id) is built in one
/// place. Its only other job is to describe the error responses in the OpenAPI document.
pub struct ApiError(pub poem::Error);

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e.into())
    }
}

impl From<poem::Error> for ApiError {
    fn from(e: poem::Error) -> Self {
        ApiError(e)
    }
}

impl From<ApiError> for poem::Error {
    fn from(e: ApiError) -> Self {
        e.0
    }
}

/// One broken field rule.
#[derive(poem_openapi::Object)]
pub struct ValidationDetail {
    pub field: String,
    pub message: String,
    /// The offending value, when there is one.
    pub value: Option<serde_json::Value>,
}

/// The error envelope of every non-2xx response.
#[derive(poem_openapi::Object)]
#[oai(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Always false.
    pub success: bool,
    /// A human-readable message.
    pub error: String,
    /// VALIDATION_ERROR, UNAUTHORIZED, FORBIDDEN, NOT_FOUND, CONFLICT, LEASE_LOST,
    /// REQUEST_TIMEOUT, PAYLOAD_TOO_LARGE, RATE_LIMITED, UNAVAILABLE or INTERNAL_ERROR.
    pub code: String,
    pub timestamp: String,
    pub correlation_id: String,
    /// Present for validation errors only.
    #[oai(skip_serializing_if_is_none)]
    pub validation_details: Option<Vec<ValidationDetail>>,
}

impl poem_openapi::ApiResponse for ApiError {
    fn meta() -> poem_openapi::registry::MetaResponses {
        use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses};
        use poem_openapi::types::Type;
        // 405 is not here: it answers a method a path does not have, never an operation.
        let statuses: [(u16, &'static str); 11] = [
            (400, "Malformed JSON, a wrong type, or a broken field rule"),
            (401, "Missing or invalid credentials"),
            (403, "The credentials lack the right"),
            (404, "Not found (or not visible to these credentials)"),
            (
                409,
                "A state conflict (CONFLICT) or not the lease holder (LEASE_LOST)",
            ),
            (408, "The request body stalled or came too slowly"),
            (413, "Request body too large"),
            (415, "Request body is not JSON"),
            (422, "A task that does not fit its task type"),
            (429, "Rate limit reached"),
            (503, "Shutting down or storage unavailable"),
        ];
        MetaResponses {
            responses: statuses
                .into_iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: "application/json; charset=utf-8",
                        schema: ErrorBody::schema_ref(),
                    }],
                    // Both say when to ask again (the rate limit's window, or a second).
                    headers: match status {
                        429 | 503 => vec![poem_openapi::registry::MetaHeader {
                            name: "Retry-After".to_string(),
                            description: Some("Seconds to wait before asking again".to_string()),
                            required: true,
                            deprecated: false,
                            schema: u64::schema_ref(),
                        }],
                        _ => vec![],
                    },
                })
                .collect(),
        }
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        use poem_openapi::types::Type;
        ErrorBody::register(registry);
    }
}

//! [`JsonBody`]: the JSON request body of an operation.
//!
//! It is poem-openapi's `Json` payload (same content types, same parser, same schema in the
//! document) with one difference: a body that does not parse comes back as a
//! [`BodyRefused`] error that keeps the bytes. poem-openapi's message does not name the field
//! at fault, so the request frame hands those bytes to [`super::explain`], which does. The
//! bytes are in memory anyway (the parser reads the whole body), so a request that parses
//! pays nothing for this.

use poem::http::StatusCode;
use poem::{FromRequest, Request, RequestBody};
use poem_openapi::error::ContentTypeError;
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry};
use poem_openapi::types::{ParseFromJSON, Type};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde_json::Value;

/// A JSON request body of type `T`.
pub struct JsonBody<T>(pub T);

/// A request body that did not parse as its operation's type, with the body as sent.
#[derive(Debug, thiserror::Error)]
#[error("parse request payload error: {reason}")]
pub struct BodyRefused {
    pub reason: String,
    pub body: Vec<u8>,
}

/// A body sent with another content type than JSON (curl's `-d` sends a form type).
#[derive(Debug, thiserror::Error)]
#[error("request bodies are JSON: send `Content-Type: application/json` (this request sent `{0}`)")]
pub struct NotJson(pub String);

impl poem::error::ResponseError for NotJson {
    fn status(&self) -> StatusCode {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    }
}

impl poem::error::ResponseError for BodyRefused {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        // As poem-openapi's `Json`: application/json, or any application/*+json, with any
        // parameters.
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let Some((ty, sub)) = essence.split_once('/') else {
            return false;
        };
        ty.eq_ignore_ascii_case("application")
            && (sub.eq_ignore_ascii_case("json")
                || sub.len() > 5 && sub.as_bytes()[sub.len() - 5..].eq_ignore_ascii_case(b"+json"))
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: ParseFromJSON> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = T::IS_REQUIRED;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let data = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        let value = if data.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&data) {
                Ok(v) => v,
                Err(e) => return Err(refused(e.to_string(), data)),
            }
        };
        match T::parse_from_json(Some(value)) {
            Ok(v) => Ok(JsonBody(v)),
            Err(e) => Err(refused(e.into_message(), data)),
        }
    }
}

fn refused(reason: String, body: Vec<u8>) -> poem::Error {
    BodyRefused { reason, body }.into()
}

impl<'a, T: ParseFromJSON> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: <Self as Payload>::CONTENT_TYPE,
                schema: <Self as Payload>::schema_ref(),
            }],
            required: <Self as ParsePayload>::IS_REQUIRED,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(ct) if Self::check_content_type(ct) => {
                <Self as ParsePayload>::from_request(request, body).await
            }
            Some(ct) => {
                // Read and drop the body: left unread, it would cost the client its
                // connection (see `frame`).
                if let Ok(unread) = body.take() {
                    super::discard(unread).await;
                }
                Err(NotJson(ct.to_string()).into())
            }
            None => Err(ContentTypeError::ExpectContentType.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_as_poem_openapi_takes_them() {
        let ok = |ct| <JsonBody<String> as Payload>::check_content_type(ct);
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(ok("application/problem+json"));
        assert!(!ok("application/x-www-form-urlencoded"));
        assert!(!ok("text/json"));
        assert!(!ok("application/json-seq"));
        assert!(!ok("+json"));
        // A multi-byte subtype does not panic (header values reach here as visible ASCII).
        let _ = ok("application/é+json");
    }
}

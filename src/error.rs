//! The domain error: what went wrong, in terms a caller can act on.
//!
//! Storage, the lease engine and request validation all return [`Error`]; the API layer maps
//! each variant to the contract's status and `code` in exactly one place (`api::error`).
//! Internal causes (redb errors) are logged there and never returned to a client.

use crate::lease::LeaseError;

/// One field that broke a rule: the contract's `validationDetails` entry (serialized as
/// that entry).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
            value: None,
        }
    }

    pub fn with_value(mut self, value: impl Into<serde_json::Value>) -> Self {
        self.value = Some(value.into());
        self
    }
}

fn join(details: &[FieldError]) -> String {
    details
        .iter()
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Malformed or out-of-range input (400).
    #[error("Validation failed: {}", join(.0))]
    Validation(Vec<FieldError>),
    /// A well-formed task that does not fit its task type (422).
    #[error("Validation failed: {}", join(.0))]
    Unprocessable(Vec<FieldError>),
    /// No valid credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials without the right (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    LeaseLost(String),
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The database failed; the message is for logs only.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The database file failed earlier and is being opened again: refused at once. The
    /// failure itself was logged once, by the store; the message is for logs only.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The commit failed: whether it reached the disk is unknown (a failed fsync may leave
    /// it there). The message is for logs only.
    #[error("commit failure: {0}")]
    CommitUnknown(String),
}

impl Error {
    pub fn validation(field: &str, message: impl Into<String>) -> Error {
        Error::Validation(vec![FieldError::new(field, message)])
    }
}

impl From<LeaseError> for Error {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::LeaseLost(m) => Error::LeaseLost(m),
            LeaseError::Conflict(m) => Error::Conflict(m),
        }
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::from(redb::Error::from(e))
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Storage(format!("row decoding: {e}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

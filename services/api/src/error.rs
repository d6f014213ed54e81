//! The API's one error type, mapped to an HTTP status (`http.rs`) and a gRPC code (`grpc.rs`)
//! in exactly one place each.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request names something malformed (400, INVALID_ARGUMENT).
    #[error("{0}")]
    BadRequest(String),
    /// No such message or entry (404, NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Missing or wrong bearer token (401, UNAUTHENTICATED).
    #[error("a valid bearer token is required")]
    Unauthenticated,
    /// JetStream could not answer (503, UNAVAILABLE).
    #[error("JetStream: {0}")]
    Unavailable(String),
    /// A start-up problem: configuration, a listener that cannot bind.
    #[error("{0}")]
    Setup(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Serve(String),
}

impl From<herald_core::Error> for ApiError {
    fn from(e: herald_core::Error) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl ApiError {
    /// A short machine-readable name, the `error` field of JSON answers.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Setup(_) | ApiError::Bind { .. } | ApiError::Serve(_) => "internal",
        }
    }
}

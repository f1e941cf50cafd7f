//! The one place errors become HTTP: a status and `{"error":{"code":"…","message":"…"}}` with a stable
//! code. A 5xx says nothing internal; its full cause chain is logged here, once.

use crate::metrics::Metrics;
use crate::pipeline::enqueue::EnqueueError;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// Well-formed JSON with wrong types, missing or unknown fields, or invalid values.
    #[error("{0}")]
    Invalid(String),
    /// Missing or unknown API key.
    #[error("missing or unknown API key")]
    Unauthorized,
    /// A user's socket token missing, malformed, forged or expired (the inbox).
    #[error("{0}")]
    TokenRefused(String),
    /// A body, a batch or an event's data over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// The route exists; what it names does not (or is not enabled on this node).
    #[error("{0}")]
    Missing(String),
    /// The route exists, not with this method (the `Allow` header lists those it has).
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// A limit on concurrent work (replay jobs) is reached; retry later.
    #[error("{0}")]
    Busy(String),
    /// The request (or its body) took too long.
    #[error("{0}")]
    Timeout(String),
    /// Temporarily unable to accept: overloaded, shutting down, or a dependency is down.
    #[error("{0}")]
    Unavailable(String),
    /// An unexpected failure (details only in the log).
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Self::Unauthorized | Self::TokenRefused(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::NotFound | Self::Missing(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// Every error answer's body: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `malformed_json`, `invalid_request`, `unauthorized`,
    /// `payload_too_large`, `not_found`, `method_not_allowed`, `too_many_requests`,
    /// `request_timeout`, `unavailable`, `internal`.
    #[schema(example = "invalid_request")]
    pub code: String,
    /// For people; a 5xx says nothing internal.
    pub message: String,
}

/// The error code of a response, left in its extensions for the metrics middleware.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// Middleware: counts every error response under its code.
pub async fn count_errors(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics.api_error(code);
    }
    response
}

/// The answer of the API's tower middleware when it refuses a request: shed at the concurrency
/// limit (503), or past the request timeout (408).
pub async fn from_middleware(error: tower::BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable("too many requests in progress on this node; retry later".into())
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::Timeout("the request took too long".into())
    } else {
        ApiError::Internal(error)
    }
}

impl From<EnqueueError> for ApiError {
    fn from(error: EnqueueError) -> Self {
        match error {
            EnqueueError::StoreFailed => Self::Internal(Box::new(error)),
            EnqueueError::Refused(_) => Self::Invalid(error.to_string()),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<super::request::Rejection> for ApiError {
    fn from(rejection: super::request::Rejection) -> Self {
        use super::request::Rejection;
        match rejection {
            Rejection::Invalid(why) => Self::Invalid(why),
            Rejection::TooLarge(why) => Self::TooLarge(why),
        }
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(error: crate::store::Error) -> Self {
        if let crate::store::Error::Invalid(why) = error {
            return Self::Invalid(why);
        }
        if error.is_unavailable() {
            Self::Unavailable("the event store is unavailable; retry later".into())
        } else if error.is_transient() {
            Self::Unavailable("the event store was busy and did nothing; retry later".into())
        } else {
            Self::Internal(Box::new(error))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            Self::Internal(source) => {
                tracing::error!(error = ?source, "request failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
            },
        });
        let mut response = if status == StatusCode::SERVICE_UNAVAILABLE {
            (status, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (status, body).into_response()
        };
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

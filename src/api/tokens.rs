//! `POST /api/v1/tokens`: a backend mints a socket token for one of its users and hands it to that
//! user's client.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Authenticated};
use crate::event::UserId;
use crate::token::now_unix_secs;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

/// The request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The user the token is for (a string; an integer is accepted).
    #[serde(deserialize_with = "super::request::string_or_integer")]
    #[schema(schema_with = super::openapi::user_id_schema)]
    user_id: String,
    /// Lifetime in seconds, at least 1; defaults to (and is capped at) `socket.token_ttl_secs`.
    /// Signed 64-bit, as the document says: a larger number is refused, not capped.
    #[serde(default)]
    #[schema(minimum = 1)]
    ttl_secs: Option<i64>,
}

/// The answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// The socket token: for the socket's `token` parameter, and as the inbox's bearer.
    token: String,
    /// The user it names.
    #[schema(value_type = String)]
    user_id: UserId,
    /// Unix seconds.
    expires_at: u64,
}

/// `POST /api/v1/tokens`.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "producer",
    request_body = TokenRequest,
    security(("producer_key" = [])),
    responses(
        (status = 200, description = "A signed socket token", body = TokenResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 422, description = "A bad `user_id` or `ttl_secs`, or an unknown field", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<ApiState>,
    Authenticated(_producer): Authenticated,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let user_id = UserId::parse(request.user_id)
        .map_err(|why| ApiError::Invalid(format!("user_id: {why}")))?;
    let max = state.limits.max_token_ttl_secs;
    let ttl = match request.ttl_secs {
        None => max,
        Some(asked) => u64::try_from(asked)
            .ok()
            .filter(|ttl| *ttl >= 1)
            .ok_or_else(|| ApiError::Invalid("ttl_secs: must be at least 1".into()))?
            .min(max),
    };
    if ttl == 0 {
        return Err(ApiError::Invalid("ttl_secs: must be at least 1".into()));
    }
    let expires_at = now_unix_secs() + ttl;
    let token = state.signer.sign(&user_id, expires_at);
    Ok(Json(TokenResponse {
        token,
        user_id,
        expires_at,
    }))
}

//! `POST /api/v1/tokens`: a backend mints a socket token for one of its users and hands it to that
//! user's client.

use super::ApiState;
use super::error::ApiError;
use super::extract::{ApiJson, Authenticated};
use crate::event::UserId;
use crate::socket::token::now_unix_secs;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

/// The request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[serde(deserialize_with = "super::request::string_or_integer")]
    user_id: String,
    /// Lifetime; defaults to (and is capped at) `socket.token_ttl_secs`.
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// The answer.
#[derive(Serialize)]
pub struct TokenResponse {
    token: String,
    user_id: UserId,
    /// Unix seconds.
    expires_at: u64,
}

/// `POST /api/v1/tokens`.
pub async fn create(
    State(state): State<ApiState>,
    Authenticated(_producer): Authenticated,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let user_id = UserId::parse(request.user_id)
        .map_err(|why| ApiError::Invalid(format!("user_id: {why}")))?;
    let max = state.limits.max_token_ttl_secs;
    let ttl = request.ttl_secs.unwrap_or(max).min(max);
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

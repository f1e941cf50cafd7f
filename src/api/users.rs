//! `POST /api/v1/users/{user_id}/disconnect`: closes every socket of a user (code 1001), e.g. after
//! the user logged out or lost access. Tokens are stateless and stay valid until they expire, so a
//! backend revoking access must also stop handing out tokens; clients that reconnect with an old
//! token are let in again until it expires.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, Authenticated};
use crate::event::{DISCONNECT_EVENT, UserId};
use crate::pubsub::Message;
use axum::Json;
use axum::extract::State;
use serde::Serialize;

/// The answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DisconnectResponse {
    /// The user.
    #[schema(value_type = String)]
    user_id: UserId,
    /// Sockets told to close. In cluster mode 1 when a socket node binds a bucket of the fan-out
    /// message that carried the disconnect (it may carry other users' broadcasts), else 0.
    connections: usize,
}

/// Broadcasts `disconnect` on the user's socket id.
#[utoipa::path(
    post,
    path = "/api/v1/users/{user_id}/disconnect",
    tag = "producer",
    params(("user_id" = String, Path, description = "The user whose sockets close")),
    security(("producer_key" = [])),
    responses(
        (status = 200, description = "Every socket of the user was told to close (1001)", body = DisconnectResponse),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 422, description = "Not a valid user id", body = ErrorBody),
    )
)]
pub async fn disconnect(
    State(state): State<ApiState>,
    Authenticated(_producer): Authenticated,
    ApiPath(user_id): ApiPath<String>,
) -> Result<Json<DisconnectResponse>, ApiError> {
    let user =
        UserId::parse(user_id).map_err(|why| ApiError::Invalid(format!("user_id: {why}")))?;
    let message = Message::control(&user.socket_id(), DISCONNECT_EVENT, "{}");
    let reach = state
        .pubsub
        .broadcast(message)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(DisconnectResponse {
        user_id: user,
        connections: reach.delivered,
    }))
}

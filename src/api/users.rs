//! `POST /api/v1/users/{user_id}/disconnect`: closes every socket of a user (code 1001), e.g. after
//! the user logged out or lost access. Tokens are stateless and stay valid until they expire, so a
//! backend revoking access must also stop handing out tokens; clients that reconnect with an old
//! token are let in again until it expires.

use super::ApiState;
use super::error::ApiError;
use super::extract::Authenticated;
use crate::event::{DISCONNECT_EVENT, UserId};
use crate::pubsub::Message;
use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

/// Broadcasts `disconnect` on the user's socket id.
pub async fn disconnect(
    State(state): State<ApiState>,
    Authenticated(_producer): Authenticated,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user =
        UserId::parse(user_id).map_err(|why| ApiError::Invalid(format!("user_id: {why}")))?;
    let message = Message::control(&user.socket_id(), DISCONNECT_EVENT, "{}");
    let reach = state
        .pubsub
        .broadcast(message)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(
        json!({ "user_id": user, "connections": reach.delivered }),
    ))
}

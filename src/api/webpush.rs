//! Web Push subscriptions, for a user's browser: with the user's socket token as bearer, a page
//! reads the node's VAPID public key (its `applicationServerKey`), registers the subscription
//! `PushManager.subscribe()` gave it, lists the user's subscriptions and deletes one. The token
//! names the user, so no request can reach another user's subscriptions. A subscription is checked
//! before it is stored (an endpoint this node may send to, keys a payload can be encrypted to:
//! [`crate::webpush::subscription`]); a user keeps at most `webpush.max_subscriptions_per_user`,
//! the oldest going first.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, UserToken};
use crate::store::Subscription;
use crate::webpush::guard::EndpointPolicy;
use crate::webpush::subscription::SubscriptionInput;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// What the API needs of Web Push: present when the node has a VAPID key.
#[derive(Clone, Debug)]
pub struct WebPushApi {
    /// The VAPID public key, base64url.
    pub public_key: String,
    /// Which endpoints are accepted.
    pub policy: EndpointPolicy,
    /// Subscriptions kept per user.
    pub max_per_user: u32,
}

/// The node's VAPID public key.
#[derive(Debug, Serialize, ToSchema)]
pub struct VapidPublicKey {
    /// Uncompressed P-256 point, base64url: pass it as `applicationServerKey` to
    /// `PushManager.subscribe()`.
    public_key: String,
}

/// A subscription as its user sees it (the keys are not shown again).
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// Its id: what `DELETE` takes.
    id: Uuid,
    /// The push service's URL for the browser.
    endpoint: String,
    /// When it was registered (last registered again), Unix ms.
    created_at: i64,
}

/// The user's subscriptions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    /// Newest first.
    subscriptions: Vec<SubscriptionView>,
}

impl From<Subscription> for SubscriptionView {
    fn from(s: Subscription) -> Self {
        Self {
            id: s.id,
            endpoint: s.endpoint,
            created_at: s.created_at_ms,
        }
    }
}

fn enabled(state: &ApiState) -> Result<&WebPushApi, ApiError> {
    state.webpush.as_deref().ok_or_else(|| {
        ApiError::Missing(
            "Web Push is not enabled on this node (webpush.vapid_private_key is not set)".into(),
        )
    })
}

/// `GET /api/v1/webpush/key`: the VAPID public key a page subscribes with.
#[utoipa::path(
    get,
    path = "/api/v1/webpush/key",
    tag = "webpush",
    responses(
        (status = 200, description = "The key", body = VapidPublicKey),
        (status = 404, description = "Web Push is not enabled on this node", body = ErrorBody),
    )
)]
pub async fn public_key(State(state): State<ApiState>) -> Result<Json<VapidPublicKey>, ApiError> {
    let webpush = enabled(&state)?;
    Ok(Json(VapidPublicKey {
        public_key: webpush.public_key.clone(),
    }))
}

/// `POST /api/v1/webpush/subscriptions`: registers the token's user's browser subscription (the
/// JSON of `PushSubscription.toJSON()`); the same endpoint again takes its new keys.
#[utoipa::path(
    post,
    path = "/api/v1/webpush/subscriptions",
    tag = "webpush",
    request_body = SubscriptionInput,
    security(("user_token" = [])),
    responses(
        (status = 201, description = "Registered (or registered again)", body = SubscriptionView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing, malformed, forged or expired socket token", body = ErrorBody),
        (status = 404, description = "Web Push is not enabled on this node", body = ErrorBody),
        (status = 422, description = "An endpoint this node does not send to (not https, a private address, not a known push service) or keys of the wrong form", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the node overloaded; retry", body = ErrorBody),
    )
)]
#[tracing::instrument(name = "webpush_subscribe", skip_all, fields(user_id = %user.0))]
pub async fn subscribe(
    State(state): State<ApiState>,
    user: UserToken,
    ApiJson(input): ApiJson<SubscriptionInput>,
) -> Result<(StatusCode, Json<SubscriptionView>), ApiError> {
    let webpush = enabled(&state)?;
    let checked = input
        .check(&webpush.policy)
        .map_err(|why| ApiError::Invalid(why.to_string()))?;
    let stored = state
        .store
        .subscribe_webpush(
            user.0.as_str(),
            &checked.endpoint,
            &checked.p256dh,
            &checked.auth,
            webpush.max_per_user,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(stored.into())))
}

/// `GET /api/v1/webpush/subscriptions`: the token's user's subscriptions.
#[utoipa::path(
    get,
    path = "/api/v1/webpush/subscriptions",
    tag = "webpush",
    security(("user_token" = [])),
    responses(
        (status = 200, description = "Newest first", body = SubscriptionList),
        (status = 401, description = "Missing, malformed, forged or expired socket token", body = ErrorBody),
        (status = 404, description = "Web Push is not enabled on this node", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the node overloaded; retry", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<ApiState>,
    user: UserToken,
) -> Result<Json<SubscriptionList>, ApiError> {
    enabled(&state)?;
    let subscriptions = state.store.webpush_subscriptions(user.0.as_str()).await?;
    Ok(Json(SubscriptionList {
        subscriptions: subscriptions.into_iter().map(Into::into).collect(),
    }))
}

/// `DELETE /api/v1/webpush/subscriptions/{id}`: removes one of the token's user's subscriptions
/// (and the pushes waiting for it).
#[utoipa::path(
    delete,
    path = "/api/v1/webpush/subscriptions/{id}",
    tag = "webpush",
    params(("id" = Uuid, Path, description = "The subscription's id")),
    security(("user_token" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing, malformed, forged or expired socket token", body = ErrorBody),
        (status = 404, description = "The user has no subscription by that id, or Web Push is not enabled", body = ErrorBody),
        (status = 422, description = "The id is not a UUID", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the node overloaded; retry", body = ErrorBody),
    )
)]
pub async fn unsubscribe(
    State(state): State<ApiState>,
    user: UserToken,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    enabled(&state)?;
    if state.store.unsubscribe_webpush(user.0.as_str(), id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Missing(format!(
            "no subscription {id} for this user"
        )))
    }
}

//! The HTTP API for producers and operators (axum): enqueue events (single and batch), read one's
//! own event, mint socket tokens, health checks, the admin API (list and inspect events, replay
//! jobs) behind keys with the admin role, the user inbox behind a user's socket token, and the
//! OpenAPI document of all of it. Handlers validate input into `event` types once, here at the edge;
//! every failure is an [`error::ApiError`], mapped to HTTP in one place.

mod admin;
pub mod console;
pub mod error;
mod events;
mod extract;
pub mod health;
mod inbox;
pub mod openapi;
pub mod request;
pub mod scrape;
mod tokens;
mod users;
pub mod webpush;

pub use extract::{ApiJson, KeyCache};

use crate::metrics::Metrics;
use crate::pipeline::enqueue::Enqueue;
use crate::pipeline::replay::ReplayJobs;
use crate::pubsub::PubSub;
use crate::queue::DepthProbe;
use crate::store::Store;
use crate::token::TokenSigner;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;

/// Limits the API enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Largest `data` of one event, serialised.
    pub max_data_bytes: usize,
    /// Longest token lifetime.
    pub max_token_ttl_secs: u64,
    /// API requests in progress at once; one more is answered 503 at once.
    pub max_concurrent_requests: usize,
    /// Bound on one request, body included; beyond it 408.
    pub request_timeout: Duration,
}

impl Limits {
    /// The limits an event request is validated against.
    pub fn request(&self) -> request::RequestLimits {
        request::RequestLimits {
            max_batch_events: self.max_batch_events,
            max_data_bytes: self.max_data_bytes,
        }
    }
}

/// What handlers share; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// PostgreSQL (key lookups, readiness).
    pub store: Store,
    /// The group-commit front.
    pub enqueue: Enqueue,
    /// Metrics.
    pub metrics: Metrics,
    /// API key lookups.
    pub keys: Arc<KeyCache>,
    /// Mints socket tokens.
    pub signer: TokenSigner,
    /// Limits.
    pub limits: Arc<Limits>,
    /// For operator broadcasts (disconnecting a user's sockets).
    pub pubsub: PubSub,
    /// Admin key lookups (a separate cache: a key's admin role is looked up on its own).
    pub admin_keys: Arc<KeyCache>,
    /// The node's replay jobs (admin API).
    pub replays: ReplayJobs,
    /// Replay rate when a job names none.
    pub default_replay_rate: u32,
    /// Ready messages per partition queue, for the console.
    pub depths: Arc<DepthProbe>,
    /// Web Push subscriptions (a node with a VAPID key).
    pub webpush: Option<Arc<webpush::WebPushApi>>,
}

impl axum::extract::FromRef<ApiState> for Arc<Limits> {
    fn from_ref(state: &ApiState) -> Self {
        Arc::clone(&state.limits)
    }
}

/// The API's routes before their state and bounds: what [`routes`] serves and what the OpenAPI
/// document is checked against (`openapi`'s tests), so a route cannot go undocumented.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/events", post(events::create))
        .route("/api/v1/events/batch", post(events::create_batch))
        .route("/api/v1/events/{id}", get(events::get_one))
        .route("/api/v1/tokens", post(tokens::create))
        .route(
            "/api/v1/users/{user_id}/disconnect",
            post(users::disconnect),
        )
        .route("/api/v1/inbox", get(inbox::list))
        .route("/api/v1/inbox/read", post(inbox::mark_read))
        .route("/api/v1/webpush/key", get(webpush::public_key))
        .route(
            "/api/v1/webpush/subscriptions",
            post(webpush::subscribe).get(webpush::list),
        )
        .route(
            "/api/v1/webpush/subscriptions/{id}",
            axum::routing::delete(webpush::unsubscribe),
        )
        .route("/api/v1/admin/events", get(admin::list_events))
        .route("/api/v1/admin/events/{id}", get(admin::get_event))
        .route("/api/v1/admin/replays", post(admin::start_replay))
        .route("/api/v1/admin/replays/{id}", get(admin::get_replay))
        .route("/api/v1/admin/stats", get(admin::stats))
        .route(openapi::PATH, get(openapi::serve))
        .method_not_allowed_fallback(method_not_allowed)
}

/// The API routes. At most `limits.max_concurrent_requests` run at once: one more is shed at once
/// with 503 and `Retry-After`, rather than queued (a queue of requests is memory, and a producer
/// retries as well as Herald waits). Each is bounded by `limits.request_timeout`.
pub fn routes(state: ApiState) -> Router {
    let max_body = state.limits.max_body_bytes;
    let metrics = state.metrics.clone();
    // One semaphore for every route: a plain concurrency limit layer would give each route its own.
    let in_flight = Arc::new(Semaphore::new(state.limits.max_concurrent_requests));
    let bounds = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(error::from_middleware))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(in_flight))
        .timeout(state.limits.request_timeout);
    router()
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
        .layer(bounds)
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            error::count_errors,
        ))
}

/// Answers unknown routes with the JSON error body.
pub async fn not_found() -> error::ApiError {
    error::ApiError::NotFound
}

/// Answers a known route asked with a method it does not have with the JSON error body (axum adds
/// the `Allow` header); registered after a router's routes, it covers them all.
pub async fn method_not_allowed() -> error::ApiError {
    error::ApiError::MethodNotAllowed
}

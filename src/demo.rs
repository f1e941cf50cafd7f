//! The development demo (Real-Time Phoenix's `socket.js` example, made visible): a page where a person picks a user id,
//! connects with the official phoenix client (served from its npm package, no CDN), watches pushes
//! arrive with their delivery latency, sends test events, and tries the stats channel.
//!
//! Off unless `demo.enabled`: its endpoints mint tokens for any user and enqueue without an API key,
//! as the `demo` producer. An edge module like `api`; nothing depends on it. Bodies are read and
//! events checked as the producer API does (its [`ApiJson`], limits and JSON errors): the demo must
//! not be a way around them.

use crate::api::error::ApiError;
use crate::api::request::{self, EventRequest};
use crate::api::{ApiJson, Limits};
use crate::event::UserId;
use crate::pipeline::enqueue::Enqueue;
use crate::token::{TokenSigner, now_unix_secs};
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;

/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("demo asset {path} is missing: run `npm ci` in {dir} (scripts/demo does)")]
pub struct MissingAsset {
    path: String,
    dir: String,
}

/// The page's files, read once at start.
struct Assets {
    index: String,
    app: String,
    phoenix: String,
    /// The service worker that shows Web Push notifications (scope `/demo/`).
    service_worker: String,
}

/// The demo, loaded at start (so a missing asset stops the node with a clear message).
pub struct Demo {
    assets: Arc<Assets>,
    signer: TokenSigner,
    producer_id: i64,
}

/// What the demo endpoints need.
#[derive(Clone)]
struct DemoState {
    assets: Arc<Assets>,
    enqueue: Enqueue,
    signer: TokenSigner,
    producer_id: i64,
    limits: Arc<Limits>,
}

impl FromRef<DemoState> for Arc<Limits> {
    fn from_ref(state: &DemoState) -> Self {
        Arc::clone(&state.limits)
    }
}

impl Demo {
    /// Reads the page and the phoenix client bundle from `dir`; events are sent as `producer_id`.
    ///
    /// # Errors
    /// A file is missing (the npm install has not run).
    pub fn load(dir: &str, signer: TokenSigner, producer_id: i64) -> Result<Self, MissingAsset> {
        let read = |relative: &str| {
            let path = Path::new(dir).join(relative);
            std::fs::read_to_string(&path).map_err(|_| MissingAsset {
                path: path.display().to_string(),
                dir: dir.to_owned(),
            })
        };
        let assets = Assets {
            index: read("index.html")?,
            app: read("app.js")?,
            phoenix: read("node_modules/phoenix/priv/static/phoenix.mjs")?,
            service_worker: read("sw.js")?,
        };
        Ok(Self {
            assets: Arc::new(assets),
            signer,
            producer_id,
        })
    }

    /// The demo routes, enqueueing through `enqueue` what passes the API's own `limits`.
    pub fn routes(self, enqueue: Enqueue, limits: Arc<Limits>) -> Router {
        let state = DemoState {
            assets: self.assets,
            enqueue,
            signer: self.signer,
            producer_id: self.producer_id,
            limits,
        };
        routes(state)
    }
}

fn routes(state: DemoState) -> Router {
    Router::new()
        .route("/demo", get(index))
        .route("/demo/app.js", get(app_js))
        .route("/demo/phoenix.mjs", get(phoenix_js))
        .route("/demo/sw.js", get(service_worker))
        .route("/demo/token", post(token))
        .route("/demo/events", post(send_event))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

async fn index(State(state): State<DemoState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        state.assets.index.clone(),
    )
}

async fn app_js(State(state): State<DemoState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript")],
        state.assets.app.clone(),
    )
}

async fn phoenix_js(State(state): State<DemoState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript")],
        state.assets.phoenix.clone(),
    )
}

async fn service_worker(State(state): State<DemoState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript")],
        state.assets.service_worker.clone(),
    )
}

#[derive(Deserialize)]
struct TokenRequest {
    user_id: String,
}

async fn token(
    State(state): State<DemoState>,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Result<Json<Value>, ApiError> {
    let user = UserId::parse(request.user_id)
        .map_err(|why| ApiError::Invalid(format!("user_id: {why}")))?;
    let token = state.signer.sign(&user, now_unix_secs() + 3600);
    Ok(Json(json!({ "token": token, "user_id": user })))
}

async fn send_event(
    State(state): State<DemoState>,
    ApiJson(request): ApiJson<EventRequest>,
) -> Result<Json<Value>, ApiError> {
    let event =
        request::validate(request, None, &state.limits.request(), "")?.stamp(state.producer_id);
    let accepted = state.enqueue.enqueue(vec![event]).await?;
    let first = accepted.first().map(|a| json!({"id": a.id, "seq": a.seq}));
    Ok(Json(first.unwrap_or(Value::Null)))
}

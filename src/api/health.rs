//! `GET /healthz` (the process is up) and `GET /readyz` (what this node's roles depend on is
//! reachable), both naming the node and its roles. Served by every node, whatever its roles.
//! The handlers are public for the OpenAPI document (`api::openapi`).

use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use utoipa::ToSchema;

/// What the health endpoints report on.
#[derive(Clone)]
pub struct Health {
    /// PostgreSQL, pinged by /readyz.
    pub store: Store,
    /// This node's name.
    pub node: String,
    /// Its roles, e.g. `api,worker`.
    pub roles: String,
    /// The RabbitMQ links its roles use (publisher, consumer, fanout), each up or down.
    pub links: Vec<(&'static str, Arc<AtomicBool>)>,
    /// On a worker node: the partitions it consumes now.
    pub partitions: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
}

/// The health routes, before their state: what the node serves and what the OpenAPI document is
/// checked against.
pub fn router() -> Router<Health> {
    Router::new()
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .method_not_allowed_fallback(super::method_not_allowed)
}

/// The health routes.
pub fn routes(health: Health) -> Router {
    router().with_state(health)
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Live {
    /// Always `ok`.
    status: String,
    /// This node's name.
    node: String,
    /// Its roles, e.g. `api,worker,socket`.
    roles: String,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready` or `unavailable`.
    status: String,
    /// This node's name.
    node: String,
    /// Its roles.
    roles: String,
    /// Each dependency, `ok` or `unavailable`.
    checks: Checks,
    /// On a worker node: the partitions it consumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    partitions: Option<Vec<u16>>,
}

/// What /readyz checked.
#[derive(Serialize, ToSchema)]
pub struct Checks {
    /// PostgreSQL answered a ping within 2 s.
    postgres: String,
    /// Every RabbitMQ link of the node's roles is up.
    rabbitmq: String,
    /// Each link (`publisher`, `consumer`, `fanout`) by name.
    rabbitmq_links: BTreeMap<String, String>,
}

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process runs", body = Live))
)]
pub async fn live(State(health): State<Health>) -> Json<Live> {
    Json(Live {
        status: "ok".into(),
        node: health.node,
        roles: health.roles,
    })
}

/// `GET /readyz`: what this node's roles depend on is reachable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Ready),
        (status = 503, description = "PostgreSQL or a RabbitMQ link is down", body = Ready),
    )
)]
pub async fn ready(State(health): State<Health>) -> (StatusCode, Json<Ready>) {
    let word = |ok: bool| if ok { "ok" } else { "unavailable" }.to_owned();
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(2), health.store.ping()).await,
        Ok(Ok(()))
    );
    let mut rabbitmq_links = BTreeMap::new();
    let mut rabbitmq = true;
    for (name, up) in &health.links {
        let up = up.load(Ordering::Relaxed);
        rabbitmq &= up;
        rabbitmq_links.insert((*name).to_owned(), word(up));
    }
    let ok = postgres && rabbitmq;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let partitions = health.partitions.as_ref().map(|p| p.borrow().clone());
    let body = Ready {
        status: if ok { "ready" } else { "unavailable" }.to_owned(),
        node: health.node,
        roles: health.roles,
        checks: Checks {
            postgres: word(postgres),
            rabbitmq: word(rabbitmq),
            rabbitmq_links,
        },
        partitions,
    };
    (status, Json(body))
}

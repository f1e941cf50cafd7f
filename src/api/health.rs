//! `GET /healthz` (the process is up) and `GET /readyz` (what this node's roles depend on is
//! reachable), both naming the node and its roles. Served by every node, whatever its roles.

use crate::queue::BrokerNodes;
use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    /// The broker node each of its connections uses (`queue.amqp_url` may list several).
    pub broker_nodes: Vec<(&'static str, BrokerNodes)>,
    /// On a worker node: the partitions it consumes now.
    pub partitions: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
}

/// The health routes.
pub fn routes(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(health)
}

async fn live(State(health): State<Health>) -> Json<Value> {
    Json(json!({ "status": "ok", "node": health.node, "roles": health.roles }))
}

async fn ready(State(health): State<Health>) -> (StatusCode, Json<Value>) {
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(2), health.store.ping()).await,
        Ok(Ok(()))
    );
    let mut links = Map::new();
    let mut rabbitmq = true;
    for (name, up) in &health.links {
        let up = up.load(Ordering::Relaxed);
        rabbitmq &= up;
        links.insert((*name).to_owned(), word(up).into());
    }
    let ok = postgres && rabbitmq;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "node": health.node,
        "roles": health.roles,
        "checks": { "postgres": word(postgres), "rabbitmq": word(rabbitmq), "rabbitmq_links": links },
    });
    let nodes: Map<String, Value> = health
        .broker_nodes
        .iter()
        .map(|(role, nodes)| ((*role).to_owned(), json!(nodes.in_use())))
        .collect();
    body["rabbitmq_nodes"] = Value::Object(nodes);
    if let Some(partitions) = &health.partitions {
        body["partitions"] = json!(*partitions.borrow());
    }
    (status, Json(body))
}

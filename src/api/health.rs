//! `GET /healthz` (the process is up) and `GET /readyz` (this node's roles can serve), both naming
//! the node and its roles. Served by every node, whatever its roles.
//!
//! Readiness is per role, because a load balancer acts on it: an api node keeps accepting into the
//! outbox while RabbitMQ is down (the relay publishes later), so it stays ready on PostgreSQL alone;
//! pulling every api node exactly then would turn a broker outage into an API outage. A worker
//! needs its broker link too, and a socket node in cluster mode its fan-out queue (bound topics are
//! how broadcasts reach it). Every role needs PostgreSQL: commits, outcomes, catch-up and gap fills.
//! Every dependency is reported with its state and the roles that need it, ready or not.

use crate::config::Roles;
use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A RabbitMQ link of this node, up or down.
#[derive(Clone)]
pub struct Link {
    /// `publisher` (api), `consumer` (worker) or `fanout` (socket, cluster mode).
    pub name: &'static str,
    /// Set while the link is up.
    pub up: Arc<AtomicBool>,
    /// The role that must have it to serve; `None` when the node serves without it (the api's
    /// publisher: accepted events wait in the outbox).
    pub required_by: Option<&'static str>,
}

/// What the health endpoints report on.
#[derive(Clone)]
pub struct Health {
    /// PostgreSQL, pinged by /readyz.
    pub store: Store,
    /// This node's name.
    pub node: String,
    /// Its roles.
    pub roles: Roles,
    /// The RabbitMQ links its roles use.
    pub links: Vec<Link>,
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
    Json(json!({ "status": "ok", "node": health.node, "roles": health.roles.names() }))
}

/// One dependency's line in /readyz.
struct Dependency {
    name: String,
    up: bool,
    required_by: Vec<&'static str>,
}

async fn ready(State(health): State<Health>) -> (StatusCode, Json<Value>) {
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(2), health.store.ping()).await,
        Ok(Ok(()))
    );
    let roles = &health.roles;
    let mut dependencies = vec![Dependency {
        name: "postgres".into(),
        up: postgres,
        required_by: [
            (roles.api, "api"),
            (roles.worker, "worker"),
            (roles.socket, "socket"),
        ]
        .into_iter()
        .filter_map(|(has, role)| has.then_some(role))
        .collect(),
    }];
    let mut links = Map::new();
    let mut rabbitmq = true;
    for link in &health.links {
        let up = link.up.load(Ordering::Relaxed);
        rabbitmq &= up;
        links.insert(link.name.to_owned(), word(up).into());
        dependencies.push(Dependency {
            name: format!("rabbitmq.{}", link.name),
            up,
            required_by: link.required_by.into_iter().collect(),
        });
    }
    let blocking: Vec<&str> = dependencies
        .iter()
        .filter(|d| !d.up && !d.required_by.is_empty())
        .map(|d| d.name.as_str())
        .collect();
    let degraded: Vec<&str> = dependencies
        .iter()
        .filter(|d| !d.up && d.required_by.is_empty())
        .map(|d| d.name.as_str())
        .collect();
    let ok = blocking.is_empty();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let listed: Map<String, Value> = dependencies
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                json!({ "state": word(d.up), "required_by": d.required_by }),
            )
        })
        .collect();
    let mut body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "node": health.node,
        "roles": roles.names(),
        "dependencies": listed,
        "unavailable": blocking,
        "degraded": degraded,
        "checks": { "postgres": word(postgres), "rabbitmq": word(rabbitmq), "rabbitmq_links": links },
    });
    if let Some(partitions) = &health.partitions {
        body["partitions"] = json!(*partitions.borrow());
    }
    (status, Json(body))
}

//! `GET /healthz` (the process is up) and `GET /readyz` (this node's roles can serve), both naming
//! the node and its roles. Served by every node, whatever its roles. The handlers are public for the
//! OpenAPI document (`api::openapi`).
//!
//! Readiness is per role, because a load balancer acts on it: an api node keeps accepting into the
//! outbox while RabbitMQ is down (the relay publishes later), so it stays ready on PostgreSQL alone;
//! pulling every api node exactly then would turn a broker outage into an API outage. A worker
//! needs its broker link too, and a socket node in cluster mode its fan-out queue (bound topics are
//! how broadcasts reach it). Every role needs PostgreSQL: commits, outcomes, catch-up and gap fills.
//! Every dependency is reported with its state and the roles that need it, ready or not.

use crate::config::Roles;
use crate::queue::BrokerNodes;
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
    /// The broker node each of its connections uses (`queue.amqp_url` may list several).
    pub broker_nodes: Vec<(&'static str, BrokerNodes)>,
    /// Who keeps the tables' statistics and dead rows in check, as found at start.
    pub upkeep: &'static str,
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
    /// `ready` when every dependency a role of this node needs is up, else `unavailable`.
    status: String,
    /// This node's name.
    node: String,
    /// Its roles.
    roles: String,
    /// Every dependency (`postgres`, `rabbitmq.<link>`), up or not.
    dependencies: BTreeMap<String, Dependency>,
    /// Dependencies down that a role needs: why the node is not ready.
    unavailable: Vec<String>,
    /// Dependencies down that no role needs to serve (the api's publisher: events wait in the
    /// outbox meanwhile).
    degraded: Vec<String>,
    /// The older summary, kept for existing probes.
    checks: Checks,
    /// The broker node (`host:port`) each RabbitMQ connection of the node uses now, by connection
    /// (`publisher`, `consumer`, `fanout_publisher`, `fanout`); null while it has none.
    rabbitmq_nodes: BTreeMap<String, Option<String>>,
    /// On a worker node: the partitions it consumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    partitions: Option<Vec<u16>>,
    /// Who vacuums and analyzes Herald's tables: `autovacuum` (PostgreSQL), `herald` (autovacuum
    /// is off, an api node does it every `store.upkeep_interval_secs`), `nobody` (autovacuum off
    /// and Herald's upkeep turned off: statistics go stale), or `unknown` (not read at start).
    postgres_upkeep: String,
}

/// One dependency of /readyz.
#[derive(Serialize, ToSchema)]
pub struct Dependency {
    /// `ok` or `unavailable`.
    state: String,
    /// The roles of this node that cannot serve without it (empty: none needs it).
    required_by: Vec<String>,
}

/// What /readyz checked, in short.
#[derive(Serialize, ToSchema)]
pub struct Checks {
    /// PostgreSQL answered a ping within 2 s.
    postgres: String,
    /// Every RabbitMQ link of the node's roles is up.
    rabbitmq: String,
    /// Each link (`publisher`, `consumer`, `fanout`) by name.
    rabbitmq_links: BTreeMap<String, String>,
}

fn word(up: bool) -> String {
    if up { "ok" } else { "unavailable" }.to_owned()
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
        roles: health.roles.names(),
    })
}

/// `GET /readyz`: this node's roles can serve.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Ready),
        (status = 503, description = "A dependency one of the node's roles needs is down", body = Ready),
    )
)]
pub async fn ready(State(health): State<Health>) -> (StatusCode, Json<Ready>) {
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(2), health.store.ping()).await,
        Ok(Ok(()))
    );
    let roles = &health.roles;
    let every_role: Vec<String> = [
        (roles.api, "api"),
        (roles.worker, "worker"),
        (roles.socket, "socket"),
    ]
    .into_iter()
    .filter(|(has, _)| *has)
    .map(|(_, role)| role.to_owned())
    .collect();
    let mut dependencies = BTreeMap::new();
    let (mut unavailable, mut degraded) = (Vec::new(), Vec::new());
    let mut note = |name: String, up: bool, required_by: Vec<String>| {
        if !up {
            if required_by.is_empty() {
                degraded.push(name.clone());
            } else {
                unavailable.push(name.clone());
            }
        }
        let state = word(up);
        dependencies.insert(name, Dependency { state, required_by });
    };
    note("postgres".into(), postgres, every_role);
    let mut rabbitmq_links = BTreeMap::new();
    let mut rabbitmq = true;
    for link in &health.links {
        let up = link.up.load(Ordering::Relaxed);
        rabbitmq &= up;
        rabbitmq_links.insert(link.name.to_owned(), word(up));
        let required_by = link.required_by.map(str::to_owned).into_iter().collect();
        note(format!("rabbitmq.{}", link.name), up, required_by);
    }
    let ok = unavailable.is_empty();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let partitions = health.partitions.as_ref().map(|p| p.borrow().clone());
    let body = Ready {
        status: if ok { "ready" } else { "unavailable" }.to_owned(),
        node: health.node,
        roles: roles.names(),
        dependencies,
        unavailable,
        degraded,
        checks: Checks {
            postgres: word(postgres),
            rabbitmq: word(rabbitmq),
            rabbitmq_links,
        },
        rabbitmq_nodes: health
            .broker_nodes
            .iter()
            .map(|(role, nodes)| ((*role).to_owned(), nodes.in_use()))
            .collect(),
        partitions,
        postgres_upkeep: health.upkeep.to_owned(),
    };
    (status, Json(body))
}

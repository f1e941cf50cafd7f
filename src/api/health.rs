//! `GET /healthz` (the process is up) and `GET /readyz` (PostgreSQL and RabbitMQ are reachable).

use super::ApiState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// Liveness: answering at all is the check.
pub async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when both dependencies answer, else 503; each check is reported.
pub async fn ready(State(state): State<ApiState>) -> (StatusCode, Json<Value>) {
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await,
        Ok(Ok(()))
    );
    let rabbitmq = state.publisher.is_connected();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if postgres && rabbitmq {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "unavailable" },
        "checks": { "postgres": word(postgres), "rabbitmq": word(rabbitmq) },
    });
    (status, Json(body))
}

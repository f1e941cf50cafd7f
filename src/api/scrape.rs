//! `GET /metrics` for Prometheus, on a listener of its own (`metrics.prometheus_addr`): every
//! metric of [`crate::metrics`] in the OpenMetrics text format. No auth, as RabbitMQ's and
//! Centrifugo's endpoints have none: Prometheus scrapes plainly, and the figures hold no user or
//! event data. Safety is where it listens: loopback by default, a private address by decision,
//! never the public API's listener.

use crate::metrics::{CONTENT_TYPE, Metrics};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The scrape listener's routes: `/metrics`, and the JSON 404 for anything else.
pub fn routes(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
        .fallback(super::not_found)
}

async fn scrape(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render())
}

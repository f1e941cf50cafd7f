//! The operator console at `/console`: a page of plain HTML, CSS and JavaScript (`console/` in the
//! repository) compiled into the binary, so a node serves it with no files beside it, no build
//! step and nothing fetched from elsewhere. It signs in with an admin API key and talks only to
//! the admin API (`/api/v1/admin/...`), so it is served by the nodes that serve that API (the
//! `api` role).
//!
//! The key lives in the tab's sessionStorage, so the page must never run another origin's script
//! or be framed: every asset goes out with a Content-Security-Policy allowing only this origin,
//! and the page writes server data as text, never as HTML.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");

/// Only this origin's scripts, styles and API; no frames, no plugins, no inline script.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The console's routes: the page and its two assets.
pub fn routes() -> Router {
    Router::new()
        .route("/console", get(|| asset("text/html; charset=utf-8", INDEX)))
        .route(
            "/console/",
            get(|| asset("text/html; charset=utf-8", INDEX)),
        )
        .route(
            "/console/console.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/console/console.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // A new binary may bring a new page: revalidate rather than run a stale script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

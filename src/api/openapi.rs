//! The OpenAPI 3.1 document of every HTTP endpoint a node serves for programs (producer, admin,
//! tokens, inbox, health), served at [`PATH`].
//!
//! It is generated from the handlers' own types (utoipa: `ToSchema` on the request, response and
//! error types, `#[utoipa::path]` on each handler), never written by hand, so it cannot drift from
//! what the handlers parse and answer. The tests below compare it with the routers themselves: a
//! route added without its `#[utoipa::path]` (or left out of [`ApiDoc`]) fails them. Left out on
//! purpose: the WebSocket upgrades (`/socket/websocket`, `/stats_socket/websocket`: Phoenix
//! Channels, not HTTP requests and answers) and the dev-only demo.

use super::error::{ErrorBody, ErrorDetail};
use super::{admin, events, health, inbox, tokens, users, webpush};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, Ref, RefOr};
use utoipa::{Modify, OpenApi};

/// Where the document is served.
pub const PATH: &str = "/api/v1/openapi.json";

/// The document: every documented handler, the error body, the security schemes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "Durable real-time notification delivery: producers enqueue events for their \
                       users over HTTP, Herald pushes them to the users' Phoenix Channels sockets. \
                       Every error answers `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        events::create,
        events::create_batch,
        events::get_one,
        tokens::create,
        users::disconnect,
        inbox::list,
        inbox::mark_read,
        webpush::public_key,
        webpush::subscribe,
        webpush::list,
        webpush::unsubscribe,
        admin::list_events,
        admin::get_event,
        admin::start_replay,
        admin::get_replay,
        admin::stats,
        health::live,
        health::ready,
        serve,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Security, &CommonErrors),
    tags(
        (name = "producer", description = "Backends enqueueing events for their users (API key)"),
        (name = "admin", description = "Operators: failed events, replays (API key with the admin role)"),
        (name = "inbox", description = "A user's client, with its socket token"),
        (name = "webpush", description = "A user's browser registering for Web Push, with its socket token"),
        (name = "health", description = "Liveness and readiness, on every node"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

/// The three ways a request authenticates, each `Authorization: Bearer <credential>`.
struct Security;

impl Modify for Security {
    fn modify(&self, document: &mut Document) {
        let components = document.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(what.to_owned()))
                    .build(),
            )
        };
        components.add_security_scheme(
            "producer_key",
            bearer("A producer's API key (`herald producers add NAME`)"),
        );
        components.add_security_scheme(
            "admin_key",
            bearer("An API key whose producer has the admin role (`herald producers add NAME --admin`)"),
        );
        components.add_security_scheme(
            "user_token",
            bearer("A user's socket token (`POST /api/v1/tokens`), as the client connects with"),
        );
    }
}

/// Errors any route can answer, added to every operation that does not document them itself: the
/// node's bounds apply to every route (503 when `http.max_concurrent_requests` are in progress or
/// PostgreSQL is down, 408 past `http.request_timeout_ms`), a path parameter that is not even
/// text is a 422, and a body can be malformed (400) or too large (413).
struct CommonErrors;

impl CommonErrors {
    fn add(operation: &mut Operation, status: &str, description: &str) {
        if operation.responses.responses.contains_key(status) {
            return;
        }
        let body = ContentBuilder::new()
            .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
            .build();
        let response = ResponseBuilder::new()
            .description(description)
            .content("application/json", body)
            .build();
        operation
            .responses
            .responses
            .insert(status.to_owned(), RefOr::T(response));
    }
}

impl Modify for CommonErrors {
    fn modify(&self, document: &mut Document) {
        for (path, item) in document.paths.paths.iter_mut() {
            let operations = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.delete.as_mut(),
                item.patch.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                // Health is outside the API's bounds; its answers are its own.
                if path == "/healthz" || path == "/readyz" {
                    continue;
                }
                let has_path_parameter = operation
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| matches!(p.parameter_in, ParameterIn::Path));
                if has_path_parameter {
                    Self::add(operation, "422", "A path parameter that is not valid text");
                }
                if operation.request_body.is_some() {
                    Self::add(operation, "400", "The body is not JSON");
                    Self::add(operation, "413", "The body is over `http.max_body_bytes`");
                }
                Self::add(
                    operation,
                    "408",
                    "The request took longer than `http.request_timeout_ms`",
                );
                Self::add(
                    operation,
                    "503",
                    "Overloaded, shutting down, or PostgreSQL unavailable; retry (see Retry-After)",
                );
            }
        }
    }
}

/// The document as served, rendered once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        // Rendering plain data cannot fail; an empty object still parses.
        .unwrap_or_else(|_| "{}".to_owned())
});

/// `GET /api/v1/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Value))
)]
pub async fn serve() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

/// A user id as producers send it: a string of 1 to 128 bytes without whitespace or control
/// characters, or an integer (normalised to its decimal string).
pub(super) fn user_id_schema() -> Schema {
    let text = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(crate::event::MAX_USER_ID_BYTES))
        // JSON Schema counts characters, Herald bytes: the byte limit is in the description.
        .pattern(Some(r"^[^\s\x00-\x1f\x7f-\x9f]+$"));
    // Exact integers: as floats, the bounds would round past what Herald parses.
    let number = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(i64::MIN))
        .maximum(Some(u64::MAX));
    Schema::OneOf(
        OneOfBuilder::new()
            .item(text)
            .item(number)
            .description(Some(
                "A string of 1 to 128 bytes without whitespace or control characters, or an integer",
            ))
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The paths of a router, read from its `Debug` form (axum lists them there, and has no other
    /// way to enumerate routes). Paths only: the methods are checked by the integration test that
    /// calls every documented operation.
    fn router_paths<S>(router: &axum::Router<S>) -> BTreeSet<String> {
        let debug = format!("{router:?}");
        // Only the routes: the fallback router that follows holds axum's own catch-all paths.
        let routes = debug.split("fallback_router").next().unwrap_or_default();
        let mut paths = BTreeSet::new();
        let mut rest = routes;
        while let Some(at) = rest.find("): \"/") {
            let tail = &rest[at + 4..];
            let end = tail.find('"').unwrap_or(tail.len());
            paths.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
        paths
    }

    #[test]
    fn every_route_of_the_api_and_health_routers_is_documented_and_nothing_else() {
        let mut routes = router_paths(&super::super::router());
        routes.extend(router_paths(&health::router()));
        assert!(
            routes.contains("/api/v1/events") && routes.contains("/healthz"),
            "could not read the routers' paths: {routes:?}"
        );
        let documented: BTreeSet<String> = ApiDoc::openapi().paths.paths.into_keys().collect();
        assert_eq!(routes, documented, "routes vs documented paths");
    }

    #[test]
    fn the_document_is_openapi_3_1_with_the_three_security_schemes() {
        let document: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        assert!(
            document["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            document["openapi"]
        );
        let schemes = &document["components"]["securitySchemes"];
        for name in ["producer_key", "admin_key", "user_token"] {
            assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
        }
        let inbox = &document["paths"]["/api/v1/inbox"]["get"];
        assert_eq!(inbox["security"][0]["user_token"], serde_json::json!([]));
        assert!(inbox["responses"]["401"].is_object());
    }
}

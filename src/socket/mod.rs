//! The socket node: Phoenix Channels over WebSocket, so the official `phoenix` JavaScript client works
//! unchanged: the Phoenix Channels v2 wire format (README, "Sockets", and the protocol tests in
//! tests/js).
//!
//! Two endpoints. `/socket/websocket` (UserSocket): a connection is authorised before the upgrade, and
//! a missing, forged or expired token gets HTTP 403 and no WebSocket; a connected user may join only
//! `user:<own id>`. `/stats_socket/websocket` (StatsSocket, only with `socket.stats_enabled`): no
//! token; any topic is a stats channel (see [`stats`]). Before any upgrade, a browser's origin is
//! checked ([`origin`], 403) and the node's room for sockets of that kind (503): each connection
//! holds a permit until it ends. Protocol parsing is in [`protocol`] (pure), the per-connection loop in
//! `connection` (writing through its `wire`, fed by its `mailbox`), the user channel (its order
//! guard, gap fills, catch-up and acks) in `user_channel`, the bookkeeping those rest on (the guard,
//! gap paging, the catch-up budget) in [`channel`], and the joins' batched reads of their users'
//! seqs in `join_reads`.

pub mod channel;
mod connection;
mod join_reads;
mod mailbox;
pub mod origin;
pub mod protocol;
pub mod stats;
mod user_channel;
mod wire;

use connection::Endpoint;

use crate::config::SocketSettings;
use crate::metrics::{Metrics, STATS_SOCKET, USER_SOCKET};
use crate::pubsub::PubSub;
use crate::store::Store;
use crate::token::{TokenSigner, now_unix_secs};
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use origin::OriginPattern;
use protocol::Vsn;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a connection needs; cheap to clone.
#[derive(Clone)]
pub struct SocketState {
    /// Where channels subscribe.
    pub pubsub: PubSub,
    /// For filling gaps in a user's sequence.
    pub store: Store,
    /// Where joins read their users' seqs (from `store`, batched).
    join_reads: join_reads::JoinReads,
    /// Metrics.
    pub metrics: Metrics,
    /// Limits and timeouts.
    pub settings: Arc<SocketSettings>,
    /// Verifies connect tokens.
    pub signer: TokenSigner,
    /// Cancelled when the node drains: every connection closes with 1012.
    pub closing: CancellationToken,
    /// Tracks connection tasks, so shutdown can wait for their close frames.
    pub tracker: TaskTracker,
    /// Room for user sockets (`socket.max_connections`): a connection holds a permit until it ends.
    pub user_slots: Arc<Semaphore>,
    /// Room for stats sockets (`socket.stats_max_connections`).
    pub stats_slots: Arc<Semaphore>,
    /// `socket.check_origin`, parsed.
    pub allowed_origins: Arc<[OriginPattern]>,
    /// Where pushes of events with a Web Push fallback are noted (none when nothing falls back).
    pub receipts: Option<Arc<crate::webpush::receipts::Receipts>>,
}

impl SocketState {
    /// The state of a node's sockets under `settings` (validated at load: the origins parse).
    pub fn new(
        settings: &SocketSettings,
        pubsub: PubSub,
        store: Store,
        metrics: Metrics,
        signer: TokenSigner,
        closing: CancellationToken,
    ) -> Self {
        let allowed_origins = settings
            .check_origin
            .iter()
            .filter_map(|pattern| OriginPattern::parse(pattern).ok())
            .collect();
        Self {
            join_reads: join_reads::JoinReads::spawn(
                store.clone(),
                metrics.clone(),
                closing.clone(),
            ),
            pubsub,
            store,
            metrics,
            settings: Arc::new(settings.clone()),
            signer,
            closing,
            tracker: TaskTracker::new(),
            user_slots: Arc::new(Semaphore::new(settings.max_connections)),
            stats_slots: Arc::new(Semaphore::new(settings.stats_max_connections)),
            allowed_origins,
            receipts: None,
        }
    }

    /// Open connections on this node (user and stats sockets).
    pub fn open_connections(&self) -> u64 {
        let user = self.settings.max_connections - self.user_slots.available_permits();
        let stats = self.settings.stats_max_connections - self.stats_slots.available_permits();
        (user + stats) as u64
    }

    /// What every upgrade must pass before anything else: a protocol version the node speaks
    /// (403), an allowed origin (403) and room for a socket of this kind (503).
    fn admit(
        &self,
        params: &HashMap<String, String>,
        headers: &HeaderMap,
        slots: &Arc<Semaphore>,
    ) -> Result<(Vsn, OwnedSemaphorePermit), StatusCode> {
        let vsn = Vsn::parse(params.get("vsn").map(String::as_str)).ok_or(StatusCode::FORBIDDEN)?;
        let origin = headers
            .get(header::ORIGIN)
            .map(|v| v.to_str().unwrap_or("?"));
        if !origin::allowed(origin, &self.allowed_origins) {
            tracing::debug!(origin = ?origin, "socket origin refused");
            return Err(StatusCode::FORBIDDEN);
        }
        let slot = Arc::clone(slots)
            .try_acquire_owned()
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        Ok((vsn, slot))
    }
}

/// The answer to a refused upgrade; a 503 says when to retry.
fn refused(status: StatusCode) -> Response {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        (status, [(header::RETRY_AFTER, "1")]).into_response()
    } else {
        status.into_response()
    }
}

/// The socket routes (the JS client appends `/websocket` to the endpoint it is given). The stats
/// socket only with `socket.stats_enabled`.
pub fn routes(state: SocketState) -> Router {
    let mut router = Router::new().route("/socket/websocket", get(user_socket));
    if state.settings.stats_enabled {
        router = router.route("/stats_socket/websocket", get(stats_socket));
    }
    router.with_state(state)
}

/// The subprotocol prefix under which the JS client's `authToken` travels.
const BEARER_PROTOCOL_PREFIX: &str = "base64url.bearer.phx.";

async fn user_socket(
    State(state): State<SocketState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let admitted = state
        .admit(&params, &headers, &state.user_slots)
        .and_then(|(vsn, slot)| {
            let token = (params.get("token").cloned())
                .or_else(|| header_token(&headers))
                .ok_or(StatusCode::FORBIDDEN)?;
            let user = (state.signer.verify(&token, now_unix_secs())).map_err(|error| {
                tracing::debug!(error = %error, "socket token refused");
                StatusCode::FORBIDDEN
            })?;
            Ok((vsn, slot, user))
        });
    state.metrics.socket_connect(USER_SOCKET, admitted.is_ok());
    match admitted {
        Ok((vsn, slot, user)) => {
            let span = tracing::info_span!("socket", user_id = %user);
            upgrade_to(upgrade, vsn, Endpoint::User(user), state, slot, span).await
        }
        Err(status) => refused(status),
    }
}

async fn stats_socket(
    State(state): State<SocketState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let admitted = state.admit(&params, &headers, &state.stats_slots);
    state.metrics.socket_connect(STATS_SOCKET, admitted.is_ok());
    match admitted {
        Ok((vsn, slot)) => {
            let span = tracing::info_span!("stats_socket");
            upgrade_to(upgrade, vsn, Endpoint::Stats, state, slot, span).await
        }
        Err(status) => refused(status),
    }
}

/// Completes an accepted upgrade with Herald's buffer limits and runs the connection, tracked so a
/// draining node can wait for its close frame. The connection's mailbox is opened (and subscribed)
/// before the 101 goes out.
async fn upgrade_to(
    upgrade: WebSocketUpgrade,
    vsn: Vsn,
    endpoint: Endpoint,
    state: SocketState,
    slot: OwnedSemaphorePermit,
    span: tracing::Span,
) -> Response {
    let settings = Arc::clone(&state.settings);
    let in_flight = state.tracker.token();
    let mailbox = mailbox::Mailbox::open(&state, &endpoint).await;
    // Boxed: axum keeps the callback in the connection's task for the task's whole life, so what
    // it captures is room every socket keeps (280 bytes inline, one pointer boxed).
    let accepted = Box::new(Accepted {
        vsn,
        endpoint,
        state,
        mailbox,
        held: (in_flight, slot),
        span,
    });
    upgrade
        .read_buffer_size(settings.read_buffer_bytes)
        .write_buffer_size(settings.write_buffer_bytes)
        .max_write_buffer_size(
            settings.write_buffer_bytes + 2 * settings.max_frame_bytes + 1024 * 1024,
        )
        .max_message_size(settings.max_frame_bytes)
        .max_frame_size(settings.max_frame_bytes)
        .protocols(["phoenix"])
        .on_upgrade(move |socket| {
            let Accepted {
                vsn,
                endpoint,
                state,
                mailbox,
                held,
                span,
            } = *accepted;
            // Built here, not in an async block: the task holds one copy of the connection.
            let connection = connection::Connection::new(socket, vsn, endpoint, state, mailbox);
            tracing::Instrument::instrument(connection.serve(held), span)
        })
}

/// What an accepted upgrade hands to its connection once the socket is open.
struct Accepted {
    vsn: Vsn,
    endpoint: Endpoint,
    state: SocketState,
    mailbox: mailbox::Mailbox,
    held: connection::Held,
    span: tracing::Span,
}

/// The token offered as `Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.<base64url token>`.
fn header_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix(BEARER_PROTOCOL_PREFIX)
                .map(str::to_owned)
        })
        .and_then(|encoded| URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_token_is_decoded_from_the_subprotocol() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "phoenix, base64url.bearer.phx.c2VrcmV0LXRva2Vu"
                .parse()
                .unwrap(),
        );
        assert_eq!(header_token(&headers).as_deref(), Some("sekret-token"));
        assert_eq!(header_token(&HeaderMap::new()), None);
    }
}

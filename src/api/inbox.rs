//! The user inbox, for clients that open cold: with its user's socket token as bearer, a client
//! pages through the user's retained events newest first (`GET /api/v1/inbox`) and marks them read
//! (`POST /api/v1/inbox/read`).
//!
//! Pages come from the same read as catch-up and gap fill ([`Store::user_events`], events turned
//! into envelopes the same way), so the inbox shows exactly what a socket would push, in seq order.
//! "Read" is one state with a channel `ack`, written by the same [`Store::record_acks`]: an event
//! is read when a channel acked it or the user's read mark (the highest seq marked here) covers
//! it, so a channel ack and an inbox mark agree. A mark raises that one row rather than touching
//! every event below it, and the unread count looks at no more than the user's last
//! [`UNREAD_CAP`] seqs above the mark, saying when there are more (`unread_capped`): both cost the
//! same for a user with ten events or a million. The token names the user: no parameter can
//! name another, so another user's events are unreachable with it.
//!
//! [`Store::user_events`]: crate::store::Store::user_events
//! [`Store::record_acks`]: crate::store::Store::record_acks

use super::ApiState;
use super::admin::page_limit;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, UserToken};
use crate::event::EventId;
use crate::store::{ReadMark, SeqOrder, UNREAD_CAP};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

// The response types' documents (the OpenAPI descriptions) name the cap as a number.
const _: () = assert!(
    UNREAD_CAP == 1_000,
    "update the inbox's documents to the new cap"
);

/// The query of `GET /api/v1/inbox`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InboxQuery {
    /// Events per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The cursor: the `next` of the previous page (events with a lower seq follow).
    #[param(minimum = 1)]
    before: Option<i64>,
}

/// One event as the inbox shows it: what a socket pushes (`event`, and the push payload's `id`,
/// `seq`, `at`, `data`), plus whether a client has marked it read.
#[derive(Debug, Serialize, ToSchema)]
pub struct InboxEvent {
    /// Event id.
    #[schema(value_type = uuid::Uuid)]
    id: EventId,
    /// The user's sequence number.
    seq: i64,
    /// The event name a socket pushes it under.
    event: String,
    /// When the API accepted it, Unix milliseconds.
    at: i64,
    /// The producer's data.
    #[schema(value_type = Value)]
    data: Box<RawValue>,
    /// A client acknowledged it (a channel `ack` or an inbox read mark).
    read: bool,
}

/// A page of the inbox.
#[derive(Debug, Serialize, ToSchema)]
pub struct InboxPage {
    /// Newest first (highest seq first).
    events: Vec<InboxEvent>,
    /// The cursor of the next, older page (`?before=<next>`); null on the last page.
    next: Option<i64>,
    /// The user's retained events that no client has acknowledged, counted among its last 1,000
    /// seqs above its read mark (the highest seq marked read here).
    unread: i64,
    /// True when more than 1,000 seqs lie above the read mark: `unread` counted the newest 1,000
    /// only, and the true count may be higher (show "999+", or mark read).
    unread_capped: bool,
    /// The user's latest seq (0 before its first event).
    last_seq: i64,
}

/// `POST /api/v1/inbox/read`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    /// Marks every event of the user with a seq up to this one (inclusive) read.
    #[schema(minimum = 0)]
    up_to_seq: i64,
}

/// The answer to a read mark.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadResponse {
    /// Events newly marked read (already read ones keep their first mark), counted among the
    /// newest 1,000 seqs the mark newly covers.
    acked: u64,
    /// Unread events left, counted as in the inbox page.
    unread: i64,
    /// As in the inbox page: more than 1,000 seqs lie above the read mark.
    unread_capped: bool,
}

/// `GET /api/v1/inbox?limit=100&before=<cursor>`: the token's user's events, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/inbox",
    tag = "inbox",
    params(InboxQuery),
    security(("user_token" = [])),
    responses(
        (status = 200, description = "A page, newest first, with the unread count", body = InboxPage),
        (status = 401, description = "Missing, malformed, forged or expired socket token", body = ErrorBody),
        (status = 422, description = "A bad `limit` or cursor, or an unknown parameter", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the node overloaded; retry", body = ErrorBody),
    )
)]
#[tracing::instrument(name = "inbox_page", skip_all, fields(user_id = %user.0))]
pub async fn list(
    State(state): State<ApiState>,
    user: UserToken,
    ApiQuery(query): ApiQuery<InboxQuery>,
) -> Result<Json<InboxPage>, ApiError> {
    let UserToken(user) = user;
    let limit = page_limit(query.limit)?;
    let before = match query.before {
        Some(cursor) if cursor < 1 => {
            return Err(ApiError::Invalid(
                "before: not a cursor (a seq of at least 1)".into(),
            ));
        }
        Some(cursor) => cursor,
        None => i64::MAX,
    };
    let rows = state
        .store
        .user_events(user.as_str(), 0, before, limit, SeqOrder::Descending)
        .await?;
    let full_page = rows.len() as i64 == limit;
    let events: Vec<InboxEvent> = rows
        .into_iter()
        .filter_map(|row| {
            let read = row.acked;
            // The same conversion as catch-up: a row the API could never have accepted is skipped.
            let envelope = row.into_envelope()?;
            Some(InboxEvent {
                id: envelope.id,
                seq: envelope.seq,
                event: envelope.event.as_str().to_owned(),
                at: envelope.at,
                data: envelope.data,
                read,
            })
        })
        .collect();
    let next = full_page.then(|| events.last().map(|e| e.seq)).flatten();
    let unread = state.store.unread_of(user.as_str()).await?;
    state.metrics.inbox_served(events.len());
    Ok(Json(InboxPage {
        events,
        next,
        unread: unread.count,
        unread_capped: unread.capped,
        last_seq: unread.last_seq,
    }))
}

/// `POST /api/v1/inbox/read {"up_to_seq": n}`: the token's user's events up to seq n are read, as
/// if a client had acked each on its channel.
#[utoipa::path(
    post,
    path = "/api/v1/inbox/read",
    tag = "inbox",
    request_body = ReadRequest,
    security(("user_token" = [])),
    responses(
        (status = 200, description = "Marked; how many newly, and how many stay unread", body = ReadResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing, malformed, forged or expired socket token", body = ErrorBody),
        (status = 413, description = "The body is over `http.max_body_bytes`", body = ErrorBody),
        (status = 422, description = "`up_to_seq` missing, not an integer, or negative; or an unknown field", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the node overloaded; retry", body = ErrorBody),
    )
)]
#[tracing::instrument(name = "inbox_read", skip_all, fields(user_id = %user.0))]
pub async fn mark_read(
    State(state): State<ApiState>,
    user: UserToken,
    ApiJson(request): ApiJson<ReadRequest>,
) -> Result<Json<ReadResponse>, ApiError> {
    let UserToken(user) = user;
    if request.up_to_seq < 0 {
        return Err(ApiError::Invalid("up_to_seq: must be at least 0".into()));
    }
    let acked = state
        .store
        .record_acks(user.as_str(), ReadMark::UpToSeq(request.up_to_seq))
        .await?;
    state.metrics.client_acked(acked);
    let unread = state.store.unread_of(user.as_str()).await?;
    Ok(Json(ReadResponse {
        acked,
        unread: unread.count,
        unread_capped: unread.capped,
    }))
}

//! `POST /api/v1/events` and `POST /api/v1/events/batch`.
//!
//! A 202 means the events are committed to PostgreSQL. A retry carrying an idempotency key already
//! used by the same producer gets 200 and the original event, never a second one. A batch is all or
//! nothing: one invalid event rejects the whole batch, naming it.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Authenticated};
use super::request::{self, BatchRequest, EventRequest};
use crate::event::EventId;
use crate::pipeline::enqueue::Accepted;
use crate::store::{EventRecord, EventStatus};
use crate::traces::{self, Span as _};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry::KeyValue;
use serde::Serialize;
use utoipa::ToSchema;

/// The header carrying a single event's idempotency key.
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// What the API answers for one event.
#[derive(Serialize, ToSchema)]
pub struct EventResponse {
    /// The event's id (UUID v7).
    #[schema(value_type = uuid::Uuid)]
    id: EventId,
    /// `accepted` for a new event; a duplicate's current status.
    status: EventStatus,
    /// The user's sequence number.
    seq: i64,
    /// Present (true) only when an idempotency key was used before: this is the original event.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    duplicate: bool,
}

/// The answer to a batch.
#[derive(Serialize, ToSchema)]
pub struct BatchResponse {
    /// One per event sent, in order.
    events: Vec<EventResponse>,
}

/// `POST /api/v1/events`.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "producer",
    request_body = EventRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "A retry with a key the producer used before answers 200 with the original event"),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: the event continues this trace (a malformed one starts a new trace)"),
    ),
    security(("producer_key" = [])),
    responses(
        (status = 202, description = "Committed to PostgreSQL", body = EventResponse),
        (status = 200, description = "The idempotency key was used before: the original event", body = EventResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "The body or `data` over its limit", body = ErrorBody),
        (status = 422, description = "Wrong types, missing or unknown fields, bad values", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<ApiState>,
    Authenticated(producer): Authenticated,
    headers: HeaderMap,
    ApiJson(request): ApiJson<EventRequest>,
) -> Result<(StatusCode, Json<EventResponse>), ApiError> {
    let header_key = headers
        .get(IDEMPOTENCY_HEADER)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::Invalid("Idempotency-Key must be visible ASCII".into()))
        })
        .transpose()?;
    let event = request::validate(request, header_key, &state.limits.request(), "")?;
    let mut trace = request_trace("POST /api/v1/events", &headers, producer.id);
    let event = event.stamp(producer.id).traced(trace.traceparent);
    if let Some(span) = &mut trace.span {
        span.set_attribute(KeyValue::new("herald.event_id", event.id.to_string()));
        span.set_attribute(KeyValue::new(
            "herald.user_id",
            event.user_id.as_str().to_owned(),
        ));
    }
    let mut accepted = state.enqueue.enqueue(vec![event]).await?;
    let accepted = accepted
        .pop()
        .ok_or_else(|| ApiError::Internal("enqueue answered nothing".into()))?;
    if let Some(span) = &mut trace.span {
        span.set_attribute(KeyValue::new("herald.seq", accepted.seq));
    }
    let duplicate = accepted.duplicate_of_status.is_some();
    state
        .metrics
        .events_accepted(usize::from(!duplicate), "single");
    state.metrics.events_duplicate(usize::from(duplicate));
    let status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(response(accepted))))
}

/// `POST /api/v1/events/batch`.
#[utoipa::path(
    post,
    path = "/api/v1/events/batch",
    tag = "producer",
    request_body = BatchRequest,
    params(("traceparent" = Option<String>, Header, description = "W3C Trace Context: every event of the batch continues this trace")),
    security(("producer_key" = [])),
    responses(
        (status = 202, description = "All committed", body = BatchResponse),
        (status = 200, description = "Every event repeats an idempotency key used before", body = BatchResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "The body, the batch or an event's `data` over its limit", body = ErrorBody),
        (status = 422, description = "An invalid event (named, e.g. `events[3].user_id`); nothing is stored", body = ErrorBody),
    )
)]
pub async fn create_batch(
    State(state): State<ApiState>,
    Authenticated(producer): Authenticated,
    headers: HeaderMap,
    ApiJson(batch): ApiJson<BatchRequest>,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    let mut trace = request_trace("POST /api/v1/events/batch", &headers, producer.id);
    let events: Vec<_> = request::validate_batch(batch, &state.limits.request())?
        .into_iter()
        .map(|event| event.stamp(producer.id).traced(trace.traceparent))
        .collect();
    if let Some(span) = &mut trace.span {
        span.set_attribute(KeyValue::new("herald.events", events.len() as i64));
    }
    let accepted = state.enqueue.enqueue(events).await?;
    let duplicates = accepted
        .iter()
        .filter(|a| a.duplicate_of_status.is_some())
        .count();
    state
        .metrics
        .events_accepted(accepted.len() - duplicates, "batch");
    state.metrics.events_duplicate(duplicates);
    let status = if duplicates == accepted.len() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let events = accepted.into_iter().map(response).collect();
    Ok((status, Json(BatchResponse { events })))
}

/// The request's trace: a child of the producer's `traceparent` header (a malformed one starts a
/// new trace, as W3C Trace Context says), its span recorded when traces are on and sampled.
fn request_trace(route: &'static str, headers: &HeaderMap, producer: i64) -> traces::RequestTrace {
    let header = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    traces::request("herald.enqueue", header, || {
        vec![
            KeyValue::new("http.route", route),
            KeyValue::new("herald.producer_id", producer),
        ]
    })
}

fn response(accepted: Accepted) -> EventResponse {
    let duplicate = accepted.duplicate_of_status.is_some();
    EventResponse {
        id: accepted.id,
        status: accepted
            .duplicate_of_status
            .unwrap_or(EventStatus::Accepted),
        seq: accepted.seq,
        duplicate,
    }
}

/// `GET /api/v1/events/{id}`: a producer reads its own event's status (another producer's id is
/// answered 404, as if it did not exist).
#[utoipa::path(
    get,
    path = "/api/v1/events/{id}",
    tag = "producer",
    params(("id" = String, Path, description = "The event id")),
    security(("producer_key" = [])),
    responses(
        (status = 200, description = "The event's status and times", body = EventRecord),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 404, description = "No such event of this producer", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<ApiState>,
    Authenticated(producer): Authenticated,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EventRecord>, ApiError> {
    let id = id.parse::<EventId>().map_err(|_| ApiError::NotFound)?;
    state
        .store
        .event_record(id, Some(producer.id))
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

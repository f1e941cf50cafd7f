//! `POST /api/v1/events` and `POST /api/v1/events/batch`.
//!
//! A 202 means the events are committed to PostgreSQL. A retry carrying an idempotency key already
//! used by the same producer gets 200 and the original event, never a second one. A batch is all or
//! nothing: one invalid event rejects the whole batch, naming it.

use super::ApiState;
use super::error::ApiError;
use super::extract::{ApiJson, Authenticated};
use crate::event::{EventName, MAX_IDEMPOTENCY_KEY_BYTES, UserId, now_unix_ms};
use crate::pipeline::enqueue::Accepted;
use crate::store::NewEvent;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// The header carrying a single event's idempotency key.
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// One event as a producer sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// A string; a JSON integer is accepted and normalised to its decimal string.
    #[serde(deserialize_with = "string_or_integer")]
    user_id: String,
    /// Defaults to `push`.
    #[serde(default)]
    event: Option<String>,
    /// Any JSON; defaults to `{}`.
    #[serde(default)]
    data: Option<Box<RawValue>>,
    /// Per event in a batch (a single event may use the `Idempotency-Key` header instead).
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// A batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    events: Vec<EventRequest>,
}

/// What the API answers for one event.
#[derive(Serialize)]
pub struct EventResponse {
    id: Uuid,
    status: String,
    seq: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

/// The answer to a batch.
#[derive(Serialize)]
pub struct BatchResponse {
    events: Vec<EventResponse>,
}

pub(super) fn string_or_integer<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or an integer")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    deserializer.deserialize_any(Visitor)
}

/// `POST /api/v1/events`.
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
    let event = validate(request, producer.id, header_key, &state, "")?;
    let mut accepted = state.enqueue.enqueue(vec![event]).await?;
    let accepted = accepted
        .pop()
        .ok_or_else(|| ApiError::Internal("enqueue answered nothing".into()))?;
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
pub async fn create_batch(
    State(state): State<ApiState>,
    Authenticated(producer): Authenticated,
    ApiJson(batch): ApiJson<BatchRequest>,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    let max = state.limits.max_batch_events;
    if batch.events.len() > max {
        return Err(ApiError::TooLarge(format!(
            "batch has {} events; at most {max} are allowed",
            batch.events.len()
        )));
    }
    if batch.events.is_empty() {
        return Err(ApiError::Invalid("events: must not be empty".into()));
    }
    let events = batch
        .events
        .into_iter()
        .enumerate()
        .map(|(i, request)| validate(request, producer.id, None, &state, &format!("events[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
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

fn response(accepted: Accepted) -> EventResponse {
    let duplicate = accepted.duplicate_of_status.is_some();
    EventResponse {
        id: accepted.id,
        status: accepted
            .duplicate_of_status
            .unwrap_or_else(|| "accepted".into()),
        seq: accepted.seq,
        duplicate,
    }
}

/// Turns a request into a `NewEvent`, naming the offending field (prefixed with `at`) on error.
fn validate(
    request: EventRequest,
    producer_id: i64,
    header_key: Option<String>,
    state: &ApiState,
    at: &str,
) -> Result<NewEvent, ApiError> {
    let invalid = |field: &str, why: String| ApiError::Invalid(format!("{at}{field}: {why}"));
    let user_id = UserId::parse(request.user_id).map_err(|why| invalid("user_id", why))?;
    let event = match request.event {
        Some(name) => EventName::parse(name).map_err(|why| invalid("event", why))?,
        None => EventName::default_push(),
    };
    let data = match request.data {
        Some(data) => data,
        None => {
            RawValue::from_string("{}".to_owned()).map_err(|e| ApiError::Internal(Box::new(e)))?
        }
    };
    let max_data = state.limits.max_data_bytes;
    if data.get().len() > max_data {
        return Err(ApiError::TooLarge(format!(
            "{at}data: {} bytes; at most {max_data} are allowed",
            data.get().len()
        )));
    }
    let idempotency_key = match (header_key, request.idempotency_key) {
        (Some(h), Some(b)) if h != b => {
            return Err(invalid(
                "idempotency_key",
                "differs from the Idempotency-Key header".into(),
            ));
        }
        (h, b) => h.or(b),
    };
    if let Some(key) = &idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES)
    {
        return Err(invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
        ));
    }
    Ok(NewEvent {
        id: Uuid::now_v7(),
        producer_id,
        user_id,
        event,
        data,
        idempotency_key,
        enqueued_at_ms: now_unix_ms(),
    })
}

/// `GET /api/v1/events/{id}`: a producer reads its own event's status (another producer's id is
/// answered 404, as if it did not exist).
pub async fn get_one(
    State(state): State<ApiState>,
    Authenticated(producer): Authenticated,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::store::EventRecord>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    state
        .store
        .event_record(id, Some(producer.id))
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

//! `POST /api/v1/events` and `POST /api/v1/events/batch`.
//!
//! A 202 means the events are committed to PostgreSQL. A retry carrying an idempotency key already
//! used by the same producer gets 200 and the original event, never a second one. A batch is all or
//! nothing: one invalid event rejects the whole batch, naming it.

use super::ApiState;
use super::error::ApiError;
use super::extract::{ApiJson, Authenticated};
use super::request::{self, BatchRequest, EventRequest};
use crate::pipeline::enqueue::Accepted;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use uuid::Uuid;

/// The header carrying a single event's idempotency key.
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

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
    let event = request::validate(request, header_key, &state.limits.request(), "")?;
    let mut accepted = state
        .enqueue
        .enqueue(vec![event.stamp(producer.id)])
        .await?;
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
    let events = request::validate_batch(batch, &state.limits.request())?
        .into_iter()
        .map(|event| event.stamp(producer.id))
        .collect();
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

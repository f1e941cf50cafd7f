//! The admin API, for operators: list events with filters and keyset pagination, read one event
//! with its attempts, start a replay job and read its progress. Every route needs a key whose
//! producer has the admin role (`herald producers add NAME --admin`); any other key gets 401, as
//! a missing one does, so the routes reveal nothing to producers.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, bearer_key_hash, cached_lookup};
use crate::event::{EventId, now_unix_ms};
use crate::metrics::Snapshot;
use crate::pipeline::replay::{JOB_STALE_MS, replay_filter};
use crate::store::{AttemptRow, EventFilter, EventRecord, FilterText, Producer, ReplayJobStatus};
use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use utoipa::ToSchema;
use uuid::Uuid;

/// Most events one listing page holds (the admin listing's and the inbox's).
const MAX_PAGE: i64 = 1_000;
/// Events per page unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 100;

/// A listing's page size (the admin listing's and the inbox's): `limit`, or the default; 1 to
/// [`MAX_PAGE`].
pub(super) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::Invalid(format!("limit: must be 1 to {MAX_PAGE}")))
    }
}
/// The fastest replay job the API starts, in events/s: beyond it a cap means nothing (the
/// publisher is the limit), and the OpenAPI document states a bound its integer type can hold.
const MAX_REPLAY_RATE: u32 = 1_000_000;

/// An admin behind `Authorization: Bearer <key>`.
pub struct Admin(pub Producer);

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let hash = bearer_key_hash(parts)?;
        cached_lookup(
            &state.admin_keys,
            hash,
            state.store.admin_by_key_hash(&hash),
        )
        .await
        .map(Admin)
    }
}

/// The filter of a listing or a replay, as an operator writes it; times are RFC 3339 or relative
/// (`2h`: two hours ago).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct FilterParams {
    /// Statuses (`accepted`, `published`, `delivered`, `failed`), comma-separated in a query string.
    #[serde(default)]
    status: Option<StringOrList>,
    /// The producer's name.
    producer: Option<String>,
    /// The user.
    user_id: Option<String>,
    /// The event name.
    event: Option<String>,
    /// Enqueued at or after: RFC 3339, or a time ago (`30m`, `2h`, `7d`).
    since: Option<String>,
    /// Enqueued before: RFC 3339, or a time ago.
    until: Option<String>,
    /// Event ids, comma-separated in a query string.
    #[serde(default)]
    ids: Option<StringOrList>,
}

/// `"a,b"` or `["a", "b"]`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    /// Comma-separated.
    One(String),
    /// A list.
    Many(Vec<String>),
}

impl StringOrList {
    fn items(self) -> Vec<String> {
        let items = match self {
            Self::One(text) => text.split(',').map(str::to_owned).collect(),
            Self::Many(items) => items,
        };
        items
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

impl FilterParams {
    fn into_filter(self) -> Result<EventFilter, ApiError> {
        let ids = self
            .ids
            .map(StringOrList::items)
            .unwrap_or_default()
            .iter()
            .map(|id| {
                id.parse::<EventId>()
                    .map_err(|_| ApiError::Invalid(format!("ids: {id:?} is not an event id")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let text = FilterText {
            statuses: self.status.map(StringOrList::items).unwrap_or_default(),
            producer: self.producer,
            user_id: self.user_id,
            event: self.event,
            since: self.since,
            until: self.until,
            ids,
        };
        Ok(EventFilter::parse(text)?)
    }
}

/// The keys of a filter.
const FILTER_KEYS: [&str; 7] = [
    "status", "producer", "user_id", "event", "since", "until", "ids",
];

/// Reads a JSON object into `T`, refusing keys outside `FILTER_KEYS` and `own` (serde's
/// `deny_unknown_fields` does not work through `flatten`), with a JSON 422 when it does not fit.
fn parse_object<T: serde::de::DeserializeOwned>(
    object: serde_json::Map<String, Value>,
    own: &[&str],
) -> Result<T, ApiError> {
    if let Some(unknown) = object
        .keys()
        .find(|k| !FILTER_KEYS.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        let mut known: Vec<&str> = FILTER_KEYS.iter().chain(own).copied().collect();
        known.sort_unstable();
        return Err(ApiError::Invalid(format!(
            "unknown field `{unknown}` (known: {})",
            known.join(", ")
        )));
    }
    serde_json::from_value(Value::Object(object)).map_err(|e| ApiError::Invalid(e.to_string()))
}

/// The listing's own parameters, next to the filter.
#[derive(Deserialize)]
struct ListParams {
    #[serde(flatten)]
    filter: FilterParams,
    limit: Option<String>,
    /// The `next` cursor of the previous page.
    before: Option<String>,
}

/// A page of the admin listing.
#[derive(Serialize, ToSchema)]
pub struct EventPage {
    /// Newest first.
    events: Vec<EventRecord>,
    /// The cursor of the next page (`&before=<next>`); null on the last one.
    #[schema(value_type = Option<Uuid>)]
    next: Option<EventId>,
}

/// `GET /api/v1/admin/events?status=failed&producer=billing&user_id=42&event=x&since=2h&until=...
/// &ids=a,b&limit=100&before=<cursor>`: newest first; `next` is the cursor of the following page
/// (null on the last one).
#[utoipa::path(
    get,
    path = "/api/v1/admin/events",
    tag = "admin",
    params(
        ("status" = Option<String>, Query, description = "Statuses, comma-separated: accepted, published, delivered, failed"),
        ("producer" = Option<String>, Query, description = "The producer's name"),
        ("user_id" = Option<String>, Query, description = "The user"),
        ("event" = Option<String>, Query, description = "The event name"),
        ("since" = Option<String>, Query, description = "Enqueued at or after: RFC 3339 with an offset, a date (midnight UTC), now, or a time ago (30m, 2h, 7d)"),
        ("until" = Option<String>, Query, description = "Enqueued before: the same forms as since"),
        ("ids" = Option<String>, Query, description = "Event ids, comma-separated"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Events per page (default 100)"),
        ("before" = Option<Uuid>, Query, description = "The `next` cursor of the previous page"),
    ),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "A page of events, newest first", body = EventPage),
        (status = 401, description = "Missing key, or a key without the admin role", body = ErrorBody),
        (status = 422, description = "A bad filter value, limit or cursor, or an unknown parameter", body = ErrorBody),
    )
)]
pub async fn list_events(
    State(state): State<ApiState>,
    _admin: Admin,
    ApiQuery(raw): ApiQuery<HashMap<String, String>>,
) -> Result<Json<EventPage>, ApiError> {
    let object = raw
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let params: ListParams = parse_object(object, &["limit", "before"])?;
    let limit = match params.limit {
        None => page_limit(None)?,
        // Not a number reads like a number out of range: the same error either way.
        Some(text) => page_limit(Some(text.parse::<i64>().unwrap_or(0)))?,
    };
    let before = params
        .before
        .map(|c| {
            c.parse::<EventId>()
                .map_err(|_| ApiError::Invalid("before: not a cursor".into()))
        })
        .transpose()?;
    let filter = params.filter.into_filter()?;
    let events = state.store.list_events(&filter, before, limit).await?;
    let next = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(Json(EventPage { events, next }))
}

/// An event with its data and every attempt.
#[derive(Serialize, ToSchema)]
pub struct EventDetail {
    /// The event's status and times.
    #[serde(flatten)]
    event: EventRecord,
    /// The producer's data (null if it cannot be read back).
    data: Value,
    /// Every attempt, first to last.
    attempt_log: Vec<AttemptRow>,
    /// Every Web Push send of its fallback, first to last (empty when it had none).
    webpush_log: Vec<WebPushAttemptRow>,
}

/// One Web Push send of an event's fallback.
#[derive(Serialize, ToSchema)]
pub struct WebPushAttemptRow {
    /// Always `webpush`: the channel, beside the socket attempts of `attempt_log`.
    channel: &'static str,
    /// When it ended, Unix ms.
    at: i64,
    /// The push service's origin (the endpoint's path is the browser's and is not kept).
    origin: String,
    /// The push service's HTTP status; null when it did not answer.
    status: Option<i32>,
    /// `sent`, `retrying`, `failed`, or `gone` (the subscription expired and was removed).
    outcome: String,
    /// Why it failed.
    error: Option<String>,
}

/// `GET /api/v1/admin/events/{id}`: the event, its data, and every attempt.
#[utoipa::path(
    get,
    path = "/api/v1/admin/events/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The event id")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The event, its data and its attempt log", body = EventDetail),
        (status = 401, description = "Missing key, or a key without the admin role", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    )
)]
pub async fn get_event(
    State(state): State<ApiState>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EventDetail>, ApiError> {
    let id = id.parse::<EventId>().map_err(|_| ApiError::NotFound)?;
    let event = state
        .store
        .event_record(id, None)
        .await?
        .ok_or(ApiError::NotFound)?;
    let data: Value = state
        .store
        .event_data(id)
        .await?
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    let attempt_log = state.store.attempts_of(id).await?;
    let webpush_log = state
        .store
        .webpush_attempts(id)
        .await?
        .into_iter()
        .map(|a| WebPushAttemptRow {
            channel: "webpush",
            at: a.at_ms,
            origin: a.origin,
            status: a.status,
            outcome: a.outcome,
            error: a.error,
        })
        .collect();
    Ok(Json(EventDetail {
        event,
        data,
        attempt_log,
        webpush_log,
    }))
}

/// A replay request: the filter, plus how.
#[derive(Deserialize, ToSchema)]
pub struct ReplayRequest {
    #[serde(flatten)]
    filter: FilterParams,
    /// Also replay events already delivered (off: they are skipped).
    #[serde(default)]
    include_delivered: bool,
    /// Events per second at most, 1 to 1,000,000 (default `replay.default_rate`).
    #[schema(minimum = 1, maximum = 1_000_000)]
    rate: Option<u32>,
    /// Only count what would be replayed.
    #[serde(default)]
    dry_run: bool,
}

/// A replay job started.
#[derive(Serialize, ToSchema)]
pub struct ReplayStarted {
    /// The job's id, for `GET /api/v1/admin/replays/{id}`.
    id: Uuid,
    /// `running`.
    status: ReplayJobStatus,
    /// Events the filter matched.
    matched: i64,
}

/// What a dry run would replay.
#[derive(Serialize, ToSchema)]
pub struct ReplayDryRun {
    /// Always true.
    dry_run: bool,
    /// Events the filter matched.
    matched: i64,
}

/// `POST /api/v1/admin/replays`: `202 {"id", "status": "running", "matched"}`, or with
/// `"dry_run": true`, `200 {"dry_run": true, "matched"}`.
#[utoipa::path(
    post,
    path = "/api/v1/admin/replays",
    tag = "admin",
    request_body = ReplayRequest,
    security(("admin_key" = [])),
    responses(
        (status = 202, description = "The job runs", body = ReplayStarted),
        (status = 200, description = "A dry run: what would be replayed", body = ReplayDryRun),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing key, or a key without the admin role", body = ErrorBody),
        (status = 422, description = "A bad filter, rate or field", body = ErrorBody),
        (status = 429, description = "`replay.max_jobs` jobs run on this node already", body = ErrorBody),
    )
)]
pub async fn start_replay(
    State(state): State<ApiState>,
    Admin(admin): Admin,
    ApiJson(body): ApiJson<serde_json::Map<String, Value>>,
) -> Result<Response, ApiError> {
    let request: ReplayRequest = parse_object(body, &["include_delivered", "rate", "dry_run"])?;
    let rate = request.rate.unwrap_or(state.default_replay_rate);
    if !(1..=MAX_REPLAY_RATE).contains(&rate) {
        return Err(ApiError::Invalid(format!(
            "rate: must be 1 to {MAX_REPLAY_RATE} events/s"
        )));
    }
    let filter = request.filter.into_filter()?;
    let filter = replay_filter(filter, request.include_delivered).map_err(|e| match e {
        crate::pipeline::replay::ReplayError::Invalid(why) => ApiError::Invalid(why),
        crate::pipeline::replay::ReplayError::Store(e)
        | crate::pipeline::replay::ReplayError::Locked(e) => e.into(),
    })?;
    let matched = state.store.count_events(&filter).await?;
    if request.dry_run {
        return Ok(Json(ReplayDryRun {
            dry_run: true,
            matched,
        })
        .into_response());
    }
    let id = Uuid::now_v7();
    let recorded = serde_json::to_string(&filter).map_err(|e| ApiError::Internal(Box::new(e)))?;
    state
        .store
        .create_replay_job(id, &recorded, matched, admin.id)
        .await?;
    if let Err(busy) = state.replays.start(id, filter, rate, matched) {
        let _ = state
            .store
            .update_replay_job(
                id,
                0,
                0,
                Some((ReplayJobStatus::Failed, Some(&busy.to_string()))),
            )
            .await;
        return Err(ApiError::Busy(busy.to_string()));
    }
    tracing::info!(job = %id, admin = %admin.name, matched, rate, "replay job started");
    let started = ReplayStarted {
        id,
        status: ReplayJobStatus::Running,
        matched,
    };
    Ok((StatusCode::ACCEPTED, Json(started)).into_response())
}

/// A replay job's status and progress.
#[derive(Serialize, ToSchema)]
pub struct ReplayStatus {
    /// Job id.
    id: Uuid,
    /// Where it is (`interrupted`: its node stopped; run it again).
    status: ReplayJobStatus,
    /// The filter, as recorded.
    filter: Value,
    /// Events the filter matched when the job started.
    matched: i64,
    /// Events handed to the publisher.
    replayed: i64,
    /// Events left to the outbox relay while RabbitMQ was down.
    deferred: i64,
    /// Why the job failed.
    error: Option<String>,
    /// Start (RFC 3339).
    started_at: String,
    /// Last progress report.
    updated_at: String,
    /// End.
    finished_at: Option<String>,
}

/// `GET /api/v1/admin/replays/{id}`: the job's status and progress.
#[utoipa::path(
    get,
    path = "/api/v1/admin/replays/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The job id")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The job's status and progress", body = ReplayStatus),
        (status = 401, description = "Missing key, or a key without the admin role", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn get_replay(
    State(state): State<ApiState>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReplayStatus>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let job = state
        .store
        .replay_job(id, JOB_STALE_MS)
        .await?
        .ok_or(ApiError::NotFound)?;
    let filter: Value = serde_json::from_str(&job.filter).unwrap_or(Value::Null);
    Ok(Json(ReplayStatus {
        id: job.id,
        status: job.status,
        filter,
        matched: job.matched,
        replayed: job.replayed,
        deferred: job.deferred,
        error: job.error,
        started_at: job.started_at,
        updated_at: job.updated_at,
        finished_at: job.finished_at,
    }))
}

/// The console's live figures: `GET /api/v1/admin/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsResponse {
    /// The node that answered (the figures under `node` are its own).
    pub node_name: String,
    /// Its roles (`api+worker+socket`).
    pub roles: String,
    /// When the reading was taken, Unix ms.
    pub at_ms: i64,
    /// Per node: this node's counters since it started and its gauges, read from the instruments
    /// `/metrics` serves. The console turns the counters into rates.
    pub node: Snapshot,
    /// Cluster-wide: ready messages in each partition queue, from RabbitMQ; null while the broker
    /// cannot be reached.
    pub partitions: Option<Vec<PartitionDepth>>,
    /// Cluster-wide: events failed for good and not replayed since, from PostgreSQL.
    pub failed_events: i64,
}

/// One partition queue's depth.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionDepth {
    /// The partition.
    pub partition: u16,
    /// Messages ready in its queue (null: the queue does not exist).
    pub ready: Option<u32>,
}

/// `GET /api/v1/admin/stats`: this node's figures and the deployment's queue depths and failed
/// events, for the console to poll every second or two.
#[utoipa::path(
    get,
    path = "/api/v1/admin/stats",
    tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "This node's figures, the partitions' depths, failed events", body = StatsResponse),
        (status = 401, description = "Missing key, or a key without the admin role", body = ErrorBody),
    )
)]
pub async fn stats(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<StatsResponse>, ApiError> {
    let partitions = match state.depths.partitions().await {
        Ok(counts) => Some(
            (0u16..)
                .zip(counts)
                .map(|(partition, ready)| PartitionDepth { partition, ready })
                .collect(),
        ),
        Err(error) => {
            tracing::debug!(error = %error, "cannot read the partition depths");
            None
        }
    };
    let failed_events = state.store.failed_count().await?;
    Ok(Json(StatsResponse {
        node_name: state.metrics.node().to_owned(),
        roles: state.metrics.roles().to_owned(),
        at_ms: now_unix_ms(),
        node: state.metrics.snapshot(),
        partitions,
        failed_events,
    }))
}

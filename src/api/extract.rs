//! Extractors that turn requests into validated input or an [`ApiError`]: JSON bodies (so a rejection
//! is JSON too, with 400 for bad syntax and 422 for bad shape) and the producer behind an API key.

use super::ApiState;
use super::error::ApiError;
use crate::store::{ApiKey, Producer};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A JSON body. Content-Type is not required: `curl -d` sends form encoding by default, and the body
/// is parsed as JSON either way.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<ApiState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!(
                    "request body over {} bytes",
                    state.limits.max_body_bytes
                ))
            } else if timed_out(&rejection) {
                ApiError::Timeout("the request body stalled".into())
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|error| {
                use serde_json::error::Category;
                match error.classify() {
                    Category::Data => ApiError::Invalid(error.to_string()),
                    Category::Syntax | Category::Eof | Category::Io => {
                        ApiError::MalformedJson(error.to_string())
                    }
                }
            })
    }
}

/// True when reading the body failed because it stalled past `http.body_read_timeout_ms`.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The producer behind `Authorization: Bearer <key>`.
pub struct Authenticated(pub Producer);

impl FromRequestParts<ApiState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let hash = bearer_key_hash(parts)?;
        cached_lookup(&state.keys, hash, state.store.producer_by_key_hash(&hash))
            .await
            .map(Authenticated)
    }
}

/// The digest of the request's `Authorization: Bearer <key>`.
pub(super) fn bearer_key_hash(parts: &Parts) -> Result<KeyHash, ApiError> {
    let key = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    Ok(ApiKey::hash(key))
}

/// The producer owning `hash`, from `cache` or else from `lookup` (whose answer, found or not, is
/// cached); no producer is 401.
pub(super) async fn cached_lookup(
    cache: &KeyCache,
    hash: KeyHash,
    lookup: impl std::future::Future<Output = Result<Option<Producer>, crate::store::Error>>,
) -> Result<Producer, ApiError> {
    if let Some(cached) = cache.get(&hash) {
        return cached.ok_or(ApiError::Unauthorized);
    }
    let found = lookup.await?;
    cache.put(hash, found.clone());
    found.ok_or(ApiError::Unauthorized)
}

/// Remembers key lookups (hits and misses) for a short time, so a busy producer costs one query per
/// `ttl`, not one per request. A rotated or revoked key stops working within `ttl`.
pub struct KeyCache {
    ttl: Duration,
    max_entries: usize,
    // A std Mutex: held for a map lookup or insert only, never across an await.
    entries: Mutex<HashMap<KeyHash, (Option<Producer>, Instant)>>,
}

/// SHA-256 of an API key.
pub(super) type KeyHash = [u8; 32];

impl KeyCache {
    /// A cache keeping entries for `ttl`, at most `max_entries` of them.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn get(&self, hash: &[u8; 32]) -> Option<Option<Producer>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(producer, _)| producer.clone())
    }

    pub(super) fn put(&self, hash: [u8; 32], producer: Option<Producer>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max_entries {
            // Crude but bounded: unknown keys cannot grow memory without limit.
            entries.clear();
        }
        entries.insert(hash, (producer, Instant::now()));
    }
}

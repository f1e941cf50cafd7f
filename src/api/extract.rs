//! Extractors that turn requests into validated input or an [`ApiError`]: JSON bodies (so a rejection
//! is JSON too, with 400 for bad syntax and 422 for bad shape) and the producer behind an API key.

use super::error::ApiError;
use super::{ApiState, Limits};
use crate::event::UserId;
use crate::store::{ApiKey, Producer};
use crate::token::now_unix_secs;
use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// A JSON body. Content-Type is not required: `curl -d` sends form encoding by default, and the body
/// is parsed as JSON either way. Any router whose state holds the API's [`Limits`] (the API's, the
/// demo's) reads bodies with it, so their rejections are the same JSON errors.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
    Arc<Limits>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let max_body_bytes = Arc::<Limits>::from_ref(state).max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!("request body over {max_body_bytes} bytes"))
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
    let key = bearer(parts).ok_or(ApiError::Unauthorized)?;
    Ok(ApiKey::hash(key))
}

/// The credential of `Authorization: Bearer <credential>`, if the request has one.
fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The user behind `Authorization: Bearer <socket token>`: the token a backend minted for its
/// user's client (`POST /api/v1/tokens`), checked as the socket checks it. Missing, malformed,
/// forged or expired is 401.
pub struct UserToken(pub UserId);

impl FromRequestParts<ApiState> for UserToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::TokenRefused("missing socket token (Authorization: Bearer <token>)".into())
        })?;
        state
            .signer
            .verify(token, now_unix_secs())
            .map(UserToken)
            .map_err(|why| ApiError::TokenRefused(format!("socket token refused: {why}")))
    }
}

/// A path parameter parsed into `T`, refused as a JSON 422 (a bad percent-encoding, say) rather
/// than axum's plain-text 400.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection| ApiError::Invalid(rejection.body_text()))
    }
}

/// A query string parsed into `T`, refused as a JSON 422 naming what does not fit (axum's own
/// `Query` answers plain text).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection| ApiError::Invalid(rejection.body_text()))
    }
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

/// SHA-256 of an API key.
pub(super) type KeyHash = [u8; 32];

/// How long a known key is trusted without asking PostgreSQL: a rotated or revoked key stops
/// working within this.
const KNOWN_KEY_TTL: Duration = Duration::from_secs(30);
/// How long an unknown key is remembered as unknown: long enough that a flood of made-up keys
/// costs one query per key, short enough that a new producer's key works at once in practice.
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(5);

/// Remembers key lookups, hits and misses, so a busy producer costs one query per
/// `KNOWN_KEY_TTL`, not one per request, and a made-up key one query per `UNKNOWN_KEY_TTL`.
/// Bounded in entries, evicting by frequency (moka's TinyLFU): a flood of one-off unknown keys
/// does not push out the keys in real use.
pub struct KeyCache {
    entries: moka::sync::Cache<KeyHash, Option<Producer>>,
}

/// Entries expire by kind: known keys after `KNOWN_KEY_TTL`, unknown ones sooner.
struct ByKind;

impl moka::Expiry<KeyHash, Option<Producer>> for ByKind {
    fn expire_after_create(
        &self,
        _key: &KeyHash,
        producer: &Option<Producer>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(match producer {
            Some(_) => KNOWN_KEY_TTL,
            None => UNKNOWN_KEY_TTL,
        })
    }
}

impl KeyCache {
    /// A cache of at most `max_entries` keys.
    pub fn new(max_entries: u64) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(ByKind)
                .build(),
        }
    }

    pub(super) fn get(&self, hash: &KeyHash) -> Option<Option<Producer>> {
        self.entries.get(hash)
    }

    pub(super) fn put(&self, hash: KeyHash, producer: Option<Producer>) {
        self.entries.insert(hash, producer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_remembered_and_the_cache_is_bounded() {
        let cache = KeyCache::new(100);
        cache.put([1; 32], None);
        assert_eq!(
            cache.get(&[1; 32]),
            Some(None),
            "an unknown key is cached as unknown"
        );
        assert_eq!(cache.get(&[2; 32]), None, "a key never looked up is not");
        for i in 0..1_000u32 {
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            cache.put(key, None);
        }
        cache.entries.run_pending_tasks();
        assert!(
            cache.entries.entry_count() <= 100,
            "{}",
            cache.entries.entry_count()
        );
    }
}

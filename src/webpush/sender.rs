//! The push sender, on worker nodes: claims due pushes from `webpush_outbox`, drops those a client
//! already has, and sends the others, each request bounded in time, all of them in number
//! (`webpush.max_in_flight`) and per push service (`webpush.max_in_flight_per_origin`: a push over
//! that is put off a poll interval, not waited for, so a service that hangs holds at most its own
//! share of the slots).
//!
//! A push service's answer decides what follows (RFC 8030 §5, RFC 8292 §4): 2xx sent; 404 and 410
//! the subscription is gone and removed; 413 the payload was too large, sent again as its summary;
//! 429 and 5xx (and no answer) retried after the event name's retry delays, or later when the
//! service says so (`Retry-After`), until the event's retry budget (`retry.max_attempts`) is spent;
//! any other 4xx failed for good. Each ends as a row of `webpush_attempts`.

use super::guard::{EndpointPolicy, PublicResolver};
use super::{VapidKey, payload};
use crate::backoff::random_unit;
use crate::config::{EventWebPushSettings, FallbackUnless, WebPushSettings};
use crate::errors::one_line;
use crate::event::now_unix_ms;
use crate::metrics::Metrics;
use crate::pipeline::retry::{Decision, RetryPolicy};
use crate::store::{DuePush, PushOutcome, Store};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a VAPID token is reused for one push service (it is valid for 12 hours).
const TOKEN_REUSE: Duration = Duration::from_secs(3600);
/// How long a VAPID token is valid: RFC 8292 allows at most 24 hours.
const TOKEN_LIFETIME_SECS: u64 = 12 * 3600;
/// How long a sender waits after a claim failed (PostgreSQL away).
const CLAIM_RETRY: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why a sender could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The VAPID key is malformed (settings validation refuses it first).
    #[error(transparent)]
    Key(#[from] super::KeyError),
    /// The HTTP client could not be built (no TLS roots, say).
    #[error("cannot build the push client")]
    Client(#[source] reqwest::Error),
}

/// Sends due pushes; see the module docs.
pub struct Sender {
    store: Store,
    metrics: Metrics,
    client: reqwest::Client,
    key: VapidKey,
    settings: Arc<WebPushSettings>,
    policy: EndpointPolicy,
    retry: Arc<RetryPolicy>,
    slots: Arc<Semaphore>,
    origins: Mutex<HashMap<String, Arc<Semaphore>>>,
    tokens: Mutex<HashMap<String, (Instant, HeaderValue)>>,
}

impl Sender {
    /// A sender for `settings` (with a VAPID key).
    ///
    /// # Errors
    /// No key, a malformed key, or no HTTP client.
    pub fn new(
        store: Store,
        metrics: Metrics,
        settings: Arc<WebPushSettings>,
        retry: Arc<RetryPolicy>,
    ) -> Result<Self, SenderError> {
        let key = settings
            .vapid_private_key
            .as_ref()
            .ok_or(super::KeyError::Encoding)?;
        let key = VapidKey::from_base64(key.expose())?;
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout())
            .connect_timeout(settings.request_timeout())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PublicResolver {
                allow_private: settings.allow_private_endpoints,
            }))
            .pool_max_idle_per_host(settings.max_in_flight_per_origin)
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SenderError::Client)?;
        Ok(Self {
            store,
            metrics,
            client,
            key,
            policy: policy_of(&settings),
            slots: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            retry,
            origins: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Claims and sends due pushes until `stop`; then waits for the requests in flight.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let tasks = TaskTracker::new();
        // A claim holds its rows past one request's bound, so a row is never claimed twice while
        // its request may still be out.
        let hold_ms = (self.settings.request_timeout_ms + 5_000) as i64;
        let mut full_claim = false;
        loop {
            if !full_claim {
                tokio::select! {
                    () = tokio::time::sleep(self.settings.poll_interval()) => {}
                    () = stop.cancelled() => break,
                }
            }
            full_claim = false;
            let free = self.slots.available_permits();
            if free == 0 {
                continue;
            }
            let claimed = match self.store.claim_webpush(free as i64, hold_ms).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(error = ?error, "cannot claim due web pushes; trying again in 5 s");
                    tokio::select! {
                        () = tokio::time::sleep(CLAIM_RETRY) => {}
                        () = stop.cancelled() => break,
                    }
                    continue;
                }
            };
            full_claim = claimed.len() == free;
            for push in claimed {
                let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await else {
                    break;
                };
                tasks.spawn(Arc::clone(&self).send(push, slot));
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Sends one push (or drops it) and records how it ended.
    async fn send(self: Arc<Self>, push: DuePush, _slot: OwnedSemaphorePermit) {
        let event = push.event.id;
        let subscription = push.subscription.id;
        let origin = origin_of(&push.subscription.endpoint);
        let (outcome, took) = match self.settings.fallback(&push.event.event) {
            Some(policy) if settled(&push, policy.unless) => (PushOutcome::Received, None),
            // The event name no longer falls back (settings changed): nothing to send.
            None => (PushOutcome::Received, None),
            Some(policy) => match self.origin_slot(&origin) {
                Some(_origin_slot) => {
                    let started = Instant::now();
                    let outcome = self.request(&push, policy, &origin).await;
                    (outcome, Some(started.elapsed()))
                }
                None => {
                    // Its push service has its share in flight: put off, not counted as a try.
                    let again = now_unix_ms() + self.settings.poll_interval_ms as i64;
                    (PushOutcome::Deferred { until_ms: again }, None)
                }
            },
        };
        if let Some(label) = outcome.label() {
            self.metrics.webpush_sent(label, took);
        }
        if let Err(error) = self
            .store
            .finish_webpush(event, subscription, &origin, &outcome)
            .await
        {
            // The claim runs out and the push is due again: sent twice at worst.
            tracing::warn!(error = ?error, event_id = %event, "cannot record a web push");
        }
    }

    /// A slot of `origin`'s share, if one is free.
    fn origin_slot(&self, origin: &str) -> Option<OwnedSemaphorePermit> {
        let mut origins = self.origins.lock().expect("origins lock");
        // Forget idle origins now and then, so the map holds only services in use.
        if origins.len() > 1_024 {
            let per_origin = self.settings.max_in_flight_per_origin;
            origins.retain(|_, slots| slots.available_permits() < per_origin);
        }
        let slots = origins
            .entry(origin.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_in_flight_per_origin)));
        Arc::clone(slots).try_acquire_owned().ok()
    }

    /// Encrypts, signs and sends one push under its event name's `policy`; what its answer means.
    async fn request(
        &self,
        push: &DuePush,
        policy: &EventWebPushSettings,
        origin: &str,
    ) -> PushOutcome {
        let url = match self.policy.check_endpoint(&push.subscription.endpoint) {
            Ok(url) => url,
            Err(why) => return gone(None, why.to_string()),
        };
        let body = match self.encrypt(push) {
            Ok(body) => body,
            Err(why) => return gone(None, why),
        };
        let ttl = policy.ttl_secs.unwrap_or(self.settings.ttl_secs);
        let mut headers = HeaderMap::new();
        headers.insert("TTL", HeaderValue::from(ttl));
        if let Ok(urgency) = HeaderValue::from_str(&policy.urgency) {
            headers.insert("Urgency", urgency);
        }
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("aes128gcm"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(header::AUTHORIZATION, self.authorization(origin));
        let sent = self
            .client
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(answer) => self.judge(push, answer.status(), retry_after(answer.headers())),
            Err(error) => {
                let why = if error.is_timeout() {
                    "the push service did not answer in time".to_owned()
                } else {
                    format!("cannot reach the push service: {}", one_line(&error))
                };
                self.retry_or_fail(push, None, why, None)
            }
        }
    }

    /// The payload encrypted to the subscription's keys (RFC 8291, aes128gcm).
    fn encrypt(&self, push: &DuePush) -> Result<Vec<u8>, String> {
        let subscription = &push.subscription;
        let public = web_push_native::p256::PublicKey::from_sec1_bytes(&subscription.p256dh)
            .map_err(|_| "the subscription's p256dh is not a P-256 key".to_owned())?;
        if subscription.auth.len() != 16 {
            return Err("the subscription's auth is not 16 bytes".into());
        }
        let auth = web_push_native::Auth::clone_from_slice(&subscription.auth);
        web_push_native::encrypt(payload(&push.event, push.summarize), &public, &auth)
            .map_err(|error| format!("cannot encrypt the payload: {error}"))
    }

    /// What a push service's status means for the push.
    fn judge(&self, push: &DuePush, status: StatusCode, after: Option<Duration>) -> PushOutcome {
        let code = status.as_u16();
        match code {
            200..=299 => PushOutcome::Sent { status: code },
            404 | 410 => gone(Some(code), format!("the subscription is gone ({status})")),
            413 if !push.summarize => PushOutcome::Retrying {
                status: Some(code),
                error: "payload too large; sending its summary".into(),
                retry_at_ms: now_unix_ms(),
                summarize: true,
            },
            429 | 500..=599 => self.retry_or_fail(
                push,
                Some(code),
                format!("the push service answered {status}"),
                after,
            ),
            _ => PushOutcome::Failed {
                status: Some(code),
                error: format!("the push service refused the push ({status})"),
            },
        }
    }

    /// Retried after the event name's next delay (or the push service's `Retry-After`, if
    /// later), unless its tries are spent.
    fn retry_or_fail(
        &self,
        push: &DuePush,
        status: Option<u16>,
        error: String,
        after: Option<Duration>,
    ) -> PushOutcome {
        let tried = u32::try_from(push.tries).unwrap_or(0) + 1;
        match self.retry.decide(&push.event.event, tried, random_unit()) {
            Decision::Retry { wait_ms, .. } => {
                let wait = Duration::from_millis(wait_ms).max(after.unwrap_or_default());
                PushOutcome::Retrying {
                    status,
                    error,
                    retry_at_ms: now_unix_ms() + wait.as_millis() as i64,
                    summarize: push.summarize,
                }
            }
            Decision::GiveUp => PushOutcome::Failed {
                status,
                error: format!("{error}; {tried} tries, giving up"),
            },
        }
    }

    /// The VAPID `Authorization` for `origin`, reused for a while (signing costs an ECDSA).
    fn authorization(&self, origin: &str) -> HeaderValue {
        let mut tokens = self.tokens.lock().expect("tokens lock");
        if let Some((made, value)) = tokens.get(origin)
            && made.elapsed() < TOKEN_REUSE
        {
            return value.clone();
        }
        if tokens.len() > 1_024 {
            tokens.retain(|_, (made, _)| made.elapsed() < TOKEN_REUSE);
        }
        let expires = u64::try_from(now_unix_ms() / 1000).unwrap_or(0) + TOKEN_LIFETIME_SECS;
        let header = self
            .key
            .authorization(origin, &self.settings.subject, expires);
        let value = HeaderValue::from_str(&header).expect("a VAPID header is ASCII");
        tokens.insert(origin.to_owned(), (Instant::now(), value.clone()));
        value
    }
}

/// The endpoint policy the settings give.
pub fn policy_of(settings: &WebPushSettings) -> EndpointPolicy {
    EndpointPolicy {
        hosts: settings.endpoint_hosts.clone(),
        allow_private: settings.allow_private_endpoints,
    }
}

/// A push no longer needed: a client received the event (or acknowledged it, if its policy asks).
fn settled(push: &DuePush, unless: FallbackUnless) -> bool {
    match unless {
        FallbackUnless::Received => push.received || push.event.acked,
        FallbackUnless::Acked => push.event.acked,
    }
}

fn gone(status: Option<u16>, error: String) -> PushOutcome {
    PushOutcome::Gone { status, error }
}

/// The endpoint's origin (scheme, host, port): what the attempt log keeps and VAPID's audience.
fn origin_of(endpoint: &str) -> String {
    url::Url::parse(endpoint)
        .map(|url| url.origin().ascii_serialization())
        .unwrap_or_else(|_| "invalid".into())
}

/// A `Retry-After` in seconds (the HTTP-date form is not honoured), at most an hour.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

//! Producers, as a real backend behaves: single events and batches to any live api node, every
//! event with an idempotency key, each request retried with the same keys (to any api node) until
//! it is answered 2xx. Every answer is recorded per key: two ids for one key is a violation.

use super::cluster::Registry;
use super::history::{Answer, KeyRecord};
use super::rng::Rng;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one event is retried before the producer gives up on it (a violation: the deployment
/// was healed long before).
const GIVE_UP_AFTER: Duration = Duration::from_secs(90);
/// One in this many events is a poison event (failed by design after its retries).
const POISON_ONE_IN: u64 = 100;

/// What every producer counts.
#[derive(Default)]
pub struct ProducerStats {
    pub requests: AtomicU64,
    pub batches: AtomicU64,
}

/// One producer task: streams about `rate` events/s until `stop`, then finishes the request in
/// hand; returns a record per key it used.
pub async fn produce(
    mut rng: Rng,
    index: usize,
    rate: f64,
    api: Registry,
    key: String,
    stats: Arc<ProducerStats>,
    stop: CancellationToken,
) -> Vec<KeyRecord> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut records = Vec::new();
    let mut next_at = Instant::now();
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let size = if rng.chance(0.15) {
            rng.between(2, 10)
        } else {
            1
        };
        let first = records.len();
        for _ in 0..size {
            n += 1;
            records.push(KeyRecord {
                key: format!("p{index}-{n}"),
                user: super::pick_user(&mut rng),
                poison: rng.below(POISON_ONE_IN) == 0,
                answers: Vec::new(),
                gave_up: false,
                refused: Vec::new(),
            });
        }
        let batch = &mut records[first..];
        let sent = Sent {
            http: &http,
            api: &api,
            key: &key,
            stats: &stats,
        };
        sent.until_answered(&mut rng, batch).await;
        // Pacing the load, not synchronising: the debug build must keep up.
        next_at = (next_at + Duration::from_secs_f64(size as f64 / rate)).max(Instant::now());
        tokio::select! {
            () = tokio::time::sleep_until(next_at) => {}
            () = stop.cancelled() => {}
        }
    }
    records
}

/// Where and how a producer sends.
struct Sent<'a> {
    http: &'a reqwest::Client,
    api: &'a Registry,
    key: &'a str,
    stats: &'a ProducerStats,
}

impl Sent<'_> {
    /// Sends `events` (one: a single event; more: a batch) until a 2xx answers them, recording
    /// the answer in each; marks them given up after [`GIVE_UP_AFTER`].
    async fn until_answered(&self, rng: &mut Rng, events: &mut [KeyRecord]) {
        let deadline = Instant::now() + GIVE_UP_AFTER;
        let (path, body) = if let [event] = &*events {
            ("/api/v1/events", body_of(event))
        } else {
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let list: Vec<Value> = events
                .iter()
                .map(|e| {
                    let mut body = body_of(e);
                    body["idempotency_key"] = json!(e.key);
                    body
                })
                .collect();
            ("/api/v1/events/batch", json!({ "events": list }))
        };
        while Instant::now() < deadline {
            let nodes = self.api.borrow().clone();
            if !nodes.is_empty() {
                let (_, addr) = rng.pick(&nodes);
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut request = self
                    .http
                    .post(format!("http://{addr}{path}"))
                    .bearer_auth(self.key)
                    .json(&body);
                if let [event] = &*events {
                    request = request.header("Idempotency-Key", &event.key);
                }
                match answered(request.send().await).await {
                    Ok(answers) if answers.len() == events.len() => {
                        for (event, answer) in events.iter_mut().zip(answers) {
                            event.answers.push(answer);
                        }
                        return;
                    }
                    Err(Some(refusal)) => {
                        for event in events.iter_mut() {
                            event.refused.push(refusal.clone());
                        }
                    }
                    Ok(_) | Err(None) => {}
                }
            }
            // Refused, 503, cut off or no node up: retry (the keys dedupe), as a backend would.
            tokio::time::sleep(Duration::from_millis(rng.between(50, 200))).await;
        }
        for event in events {
            event.gave_up = true;
        }
    }
}

fn body_of(event: &KeyRecord) -> Value {
    let name = if event.poison { "poison" } else { "push" };
    json!({"user_id": event.user, "event": name, "data": {"key": event.key}})
}

/// The answers of a 2xx (one per event, a batch's in order); otherwise an answer that was not
/// "retry later" (503, 429), with its body, or `None` (retry later, cut off, unreadable).
async fn answered(
    response: reqwest::Result<reqwest::Response>,
) -> Result<Vec<Answer>, Option<(u16, String)>> {
    let response = response.map_err(|_| None)?;
    let http = response.status().as_u16();
    if !response.status().is_success() {
        if matches!(http, 503 | 429) {
            return Err(None);
        }
        let body = response.text().await.unwrap_or_default();
        return Err(Some((http, body.chars().take(300).collect())));
    }
    let body: Value = response.json().await.map_err(|_| None)?;
    let answer = |v: &Value| {
        Some(Answer {
            http,
            id: v["id"].as_str()?.parse().ok()?,
            seq: v["seq"].as_i64()?,
            status: v["status"].as_str()?.to_owned(),
        })
    };
    match body["events"].as_array() {
        Some(list) => list.iter().map(answer).collect::<Option<_>>().ok_or(None),
        None => Ok(vec![answer(&body).ok_or(None)?]),
    }
}

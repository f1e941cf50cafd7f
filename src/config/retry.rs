//! The delivery retries' section (`[retry]`): the backoff schedule and attempt limit, and the
//! per-event-name policies that override them.

use super::Error;
use super::validate::invalid;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Delivery retries. A failed attempt is retried through RabbitMQ delay queues (one per distinct
/// delay, whose messages expire back into the work queue), never by a sleeping task.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Delay before each retry, in order (`HERALD_RETRY__SCHEDULE_MS=1000,5000,...`); when
    /// `max_attempts` asks for more retries than listed, the last delay repeats.
    pub schedule_ms: Vec<u64>,
    /// Attempts in all, the first included; after the last the event is failed and dead-lettered.
    pub max_attempts: u32,
    /// Each delay is drawn uniformly within this fraction either side of the scheduled one
    /// (0.1: 10 s becomes 9 to 11 s), so events failed together do not retry together.
    pub jitter: f64,
    /// Bound on one attempt; an attempt that takes longer has failed (and is retried).
    pub attempt_timeout_ms: u64,
    /// Per event name, a schedule and limit of its own (settings file only:
    /// `[retry.events.invoice_paid]` with `schedule_ms` and/or `max_attempts`).
    pub events: BTreeMap<String, EventRetrySettings>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            schedule_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            max_attempts: 6,
            jitter: 0.1,
            attempt_timeout_ms: 10_000,
            events: BTreeMap::new(),
        }
    }
}

/// One event name's retry policy; what is left out comes from `[retry]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventRetrySettings {
    /// Delays before each retry.
    pub schedule_ms: Option<Vec<u64>>,
    /// Attempts in all.
    pub max_attempts: Option<u32>,
}

impl RetrySettings {
    /// Every distinct delay of every schedule: one delay queue each.
    pub fn delays_ms(&self) -> Vec<u64> {
        let mut delays: Vec<u64> = self
            .events
            .values()
            .filter_map(|e| e.schedule_ms.as_ref())
            .chain(std::iter::once(&self.schedule_ms))
            .flatten()
            .copied()
            .collect();
        delays.sort_unstable();
        delays.dedup();
        delays
    }
}

durations! {
    RetrySettings {
        attempt_timeout_ms => attempt_timeout,
    }
}

impl RetrySettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return invalid("retry.max_attempts", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return invalid("retry.jitter", "must be at least 0 and below 1");
        }
        if self.max_attempts > 1 && self.schedule_ms.is_empty() {
            return invalid(
                "retry.schedule_ms",
                "must list a delay when retries are allowed",
            );
        }
        for (name, policy) in &self.events {
            if policy.max_attempts == Some(0) {
                return invalid(
                    &format!("retry.events.{name}.max_attempts"),
                    "must be at least 1",
                );
            }
            if policy.schedule_ms.as_ref().is_some_and(Vec::is_empty) {
                return invalid(
                    &format!("retry.events.{name}.schedule_ms"),
                    "must not be empty",
                );
            }
        }
        if self.delays_ms().contains(&0) {
            return invalid("retry.schedule_ms", "delays must be at least 1 ms");
        }
        Ok(())
    }
}

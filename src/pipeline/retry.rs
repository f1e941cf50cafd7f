//! The retry policy: after a failed attempt, retry later or give up. Pure (the random draw for the
//! jitter is passed in), so it is unit-tested here; the worker carries the decision out through
//! RabbitMQ delay queues (`queue::publish_retry`).
//!
//! Attempt numbers count from 1 within a run: a first publish, a relay republish and an operator
//! replay all start at attempt 1 (a replay gets the full schedule again).

use crate::config::RetrySettings;
use std::collections::HashMap;

/// What to do after failed attempt `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again after about `delay_ms`.
    Retry {
        /// The scheduled delay: names the delay queue.
        delay_ms: u64,
        /// The jittered delay actually waited.
        wait_ms: u64,
        /// The attempt number of the retry.
        next_attempt: u32,
    },
    /// That was the last attempt: fail the event and dead-letter its message.
    GiveUp,
}

#[derive(Clone, Debug)]
struct Schedule {
    delays_ms: Vec<u64>,
    max_attempts: u32,
}

/// Per event name where configured, else the default schedule.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    default: Schedule,
    by_event: HashMap<String, Schedule>,
    jitter: f64,
}

impl RetryPolicy {
    /// The policy `settings` describe (validated at load).
    pub fn new(settings: &RetrySettings) -> Self {
        let default = Schedule {
            delays_ms: settings.schedule_ms.clone(),
            max_attempts: settings.max_attempts,
        };
        let by_event = settings
            .events
            .iter()
            .map(|(name, own)| {
                let schedule = Schedule {
                    delays_ms: own
                        .schedule_ms
                        .clone()
                        .unwrap_or_else(|| default.delays_ms.clone()),
                    max_attempts: own.max_attempts.unwrap_or(default.max_attempts),
                };
                (name.clone(), schedule)
            })
            .collect();
        Self {
            default,
            by_event,
            jitter: settings.jitter,
        }
    }

    /// The decision after attempt `failed_attempt` (1-based) of an event named `event` failed.
    /// `unit` is a uniform draw from [0, 1) that places the wait within the jitter band.
    pub fn decide(&self, event: &str, failed_attempt: u32, unit: f64) -> Decision {
        let schedule = self.by_event.get(event).unwrap_or(&self.default);
        if failed_attempt >= schedule.max_attempts {
            return Decision::GiveUp;
        }
        let index = (failed_attempt.max(1) as usize - 1).min(schedule.delays_ms.len() - 1);
        let Some(&delay_ms) = schedule.delays_ms.get(index) else {
            return Decision::GiveUp;
        };
        let factor = 1.0 - self.jitter + 2.0 * self.jitter * unit.clamp(0.0, 1.0);
        let wait_ms = ((delay_ms as f64 * factor).round() as u64).max(1);
        Decision::Retry {
            delay_ms,
            wait_ms,
            next_attempt: failed_attempt + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::random_unit;
    use crate::config::EventRetrySettings;

    fn settings() -> RetrySettings {
        let mut s = RetrySettings {
            schedule_ms: vec![1_000, 5_000, 30_000],
            max_attempts: 6,
            jitter: 0.1,
            ..RetrySettings::default()
        };
        s.events.insert(
            "invoice".into(),
            EventRetrySettings {
                schedule_ms: Some(vec![100]),
                max_attempts: Some(2),
            },
        );
        s
    }

    fn delays(policy: &RetryPolicy, event: &str) -> Vec<Decision> {
        (1..=8).map(|n| policy.decide(event, n, 0.5)).collect()
    }

    #[test]
    fn follows_the_schedule_repeats_its_last_delay_then_gives_up() {
        let policy = RetryPolicy::new(&settings());
        let waits: Vec<Option<u64>> = delays(&policy, "push")
            .into_iter()
            .map(|d| match d {
                Decision::Retry { wait_ms, .. } => Some(wait_ms),
                Decision::GiveUp => None,
            })
            .collect();
        assert_eq!(
            waits,
            [
                Some(1_000),
                Some(5_000),
                Some(30_000),
                Some(30_000),
                Some(30_000),
                None,
                None,
                None
            ]
        );
        assert_eq!(
            policy.decide("push", 2, 0.5),
            Decision::Retry {
                delay_ms: 5_000,
                wait_ms: 5_000,
                next_attempt: 3
            }
        );
    }

    #[test]
    fn an_event_name_can_have_its_own_policy() {
        let policy = RetryPolicy::new(&settings());
        assert_eq!(
            policy.decide("invoice", 1, 0.5),
            Decision::Retry {
                delay_ms: 100,
                wait_ms: 100,
                next_attempt: 2
            }
        );
        assert_eq!(policy.decide("invoice", 2, 0.5), Decision::GiveUp);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let policy = RetryPolicy::new(&settings());
        let wait = |unit| match policy.decide("push", 3, unit) {
            Decision::Retry { wait_ms, .. } => wait_ms,
            Decision::GiveUp => 0,
        };
        assert_eq!(wait(0.0), 27_000);
        assert_eq!(wait(0.999_999), 33_000);
        for _ in 0..1_000 {
            let w = wait(random_unit());
            assert!((27_000..=33_000).contains(&w), "{w}");
        }
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let policy = RetryPolicy::new(&RetrySettings {
            max_attempts: 1,
            ..RetrySettings::default()
        });
        assert_eq!(policy.decide("push", 1, 0.5), Decision::GiveUp);
    }
}

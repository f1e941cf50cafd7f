//! Deciding and settling: what each event's attempt comes to, decided once per event ([`Decided`]):
//! the record to write, and how its message is let go once the run's records are written. A
//! failure is followed up here first: its retry scheduled through the delay queue of its next
//! delay, or, after the last attempt (or a delay queue the broker refuses), a dead letter.

use super::Worker;
use super::attempt::Attempted;
use super::in_work::{EventInWork, Release};
use crate::backoff::random_unit;
use crate::event::{encode_batch, now_unix_ms};
use crate::pipeline::outcomes::Recorded;
use crate::pipeline::retry::Decision;
use crate::queue::{self, RetryMessage, RetryPublishError, Topology};
use crate::store::{AttemptRecord, AttemptResult};
use lapin::Channel;
use std::time::Duration;
use uuid::Uuid;

/// How an event's attempt ended, for settling its message.
enum Settle {
    /// Delivered: done once recorded.
    Delivered,
    /// A retry copy is in a delay queue: done, recorded or not (the retry records its own
    /// attempt).
    Retried,
    /// Failed for good (dead-lettered): done once recorded.
    Failed,
    /// Whether its retry reached the delay queue is unknown (no confirm in time, or its channel
    /// failed): the message comes back and the attempt is made again.
    Requeue,
}

impl Settle {
    /// How the event lets go of its message, given whether its record was `stored`.
    fn release(self, stored: bool) -> Release {
        match self {
            // Its retry is in a delay queue either way; without its record, the retry has no
            // outbox row, so this message's row stays.
            Self::Retried if stored => Release::Done,
            Self::Retried => Release::DoneKeepRow,
            Self::Requeue => Release::Requeue,
            Self::Delivered | Self::Failed if stored => Release::Done,
            Self::Delivered | Self::Failed => Release::Requeue,
        }
    }
}

/// One event of a run once its attempt is decided.
pub(super) struct Decided {
    item: EventInWork,
    /// What to record; none for an event that was not attempted.
    pub(super) record: Option<AttemptRecord>,
    /// How its message is settled once the records are written.
    settle: Settle,
    /// The outcome's metric label (`pushed`, `offline`, `failed`), if attempted.
    pub(super) outcome: Option<&'static str>,
}

impl Decided {
    /// Lets go of the event's message once the run's records are written (`recorded`).
    pub(super) async fn finish(self, recorded: &Recorded) {
        // Refused by the lease's epoch, or not stored: the partition's owner delivers it.
        let stored = recorded
            .as_ref()
            .is_ok_and(|fenced| !fenced.contains(&self.item.envelope.id));
        self.item.settle(self.settle.release(stored)).await;
    }
}

/// Where retries and dead letters go: the consumer connection's confirm-mode channel.
pub(super) struct RetryRoute<'a> {
    pub(super) channel: &'a Channel,
    pub(super) names: &'a Topology,
    pub(super) confirm_timeout: Duration,
}

impl Worker {
    /// What one event's attempt comes to: the record to write (none when it was not attempted)
    /// and how its message is settled; a failure is first scheduled for retry or dead-lettered.
    pub(super) async fn decide(
        &self,
        item: EventInWork,
        attempted: Attempted,
        (started_at_ms, finished_at_ms): (i64, i64),
        route: &RetryRoute<'_>,
    ) -> Decided {
        let record = |result| AttemptRecord {
            id: item.envelope.id,
            lease: item.lease.token(),
            started_at_ms,
            finished_at_ms,
            result,
        };
        // A failure is not followed up (no retry scheduled, nothing dead-lettered) under a lease
        // lost meanwhile: the partition's owner makes its own attempt.
        let attempted = match attempted {
            Attempted::Failed(_) if !item.lease.is_trusted() => {
                self.metrics.fenced("attempt", 1);
                Attempted::Fenced
            }
            attempted => attempted,
        };
        let (record, settle, outcome) = match attempted {
            Attempted::Fenced => (None, Settle::Requeue, None),
            Attempted::Reached(sockets) => (
                Some(record(AttemptResult::Delivered {
                    sockets,
                    webpush_due_ms: self
                        .webpush
                        .fallback(item.envelope.event.as_str())
                        .map(|policy| item.envelope.at + policy.after_ms as i64),
                })),
                Settle::Delivered,
                Some(if sockets > 0 { "pushed" } else { "offline" }),
            ),
            Attempted::Failed(error) => {
                tracing::warn!(error = %error, event_id = %item.envelope.id, "delivery attempt failed");
                let (result, settle) = self.after_failure(&item, error.to_string(), route).await;
                (Some(record(result)), settle, Some("failed"))
            }
        };
        Decided {
            item,
            record,
            settle,
            outcome,
        }
    }

    /// Schedules the next attempt of a failed event through its delay queue, or gives up and
    /// dead-letters it; returns what to record and how to settle.
    async fn after_failure(
        &self,
        item: &EventInWork,
        error: String,
        route: &RetryRoute<'_>,
    ) -> (AttemptResult, Settle) {
        let envelope = &item.envelope;
        let body = encode_batch(std::slice::from_ref(envelope));
        let message_id = envelope.id.to_string();
        // The retry's own id (its outbox row's): each retry is a message apart, settled apart.
        let retry_id = Uuid::now_v7();
        let retry_message_id = retry_id.to_string();
        let Decision::Retry {
            delay_ms,
            wait_ms,
            next_attempt,
        } = self
            .retry
            .decide(envelope.event.as_str(), item.attempt, random_unit())
        else {
            return self.dead_letter(&message_id, &body, error, route).await;
        };
        let retry = RetryMessage {
            delay_ms,
            expiration_ms: wait_ms,
            attempt: next_attempt,
            partition: crate::event::partition_of(
                envelope.user_id.as_str(),
                route.names.partitions,
            ),
            message_id: &retry_message_id,
            body: &body,
        };
        let requeued = |error| {
            (
                AttemptResult::Retrying {
                    error,
                    retry_at_ms: now_unix_ms(),
                    message: None,
                },
                Settle::Requeue,
            )
        };
        match queue::publish_retry(route.channel, route.names, &retry, route.confirm_timeout).await
        {
            Ok(()) => {
                self.metrics.retry_scheduled(item.attempt);
                let retry_at_ms = now_unix_ms() + i64::try_from(wait_ms).unwrap_or(i64::MAX / 2);
                (
                    AttemptResult::Retrying {
                        error,
                        retry_at_ms,
                        message: Some(retry_id),
                    },
                    Settle::Retried,
                )
            }
            // The retry channel failed. Usually the connection is going, and the broker
            // redelivers the message with this event as the same attempt; but a channel can also
            // close alone (a channel error while a node is lost), and acking the message then
            // would leave the event with no message at all. So the message is requeued, never
            // acked: redelivered either way, the attempt made again.
            Err(RetryPublishError::Lost(lost)) => {
                tracing::warn!(error = %lost, "cannot schedule a retry: its channel failed");
                requeued(error)
            }
            // The broker may have the retry or not (a slow or partitioned node): failing the event
            // would give up on a broker hiccup, and trusting the retry could lose it. The message
            // comes back instead and this attempt is made again; a retry that did land makes a
            // duplicate, which the socket drops by seq.
            Err(RetryPublishError::Timeout) => {
                tracing::warn!("a retry was not confirmed in time; the message comes back");
                self.metrics.retry_unconfirmed();
                requeued(error)
            }
            // The broker refuses the delay queue: give up visibly rather than loop.
            Err(refused) => {
                tracing::error!(error = %refused, "cannot schedule a retry; failing the event");
                let error = format!("{error}; and {refused}");
                self.dead_letter(&message_id, &body, error, route).await
            }
        }
    }

    /// The event failed for good: a copy of it goes to the dead-letter queue.
    async fn dead_letter(
        &self,
        message_id: &str,
        body: &[u8],
        error: String,
        route: &RetryRoute<'_>,
    ) -> (AttemptResult, Settle) {
        match queue::publish_dead_letter(
            route.channel,
            route.names,
            message_id,
            body,
            route.confirm_timeout,
        )
        .await
        {
            Ok(()) => self.metrics.dead_lettered(),
            // The event is `failed` in PostgreSQL (visible and replayable) either way.
            Err(refused) => {
                tracing::error!(error = %refused, "cannot dead-letter a failed event")
            }
        }
        (AttemptResult::Failed { error }, Settle::Failed)
    }
}

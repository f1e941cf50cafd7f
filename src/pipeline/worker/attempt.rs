//! Attempting a run: the fault injector (tests), then one broadcast of the events it spared, each
//! step under the attempt timeout with a panic caught. What comes out is how each event's attempt
//! went ([`Attempted`]), paired with the event: nothing is decided or recorded here.

use super::Worker;
use super::in_work::EventInWork;
use crate::pubsub::{Message, Push};
use crate::traces::{self, Span as _};
use futures_util::FutureExt;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use std::panic::AssertUnwindSafe;

/// How one event's attempt went, before it is recorded.
#[derive(Clone, Debug)]
pub(super) enum Attempted {
    /// The broadcast reached this many subscribers (0: nobody online, kept for catch-up).
    Reached(i32),
    /// The attempt failed.
    Failed(AttemptError),
    /// Not attempted: the partition's lease was no longer trusted here. Its message goes back.
    Fenced,
}

/// Why a delivery attempt failed (recorded as the event's `last_error`).
#[derive(Clone, Debug, thiserror::Error)]
pub(super) enum AttemptError {
    /// The attempt ran past `retry.attempt_timeout_ms`.
    #[error("timed out after {} ms", .0.as_millis())]
    TimedOut(std::time::Duration),
    /// The attempt panicked; the worker caught it.
    #[error("panicked: {0}")]
    Panicked(String),
    /// The test fault injector failed it.
    #[error("{0}")]
    Injected(String),
    /// The fan-out could not carry the broadcast.
    #[error(transparent)]
    Broadcast(crate::pubsub::Error),
}

impl Worker {
    /// One attempt for every event of a run: the fault injector (tests), then one broadcast of the
    /// events it spared, under the attempt timeout, with a panic caught. An event whose partition
    /// lease is no longer trusted when the broadcast is about to go is not attempted at all.
    pub(super) async fn attempt(&self, run: Vec<EventInWork>) -> Vec<(EventInWork, Attempted)> {
        let injected: Vec<(EventInWork, Option<AttemptError>)> = if self.faults.is_empty() {
            run.into_iter().map(|item| (item, None)).collect()
        } else {
            futures_util::future::join_all(run.into_iter().map(|item| async move {
                let injected = self
                    .bounded(async {
                        self.faults
                            .inject(&item.envelope)
                            .await
                            .map_err(AttemptError::Injected)
                    })
                    .await
                    .err();
                (item, injected)
            }))
            .await
        };
        // Checked last, right before the broadcast, so a stall anywhere before it is caught. An
        // event settled here takes no part in the broadcast.
        let run: Vec<(EventInWork, Option<Attempted>)> = injected
            .into_iter()
            .map(|(item, injected)| {
                let early = match injected {
                    Some(error) => Some(Attempted::Failed(error)),
                    None if !item.lease.is_trusted() => Some(Attempted::Fenced),
                    None => None,
                };
                (item, early)
            })
            .collect();
        let fenced = run
            .iter()
            .filter(|(_, early)| matches!(early, Some(Attempted::Fenced)))
            .count();
        if fenced > 0 {
            self.metrics.fenced("attempt", fenced);
            tracing::warn!(
                events = fenced,
                "not broadcast: the partition's lease is no longer trusted here; the messages go back"
            );
        }
        let pushes: Vec<Push> = run
            .iter()
            .filter(|(_, early)| early.is_none())
            .map(|(item, _)| Push::from(&item.envelope))
            .collect();
        let broadcast = match run.first() {
            Some((first, _)) if !pushes.is_empty() => {
                let mut trace = run_trace(&run);
                let message = Message {
                    topic: first.envelope.user_id.topic(),
                    pushes,
                    trace: trace.as_ref().map(traces::traceparent_of),
                    from_commit: false,
                };
                let broadcast = self.broadcast(message).await;
                if let Some(span) = &mut trace {
                    match &broadcast {
                        Attempted::Reached(sockets) => {
                            span.set_attribute(KeyValue::new("herald.sockets", i64::from(*sockets)))
                        }
                        Attempted::Failed(error) => {
                            span.set_status(Status::error(error.to_string()))
                        }
                        Attempted::Fenced => {}
                    }
                }
                broadcast
            }
            _ => Attempted::Reached(0), // nothing left to broadcast: no event takes it
        };
        run.into_iter()
            .map(|(item, early)| (item, early.unwrap_or_else(|| broadcast.clone())))
            .collect()
    }

    /// One broadcast under the attempt timeout, a panic in it caught.
    async fn broadcast(&self, message: Message) -> Attempted {
        let reached = self
            .bounded(async {
                let reach = self
                    .pubsub
                    .broadcast(message)
                    .await
                    .map_err(AttemptError::Broadcast)?;
                Ok(i32::try_from(reach.delivered).unwrap_or(i32::MAX))
            })
            .await;
        match reached {
            Ok(sockets) => Attempted::Reached(sockets),
            Err(error) => Attempted::Failed(error),
        }
    }

    /// `work` under the attempt timeout, a panic in it caught and reported as a failure.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, AttemptError>>,
    ) -> Result<T, AttemptError> {
        match tokio::time::timeout(self.attempt_timeout, AssertUnwindSafe(work).catch_unwind())
            .await
        {
            Err(_) => Err(AttemptError::TimedOut(self.attempt_timeout)),
            Ok(Err(panic)) => Err(AttemptError::Panicked(
                panic_message(panic.as_ref()).to_owned(),
            )),
            Ok(Ok(result)) => result,
        }
    }
}

/// The run's span, when any of its events is in a sampled trace: a child of the first one's
/// request, linked to the others, naming what it delivers.
fn run_trace(run: &[(EventInWork, Option<Attempted>)]) -> Option<traces::ActiveSpan> {
    let attempted = || {
        run.iter()
            .filter(|(_, early)| early.is_none())
            .map(|(item, _)| item)
    };
    traces::continue_traces(
        "herald.deliver",
        SpanKind::Consumer,
        attempted().filter_map(|item| item.envelope.trace.as_ref()),
        || {
            let ids: Vec<StringValue> = attempted()
                .map(|item| item.envelope.id.to_string().into())
                .collect();
            let mut attributes = vec![
                KeyValue::new("herald.events", ids.len() as i64),
                KeyValue::new("herald.event_ids", Value::Array(Array::String(ids))),
            ];
            if let (Some(first), Some(last)) = (attempted().next(), attempted().next_back()) {
                attributes.extend([
                    KeyValue::new("herald.user_id", first.envelope.user_id.as_str().to_owned()),
                    KeyValue::new("herald.partition", i64::from(first.lease.token().partition)),
                    KeyValue::new("herald.seq.first", first.envelope.seq),
                    KeyValue::new("herald.seq.last", last.envelope.seq),
                ]);
            }
            attributes
        },
    )
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

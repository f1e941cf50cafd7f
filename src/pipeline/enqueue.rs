//! Enqueue: concurrent API requests are group-committed to PostgreSQL, answered, then published.
//!
//! A request's events are committed (one `UNNEST` insert per batch, per-user seqs assigned in the same
//! transaction) before its caller hears anything, so every 2xx is durable. After the commit the new
//! events are handed to the publisher without waiting; if it cannot take them (broker down, buffer
//! full) they stay `accepted` and the outbox relay publishes them later.
//!
//! Commits run one at a time on this node, so events reach the publisher in commit order, which for
//! one user is seq order.

use super::batch::{Batcher, Flush};
use super::outgoing;
use crate::metrics::Metrics;
use crate::queue::PublisherHandle;
use crate::store::{self, InsertOutcome, NewEvent, Store};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Why events were not accepted.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The enqueue buffer stayed full for the whole enqueue timeout.
    #[error("Herald is overloaded; retry later")]
    Overloaded,
    /// The node is shutting down.
    #[error("Herald is shutting down; retry later")]
    ShuttingDown,
    /// PostgreSQL is unreachable.
    #[error("the event store is unavailable; retry later")]
    StoreUnavailable,
    /// The commit failed for another reason (logged where it happened).
    #[error("storing the events failed")]
    StoreFailed,
}

/// One accepted event, as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The event id (the original one for a duplicate).
    pub id: Uuid,
    /// The user's seq.
    pub seq: i64,
    /// For a retry of an idempotency key: the original event's current status.
    pub duplicate_of_status: Option<String>,
}

/// The enqueue front: what the API calls.
#[derive(Clone)]
pub struct Enqueue {
    batcher: Batcher<Committer>,
    queue_timeout: Duration,
}

/// The group-commit writer behind [`Enqueue`].
pub struct Committer {
    store: Store,
    publisher: PublisherHandle,
    metrics: Metrics,
}

impl Enqueue {
    /// The enqueue front and its commit task (spawn it). The task ends when `close` is cancelled and
    /// every request submitted before has been committed and answered.
    pub fn new(
        store: Store,
        publisher: PublisherHandle,
        metrics: Metrics,
        settings: &crate::config::PipelineSettings,
        close: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + use<>) {
        let committer = Committer {
            store,
            publisher,
            metrics,
        };
        let (batcher, task) = Batcher::new(
            committer,
            settings.enqueue_buffer,
            settings.max_commit_batch,
            close,
        );
        let enqueue = Self {
            batcher,
            queue_timeout: Duration::from_millis(settings.enqueue_timeout_ms),
        };
        (enqueue, task)
    }

    /// Commits `events` and returns what became of each, in order.
    ///
    /// # Errors
    /// Overload, shutdown, or a failed commit: then none of the events is stored.
    pub async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>, EnqueueError> {
        let count = events.len();
        let submitted = self.batcher.submit_within(events, self.queue_timeout);
        match submitted
            .instrument(tracing::debug_span!("enqueue", events = count))
            .await
        {
            Ok(answer) => answer,
            Err(super::batch::SubmitError::Timeout) => Err(EnqueueError::Overloaded),
            Err(super::batch::SubmitError::Closed) => Err(EnqueueError::ShuttingDown),
        }
    }
}

impl Flush for Committer {
    type Item = Vec<NewEvent>;
    type Output = Result<Vec<Accepted>, EnqueueError>;

    fn weight(item: &Vec<NewEvent>) -> usize {
        item.len()
    }

    async fn flush(&self, requests: Vec<Vec<NewEvent>>) -> Vec<Self::Output> {
        {
            let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
            let events: Vec<NewEvent> = requests.into_iter().flatten().collect();
            let started = Instant::now();
            let span = tracing::info_span!("commit", events = events.len());
            let result = self.store.insert_events(&events).instrument(span).await;
            let outcomes = match result {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    let answer = failure(&error);
                    tracing::error!(error = ?error, events = events.len(), "group commit failed");
                    return sizes.iter().map(|_| Err(answer.clone())).collect();
                }
            };
            self.metrics.commit(events.len(), started.elapsed());
            let accepted: Vec<Accepted> = events
                .iter()
                .zip(&outcomes)
                .map(|(event, outcome)| accepted(event.id, outcome))
                .collect();
            self.publish_new(events, outcomes);
            split(accepted, &sizes).into_iter().map(Ok).collect()
        }
    }
}

impl Committer {
    /// Hands freshly inserted events to the publisher, in commit order, without waiting.
    fn publish_new(&self, events: Vec<NewEvent>, outcomes: Vec<InsertOutcome>) {
        let mut deferred = 0;
        for (event, outcome) in events.into_iter().zip(outcomes) {
            if let InsertOutcome::Inserted { seq } = outcome {
                let message = outgoing(&event.into_envelope(seq));
                if self.publisher.try_publish(message).is_err() {
                    deferred += 1;
                }
            }
        }
        self.metrics.publish_deferred(deferred);
    }
}

fn failure(error: &store::Error) -> EnqueueError {
    if error.is_unavailable() {
        EnqueueError::StoreUnavailable
    } else {
        EnqueueError::StoreFailed
    }
}

fn accepted(id: Uuid, outcome: &InsertOutcome) -> Accepted {
    match outcome {
        InsertOutcome::Inserted { seq } => Accepted {
            id,
            seq: *seq,
            duplicate_of_status: None,
        },
        InsertOutcome::Duplicate { id, seq, status } => Accepted {
            id: *id,
            seq: *seq,
            duplicate_of_status: Some(status.clone()),
        },
    }
}

/// Cuts the flat list back into one list per request.
fn split<T>(flat: Vec<T>, sizes: &[usize]) -> Vec<Vec<T>> {
    let mut rest = flat.into_iter();
    sizes
        .iter()
        .map(|&n| rest.by_ref().take(n).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_restores_request_boundaries() {
        assert_eq!(
            split(vec![1, 2, 3, 4], &[1, 0, 3]),
            vec![vec![1], vec![], vec![2, 3, 4]]
        );
    }
}

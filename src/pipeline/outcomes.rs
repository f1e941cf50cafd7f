//! The delivery-outcome writer: each lane run submits its attempts and waits until they are stored
//! (one batched statement, for every run that queued meanwhile, updates the events and inserts
//! their attempt rows), and only then are the messages settled, so an acked message always has its
//! attempts recorded.

use super::batch::{Batcher, Flush};
use crate::backoff::with_retries;
use crate::metrics::Metrics;
use crate::store::{AttemptRecord, Store};
use std::future::Future;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Attempts at one outcome batch before giving up (about 15 s of backoff): a longer database outage
/// leaves the deliveries unacked, and the broker redelivers them.
const TRIES: u32 = 10;

/// Writes outcomes in batches.
pub struct OutcomeWriter {
    store: Store,
    metrics: Metrics,
}

/// The outcome could not be stored.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the delivery outcome could not be stored")]
pub struct NotRecorded;

/// The handle workers use.
pub type Outcomes = Batcher<OutcomeWriter>;

/// The writer's handle and task (spawn it); the task ends when `close` is cancelled and everything
/// submitted before is written.
pub fn writer(
    store: Store,
    metrics: Metrics,
    capacity: usize,
    max_batch: usize,
    close: CancellationToken,
) -> (Outcomes, impl Future<Output = ()> + Send) {
    Batcher::new(OutcomeWriter { store, metrics }, capacity, max_batch, close)
}

impl Flush for OutcomeWriter {
    /// One lane run's attempts.
    type Item = Vec<AttemptRecord>;
    type Output = Result<(), NotRecorded>;

    fn weight(run: &Vec<AttemptRecord>) -> usize {
        run.len()
    }

    async fn flush(&self, runs: Vec<Vec<AttemptRecord>>) -> Vec<Self::Output> {
        {
            let n = runs.len();
            let outcomes: Vec<AttemptRecord> = runs.into_iter().flatten().collect();
            let started = Instant::now();
            let result = with_retries("record attempts", TRIES, || {
                self.store.record_attempts(&outcomes)
            })
            .await;
            let answer = match result {
                Ok(()) => {
                    self.metrics
                        .status_batch("outcome", outcomes.len(), started.elapsed());
                    Ok(())
                }
                Err(error) => {
                    tracing::error!(error = ?error, events = outcomes.len(), "cannot record delivery outcomes");
                    Err(NotRecorded)
                }
            };
            vec![answer; n]
        }
    }
}

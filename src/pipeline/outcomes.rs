//! The delivery-outcome writer: each lane run submits its attempts and waits until they are stored
//! (one batched statement, for every run that queued meanwhile, updates the events and inserts
//! their attempt rows), and only then are the messages settled, so an acked message always has its
//! attempts recorded. An attempt made under a partition lease this node no longer holds is refused
//! by the statement (the lease's epoch is its fencing token) and reported back, so its message is
//! returned to the partition's current owner instead of being acked.

use super::batch::{Batcher, Flush};
use crate::backoff::with_retries;
use crate::event::EventId;
use crate::metrics::Metrics;
use crate::store::{AttemptRecord, AttemptResult, Store};
use std::collections::HashSet;
use std::future::Future;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Attempts at one outcome batch before giving up (about 15 s of backoff): a longer database outage
/// leaves the deliveries unacked, and the broker redelivers them.
const TRIES: u32 = 10;

/// Writes outcomes in batches.
pub struct OutcomeWriter {
    store: Store,
    metrics: Metrics,
    /// This node's name: the owner the attempts' leases must still name.
    node: String,
}

/// The outcome could not be stored.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the delivery outcome could not be stored")]
pub struct NotRecorded;

/// What became of one run's attempts once written: the ids of those refused because their lease
/// is no longer this node's (see [`Store::record_attempts`]); every other one is stored.
pub type Recorded = Result<HashSet<EventId>, NotRecorded>;

/// The handle workers use.
pub type Outcomes = Batcher<OutcomeWriter>;

/// Forgets the outbox rows of messages a worker settled (acked): nothing they carried is in
/// flight any more. Best effort: a row left behind is deleted by the sweeper once it sees every
/// event of it final.
pub struct SettledMessages {
    store: Store,
}

/// The handle workers use to forget settled messages' rows.
pub type Settled = Batcher<SettledMessages>;

impl Flush for SettledMessages {
    /// A settled message's outbox row.
    type Item = Uuid;
    type Output = ();

    async fn flush(&self, rows: Vec<Uuid>) -> Vec<()> {
        let n = rows.len();
        if let Err(error) = with_retries("forget settled messages", 3, || {
            self.store.forget_messages(&rows)
        })
        .await
        {
            tracing::warn!(error = ?error, messages = n, "cannot forget settled messages; the sweeper will");
        }
        vec![(); n]
    }
}

/// The writers' handles and their task (spawn it); the task ends when `close` is cancelled and
/// everything submitted before is written.
pub fn writer(
    store: Store,
    metrics: Metrics,
    node: String,
    capacity: usize,
    max_batch: usize,
    close: CancellationToken,
) -> (Outcomes, Settled, impl Future<Output = ()> + Send) {
    let settled = SettledMessages {
        store: store.clone(),
    };
    let writer = OutcomeWriter {
        store,
        metrics,
        node,
    };
    let (outcomes, outcome_task) = Batcher::new(writer, capacity, max_batch, close.clone());
    let (settled, settled_task) = Batcher::new(settled, capacity, max_batch, close);
    let task = async move {
        tokio::join!(outcome_task, settled_task);
    };
    (outcomes, settled, task)
}

impl OutcomeWriter {
    /// Schedules the Web Push fallbacks of the delivered events among `outcomes` (those not
    /// `fenced`). Before the messages are settled: if it fails, the messages come back and the
    /// next attempt schedules them (once per event and subscription).
    async fn schedule_webpush(
        &self,
        outcomes: &[AttemptRecord],
        fenced: &HashSet<EventId>,
    ) -> Result<(), NotRecorded> {
        let due: Vec<(EventId, i64)> = outcomes
            .iter()
            .filter(|record| !fenced.contains(&record.id))
            .filter_map(|record| match record.result {
                AttemptResult::Delivered {
                    webpush_due_ms: Some(due),
                    ..
                } => Some((record.id, due)),
                _ => None,
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        match with_retries("schedule web pushes", TRIES, || {
            self.store.schedule_webpush(&due)
        })
        .await
        {
            Ok(scheduled) => {
                self.metrics.webpush_scheduled(scheduled);
                Ok(())
            }
            Err(error) => {
                tracing::error!(error = ?error, events = due.len(), "cannot schedule web pushes; the events' messages go back");
                Err(NotRecorded)
            }
        }
    }
}

impl Flush for OutcomeWriter {
    /// One lane run's attempts.
    type Item = Vec<AttemptRecord>;
    type Output = Recorded;

    fn weight(run: &Vec<AttemptRecord>) -> usize {
        run.len()
    }

    async fn flush(&self, runs: Vec<Vec<AttemptRecord>>) -> Vec<Self::Output> {
        let outcomes: Vec<AttemptRecord> = runs.iter().flatten().cloned().collect();
        let started = Instant::now();
        let result = with_retries("record attempts", TRIES, || {
            self.store.record_attempts(&self.node, &outcomes)
        })
        .await;
        match result {
            Ok(fenced) => {
                self.metrics
                    .status_batch("outcome", outcomes.len(), started.elapsed());
                if !fenced.is_empty() {
                    self.metrics.fenced("outcome", fenced.len());
                    tracing::warn!(
                        events = fenced.len(),
                        "outcomes refused: their partition's lease moved on; their messages go back"
                    );
                }
                let fenced: HashSet<EventId> = fenced.into_iter().collect();
                if let Err(NotRecorded) = self.schedule_webpush(&outcomes, &fenced).await {
                    return vec![Err(NotRecorded); runs.len()];
                }
                runs.iter()
                    .map(|run| {
                        Ok(run
                            .iter()
                            .map(|record| record.id)
                            .filter(|id| fenced.contains(id))
                            .collect())
                    })
                    .collect()
            }
            Err(error) => {
                tracing::error!(error = ?error, events = outcomes.len(), "cannot record delivery outcomes");
                vec![Err(NotRecorded); runs.len()]
            }
        }
    }
}

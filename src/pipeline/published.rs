//! Records what the broker confirmed: `accepted` -> `published`, in batched UPDATEs, and counts what
//! it did not confirm (those rows stay `accepted`, and the outbox relay republishes them).

use super::batch::{Batcher, Flush};
use super::retry;
use crate::metrics::Metrics;
use crate::queue::PublisherEvent;
use crate::store::Store;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct PublishedMarks {
    store: Store,
    metrics: Metrics,
}

impl Flush for PublishedMarks {
    type Item = Vec<Uuid>;
    type Output = ();

    fn weight(ids: &Vec<Uuid>) -> usize {
        ids.len()
    }

    async fn flush(&self, batches: Vec<Vec<Uuid>>) -> Vec<()> {
        {
            let n = batches.len();
            let ids: Vec<Uuid> = batches.into_iter().flatten().collect();
            let started = Instant::now();
            match retry("mark published", 5, || self.store.mark_published(&ids)).await {
                Ok(_) => self
                    .metrics
                    .status_batch("published", ids.len(), started.elapsed()),
                // Harmless: the rows stay 'accepted' and are republished; the socket drops the copy.
                Err(error) => {
                    tracing::error!(error = ?error, events = ids.len(), "cannot mark events published")
                }
            }
            vec![(); n]
        }
    }
}

/// Consumes the publisher's reports until it stops, recording confirms and counting the rest.
pub async fn record(
    mut reports: mpsc::Receiver<PublisherEvent>,
    store: Store,
    metrics: Metrics,
    max_batch: usize,
) {
    let close = CancellationToken::new();
    let marks = PublishedMarks {
        store,
        metrics: metrics.clone(),
    };
    let (batcher, writer) = Batcher::new(marks, 1024, max_batch, close.clone());
    let writer = tokio::spawn(writer);
    while let Some(report) = reports.recv().await {
        match report {
            PublisherEvent::Confirmed(ids) => {
                metrics.publish_confirmed(ids.len());
                let _ = batcher.send(ids).await;
            }
            PublisherEvent::Unconfirmed { count, reason } => {
                metrics.publish_unconfirmed(count, reason)
            }
            PublisherEvent::Disconnected => metrics.queue_connection_lost("publisher"),
        }
    }
    // The publisher is gone: write the last marks, then stop.
    close.cancel();
    let _ = writer.await;
}

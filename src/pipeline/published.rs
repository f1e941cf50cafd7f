//! Records what the broker confirmed: each confirmed message's outbox row is marked confirmed, in
//! batched UPDATEs, so the relay leaves it alone (the worker that settles the message deletes it).
//! What the broker did not confirm is only counted: those rows stay unconfirmed, and the outbox
//! relay republishes them.
//!
//! The events table is not touched: a confirm costs one small-table row, never a lock on the rows
//! the outcome writer is updating (an earlier design's per-event `published` UPDATE contended with
//! it and, under a burst, ran into the statement timeout while the relay republished everything).

use super::batch::{Batcher, Flush};
use crate::backoff::with_retries;
use crate::metrics::Metrics;
use crate::queue::PublisherEvent;
use crate::store::Store;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct ConfirmedRows {
    store: Store,
    metrics: Metrics,
}

impl Flush for ConfirmedRows {
    type Item = Vec<Uuid>;
    type Output = ();

    fn weight(ids: &Vec<Uuid>) -> usize {
        ids.len()
    }

    async fn flush(&self, batches: Vec<Vec<Uuid>>) -> Vec<()> {
        let n = batches.len();
        let ids: Vec<Uuid> = batches.into_iter().flatten().collect();
        let started = Instant::now();
        match with_retries("mark confirmed outbox rows", 5, || {
            self.store.confirm_messages(&ids)
        })
        .await
        {
            Ok(_) => self
                .metrics
                .status_batch("confirmed", ids.len(), started.elapsed()),
            // Harmless: the rows stay and are republished; the socket drops the copies by seq.
            Err(error) => {
                tracing::error!(error = ?error, messages = ids.len(), "cannot record confirmed messages")
            }
        }
        vec![(); n]
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
    let rows = ConfirmedRows {
        store,
        metrics: metrics.clone(),
    };
    let (batcher, writer) = Batcher::new(rows, 1024, max_batch, close.clone());
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
    // The publisher is gone: write the last confirms, then stop.
    close.cancel();
    let _ = writer.await;
}

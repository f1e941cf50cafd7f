//! The outbox relay: republishes messages the broker never confirmed (the node crashed between
//! commit and publish, the broker was down, the publish buffer was full, a confirm never came).
//!
//! It reads the outbox, not the events: a row exists exactly while its message is unconfirmed, and
//! the publisher never sends a message after its publish window (grace less confirm timeout),
//! counted from before the row was written or last claimed ([`super::publish_deadline`]), so a row
//! older than the grace is one no publisher will still confirm. The relay therefore never
//! republishes a message that is merely slow or waiting behind a backlog. Rows are claimed with
//! `FOR UPDATE SKIP LOCKED` and stamped, so relays on several nodes share the work instead of
//! repeating it. Only events still `accepted` are sent again; a republish may still duplicate a
//! publish that did land without its confirm, and the socket drops the copy by seq.

use crate::config::Settings;
use crate::event::{Envelope, partition_of};
use crate::metrics::Metrics;
use crate::queue::{PublisherHandle, Source};
use crate::store::Store;
use tokio_util::sync::CancellationToken;

/// Runs until `stop` is cancelled.
pub async fn run(
    store: Store,
    publisher: PublisherHandle,
    metrics: Metrics,
    settings: Settings,
    stop: CancellationToken,
) {
    let pipeline = &settings.pipeline;
    let interval = pipeline.relay_interval();
    let window = super::publish_window(&settings);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
        if let Ok((messages, _)) = store.outbox_depth().await {
            metrics.outbox_depth(messages);
        }
        // Claiming while the broker is down would only push the rows' next chance back.
        if !publisher.is_connected() {
            continue;
        }
        // Drain a backlog batch after batch; stop at a short batch or when the publisher refuses.
        loop {
            // Before the claim stamps the rows: the next claim may come one grace after the stamp,
            // so the batch's publishes must end by then, however long earlier rows' publishes take.
            let publish_by = super::publish_deadline(window);
            let claimed = match store
                .claim_unconfirmed(pipeline.relay_grace_ms, pipeline.relay_batch)
                .await
            {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(error = ?error, "relay cannot read the outbox");
                    break;
                }
            };
            let full = claimed.len() as i64 >= pipeline.relay_batch;
            let (mut messages, mut events, mut settled) = (0, 0, Vec::new());
            for row in claimed {
                let envelopes: Vec<Envelope> = row
                    .events
                    .into_iter()
                    .filter_map(|e| e.into_envelope())
                    .collect();
                let Some(first) = envelopes.first() else {
                    // Everything it carried was delivered meanwhile: nothing to send.
                    settled.push(row.id);
                    continue;
                };
                let partition = partition_of(first.user_id.as_str(), settings.queue.partitions);
                let message = super::message(row.id, partition, &envelopes, publish_by);
                // Waiting for room past the deadline is pointless: the publisher would drop the
                // message as stale. The rest of the batch waits for the next claim.
                let wait = publish_by.saturating_duration_since(tokio::time::Instant::now());
                if publisher.publish_within(message, wait).await.is_err() {
                    break;
                }
                messages += 1;
                events += envelopes.len();
            }
            if !settled.is_empty()
                && let Err(error) = store.confirm_messages(&settled).await
            {
                tracing::warn!(error = ?error, "relay cannot clear delivered outbox rows");
            }
            if messages > 0 {
                tracing::info!(messages, events, "relay republished unconfirmed messages");
            }
            metrics.messages_published(Source::Relay.label(), messages, events);
            metrics.relay_republished(events);
            if !full || stop.is_cancelled() || !publisher.is_connected() {
                break;
            }
        }
    }
}

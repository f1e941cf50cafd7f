//! The outbox relay: publishes events that are still `accepted` after a grace period (the node crashed
//! between commit and publish, the broker was down, the publish buffer was full, a confirm never came).
//!
//! Rows are claimed with `FOR UPDATE SKIP LOCKED` and stamped, so relays on several nodes share the
//! work instead of repeating it. A republish may duplicate a publish that did land; the socket drops
//! the copy by seq.

use super::outgoing;
use crate::config::PipelineSettings;
use crate::metrics::Metrics;
use crate::queue::PublisherHandle;
use crate::store::Store;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs until `stop` is cancelled.
pub async fn run(
    store: Store,
    publisher: PublisherHandle,
    metrics: Metrics,
    settings: PipelineSettings,
    stop: CancellationToken,
) {
    let interval = Duration::from_millis(settings.relay_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
        // Claiming while the broker is down would only push the rows' next chance back.
        if !publisher.is_connected() {
            continue;
        }
        // Drain a backlog batch after batch; stop at a short batch or when the publisher refuses.
        loop {
            let claimed = match store
                .claim_unpublished(settings.relay_grace_ms, settings.relay_batch)
                .await
            {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(error = ?error, "relay cannot read unpublished events");
                    break;
                }
            };
            let full = claimed.len() as i64 >= settings.relay_batch;
            let mut republished = 0;
            for row in claimed {
                let Some(envelope) = row.into_envelope() else {
                    continue;
                };
                if publisher.publish(outgoing(&envelope)).await.is_err() {
                    break;
                }
                republished += 1;
            }
            if republished > 0 {
                tracing::info!(events = republished, "relay republished events");
            }
            metrics.relay_republished(republished);
            if !full || stop.is_cancelled() || !publisher.is_connected() {
                break;
            }
        }
    }
}

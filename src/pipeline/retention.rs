//! Retention: prunes delivered events past `store.retention_days` or beyond the newest
//! `store.retention_per_user` of their user, in bounded batches, so the table (and catch-up) stay
//! bounded. A client asking to catch up from further back is told at join (`missed: true`). The
//! idempotency keys of pruned events are kept `store.idempotency_ttl_secs` from their first use,
//! then expire here too.

use crate::config::StoreSettings;
use crate::metrics::Metrics;
use crate::store::Store;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement, so pruning never holds long locks.
const BATCH: i64 = 10_000;

/// Prunes every `retention_interval_secs` until `stop`.
pub async fn run(store: Store, metrics: Metrics, settings: StoreSettings, stop: CancellationToken) {
    if settings.retention_days == 0 && settings.retention_per_user == 0 {
        return;
    }
    let every = Duration::from_secs(settings.retention_interval_secs.max(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        loop {
            let pruned = store
                .prune_events(settings.retention_days, settings.retention_per_user, BATCH)
                .await;
            match pruned {
                Ok(n) => {
                    metrics.events_pruned(n);
                    if n < BATCH as u64 || stop.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = ?error, "retention pruning failed; retrying later");
                    break;
                }
            }
        }
        loop {
            let expired = store
                .expire_idempotency_keys(settings.idempotency_ttl_secs, BATCH)
                .await;
            match expired {
                Ok(n) => {
                    metrics.idempotency_keys_expired(n);
                    if n < BATCH as u64 || stop.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = ?error, "expiring idempotency keys failed; retrying later");
                    break;
                }
            }
        }
    }
}

//! Retention: prunes delivered events past `store.retention_days` or beyond the newest
//! `store.retention_per_user` of their user, in bounded batches, so the table (and catch-up) stay
//! bounded. A client asking to catch up from further back is told at join (`missed: true`). The
//! idempotency keys of pruned events are kept `store.idempotency_ttl_secs` from their first use,
//! then expire here too.

use crate::config::StoreSettings;
use crate::metrics::Metrics;
use crate::store::Store;
use std::time::{Duration, Instant};
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
        let started = Instant::now();
        if settings.retention_days > 0 {
            // Else the age prune reads every page written since the last vacuum, old or not.
            match store.summarize_new_event_ranges().await {
                Ok(_) => {}
                Err(error) if error.is_lock_conflict() => {
                    tracing::debug!("events is being vacuumed: its new block ranges wait");
                }
                Err(error) => tracing::warn!(
                    error = ?error,
                    "could not summarize the new block ranges of events; pruning by age reads them all"
                ),
            }
        }
        let prune =
            || store.prune_events(settings.retention_days, settings.retention_per_user, BATCH);
        let pruned = in_batches(prune, &stop, "retention pruning").await;
        metrics.events_pruned(pruned);
        let expire = || store.expire_idempotency_keys(settings.idempotency_ttl_secs, BATCH);
        let expired = in_batches(expire, &stop, "expiring idempotency keys").await;
        metrics.idempotency_keys_expired(expired);
        metrics.retention_round(started.elapsed());
    }
}

/// Runs a batched delete until a batch comes back short (nothing more to do now), `stop`, or an
/// error (logged: the next round tries again); returns the rows deleted.
async fn in_batches<F, Fut>(mut batch: F, stop: &CancellationToken, what: &str) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, crate::store::Error>>,
{
    let mut total = 0;
    loop {
        match batch().await {
            Ok(n) => {
                total += n;
                if n < BATCH as u64 || stop.is_cancelled() {
                    return total;
                }
            }
            Err(error) => {
                tracing::warn!(error = ?error, "{what} failed; retrying later");
                return total;
            }
        }
    }
}

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

/// How long one rule's batches go on in a round before the round ends (and the next starts at
/// once), so that a round's time and count are reported while a backlog is worked off.
const RULE_BUDGET: Duration = Duration::from_secs(10);

/// Prunes every `retention_interval_secs` until `stop`.
pub async fn run(store: Store, metrics: Metrics, settings: StoreSettings, stop: CancellationToken) {
    if settings.retention_days == 0 && settings.retention_per_user == 0 {
        return;
    }
    let every = Duration::from_secs(settings.retention_interval_secs.max(1));
    let mut more_left = false;
    loop {
        // A round that ended on its budget goes on at once: a backlog is worked off in rounds of
        // bounded length, each timed and counted as it ends.
        if !more_left {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
        }
        if stop.is_cancelled() {
            return;
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
        // Each rule in batches of its own: when the per-user cap has more to delete than one
        // batch (a deployment past its cap takes in events faster than a batch a round), its
        // batches go on alone, not each behind another age prune that finds nothing (the soak:
        // 2 s an age prune, rounds that never ended, and the pruned count never reported).
        let pruned = |n| metrics.events_pruned(n);
        more_left = false;
        if settings.retention_days > 0 {
            let by_age = || store.prune_events(settings.retention_days, 0, BATCH);
            more_left |= in_batches(by_age, &stop, "retention pruning by age", pruned).await;
        }
        if settings.retention_per_user > 0 {
            let by_count = || store.prune_events(0, settings.retention_per_user, BATCH);
            more_left |= in_batches(by_count, &stop, "retention pruning by count", pruned).await;
        }
        let expire = || store.expire_idempotency_keys(settings.idempotency_ttl_secs, BATCH);
        let expired = |n| metrics.idempotency_keys_expired(n);
        more_left |= in_batches(expire, &stop, "expiring idempotency keys", expired).await;
        metrics.retention_round(started.elapsed());
    }
}

/// Runs a batched delete until a batch comes back short (nothing more to do now), `stop`, an
/// error (logged: the next round tries again) or [`RULE_BUDGET`] (answering true: more is left),
/// telling `deleted` the rows of each batch as it ends.
async fn in_batches<F, Fut>(
    mut batch: F,
    stop: &CancellationToken,
    what: &str,
    deleted: impl Fn(u64),
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, crate::store::Error>>,
{
    let started = Instant::now();
    loop {
        match batch().await {
            Ok(n) => {
                deleted(n);
                if n < BATCH as u64 || stop.is_cancelled() {
                    return false;
                }
                if started.elapsed() >= RULE_BUDGET {
                    return true;
                }
            }
            Err(error) => {
                tracing::warn!(error = ?error, "{what} failed; retrying later");
                return false;
            }
        }
    }
}

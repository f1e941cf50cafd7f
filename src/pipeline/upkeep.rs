//! Herald's tables on a PostgreSQL whose autovacuum is off: every `store.upkeep_interval_secs` an
//! api node (one at a time, by an advisory lock) vacuums the tables that churn and analyzes the
//! large ones, and every tenth round vacuums those too (never the first: a node that starts does
//! not vacuum a large table on its way up). With autovacuum on it does nothing: it
//! checks the setting at each round, so turning autovacuum on or off needs no restart.

use crate::store::{Store, Upkeep};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A full round (the large tables vacuumed too) every this many rounds.
const FULL_EVERY: u64 = 10;

/// Runs until `stop`; the first round at once, so a node started on stale statistics fixes them.
pub async fn run(store: Store, every: Duration, stop: CancellationToken) {
    if every.is_zero() {
        return;
    }
    let mut rounds = 0u64;
    loop {
        if let Ok(Upkeep::Herald) = store.upkeep_mode().await {
            let full = rounds % FULL_EVERY == FULL_EVERY - 1;
            rounds += 1;
            let started = Instant::now();
            match store.upkeep(full).await {
                Ok(true) => tracing::debug!(
                    full,
                    took_ms = started.elapsed().as_millis() as u64,
                    "upkeep of Herald's tables done"
                ),
                Ok(false) => tracing::debug!("upkeep skipped: another node is doing it"),
                Err(error) => {
                    tracing::warn!(error = ?error, "upkeep of Herald's tables failed; the next round tries again")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

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

/// Who keeps a deployment's tables, from the server's setting and `store.upkeep_interval_secs`,
/// and what the operator is told about it: one wording for a node's start and `herald check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeper {
    /// PostgreSQL's autovacuum.
    Autovacuum,
    /// Herald's api nodes, every this many seconds (autovacuum is off).
    Herald(u64),
    /// Nobody: autovacuum is off and so is Herald's upkeep.
    Nobody,
}

impl Keeper {
    /// The keeper of a database in `mode` for a node with `interval_secs` of upkeep.
    pub fn of(mode: Upkeep, interval_secs: u64) -> Self {
        match (mode, interval_secs) {
            (Upkeep::Autovacuum, _) => Self::Autovacuum,
            (Upkeep::Herald, 0) => Self::Nobody,
            (Upkeep::Herald, secs) => Self::Herald(secs),
        }
    }

    /// As `/readyz` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Autovacuum => "autovacuum",
            Self::Herald(_) => "herald",
            Self::Nobody => "nobody",
        }
    }

    /// What the operator should act on, if anything.
    pub fn warning(self) -> Option<String> {
        match self {
            Self::Autovacuum => None,
            Self::Herald(secs) => Some(format!(
                "PostgreSQL's autovacuum is off on this database: Herald's api nodes vacuum and \
                 analyze its tables themselves every {secs} s (store.upkeep_interval_secs); in \
                 production, turn autovacuum on (README, \"PostgreSQL settings\")"
            )),
            Self::Nobody => Some(
                "PostgreSQL's autovacuum is off and store.upkeep_interval_secs is 0: nothing \
                 analyzes or vacuums Herald's tables, so plans and the outbox degrade; turn \
                 autovacuum on or set HERALD_STORE__UPKEEP_INTERVAL_SECS"
                    .to_owned(),
            ),
        }
    }
}

//! PostgreSQL's section (`[store]`): where it is, the three pools' sizes, and how long delivered
//! events and idempotency keys are kept.

use super::Error;
use super::Secret;
use super::validate::at_least_one;
use serde::{Deserialize, Serialize};

/// PostgreSQL.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Connection URL; the database is created by `herald migrate` when missing.
    pub database_url: Secret,
    /// Size of the pool of background work: outbox relay, retention, partition leases, replay.
    pub max_connections: u32,
    /// Size of the writers' pool: the group commit streams, the confirm recorder and the outcome
    /// writer, each one statement at a time, so `pipeline.commit_streams` + 2 is one each and none
    /// waits for another's connection.
    pub write_connections: u32,
    /// Size of the pool of client reads: socket catch-up, gap fills and acks, API-key lookups,
    /// admin queries and /readyz. When clients exhaust it, they wait; ingest does not.
    pub read_connections: u32,
    /// How long to wait for a pooled connection (and for the first connect).
    pub acquire_timeout_ms: u64,
    /// Delivered events older than this are pruned (catch-up cannot reach further back); 0 keeps
    /// them forever. Failed and undelivered events are never pruned.
    pub retention_days: u64,
    /// At most this many delivered events are kept per user (the newest); 0 for no limit.
    pub retention_per_user: i64,
    /// How often the api role prunes.
    pub retention_interval_secs: u64,
    /// How long an idempotency key keeps answering retries after its event was pruned (counted from
    /// the key's first use): a retry then gets 200 with `"status": "pruned"`, never a new event.
    /// A key whose event is still stored is kept with it, whatever its age.
    pub idempotency_ttl_secs: u64,
    /// When PostgreSQL's autovacuum is off (or `track_counts`), how often an api node vacuums and
    /// analyzes Herald's tables itself (one node of the deployment at a time); 0: never, for a
    /// deployment whose operator runs it. With autovacuum on, Herald leaves it to PostgreSQL.
    pub upkeep_interval_secs: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/herald"),
            max_connections: 8,
            write_connections: 3,
            read_connections: 8,
            acquire_timeout_ms: 5_000,
            retention_days: 30,
            retention_per_user: 10_000,
            retention_interval_secs: 300,
            idempotency_ttl_secs: 24 * 3600,
            upkeep_interval_secs: 60,
        }
    }
}

durations! {
    StoreSettings {
        acquire_timeout_ms => acquire_timeout,
    }
}

impl StoreSettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        at_least_one(&[
            ("store.max_connections", self.max_connections as usize),
            ("store.write_connections", self.write_connections as usize),
            ("store.read_connections", self.read_connections as usize),
        ])
    }
}

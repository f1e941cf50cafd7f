//! Herald's own tables' upkeep where PostgreSQL's autovacuum does not do it: statistics for the
//! planner (without them the outcome writer's update by id was measured running as a sequential
//! scan of `events` per batch, issue 23) and the dead rows of the tables rewritten per event or
//! per message (the outbox takes three writes per message).

use super::{Error, Store};
use sqlx::{Executor, PgConnection};

/// Tables written at the rate of events or messages: vacuumed (and analyzed) at each upkeep.
const CHURNING: &[&str] = &[
    "outbox",
    "user_seqs",
    "partition_leases",
    "worker_nodes",
    "read_watermarks",
    "retention_watermarks",
    "idempotency_keys",
    "webpush_outbox",
    "webpush_receipts",
];

/// Large tables: analyzed at each upkeep (a sample: cheap whatever their size), vacuumed at a full
/// one or once their dead rows pass [`LARGE_DEAD_ROWS`].
const LARGE: &[&str] = &["events", "delivery_attempts"];

/// When a large table's dead rows call for a vacuum at any upkeep: past 10,000 and 5% of its live
/// rows, the rule the migrations give autovacuum for `events`. Retention deletes at the intake
/// rate, and a deleted row's space is used again only once vacuumed: vacuumed every tenth round
/// (10 minutes by default), `events` held ten minutes of deleted rows on top of what it keeps and
/// grew by that before it levelled (the soak at 10 M rows: 5.9 GB to 9 GB at 6,200 events/s).
const LARGE_DEAD_ROWS: &str = "SELECT relname::text FROM pg_stat_user_tables
     WHERE schemaname = current_schema() AND relname = ANY($1)
       AND n_dead_tup > 10000 + 0.05 * n_live_tup";

/// The advisory lock that lets one node of a deployment do the upkeep at a time (any constant
/// Herald uses nowhere else).
const UPKEEP_LOCK: i64 = 0x4845_5241_4c44_0001;

/// Whether PostgreSQL's autovacuum looks after this database: `autovacuum` and `track_counts`
/// (which it needs) both on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upkeep {
    /// PostgreSQL's autovacuum does it.
    Autovacuum,
    /// Autovacuum is off: Herald does it itself (`store.upkeep_interval_secs`).
    Herald,
}

impl Store {
    /// Who keeps this database's statistics and dead rows in check.
    ///
    /// # Errors
    /// The query failed.
    pub async fn upkeep_mode(&self) -> Result<Upkeep, Error> {
        let on: bool = sqlx::query_scalar(
            "SELECT current_setting('autovacuum') = 'on' AND current_setting('track_counts') = 'on'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Error::query("read the autovacuum setting"))?;
        Ok(if on {
            Upkeep::Autovacuum
        } else {
            Upkeep::Herald
        })
    }

    /// Statistics for every table: after migrations, so a new or changed table is never planned
    /// without them.
    ///
    /// # Errors
    /// The statement failed.
    pub async fn analyze(&self) -> Result<(), Error> {
        (&self.pool)
            .execute("ANALYZE")
            .await
            .map_err(Error::query("analyze"))?;
        Ok(())
    }

    /// Vacuums and analyzes the churning tables and analyzes the large ones (vacuuming those too
    /// when `full` or their dead rows call for it), unless another node is doing it now. Returns
    /// whether this call did it.
    ///
    /// # Errors
    /// A statement failed (what came before it is done).
    pub async fn upkeep(&self, full: bool) -> Result<bool, Error> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(Error::query("acquire a connection for upkeep"))?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(UPKEEP_LOCK)
            .fetch_one(&mut *connection)
            .await
            .map_err(Error::query("take the upkeep lock"))?;
        if !locked {
            return Ok(false);
        }
        let dead: Vec<String> = sqlx::query_scalar(LARGE_DEAD_ROWS)
            .bind(LARGE)
            .fetch_all(&mut *connection)
            .await
            .map_err(Error::query("read the large tables' dead rows"))?;
        let mut statements = vec!["SET statement_timeout = '10min'".to_owned()];
        for table in CHURNING {
            statements.push(format!("VACUUM (ANALYZE) {table}"));
        }
        for table in LARGE {
            let vacuum = full || dead.iter().any(|name| name == table);
            let statement = if vacuum {
                "VACUUM (ANALYZE)"
            } else {
                "ANALYZE"
            };
            statements.push(format!("{statement} {table}"));
        }
        let done = run_each(&mut connection, &statements).await;
        let _ = connection.execute("RESET statement_timeout").await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(UPKEEP_LOCK)
            .execute(&mut *connection)
            .await;
        done.map(|()| true)
    }
}

/// What PostgreSQL's checkpoints have been since its statistics were reset, and the settings that
/// decide them: retention's deletes land on pages all over `events`, and the first change to a page
/// after a checkpoint writes the whole page to the WAL, so checkpoints forced by WAL volume (rather
/// than timed) multiply pruning's WAL (README, "PostgreSQL settings").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoints {
    /// Checkpoints started by `checkpoint_timeout`.
    pub timed: i64,
    /// Checkpoints requested: by WAL volume (`max_wal_size`), or by a command (`CHECKPOINT`,
    /// `CREATE DATABASE`, a base backup).
    pub requested: i64,
    /// Since when they are counted (UTC, to the minute), if PostgreSQL says.
    pub since: Option<String>,
    /// `max_wal_size` as PostgreSQL shows it (`1GB`).
    pub max_wal_size: String,
    /// `wal_compression` as PostgreSQL shows it (`off`, `lz4`...).
    pub wal_compression: String,
}

/// PostgreSQL 17 moved the checkpoint counters to `pg_stat_checkpointer`.
const CHECKPOINTS_SINCE_17: &str = "SELECT num_timed, num_requested, \
     to_char(stats_reset AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM pg_stat_checkpointer";
const CHECKPOINTS_BEFORE_17: &str = "SELECT checkpoints_timed, checkpoints_req, \
     to_char(stats_reset AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM pg_stat_bgwriter";

impl Store {
    /// The server's checkpoints so far and its WAL settings.
    ///
    /// # Errors
    /// A query failed.
    pub async fn checkpoints(&self) -> Result<Checkpoints, Error> {
        let (newer, max_wal_size, wal_compression): (bool, String, String) = sqlx::query_as(
            "SELECT to_regclass('pg_catalog.pg_stat_checkpointer') IS NOT NULL, \
                    current_setting('max_wal_size'), current_setting('wal_compression')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Error::query("read the WAL settings"))?;
        let counters = if newer {
            CHECKPOINTS_SINCE_17
        } else {
            CHECKPOINTS_BEFORE_17
        };
        let (timed, requested, since): (i64, i64, Option<String>) = sqlx::query_as(counters)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("read the checkpoint counters"))?;
        Ok(Checkpoints {
            timed,
            requested,
            since,
            max_wal_size,
            wal_compression,
        })
    }
}

impl Checkpoints {
    /// Below this many checkpoints, the split says nothing yet.
    const TELLING: i64 = 10;

    /// Whether checkpoints mostly come by request (WAL volume, mostly, on a database server that
    /// does not create databases all day) rather than on time.
    pub fn mostly_requested(&self) -> bool {
        self.timed + self.requested >= Self::TELLING && self.requested > self.timed
    }
}

/// Runs `statements` one by one on the simple protocol (no arguments: VACUUM runs in no
/// transaction block and cannot be prepared); stops at the first failure.
async fn run_each(connection: &mut PgConnection, statements: &[String]) -> Result<(), Error> {
    for statement in statements {
        connection
            .execute(statement.as_str())
            .await
            .map_err(|source| Error::Query {
                what: "upkeep",
                source,
            })?;
    }
    Ok(())
}

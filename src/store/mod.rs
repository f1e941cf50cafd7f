//! PostgreSQL: the source of truth. Owns the schema (`migrations/`), the events repository and the
//! producers (API keys).
//!
//! Every write on a hot path is batched: events are inserted many rows per statement with `UNNEST`,
//! and status changes are one `UPDATE ... FROM UNNEST` per batch. Depends on no other Herald module
//! but the shared `event` types.

/// Formats a timestamptz column as RFC 3339 in UTC with milliseconds.
macro_rules! rfc3339 {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

/// The columns of a `StoredEvent`, over `events` (unaliased: `acked` looks up the row's user's read
/// mark, a primary-key read of `read_watermarks`). A macro, so that statements built with
/// `concat!` can be `const`s.
macro_rules! stored_event_columns {
    () => {
        "id, user_id, seq, event, data::text AS data, traceparent, \
         (extract(epoch FROM enqueued_at) * 1000)::int8 AS at, \
         acked_at IS NOT NULL OR seq <= coalesce((SELECT r.read_through FROM read_watermarks r \
                                                  WHERE r.user_id = events.user_id), 0) AS acked"
    };
}

mod commit;
mod delivery;
mod events;
mod filter;
mod outbox;
mod partitions;
mod producers;
mod replay_jobs;
mod schema;
mod status;
mod sweep;
mod upkeep;
mod webpush;

pub use commit::{COMMIT_EVENTS_SQL, Committed, IDEMPOTENT_ORIGINALS_SQL, InsertOutcome, NewEvent};
pub use delivery::{
    AttemptRecord, AttemptResult, AttemptRow, EventRecord, RECORD_ATTEMPTS_SQL, ReplayCursor,
    ReplayPage,
};
pub use events::{
    ACK_EVENTS_SQL, EXPIRE_IDEMPOTENCY_KEYS_SQL, PRUNE_EVENTS_PAST_COUNT_SQL,
    PRUNE_OLD_EVENTS_PLANNING_SQL, PRUNE_OLD_EVENTS_SQL, READ_MARK_SQL, ReadMark, SeqBounds,
    SeqOrder, StoredEvent, UNREAD_CAP, UNREAD_SQL, USER_EVENTS_ASCENDING_SQL,
    USER_EVENTS_DESCENDING_SQL, USER_SEQ_BOUNDS_SQL, Unread,
};
pub use filter::{EventFilter, FilterText};
pub use outbox::{
    CLAIM_UNCONFIRMED_SQL, CONFIRM_MESSAGES_SQL, ClaimedMessage, FORGET_MESSAGES_SQL,
    INSERT_OUTBOX_ROWS_SQL, MessageLimits, OUTBOX_DEPTH_SQL, OutboxMessage, UNCONFIRMED_EVENTS_SQL,
    outbox_columns, plan_messages,
};
pub use partitions::{Layout, LeaseToken, PartitionLease};
pub use producers::{ApiKey, Producer};
pub use replay_jobs::ReplayJobRecord;
pub use schema::{MigrationState, PRE_PARTITION_QUEUES_REMOVED};
pub use status::{EventStatus, ReplayJobStatus};
pub use sweep::{
    KEEP_IN_FLIGHT_SQL, PLACE_MESSAGES_SQL, STALE_MESSAGES_SQL, SWEEP_STALE_EVENTS_SQL,
    TAKE_STALE_MESSAGES_SQL, UNPLACED_MESSAGES_SQL,
};
pub use upkeep::{Checkpoints, Upkeep};
pub use webpush::{DuePush, PushAttempt, PushOutcome, Subscription};

use crate::config::StoreSettings;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::str::FromStr;

/// A failure of the store, named for what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database URL is not a valid PostgreSQL URL.
    #[error("invalid database URL")]
    Url(#[source] sqlx::Error),
    /// Could not connect or create the database.
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] sqlx::Error),
    /// Applying migrations failed.
    #[error("cannot apply migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("{what} failed")]
    Query {
        /// What was being done.
        what: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// A unique name is taken (producer names).
    #[error("{0} already exists")]
    Conflict(String),
    /// A value the caller gave is invalid (e.g. a filter's time that is not one), named.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Query { what, source }
    }

    /// True when the database could not be reached (as opposed to a bad query): worth a retry, and a
    /// 503 rather than a 500. That includes PostgreSQL ending the session itself: a restart, a
    /// failover's shutdown or an administrator's `pg_terminate_backend` (SQLSTATE class 57P, and
    /// class 08, the connection exceptions), which fail the statement in flight with a database
    /// error rather than a broken socket.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Query { source, .. } => {
                matches!(
                    source,
                    sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Io(_)
                        | sqlx::Error::WorkerCrashed
                ) || self
                    .sqlstate()
                    .is_some_and(|code| code.starts_with("57P") || code.starts_with("08"))
            }
            _ => false,
        }
    }

    /// PostgreSQL refused a value of the statement (SQLSTATE class 22, data exception: a NUL in
    /// text, an invalid jsonb, a number out of range; or class 54, a program limit exceeded). The
    /// same statement would fail again, and one row's value fails all of its rows.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("54"))
    }

    /// Another transaction held a row the statement had to lock for longer than its lock timeout
    /// (SQLSTATE 55P03), or the two deadlocked (40P01): nothing was done, and the same statement
    /// may well succeed when tried again.
    pub fn is_lock_conflict(&self) -> bool {
        self.sqlstate()
            .is_some_and(|code| code == "55P03" || code == "40P01")
    }

    /// The statement lost a race or ran out of time and did nothing: a lock conflict (see
    /// [`Self::is_lock_conflict`]), a serialization failure (40001), or the statement cancelled by
    /// its `statement_timeout` or an administrator's `pg_cancel_backend` (57014). Unlike
    /// [`Self::is_unavailable`], PostgreSQL is up; like it, the same request may well succeed when
    /// tried again, so a client is told to retry (a 503), never that Herald broke (a 500).
    pub fn is_transient(&self) -> bool {
        self.is_lock_conflict()
            || self
                .sqlstate()
                .is_some_and(|code| code == "40001" || code == "57014")
    }

    /// The SQLSTATE of an error PostgreSQL returned.
    fn sqlstate(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Self::Query {
                source: sqlx::Error::Database(db),
                ..
            } => db.code(),
            _ => None,
        }
    }

    /// PostgreSQL's own message for a database error (what it refused, never a connection detail).
    pub fn database_message(&self) -> Option<&str> {
        match self {
            Self::Query {
                source: sqlx::Error::Database(db),
                ..
            } => Some(db.message()),
            _ => None,
        }
    }
}

/// A cheap handle to the PostgreSQL pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects a pool; fails when PostgreSQL cannot be reached within the acquire timeout.
    ///
    /// # Errors
    /// A bad URL or an unreachable database.
    pub async fn connect(settings: &StoreSettings) -> Result<Self, Error> {
        Self::connect_sized(settings, settings.max_connections).await
    }

    /// Like [`Self::connect`], for a pool of `size` connections: a node keeps separate pools so
    /// that one kind of work cannot take another's connections (see `app`).
    ///
    /// # Errors
    /// A bad URL or an unreachable database.
    pub async fn connect_sized(settings: &StoreSettings, size: u32) -> Result<Self, Error> {
        Self::connect_as(settings, size, "herald").await
    }

    /// Like [`Self::connect_sized`], its sessions named `application_name` (unless the database
    /// URL names them): a node's pools say which node and pool they are in `pg_stat_activity`, so
    /// an operator can tell whose connections fill the server, and end one node's sessions.
    ///
    /// # Errors
    /// A bad URL or an unreachable database.
    pub async fn connect_as(
        settings: &StoreSettings,
        size: u32,
        application_name: &str,
    ) -> Result<Self, Error> {
        let mut options =
            PgConnectOptions::from_str(settings.database_url.expose()).map_err(Error::Url)?;
        if options.get_application_name().is_none() {
            options = options.application_name(application_name);
        }
        let options = options.options([
            // Every statement is bounded: a stuck query fails instead of holding a request
            // forever.
            ("statement_timeout", "30s"),
            // Every execution is planned for its arguments and the tables as they are then.
            // sqlx keeps statements prepared per connection, and PostgreSQL may settle on a
            // generic plan after five runs and keep it until an `ANALYZE` of one of its
            // tables: a node's first runs are on a fresh deployment's empty tables, and the
            // plans made for those read whole tables once they have grown. The soak's first
            // minute (issue 23): the outcome writer's update, planned on a few dozen events,
            // read all of `events` for each event of its batch, 0.3-2.2 s a statement at
            // 15,000 events, until the upkeep's next `ANALYZE`; 35 of the hot path's plans
            // do that (`tests/it/plans.rs`). Planning again costs about 0.5 ms a statement
            // (the outcome writer's, 100 events), not the whole-table reads.
            ("plan_cache_mode", "force_custom_plan"),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(settings.acquire_timeout())
            .connect_with(options)
            .await
            .map_err(Error::Connect)?;
        Ok(Self { pool })
    }

    /// Creates the database named in `settings` when it does not exist.
    ///
    /// # Errors
    /// PostgreSQL unreachable, or the user may not create databases.
    pub async fn create_database_if_missing(settings: &StoreSettings) -> Result<bool, Error> {
        let url = settings.database_url.expose();
        if Postgres::database_exists(url)
            .await
            .map_err(Error::Connect)?
        {
            return Ok(false);
        }
        Postgres::create_database(url)
            .await
            .map_err(Error::Connect)?;
        Ok(true)
    }

    /// Drops the database named in `settings` (tests and benchmarks clean up with it).
    ///
    /// # Errors
    /// PostgreSQL unreachable.
    pub async fn drop_database(settings: &StoreSettings) -> Result<(), Error> {
        Postgres::force_drop_database(settings.database_url.expose())
            .await
            .map_err(Error::Connect)
    }

    /// Checks that PostgreSQL answers.
    ///
    /// # Errors
    /// It does not.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(Error::query("ping"))?;
        Ok(())
    }

    /// The pool, for tests that inspect rows.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

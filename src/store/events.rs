//! The events repository: retention, client acknowledgements, and the reads behind catch-up, gap
//! fill and the inbox (the group-committed insert is `commit`).

use super::{Error, Store};
use crate::event::{Envelope, EventId, EventName, UserId};
use serde_json::value::RawValue;

/// An event read back from PostgreSQL (relay, gap fill and catch-up, the inbox).
#[derive(Debug, sqlx::FromRow)]
pub struct StoredEvent {
    /// Event id.
    pub id: EventId,
    /// Owner.
    pub user_id: String,
    /// The user's seq.
    pub seq: i64,
    /// Name.
    pub event: String,
    /// Data as JSON text.
    pub data: String,
    /// Enqueue time, Unix ms.
    pub at: i64,
    /// A client acknowledged it: a channel `ack`, or the inbox's read mark covering its seq.
    pub acked: bool,
    /// The W3C `traceparent` its request continued, if any.
    pub traceparent: Option<String>,
}

impl StoredEvent {
    /// Converts to an envelope; `None` if the row holds values the API would never have accepted.
    pub fn into_envelope(self) -> Option<Envelope> {
        Some(Envelope {
            id: self.id,
            user_id: UserId::parse(self.user_id).ok()?,
            seq: self.seq,
            event: EventName::parse(self.event).ok()?,
            at: self.at,
            data: RawValue::from_string(self.data).ok()?,
            trace: self
                .traceparent
                .as_deref()
                .and_then(crate::traces::TraceParent::parse),
        })
    }
}

/// The columns of a [`StoredEvent`], over `events` (see `stored_event_columns!`).
pub(super) const STORED_EVENT_COLUMNS: &str = stored_event_columns!();

/// How far below a user's last seq the unread count, and the read mark's `acked`, look: the
/// user's newest 1,000 seqs (above its read mark). It bounds both, whatever the number of events
/// a user has; a user's seqs are gap-free when committed, so the range holds at most this many
/// events (fewer where retention pruned some).
pub const UNREAD_CAP: i64 = 1_000;

/// The unread count of user `$1` among its last `$2` seqs above its read mark (`count`), whether
/// more than `$2` seqs lie above the mark (`capped`: the true count may be higher), and the user's
/// last seq. Its one read of `events` is a range of at most `$2` entries of the `(user_id, seq)`
/// index (bounded by seq, so by any plan), besides a primary-key row of `read_watermarks` and of
/// `user_seqs`. Public so that tests can see its plan.
pub const UNREAD_SQL: &str = "WITH bounds AS MATERIALIZED (
        SELECT coalesce((SELECT read_through FROM read_watermarks WHERE user_id = $1), 0) AS mark,
               coalesce((SELECT last_seq FROM user_seqs WHERE user_id = $1), 0) AS last_seq)
    SELECT (SELECT count(*) FROM events
            WHERE user_id = $1 AND seq > greatest(b.mark, b.last_seq - $2) AND acked_at IS NULL)
               AS count,
           b.last_seq - $2 > b.mark AS capped,
           b.last_seq
    FROM bounds b";

/// Raises user `$1`'s read mark to seq `$2` (never past its last seq handed out, so events still
/// to come stay unread; never down) and counts the events it newly covers that no channel acked,
/// among the newest `$3` seqs it covers. It locks the user's mark row (two marks of one user take
/// turns) and reads a range of at most `$3` entries of the `(user_id, seq)` index, however many
/// events the mark covers. Public so that tests can see its plan.
pub const READ_MARK_SQL: &str = "WITH prior AS (
        SELECT read_through FROM read_watermarks WHERE user_id = $1 FOR UPDATE),
    target AS (
        SELECT least($2::int8, coalesce((SELECT last_seq FROM user_seqs WHERE user_id = $1), 0))
                   AS seq,
               coalesce((SELECT read_through FROM prior), 0) AS from_seq),
    raised AS (
        INSERT INTO read_watermarks AS w (user_id, read_through, read_at)
        SELECT $1, seq, now() FROM target WHERE seq > from_seq
        ON CONFLICT (user_id) DO UPDATE
            SET read_through = EXCLUDED.read_through, read_at = EXCLUDED.read_at
            WHERE w.read_through < EXCLUDED.read_through
        RETURNING read_through)
    SELECT count(*) FROM events
    WHERE user_id = $1
      AND seq > greatest((SELECT from_seq FROM target), (SELECT read_through FROM raised) - $3)
      AND seq <= (SELECT read_through FROM raised)
      AND acked_at IS NULL";

/// A user's unread count, as [`Store::unread_of`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Unread {
    /// Events no client acknowledged, among the user's last [`UNREAD_CAP`] seqs above its read
    /// mark.
    pub count: i64,
    /// More than [`UNREAD_CAP`] seqs lie above the read mark: the true count may be higher.
    pub capped: bool,
    /// The last seq handed out (0 when none).
    pub last_seq: i64,
}

/// Which way a page of a user's events runs by seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqOrder {
    /// Oldest first: catch-up and gap fill, which push in order.
    Ascending,
    /// Newest first: the inbox, which shows the latest first.
    Descending,
}

/// What a client marks as read (acknowledged). One state whichever way it says it: an event is
/// read when its `acked_at` is set or its seq is at or below its user's read mark.
#[derive(Clone, Copy, Debug)]
pub enum ReadMark<'a> {
    /// These events (a channel `ack`): each gets its `acked_at`; ids of other users' events, and
    /// events under the read mark (read already), are left alone.
    Ids(&'a [EventId]),
    /// Every event of the user up to this seq, inclusive (the inbox's read mark): the user's read
    /// mark rises to it, in one row whatever the number of events it covers.
    UpToSeq(i64),
}

/// The retention statement: deletes the events whose `ctid`s `select` picks and, in the same
/// statement, raises each of their users' watermark to the highest seq deleted (in user order, so
/// two nodes pruning at once take the watermark rows' locks in one order) and marks their
/// idempotency keys pruned with the event's seq (a primary-key lookup per keyed event; the events
/// row names its key). Answers the count. The bookkeeping costs the background pass about 3 us
/// per pruned event: 7.1 us against 4.4 for the bare delete (90,000 delivered events of 1,000
/// users, one in ten keyed, pruned in statements of 10,000 on this box). A macro, so that each
/// statement is one `const` text.
macro_rules! prune_sql {
    ($select:literal) => {
        concat!(
            "WITH gone AS (
                 DELETE FROM events WHERE ctid = ANY(ARRAY(",
            $select,
            "))
                 RETURNING id, producer_id, user_id, seq, idempotency_key),
             marked AS (
                 INSERT INTO retention_watermarks AS w (user_id, pruned_through)
                 SELECT user_id, max(seq) FROM gone GROUP BY user_id ORDER BY user_id
                 ON CONFLICT (user_id) DO UPDATE
                     SET pruned_through = GREATEST(w.pruned_through, EXCLUDED.pruned_through)),
             keys AS (
                 UPDATE idempotency_keys k SET pruned_at = now(), seq = gone.seq
                 FROM gone
                 WHERE gone.idempotency_key IS NOT NULL AND k.producer_id = gone.producer_id
                   AND k.key = gone.idempotency_key AND k.event_id = gone.id)
             SELECT count(*) FROM gone"
        )
    };
}

/// Where a user's sequence stands, as a join reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqBounds {
    /// The highest seq retention removed, if it removed any.
    pub pruned_through: Option<i64>,
    /// The last seq handed out, if any.
    pub last_seq: Option<i64>,
}

/// Users' retention watermarks and last seqs (`$1` the users), in their order: what joins read
/// before they catch up, two primary-key reads per user (scalar subqueries, so never a join that
/// statistics could turn into a whole read), the joins waiting at one moment in one statement.
pub const USER_SEQ_BOUNDS_SQL: &str =
    "SELECT (SELECT pruned_through FROM retention_watermarks WHERE user_id = u.id),
            (SELECT last_seq FROM user_seqs WHERE user_id = u.id)
     FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n) ORDER BY u.n";

/// Retention by age (`$1` the days, `$2` the batch): delivered events enqueued before the cutoff,
/// found through the BRIN index on `enqueued_at`. Run after [`PRUNE_OLD_EVENTS_PLANNING_SQL`], in
/// its transaction.
pub const PRUNE_OLD_EVENTS_SQL: &str = prune_sql!(
    "SELECT ctid FROM events
     WHERE status = 'delivered' AND enqueued_at < now() - make_interval(days => $1)
     LIMIT $2"
);

/// How [`PRUNE_OLD_EVENTS_SQL`] is planned: with a sequential scan as the last resort only. The one
/// index that finds old events is the BRIN on `enqueued_at` (a btree would cost every insert an
/// index entry), and PostgreSQL costs a BRIN read from the column's correlation statistic: without
/// it (a table never analyzed, or analyzed while empty, as `herald migrate` leaves it) it reckons
/// the BRIN selects every block range and reads the whole table instead, whatever the statement's
/// shape, so every retention batch read all of `events` (issue 23). No shape helps, so a planner
/// setting does, for this statement's transaction alone. With statistics it changes nothing, and
/// at worst (every range selected) a BRIN read costs about what the scan would.
pub const PRUNE_OLD_EVENTS_PLANNING_SQL: &str = "SET LOCAL enable_seqscan = off";

/// Summarizes the block ranges of `events` that its BRIN on `enqueued_at` does not cover yet (see
/// [`Store::summarize_new_event_ranges`]), waiting at most 100 ms for the table's
/// `SHARE UPDATE EXCLUSIVE` lock: a `VACUUM` or `ANALYZE` of `events` holds it for as long as it
/// runs, and an autovacuum that a waiter blocks past `deadlock_timeout` is cancelled.
const SUMMARIZE_NEW_RANGES_SQL: &str =
    "SELECT brin_summarize_new_values('events_enqueued_at_brin'::regclass)";

/// Retention by count (`$1` the events kept per user, `$2` the batch): each user's delivered events
/// more than `$1` seqs below its last, lowest first, from above its retention watermark, and only
/// the run of them below its lowest event still in flight (accepted or published: a failed one is
/// passed over, and stays). So the watermark never passes an event that is still to be delivered,
/// everything of a user's at or below it is pruned or failed, and a batch starts where the last
/// one ended: it reads neither the rows earlier batches deleted (dead until a vacuum; reading
/// them again made each batch slower than the last, 0.6-1.3 s a batch of 10,000 over a million
/// events, and the soak's intake outran it) nor a user with nothing to prune past its counter and
/// watermark. The `LIMIT` in the lateral subquery keeps it a subquery run per user, so no plan can
/// join the counters to a scan of `events` instead (as a plain join, PostgreSQL hashed `user_seqs`
/// and read the whole of `events` for every batch, with fresh statistics or none: issue 23).
pub const PRUNE_EVENTS_PAST_COUNT_SQL: &str = prune_sql!(
    "SELECT e.ctid FROM user_seqs s
     LEFT JOIN retention_watermarks w ON w.user_id = s.user_id
     CROSS JOIN LATERAL (
         SELECT ctid FROM (
             SELECT ctid, status,
                    bool_and(status IN ('delivered', 'failed')) OVER (ORDER BY seq) AS settled
             FROM events
             WHERE user_id = s.user_id AND seq > coalesce(w.pruned_through, 0)
               AND seq <= s.last_seq - $1
             ORDER BY seq
             LIMIT $2) AS run
         WHERE settled AND status = 'delivered') AS e
     WHERE s.last_seq - $1 > coalesce(w.pruned_through, 0)
     LIMIT $2"
);

/// Expires idempotency keys (`$1` their time to live in seconds, `$2` the batch): keys of pruned
/// events, oldest first, through the partial index `idempotency_keys_pruned` (created_at). The
/// order is the index's, so the batch is its first entries: unordered, PostgreSQL without
/// statistics read the whole table for them instead (issue 23).
pub const EXPIRE_IDEMPOTENCY_KEYS_SQL: &str = "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
         SELECT ctid FROM idempotency_keys
         WHERE pruned_at IS NOT NULL AND created_at < now() - make_interval(secs => $1)
         ORDER BY created_at
         LIMIT $2))";

/// A channel `ack` (`$1` the user, `$2` the event ids): sets `acked_at` on those of the user's
/// events above its read mark that have none.
pub const ACK_EVENTS_SQL: &str = "UPDATE events SET acked_at = now()
     WHERE user_id = $1 AND id = ANY($2) AND acked_at IS NULL
       AND seq > coalesce((SELECT read_through FROM read_watermarks WHERE user_id = $1), 0)";

/// A page of a user's events (`$1` the user, `$2` < seq < `$3`, `$4` the limit), oldest first:
/// catch-up and gap fill.
pub const USER_EVENTS_ASCENDING_SQL: &str = concat!(
    "SELECT ",
    stored_event_columns!(),
    " FROM events WHERE user_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4"
);

/// [`USER_EVENTS_ASCENDING_SQL`], newest first: the inbox.
pub const USER_EVENTS_DESCENDING_SQL: &str = concat!(
    "SELECT ",
    stored_event_columns!(),
    " FROM events WHERE user_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
);

impl Store {
    /// For each of `users`, in order (`unnest` gives a row per element): the highest seq retention
    /// has removed (its watermark; events above it may still be pruned later) and the last seq
    /// handed out, each if any.
    ///
    /// # Errors
    /// The query failed.
    pub async fn user_seq_bounds(&self, users: &[&str]) -> Result<Vec<SeqBounds>, Error> {
        let rows: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(USER_SEQ_BOUNDS_SQL)
            .bind(users)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("read users' seq bounds"))?;
        Ok(rows
            .into_iter()
            .map(|(pruned_through, last_seq)| SeqBounds {
                pruned_through,
                last_seq,
            })
            .collect())
    }

    /// Deletes up to `limit` delivered events past retention: older than `max_age_days` (0: no age
    /// limit) or beyond the newest `per_user` of their user (0: no count limit). Returns how many.
    /// Failed and undelivered events stay: they are still the pipeline's or an operator's business
    /// (by count, a user's events above one still in flight wait for it; a failed event replayed
    /// and delivered after the count passed it is left to the age limit).
    /// The same statement raises each user's retention watermark to the highest seq it deleted, so
    /// a join can tell exactly whether it missed anything, and marks the deleted events'
    /// idempotency keys pruned, with their seq, so a retry still finds its original.
    ///
    /// # Errors
    /// The delete failed.
    pub async fn prune_events(
        &self,
        max_age_days: u64,
        per_user: i64,
        limit: i64,
    ) -> Result<u64, Error> {
        let mut pruned = 0;
        if max_age_days > 0 {
            let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
            sqlx::query(PRUNE_OLD_EVENTS_PLANNING_SQL)
                .execute(&mut *tx)
                .await
                .map_err(Error::query("plan pruning old events"))?;
            pruned += sqlx::query_scalar::<_, i64>(PRUNE_OLD_EVENTS_SQL)
                .bind(max_age_days as i32)
                .bind(limit)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::query("prune old events"))?;
            tx.commit()
                .await
                .map_err(Error::query("commit pruning old events"))?;
        }
        if per_user > 0 {
            pruned += sqlx::query_scalar::<_, i64>(PRUNE_EVENTS_PAST_COUNT_SQL)
                .bind(per_user)
                .bind(limit)
                .fetch_one(&self.pool)
                .await
                .map_err(Error::query("prune events beyond the per-user count"))?;
        }
        Ok(u64::try_from(pruned).unwrap_or(0))
    }

    /// Summarizes the block ranges of `events` written since the last summary (a `VACUUM`, or the
    /// last call), so that retention by age reads only the ranges that hold old events. A BRIN
    /// index returns every range it has no summary for, and PostgreSQL summarizes new ranges only
    /// when it vacuums the table: in between, [`PRUNE_OLD_EVENTS_SQL`] read every page written
    /// since, even with nothing old (measured: 27,902 pages, 537 ms for 300,000 recent events,
    /// against 2 index pages and 0.04 ms once summarized; the soak's age prune ran 0.5-2 s in every
    /// retention round). Each page is read once here instead of once per round: 6 ms for the
    /// ranges of 10,000 new events. Later inserts keep a summarized range's summary up to date.
    /// Returns how many ranges it summarized.
    ///
    /// # Errors
    /// The statement failed: [`Error::is_lock_conflict`] when the table was being vacuumed or
    /// analyzed; another error when this role does not own the index (the age prune then reads the
    /// ranges as before).
    pub async fn summarize_new_event_ranges(&self) -> Result<i64, Error> {
        let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
        sqlx::query("SET LOCAL lock_timeout = '100ms'")
            .execute(&mut *tx)
            .await
            .map_err(Error::query("bound the wait for the events table"))?;
        let summarized: i32 = sqlx::query_scalar(SUMMARIZE_NEW_RANGES_SQL)
            .fetch_one(&mut *tx)
            .await
            .map_err(Error::query("summarize the new block ranges of events"))?;
        tx.commit()
            .await
            .map_err(Error::query("commit summarizing new block ranges"))?;
        Ok(i64::from(summarized))
    }

    /// Deletes up to `limit` idempotency keys whose event retention removed and that are older than
    /// `ttl_secs`; returns how many. A key whose event is still stored is kept with it.
    ///
    /// # Errors
    /// The delete failed.
    pub async fn expire_idempotency_keys(&self, ttl_secs: u64, limit: i64) -> Result<u64, Error> {
        let done = sqlx::query(EXPIRE_IDEMPOTENCY_KEYS_SQL)
            .bind(ttl_secs as f64)
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(Error::query("expire idempotency keys"))?;
        Ok(done.rows_affected())
    }

    /// Records that a client of `user_id` showed these events (only that user's events; an event
    /// keeps its first acknowledgement). Returns how many were newly read: for a read mark, counted
    /// among the newest [`UNREAD_CAP`] seqs it covers. The one writer of the read state: a
    /// channel `ack` and the inbox's read mark both come here, so they agree.
    ///
    /// Bounded work per call, however many events the user has: an `ack` touches the events it
    /// names, and a read mark one row of `read_watermarks` and a range of at most [`UNREAD_CAP`]
    /// index entries ([`READ_MARK_SQL`]).
    ///
    /// # Errors
    /// The update failed.
    pub async fn record_acks(&self, user_id: &str, mark: ReadMark<'_>) -> Result<u64, Error> {
        let newly = match mark {
            ReadMark::Ids(ids) => sqlx::query(ACK_EVENTS_SQL)
                .bind(user_id)
                .bind(ids)
                .execute(&self.pool)
                .await
                .map(|done| done.rows_affected()),
            ReadMark::UpToSeq(seq) => sqlx::query_scalar::<_, i64>(READ_MARK_SQL)
                .bind(user_id)
                .bind(seq)
                .bind(UNREAD_CAP)
                .fetch_one(&self.pool)
                .await
                .map(|count| u64::try_from(count).unwrap_or(0)),
        }
        .map_err(Error::query("record client acks"))?;
        Ok(newly)
    }

    /// Events of `user_id` with `after < seq < before`, at most `limit`, in `order`: the one read
    /// behind catch-up, gap fill and the inbox, so they serve the same events the same way.
    ///
    /// # Errors
    /// The query failed.
    pub async fn user_events(
        &self,
        user_id: &str,
        after: i64,
        before: i64,
        limit: i64,
        order: SeqOrder,
    ) -> Result<Vec<StoredEvent>, Error> {
        let sql = match order {
            SeqOrder::Ascending => USER_EVENTS_ASCENDING_SQL,
            SeqOrder::Descending => USER_EVENTS_DESCENDING_SQL,
        };
        sqlx::query_as::<_, StoredEvent>(sql)
            .bind(user_id)
            .bind(after)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("read events of a user"))
    }

    /// The user's unread count among its last [`UNREAD_CAP`] seqs above its read mark (see
    /// [`Unread`]) and its last seq: bounded work ([`UNREAD_SQL`]), however many events it has.
    ///
    /// # Errors
    /// The query failed.
    pub async fn unread_of(&self, user_id: &str) -> Result<Unread, Error> {
        sqlx::query_as(UNREAD_SQL)
            .bind(user_id)
            .bind(UNREAD_CAP)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("count a user's unread events"))
    }
}

//! The events repository: the group-committed insert (with per-user seq and idempotency),
//! retention, client acknowledgements, and the reads behind catch-up, gap fill and the inbox.

use super::outbox::{self, MessageLimits, OutboxMessage, plan_messages};
use super::{Error, EventStatus, Store};
use crate::event::{Envelope, EventName, UserId, envelope_size, now_unix_ms};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// An event to insert, validated by the API.
#[derive(Debug)]
pub struct NewEvent {
    /// Chosen by Herald (UUID v7).
    pub id: Uuid,
    /// Who sent it.
    pub producer_id: i64,
    /// Whose it is.
    pub user_id: UserId,
    /// Its name.
    pub event: EventName,
    /// The producer's data, raw JSON.
    pub data: Box<RawValue>,
    /// Unique per producer when present: a retry with the same key returns the original event.
    pub idempotency_key: Option<String>,
    /// When the API accepted it, Unix ms.
    pub enqueued_at_ms: i64,
}

impl NewEvent {
    /// The event to insert, stamped now: a fresh UUID v7 and the current time. The one way an
    /// event is made (the API's validation ends here; tests that bypass it too).
    pub fn new(
        producer_id: i64,
        user_id: UserId,
        event: EventName,
        data: Box<RawValue>,
        idempotency_key: Option<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            producer_id,
            user_id,
            event,
            data,
            idempotency_key,
            enqueued_at_ms: now_unix_ms(),
        }
    }

    /// Roughly what the event costs in memory while it waits for its commit: its variable-length
    /// parts plus the fixed ones.
    pub fn buffered_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.data.get().len()
            + self.user_id.as_str().len()
            + self.event.as_str().len()
            + self.idempotency_key.as_ref().map_or(0, String::len)
    }

    /// The envelope of this event once it has its seq.
    pub fn into_envelope(self, seq: i64) -> Envelope {
        Envelope {
            id: self.id,
            user_id: self.user_id,
            seq,
            event: self.event,
            at: self.enqueued_at_ms,
            data: self.data,
        }
    }
}

/// What became of one event of an insert batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new row, numbered `seq` for its user.
    Inserted {
        /// The user's sequence number.
        seq: i64,
    },
    /// The idempotency key was used before: this is the original event.
    Duplicate {
        /// The original event.
        id: Uuid,
        /// Its seq (0 for a key whose event was pruned before keys recorded it).
        seq: i64,
        /// Its current status, or [`EventStatus::Pruned`] once retention removed it (its key is
        /// kept for `store.idempotency_ttl_secs`).
        status: EventStatus,
    },
}

/// What a group commit stored: an outcome per event, and the broker messages that carry the new
/// events (their outbox rows were written in the same transaction).
#[derive(Debug)]
pub struct Committed {
    /// One per event given, in order.
    pub outcomes: Vec<InsertOutcome>,
    /// The new events' messages, in publishing order.
    pub messages: Vec<OutboxMessage>,
}

/// An event read back from PostgreSQL (relay, gap fill and catch-up, the inbox).
#[derive(Debug, sqlx::FromRow)]
pub struct StoredEvent {
    /// Event id.
    pub id: Uuid,
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
    Ids(&'a [Uuid]),
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

/// The group commit's counter bump (`$1` the users, `$2` each one's number of new events): one
/// upsert per user, through the primary key, answering each user's new last seq.
pub const BUMP_USER_SEQS_SQL: &str = "INSERT INTO user_seqs AS s (user_id, last_seq)
     SELECT * FROM UNNEST($1::text[], $2::int8[])
     ON CONFLICT (user_id) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
     RETURNING user_id, last_seq";

/// The group commit's insert of its new events, one row per element of the arrays (id, producer,
/// user, seq, name, data, idempotency key, enqueue time in Unix ms).
pub const INSERT_EVENTS_SQL: &str =
    "INSERT INTO events (id, producer_id, user_id, seq, event, data, idempotency_key, enqueued_at)
     SELECT id, p, u, s, e, d::jsonb, k, to_timestamp(t / 1000.0)
     FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[],
                 $7::text[], $8::int8[]) AS x(id, p, u, s, e, d, k, t)";

/// A user's retention watermark and last seq (`$1` the user): two primary-key reads, what a join
/// reads before it catches up.
pub const USER_SEQ_BOUNDS_SQL: &str =
    "SELECT (SELECT pruned_through FROM retention_watermarks WHERE user_id = $1),
            (SELECT last_seq FROM user_seqs WHERE user_id = $1)";

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

/// Retention by count (`$1` the events kept per user, `$2` the batch): delivered events more than
/// `$1` seqs below their user's last. It goes through the users' counters and, for each user with
/// more than `$1` seqs, reads the range of its events below the kept ones from the `(user_id,
/// seq)` index. The `LIMIT` in the lateral subquery keeps it a subquery run per user, so no plan
/// can join the counters to a scan of `events` instead: as a plain join, PostgreSQL hashed
/// `user_seqs` and read the whole of `events` for every batch, with fresh statistics or none
/// (issue 23, a million events).
pub const PRUNE_EVENTS_PAST_COUNT_SQL: &str = prune_sql!(
    "SELECT e.ctid FROM user_seqs s
     CROSS JOIN LATERAL (
         SELECT ctid FROM events
         WHERE user_id = s.user_id AND seq <= s.last_seq - $1 AND status = 'delivered'
         LIMIT $2) AS e
     WHERE s.last_seq > $1
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
    /// Inserts a batch of events in one transaction, numbers them per user, and plans the broker
    /// messages that carry the new ones (one per partition, split at `limits`), writing their outbox
    /// rows in the same transaction.
    ///
    /// Steps, each one statement: claim the idempotency keys (a concurrent duplicate waits on the
    /// unique index, then is seen); bump each user's counter once by its number of new events, in
    /// user order so concurrent batches cannot deadlock; insert the rows with `UNNEST`; insert the
    /// outbox rows. Events of one user get consecutive seqs in input order.
    ///
    /// # Errors
    /// The transaction failed; nothing of the batch is stored.
    pub async fn insert_events(
        &self,
        events: &[NewEvent],
        partitions: u16,
        limits: MessageLimits,
    ) -> Result<Committed, Error> {
        let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
        let keyed = claim_idempotency_keys(&mut tx, events).await?;
        let fresh = || {
            keyed
                .iter()
                .zip(events)
                .filter(|(k, _)| matches!(k, Keyed::Fresh))
                .map(|(_, e)| e)
        };
        let mut per_user: BTreeMap<&str, i64> = BTreeMap::new();
        for e in fresh() {
            *per_user.entry(e.user_id.as_str()).or_default() += 1;
        }
        let (users, counts): (Vec<&str>, Vec<i64>) = per_user.iter().map(|(u, c)| (*u, *c)).unzip();
        let rows: Vec<(String, i64)> = sqlx::query_as(BUMP_USER_SEQS_SQL)
            .bind(&users)
            .bind(&counts)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::query("bump user seqs"))?;
        // The next seq to hand out per user: last_seq - count + 1.
        let mut next: HashMap<String, i64> = rows
            .into_iter()
            .map(|(user, last)| {
                let count = per_user.get(user.as_str()).copied().unwrap_or(0);
                (user, last - count + 1)
            })
            .collect();

        // Each event's answer, decided once, in order: a repeat's first occurrence comes before it.
        let mut outcomes: Vec<InsertOutcome> = Vec::with_capacity(events.len());
        let mut rows = NewRows::with_capacity(fresh().count());
        for (i, (e, keyed)) in events.iter().zip(&keyed).enumerate() {
            let outcome = match keyed {
                Keyed::Fresh => {
                    let slot = next.get_mut(e.user_id.as_str()).ok_or(Error::Query {
                        what: "bump user seqs",
                        source: sqlx::Error::RowNotFound,
                    })?;
                    let seq = *slot;
                    *slot += 1;
                    rows.push(i, e, seq);
                    InsertOutcome::Inserted { seq }
                }
                Keyed::Original(original) => original.clone(),
                Keyed::RepeatOf(first) => match outcomes.get(*first) {
                    Some(InsertOutcome::Inserted { seq }) => InsertOutcome::Duplicate {
                        id: events[*first].id,
                        seq: *seq,
                        status: EventStatus::Accepted,
                    },
                    Some(duplicate) => duplicate.clone(),
                    None => unreachable_repeat(i, *first)?,
                },
            };
            outcomes.push(outcome);
        }
        rows.insert(&mut tx).await?;
        let messages = plan_messages(
            rows.indices.iter().map(|&i| {
                let e = &events[i];
                let size = envelope_size(&e.data, e.user_id.as_str(), e.event.as_str());
                (i, e.user_id.as_str(), size)
            }),
            partitions,
            limits,
        );
        outbox::insert_rows(&mut tx, &messages, |i| events[i].id, 0).await?;
        tx.commit().await.map_err(Error::query("commit events"))?;
        Ok(Committed { outcomes, messages })
    }

    /// The highest seq of `user_id` that retention has removed (its watermark; events above it
    /// may still be pruned later) and the last seq handed out, each if any.
    ///
    /// # Errors
    /// The query failed.
    pub async fn user_seq_bounds(
        &self,
        user_id: &str,
    ) -> Result<(Option<i64>, Option<i64>), Error> {
        sqlx::query_as(USER_SEQ_BOUNDS_SQL)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("read a user's seq bounds"))
    }

    /// Deletes up to `limit` delivered events past retention: older than `max_age_days` (0: no age
    /// limit) or beyond the newest `per_user` of their user (0: no count limit). Returns how many.
    /// Failed and undelivered events stay: they are still the pipeline's or an operator's business.
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

/// The group commit's claim of its idempotency keys (`$1` the producers, `$2` the keys, `$3` the
/// events): inserts those not taken, through the primary key, answering them.
pub const CLAIM_IDEMPOTENCY_KEYS_SQL: &str =
    "INSERT INTO idempotency_keys (producer_id, key, event_id)
     SELECT * FROM UNNEST($1::int8[], $2::text[], $3::uuid[])
     ON CONFLICT DO NOTHING RETURNING producer_id, key";

/// The originals of keys already taken (`$1` the producers, `$2` the keys, `$3` the status of an
/// event retention removed): each key, its event, and the event's seq and status.
pub const IDEMPOTENT_ORIGINALS_SQL: &str =
    "SELECT k.producer_id, k.key, k.event_id, COALESCE(e.seq, k.seq, 0), COALESCE(e.status, $3)
     FROM UNNEST($1::int8[], $2::text[]) AS x(p, k)
     JOIN idempotency_keys k ON k.producer_id = x.p AND k.key = x.k
     LEFT JOIN events e ON e.id = k.event_id";

/// What the idempotency keys say of one event of a batch, before anything is numbered.
enum Keyed {
    /// New (no key, or a key nobody held): it gets a seq and a row.
    Fresh,
    /// A committed event holds its key: the answer is that event ([`InsertOutcome::Duplicate`]).
    Original(InsertOutcome),
    /// It repeats the key of the batch's earlier event at this index: answered like that one.
    RepeatOf(usize),
}

/// A batch whose repeat points at itself or ahead: [`claim_idempotency_keys`] never makes one, so
/// this says so as an error rather than a panic.
fn unreachable_repeat(at: usize, first: usize) -> Result<InsertOutcome, Error> {
    Err(Error::Query {
        what: "answer a repeated idempotency key",
        source: sqlx::Error::Protocol(format!("event {at} repeats event {first}, not before it")),
    })
}

/// The columns of the batch's new rows, for one `INSERT ... UNNEST`.
struct NewRows<'a> {
    /// Each row's index in the batch.
    indices: Vec<usize>,
    ids: Vec<Uuid>,
    producers: Vec<i64>,
    user_ids: Vec<&'a str>,
    seqs: Vec<i64>,
    names: Vec<&'a str>,
    datas: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    ats: Vec<i64>,
}

impl<'a> NewRows<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            indices: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            producers: Vec::with_capacity(n),
            user_ids: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            datas: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            ats: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, index: usize, e: &'a NewEvent, seq: i64) {
        self.indices.push(index);
        self.ids.push(e.id);
        self.producers.push(e.producer_id);
        self.user_ids.push(e.user_id.as_str());
        self.seqs.push(seq);
        self.names.push(e.event.as_str());
        self.datas.push(e.data.get());
        self.keys.push(e.idempotency_key.as_deref());
        self.ats.push(e.enqueued_at_ms);
    }

    async fn insert(&self, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(INSERT_EVENTS_SQL)
            .bind(&self.ids)
            .bind(&self.producers)
            .bind(&self.user_ids)
            .bind(&self.seqs)
            .bind(&self.names)
            .bind(&self.datas)
            .bind(&self.keys)
            .bind(&self.ats)
            .execute(&mut **tx)
            .await
            .map_err(Error::query("insert events"))?;
        Ok(())
    }
}

/// Claims the batch's idempotency keys and says, per event, whether it is new, answered by the
/// committed event holding its key, or a repeat of an earlier event of the batch.
async fn claim_idempotency_keys(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[NewEvent],
) -> Result<Vec<Keyed>, Error> {
    // First occurrence of each (producer, key) in the batch; later ones repeat it.
    let mut first: BTreeMap<(i64, &str), usize> = BTreeMap::new();
    let mut keyed: Vec<Keyed> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let repeat =
            e.idempotency_key
                .as_deref()
                .and_then(|key| match first.get(&(e.producer_id, key)) {
                    Some(&j) => Some(j),
                    None => {
                        first.insert((e.producer_id, key), i);
                        None
                    }
                });
        keyed.push(repeat.map_or(Keyed::Fresh, Keyed::RepeatOf));
    }
    if first.is_empty() {
        return Ok(keyed);
    }
    // Sorted (BTreeMap order), so concurrent transactions take the index locks in one order.
    let producers: Vec<i64> = first.keys().map(|(p, _)| *p).collect();
    let keys: Vec<&str> = first.keys().map(|(_, k)| *k).collect();
    let ids: Vec<Uuid> = first.values().map(|&i| events[i].id).collect();
    let claimed: Vec<(i64, String)> = sqlx::query_as(CLAIM_IDEMPOTENCY_KEYS_SQL)
        .bind(&producers)
        .bind(&keys)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(Error::query("claim idempotency keys"))?;

    if claimed.len() < first.len() {
        let claimed: std::collections::HashSet<(i64, &str)> =
            claimed.iter().map(|(p, k)| (*p, k.as_str())).collect();
        let (taken_p, taken_k): (Vec<i64>, Vec<&str>) = first
            .keys()
            .filter(|pk| !claimed.contains(pk))
            .map(|(p, k)| (*p, *k))
            .unzip();
        // A key outlives its event by `store.idempotency_ttl_secs`: an event gone is a pruned one
        // (a key and its event commit together), answered with the seq its key recorded.
        let originals: Vec<(i64, String, Uuid, i64, EventStatus)> =
            sqlx::query_as(IDEMPOTENT_ORIGINALS_SQL)
                .bind(&taken_p)
                .bind(&taken_k)
                .bind(EventStatus::Pruned)
                .fetch_all(&mut **tx)
                .await
                .map_err(Error::query("read idempotent originals"))?;
        for (producer, key, id, seq, status) in originals {
            if let Some(&i) = first.get(&(producer, key.as_str())) {
                keyed[i] = Keyed::Original(InsertOutcome::Duplicate { id, seq, status });
            }
        }
    }
    Ok(keyed)
}

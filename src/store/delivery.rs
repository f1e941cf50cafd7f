//! Delivery attempts and what operators read and replay: the batched attempt writer (one statement
//! per batch updates the events and inserts their attempt rows), event listings with keyset
//! pagination and the replay claim, all selected by an [`EventFilter`] (read in `filter`; replay
//! jobs are in `replay_jobs`).
//!
//! Times cross this boundary as Unix milliseconds going in and RFC 3339 strings (UTC) coming out,
//! formatted by PostgreSQL, so nothing here formats a date.

use super::filter::EventFilter;
use super::outbox::OutboxMessage;
use super::partitions::LeaseToken;
use super::status::EventStatus;
use super::{Error, Store, StoredEvent};
use crate::event::EventId;
use serde::Serialize;
use uuid::Uuid;

/// One delivery attempt, and what it leaves the event as.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    /// The event.
    pub id: EventId,
    /// The lease of the event's partition the attempt was made under: the attempt is recorded
    /// only while it is still the partition's current lease.
    pub lease: LeaseToken,
    /// When the attempt started, Unix ms.
    pub started_at_ms: i64,
    /// When it ended, Unix ms.
    pub finished_at_ms: i64,
    /// How it ended.
    pub result: AttemptResult,
}

/// How a delivery attempt ended.
#[derive(Clone, Debug)]
pub enum AttemptResult {
    /// The broadcast reached `sockets` subscribers (0: nobody online, kept for catch-up): the event is
    /// delivered.
    Delivered {
        /// Sockets reached.
        sockets: i32,
        /// When its Web Push fallback is due (Unix ms), for an event whose name has one: its pushes
        /// are scheduled once this record is stored.
        webpush_due_ms: Option<i64>,
    },
    /// The attempt failed and another one is scheduled: the event stays `published`.
    Retrying {
        /// Why it failed.
        error: String,
        /// When the next attempt is due, Unix ms.
        retry_at_ms: i64,
        /// The retry's message, once confirmed into its delay queue: its id is its outbox row's,
        /// one of its own per retry (a retry's row must not be the one the retry before it deletes
        /// when its message is settled). `None` when the attempt is to be made again from the same
        /// message (the retry's publish failed or was not confirmed).
        message: Option<Uuid>,
    },
    /// The attempt failed and it was the last one: the event is `failed` (and dead-lettered).
    Failed {
        /// Why it failed.
        error: String,
    },
}

/// An event as operators and producers read it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EventRecord {
    /// Event id.
    #[schema(value_type = Uuid)]
    pub id: EventId,
    /// The producer's name.
    pub producer: String,
    /// Owner.
    pub user_id: String,
    /// The user's seq.
    pub seq: i64,
    /// Event name.
    pub event: String,
    /// Current status.
    pub status: EventStatus,
    /// Delivery attempts so far (replays included).
    pub attempts: i32,
    /// The error of the last failed attempt, until the event is delivered.
    pub last_error: Option<String>,
    /// Sockets the delivering broadcast reached (0: nobody online).
    pub push_count: Option<i32>,
    /// When the API accepted it.
    pub enqueued_at: String,
    /// When a worker first took it from the broker (its first attempt began).
    pub published_at: Option<String>,
    /// When it was delivered (pushed to the sockets online then).
    pub delivered_at: Option<String>,
    /// When a client acknowledged having shown it to its user (delivered to a person): its
    /// channel `ack`, or, for an event the inbox's read mark covers without one, when that mark
    /// last moved (a mark covers many events at once and keeps one time).
    pub acked_at: Option<String>,
    /// When it was marked failed.
    pub failed_at: Option<String>,
    /// When the next attempt is due, while one is scheduled.
    pub next_attempt_at: Option<String>,
    /// Operator replays.
    pub replays: i32,
    /// The last replay.
    pub replayed_at: Option<String>,
    /// Times the sweeper sent it again because no message carried it any more.
    pub sweeps: i32,
    /// The last sweep.
    pub swept_at: Option<String>,
    /// The W3C trace id of the request that made it (the producer's `traceparent`, or the trace
    /// Herald started): paste it into the tracing backend to follow the event across nodes.
    pub trace_id: Option<String>,
}

/// One recorded attempt, as read back.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AttemptRow {
    /// 1, 2, ... over the event's life.
    pub attempt: i32,
    /// Start.
    pub started_at: String,
    /// End.
    pub finished_at: String,
    /// `pushed`, `offline` or `failed`.
    pub outcome: String,
    /// Sockets reached.
    pub sockets: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
}

const EVENT_RECORD_COLUMNS: &str = concat!(
    "e.id, p.name AS producer, e.user_id, e.seq, e.event, e.status, e.attempts, e.last_error, ",
    "e.push_count, ",
    rfc3339!("e.enqueued_at"),
    " AS enqueued_at, ",
    rfc3339!("e.published_at"),
    " AS published_at, ",
    rfc3339!("e.delivered_at"),
    " AS delivered_at, ",
    // An event under its user's read mark is read without an `acked_at` of its own.
    rfc3339!(
        "COALESCE(e.acked_at, (SELECT r.read_at FROM read_watermarks r
                               WHERE r.user_id = e.user_id AND e.seq <= r.read_through))"
    ),
    " AS acked_at, ",
    rfc3339!("e.failed_at"),
    " AS failed_at, ",
    rfc3339!("e.next_attempt_at"),
    " AS next_attempt_at, e.replays, ",
    rfc3339!("e.replayed_at"),
    " AS replayed_at, e.sweeps, ",
    rfc3339!("e.swept_at"),
    " AS swept_at, substring(e.traceparent FROM 4 FOR 32) AS trace_id"
);

/// The filter as SQL over `events e JOIN producers p`, with its binds at `$1..$7`.
const FILTER_SQL: &str = "(cardinality($1::text[]) = 0 OR e.status = ANY($1))
     AND ($2::text IS NULL OR p.name = $2)
     AND ($3::text IS NULL OR e.user_id = $3)
     AND ($4::text IS NULL OR e.event = $4)
     AND ($5::int8 IS NULL OR e.enqueued_at >= to_timestamp($5 / 1000.0))
     AND ($6::int8 IS NULL OR e.enqueued_at < to_timestamp($6 / 1000.0))
     AND (cardinality($7::uuid[]) = 0 OR e.id = ANY($7))";

/// [`FILTER_SQL`], plus a predicate the planner can match against the failed-events index when
/// only failed events are asked for (a bound parameter alone never lets it use a partial index).
fn filter_sql(filter: &EventFilter) -> String {
    if filter.statuses.iter().all(|s| *s == EventStatus::Failed) && !filter.statuses.is_empty() {
        format!("{FILTER_SQL} AND e.failed_at IS NOT NULL")
    } else {
        FILTER_SQL.to_owned()
    }
}

type Query<'q, O> = sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

fn bind_filter<'q, O>(query: Query<'q, O>, filter: &'q EventFilter) -> Query<'q, O> {
    query
        .bind(&filter.statuses)
        .bind(filter.producer.as_deref())
        .bind(filter.user_id.as_deref())
        .bind(filter.event.as_deref())
        .bind(filter.since_ms)
        .bind(filter.until_ms)
        .bind(&filter.ids)
}

/// How long a replay claim waits for a row another transaction holds before it gives up, 2 s:
/// long past any outcome write, short enough that the replay notices a stop soon (it then tries
/// the page again; see [`Store::claim_for_replay`]).
const BOUND_REPLAY_LOCK_WAIT: &str = "SET LOCAL lock_timeout = '2s'";

/// Where a replay has got to: the last event of the last page it looked at, in (user, seq) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayCursor {
    /// The event's user.
    pub user_id: String,
    /// Its seq.
    pub seq: i64,
}

/// One page of a replay: what it claimed, and where the next page starts.
#[derive(Debug)]
pub struct ReplayPage {
    /// The claimed events in (user, seq) order, each with the id of its message (outbox row).
    pub events: Vec<(Uuid, StoredEvent)>,
    /// The cursor after this page's candidates (claimed or not), `None` once nothing is left.
    pub next: Option<ReplayCursor>,
}

/// The outcome writer: a batch of attempts in one statement (see [`Store::record_attempts`]; `$1`
/// the events, `$2` each attempt's kind, `$3` sockets, `$4` error, `$5` start and `$6` end in Unix
/// ms, `$7` when a retry is due, `$8` the partition and `$9` the epoch it was made under, `$10`
/// the node, `$11` a retry's message). Answers the events whose attempt was fenced off.
pub const RECORD_ATTEMPTS_SQL: &str = "WITH given AS (
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::int8[],
                              $6::int8[], $7::int8[], $8::int4[], $9::int8[], $11::uuid[])
             AS g(id, kind, sockets, err, started, finished, retry_at, part, epoch,
                  retry_message)),
     -- The leases the attempts were made under, if this node still holds them: locked, so
     -- a takeover (which raises the epoch) cannot slip in before this statement commits.
     held AS (
         SELECT l.partition, l.epoch FROM partition_leases l
         WHERE l.owner = $10 AND l.partition IN (SELECT part FROM given)
         -- In partition order, as every statement locking several leases (a renewal too).
         ORDER BY l.partition
         FOR SHARE),
     x AS (
         SELECT g.* FROM given g JOIN held h ON h.partition = g.part AND h.epoch = g.epoch),
     -- Events whose first attempt delivered and lives on the event row alone: copied into
     -- delivery_attempts before this attempt changes the row (the snapshot is pre-update).
     first AS (
         SELECT e.id, e.published_at, e.delivered_at, e.push_count
         FROM events e JOIN x ON x.id = e.id
         WHERE e.attempts = 1 AND e.delivered_at IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM delivery_attempts a WHERE a.event_id = e.id)),
     kept AS (
         INSERT INTO delivery_attempts (event_id, attempt, started_at, finished_at, outcome, sockets)
         SELECT id, 1, published_at, delivered_at,
                CASE WHEN push_count > 0 THEN 'pushed' ELSE 'offline' END, push_count
         FROM first
         ON CONFLICT DO NOTHING),
     upd AS (
         UPDATE events e SET
             attempts = e.attempts + 1,
             -- The broker had it no later than its first attempt began (the confirm
             -- itself only deletes an outbox row, and never touches the event).
             published_at = COALESCE(e.published_at, to_timestamp(x.started / 1000.0)),
             status = CASE
                 WHEN x.kind = 'delivered' THEN 'delivered'
                 WHEN e.status = 'delivered' THEN e.status
                 WHEN x.kind = 'failed' THEN 'failed'
                 WHEN e.status = 'accepted' THEN 'published'
                 ELSE e.status END,
             -- The attempt's own end, so the event and its attempt log agree.
             delivered_at = CASE WHEN x.kind = 'delivered' THEN to_timestamp(x.finished / 1000.0)
                                 ELSE e.delivered_at END,
             failed_at = CASE WHEN x.kind = 'failed' AND e.status <> 'delivered'
                              THEN to_timestamp(x.finished / 1000.0) ELSE e.failed_at END,
             push_count = CASE WHEN x.kind = 'delivered' THEN x.sockets ELSE e.push_count END,
             last_error = CASE WHEN x.kind = 'delivered' THEN NULL
                               WHEN e.status = 'delivered' THEN e.last_error
                               ELSE x.err END,
             next_attempt_at = CASE WHEN x.kind = 'retrying' AND e.status <> 'delivered'
                                    THEN to_timestamp(x.retry_at / 1000.0) END
         FROM x WHERE e.id = x.id
         -- The attempt's own fields ride along, so nothing below joins two CTEs (the
         -- planner cannot estimate them, and a nested loop over both was quadratic).
         RETURNING e.id, e.attempts, x.kind, x.sockets, x.err, x.started, x.finished,
                   x.retry_at, x.part, x.retry_message),
     -- A retry's message is in flight until a worker settles it: it gets an outbox row of
     -- its own (the retry message's id), dated when it is due, for the sweeper.
     retried AS (
         INSERT INTO outbox (id, event_ids, partition, created_at, confirmed_at)
         SELECT retry_message, ARRAY[id], part::int2, to_timestamp(retry_at / 1000.0), now()
         FROM upd WHERE kind = 'retrying' AND retry_message IS NOT NULL
         ON CONFLICT (id) DO NOTHING),
     logged AS (
         INSERT INTO delivery_attempts (event_id, attempt, started_at, finished_at, outcome, sockets, error)
         SELECT id, attempts, to_timestamp(started / 1000.0), to_timestamp(finished / 1000.0),
                CASE WHEN kind <> 'delivered' THEN 'failed'
                     WHEN sockets > 0 THEN 'pushed' ELSE 'offline' END,
                sockets, err
         FROM upd
         -- A first attempt that delivers stays on the event row (see the migration).
         WHERE NOT (kind = 'delivered' AND attempts = 1)
         ON CONFLICT DO NOTHING)
     SELECT g.id FROM given g WHERE NOT EXISTS (SELECT 1 FROM x WHERE x.id = g.id)";

impl Store {
    /// Records a batch of delivery attempts in one statement: each event's status, attempt count,
    /// error and schedule are updated, and a `delivery_attempts` row is inserted per attempt,
    /// numbered from the event's new attempt count, except for an event's first attempt when it
    /// delivered: the event row holds that one (its `published_at`, `delivered_at` and
    /// `push_count`), which saves a row, an index entry and a foreign-key check on the hot path. A
    /// later attempt of such an event first copies it into `delivery_attempts`.
    ///
    /// Statuses never move backwards: a failure does not undo `delivered` (a duplicate copy may
    /// have failed after another one delivered), and a scheduled retry moves `accepted` (a confirm
    /// not yet recorded) to `published`, so the outbox relay leaves the event to its retry.
    ///
    /// A retrying attempt also records its retry's message in the outbox (confirmed: its publish
    /// was), so the sweeper can find the event should the retry be lost.
    ///
    /// **Fenced.** An attempt is stored only if `node` still holds its lease, at the epoch the
    /// attempt carries; the lease rows are share-locked for the statement, so a node taking a
    /// partition over waits until the write is done, and a write after the takeover sees the new
    /// epoch and is refused. Returns the ids of the attempts refused so (the caller returns their
    /// messages to the queue, for the partition's current owner).
    ///
    /// # Errors
    /// The statement failed; nothing of the batch is stored.
    pub async fn record_attempts(
        &self,
        node: &str,
        records: &[AttemptRecord],
    ) -> Result<Vec<EventId>, Error> {
        let n = records.len();
        let (mut partitions, mut epochs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut ids, mut kinds, mut sockets, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut started, mut finished, mut retry_at, mut retry_messages) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for record in records {
            ids.push(record.id);
            partitions.push(i32::from(record.lease.partition));
            epochs.push(record.lease.epoch);
            started.push(record.started_at_ms);
            finished.push(record.finished_at_ms);
            let (kind, reached, error, at, message) = match &record.result {
                AttemptResult::Delivered { sockets, .. } => {
                    ("delivered", Some(*sockets), None, None, None)
                }
                AttemptResult::Retrying {
                    error,
                    retry_at_ms,
                    message,
                } => (
                    "retrying",
                    None,
                    Some(error.as_str()),
                    Some(*retry_at_ms),
                    *message,
                ),
                AttemptResult::Failed { error } => {
                    ("failed", None, Some(error.as_str()), None, None)
                }
            };
            kinds.push(kind);
            sockets.push(reached);
            errors.push(error);
            retry_at.push(at);
            retry_messages.push(message);
        }
        let fenced: Vec<EventId> = sqlx::query_scalar(RECORD_ATTEMPTS_SQL)
            .bind(&ids)
            .bind(&kinds)
            .bind(&sockets)
            .bind(&errors)
            .bind(&started)
            .bind(&finished)
            .bind(&retry_at)
            .bind(&partitions)
            .bind(&epochs)
            .bind(node)
            .bind(&retry_messages)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("record delivery attempts"))?;
        Ok(fenced)
    }

    /// One event; with `producer_id`, only if that producer sent it (so a producer cannot probe
    /// other producers' ids).
    ///
    /// # Errors
    /// The query failed.
    pub async fn event_record(
        &self,
        id: EventId,
        producer_id: Option<i64>,
    ) -> Result<Option<EventRecord>, Error> {
        sqlx::query_as::<_, EventRecord>(&format!(
            "SELECT {EVENT_RECORD_COLUMNS} FROM events e JOIN producers p ON p.id = e.producer_id
             WHERE e.id = $1 AND ($2::int8 IS NULL OR e.producer_id = $2)"
        ))
        .bind(id)
        .bind(producer_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::query("read an event"))
    }

    /// The event's data, as JSON text.
    ///
    /// # Errors
    /// The query failed.
    pub async fn event_data(&self, id: EventId) -> Result<Option<String>, Error> {
        sqlx::query_scalar("SELECT data::text FROM events WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::query("read an event's data"))
    }

    /// The attempts of an event, first to last.
    ///
    /// # Errors
    /// The query failed.
    pub async fn attempts_of(&self, id: EventId) -> Result<Vec<AttemptRow>, Error> {
        // The rows, and a first attempt that delivered, which only the event row holds.
        sqlx::query_as::<_, AttemptRow>(concat!(
            "SELECT attempt, ",
            rfc3339!("started_at"),
            " AS started_at, ",
            rfc3339!("finished_at"),
            " AS finished_at, outcome, sockets, error
             FROM delivery_attempts WHERE event_id = $1
             UNION ALL
             SELECT 1, ",
            rfc3339!("published_at"),
            ", ",
            rfc3339!("delivered_at"),
            ", CASE WHEN push_count > 0 THEN 'pushed' ELSE 'offline' END, push_count, NULL
             FROM events
             WHERE id = $1 AND attempts >= 1 AND delivered_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM delivery_attempts WHERE event_id = $1 AND attempt = 1)
             ORDER BY attempt"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("read attempts"))
    }

    /// Events matching `filter`, newest first, at most `limit`, strictly older than `before` (the
    /// last id of the previous page: keyset pagination, stable while events are added).
    ///
    /// # Errors
    /// The query failed.
    pub async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<EventId>,
        limit: i64,
    ) -> Result<Vec<EventRecord>, Error> {
        let sql = format!(
            "SELECT {EVENT_RECORD_COLUMNS} FROM events e JOIN producers p ON p.id = e.producer_id
             WHERE {} AND ($8::uuid IS NULL OR e.id < $8)
             ORDER BY e.id DESC LIMIT $9",
            filter_sql(filter)
        );
        bind_filter(sqlx::query_as::<_, EventRecord>(&sql), filter)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("list events"))
    }

    /// Events failed for good and not replayed since (the console's figure).
    ///
    /// # Errors
    /// The query failed.
    pub async fn failed_count(&self) -> Result<i64, Error> {
        // `failed_at IS NOT NULL` lets the partial index on failed events answer, not a scan.
        sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE failed_at IS NOT NULL AND status = $1",
        )
        .bind(EventStatus::Failed)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::query("count failed events"))
    }

    /// How many events match `filter`.
    ///
    /// # Errors
    /// The query failed.
    pub async fn count_events(&self, filter: &EventFilter) -> Result<i64, Error> {
        let sql = format!(
            "SELECT count(*) FROM events e JOIN producers p ON p.id = e.producer_id WHERE {}",
            filter_sql(filter)
        );
        let (count,): (i64,) = bind_filter(sqlx::query_as(&sql), filter)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("count events"))?;
        Ok(count)
    }

    /// Claims the next events matching `filter` after `after`, in (user, seq) order, for replay
    /// (`partitions` is the deployment's partition count, for their outbox rows):
    /// each goes back to `accepted` and gets an outbox row of its own in the same transaction (a
    /// replayed event travels as a message of one), so the outbox relay takes over any the
    /// replaying process could not publish (broker down, the process died): a replay never strands
    /// an event.
    ///
    /// The page is keyed by (user, seq), not by id: ids are minted when a request is validated and
    /// the group commit may put a later single event ahead of an earlier batch, so one user's ids
    /// need not follow its seqs, while (user, seq) runs through each user's events in seq order
    /// (on the `UNIQUE (user_id, seq)` index, or on `events_failed_user_seq` for failed events).
    ///
    /// Nothing matching is passed over. The page is chosen first, up to `limit` candidates, and the
    /// cursor moves past all of them; then every candidate is locked and claimed if it still
    /// matches. A row another transaction holds (the outcome writer, an operator's session) is
    /// waited for, not skipped, up to a lock timeout of 2 s; one that changed meanwhile is
    /// checked again against the filter. A candidate not claimed thus no longer matches. Returns
    /// the claimed events in (user, seq) order, each with its message id, and the cursor of the
    /// next page, `None` once no event matches after `after`.
    ///
    /// # Errors
    /// The statements failed; nothing was claimed and `after` is still where the replay is. A
    /// row held past the lock timeout, or a deadlock, is [`Error::is_lock_conflict`]: try again.
    pub async fn claim_for_replay(
        &self,
        filter: &EventFilter,
        after: Option<&ReplayCursor>,
        limit: i64,
        partitions: u16,
    ) -> Result<ReplayPage, Error> {
        let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
        sqlx::query(BOUND_REPLAY_LOCK_WAIT)
            .execute(&mut *tx)
            .await
            .map_err(Error::query("bound a replay claim's lock wait"))?;
        // The candidates, read without locks, so their end is the cursor whatever the claim finds.
        let (cursor, limit_at) = match after {
            Some(_) => ("AND (e.user_id, e.seq) > ($8::text, $9::int8)", "$10"),
            None => ("", "$8"),
        };
        let sql = format!(
            "SELECT e.id, e.user_id, e.seq FROM events e JOIN producers p ON p.id = e.producer_id
             WHERE {} {cursor}
             ORDER BY e.user_id, e.seq LIMIT {limit_at}",
            filter_sql(filter)
        );
        let mut query = bind_filter(sqlx::query_as::<_, (EventId, String, i64)>(&sql), filter);
        if let Some(after) = after {
            query = query.bind(&after.user_id).bind(after.seq);
        }
        let candidates = query
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::query("choose events to replay"))?;
        let Some((_, user_id, seq)) = candidates.last() else {
            return Ok(ReplayPage {
                events: Vec::new(),
                next: None,
            });
        };
        let next = ReplayCursor {
            user_id: user_id.clone(),
            seq: *seq,
        };
        let ids: Vec<EventId> = candidates.iter().map(|(id, _, _)| *id).collect();
        // FOR UPDATE waits for a held row and then checks it against the filter again.
        let sql = format!(
            "WITH due AS (
                 SELECT e.id AS due_id FROM events e JOIN producers p ON p.id = e.producer_id
                 WHERE {} AND e.id = ANY($8)
                 FOR UPDATE OF e)
             UPDATE events SET status = $9, next_attempt_at = NULL,
                    replays = replays + 1, replayed_at = now()
             FROM due WHERE events.id = due.due_id
             RETURNING {}",
            filter_sql(filter),
            super::events::STORED_EVENT_COLUMNS
        );
        let mut rows = bind_filter(sqlx::query_as::<_, StoredEvent>(&sql), filter)
            .bind(&ids)
            .bind(EventStatus::Accepted)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::query("claim events for replay"))?;
        rows.sort_by(|a, b| (&a.user_id, a.seq).cmp(&(&b.user_id, b.seq)));
        // Message ids (UUID v7) in (user, seq) order too: the relay, should it take over, sends
        // rows in that order.
        let messages: Vec<OutboxMessage> = (0..rows.len())
            .map(|i| OutboxMessage {
                id: Uuid::now_v7(),
                // The row's partition is whose sweeper looks at it once confirmed.
                partition: crate::event::partition_of(&rows[i].user_id, partitions),
                events: vec![i],
            })
            .collect();
        super::outbox::insert_rows(&mut tx, &messages, |i| rows[i].id, 0).await?;
        tx.commit()
            .await
            .map_err(Error::query("commit a replay claim"))?;
        Ok(ReplayPage {
            events: messages.into_iter().map(|m| m.id).zip(rows).collect(),
            next: Some(next),
        })
    }
}

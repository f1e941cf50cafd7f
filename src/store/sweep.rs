//! The sweeper's queries (see `pipeline::sweep`): the messages in flight of one partition that are
//! old enough to have arrived, and the return of their events to the outbox when no message
//! carries them any more.
//!
//! Every message that may carry an undelivered event has an outbox row (see `outbox`); a confirmed
//! one is in a queue, in a worker's hands, or lost. The sweeper reads a partition's confirmed rows
//! older than its age, oldest first, through the partial index `outbox_in_flight`: a bounded read
//! of a small table, never a scan of `events`, and one partition's rows can never hide another's.
//! Whether a message may still be waiting behind a backlog is not something PostgreSQL knows; the
//! caller only sweeps partitions its worker has seen idle.
//!
//! Sweeping a row deletes it and, for each of its events: a final one (`delivered`, `failed`) needs
//! nothing; a stale one (enqueued, replayed, swept and due to retry all before the sweep's age) goes
//! back to `accepted` in a new, unconfirmed row dated back by the relay's grace, which the relay
//! publishes at its next pass; one still waiting (replayed or due to retry within the age: another
//! message carries it) keeps a confirmed row of its own, dated when it is due, so it is looked at
//! again then. So a row leaves the outbox only with nothing in flight left uncovered.

use super::outbox::{MessageLimits, insert_rows, plan_messages};
use super::status::EventStatus;
use super::{Error, Store};
use crate::event::{EventId, partition_of};
use uuid::Uuid;

/// A partition's stale messages (`$1` the partition, `$2` the age in ms, `$3` the limit): a range of
/// the partial index `outbox_in_flight` (partition, created_at), so one partition's backlog costs
/// another nothing and no sweep scans the outbox. Public for the test of its plan.
pub const STALE_MESSAGES_SQL: &str = "SELECT id FROM outbox
     WHERE partition = $1 AND confirmed_at IS NOT NULL
       AND created_at < now() - make_interval(secs => $2 / 1000.0)
     ORDER BY created_at LIMIT $3";

/// When an event was last due: enqueued, replayed, swept, or due to retry. A macro, so that the
/// statements using it are `const`s.
macro_rules! due {
    () => {
        "GREATEST(e.enqueued_at, e.next_attempt_at, e.replayed_at, e.swept_at)"
    };
}

/// A sweep's take (`$1` the rows): deletes those of them still there, confirmed and not locked,
/// answering the events they carried. Each row is found by its primary key: the ids go through
/// `ARRAY(SELECT unnest(..))`, which the planner sees only when the statement runs (see
/// `FORGET_MESSAGES_SQL`; a custom plan for the sweep's 1,000 ids read the whole outbox).
pub const TAKE_STALE_MESSAGES_SQL: &str = "WITH gone AS (
         DELETE FROM outbox WHERE id = ANY(ARRAY(
             SELECT id FROM outbox
             WHERE id = ANY(ARRAY(SELECT unnest($1::uuid[]))) AND confirmed_at IS NOT NULL
             FOR UPDATE SKIP LOCKED))
         RETURNING event_ids)
     SELECT DISTINCT unnest(event_ids) FROM gone";

/// A sweep's return of stale events to `accepted` (`$1` the age in ms, `$2` the events the taken
/// rows carried, `$3` `accepted`), answering them.
pub const SWEEP_STALE_EVENTS_SQL: &str = concat!(
    "UPDATE events e SET status = $3, next_attempt_at = NULL,
            sweeps = e.sweeps + 1, swept_at = now()
     WHERE e.id = ANY($2) AND e.status IN ('accepted', 'published')
       AND ",
    due!(),
    " < now() - make_interval(secs => $1 / 1000.0)
     RETURNING e.id, e.user_id, e.seq, octet_length(e.data::text)"
);

/// A sweep's rows for events another message still carries (`$1` the events the taken rows
/// carried, `$2` those swept, `$3` the partition): a confirmed row each, dated when it is due.
pub const KEEP_IN_FLIGHT_SQL: &str = concat!(
    "INSERT INTO outbox (id, event_ids, partition, created_at, confirmed_at)
     SELECT gen_random_uuid(), ARRAY[e.id], $3, ",
    due!(),
    ", now()
     FROM events e
     WHERE e.id = ANY($1) AND e.id <> ALL($2) AND e.status IN ('accepted', 'published')"
);

/// Confirmed rows written before rows had a partition (`$1` the limit), each with a user of its
/// events (none when none is stored any more).
pub const UNPLACED_MESSAGES_SQL: &str =
    "SELECT o.id, (SELECT e.user_id FROM events e WHERE e.id = ANY(o.event_ids) LIMIT 1)
     FROM outbox o WHERE o.partition IS NULL AND o.confirmed_at IS NOT NULL LIMIT $1";

/// Gives rows their partition (`$1` the rows, `$2` each one's partition).
pub const PLACE_MESSAGES_SQL: &str =
    "UPDATE outbox o SET partition = x.p FROM UNNEST($1::uuid[], $2::int2[]) AS x(id, p)
     WHERE o.id = x.id";

impl Store {
    /// Up to `limit` confirmed outbox rows of `partition` older than `age_ms`, oldest first: the
    /// messages of the partition that should have arrived by now.
    ///
    /// # Errors
    /// The query failed.
    pub async fn stale_messages(
        &self,
        partition: u16,
        age_ms: u64,
        limit: i64,
    ) -> Result<Vec<Uuid>, Error> {
        sqlx::query_scalar(STALE_MESSAGES_SQL)
            .bind(i16::try_from(partition).unwrap_or(i16::MAX))
            .bind(age_ms as f64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("find stale messages"))
    }

    /// Sweeps the rows `ids` of `partition` (one of `partitions`; see the module docs), in one
    /// transaction; returns how many events were sent again. Rows already gone (settled meanwhile)
    /// or locked are left.
    ///
    /// # Errors
    /// The transaction failed; nothing was swept.
    pub async fn sweep_messages(
        &self,
        (partition, partitions): (u16, u16),
        ids: &[Uuid],
        age_ms: u64,
        relay_grace_ms: u64,
        limits: MessageLimits,
    ) -> Result<usize, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
        let carried: Vec<EventId> = sqlx::query_scalar(TAKE_STALE_MESSAGES_SQL)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::query("take stale messages"))?;
        let mut stale: Vec<(EventId, String, i64, i32)> = sqlx::query_as(SWEEP_STALE_EVENTS_SQL)
            .bind(age_ms as f64)
            .bind(&carried)
            .bind(EventStatus::Accepted)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::query("sweep stale events"))?;
        // What another message still carries keeps a row of its own, looked at when it is due.
        let swept: Vec<EventId> = stale.iter().map(|row| row.0).collect();
        sqlx::query(KEEP_IN_FLIGHT_SQL)
            .bind(&carried)
            .bind(&swept)
            .bind(i16::try_from(partition).unwrap_or(i16::MAX))
            .execute(&mut *tx)
            .await
            .map_err(Error::query("keep waiting events in flight"))?;
        // Seq order within each user, so each message keeps its users' events in order.
        stale.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        let messages = plan_messages(
            stale.iter().enumerate().map(|(i, (_, user, _, size))| {
                (i, user.as_str(), usize::try_from(*size).unwrap_or(0) + 128)
            }),
            partitions,
            limits,
        );
        insert_rows(&mut tx, &messages, |i| stale[i].0, relay_grace_ms).await?;
        tx.commit().await.map_err(Error::query("commit a sweep"))?;
        Ok(stale.len())
    }

    /// Gives up to `limit` confirmed rows that have no partition yet (written before rows had
    /// one) the partition of their events, out of `partitions`; deletes those none of whose events
    /// is stored any more. Returns how many rows it looked at.
    ///
    /// # Errors
    /// A statement failed.
    pub async fn place_unplaced_messages(
        &self,
        partitions: u16,
        limit: i64,
    ) -> Result<usize, Error> {
        let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as(UNPLACED_MESSAGES_SQL)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("find unplaced messages"))?;
        let (mut placed, mut places, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (id, user) in &rows {
            match user {
                Some(user) => {
                    placed.push(*id);
                    places.push(i16::try_from(partition_of(user, partitions)).unwrap_or(i16::MAX));
                }
                None => gone.push(*id),
            }
        }
        sqlx::query(PLACE_MESSAGES_SQL)
            .bind(&placed)
            .bind(&places)
            .execute(&self.pool)
            .await
            .map_err(Error::query("place messages"))?;
        self.forget_messages(&gone).await?;
        Ok(rows.len())
    }
}

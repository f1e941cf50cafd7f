//! The outbox: one row per broker message that may still carry an undelivered event.
//!
//! A group commit splits its new events into messages, one per partition (more when a partition's
//! share exceeds the message bounds), and inserts one outbox row per message in the same
//! transaction as the events. The broker's confirm marks the row confirmed; the relay republishes
//! rows still unconfirmed after a grace period, so it finds exactly what was never confirmed. A
//! worker that has settled a message (acked it) deletes its row; a retry gets a row of its own when
//! its attempt is recorded. So the confirmed rows are the messages in flight, per partition: what
//! the sweeper reads to find events no message carries any more (`sweep`). Nothing between commit
//! and delivery writes the events table.

use super::status::EventStatus;
use super::{Error, Store, StoredEvent};
use crate::event::{EventId, partition_of};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Bounds on one broker message.
#[derive(Clone, Copy, Debug)]
pub struct MessageLimits {
    /// Most events.
    pub max_events: usize,
    /// Most bytes (one event always fits, whatever its size).
    pub max_bytes: usize,
}

/// One planned broker message: which events it carries, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The outbox row, and the message id (a confirm deletes the row by it).
    pub id: Uuid,
    /// The partition its events belong to.
    pub partition: u16,
    /// Indexes of its events in the caller's list, in order.
    pub events: Vec<usize>,
}

/// Splits events (given as `(index, user_id, size in bytes)`, in commit order) into messages: one
/// per partition, in the order partitions first appear, each split further where it would exceed
/// `limits`. Each message keeps the events' order, so each user's events stay in seq order.
pub fn plan_messages<'a>(
    events: impl IntoIterator<Item = (usize, &'a str, usize)>,
    partitions: u16,
    limits: MessageLimits,
) -> Vec<OutboxMessage> {
    let mut open: BTreeMap<u16, (usize, usize)> = BTreeMap::new(); // partition -> (message, bytes)
    let mut messages: Vec<OutboxMessage> = Vec::new();
    for (index, user_id, size) in events {
        let partition = partition_of(user_id, partitions);
        let fits = open.get(&partition).is_some_and(|&(m, bytes)| {
            messages[m].events.len() < limits.max_events && bytes + size <= limits.max_bytes
        });
        if fits {
            if let Some((m, bytes)) = open.get_mut(&partition) {
                messages[*m].events.push(index);
                *bytes += size;
            }
        } else {
            open.insert(partition, (messages.len(), size));
            messages.push(OutboxMessage {
                id: Uuid::now_v7(),
                partition,
                events: vec![index],
            });
        }
    }
    messages
}

/// New unconfirmed outbox rows (`$1` each event's row, `$2` the event, `$3` its partition, `$4`
/// how far back to date them, in ms), in the group commit's transaction (and a replay's or a
/// sweep's). `clock_timestamp()`, not `now()` (the transaction's start): the relay's grace counts
/// from the moment the message can be made, however long the commit took to get here.
pub const INSERT_OUTBOX_ROWS_SQL: &str = "INSERT INTO outbox (id, event_ids, partition, created_at)
     SELECT r, array_agg(e ORDER BY o), min(p), clock_timestamp() - make_interval(secs => $4 / 1000.0)
     FROM UNNEST($1::uuid[], $2::uuid[], $3::int2[]) WITH ORDINALITY AS x(r, e, p, o)
     GROUP BY r";

/// Inserts the (unconfirmed) outbox rows of `messages` (`ids` maps an event index to its event
/// id), dated `backdate_ms` in the past: 0 for a message its writer publishes now, the relay's grace
/// for one the relay is to publish at its next pass (the sweeper's).
pub(super) async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    messages: &[OutboxMessage],
    ids: impl Fn(usize) -> EventId,
    backdate_ms: u64,
) -> Result<(), Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let (rows, events, partitions) = outbox_columns(messages, ids);
    sqlx::query(INSERT_OUTBOX_ROWS_SQL)
        .bind(&rows)
        .bind(&events)
        .bind(&partitions)
        .bind(backdate_ms as f64)
        .execute(&mut **tx)
        .await
        .map_err(Error::query("insert outbox rows"))?;
    Ok(())
}

/// The columns of `messages`' outbox rows, a row per event (`ids` maps an event index to its
/// event id): the message (row) id, the event, the partition. What [`INSERT_OUTBOX_ROWS_SQL`] and
/// the group commit's statement aggregate back into one row per message.
pub fn outbox_columns(
    messages: &[OutboxMessage],
    ids: impl Fn(usize) -> EventId,
) -> (Vec<Uuid>, Vec<EventId>, Vec<i16>) {
    let n = messages.iter().map(|m| m.events.len()).sum();
    let (mut rows, mut events, mut partitions) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for message in messages {
        for &i in &message.events {
            rows.push(message.id);
            events.push(ids(i));
            partitions.push(i16::try_from(message.partition).unwrap_or(i16::MAX));
        }
    }
    (rows, events, partitions)
}

/// An outbox row the relay claimed: its message, rebuilt from the events still undelivered.
#[derive(Debug)]
pub struct ClaimedMessage {
    /// The outbox row (and message id).
    pub id: Uuid,
    /// Its events still `accepted`, in their original order; empty when all were delivered.
    pub events: Vec<StoredEvent>,
}

/// Most unconfirmed rows [`Store::outbox_depth`] counts: past it, the count is a floor, and
/// reading it every relay pass on every api node still costs a bounded index scan.
pub const OUTBOX_DEPTH_CAP: i64 = 100_000;

/// The relay's claim (`$1` the grace in ms, `$2` the limit): the oldest unconfirmed rows, through
/// the partial index `outbox_unconfirmed`, so the confirmed rows of messages in flight (the
/// sweeper's) are never read, however many there are. Public for the test of its plan.
pub const CLAIM_UNCONFIRMED_SQL: &str = "WITH due AS (
         SELECT id FROM outbox
         WHERE confirmed_at IS NULL
           AND created_at < now() - make_interval(secs => $1 / 1000.0)
           AND (relayed_at IS NULL OR relayed_at < now() - make_interval(secs => $1 / 1000.0))
         ORDER BY created_at
         LIMIT $2
         FOR UPDATE SKIP LOCKED)
     UPDATE outbox o SET relayed_at = now() FROM due WHERE o.id = due.id
     RETURNING o.id, o.event_ids, (extract(epoch FROM o.created_at) * 1000000)::int8";

/// The outbox depth (`$1` the cap): unconfirmed rows only, through `outbox_unconfirmed`, at most
/// the cap. Public for the test of its plan.
pub const OUTBOX_DEPTH_SQL: &str = "SELECT count(*), COALESCE(sum(cardinality(event_ids)), 0)::int8
     FROM (SELECT event_ids FROM outbox WHERE confirmed_at IS NULL LIMIT $1) AS unconfirmed";

/// The confirm recorder (`$1` the confirmed messages): marks their rows confirmed. It never waits
/// for a row: the worker's settle may be deleting the same rows at the same moment (a message
/// delivered before its confirm was recorded), and the two statements, each locking its rows in
/// the order its plan visits them, deadlocked (PostgreSQL broke each after `deadlock_timeout`, a
/// second of stall for both; seen in the soak). A row another statement holds is being deleted
/// (settled: its confirm no longer matters) or claimed by the relay (which republishes it and
/// records that confirm).
pub const CONFIRM_MESSAGES_SQL: &str = "UPDATE outbox SET confirmed_at = now()
     WHERE id IN (SELECT id FROM outbox WHERE id = ANY($1) AND confirmed_at IS NULL
                  FOR UPDATE SKIP LOCKED)";

/// A worker's settle (`$1` the settled messages): deletes their rows, each found by its primary
/// key. The ids go through `ARRAY(SELECT unnest(..))`, an array the planner sees only when the
/// statement runs, so it plans for a few ids whatever the batch: given the batch itself, a custom
/// plan for 1,000 ids read the whole outbox once it held 200,000 rows in flight (issue 23).
pub const FORGET_MESSAGES_SQL: &str =
    "DELETE FROM outbox WHERE id = ANY(ARRAY(SELECT unnest($1::uuid[])))";

/// The relay's read of the events of the rows it claimed (`$1` their ids, `$2` `accepted`): those
/// still waiting for a publish.
pub const UNCONFIRMED_EVENTS_SQL: &str = concat!(
    "SELECT ",
    stored_event_columns!(),
    " FROM events WHERE id = ANY($1) AND status = $2"
);

impl Store {
    /// Marks the outbox rows of messages the broker confirmed: the relay leaves them alone from
    /// now on, and they stay until a worker has settled the message (or the sweeper finds nothing
    /// in flight in them). A row already gone (its message settled first) is simply not there.
    ///
    /// # Errors
    /// The update failed (the rows stay unconfirmed, and the relay republishes them: harmless
    /// duplicates).
    pub async fn confirm_messages(&self, ids: &[Uuid]) -> Result<u64, Error> {
        let done = sqlx::query(CONFIRM_MESSAGES_SQL)
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(Error::query("mark confirmed outbox rows"))?;
        Ok(done.rows_affected())
    }

    /// Deletes the outbox rows of messages a worker settled: nothing they carried is in flight any
    /// more (a retry has a row of its own).
    ///
    /// # Errors
    /// The delete failed (the rows stay, and the sweeper deletes them once it sees their events
    /// final).
    pub async fn forget_messages(&self, ids: &[Uuid]) -> Result<u64, Error> {
        let done = sqlx::query(FORGET_MESSAGES_SQL)
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(Error::query("delete settled outbox rows"))?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` outbox rows older than `grace_ms` (and not claimed in the last
    /// `grace_ms`), oldest first, stamping them so relays on other nodes skip them meanwhile.
    /// Returns each with its events that are still `accepted` (a delivered or retrying event is
    /// not sent again).
    ///
    /// # Errors
    /// The query failed.
    pub async fn claim_unconfirmed(
        &self,
        grace_ms: u64,
        limit: i64,
    ) -> Result<Vec<ClaimedMessage>, Error> {
        let mut claimed: Vec<(Uuid, Vec<EventId>, i64)> = sqlx::query_as(CLAIM_UNCONFIRMED_SQL)
            .bind(grace_ms as f64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("claim unconfirmed outbox rows"))?;
        // Oldest first: a user's older message goes before its newer one.
        claimed.sort_by_key(|(id, _, created)| (*created, *id));
        let all: Vec<EventId> = claimed
            .iter()
            .flat_map(|(_, ids, _)| ids.iter().copied())
            .collect();
        let rows: Vec<StoredEvent> = sqlx::query_as(UNCONFIRMED_EVENTS_SQL)
            .bind(&all)
            .bind(EventStatus::Accepted)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("read unconfirmed events"))?;
        let mut by_id: std::collections::HashMap<EventId, StoredEvent> =
            rows.into_iter().map(|row| (row.id, row)).collect();
        Ok(claimed
            .into_iter()
            .map(|(id, ids, _)| ClaimedMessage {
                id,
                events: ids.iter().filter_map(|e| by_id.remove(e)).collect(),
            })
            .collect())
    }

    /// How many messages wait for a confirm, and the events they carry, counted up to
    /// [`OUTBOX_DEPTH_CAP`] messages (a floor beyond it).
    ///
    /// # Errors
    /// The query failed.
    pub async fn outbox_depth(&self) -> Result<(i64, i64), Error> {
        sqlx::query_as(OUTBOX_DEPTH_SQL)
            .bind(OUTBOX_DEPTH_CAP)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("read the outbox depth"))
    }

    /// Outbox rows carrying an event that is not final (`accepted` or `published`): a message
    /// in flight, unconfirmed or confirmed. A partition count may change only when there is none.
    ///
    /// # Errors
    /// The query failed.
    pub async fn messages_in_flight(&self) -> Result<i64, Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM outbox o
             WHERE EXISTS (SELECT 1 FROM events e
                           WHERE e.id = ANY(o.event_ids) AND e.status IN ('accepted', 'published'))",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Error::query("count messages in flight"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDE: MessageLimits = MessageLimits {
        max_events: 1_000,
        max_bytes: 1 << 20,
    };

    #[test]
    fn one_message_per_partition_in_order() {
        let users = ["1", "2", "1", "3", "2", "1"];
        let plan = plan_messages(users.iter().enumerate().map(|(i, u)| (i, *u, 10)), 4, WIDE);
        let mut seen: Vec<usize> = plan.iter().flat_map(|m| m.events.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4, 5]);
        for message in &plan {
            assert!(message.events.windows(2).all(|w| w[0] < w[1]));
            assert!(
                message
                    .events
                    .iter()
                    .all(|&i| partition_of(users[i], 4) == message.partition)
            );
        }
        let partitions: std::collections::HashSet<u16> = plan.iter().map(|m| m.partition).collect();
        assert_eq!(partitions.len(), plan.len(), "one message per partition");
    }

    #[test]
    fn messages_split_at_their_bounds() {
        let limits = MessageLimits {
            max_events: 3,
            max_bytes: 1 << 20,
        };
        let plan = plan_messages((0..7).map(|i| (i, "u", 10)), 8, limits);
        let sizes: Vec<usize> = plan.iter().map(|m| m.events.len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
        let limits = MessageLimits {
            max_events: 100,
            max_bytes: 25,
        };
        let plan = plan_messages((0..4).map(|i| (i, "u", 10)), 8, limits);
        let sizes: Vec<usize> = plan.iter().map(|m| m.events.len()).collect();
        assert_eq!(sizes, [2, 2]);
        // One event larger than the byte bound still goes, alone.
        let plan = plan_messages([(0, "u", 100), (1, "u", 1)], 8, limits);
        assert_eq!(plan.len(), 2);
    }
}

//! The group commit's statement side: one statement, so one round trip and its own transaction,
//! inserts a batch of events, numbering them per user, claims their idempotency keys, and writes
//! the outbox rows of the broker messages that will carry them; repeated keys are answered with
//! their original (the batching itself is `pipeline::batch`).

use super::outbox::{MessageLimits, OutboxMessage, outbox_columns, plan_messages};
use super::{Error, EventStatus, Store};
use crate::event::{Envelope, EventId, EventName, UserId, envelope_size, now_unix_ms};
use crate::traces::TraceParent;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// An event to insert, validated by the API.
#[derive(Debug)]
pub struct NewEvent {
    /// Chosen by Herald (UUID v7).
    pub id: EventId,
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
    /// The W3C `traceparent` its request continues (see [`crate::traces`]): kept on the row and
    /// carried in its broker message, so the worker and the socket continue the trace.
    pub traceparent: Option<TraceParent>,
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
            id: EventId::mint(),
            producer_id,
            user_id,
            event,
            data,
            idempotency_key,
            enqueued_at_ms: now_unix_ms(),
            traceparent: None,
        }
    }

    /// The event, continuing the trace of `traceparent`.
    pub fn traced(self, traceparent: Option<TraceParent>) -> Self {
        Self {
            traceparent,
            ..self
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
            trace: self.traceparent,
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
        id: EventId,
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

/// The group commit, one statement (autocommit: its own transaction, one round trip). `$1`-`$7`
/// the batch's events (id, producer, user, name, data, idempotency key, enqueue time in Unix ms;
/// a key repeated within the batch is given once), `$8`-`$10` the outbox rows planned for them
/// (message, event, partition: a row per event). In order:
///
/// - `claimed`: each key not taken yet is claimed, sorted, so concurrent commits take the index
///   locks in one order (a concurrent commit of the same key waits on the unique index, then sees
///   it taken);
/// - `fresh`: the events that go in (no key, or a key claimed here), each with its rank among its
///   user's fresh events and their count;
/// - `bumped`: each user's counter, raised once by that count, in user order (no deadlock between
///   commits sharing users); an event's seq is then `last_seq - count + rank`, so one user's events
///   get consecutive seqs in batch order;
/// - `inserted`: the rows; `outboxed`: one outbox row per message, of its fresh events only.
///
/// Answers each inserted event's id and seq; an event missing from the answer had its key taken.
pub const COMMIT_EVENTS_SQL: &str = "WITH batch AS (
         SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::int8[], $11::text[])
             WITH ORDINALITY AS x(id, p, u, e, d, k, t, tp, o)
     ), claimed AS (
         INSERT INTO idempotency_keys (producer_id, key, event_id)
         SELECT p, k, id FROM batch WHERE k IS NOT NULL ORDER BY p, k
         ON CONFLICT DO NOTHING RETURNING event_id
     ), fresh AS (
         SELECT batch.*, row_number() OVER (PARTITION BY u ORDER BY o) AS r,
                count(*) OVER (PARTITION BY u) AS c
         FROM batch WHERE k IS NULL OR id IN (SELECT event_id FROM claimed)
     ), bumped AS (
         INSERT INTO user_seqs AS s (user_id, last_seq)
         SELECT u, count(*) FROM fresh GROUP BY u ORDER BY u
         ON CONFLICT (user_id) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
         RETURNING user_id, last_seq
     ), inserted AS (
         INSERT INTO events (id, producer_id, user_id, seq, event, data, idempotency_key, enqueued_at,
                             traceparent)
         SELECT f.id, f.p, f.u, b.last_seq - f.c + f.r, f.e, f.d::jsonb, f.k, to_timestamp(f.t / 1000.0),
                f.tp
         FROM fresh f JOIN bumped b ON b.user_id = f.u
         RETURNING id, seq
     ), outboxed AS (
         INSERT INTO outbox (id, event_ids, partition, created_at)
         SELECT m, array_agg(e ORDER BY o), min(p), clock_timestamp()
         FROM UNNEST($8::uuid[], $9::uuid[], $10::int2[]) WITH ORDINALITY AS y(m, e, p, o)
         WHERE e IN (SELECT id FROM inserted)
         GROUP BY m
     )
     SELECT id, seq FROM inserted";

impl Store {
    /// Inserts a batch of events in one statement ([`COMMIT_EVENTS_SQL`]), numbers them per user,
    /// and plans the broker messages that carry the new ones (one per partition, split at
    /// `limits`), writing their outbox rows in the same statement. Events of one user get
    /// consecutive seqs in input order. An event whose key is taken is answered with the original,
    /// read after the commit (a key and its event commit together, so the original is there).
    ///
    /// # Errors
    /// The statement failed (nothing of the batch is stored), or, after it committed, a taken key's
    /// original could not be read (retried first; the batch is stored, and its messages are left
    /// to the outbox relay).
    pub async fn insert_events(
        &self,
        events: &[NewEvent],
        partitions: u16,
        limits: MessageLimits,
    ) -> Result<Committed, Error> {
        let repeats = repeats_of(events);
        let given = || {
            events
                .iter()
                .enumerate()
                .filter(|(i, _)| repeats[*i].is_none())
        };
        let planned = plan_messages(
            given().map(|(i, e)| {
                let size = envelope_size(&e.data, e.user_id.as_str(), e.event.as_str());
                (i, e.user_id.as_str(), size)
            }),
            partitions,
            limits,
        );
        let columns = Columns::of(given().map(|(_, e)| e), given().count());
        let (rows, row_events, row_partitions) = outbox_columns(&planned, |i| events[i].id);
        let stored: Vec<(EventId, i64)> = sqlx::query_as(COMMIT_EVENTS_SQL)
            .bind(&columns.ids)
            .bind(&columns.producers)
            .bind(&columns.user_ids)
            .bind(&columns.names)
            .bind(&columns.datas)
            .bind(&columns.keys)
            .bind(&columns.ats)
            .bind(&rows)
            .bind(&row_events)
            .bind(&row_partitions)
            .bind(&columns.traces)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("commit events"))?;
        let seqs: HashMap<EventId, i64> = stored.into_iter().collect();
        // The batch is committed: a failure from here on would answer its producers an error for
        // events that are stored, so the read is retried before it gives up.
        let originals = crate::backoff::with_retries("read idempotent originals", 3, || {
            self.originals_of_taken(events, &repeats, &seqs)
        })
        .await?;

        // Each event's answer, in order: a repeat's first occurrence comes before it.
        let mut outcomes: Vec<InsertOutcome> = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let outcome = match (repeats[i], seqs.get(&e.id)) {
                (None, Some(&seq)) => InsertOutcome::Inserted { seq },
                (None, None) => original_of(e, &originals)?,
                (Some(first), _) => match outcomes.get(first) {
                    Some(InsertOutcome::Inserted { seq }) => InsertOutcome::Duplicate {
                        id: events[first].id,
                        seq: *seq,
                        status: EventStatus::Accepted,
                    },
                    Some(duplicate) => duplicate.clone(),
                    None => unreachable_repeat(i, first)?,
                },
            };
            outcomes.push(outcome);
        }
        // The messages as stored: of their fresh events only (the statement filtered alike).
        let messages = planned
            .into_iter()
            .filter_map(|mut message| {
                message.events.retain(|&i| seqs.contains_key(&events[i].id));
                (!message.events.is_empty()).then_some(message)
            })
            .collect();
        Ok(Committed { outcomes, messages })
    }

    /// The originals of the batch's keys that were taken (given, not repeats, and not stored),
    /// keyed by (producer, key); none read when every key was claimed.
    async fn originals_of_taken(
        &self,
        events: &[NewEvent],
        repeats: &[Option<usize>],
        seqs: &HashMap<EventId, i64>,
    ) -> Result<HashMap<(i64, String), InsertOutcome>, Error> {
        let (producers, keys): (Vec<i64>, Vec<&str>) = events
            .iter()
            .zip(repeats)
            .filter(|(e, repeat)| repeat.is_none() && !seqs.contains_key(&e.id))
            .filter_map(|(e, _)| Some((e.producer_id, e.idempotency_key.as_deref()?)))
            .unzip();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        // A key outlives its event by `store.idempotency_ttl_secs`: an event gone is a pruned one
        // (a key and its event commit together), answered with the seq its key recorded.
        let originals: Vec<(i64, String, EventId, i64, EventStatus)> =
            sqlx::query_as(IDEMPOTENT_ORIGINALS_SQL)
                .bind(&producers)
                .bind(&keys)
                .bind(EventStatus::Pruned)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::query("read idempotent originals"))?;
        Ok(originals
            .into_iter()
            .map(|(producer, key, id, seq, status)| {
                (
                    (producer, key),
                    InsertOutcome::Duplicate { id, seq, status },
                )
            })
            .collect())
    }
}

/// The originals of keys already taken (`$1` the producers, `$2` the keys, `$3` the status of an
/// event retention removed): each key, its event, and the event's seq and status.
pub const IDEMPOTENT_ORIGINALS_SQL: &str =
    "SELECT k.producer_id, k.key, k.event_id, COALESCE(e.seq, k.seq, 0), COALESCE(e.status, $3)
     FROM UNNEST($1::int8[], $2::text[]) AS x(p, k)
     JOIN idempotency_keys k ON k.producer_id = x.p AND k.key = x.k
     LEFT JOIN events e ON e.id = k.event_id";

/// For each event, the index of the batch's earlier event with the same (producer, key), if any:
/// a repeat is not given to the statement, and is answered like its first occurrence.
fn repeats_of(events: &[NewEvent]) -> Vec<Option<usize>> {
    let mut first: HashMap<(i64, &str), usize> = HashMap::new();
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let key = e.idempotency_key.as_deref()?;
            match first.get(&(e.producer_id, key)) {
                Some(&j) => Some(j),
                None => {
                    first.insert((e.producer_id, key), i);
                    None
                }
            }
        })
        .collect()
}

/// The answer to an event whose key was taken: its original. A key that vanished between the
/// commit and the read (expired that instant) is an error, so the producer retries rather than
/// being told of an event that may not exist.
fn original_of(
    event: &NewEvent,
    originals: &HashMap<(i64, String), InsertOutcome>,
) -> Result<InsertOutcome, Error> {
    let key = event.idempotency_key.clone().unwrap_or_default();
    originals
        .get(&(event.producer_id, key))
        .cloned()
        .ok_or_else(|| Error::query("read idempotent originals")(sqlx::Error::RowNotFound))
}

/// A batch whose repeat points at itself or ahead: [`repeats_of`] never makes one, so this says
/// so as an error rather than a panic.
fn unreachable_repeat(at: usize, first: usize) -> Result<InsertOutcome, Error> {
    Err(Error::query("answer a repeated idempotency key")(
        sqlx::Error::Protocol(format!("event {at} repeats event {first}, not before it")),
    ))
}

/// The columns of the events given to [`COMMIT_EVENTS_SQL`], one array each.
struct Columns<'a> {
    ids: Vec<EventId>,
    producers: Vec<i64>,
    user_ids: Vec<&'a str>,
    names: Vec<&'a str>,
    datas: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    ats: Vec<i64>,
    traces: Vec<Option<String>>,
}

impl<'a> Columns<'a> {
    /// The columns of `events`, `n` of them.
    fn of(events: impl Iterator<Item = &'a NewEvent>, n: usize) -> Self {
        let mut columns = Self {
            ids: Vec::with_capacity(n),
            producers: Vec::with_capacity(n),
            user_ids: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            datas: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            ats: Vec::with_capacity(n),
            traces: Vec::with_capacity(n),
        };
        for e in events {
            columns.ids.push(e.id);
            columns.producers.push(e.producer_id);
            columns.user_ids.push(e.user_id.as_str());
            columns.names.push(e.event.as_str());
            columns.datas.push(e.data.get());
            columns.keys.push(e.idempotency_key.as_deref());
            columns.ats.push(e.enqueued_at_ms);
            columns.traces.push(e.traceparent.map(|tp| tp.to_string()));
        }
        columns
    }
}

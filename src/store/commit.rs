//! The group commit's statement side: one transaction inserts a batch of events, numbering them
//! per user and answering repeated idempotency keys with their original, and writes the outbox
//! rows of the broker messages that will carry them (the batching itself is `pipeline::batch`).

use super::outbox::{self, MessageLimits, OutboxMessage, plan_messages};
use super::{Error, EventStatus, Store};
use crate::event::{Envelope, EventId, EventName, UserId, envelope_size, now_unix_ms};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};

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
    ids: Vec<EventId>,
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
    let ids: Vec<EventId> = first.values().map(|&i| events[i].id).collect();
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
        let originals: Vec<(i64, String, EventId, i64, EventStatus)> =
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

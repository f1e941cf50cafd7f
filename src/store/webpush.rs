//! Web Push's tables: users' browser subscriptions, the pushes waiting for their fallback delay
//! (`webpush_outbox`), the receipts socket nodes record, and the attempt log of every send.

use super::events::StoredEvent;
use super::{Error, Store};
use crate::event::EventId;
use uuid::Uuid;

/// A browser's push subscription as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Subscription {
    /// Its id (what the client deletes it by).
    pub id: Uuid,
    /// The push service's URL for the browser.
    pub endpoint: String,
    /// The browser's P-256 public key, uncompressed (65 bytes).
    pub p256dh: Vec<u8>,
    /// The browser's auth secret (16 bytes).
    pub auth: Vec<u8>,
    /// When it was registered (last registered again), Unix ms.
    pub created_at_ms: i64,
}

/// One push claimed for sending: the event, the subscription, and what its fallback is checked
/// against.
#[derive(Debug)]
pub struct DuePush {
    /// The event, as a socket would push it.
    pub event: StoredEvent,
    /// The subscription it goes to.
    pub subscription: Subscription,
    /// Sends tried before this one.
    pub tries: i32,
    /// A push service refused the whole event as too large: send the summary.
    pub summarize: bool,
    /// A socket was sent the event (the user's receipt covers its seq).
    pub received: bool,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    #[sqlx(flatten)]
    event: StoredEvent,
    subscription_id: Uuid,
    endpoint: String,
    p256dh: Vec<u8>,
    auth: Vec<u8>,
    subscribed_at_ms: i64,
    tries: i32,
    summarize: bool,
    received: bool,
}

/// How a push ended, for its outbox row and the attempt log.
#[derive(Clone, Debug)]
pub enum PushOutcome {
    /// A client received the event before its push was due: nothing sent, nothing logged.
    Received,
    /// The push service accepted it (HTTP 201).
    Sent {
        /// Its status.
        status: u16,
    },
    /// The subscription is gone (404, 410) or can never be sent to: removed with its pushes.
    Gone {
        /// The status, if the push service answered.
        status: Option<u16>,
        /// Why.
        error: String,
    },
    /// Failed; tried again at `retry_at_ms`.
    Retrying {
        /// The status, if the push service answered.
        status: Option<u16>,
        /// Why.
        error: String,
        /// When the next try is due, Unix ms.
        retry_at_ms: i64,
        /// Send the summary next time (the push service said 413).
        summarize: bool,
    },
    /// Failed for good (a 4xx that another try would not change, or the retry budget spent).
    Failed {
        /// The status, if the push service answered.
        status: Option<u16>,
        /// Why.
        error: String,
    },
    /// Not tried now (its push service has its share of requests in flight): due again at
    /// `until_ms`, no try counted, nothing logged.
    Deferred {
        /// When it is due again, Unix ms.
        until_ms: i64,
    },
}

impl PushOutcome {
    /// The outcome's metric label; none for a push put off.
    pub fn label(&self) -> Option<&'static str> {
        Some(match self {
            Self::Received => "received",
            Self::Sent { .. } => "sent",
            Self::Gone { .. } => "gone",
            Self::Retrying { .. } => "retrying",
            Self::Failed { .. } => "failed",
            Self::Deferred { .. } => return None,
        })
    }
}

/// Registers a subscription (again: the same endpoint of the same user takes the new keys and
/// counts as newest), then removes the user's oldest beyond `$6`.
const SUBSCRIBE_SQL: &str = "WITH upserted AS (
        INSERT INTO webpush_subscriptions AS s (id, user_id, endpoint, p256dh, auth)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (user_id, endpoint) DO UPDATE
            SET p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth, created_at = now()
        RETURNING s.id, s.created_at),
    kept AS (
        SELECT id FROM webpush_subscriptions
        WHERE user_id = $2 AND id <> (SELECT id FROM upserted)
        ORDER BY created_at DESC, id DESC
        LIMIT $6 - 1),
    evicted AS (
        DELETE FROM webpush_subscriptions
        WHERE user_id = $2 AND id <> (SELECT id FROM upserted) AND id NOT IN (SELECT id FROM kept)
        RETURNING id)
    SELECT id, $3 AS endpoint, $4 AS p256dh, $5 AS auth,
           (extract(epoch FROM created_at) * 1000)::int8 AS created_at_ms
    FROM upserted";

/// The pushes of the events `$1` (their fallback due at `$2`, Unix ms), one per subscription the
/// event's user has now. An event whose user has none makes no row.
const SCHEDULE_SQL: &str = "INSERT INTO webpush_outbox (event_id, subscription_id, due_at)
    SELECT x.id, s.id, to_timestamp(x.due / 1000.0)
    FROM UNNEST($1::uuid[], $2::int8[]) AS x(id, due)
    JOIN events e ON e.id = x.id
    JOIN webpush_subscriptions s ON s.user_id = e.user_id
    ON CONFLICT DO NOTHING";

/// Claims up to `$1` due pushes by moving them `$2` ms ahead (past their request's bound: a
/// sender that dies leaves them due again), with their events and subscriptions. Several nodes
/// claim side by side (SKIP LOCKED). A due push whose event is gone (retention pruned it while it
/// waited: the outbox has no foreign key to `events`, so pruning does not pay a check per row) is
/// deleted unsent.
const CLAIM_SQL: &str = concat!(
    "WITH due AS (
        SELECT o.event_id, o.subscription_id,
               EXISTS (SELECT 1 FROM events e WHERE e.id = o.event_id) AS kept
        FROM webpush_outbox o
        WHERE o.due_at <= now() ORDER BY o.due_at LIMIT $1
        FOR UPDATE OF o SKIP LOCKED),
    orphaned AS (
        DELETE FROM webpush_outbox o USING due
        WHERE NOT due.kept AND o.event_id = due.event_id
          AND o.subscription_id = due.subscription_id),
    claimed AS (
        UPDATE webpush_outbox o SET due_at = now() + make_interval(secs => $2 / 1000.0)
        FROM due WHERE due.kept AND o.event_id = due.event_id
          AND o.subscription_id = due.subscription_id
        RETURNING o.event_id, o.subscription_id, o.tries, o.summarize)
    SELECT ev.*, c.subscription_id, s.endpoint, s.p256dh, s.auth,
       (extract(epoch FROM s.created_at) * 1000)::int8 AS subscribed_at_ms,
       c.tries, c.summarize,
       ev.seq <= coalesce((SELECT r.seq FROM webpush_receipts r
                           WHERE r.user_id = ev.user_id), 0) AS received
    FROM claimed c
    CROSS JOIN LATERAL (SELECT ",
    stored_event_columns!(),
    " FROM events WHERE events.id = c.event_id) ev
    JOIN webpush_subscriptions s ON s.id = c.subscription_id"
);

/// Ends one push, or puts it off: `$3` says how. The attempt row is written unless the event was
/// received or the push put off, or is gone (pruned while its push was out).
const FINISH_SQL: &str = "WITH ended AS (
        DELETE FROM webpush_outbox
        WHERE event_id = $1 AND subscription_id = $2 AND $3 IN ('sent', 'failed', 'received')),
    gone AS (
        DELETE FROM webpush_subscriptions WHERE id = $2 AND $3 = 'gone'),
    retried AS (
        UPDATE webpush_outbox
        SET tries = tries + CASE WHEN $3 = 'retrying' THEN 1 ELSE 0 END,
            due_at = to_timestamp($7 / 1000.0), summarize = summarize OR $8
        WHERE event_id = $1 AND subscription_id = $2 AND $3 IN ('retrying', 'deferred'))
    INSERT INTO webpush_attempts (event_id, origin, status, outcome, error)
    SELECT $1, $4, $5, $3, $6 WHERE $3 NOT IN ('received', 'deferred')
        AND EXISTS (SELECT 1 FROM events WHERE id = $1)";

/// Raises the users' receipts (`$1`, `$2`), never down.
const RECEIPTS_SQL: &str = "INSERT INTO webpush_receipts AS r (user_id, seq)
    SELECT * FROM UNNEST($1::text[], $2::int8[])
    ON CONFLICT (user_id) DO UPDATE SET seq = EXCLUDED.seq WHERE r.seq < EXCLUDED.seq";

/// One Web Push send as the attempt log keeps it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PushAttempt {
    /// When it ended, Unix ms.
    pub at_ms: i64,
    /// The push service's origin.
    pub origin: String,
    /// Its HTTP status, if it answered.
    pub status: Option<i32>,
    /// `sent`, `retrying`, `failed` or `gone`.
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
}

impl Store {
    /// Registers `user`'s subscription (or its new keys), keeping at most `cap` per user (the
    /// oldest go).
    ///
    /// # Errors
    /// The statement failed.
    pub async fn subscribe_webpush(
        &self,
        user: &str,
        endpoint: &str,
        p256dh: &[u8],
        auth: &[u8],
        cap: u32,
    ) -> Result<Subscription, Error> {
        sqlx::query_as(SUBSCRIBE_SQL)
            .bind(Uuid::now_v7())
            .bind(user)
            .bind(endpoint)
            .bind(p256dh)
            .bind(auth)
            .bind(i64::from(cap))
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("register a push subscription"))
    }

    /// `user`'s subscriptions, newest first.
    ///
    /// # Errors
    /// The query failed.
    pub async fn webpush_subscriptions(&self, user: &str) -> Result<Vec<Subscription>, Error> {
        sqlx::query_as(
            "SELECT id, endpoint, p256dh, auth,
                    (extract(epoch FROM created_at) * 1000)::int8 AS created_at_ms
             FROM webpush_subscriptions WHERE user_id = $1
             ORDER BY created_at DESC, id DESC",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("list push subscriptions"))
    }

    /// Removes `user`'s subscription `id` and its waiting pushes; false when the user has none by
    /// that id.
    ///
    /// # Errors
    /// The statement failed.
    pub async fn unsubscribe_webpush(&self, user: &str, id: Uuid) -> Result<bool, Error> {
        let deleted =
            sqlx::query("DELETE FROM webpush_subscriptions WHERE id = $1 AND user_id = $2")
                .bind(id)
                .bind(user)
                .execute(&self.pool)
                .await
                .map_err(Error::query("remove a push subscription"))?;
        Ok(deleted.rows_affected() > 0)
    }

    /// Schedules the pushes of delivered events whose name falls back: `(event, due at Unix ms)`.
    ///
    /// # Errors
    /// The statement failed.
    pub async fn schedule_webpush(&self, due: &[(EventId, i64)]) -> Result<u64, Error> {
        let (ids, at): (Vec<EventId>, Vec<i64>) = due.iter().copied().unzip();
        let done = sqlx::query(SCHEDULE_SQL)
            .bind(&ids)
            .bind(&at)
            .execute(&self.pool)
            .await
            .map_err(Error::query("schedule web pushes"))?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` due pushes for `hold_ms` (see [`CLAIM_SQL`]).
    ///
    /// # Errors
    /// The statement failed.
    pub async fn claim_webpush(&self, limit: i64, hold_ms: i64) -> Result<Vec<DuePush>, Error> {
        let rows: Vec<DueRow> = sqlx::query_as(CLAIM_SQL)
            .bind(limit)
            .bind(hold_ms as f64)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::query("claim due web pushes"))?;
        Ok(rows
            .into_iter()
            .map(|row| DuePush {
                event: row.event,
                subscription: Subscription {
                    id: row.subscription_id,
                    endpoint: row.endpoint,
                    p256dh: row.p256dh,
                    auth: row.auth,
                    created_at_ms: row.subscribed_at_ms,
                },
                tries: row.tries,
                summarize: row.summarize,
                received: row.received,
            })
            .collect())
    }

    /// Records how a push ended (see [`PushOutcome`]).
    ///
    /// # Errors
    /// The statement failed.
    pub async fn finish_webpush(
        &self,
        event: EventId,
        subscription: Uuid,
        origin: &str,
        outcome: &PushOutcome,
    ) -> Result<(), Error> {
        // The statement's kinds are the metric labels, and `deferred` for a push put off.
        let kind = outcome.label().unwrap_or("deferred");
        let (status, error, retry_at, summarize) = match outcome {
            PushOutcome::Received => (None, None, None, false),
            PushOutcome::Sent { status } => (Some(*status), None, None, false),
            PushOutcome::Gone { status, error } | PushOutcome::Failed { status, error } => {
                (*status, Some(error), None, false)
            }
            PushOutcome::Retrying {
                status,
                error,
                retry_at_ms,
                summarize,
            } => (*status, Some(error), Some(*retry_at_ms), *summarize),
            PushOutcome::Deferred { until_ms } => (None, None, Some(*until_ms), false),
        };
        sqlx::query(FINISH_SQL)
            .bind(event)
            .bind(subscription)
            .bind(kind)
            .bind(origin)
            .bind(status.map(i32::from))
            .bind(error)
            .bind(retry_at)
            .bind(summarize)
            .execute(&self.pool)
            .await
            .map_err(Error::query("record a web push"))?;
        Ok(())
    }

    /// Raises the receipts of `users` to `seqs` (pairwise).
    ///
    /// # Errors
    /// The statement failed.
    pub async fn record_webpush_receipts(
        &self,
        users: &[String],
        seqs: &[i64],
    ) -> Result<(), Error> {
        sqlx::query(RECEIPTS_SQL)
            .bind(users)
            .bind(seqs)
            .execute(&self.pool)
            .await
            .map_err(Error::query("record push receipts"))?;
        Ok(())
    }

    /// The Web Push sends of `event`, oldest first.
    ///
    /// # Errors
    /// The query failed.
    pub async fn webpush_attempts(&self, event: EventId) -> Result<Vec<PushAttempt>, Error> {
        sqlx::query_as(
            "SELECT (extract(epoch FROM at) * 1000)::int8 AS at_ms, origin, status, outcome, error
             FROM webpush_attempts WHERE event_id = $1 ORDER BY at",
        )
        .bind(event)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("read web push attempts"))
    }
}

//! The sweeper's queries: events that no message carries any more (see `pipeline::sweep`), and
//! their return to the outbox.
//!
//! An event is a candidate when it is neither delivered nor failed, no outbox row holds it (so the
//! broker confirmed its message, or its retry was scheduled), and nothing was due for it for
//! longer than the sweep's age: it was enqueued, replayed, swept, or due to retry before then.
//! Whether its message may still be waiting behind a backlog is not something PostgreSQL knows;
//! the caller only sweeps partitions its worker has seen idle.

use super::outbox::{MessageLimits, insert_rows, plan_messages};
use super::status::EventStatus;
use super::{Error, Store};
use uuid::Uuid;

/// Where a page of stale events ended: its last event's enqueue time (Unix µs) and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleCursor(i64, Uuid);

/// The condition on `events e` for a stale event, `$1` the age in ms.
const STALE: &str = "e.status IN ('accepted', 'published')
       AND e.enqueued_at < now() - make_interval(secs => $1 / 1000.0)
       AND COALESCE(e.next_attempt_at, e.enqueued_at) < now() - make_interval(secs => $1 / 1000.0)
       AND COALESCE(e.replayed_at, e.enqueued_at) < now() - make_interval(secs => $1 / 1000.0)
       AND COALESCE(e.swept_at, e.enqueued_at) < now() - make_interval(secs => $1 / 1000.0)
       AND e.id NOT IN (SELECT unnest(event_ids) FROM outbox)";

impl Store {
    /// Up to `limit` stale events (older than `age_ms`, see the module docs) after `after` (the
    /// last one of the previous page), oldest first, as `(id, user_id, cursor)`: the caller keeps
    /// those of the partitions it may sweep, and pages on with the last cursor.
    ///
    /// # Errors
    /// The query failed.
    pub async fn stale_events(
        &self,
        age_ms: u64,
        after: Option<StaleCursor>,
        limit: i64,
    ) -> Result<Vec<(Uuid, String, StaleCursor)>, Error> {
        let (after_us, after_id) = after.map_or((None, None), |c| (Some(c.0), Some(c.1)));
        let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(&format!(
            "SELECT e.id, e.user_id, (extract(epoch FROM e.enqueued_at) * 1000000)::int8 AS at
             FROM events e
             WHERE {STALE}
               AND ($3::int8 IS NULL
                    OR (e.enqueued_at, e.id) > (to_timestamp($3 / 1000000.0), $4::uuid))
             ORDER BY e.enqueued_at, e.id LIMIT $2"
        ))
        .bind(age_ms as f64)
        .bind(limit)
        .bind(after_us)
        .bind(after_id)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("find stale events"))?;
        Ok(rows
            .into_iter()
            .map(|(id, user, at)| (id, user, StaleCursor(at, id)))
            .collect())
    }

    /// Sends the events of `ids` that are still stale back through the outbox, in one
    /// transaction: each goes back to `accepted` (its retry, if any, is forgotten), counts a
    /// sweep, and rides a new outbox row, a message per partition split at `limits` as a group
    /// commit's, dated `relay_grace_ms` back so the relay publishes it at its next pass. Returns
    /// how many events were swept.
    ///
    /// # Errors
    /// The transaction failed; nothing was swept.
    pub async fn sweep_events(
        &self,
        ids: &[Uuid],
        age_ms: u64,
        relay_grace_ms: u64,
        partitions: u16,
        limits: MessageLimits,
    ) -> Result<usize, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
        let mut rows: Vec<(Uuid, String, i64, i32)> = sqlx::query_as(&format!(
            "UPDATE events e SET status = $3, next_attempt_at = NULL,
                    sweeps = e.sweeps + 1, swept_at = now()
             WHERE e.id = ANY($2) AND {STALE}
             RETURNING e.id, e.user_id, e.seq, octet_length(e.data::text)"
        ))
        .bind(age_ms as f64)
        .bind(ids)
        .bind(EventStatus::Accepted)
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::query("sweep stale events"))?;
        // Seq order within each user, so each message keeps its users' events in order.
        rows.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        let messages = plan_messages(
            rows.iter().enumerate().map(|(i, (_, user, _, size))| {
                (i, user.as_str(), usize::try_from(*size).unwrap_or(0) + 128)
            }),
            partitions,
            limits,
        );
        insert_rows(&mut tx, &messages, |i| rows[i].0, relay_grace_ms).await?;
        tx.commit().await.map_err(Error::query("commit a sweep"))?;
        Ok(rows.len())
    }
}

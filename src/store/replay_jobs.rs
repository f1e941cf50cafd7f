//! Replay jobs: an operator's replay as recorded, so its progress can be read from any node while
//! it runs (`GET /api/v1/admin/replays/{id}`) and after. The replay itself is
//! `pipeline::replay`; this is only its row.

use super::status::ReplayJobStatus;
use super::{Error, Store};
use uuid::Uuid;

/// A replay job's progress, as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ReplayJobRecord {
    /// Job id.
    pub id: Uuid,
    /// Where it is (`interrupted`: a running job whose node stopped reporting).
    pub status: ReplayJobStatus,
    /// The filter, as given (JSON text).
    pub filter: String,
    /// Events the filter matched when the job started.
    pub matched: i64,
    /// Events handed to the publisher.
    pub replayed: i64,
    /// Events claimed while the broker was unreachable: the outbox relay publishes them.
    pub deferred: i64,
    /// Why the job failed.
    pub error: Option<String>,
    /// Start.
    pub started_at: String,
    /// Last progress report.
    pub updated_at: String,
    /// End.
    pub finished_at: Option<String>,
}

impl Store {
    /// Records a new running replay job.
    ///
    /// # Errors
    /// The insert failed.
    pub async fn create_replay_job(
        &self,
        id: Uuid,
        filter: &str,
        matched: i64,
        created_by: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO replay_jobs (id, filter, status, matched, created_by)
             VALUES ($1, $2::text::jsonb, $5, $3, $4)",
        )
        .bind(id)
        .bind(filter)
        .bind(matched)
        .bind(created_by)
        .bind(ReplayJobStatus::Running)
        .execute(&self.pool)
        .await
        .map_err(Error::query("create a replay job"))?;
        Ok(())
    }

    /// Writes a job's progress; with `status`, also its end.
    ///
    /// # Errors
    /// The update failed.
    pub async fn update_replay_job(
        &self,
        id: Uuid,
        replayed: i64,
        deferred: i64,
        end: Option<(ReplayJobStatus, Option<&str>)>,
    ) -> Result<(), Error> {
        let (status, error) = end.map_or((None, None), |(s, e)| (Some(s), e));
        sqlx::query(
            "UPDATE replay_jobs SET replayed = $2, deferred = $3, updated_at = now(),
                    status = COALESCE($4, status), error = COALESCE($5, error),
                    finished_at = CASE WHEN $4 IS NULL THEN NULL ELSE now() END
             WHERE id = $1",
        )
        .bind(id)
        .bind(replayed)
        .bind(deferred)
        .bind(status)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(Error::query("update a replay job"))?;
        Ok(())
    }

    /// A replay job. A `running` job that has not reported for `stale_ms` (its node stopped) reads
    /// as `interrupted`; replay is safe to repeat, so the operator starts it again.
    ///
    /// # Errors
    /// The query failed.
    pub async fn replay_job(
        &self,
        id: Uuid,
        stale_ms: i64,
    ) -> Result<Option<ReplayJobRecord>, Error> {
        sqlx::query_as::<_, ReplayJobRecord>(concat!(
            "SELECT id, CASE WHEN status = $3
                                  AND updated_at < now() - make_interval(secs => $2 / 1000.0)
                             THEN $4 ELSE status END AS status,
                    filter::text AS filter, matched, replayed, deferred, error, ",
            rfc3339!("started_at"),
            " AS started_at, ",
            rfc3339!("updated_at"),
            " AS updated_at, ",
            rfc3339!("finished_at"),
            " AS finished_at FROM replay_jobs WHERE id = $1"
        ))
        .bind(id)
        .bind(stale_ms as f64)
        .bind(ReplayJobStatus::Running)
        .bind(ReplayJobStatus::Interrupted)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::query("read a replay job"))
    }
}

//! Worker membership and partition leases: which worker nodes are alive, and which of them may
//! consume each partition.
//!
//! A worker node renews its membership row and its leases every `queue.partition_check_ms`. A
//! lease is taken only when it is free or expired, and given up (owner cleared) only after the
//! node's in-flight deliveries of the partition are settled, so the next owner starts exactly where
//! the last one stopped. Every time comparison uses PostgreSQL's clock, so nodes' clocks never
//! disagree about a lease.

use super::{Error, Store};

/// What the partition rows say about the partition count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// No rows yet: this deployment starts with the configured count.
    Fresh,
    /// The rows match the configured count.
    Same,
    /// The deployment runs with `running` partitions, not the configured count.
    Changed {
        /// The count the rows record.
        running: u16,
    },
}

/// A partition lease as its holder took it: the fencing token its work carries. The epoch of a
/// partition goes up each time its lease changes hands, so a token whose epoch is no longer the
/// partition's belongs to a holder that has lost it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseToken {
    /// The partition.
    pub partition: u16,
    /// The lease's epoch when taken.
    pub epoch: i64,
}

/// One partition's lease, as operators see it.
#[derive(Clone, Debug, sqlx::FromRow, serde::Serialize)]
pub struct PartitionLease {
    /// The partition.
    pub partition: i32,
    /// The worker node consuming it, if any.
    pub owner: Option<String>,
    /// Whether the owner's lease is still valid.
    pub live: bool,
}

impl Store {
    /// Compares the partition rows with `partitions`.
    ///
    /// # Errors
    /// The query failed.
    pub async fn partition_layout(&self, partitions: u16) -> Result<Layout, Error> {
        let (count, max): (i64, Option<i32>) =
            sqlx::query_as("SELECT count(*), max(partition) FROM partition_leases")
                .fetch_one(&self.pool)
                .await
                .map_err(Error::query("read the partition layout"))?;
        Ok(match (count, max) {
            (0, _) => Layout::Fresh,
            (n, Some(m)) if n == i64::from(partitions) && m + 1 == i32::from(partitions) => {
                Layout::Same
            }
            (_, m) => Layout::Changed {
                running: u16::try_from(m.unwrap_or(-1) + 1).unwrap_or(0),
            },
        })
    }

    /// Makes the partition rows `0..partitions` (keeping the leases of those that stay). Call it only
    /// when no partition holds messages and no worker node runs another count.
    ///
    /// # Errors
    /// The statement failed.
    pub async fn set_partition_layout(&self, partitions: u16) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(Error::query("begin"))?;
        sqlx::query("DELETE FROM partition_leases WHERE partition >= $1")
            .bind(i32::from(partitions))
            .execute(&mut *tx)
            .await
            .map_err(Error::query("drop partitions"))?;
        sqlx::query(
            "INSERT INTO partition_leases (partition) SELECT generate_series(0, $1 - 1)
             ON CONFLICT DO NOTHING",
        )
        .bind(i32::from(partitions))
        .execute(&mut *tx)
        .await
        .map_err(Error::query("add partitions"))?;
        tx.commit()
            .await
            .map_err(Error::query("commit partitions"))?;
        Ok(())
    }

    /// Records that worker node `node` (running `partitions` partitions) is alive, and returns the
    /// live worker nodes (renewed within `lease_ms`) with their partition counts, this one included.
    ///
    /// # Errors
    /// A statement failed.
    pub async fn worker_heartbeat(
        &self,
        node: &str,
        partitions: u16,
        lease_ms: u64,
    ) -> Result<Vec<(String, i32)>, Error> {
        sqlx::query(
            "INSERT INTO worker_nodes (name, partitions) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET seen_at = now(), partitions = EXCLUDED.partitions",
        )
        .bind(node)
        .bind(i32::from(partitions))
        .execute(&self.pool)
        .await
        .map_err(Error::query("record a worker heartbeat"))?;
        self.worker_heartbeat_peek(lease_ms).await
    }

    /// The live worker nodes (renewed within `lease_ms`) with their partition counts, without
    /// joining them.
    ///
    /// # Errors
    /// The query failed.
    pub async fn worker_heartbeat_peek(&self, lease_ms: u64) -> Result<Vec<(String, i32)>, Error> {
        sqlx::query_as(
            "SELECT name, partitions FROM worker_nodes
             WHERE seen_at > now() - make_interval(secs => $1 / 1000.0) ORDER BY name",
        )
        .bind(lease_ms as f64)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("read live worker nodes"))
    }

    /// Every statement that locks several lease rows locks them in partition order (the outcome
    /// writer's fence too), or two of them can each hold a row the other waits for: under a slow
    /// PostgreSQL, renewals and outcome writes deadlocked, renewals failed until leases ran out, and
    /// the worker put its messages back (a soak's 17th minute, see BENCHMARKS.md).
    ///
    /// Renews `node`'s leases and takes those of `wanted` that are free or expired; returns every
    /// lease `node` now holds, with its epoch, by partition. A lease `node` held but lost (it
    /// expired and another node took it) is not in the answer. Taking a lease (from another node,
    /// or again after releasing it) raises its epoch, so work done under an older one is fenced
    /// off (see `record_attempts`).
    ///
    /// # Errors
    /// A statement failed: the caller keeps its partitions only until its leases run out.
    pub async fn renew_and_acquire(
        &self,
        node: &str,
        wanted: &[u16],
        lease_ms: u64,
    ) -> Result<Vec<LeaseToken>, Error> {
        let wanted: Vec<i32> = wanted.iter().map(|&p| i32::from(p)).collect();
        let held: Vec<(i32, i64)> = sqlx::query_as(
            "WITH mine AS (
                 SELECT partition FROM partition_leases
                 WHERE owner = $1 OR (partition = ANY($3) AND (owner IS NULL OR lease_until < now()))
                 ORDER BY partition
                 FOR UPDATE)
             UPDATE partition_leases l SET
                 moved_at = CASE WHEN owner IS DISTINCT FROM $1 THEN now() ELSE moved_at END,
                 epoch = CASE WHEN owner IS DISTINCT FROM $1 THEN epoch + 1 ELSE epoch END,
                 owner = $1,
                 lease_until = now() + make_interval(secs => $2 / 1000.0)
             FROM mine WHERE l.partition = mine.partition
             RETURNING l.partition, l.epoch",
        )
        .bind(node)
        .bind(lease_ms as f64)
        .bind(&wanted)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("renew partition leases"))?;
        let mut held: Vec<LeaseToken> = held
            .into_iter()
            .filter_map(|(p, epoch)| {
                Some(LeaseToken {
                    partition: u16::try_from(p).ok()?,
                    epoch,
                })
            })
            .collect();
        held.sort_unstable_by_key(|lease| lease.partition);
        Ok(held)
    }

    /// Gives up `node`'s leases of `partitions` (their in-flight work is settled), so another node
    /// may take them at once.
    ///
    /// # Errors
    /// The statement failed; the leases then simply expire.
    pub async fn release_partitions(&self, node: &str, partitions: &[u16]) -> Result<(), Error> {
        let partitions: Vec<i32> = partitions.iter().map(|&p| i32::from(p)).collect();
        sqlx::query(
            "WITH mine AS (
                 SELECT partition FROM partition_leases
                 WHERE owner = $1 AND partition = ANY($2)
                 ORDER BY partition
                 FOR UPDATE)
             UPDATE partition_leases l SET owner = NULL, lease_until = '-infinity', moved_at = now()
             FROM mine WHERE l.partition = mine.partition",
        )
        .bind(node)
        .bind(&partitions)
        .execute(&self.pool)
        .await
        .map_err(Error::query("release partitions"))?;
        Ok(())
    }

    /// Removes worker node `node` from the live set (it is stopping), so others rebalance at once.
    ///
    /// # Errors
    /// The statement failed; the node then drops out when its heartbeat goes stale.
    pub async fn worker_leave(&self, node: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM worker_nodes WHERE name = $1")
            .bind(node)
            .execute(&self.pool)
            .await
            .map_err(Error::query("remove a worker node"))?;
        Ok(())
    }

    /// Every partition's lease.
    ///
    /// # Errors
    /// The query failed.
    pub async fn partition_leases(&self) -> Result<Vec<PartitionLease>, Error> {
        sqlx::query_as(
            "SELECT partition, owner, (owner IS NOT NULL AND lease_until > now()) AS live
             FROM partition_leases ORDER BY partition",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::query("read partition leases"))
    }
}

//! The schema's own state: which migrations the database has against the ones this binary embeds
//! (`herald check`), and the one-off upgrade steps a deployment has taken on RabbitMQ.

use super::{Error, Store};
use sqlx::migrate::Migrator;

/// The migrations embedded in this binary, which `herald migrate` applies.
pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The one-off upgrade step that removes the queues of the layout before partitions.
pub const PRE_PARTITION_QUEUES_REMOVED: &str = "pre_partition_queues_removed";

/// How the database's applied migrations compare with this binary's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationState {
    /// Migrations this binary embeds, all of them.
    pub known: usize,
    /// This binary's migrations the database has not applied (`herald migrate` applies them).
    pub missing: Vec<i64>,
    /// Migrations the database applied that this binary does not know: a newer binary migrated it.
    pub unknown: Vec<i64>,
    /// Migrations applied with other contents than this binary's, or that failed half-way.
    pub altered: Vec<i64>,
}

impl MigrationState {
    /// The database has exactly this binary's migrations.
    pub fn is_current(&self) -> bool {
        self.missing.is_empty() && self.unknown.is_empty() && self.altered.is_empty()
    }
}

impl Store {
    /// Applies `migrations/` (embedded in the binary), then analyzes every table.
    ///
    /// # Errors
    /// A migration failed or the recorded ones differ from the embedded ones.
    pub async fn migrate(&self) -> Result<(), Error> {
        MIGRATOR.run(&self.pool).await.map_err(Error::Migrate)?;
        // A table a migration made or changed is never planned without statistics, whether or
        // not autovacuum runs (it would analyze only after enough writes).
        self.analyze().await
    }

    /// Compares the migrations the database applied with this binary's, without changing anything.
    ///
    /// # Errors
    /// The query failed.
    pub async fn migration_state(&self) -> Result<MigrationState, Error> {
        let table: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
                .fetch_one(&self.pool)
                .await
                .map_err(Error::query("look for the migrations table"))?;
        let applied: Vec<(i64, bool, Vec<u8>)> = match table {
            None => Vec::new(),
            Some(_) => sqlx::query_as("SELECT version, success, checksum FROM _sqlx_migrations")
                .fetch_all(&self.pool)
                .await
                .map_err(Error::query("read the applied migrations"))?,
        };
        let ours: Vec<_> = MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .collect();
        let mut state = MigrationState {
            known: ours.len(),
            ..MigrationState::default()
        };
        for migration in &ours {
            match applied.iter().find(|(v, ..)| *v == migration.version) {
                None => state.missing.push(migration.version),
                Some((_, success, checksum)) => {
                    if !success || checksum.as_slice() != &*migration.checksum {
                        state.altered.push(migration.version);
                    }
                }
            }
        }
        state.unknown = applied
            .iter()
            .map(|(v, ..)| *v)
            .filter(|v| !ours.iter().any(|m| m.version == *v))
            .collect();
        state.unknown.sort_unstable();
        Ok(state)
    }

    /// Whether the deployment has taken the one-off upgrade step `name`.
    ///
    /// # Errors
    /// The query failed.
    pub async fn upgrade_done(&self, name: &str) -> Result<bool, Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM broker_upgrades WHERE name = $1)")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("read the upgrade steps taken"))
    }

    /// The deployment's value of the shared setting `name` (see the `deployment_settings`
    /// migration): `value` when no node recorded one before (it is recorded now), else the
    /// recorded one.
    ///
    /// # Errors
    /// The statements failed.
    pub async fn deployment_setting(&self, name: &str, value: i64) -> Result<i64, Error> {
        sqlx::query(
            "INSERT INTO deployment_settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(Error::query("record a deployment setting"))?;
        sqlx::query_scalar("SELECT value FROM deployment_settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::query("read a deployment setting"))
    }

    /// The deployment's recorded value of the shared setting `name`, if a node recorded one
    /// (read only, for `herald check`).
    ///
    /// # Errors
    /// The query failed (the table is missing before its migration, say).
    pub async fn recorded_deployment_setting(&self, name: &str) -> Result<Option<i64>, Error> {
        sqlx::query_scalar("SELECT value FROM deployment_settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::query("read a deployment setting"))
    }

    /// Records that the deployment took the one-off upgrade step `name` (again is harmless).
    ///
    /// # Errors
    /// The statement failed.
    pub async fn mark_upgrade_done(&self, name: &str) -> Result<(), Error> {
        sqlx::query("INSERT INTO broker_upgrades (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(Error::query("record an upgrade step"))?;
        Ok(())
    }
}

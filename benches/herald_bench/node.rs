//! The Herald under test: the release `herald` binary as a child process, on a fresh database and
//! queue prefix, configured only through its `HERALD_*` environment like a deployment would be.

use crate::sys;
use anyhow::{Context, bail};
use herald::config::{QueueSettings, Secret, StoreSettings};
use herald::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where PostgreSQL and RabbitMQ are, and what this run calls its database and queues.
#[derive(Clone, Debug)]
pub struct Names {
    /// `postgres://...` without a database.
    pub pg_admin: String,
    /// AMQP URL.
    pub amqp: String,
    /// `herald_bench_<id>`: the database, also the raw baselines' tables.
    pub database: String,
    /// `bench_<id>`: the queue prefix, also of the raw baselines' queues.
    pub prefix: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            pg_admin: std::env::var("HERALD_BENCH_PG")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into()),
            amqp: std::env::var("HERALD_BENCH_AMQP")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            database: format!("herald_bench_{id}"),
            prefix: format!("bench_{id}"),
        }
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", self.pg_admin, self.database)
    }

    pub fn store_settings(&self) -> StoreSettings {
        StoreSettings {
            database_url: Secret::new(self.database_url()),
            ..StoreSettings::default()
        }
    }

    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            amqp_url: Secret::new(self.amqp.clone()),
            prefix: self.prefix.clone(),
            ..QueueSettings::default()
        }
    }
}

/// A running Herald.
pub struct Node {
    child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub api_key: String,
    pub log: PathBuf,
}

/// The signing secret of this run's socket tokens (the load generator signs its own).
pub const SECRET: &str = "herald-bench-secret-herald-bench-secret";

fn herald(bin: &Path, names: &Names, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(bin);
    // Only what this run sets: a stray HERALD_* from the caller's shell would change the node.
    for (var, _) in std::env::vars() {
        if var.starts_with("HERALD_") {
            command.env_remove(var);
        }
    }
    command
        .env("HERALD_DATABASE_URL", names.database_url())
        .env("HERALD_AMQP_URL", &names.amqp)
        .env("HERALD_QUEUE__PREFIX", &names.prefix)
        .env("HERALD_SECRET", SECRET)
        .env("HERALD_LOG", "warn");
    for (var, value) in env {
        command.env(var, value);
    }
    command
}

impl Node {
    /// Migrates the run's fresh database and creates a producer; returns its API key.
    pub fn setup(bin: &Path, names: &Names) -> anyhow::Result<String> {
        let migrated = herald(bin, names, &[])
            .arg("migrate")
            .output()
            .context("run herald migrate")?;
        if !migrated.status.success() {
            bail!(
                "herald migrate failed: {}",
                String::from_utf8_lossy(&migrated.stderr)
            );
        }
        let added = herald(bin, names, &[])
            .args(["producers", "add", "bench"])
            .output()
            .context("run herald producers add")?;
        let stdout = String::from_utf8_lossy(&added.stdout);
        let Some(api_key) = stdout
            .lines()
            .last()
            .map(str::trim)
            .filter(|k| !k.is_empty())
        else {
            bail!(
                "herald producers add printed no key: {}",
                String::from_utf8_lossy(&added.stderr)
            );
        };
        Ok(api_key.to_owned())
    }

    /// Starts `herald serve` on the run's database and queue prefix with `settings` (more
    /// `HERALD_*` variables), logging to `log`, and waits until it is ready (PostgreSQL and
    /// RabbitMQ reachable). Several nodes of one deployment share the database and the prefix.
    pub async fn spawn(
        bin: &Path,
        names: &Names,
        api_key: &str,
        settings: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let port = sys::free_port()?;
        let log_file = std::fs::File::create(&log).context("create the node log")?;
        let mut env = vec![
            ("HERALD_HTTP_ADDR", format!("127.0.0.1:{port}")),
            // Several nodes per box: Prometheus' listener on a port of its own for each.
            ("HERALD_METRICS__PROMETHEUS_ADDR", "127.0.0.1:0".to_owned()),
        ];
        env.extend(settings.iter().cloned());
        let child = herald(bin, names, &env)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("start herald serve")?;
        let node = Self {
            pid: child.id(),
            child,
            base: format!("http://127.0.0.1:{port}"),
            api_key: api_key.to_owned(),
            log,
        };
        node.wait_ready().await?;
        Ok(node)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("herald not ready within 30 s; see {}", self.log.display())
    }

    /// The partitions this node consumes now, from its `/readyz` (`None` when it does not answer
    /// or runs no worker).
    pub async fn partitions(&self) -> Option<Vec<u16>> {
        let ready: serde_json::Value = reqwest::get(format!("{}/readyz", self.base))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        serde_json::from_value(ready.get("partitions")?.clone()).ok()
    }

    pub fn rss_bytes(&self) -> u64 {
        sys::rss_bytes(self.pid).unwrap_or(0)
    }

    pub fn cpu_time(&self) -> Duration {
        sys::cpu_time(self.pid).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to 40 s for the graceful drain, then SIGKILL.
    pub async fn stop(mut self) {
        sys::terminate(self.pid);
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    /// Never leaves a node behind, whatever ended the run.
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Drops this run's database and deletes its queues, the raw baselines' included.
pub async fn clean_up(names: &Names) {
    let _ = herald::queue::delete_topology(&names.queue_settings()).await;
    // The node ran with the default retry schedule: its delay queues go too.
    let delays = herald::config::Settings::default().retry.delays_ms();
    let _ = herald::queue::delete_retry_queues(&names.queue_settings(), &delays).await;
    crate::baseline::delete_raw_queues(names).await;
    let _ = Store::drop_database(&names.store_settings()).await;
}

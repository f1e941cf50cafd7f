//! Test harness: a whole node per test on port 0, with a fresh `herald_test_<uuid>` database and a
//! fresh queue prefix (`app`), a Phoenix v2 WebSocket client (`ws`), a StatsD listener (`statsd`),
//! a TCP proxy that can cut a dependency off (`proxy`) and the real binary as a child process
//! (`process`). Here: the settings every test starts from, cleanup, and polling.

mod app;
mod process;
mod proxy;
mod statsd;
mod ws;

pub use app::*;
pub use process::*;
pub use proxy::*;
pub use statsd::*;
pub use ws::*;

use herald::config::{Secret, Settings};
use herald::store::Store;
use std::future::Future;
use std::sync::Once;
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// How long any single awaited thing may take before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// Signs the test nodes' socket tokens; a node refuses secrets under 32 bytes.
pub const TEST_SECRET: &str = "test-secret-test-secret-test-secr";

static TRACING: Once = Once::new();

/// Logs only when TEST_LOG is set (e.g. TEST_LOG=debug).
fn init_tracing() {
    TRACING.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .init();
        }
    });
}

fn admin_url() -> String {
    std::env::var("HERALD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Settings for a fresh, isolated node: port 0, its own database and queue prefix, fast relay.
pub fn test_settings() -> Settings {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let mut s = Settings::default();
    s.http.addr = "127.0.0.1:0".parse().unwrap();
    s.store.database_url = Secret::new(format!("{}/herald_test_{id}", admin_url()));
    s.store.max_connections = 4;
    s.store.write_connections = 3;
    s.store.read_connections = 4;
    s.queue.amqp_url = Secret::new(amqp_url());
    s.queue.prefix = format!("test_{id}");
    s.queue.reconnect_max_backoff_ms = 300;
    s.queue.connect_timeout_ms = 2_000;
    // Few partitions: every test declares its own quorum queues, and the suite runs in parallel.
    s.queue.partitions = 4;
    s.queue.partition_check_ms = 200;
    // A short lease keeps takeover tests fast; 3 s stays clear of a tick delayed by a loaded box
    // (a lease lost mid-stream can cost a user its order, repaired at the socket).
    s.queue.partition_lease_ms = 3_000;
    s.queue.confirm_timeout_ms = 1_000;
    s.pipeline.relay_grace_ms = 2_000;
    s.pipeline.relay_interval_ms = 200;
    // Off here, on by default: most tests prove one path to the client (the relay, the sweeper, a
    // gap fill, a retry), and a client on the node that took the request would otherwise be
    // pushed its events straight from the commit, whatever became of that path. The head start's
    // own tests (`head_start`), the history checker and the JavaScript suite run with it on.
    s.pipeline.push_from_commit = 0;
    s.metrics.statsd_addr = String::new();
    s.metrics.prometheus_addr = "127.0.0.1:0".into();
    s.socket.secret = Some(Secret::new(TEST_SECRET));
    s.node.shutdown_timeout_ms = 15_000;
    // A fast retry schedule: 100 ms, then 200 ms, four attempts in all.
    s.retry.schedule_ms = vec![100, 200];
    s.retry.max_attempts = 4;
    s.retry.attempt_timeout_ms = 5_000;
    s
}

/// Deletes a test's queues (delay queues included) and drops its database, from Drop too (also when
/// a test panicked): a thread with its own runtime. The broker may be slow to accept a connection
/// while the suite loads both cores, so the cleanup connection gets a long timeout and a few tries;
/// a short one leaked whole topologies. It goes straight to the broker: a test's `TcpProxy` runs on
/// the test's runtime, which is blocked while this runs.
pub fn cleanup(mut settings: Settings) {
    settings.queue.connect_timeout_ms = 10_000;
    settings.queue.amqp_url = Secret::new(amqp_url());
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let delays = settings.retry.delays_ms();
            for _ in 0..3 {
                if herald::queue::delete_topology(&settings.queue)
                    .await
                    .is_ok()
                    && herald::queue::delete_retry_queues(&settings.queue, &delays)
                        .await
                        .is_ok()
                {
                    break;
                }
            }
            let _ = Store::drop_database(&settings.store).await;
        });
    })
    .join();
}

/// Drops a deployment's database and queues when it goes, the test passed or not: for tests that
/// run the binary on `test_settings` without a `TestApp`.
pub struct DropsDeployment(pub Settings);

impl Drop for DropsDeployment {
    fn drop(&mut self) {
        cleanup(self.0.clone());
    }
}

/// A migrated database of the test's own and its store, no node (dropped with the guard, after
/// the store): for tests of statements that a node's background work would disturb.
pub async fn migrated_store() -> (DropsDeployment, herald::store::Store) {
    let settings = test_settings();
    let deployment = DropsDeployment(settings.clone());
    herald::store::Store::create_database_if_missing(&settings.store)
        .await
        .unwrap();
    let store = herald::store::Store::connect(&settings.store)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    (deployment, store)
}

/// An event of `user` to insert straight into the store (bypassing the API and the publisher).
pub async fn new_event(app: &TestApp, user: &str, data: &str) -> herald::store::NewEvent {
    let producer: i64 = sqlx::query_scalar("SELECT id FROM producers LIMIT 1")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    herald::store::NewEvent::new(
        producer,
        herald::event::UserId::parse(user).unwrap(),
        herald::event::EventName::default_push(),
        serde_json::value::RawValue::from_string(data.into()).unwrap(),
        None,
    )
}

/// A new producer with the admin role in `store`; returns its key.
pub async fn create_admin_key(store: &Store) -> String {
    let name = format!("ops-{}", uuid::Uuid::now_v7().simple());
    let (_, key) = store.create_producer(&name).await.expect("producer");
    store
        .set_producer_admin(&name, true)
        .await
        .expect("admin role")
        .expect("producer exists");
    key.expose().to_owned()
}

/// Polls `check` until it returns Some, failing after `limit`.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(limit, Duration::from_millis(25), check)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Polls `check` every `every` until it returns Some; None once `limit` has passed (for a caller
/// that reports a timeout itself instead of failing on it).
pub async fn poll_until<T, F, Fut>(limit: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(every).await;
    }
}

/// Empties the queue `name` behind Herald's back, as an operator's `rabbitmqctl purge_queue`
/// would; returns how many messages it held.
pub async fn purge_queue(queue: &herald::config::QueueSettings, name: &str) -> Result<u32, String> {
    let connection = herald::queue::connect(queue, "test-purge")
        .await
        .map_err(|e| e.to_string())?;
    let channel = herald::queue::open_channel(&connection)
        .await
        .map_err(|e| e.to_string())?;
    let purged = channel
        .queue_purge(name.into(), lapin::options::QueuePurgeOptions::default())
        .await
        .map_err(|e| e.to_string());
    let _ = connection.close(200, "purged".into()).await;
    purged
}

/// The `actual rows=` count of one line of an `EXPLAIN ANALYZE` plan (failing the test if none).
pub fn actual_rows(plan_line: &str) -> f64 {
    plan_line
        .split("actual rows=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no row count: {plan_line}"))
}

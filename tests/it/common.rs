//! Test harness: a whole node per test on port 0, with a fresh `herald_test_<uuid>` database and a
//! fresh queue prefix, a Phoenix v2 WebSocket client, a StatsD listener and a TCP proxy that can cut
//! a dependency off.

use futures_util::{SinkExt, StreamExt};
use herald::App;
use herald::config::{Secret, Settings};
use herald::store::Store;
use herald::token::{TokenSigner, now_unix_secs};
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

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

pub struct TestApp {
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: Option<SocketAddr>,
    pub settings: Settings,
    pub store: Store,
    pub api_key: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), herald::app::Error>>>,
    /// Drop the database and queues when this app is dropped (false for an app handed to a restart).
    cleanup: bool,
}

/// A node with default test settings, its broker connected.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A node with test settings adjusted by `adjust`, its broker connected.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let app = spawn_unready(adjust).await;
    app.wait_ready().await;
    app
}

/// A deployment of three nodes sharing one database and queue prefix, in cluster mode: `api,worker`,
/// and two `socket` nodes. The first owns the cleanup.
pub async fn spawn_cluster() -> (TestApp, TestApp, TestApp) {
    let api = spawn_unready(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,worker".parse().unwrap();
        s.node.name = "api-worker".into();
    })
    .await;
    api.wait_ready().await;
    let mut nodes = Vec::new();
    for name in ["socket-a", "socket-b"] {
        let mut settings = api.settings.clone();
        settings.http.addr = "127.0.0.1:0".parse().unwrap();
        settings.node.roles = "socket".parse().unwrap();
        settings.node.name = name.into();
        let store = Store::connect(&settings.store)
            .await
            .expect("store connects");
        let mut node = start(settings, store, api.api_key.clone()).await;
        node.cleanup = false;
        node.wait_ready().await;
        nodes.push(node);
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    (api, a, b)
}

/// Another node of the deployment of `first` (same database and queue prefix), running `roles`
/// as `name`, with its own settings adjusted by `adjust`; ready when returned. The first node owns
/// the cleanup.
pub async fn spawn_node(
    first: &TestApp,
    roles: &str,
    name: &str,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = first.settings.clone();
    settings.http.addr = "127.0.0.1:0".parse().unwrap();
    settings.node.roles = roles.parse().unwrap();
    settings.node.name = name.into();
    adjust(&mut settings);
    let store = Store::connect(&settings.store)
        .await
        .expect("store connects");
    let mut node = start(settings, store, first.api_key.clone()).await;
    node.cleanup = false;
    node.wait_ready().await;
    node
}

/// Waits until the node at `addr` answers `GET path` with a 2xx.
pub async fn wait_answering(http: &reqwest::Client, addr: SocketAddr, path: &str) {
    wait_until(&format!("{path} answering at {addr}"), PATIENCE, || async {
        let r = http.get(format!("http://{addr}{path}")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// The partitions the worker node at `addr` consumes, from its /readyz (empty if it cannot say).
pub async fn partitions_at(http: &reqwest::Client, addr: SocketAddr) -> Vec<u16> {
    let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await else {
        return Vec::new();
    };
    let body: Value = r.json().await.unwrap_or(Value::Null);
    body["partitions"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// A socket token for `user`, valid for an hour, signed as the test nodes check it.
pub fn user_token(user: &str) -> String {
    let user = herald::event::UserId::parse(user).unwrap();
    TokenSigner::new(TEST_SECRET).sign(&user, now_unix_secs() + 3600)
}

/// Connects a v2 client as `user` to the node at `addr`.
pub async fn connect_to(addr: SocketAddr, user: &str) -> WsClient {
    let token = user_token(user);
    let url = format!("ws://{addr}/socket/websocket?token={token}&vsn=2.0.0");
    let (ws, _) = timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade accepted");
    WsClient { ws, next_ref: 0 }
}

/// A node that may not reach RabbitMQ (the caller decides what to wait for).
pub async fn spawn_unready(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    init_tracing();
    let mut settings = test_settings();
    adjust(&mut settings);
    Store::create_database_if_missing(&settings.store)
        .await
        .expect("test database created");
    let store = Store::connect(&settings.store)
        .await
        .expect("store connects");
    store.migrate().await.expect("migrations apply");
    let (_, key) = store.create_producer("test").await.expect("producer");
    start(settings, store, key.expose().to_owned()).await
}

async fn start(settings: Settings, store: Store, api_key: String) -> TestApp {
    let app = App::build(settings.clone()).await.expect("app builds");
    let addr = app.http_addr();
    let metrics_addr = app.metrics_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    TestApp {
        addr,
        metrics_addr,
        settings,
        store,
        api_key,
        http: reqwest::Client::new(),
        shutdown,
        task: Some(task),
        cleanup: true,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn wait_ready(&self) {
        wait_until("node ready (PostgreSQL and RabbitMQ)", PATIENCE, || async {
            let r = self.http.get(self.url("/readyz")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    pub async fn post_event(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/events"))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_batch(&self, events: Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/events/batch"))
            .bearer_auth(&self.api_key)
            .json(&json!({ "events": events }))
            .send()
            .await
            .expect("request sent")
    }

    pub fn token(&self, user: &str) -> String {
        user_token(user)
    }

    /// Connects a v2 client as `user`.
    pub async fn connect(&self, user: &str) -> WsClient {
        connect_to(self.addr, user).await
    }

    /// Connects as `user` and joins `user:<user>`.
    pub async fn connect_joined(&self, user: &str) -> WsClient {
        let mut client = self.connect(user).await;
        let reply = client.join(&format!("user:{user}"), json!({})).await;
        assert_eq!(reply[4]["status"], "ok", "join refused: {reply}");
        client
    }

    /// Status of an event row.
    pub async fn status_of(&self, id: &str) -> Option<String> {
        let id = uuid::Uuid::parse_str(id).ok()?;
        sqlx::query_scalar("SELECT status FROM events WHERE id = $1")
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .expect("query")
    }

    /// A new producer with the admin role; returns its key.
    pub async fn admin_key(&self) -> String {
        create_admin_key(&self.store).await
    }

    /// GET `path` with `key`; returns the status and the JSON body.
    pub async fn get_json(&self, path: &str, key: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST `body` to `path` with `key`; returns the status and the JSON body.
    pub async fn post_json(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Posts one event and returns its id.
    pub async fn enqueue(&self, body: Value) -> String {
        let r = self.post_event(body).await;
        assert_eq!(r.status(), 202);
        let body: Value = r.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// Posts the event `WsClient::expect_sentinel` waits for, to `user`.
    pub async fn post_sentinel(&self, user: &str) {
        self.enqueue(json!({"user_id": user, "data": {"sentinel": true}}))
            .await;
    }

    /// Waits until event `id` has `status`; returns (attempts, last_error).
    pub async fn wait_status(&self, id: &str, status: &str) -> (i32, Option<String>) {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        wait_until(&format!("event {id} {status}"), PATIENCE, || async {
            let row: (String, i32, Option<String>) =
                sqlx::query_as("SELECT status, attempts, last_error FROM events WHERE id = $1")
                    .bind(uuid)
                    .fetch_one(self.store.pool())
                    .await
                    .ok()?;
            (row.0 == status).then_some((row.1, row.2))
        })
        .await
    }

    /// Messages waiting in the dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        let connection = herald::queue::connect(&self.settings.queue, "test-probe")
            .await
            .expect("broker");
        let channel = herald::queue::open_channel(&connection).await.unwrap();
        let names = herald::queue::Topology::new(
            &self.settings.queue.prefix,
            self.settings.queue.partitions,
        );
        let queue = channel
            .queue_declare(
                names.dead_letter_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("dead-letter queue exists");
        let _ = connection.close(200, "probe done".into()).await;
        queue.message_count()
    }

    /// Streams `total` events (`data.n` = 1..=total) to `user` from a task of its own, each request
    /// starting when the previous 202 arrived; the task fails if any is refused.
    pub fn stream_events(&self, user: &str, total: i64) -> JoinHandle<()> {
        let bodies = (1..=total).map(|n| json!({"user_id": user, "data": {"n": n}}));
        self.post_in_turn("/api/v1/events", bodies.collect(), Duration::ZERO)
    }

    /// POSTs `bodies` to `path` from a task of its own, one after another (each when the previous
    /// 202 arrived, then `pause`); the task fails if any is refused.
    pub fn post_in_turn(&self, path: &str, bodies: Vec<Value>, pause: Duration) -> JoinHandle<()> {
        let (http, url, key) = (self.http.clone(), self.url(path), self.api_key.clone());
        tokio::spawn(async move {
            for body in bodies {
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .expect("request sent");
                assert_eq!(r.status(), 202);
                tokio::time::sleep(pause).await;
            }
        })
    }

    /// Commits `events` straight into the store in one group commit, as if their publish had
    /// failed: their messages wait in the outbox for the relay.
    pub async fn commit_events(
        &self,
        events: &[herald::store::NewEvent],
    ) -> herald::store::Committed {
        self.store
            .insert_events(
                events,
                self.settings.queue.partitions,
                self.settings.message_limits(),
            )
            .await
            .expect("events committed")
    }

    /// Commits an event of `user` straight into the store, as if its publish had failed: it waits
    /// in the outbox for the relay. Returns its seq.
    pub async fn commit_unpublished(&self, user: &str, data: &str) -> i64 {
        let event = new_event(self, user, data).await;
        let committed = self.commit_events(&[event]).await;
        match committed.outcomes[0] {
            herald::store::InsertOutcome::Inserted { seq } => seq,
            ref other => panic!("not inserted: {other:?}"),
        }
    }

    /// This node's /readyz: its status code and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let r = self
            .http
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("readyz answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until /readyz reports the RabbitMQ link `link` (`publisher`, `consumer`, `fanout`)
    /// as `state` (`ok` or `unavailable`).
    pub async fn wait_link(&self, link: &str, state: &str) {
        wait_until(&format!("{link} {state}"), PATIENCE, || async {
            let (_, body) = self.readyz().await;
            (body["checks"]["rabbitmq_links"][link] == state).then_some(())
        })
        .await;
    }

    /// The partitions this node consumes, from its /readyz.
    pub async fn partitions(&self) -> Vec<u16> {
        partitions_at(&self.http, self.addr).await
    }

    /// Waits until every event of the deployment is delivered.
    pub async fn wait_all_delivered(&self) {
        wait_until("every event delivered", PATIENCE, || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE status <> 'delivered'")
                    .fetch_one(self.store.pool())
                    .await
                    .ok()?;
            (left == 0).then_some(())
        })
        .await;
    }

    /// Cancels the node and waits for its drain to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            timeout(PATIENCE, task)
                .await
                .expect("node drains in time")
                .expect("node task joins")
                .expect("node ran cleanly");
        }
    }

    /// Stops this node and starts a new one on the same database and queues.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        self.cleanup = false;
        let settings = self.settings.clone();
        let store = Store::connect(&settings.store)
            .await
            .expect("store connects");
        let app = start(settings, store, self.api_key.clone()).await;
        app.wait_ready().await;
        app
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if !self.cleanup {
            return;
        }
        cleanup(self.settings.clone());
    }
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

/// A Phoenix Channels v2 client over a real WebSocket.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

impl WsClient {
    pub fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("frame sent");
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next text frame, parsed; panics after PATIENCE.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(PATIENCE)
            .await
            .unwrap_or_else(|| panic!("no frame within {PATIENCE:?}"))
    }

    /// The next text frame within `limit`, or None. Panics if the connection closed.
    pub async fn try_recv(&mut self, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("server frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => panic!("connection closed: {frame:?}"),
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// Asserts that the next frame is the push of `TestApp::post_sentinel`'s event: nothing unwanted
    /// came first. Waiting a while for silence instead passes when the unwanted frame is merely
    /// late; this fails, provided the sentinel is sent after anything unwanted would have been (a
    /// user's events are pushed in seq order; a connection gets broadcasts in the order made).
    pub async fn expect_sentinel(&mut self) {
        let frame = self.recv().await;
        assert_eq!(
            frame[4]["data"],
            json!({"sentinel": true}),
            "expected the sentinel, got {frame}"
        );
    }

    /// The next frame, or None once the connection has closed or ended (never panics on the end).
    pub async fn next_or_end(&mut self) -> Option<Value> {
        loop {
            match timeout(PATIENCE, self.ws.next())
                .await
                .expect("frame or end in time")
            {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).ok(),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match timeout(PATIENCE, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Joins `topic` and returns the reply frame.
    pub async fn join(&mut self, topic: &str, params: Value) -> Value {
        let r = self.next_ref();
        self.send(json!([r, r, topic, "phx_join", params])).await;
        let reply = self.recv().await;
        assert_eq!(
            reply[3], "phx_reply",
            "expected the join reply, got {reply}"
        );
        assert_eq!(reply[1], r.as_str(), "reply echoes the ref");
        reply
    }

    /// The next pushed event (not a reply), as [join_ref, ref, topic, event, payload].
    pub async fn recv_push(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame[3] != "phx_reply" {
                return frame;
            }
        }
    }
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

/// The sum of the StatsD counter `name` over `lines` (as a `StatsdListener` received them).
pub fn counter_sum(lines: &[String], name: &str) -> i64 {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .filter_map(|rest| rest.split('|').next()?.parse::<i64>().ok())
        .sum()
}

/// A UDP listener standing in for StatsD.
pub struct StatsdListener {
    socket: UdpSocket,
    pub addr: SocketAddr,
}

impl StatsdListener {
    pub async fn bind() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        Self { socket, addr }
    }

    /// Every metric line received until the `count`-th one starting with `until` (inclusive).
    pub async fn lines_until(&self, until: &str, count: usize) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + PATIENCE;
        let (mut lines, mut seen) = (Vec::new(), 0);
        while seen < count {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("fewer than {count} StatsD lines starting with {until}"))
                .unwrap();
            for line in String::from_utf8_lossy(&buf[..received]).lines() {
                seen += usize::from(line.starts_with(until));
                lines.push(line.to_owned());
            }
        }
        lines
    }

    /// Every line received so far (from the listener's start, or its last read), then on until
    /// `count` more lines starting with `until` arrive: with a gauge sent every second as `until`,
    /// everything the node sent before this call, counters included, is in the answer.
    /// (`lines_until` stops at the oldest such lines, which may predate what a test looks for.)
    pub async fn lines_through(&self, until: &str, count: usize) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let mut lines = Vec::new();
        while let Ok(received) = self.socket.try_recv(&mut buf) {
            lines.extend(
                String::from_utf8_lossy(&buf[..received])
                    .lines()
                    .map(str::to_owned),
            );
        }
        lines.extend(self.lines_until(until, count).await);
        lines
    }

    /// Waits for a metric line starting with `prefix`; returns the line.
    pub async fn expect_line(&self, prefix: &str) -> String {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + PATIENCE;
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no StatsD line starting with {prefix}"))
                .unwrap();
            let packet = String::from_utf8_lossy(&buf[..received]).to_string();
            if let Some(line) = packet.lines().find(|l| l.starts_with(prefix)) {
                return line.to_owned();
            }
        }
    }
}

/// A TCP proxy in front of a dependency; `cut` drops every connection and refuses new ones until
/// `restore`; `stall` holds every byte in both directions (connections stay open, nothing answers)
/// until `resume`. Lets one test make RabbitMQ unreachable or silent without touching the shared
/// broker.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    flowing: watch::Sender<bool>,
}

/// Copies `from` to `to`, holding what it read while `flowing` is false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if flowing.wait_for(|f| *f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl TcpProxy {
    async fn start(target: &str) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, up_rx) = watch::channel(true);
        let (flowing, flowing_rx) = watch::channel(true);
        let target = target.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() {
                    continue; // dropped: refused while cut
                }
                let target = target.clone();
                let mut up_rx = up_rx.clone();
                let flowing = flowing_rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::select! {
                        () = pump(in_read, out_write, flowing.clone()) => {}
                        () = pump(out_read, in_write, flowing) => {}
                        _ = up_rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Arc::new(Self { addr, up, flowing })
    }

    /// A proxy in front of the service `url` names; returns it with `url` pointed at it.
    pub async fn in_front_of(url: &str) -> (Arc<Self>, Secret) {
        let mut url = reqwest::Url::parse(url).expect("a service URL");
        let port = url.port().unwrap_or(match url.scheme() {
            "amqp" => 5672,
            _ => 5432,
        });
        let proxy = Self::start(&format!("{}:{port}", url.host_str().expect("a host"))).await;
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.addr.port())).unwrap();
        (proxy, Secret::new(url.to_string()))
    }

    pub fn stall(&self) {
        self.flowing.send_replace(false);
    }

    pub fn resume(&self) {
        self.flowing.send_replace(true);
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// The `herald` binary with `args`, on the deployment of `settings`, killed when dropped. Its
/// environment is `node_env`'s alone: the tester's shell has no say.
pub fn herald_command(settings: &Settings, args: &[&str]) -> tokio::process::Command {
    herald_command_of(env!("CARGO_BIN_EXE_herald"), settings, args)
}

/// `herald_command` with the binary at `bin`: the checker can run an older build.
pub fn herald_command_of(bin: &str, settings: &Settings, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin);
    command
        .args(args)
        .env_clear()
        .envs(node_env(settings))
        .kill_on_drop(true);
    command
}

/// Every setting of `settings` as its `HERALD_<SECTION>__<KEY>` variable, so a child never differs
/// from an in-process node by a setting nobody thought to pass on (unset ones keep the child's
/// defaults). Logs at info: `Node` reads its address from the log.
fn node_env(settings: &Settings) -> Vec<(String, String)> {
    fn flatten(var: String, value: &Value, env: &mut Vec<(String, String)>) {
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    flatten(format!("{var}__{}", key.to_uppercase()), value, env);
                }
            }
            Value::Null => {}
            Value::Array(items) => {
                let list: Vec<String> = items.iter().map(text).collect();
                env.push((var, list.join(",")));
            }
            other => env.push((var, text(other))),
        }
    }
    let mut env = vec![("HERALD_LOG".to_owned(), "herald=info,warn".to_owned())];
    let sections = serde_json::to_value(settings).expect("settings serialise");
    for (section, value) in sections.as_object().expect("settings are sections") {
        flatten(
            format!("HERALD_{}", section.to_uppercase()),
            value,
            &mut env,
        );
    }
    env
}

/// The real `herald serve` as a child process, killed when dropped; its log (stderr) is kept for a
/// failing test to show.
pub struct Node {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Node {
    /// `herald serve` with `flags` on the deployment of `settings` (its `http.addr` port 0 lets the
    /// child pick a free port, which it logs), once it is ready.
    pub async fn serve(settings: &Settings, flags: &[&str]) -> Self {
        Self::serve_of(env!("CARGO_BIN_EXE_herald"), settings, flags).await
    }

    /// `serve` with the binary at `bin`.
    pub async fn serve_of(bin: &str, settings: &Settings, flags: &[&str]) -> Self {
        let mut child = herald_command_of(bin, settings, &["serve"])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("herald starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (serving, addr) = oneshot::channel();
        let reader = tokio::spawn(keep_log(stderr, Arc::clone(&log), serving));
        let mut node = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader,
        };
        match timeout(PATIENCE, addr).await {
            Ok(Ok(addr)) => node.addr = addr,
            _ => panic!("herald did not start: {:#?}", node.log_tail()),
        }
        wait_answering(&reqwest::Client::new(), node.addr, "/readyz").await;
        node
    }

    /// The last lines the node logged.
    pub fn log_tail(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().rev().take(30).rev().cloned().collect()
    }

    /// Stops reading the node's log, leaving its stderr without a reader (a log shipper died).
    pub async fn close_log(&mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
    }
}

/// Keeps the last lines of a child's log, and sends the address it serves on once it says.
async fn keep_log(
    stderr: tokio::process::ChildStderr,
    log: Arc<Mutex<Vec<String>>>,
    serving: oneshot::Sender<SocketAddr>,
) {
    let mut serving = Some(serving);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("herald serving")
            && let Some(addr) = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
            && let Some(serving) = serving.take()
        {
            let _ = serving.send(addr);
        }
        let mut log = log.lock().unwrap();
        if log.len() > 2_000 {
            log.drain(..1_000);
        }
        log.push(line);
    }
}

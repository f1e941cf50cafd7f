//! A whole node in the test's process (`TestApp`), alone or as a three-node cluster, and what tests
//! ask of it.

use super::*;
use herald::App;
use herald::config::Settings;
use herald::store::Store;
use herald::token::{TokenSigner, now_unix_secs};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

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
    spawn_cluster_with(|_| {}).await
}

/// [`spawn_cluster`] with every node's settings adjusted by `adjust`.
pub async fn spawn_cluster_with(adjust: impl FnOnce(&mut Settings)) -> (TestApp, TestApp, TestApp) {
    let api = spawn_unready(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,worker".parse().unwrap();
        s.node.name = "api-worker".into();
        adjust(s);
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

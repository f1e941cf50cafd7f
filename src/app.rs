//! Builds a node and runs its roles (`node.roles`): `api` (producer HTTP API, group commit, publisher,
//! outbox relay), `worker` (consumer, broadcasts), `socket` (WebSockets, and in cluster mode the
//! node's fan-out queue). One process may run them all; many may split them. Every node serves
//! /healthz and /readyz.
//!
//! Shutdown reverses startup. (1) Intake stops: the listener closes and the consumer is cancelled.
//! (2) Work drains upstream to downstream: in-flight requests finish, the group commit writes every
//! request it took (each 2xx is committed), the relay stops, in-flight deliveries finish and ack.
//! (3) Sockets get close frames (1012: reconnect elsewhere). (4) Outcomes are written, the publisher
//! publishes what it holds and settles its confirms, then PostgreSQL's pools close and StatsD is
//! flushed. One `node.shutdown_timeout_ms`, counted from the signal, bounds it all (HTTP requests
//! still in flight at the deadline are cut); what is left then is redelivered or relayed later.
//!
//! PostgreSQL connections come from three pools, so that no kind of work can take another's: the
//! writers' (group commit, confirm recorder, outcome writer), the clients' reads (sockets, API-key
//! lookups, admin queries, /readyz) and the background work's (relay, retention, leases, replay).

use crate::api::health::{Health, Link};
use crate::api::{self, ApiState, KeyCache, Limits};
use crate::cluster::{self, RabbitTransport};
use crate::config::{Roles, Settings};
use crate::demo::Demo;
use crate::event::USER_TOPIC_PREFIX;
use crate::metrics::{self, Metrics};
use crate::pipeline::enqueue::Enqueue;
use crate::pipeline::faults::Faults;
use crate::pipeline::partitions::{Coordinator, check_layout};
use crate::pipeline::replay::ReplayJobs;
use crate::pipeline::retry::RetryPolicy;
use crate::pipeline::worker::Worker;
use crate::pipeline::{outcomes, published, relay, retention, upkeep};
use crate::pubsub::{BindRequest, PubSub};
use crate::queue::{BrokerNodes, DepthProbe, Publisher};
use crate::server;

use crate::socket::{self, SocketState};
use crate::store::{self, Store};
use crate::token::TokenSigner;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Why a node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL could not be reached at start.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// StatsD could not be set up.
    #[error(transparent)]
    Metrics(#[from] metrics::Error),
    /// A listener's address could not be bound (the message says which setting moves it).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The demo is enabled but its files are missing.
    #[error(transparent)]
    Demo(#[from] crate::demo::MissingAsset),
    /// `faults.fail_events` holds a rule that does not parse.
    #[error("invalid faults.fail_events: {0}")]
    Faults(String),
    /// The settings cannot be served: a weak or missing secret.
    #[error(transparent)]
    Settings(#[from] crate::config::Error),
    /// The partition count cannot be used (see [`crate::pipeline::partitions::check_layout`]).
    #[error(transparent)]
    Layout(#[from] crate::pipeline::partitions::LayoutError),
    /// The node routes cross-node broadcasts by another bucket count than its deployment.
    #[error(
        "pubsub.buckets is {wanted}, but this deployment routes broadcasts by {running} buckets: \
         set HERALD_PUBSUB__BUCKETS={running} on every node (to change the count, stop every \
         worker and socket node, delete the row 'pubsub.buckets' of the table deployment_settings, \
         and start them with the new one)"
    )]
    Buckets {
        /// This node's setting.
        wanted: u16,
        /// The deployment's.
        running: i64,
    },
}

/// A node's listeners, each moved by a setting of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The API, WebSockets, console and health checks (`http.addr`).
    Http,
    /// Prometheus' `/metrics` (`metrics.prometheus_addr`).
    Prometheus,
}

/// A listener's address could not be bound: it says, in one line, which listener, the address it
/// tried, why, and the setting to change, since two nodes on one box collide on the defaults.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {}: {why}; {}", .listener.serves(), .listener.remedy())]
pub struct BindError {
    /// Which listener.
    pub listener: Listener,
    /// The address tried.
    pub addr: SocketAddr,
    /// Why it failed (not a `source`: the message already says it, on one line).
    pub why: std::io::Error,
}

impl Listener {
    /// What the listener serves.
    pub fn serves(self) -> &'static str {
        match self {
            Self::Http => "the HTTP API and WebSockets",
            Self::Prometheus => "Prometheus' /metrics",
        }
    }

    /// The variable that moves it.
    pub fn variable(self) -> &'static str {
        match self {
            Self::Http => "HERALD_HTTP_ADDR",
            Self::Prometheus => "HERALD_METRICS__PROMETHEUS_ADDR",
        }
    }

    fn remedy(self) -> String {
        match self {
            Self::Http => format!("set {} (http.addr) to a free address", self.variable()),
            Self::Prometheus => format!(
                "set {} (metrics.prometheus_addr) to a free address, or to empty for no /metrics listener",
                self.variable()
            ),
        }
    }

    /// Binds `addr`, returning the listener and the address it got (port 0 resolved).
    ///
    /// # Errors
    /// The address is taken, not local, or not allowed.
    pub async fn bind(self, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
        let fail = |why| BindError {
            listener: self,
            addr,
            why,
        };
        let listener = TcpListener::bind(addr).await.map_err(fail)?;
        let bound = listener.local_addr().map_err(fail)?;
        Ok((listener, bound))
    }
}

/// A node, built and ready to run.
pub struct App {
    settings: Settings,
    node: String,
    roles: Roles,
    /// Background work: relay, retention, partition leases, replay.
    store: Store,
    /// The group commit, the confirm recorder and the outcome writer, and nobody else.
    writes: Store,
    /// Clients' reads: sockets, API-key lookups, admin queries, /readyz.
    reads: Store,
    metrics: Metrics,
    pubsub: PubSub,
    bind_requests: Option<mpsc::Receiver<BindRequest>>,
    /// The cluster fan-out publisher's broker nodes (cluster mode).
    fanout_nodes: Option<BrokerNodes>,
    /// What marks this process's cross-node broadcasts (see [`cluster::origin_of`]).
    fanout_origin: String,
    signer: TokenSigner,
    listener: TcpListener,
    http_addr: SocketAddr,
    /// Prometheus' own listener (`metrics.prometheus_addr`), when configured.
    scrape: Option<(TcpListener, SocketAddr)>,
    demo: Option<Demo>,
    faults: Arc<Faults>,
    /// Who looks after the tables (see [`store::Upkeep`]), for /readyz.
    upkeep: &'static str,
}

impl App {
    /// Connects to PostgreSQL and binds the listener (so port 0 resolves). RabbitMQ is not needed to
    /// build: the API accepts while the broker is down, and the broker roles connect when it is up.
    ///
    /// # Errors
    /// Settings out of bounds (see [`Settings::validate`]), a weak or missing secret (see
    /// [`Settings::signing_secret`]), PostgreSQL unreachable, the
    /// address taken, StatsD misconfigured, demo files missing, or a partition count that cannot
    /// be switched to now.
    pub async fn build(settings: Settings) -> Result<Self, Error> {
        settings.validate()?;
        let secret = settings.signing_secret()?;
        if settings.socket.secret.is_none() {
            tracing::warn!(
                "HERALD_SECRET is not set: this development node signs socket tokens with the \
                 public development secret and anyone can forge them. Never in production."
            );
        }
        let roles = settings.node.roles;
        let node = node_name(&settings.node.name);
        let metrics = Metrics::new(&settings.metrics, &node, &roles.names().replace(',', "+"))?;
        let store = Store::connect(&settings.store).await?;
        let writes =
            Store::connect_sized(&settings.store, settings.store.write_connections).await?;
        let reads = Store::connect_sized(&settings.store, settings.store.read_connections).await?;
        if roles.api || roles.worker {
            check_layout(&settings, &store).await?;
        }
        if settings.cluster() && (roles.worker || roles.socket) {
            let wanted = settings.pubsub.buckets;
            let running = store
                .deployment_setting("pubsub.buckets", i64::from(wanted))
                .await?;
            if running != i64::from(wanted) {
                return Err(Error::Buckets { wanted, running });
            }
        }
        let upkeep = upkeep_mode(&settings, &store).await;
        let (listener, http_addr) = Listener::Http.bind(settings.http.addr).await?;
        let scrape = match settings.prometheus_addr() {
            None => None,
            Some(addr) => Some(Listener::Prometheus.bind(addr).await?),
        };
        let signer = TokenSigner::new(secret);
        let demo = if settings.demo.enabled && roles.api {
            tracing::warn!(
                "the demo is enabled: /demo mints tokens for any user; development only"
            );
            let producer = store.ensure_producer("demo").await?;
            Some(Demo::load(
                &settings.demo.assets_dir,
                signer.clone(),
                producer.id,
            )?)
        } else {
            None
        };
        let fanout_origin = cluster::origin_of(&node);
        let (pubsub, bind_requests, fanout_nodes) = if settings.cluster() {
            let transport =
                RabbitTransport::new(settings.queue.clone(), &settings.pubsub, &fanout_origin);
            let nodes = transport.broker_nodes();
            let timeout = settings.pubsub.bind_timeout();
            let (pubsub, requests) = PubSub::cluster(Arc::new(transport), timeout);
            (pubsub, Some(requests), Some(nodes))
        } else {
            (PubSub::new(), None, None)
        };
        let faults = Faults::new(&settings.faults).map_err(Error::Faults)?;
        if !faults.is_empty() {
            tracing::warn!(
                rules = ?settings.faults.fail_events,
                "fault injection is ON: chosen events' deliveries will fail (tests only)"
            );
        }
        Ok(Self {
            upkeep,
            faults: Arc::new(faults),
            settings,
            node,
            roles,
            store,
            writes,
            reads,
            metrics,
            pubsub,
            bind_requests,
            fanout_nodes,
            fanout_origin,
            signer,
            listener,
            http_addr,
            scrape,
            demo,
        })
    }

    /// The address the HTTP listener is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address Prometheus scrapes `/metrics` at, when it is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.scrape.as_ref().map(|(_, addr)| *addr)
    }

    /// The store this node uses.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs this node's roles until `shutdown` is cancelled, then drains (see the module docs).
    ///
    /// # Errors
    /// None today (a failed accept is retried); the `Result` leaves callers one error path.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let metrics_addr = self.metrics_addr();
        let mut wiring = Wiring::default();
        let mut api = self
            .roles
            .api
            .then(|| self.start_api(&mut wiring, &shutdown));
        let mut worker = self
            .roles
            .worker
            .then(|| self.start_worker(&mut wiring, &shutdown));
        let sockets = self.start_sockets(&mut wiring, &shutdown);
        let (every_node, router) = self.start_every_node(wiring, &sockets.state, &shutdown);
        self.log_serving(metrics_addr);
        // (1) Intake stops: the listener closes (requests in flight finish) and `shutdown` has
        // cancelled the consumers, the relay, retention, replay and the fan-out queue.
        let deadline = server::serve(
            self.listener,
            router,
            self.settings.http.header_read_timeout(),
            self.settings.shutdown_timeout(),
            shutdown,
        )
        .await;
        tracing::info!("shutting down: draining in-flight work");
        // (2) Work drains upstream to downstream: every accepted request committed, then deliveries.
        if let Some(api) = api.as_mut() {
            api.drain_intake(deadline).await;
        }
        if let Some(worker) = worker.as_mut() {
            drain("worker pool", deadline, &mut worker.consumers).await;
        }
        // (3) Sockets get close frames.
        sockets.close(deadline).await;
        // (4) Outcomes, then the publisher's confirms, then PostgreSQL and StatsD.
        if let Some(worker) = worker {
            worker.close(deadline).await;
        }
        if let Some(api) = api {
            api.close(deadline).await;
        }
        // Closing waits for connections in use; a stuck one must not hold the exit past the bound.
        drain("PostgreSQL pools", deadline, async {
            tokio::join!(self.store.close(), self.writes.close(), self.reads.close())
        })
        .await;
        every_node.close(deadline, &self.metrics).await;
        tracing::info!("shutdown complete");
        Ok(())
    }

    /// What the node serves and where, a line for each role at the default level: the node, the
    /// api's routes, the sockets, the metrics (the worker says which partitions it consumes once it
    /// has them, see `partitions`).
    fn log_serving(&self, metrics_addr: Option<SocketAddr>) {
        let addr = self.http_addr;
        tracing::info!(
            addr = %addr, node = %self.node, roles = %self.roles.names(),
            version = %env!("CARGO_PKG_VERSION"), "herald serving"
        );
        if self.roles.api {
            tracing::info!(
                "api: events at http://{addr}/api/v1/events, console at http://{addr}/console"
            );
        }
        if self.roles.socket {
            tracing::info!(
                "socket: Phoenix Channels at ws://{addr}/socket (pubsub {})",
                match self.settings.cluster() {
                    true => "cluster",
                    false => "local",
                }
            );
        }
        let statsd = match self.settings.metrics.statsd_addr.as_str() {
            "" => "no StatsD".to_owned(),
            to => format!("StatsD to {to}"),
        };
        match metrics_addr {
            Some(at) => tracing::info!("metrics: {statsd}, Prometheus at http://{at}/metrics"),
            None => tracing::info!("metrics: {statsd}, no Prometheus listener"),
        }
    }

    /// The api role: group commit, publisher and its confirm recorder, outbox relay, retention,
    /// replay jobs and the producer routes.
    fn start_api(&mut self, wiring: &mut Wiring, shutdown: &CancellationToken) -> ApiRole {
        let (settings, metrics) = (&self.settings, &self.metrics);
        let (publisher, publisher_handle, reports) = Publisher::new(settings.queue.clone());
        // Not needed to serve: accepted events wait in the outbox while the broker is away.
        wiring.links.push(Link {
            name: "publisher",
            up: publisher_handle.connected_flag(),
            required_by: None,
        });
        wiring
            .broker_nodes
            .push(("publisher", publisher_handle.broker_nodes()));
        let publisher_stop = CancellationToken::new();
        let publisher_task = tokio::spawn(publisher.run(publisher_stop.clone()));
        let recorder_task = tokio::spawn(published::record(
            reports,
            self.writes.clone(),
            metrics.clone(),
            settings.pipeline.max_status_batch,
        ));
        let commit_close = CancellationToken::new();
        let (enqueue, commit_task) = Enqueue::new(
            self.writes.clone(),
            publisher_handle.clone(),
            metrics.clone(),
            settings,
            commit_close.clone(),
        );
        let commit_task = tokio::spawn(commit_task);
        let replays = ReplayJobs::new(
            self.store.clone(),
            publisher_handle.clone(),
            metrics.clone(),
            settings,
            shutdown.child_token(),
        );
        let retention_task = tokio::spawn(retention::run(
            self.store.clone(),
            metrics.clone(),
            settings.store.clone(),
            shutdown.child_token(),
        ));
        let upkeep_task = tokio::spawn(upkeep::run(
            self.store.clone(),
            Duration::from_secs(settings.store.upkeep_interval_secs),
            shutdown.child_token(),
        ));
        let relay_task = tokio::spawn(relay::run(
            self.store.clone(),
            publisher_handle,
            metrics.clone(),
            settings.clone(),
            shutdown.child_token(),
        ));
        let limits = Arc::new(Limits {
            max_body_bytes: settings.http.max_body_bytes,
            max_batch_events: settings.pipeline.max_batch_events,
            max_data_bytes: settings.pipeline.max_data_bytes,
            max_token_ttl_secs: settings.socket.token_ttl_secs,
            max_concurrent_requests: settings.http.max_concurrent_requests,
            request_timeout: settings.http.request_timeout(),
        });
        let mut router = std::mem::take(&mut wiring.router);
        if let Some(demo) = self.demo.take() {
            router = router.merge(demo.routes(enqueue.clone(), Arc::clone(&limits)));
        }
        let depths = Arc::new(DepthProbe::new(settings.queue.clone()));
        let api_state = ApiState {
            depths: Arc::clone(&depths),
            pubsub: self.pubsub.clone(),
            store: self.reads.clone(),
            enqueue,
            metrics: metrics.clone(),
            keys: Arc::new(KeyCache::new(10_000)),
            signer: self.signer.clone(),
            limits,
            admin_keys: Arc::new(KeyCache::new(1_000)),
            replays: replays.clone(),
            default_replay_rate: settings.replay.default_rate,
        };
        wiring.router = router
            .merge(api::console::routes())
            .merge(api::routes(api_state));
        ApiRole {
            depths,
            replays,
            retention_task,
            upkeep_task,
            commit_close,
            commit_task,
            relay_task,
            publisher_stop,
            publisher_task,
            recorder_task,
        }
    }

    /// The worker role: partition leases and consumers, per-user lanes, the outcome writer.
    fn start_worker(&mut self, wiring: &mut Wiring, shutdown: &CancellationToken) -> WorkerRole {
        let (settings, metrics) = (&self.settings, &self.metrics);
        let outcomes_close = CancellationToken::new();
        let (outcomes, settled, outcome_task) = outcomes::writer(
            self.writes.clone(),
            metrics.clone(),
            self.node.clone(),
            1024,
            settings.pipeline.max_status_batch,
            outcomes_close.clone(),
        );
        let consuming = Arc::new(AtomicBool::new(false));
        wiring.links.push(Link {
            name: "consumer",
            up: Arc::clone(&consuming),
            required_by: Some("worker"),
        });
        let worker = Worker {
            pubsub: self.pubsub.clone(),
            outcomes,
            settled,
            metrics: metrics.clone(),
            retry: Arc::new(RetryPolicy::new(&settings.retry)),
            retry_delays_ms: settings.retry.delays_ms().into(),
            attempt_timeout: settings.retry.attempt_timeout(),
            reorder_window_ms: settings.pipeline.reorder_window_ms,
            faults: Arc::clone(&self.faults),
        };
        let consumer_nodes = BrokerNodes::new(&settings.queue);
        wiring
            .broker_nodes
            .push(("consumer", consumer_nodes.clone()));
        if let Some(nodes) = &self.fanout_nodes {
            wiring
                .broker_nodes
                .push(("fanout_publisher", nodes.clone()));
        }
        let (owned, partitions) = tokio::sync::watch::channel(Vec::new());
        wiring.partitions = Some(partitions);
        let coordinator = Coordinator {
            worker,
            store: self.store.clone(),
            settings: settings.clone(),
            node: self.node.clone(),
            owned,
            consuming,
            metrics: metrics.clone(),
            nodes: consumer_nodes,
        };
        WorkerRole {
            consumers: tokio::spawn(coordinator.run(shutdown.child_token())),
            outcomes_close,
            outcome_task: tokio::spawn(outcome_task),
        }
    }

    /// The socket role: WebSockets, and in cluster mode this node's fan-out queue. Every node
    /// builds the socket state (its metrics sample it), but only a socket node serves it.
    fn start_sockets(&mut self, wiring: &mut Wiring, shutdown: &CancellationToken) -> SocketRole {
        let closing = CancellationToken::new();
        let state = SocketState::new(
            &self.settings.socket,
            self.pubsub.clone(),
            self.reads.clone(),
            self.metrics.clone(),
            self.signer.clone(),
            closing.clone(),
        );
        let mut fanout_task = None;
        if self.roles.socket {
            wiring.router = std::mem::take(&mut wiring.router).merge(socket::routes(state.clone()));
            if let Some(requests) = self.bind_requests.take() {
                let connected = Arc::new(AtomicBool::new(false));
                wiring.links.push(Link {
                    name: "fanout",
                    up: Arc::clone(&connected),
                    required_by: Some("socket"),
                });
                let nodes = BrokerNodes::new(&self.settings.queue);
                wiring.broker_nodes.push(("fanout", nodes.clone()));
                fanout_task = Some(tokio::spawn(cluster::run_node_queue(
                    self.settings.queue.clone(),
                    self.settings.pubsub.buckets,
                    self.node.clone(),
                    self.fanout_origin.clone(),
                    self.pubsub.clone(),
                    requests,
                    connected,
                    nodes,
                    self.metrics.clone(),
                    shutdown.child_token(),
                )));
            }
        }
        SocketRole {
            state,
            closing,
            fanout_task,
        }
    }

    /// What every node runs: the metrics flusher, /healthz and /readyz, and Prometheus' listener.
    /// Returns them with the node's finished router.
    fn start_every_node(
        &mut self,
        wiring: Wiring,
        sockets: &SocketState,
        shutdown: &CancellationToken,
    ) -> (EveryNode, axum::Router) {
        let settings = &self.settings;
        let flusher_stop = CancellationToken::new();
        let flusher = tokio::spawn(flush_metrics(
            self.metrics.clone(),
            sockets.clone(),
            [
                ("background", self.store.clone()),
                ("writes", self.writes.clone()),
                ("reads", self.reads.clone()),
            ],
            wiring.broker_nodes.clone(),
            settings
                .metrics
                .flush_interval()
                .max(Duration::from_millis(10)),
            flusher_stop.clone(),
        ));
        let health = Health {
            store: self.reads.clone(),
            node: self.node.clone(),
            roles: self.roles,
            links: wiring.links,
            broker_nodes: wiring.broker_nodes,
            partitions: wiring.partitions,
            upkeep: self.upkeep,
        };
        let router = wiring
            .router
            .merge(api::health::routes(health))
            .fallback(api::not_found)
            // A body that stalls between reads fails its request (and frees its connection).
            .layer(RequestBodyTimeoutLayer::new(
                settings.http.body_read_timeout(),
            ));
        // Prometheus' listener stops and drains with the main one, on the same signal.
        let scrape_task = self.scrape.take().map(|(listener, _)| {
            tokio::spawn(server::serve(
                listener,
                api::scrape::routes(self.metrics.clone()),
                settings.http.header_read_timeout(),
                settings.shutdown_timeout(),
                shutdown.clone(),
            ))
        });
        let node = EveryNode {
            scrape_task,
            flusher_stop,
            flusher,
        };
        (node, router)
    }
}

/// What the roles add to the node's routes and readiness as they start.
#[derive(Default)]
struct Wiring {
    router: axum::Router,
    /// The RabbitMQ links /readyz reports.
    links: Vec<Link>,
    /// Which broker node each long-lived connection uses (readiness and metrics name it).
    broker_nodes: Vec<(&'static str, BrokerNodes)>,
    /// On a worker node: the partitions it consumes now.
    partitions: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
}

/// The api role's long-lived tasks and the switches that stop them.
struct ApiRole {
    /// The console's view of the partition queues: its connection closes with the others.
    depths: Arc<DepthProbe>,
    /// Operator replay jobs: stopped before the publisher they publish through.
    replays: ReplayJobs,
    retention_task: JoinHandle<()>,
    upkeep_task: JoinHandle<()>,
    commit_close: CancellationToken,
    commit_task: JoinHandle<()>,
    relay_task: JoinHandle<()>,
    publisher_stop: CancellationToken,
    publisher_task: JoinHandle<()>,
    recorder_task: JoinHandle<()>,
}

impl ApiRole {
    /// Step 2: replay jobs stop, the group commit writes every request it took, the relay and
    /// retention stop (both were cancelled with intake).
    async fn drain_intake(&mut self, deadline: Instant) {
        drain("replay jobs", deadline, self.replays.shutdown()).await;
        self.commit_close.cancel();
        drain("group commit", deadline, &mut self.commit_task).await;
        drain("outbox relay", deadline, &mut self.relay_task).await;
        drain("retention", deadline, &mut self.retention_task).await;
        drain("table upkeep", deadline, &mut self.upkeep_task).await;
    }

    /// Step 4: the publisher publishes what it holds and settles its confirms, which the recorder
    /// writes.
    async fn close(mut self, deadline: Instant) {
        drain("queue depth probe", deadline, self.depths.close()).await;
        self.publisher_stop.cancel();
        drain("publisher", deadline, &mut self.publisher_task).await;
        drain("confirm recorder", deadline, &mut self.recorder_task).await;
    }
}

/// The worker role's long-lived tasks.
struct WorkerRole {
    /// The partition coordinator and its consumers, cancelled with intake.
    consumers: JoinHandle<()>,
    outcomes_close: CancellationToken,
    outcome_task: JoinHandle<()>,
}

impl WorkerRole {
    /// Step 4: the outcome writer writes what the drained deliveries reported.
    async fn close(mut self, deadline: Instant) {
        self.outcomes_close.cancel();
        drain("outcome writer", deadline, &mut self.outcome_task).await;
    }
}

/// The sockets (on every node, served on socket nodes) and the cluster fan-out queue.
struct SocketRole {
    state: SocketState,
    /// Cancelled once deliveries are drained: each socket sends its close frame.
    closing: CancellationToken,
    fanout_task: Option<JoinHandle<()>>,
}

impl SocketRole {
    /// Step 3: every socket gets its close frame; the fan-out queue (cancelled with intake) ends.
    async fn close(self, deadline: Instant) {
        self.closing.cancel();
        self.state.tracker.close();
        drain("sockets", deadline, self.state.tracker.wait()).await;
        if let Some(task) = self.fanout_task {
            drain("fan-out queue", deadline, task).await;
        }
    }
}

/// What every node runs whatever its roles: Prometheus' listener and the metrics flusher.
struct EveryNode {
    scrape_task: Option<JoinHandle<Instant>>,
    flusher_stop: CancellationToken,
    flusher: JoinHandle<()>,
}

impl EveryNode {
    /// Last: the metrics listener drains, then StatsD is flushed.
    async fn close(self, deadline: Instant, metrics: &Metrics) {
        if let Some(task) = self.scrape_task {
            drain("metrics listener", deadline, task).await;
        }
        self.flusher_stop.cancel();
        let _ = self.flusher.await;
        metrics.flush();
    }
}

/// Finds who looks after the tables and, when PostgreSQL's autovacuum does not, says so once at
/// start: the operator of a production database should turn it on (Herald's own upkeep is the
/// fallback, not the plan).
async fn upkeep_mode(settings: &Settings, store: &Store) -> &'static str {
    match store.upkeep_mode().await {
        Ok(mode) => {
            let keeper = upkeep::Keeper::of(mode, settings.store.upkeep_interval_secs);
            if let Some(warning) = keeper.warning() {
                tracing::warn!("{warning}");
            }
            keeper.as_str()
        }
        Err(error) => {
            tracing::debug!(error = ?error, "cannot read the autovacuum setting");
            "unknown"
        }
    }
}

/// `node.name`, or `<hostname>-<pid>` when it is empty.
fn node_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".into());
    format!("{host}-{}", std::process::id())
}

/// Waits for one stage of the drain, up to the shared deadline.
async fn drain<F: Future>(stage: &str, deadline: Instant, stage_done: F) {
    if tokio::time::timeout_at(deadline, stage_done).await.is_err() {
        tracing::warn!(
            stage,
            "shutdown timeout reached; leftovers are redelivered or relayed later"
        );
    }
}

/// Sends buffered metrics periodically, with the node's gauges (connections, channels, pool use)
/// sampled every second.
async fn flush_metrics(
    metrics: Metrics,
    sockets: SocketState,
    pools: [(&'static str, Store); 3],
    broker_nodes: Vec<(&'static str, BrokerNodes)>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_gauge = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        since_gauge += every;
        if since_gauge >= Duration::from_secs(1) {
            metrics.socket_connections(sockets.open_connections());
            let channels = sockets.pubsub.subscriptions_under(USER_TOPIC_PREFIX);
            metrics.socket_channels(channels as u64);
            for (name, pool) in &pools {
                let (size, idle) = (pool.pool().size(), pool.pool().num_idle() as u32);
                metrics.pool_connections(
                    name,
                    u64::from(size.saturating_sub(idle)),
                    u64::from(idle),
                );
            }
            let in_use: Vec<(&'static str, String)> = broker_nodes
                .iter()
                .filter_map(|(role, nodes)| Some((*role, nodes.in_use()?)))
                .collect();
            metrics.broker_nodes(&in_use);
            since_gauge = Duration::ZERO;
        }
        metrics.flush();
    }
}

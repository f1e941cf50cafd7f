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
use crate::pipeline::{outcomes, published, relay, retention};
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
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
    signer: TokenSigner,
    listener: TcpListener,
    http_addr: SocketAddr,
    /// Prometheus' own listener (`metrics.prometheus_addr`), when configured.
    scrape: Option<(TcpListener, SocketAddr)>,
    demo: Option<Demo>,
    faults: Arc<Faults>,
}

impl App {
    /// Connects to PostgreSQL and binds the listener (so port 0 resolves). RabbitMQ is not needed to
    /// build: the API accepts while the broker is down, and the broker roles connect when it is up.
    ///
    /// # Errors
    /// A weak or missing secret (see [`Settings::signing_secret`]), PostgreSQL unreachable, the
    /// address taken, StatsD misconfigured, demo files missing, or a partition count that cannot
    /// be switched to now.
    pub async fn build(settings: Settings) -> Result<Self, Error> {
        let secret = settings.signing_secret()?;
        if settings.socket.secret.is_none() {
            tracing::warn!(
                "HERALD_SECRET is not set: this development node signs socket tokens with the \
                 public development secret and anyone can forge them. Never in production."
            );
        }
        let roles = settings.roles();
        let node = node_name(&settings.node.name);
        let metrics = Metrics::new(&settings.metrics, &node, &roles.names().replace(',', "+"))?;
        let store = Store::connect(&settings.store).await?;
        let writes =
            Store::connect_sized(&settings.store, settings.store.write_connections).await?;
        let reads = Store::connect_sized(&settings.store, settings.store.read_connections).await?;
        if roles.api || roles.worker {
            check_layout(&settings, &store).await?;
        }
        let listener = TcpListener::bind(settings.http.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: settings.http.addr,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: settings.http.addr,
            source,
        })?;
        let scrape = match settings.prometheus_addr() {
            None => None,
            Some(addr) => {
                let bind = |source| Error::Bind { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(bind)?;
                let bound = listener.local_addr().map_err(bind)?;
                Some((listener, bound))
            }
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
        let (pubsub, bind_requests, fanout_nodes) = if settings.cluster() {
            let transport = RabbitTransport::new(settings.queue.clone(), &settings.pubsub);
            let nodes = transport.broker_nodes();
            let timeout = Duration::from_millis(settings.pubsub.bind_timeout_ms);
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
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self {
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
            signer,
            listener,
            http_addr,
            scrape,
            demo,
            faults,
        } = self;
        let pipeline = &settings.pipeline;
        let mut links: Vec<Link> = Vec::new();
        // Which broker node each long-lived connection uses (readiness and metrics name it).
        let mut broker_nodes: Vec<(&'static str, BrokerNodes)> = Vec::new();
        let mut router = axum::Router::new();

        // api: group commit, publisher and its confirm recorder, outbox relay, producer routes.
        let mut api_tasks = None;
        if roles.api {
            let (publisher, publisher_handle, reports) = Publisher::new(settings.queue.clone());
            // Not needed to serve: accepted events wait in the outbox while the broker is away.
            links.push(Link {
                name: "publisher",
                up: publisher_handle.connected_flag(),
                required_by: None,
            });
            broker_nodes.push(("publisher", publisher_handle.broker_nodes()));
            let publisher_stop = CancellationToken::new();
            let publisher_task = tokio::spawn(publisher.run(publisher_stop.clone()));
            let recorder_task = tokio::spawn(published::record(
                reports,
                writes.clone(),
                metrics.clone(),
                pipeline.max_status_batch,
            ));
            let commit_close = CancellationToken::new();
            let (enqueue, commit_task) = Enqueue::new(
                writes.clone(),
                publisher_handle.clone(),
                metrics.clone(),
                &settings,
                commit_close.clone(),
            );
            let commit_task = tokio::spawn(commit_task);
            let replays = ReplayJobs::new(
                store.clone(),
                publisher_handle.clone(),
                metrics.clone(),
                &settings,
                shutdown.child_token(),
            );
            let retention_task = tokio::spawn(retention::run(
                store.clone(),
                metrics.clone(),
                settings.store.clone(),
                shutdown.child_token(),
            ));
            let relay_task = tokio::spawn(relay::run(
                store.clone(),
                publisher_handle,
                metrics.clone(),
                settings.clone(),
                shutdown.child_token(),
            ));
            let limits = Arc::new(Limits {
                max_body_bytes: settings.http.max_body_bytes,
                max_batch_events: pipeline.max_batch_events,
                max_data_bytes: pipeline.max_data_bytes,
                max_token_ttl_secs: settings.socket.token_ttl_secs,
                max_concurrent_requests: settings.http.max_concurrent_requests,
                request_timeout: Duration::from_millis(settings.http.request_timeout_ms),
            });
            if let Some(demo) = demo {
                router = router.merge(demo.routes(enqueue.clone(), Arc::clone(&limits)));
            }
            let depths = Arc::new(DepthProbe::new(settings.queue.clone()));
            router = router.merge(api::console::routes());
            let api_state = ApiState {
                depths: Arc::clone(&depths),
                pubsub: pubsub.clone(),
                store: reads.clone(),
                enqueue,
                metrics: metrics.clone(),
                keys: Arc::new(KeyCache::new(10_000)),
                signer: signer.clone(),
                limits,
                admin_keys: Arc::new(KeyCache::new(1_000)),
                replays: replays.clone(),
                default_replay_rate: settings.replay.default_rate,
            };
            router = router.merge(api::routes(api_state));
            api_tasks = Some(ApiTasks {
                depths,
                replays,
                retention_task,
                commit_close,
                commit_task,
                relay_task,
                publisher_stop,
                publisher_task,
                recorder_task,
            });
        }

        // worker: partition leases and consumers, per-user lanes, outcome writer.
        let mut worker_tasks = None;
        let (owned_partitions, owned_watch) = tokio::sync::watch::channel(Vec::new());
        if roles.worker {
            let outcomes_close = CancellationToken::new();
            let (outcomes, outcome_task) = outcomes::writer(
                writes.clone(),
                metrics.clone(),
                1024,
                pipeline.max_status_batch,
                outcomes_close.clone(),
            );
            let consuming = Arc::new(AtomicBool::new(false));
            links.push(Link {
                name: "consumer",
                up: Arc::clone(&consuming),
                required_by: Some("worker"),
            });
            let worker = Worker {
                pubsub: pubsub.clone(),
                outcomes,
                metrics: metrics.clone(),
                retry: Arc::new(RetryPolicy::new(&settings.retry)),
                retry_delays_ms: settings.retry.delays_ms().into(),
                attempt_timeout: Duration::from_millis(settings.retry.attempt_timeout_ms),
                faults,
            };
            let consumer_nodes = BrokerNodes::new(&settings.queue);
            broker_nodes.push(("consumer", consumer_nodes.clone()));
            if let Some(nodes) = &fanout_nodes {
                broker_nodes.push(("fanout_publisher", nodes.clone()));
            }
            let coordinator = Coordinator {
                worker,
                store: store.clone(),
                settings: settings.clone(),
                node: node.clone(),
                owned: owned_partitions,
                consuming,
                metrics: metrics.clone(),
                nodes: consumer_nodes,
            };
            worker_tasks = Some(WorkerTasks {
                worker_task: tokio::spawn(coordinator.run(shutdown.child_token())),
                outcomes_close,
                outcome_task: tokio::spawn(outcome_task),
            });
        }

        // socket: WebSockets, and in cluster mode this node's fan-out queue.
        let sockets_closing = CancellationToken::new();
        let socket_state = SocketState::new(
            &settings.socket,
            pubsub.clone(),
            reads.clone(),
            metrics.clone(),
            signer,
            sockets_closing.clone(),
        );
        let mut fanout_task = None;
        if roles.socket {
            router = router.merge(socket::routes(socket_state.clone()));
            if let Some(requests) = bind_requests {
                let connected = Arc::new(AtomicBool::new(false));
                links.push(Link {
                    name: "fanout",
                    up: Arc::clone(&connected),
                    required_by: Some("socket"),
                });
                let nodes = BrokerNodes::new(&settings.queue);
                broker_nodes.push(("fanout", nodes.clone()));
                fanout_task = Some(tokio::spawn(cluster::run_node_queue(
                    settings.queue.clone(),
                    node.clone(),
                    pubsub.clone(),
                    requests,
                    connected,
                    nodes,
                    metrics.clone(),
                    shutdown.child_token(),
                )));
            }
        }

        let flusher_stop = CancellationToken::new();
        let flusher = tokio::spawn(flush_metrics(
            metrics.clone(),
            socket_state.clone(),
            [
                ("background", store.clone()),
                ("writes", writes.clone()),
                ("reads", reads.clone()),
            ],
            broker_nodes.clone(),
            Duration::from_millis(settings.metrics.flush_interval_ms.max(10)),
            flusher_stop.clone(),
        ));
        let health = Health {
            store: reads.clone(),
            node: node.clone(),
            roles,
            links,
            broker_nodes,
            partitions: roles.worker.then_some(owned_watch),
        };
        let router = router
            .merge(api::health::routes(health))
            .fallback(api::not_found);

        // A body that stalls between reads fails its request (and frees its connection).
        let router = router.layer(RequestBodyTimeoutLayer::new(Duration::from_millis(
            settings.http.body_read_timeout_ms,
        )));
        // Prometheus' listener stops and drains with the main one, on the same signal.
        let scrape_task = scrape.map(|(listener, addr)| {
            tracing::info!(addr = %addr, "serving /metrics for Prometheus");
            tokio::spawn(server::serve(
                listener,
                api::scrape::routes(metrics.clone()),
                Duration::from_millis(settings.http.header_read_timeout_ms),
                settings.shutdown_timeout(),
                shutdown.clone(),
            ))
        });
        tracing::info!(addr = %http_addr, node = %node, roles = %roles.names(), "herald serving");
        let deadline = server::serve(
            listener,
            router,
            Duration::from_millis(settings.http.header_read_timeout_ms),
            settings.shutdown_timeout(),
            shutdown.clone(),
        )
        .await;
        tracing::info!("shutting down: draining in-flight work");
        if let Some(api) = &api_tasks {
            drain("replay jobs", deadline, api.replays.shutdown()).await;
            api.commit_close.cancel();
        }
        if let Some(api) = api_tasks.as_mut() {
            drain("group commit", deadline, &mut api.commit_task).await;
            drain("outbox relay", deadline, &mut api.relay_task).await;
            drain("retention", deadline, &mut api.retention_task).await;
        }
        if let Some(worker) = worker_tasks.as_mut() {
            drain("worker pool", deadline, &mut worker.worker_task).await;
        }
        sockets_closing.cancel();
        socket_state.tracker.close();
        drain("sockets", deadline, socket_state.tracker.wait()).await;
        if let Some(task) = fanout_task {
            drain("fan-out queue", deadline, task).await;
        }
        if let Some(mut worker) = worker_tasks {
            worker.outcomes_close.cancel();
            drain("outcome writer", deadline, &mut worker.outcome_task).await;
        }
        if let Some(mut api) = api_tasks {
            drain("queue depth probe", deadline, api.depths.close()).await;
            api.publisher_stop.cancel();
            drain("publisher", deadline, &mut api.publisher_task).await;
            drain("confirm recorder", deadline, &mut api.recorder_task).await;
        }
        // Closing waits for connections in use; a stuck one must not hold the exit past the bound.
        drain("PostgreSQL pools", deadline, async {
            tokio::join!(store.close(), writes.close(), reads.close())
        })
        .await;
        if let Some(task) = scrape_task {
            drain("metrics listener", deadline, task).await;
        }
        flusher_stop.cancel();
        let _ = flusher.await;
        metrics.flush();
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// The api role's long-lived tasks and the switches that stop them.
struct ApiTasks {
    /// The console's view of the partition queues: its connection closes with the others.
    depths: Arc<DepthProbe>,
    /// Operator replay jobs: stopped before the publisher they publish through.
    replays: ReplayJobs,
    retention_task: JoinHandle<()>,
    commit_close: CancellationToken,
    commit_task: JoinHandle<()>,
    relay_task: JoinHandle<()>,
    publisher_stop: CancellationToken,
    publisher_task: JoinHandle<()>,
    recorder_task: JoinHandle<()>,
}

/// The worker role's long-lived tasks.
struct WorkerTasks {
    worker_task: JoinHandle<()>,
    outcomes_close: CancellationToken,
    outcome_task: JoinHandle<()>,
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

//! Builds a node and runs it: every role in one process (HTTP API, sockets, outbox relay, worker
//! pool), started together and shut down in order.
//!
//! Shutdown reverses startup. (1) Intake stops: the listener closes and the consumer is cancelled.
//! (2) Work drains upstream to downstream: in-flight requests finish, the group commit writes every
//! request it took (each 2xx is committed), the relay stops, in-flight deliveries finish and ack.
//! (3) Sockets get close frames (1012: reconnect elsewhere). (4) Outcomes are written, the publisher
//! publishes what it holds and settles its confirms, then PostgreSQL closes and StatsD is flushed.
//! One `node.shutdown_timeout_ms` bounds it all; what is left then is redelivered or relayed later.

use crate::api::{self, ApiState, KeyCache, Limits};
use crate::config::Settings;
use crate::demo::Demo;
use crate::metrics::{self, Metrics};
use crate::pipeline::enqueue::Enqueue;
use crate::pipeline::worker::Worker;
use crate::pipeline::{outcomes, published, relay};
use crate::pubsub::PubSub;
use crate::queue::Publisher;
use crate::socket::token::{DEVELOPMENT_SECRET, TokenSigner};
use crate::socket::{self, SocketState};
use crate::store::{self, Store};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// The HTTP server failed.
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
    /// The demo is enabled but its files are missing.
    #[error(transparent)]
    Demo(#[from] crate::demo::MissingAsset),
}

/// A node, built and ready to run.
pub struct App {
    settings: Settings,
    store: Store,
    metrics: Metrics,
    pubsub: PubSub,
    signer: TokenSigner,
    listener: TcpListener,
    http_addr: SocketAddr,
    demo: Option<Demo>,
}

impl App {
    /// Connects to PostgreSQL and binds the listener (so port 0 resolves). RabbitMQ is not needed to
    /// build: the API accepts while the broker is down, and the broker roles connect when it is up.
    ///
    /// # Errors
    /// PostgreSQL unreachable, the address taken, or StatsD misconfigured.
    pub async fn build(settings: Settings) -> Result<Self, Error> {
        let metrics = Metrics::new(&settings.metrics)?;
        let store = Store::connect(&settings.store).await?;
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
        let secret = match &settings.socket.secret {
            Some(secret) => secret.expose().to_owned(),
            None => {
                tracing::warn!(
                    "HERALD_SECRET is not set: socket tokens are signed with the public development \
                     secret and anyone can forge them. Set HERALD_SECRET in production."
                );
                DEVELOPMENT_SECRET.to_owned()
            }
        };
        let signer = TokenSigner::new(&secret);
        let demo = if settings.demo.enabled {
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
        Ok(Self {
            demo,
            signer,
            settings,
            store,
            metrics,
            pubsub: PubSub::new(),
            listener,
            http_addr,
        })
    }

    /// The address the HTTP listener is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The store this node uses.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs every role until `shutdown` is cancelled, then drains (see the module docs).
    ///
    /// # Errors
    /// The HTTP server failed; the node still drained.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self {
            settings,
            store,
            metrics,
            pubsub,
            signer,
            listener,
            http_addr,
            demo,
        } = self;
        let pipeline = &settings.pipeline;

        let (publisher, publisher_handle, reports) = Publisher::new(settings.queue.clone());
        let publisher_stop = CancellationToken::new();
        let publisher_task = tokio::spawn(publisher.run(publisher_stop.clone()));
        let recorder_task = tokio::spawn(published::record(
            reports,
            store.clone(),
            metrics.clone(),
            pipeline.max_status_batch,
        ));

        let commit_close = CancellationToken::new();
        let (enqueue, commit_task) = Enqueue::new(
            store.clone(),
            publisher_handle.clone(),
            metrics.clone(),
            pipeline,
            commit_close.clone(),
        );
        let commit_task = tokio::spawn(commit_task);

        let outcomes_close = CancellationToken::new();
        let (outcomes, outcome_task) = outcomes::writer(
            store.clone(),
            metrics.clone(),
            usize::from(settings.queue.prefetch) * 2,
            pipeline.max_status_batch,
            outcomes_close.clone(),
        );
        let outcome_task = tokio::spawn(outcome_task);

        let relay_task = tokio::spawn(relay::run(
            store.clone(),
            publisher_handle.clone(),
            metrics.clone(),
            pipeline.clone(),
            shutdown.child_token(),
        ));

        let worker = Worker {
            pubsub: pubsub.clone(),
            outcomes,
            metrics: metrics.clone(),
        };
        let worker_task = tokio::spawn(worker.run(settings.queue.clone(), shutdown.child_token()));

        let sockets_closing = CancellationToken::new();
        let socket_state = SocketState {
            pubsub,
            store: store.clone(),
            metrics: metrics.clone(),
            settings: Arc::new(settings.socket.clone()),
            signer: signer.clone(),
            closing: sockets_closing.clone(),
            tracker: TaskTracker::new(),
            open: Arc::new(AtomicU64::new(0)),
        };
        let flusher_stop = CancellationToken::new();
        let flusher = tokio::spawn(flush_metrics(
            metrics.clone(),
            socket_state.clone(),
            Duration::from_millis(settings.metrics.flush_interval_ms.max(10)),
            flusher_stop.clone(),
        ));

        let demo_routes = demo.map(|demo| demo.routes(enqueue.clone()));
        let api_state = ApiState {
            pubsub: socket_state.pubsub.clone(),
            store: store.clone(),
            enqueue,
            publisher: publisher_handle,
            metrics: metrics.clone(),
            keys: Arc::new(KeyCache::new(Duration::from_secs(30), 10_000)),
            signer,
            limits: Arc::new(Limits {
                max_body_bytes: settings.http.max_body_bytes,
                max_batch_events: pipeline.max_batch_events,
                max_data_bytes: pipeline.max_data_bytes,
                max_token_ttl_secs: settings.socket.token_ttl_secs,
            }),
        };
        let mut router = api::routes(api_state).merge(socket::routes(socket_state.clone()));
        if let Some(demo_routes) = demo_routes {
            router = router.merge(demo_routes);
        }
        let router = router.fallback(api::not_found);

        tracing::info!(addr = %http_addr, "herald serving HTTP and WebSockets");
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .map_err(Error::Serve);
        if let Err(error) = &served {
            tracing::error!(error = ?error, "HTTP server failed; draining");
            shutdown.cancel();
        }

        tracing::info!("shutting down: draining in-flight work");
        let deadline = Instant::now() + settings.shutdown_timeout();
        commit_close.cancel();
        drain("group commit", deadline, commit_task).await;
        drain("outbox relay", deadline, relay_task).await;
        drain("worker pool", deadline, worker_task).await;
        sockets_closing.cancel();
        socket_state.tracker.close();
        drain("sockets", deadline, socket_state.tracker.wait()).await;
        outcomes_close.cancel();
        drain("outcome writer", deadline, outcome_task).await;
        publisher_stop.cancel();
        drain("publisher", deadline, publisher_task).await;
        drain("confirm recorder", deadline, recorder_task).await;
        store.close().await;
        flusher_stop.cancel();
        let _ = flusher.await;
        metrics.flush();
        tracing::info!("shutdown complete");
        served
    }
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

/// Sends buffered metrics periodically, with the gauges sampled at the same beat.
async fn flush_metrics(
    metrics: Metrics,
    sockets: SocketState,
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
            since_gauge = Duration::ZERO;
        }
        metrics.flush();
    }
}

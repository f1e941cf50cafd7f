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
//!
//! Assembling the node is `build` (settings, pools, deployment-wide checks, listeners); each role's
//! start and its part of each shutdown step are side by side in `roles`; the order of the steps
//! is [`App::run`], here, the one place it is written.

mod build;
mod listener;
mod roles;

pub use listener::{BindError, Listener};

use crate::config::{Roles, Settings};
use crate::demo::Demo;
use crate::metrics::{self, Metrics};
use crate::pipeline::faults::Faults;
use crate::pubsub::{BindRequest, PubSub};
use crate::queue::BrokerNodes;
use crate::server;
use crate::store::{self, Store};
use crate::token::TokenSigner;
use roles::Wiring;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// Traces cannot be exported as configured.
    #[error(transparent)]
    Traces(#[from] crate::traces::TracesError),
    /// The Web Push sender cannot be built.
    #[error(transparent)]
    WebPush(#[from] crate::webpush::sender::SenderError),
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
    /// The Web Push sender, on a worker node with Web Push on.
    webpush_sender: Option<Arc<crate::webpush::sender::Sender>>,
}

impl App {
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
            worker.drain_deliveries(deadline).await;
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
        // The exporter waits for its last requests, which run on this runtime: off its threads.
        let _ = tokio::task::spawn_blocking(crate::traces::flush).await;
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

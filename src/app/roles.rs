//! The roles a node runs, each started into the node's wiring (routes, readiness links, broker
//! nodes) and each with its part of the shutdown beside its start: what a role spawns, it stops.

use super::{App, drain};
use crate::api::health::{Health, Link};
use crate::api::{self, ApiState, KeyCache, Limits};
use crate::cluster;
use crate::event::USER_TOPIC_PREFIX;
use crate::metrics::Metrics;
use crate::pipeline::enqueue::Enqueue;
use crate::pipeline::head_start::HeadStart;
use crate::pipeline::partitions::Coordinator;
use crate::pipeline::replay::ReplayJobs;
use crate::pipeline::retry::RetryPolicy;
use crate::pipeline::worker::Worker;
use crate::pipeline::{outcomes, published, relay, retention, upkeep};
use crate::queue::{BrokerNodes, DepthProbe, Publisher};
use crate::server;
use crate::socket::{self, SocketState};
use crate::store::Store;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyTimeoutLayer;

impl App {
    /// The api role: group commit, publisher and its confirm recorder, outbox relay, retention,
    /// replay jobs and the producer routes.
    pub(super) fn start_api(
        &mut self,
        wiring: &mut Wiring,
        shutdown: &CancellationToken,
    ) -> ApiRole {
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
        // A node that also serves sockets gives its own clients a head start.
        let max_events = settings.pipeline.push_from_commit;
        let head_start = (self.roles.socket && max_events > 0)
            .then(|| HeadStart::new(self.pubsub.clone(), Arc::clone(&self.faults), max_events));
        let (enqueue, commit_task) = Enqueue::new(
            self.writes.clone(),
            publisher_handle.clone(),
            metrics.clone(),
            settings,
            head_start,
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
            webpush: webpush_api(&settings.webpush),
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
    pub(super) fn start_worker(
        &mut self,
        wiring: &mut Wiring,
        shutdown: &CancellationToken,
    ) -> WorkerRole {
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
            webpush: Arc::new(settings.webpush.clone()),
            retry_delays_ms: settings.retry.delays_ms().into(),
            attempt_timeout: settings.retry.attempt_timeout(),
            broker_timeout: settings.queue.confirm_timeout(),
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
        let webpush_stop = CancellationToken::new();
        let webpush_task = self
            .webpush_sender
            .take()
            .map(|sender| tokio::spawn(sender.run(webpush_stop.clone())));
        WorkerRole {
            consumers: tokio::spawn(coordinator.run(shutdown.child_token())),
            outcomes_close,
            outcome_task: tokio::spawn(outcome_task),
            webpush_stop,
            webpush_task,
        }
    }

    /// The socket role: WebSockets, and in cluster mode this node's fan-out queue. Every node
    /// builds the socket state (its metrics sample it), but only a socket node serves it.
    pub(super) fn start_sockets(
        &mut self,
        wiring: &mut Wiring,
        shutdown: &CancellationToken,
    ) -> SocketRole {
        let closing = CancellationToken::new();
        let mut state = SocketState::new(
            &self.settings.socket,
            self.pubsub.clone(),
            self.reads.clone(),
            self.metrics.clone(),
            self.signer.clone(),
            closing.clone(),
        );
        let mut fanout_task = None;
        let receipts_stop = CancellationToken::new();
        let mut receipts_task = None;
        if self.roles.socket {
            state.receipts = crate::webpush::receipts::Receipts::new(&self.settings.webpush);
            receipts_task = state.receipts.clone().map(|receipts| {
                tokio::spawn(crate::webpush::receipts::run(
                    receipts,
                    self.store.clone(),
                    self.metrics.clone(),
                    self.settings.webpush.receipt_flush(),
                    receipts_stop.clone(),
                ))
            });
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
            receipts_stop,
            receipts_task,
        }
    }

    /// What every node runs: the metrics flusher, /healthz and /readyz, and Prometheus' listener.
    /// Returns them with the node's finished router.
    pub(super) fn start_every_node(
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

/// What the subscription routes need of Web Push, on a node with a VAPID key (validated at load).
fn webpush_api(settings: &crate::config::WebPushSettings) -> Option<Arc<api::webpush::WebPushApi>> {
    let key = settings.vapid_private_key.as_ref()?;
    let key = crate::webpush::VapidKey::from_base64(key.expose()).ok()?;
    Some(Arc::new(api::webpush::WebPushApi {
        public_key: key.public_base64().to_owned(),
        policy: crate::webpush::sender::policy_of(settings),
        max_per_user: settings.max_subscriptions_per_user,
    }))
}

/// What the roles add to the node's routes and readiness as they start.
#[derive(Default)]
pub(super) struct Wiring {
    router: axum::Router,
    /// The RabbitMQ links /readyz reports.
    links: Vec<Link>,
    /// Which broker node each long-lived connection uses (readiness and metrics name it).
    broker_nodes: Vec<(&'static str, BrokerNodes)>,
    /// On a worker node: the partitions it consumes now.
    partitions: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
}

/// The api role's long-lived tasks and the switches that stop them.
pub(super) struct ApiRole {
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
    pub(super) async fn drain_intake(&mut self, deadline: Instant) {
        drain("replay jobs", deadline, self.replays.shutdown()).await;
        self.commit_close.cancel();
        drain("group commit", deadline, &mut self.commit_task).await;
        drain("outbox relay", deadline, &mut self.relay_task).await;
        drain("retention", deadline, &mut self.retention_task).await;
        drain("table upkeep", deadline, &mut self.upkeep_task).await;
    }

    /// Step 4: the publisher publishes what it holds and settles its confirms, which the recorder
    /// writes.
    pub(super) async fn close(mut self, deadline: Instant) {
        drain("queue depth probe", deadline, self.depths.close()).await;
        self.publisher_stop.cancel();
        drain("publisher", deadline, &mut self.publisher_task).await;
        drain("confirm recorder", deadline, &mut self.recorder_task).await;
    }
}

/// The worker role's long-lived tasks.
pub(super) struct WorkerRole {
    /// The partition coordinator and its consumers, cancelled with intake.
    consumers: JoinHandle<()>,
    outcomes_close: CancellationToken,
    outcome_task: JoinHandle<()>,
    /// The Web Push sender: stops claiming, then waits for its requests in flight.
    webpush_stop: CancellationToken,
    webpush_task: Option<JoinHandle<()>>,
}

impl WorkerRole {
    /// Step 2: in-flight deliveries finish and ack (the consumers were cancelled with intake).
    pub(super) async fn drain_deliveries(&mut self, deadline: Instant) {
        drain("worker pool", deadline, &mut self.consumers).await;
    }

    /// Step 4: the outcome writer writes what the drained deliveries reported; the Web Push
    /// sender finishes its requests (a push it could not record is due again after its claim).
    pub(super) async fn close(mut self, deadline: Instant) {
        self.outcomes_close.cancel();
        self.webpush_stop.cancel();
        drain("outcome writer", deadline, &mut self.outcome_task).await;
        if let Some(task) = self.webpush_task {
            drain("web push sender", deadline, task).await;
        }
    }
}

/// The sockets (on every node, served on socket nodes) and the cluster fan-out queue.
pub(super) struct SocketRole {
    pub(super) state: SocketState,
    /// Cancelled once deliveries are drained: each socket sends its close frame.
    closing: CancellationToken,
    fanout_task: Option<JoinHandle<()>>,
    /// The Web Push receipts' flusher: stopped after the sockets, then flushes once more.
    receipts_stop: CancellationToken,
    receipts_task: Option<JoinHandle<()>>,
}

impl SocketRole {
    /// Step 3: every socket gets its close frame; the fan-out queue (cancelled with intake) ends.
    pub(super) async fn close(self, deadline: Instant) {
        self.closing.cancel();
        self.state.tracker.close();
        drain("sockets", deadline, self.state.tracker.wait()).await;
        if let Some(task) = self.fanout_task {
            drain("fan-out queue", deadline, task).await;
        }
        self.receipts_stop.cancel();
        if let Some(task) = self.receipts_task {
            drain("push receipts", deadline, task).await;
        }
    }
}

/// What every node runs whatever its roles: Prometheus' listener and the metrics flusher.
pub(super) struct EveryNode {
    scrape_task: Option<JoinHandle<Instant>>,
    flusher_stop: CancellationToken,
    flusher: JoinHandle<()>,
}

impl EveryNode {
    /// Last: the metrics listener drains, then StatsD is flushed.
    pub(super) async fn close(self, deadline: Instant, metrics: &Metrics) {
        if let Some(task) = self.scrape_task {
            drain("metrics listener", deadline, task).await;
        }
        self.flusher_stop.cancel();
        let _ = self.flusher.await;
        metrics.flush();
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

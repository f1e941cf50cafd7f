//! Every StatsD metric Herald emits, named in one place (one method per telemetry event).
//!
//! Call sites never spell a metric name. Tags are DogStatsD (`name:1|c|#tag:value`) and always of low
//! cardinality: never a user id or an event id. Metrics are buffered and sent every
//! `metrics.flush_interval_ms` (or when a packet is full), so hot paths cost a mutex and a format, not
//! a syscall.

use crate::config::MetricsSettings;
use cadence::prelude::*;
use cadence::{BufferedUdpMetricSink, Metric, MetricBuilder, NopMetricSink, StatsdClient};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

/// The socket tag of user sockets.
pub const USER_SOCKET: &str = "UserSocket";
/// The channel tag of user channels.
pub const USER_CHANNEL: &str = "UserChannel";
/// The socket tag of the stats socket.
pub const STATS_SOCKET: &str = "StatsSocket";
/// The channel tag of stats channels.
pub const STATS_CHANNEL: &str = "StatsChannel";

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up StatsD to {addr}")]
pub struct Error {
    addr: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// A cheap handle to the StatsD client.
#[derive(Clone)]
pub struct Metrics {
    client: Arc<StatsdClient>,
    /// Tags every metric carries, last (so each metric's own tags keep their documented order).
    node: Arc<str>,
    roles: Arc<str>,
}

fn status(success: bool) -> &'static str {
    if success { "success" } else { "fail" }
}

impl Metrics {
    /// Builds the client for node `node` running `roles` (`api+worker+socket`); an empty
    /// `statsd_addr` gives a client that sends nothing.
    ///
    /// # Errors
    /// The UDP socket cannot be bound or the address does not resolve.
    pub fn new(settings: &MetricsSettings, node: &str, roles: &str) -> Result<Self, Error> {
        let client = if settings.statsd_addr.is_empty() {
            StatsdClient::from_sink(&settings.prefix, NopMetricSink)
        } else {
            let fail = |source: Box<dyn std::error::Error + Send + Sync>| Error {
                addr: settings.statsd_addr.clone(),
                source,
            };
            let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| fail(Box::new(e)))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| fail(Box::new(e)))?;
            let sink = BufferedUdpMetricSink::with_capacity(
                settings.statsd_addr.as_str(),
                socket,
                settings.packet_bytes,
            )
            .map_err(|e| fail(Box::new(e)))?;
            StatsdClient::builder(&settings.prefix, sink)
                .with_error_handler(|e| tracing::debug!(error = %e, "statsd send failed"))
                .build()
        };
        Ok(Self {
            client: Arc::new(client),
            node: node.into(),
            roles: roles.into(),
        })
    }

    /// A client that sends nothing (for tools that need no metrics).
    pub fn disabled() -> Self {
        Self {
            client: Arc::new(StatsdClient::from_sink("", NopMetricSink)),
            node: "".into(),
            roles: "".into(),
        }
    }

    /// Adds the node's identity tags to a metric.
    fn tagged<'m, 'c, T>(&'c self, metric: MetricBuilder<'m, 'c, T>) -> MetricBuilder<'m, 'c, T>
    where
        T: Metric + From<String>,
        'c: 'm,
    {
        metric
            .with_tag("node", &self.node)
            .with_tag("roles", &self.roles)
    }

    /// Sends what is buffered.
    pub fn flush(&self) {
        let _ = self.client.flush();
    }

    /// A socket connect attempt: the token was accepted or refused.
    pub fn socket_connect(&self, socket: &'static str, success: bool) {
        self.tagged(
            self.client
                .count_with_tags("socket_connect", 1)
                .with_tag("status", status(success))
                .with_tag("socket", socket),
        )
        .send();
    }

    /// A channel join was accepted or refused.
    pub fn channel_join(&self, channel: &'static str, success: bool) {
        self.tagged(
            self.client
                .count_with_tags("channel_join", 1)
                .with_tag("status", status(success))
                .with_tag("channel", channel),
        )
        .send();
    }

    /// An event reached a client socket; `latency_ms` is push time minus enqueue time (wall clock).
    pub fn push_delivered(&self, latency_ms: u64) {
        self.tagged(
            self.client
                .histogram_with_tags("pipeline.push_delivered", latency_ms),
        )
        .send();
    }

    /// One worker run finished (broadcast, outcomes recorded).
    pub fn worker_processed(&self, elapsed: Duration, outcome: &'static str) {
        self.tagged(
            self.client
                .time_with_tags("pipeline.worker.process_time", elapsed)
                .with_tag("outcome", outcome),
        )
        .send();
    }

    /// Events accepted by the API (new rows), per request.
    pub fn events_accepted(&self, count: usize, endpoint: &'static str) {
        if count > 0 {
            self.tagged(
                self.client
                    .count_with_tags("api.events.accepted", count as i64)
                    .with_tag("endpoint", endpoint),
            )
            .send();
        }
    }

    /// Events the API recognised as retries of an idempotency key.
    pub fn events_duplicate(&self, count: usize) {
        if count > 0 {
            self.tagged(
                self.tagged(
                    self.client
                        .count_with_tags("api.events.duplicate", count as i64),
                ),
            )
            .send();
        }
    }

    /// An API request answered with an error code.
    pub fn api_error(&self, code: &'static str) {
        self.tagged(
            self.client
                .count_with_tags("api.errors", 1)
                .with_tag("code", code),
        )
        .send();
    }

    /// One group commit: how many events, and how long the transaction took.
    pub fn commit(&self, events: usize, elapsed: Duration) {
        self.tagged(
            self.client
                .histogram_with_tags("store.commit.batch_size", events as u64),
        )
        .send();
        self.tagged(self.tagged(self.client.time_with_tags("store.commit.time", elapsed)))
            .send();
    }

    /// Requests PostgreSQL refused for their data, found by splitting a failed group commit (the
    /// rest of the batch was committed).
    pub fn commit_refused(&self, requests: usize) {
        self.tagged(
            self.client
                .count_with_tags("store.commit.refused", requests as i64),
        )
        .send();
    }

    /// A status UPDATE batch (`kind` = published or outcome).
    pub fn status_batch(&self, kind: &'static str, rows: usize, elapsed: Duration) {
        self.tagged(
            self.client
                .histogram_with_tags("store.status.batch_size", rows as u64)
                .with_tag("kind", kind),
        )
        .send();
        self.tagged(
            self.client
                .time_with_tags("store.status.time", elapsed)
                .with_tag("kind", kind),
        )
        .send();
    }

    /// Messages handed to the publisher (`source` = commit, relay or replay) and the events they
    /// carry: messages per event is the wire's batching, and relay republishes are amplification.
    pub fn messages_published(&self, source: &'static str, messages: usize, events: usize) {
        if messages > 0 {
            self.tagged(
                self.client
                    .count_with_tags("queue.publish.messages", messages as i64)
                    .with_tag("source", source),
            )
            .send();
            self.tagged(
                self.client
                    .count_with_tags("queue.publish.events", events as i64)
                    .with_tag("source", source),
            )
            .send();
        }
    }

    /// Messages (outbox rows) waiting for a broker confirm, sampled by the relay.
    pub fn outbox_depth(&self, messages: i64) {
        self.tagged(
            self.client
                .gauge_with_tags("pipeline.outbox.messages", messages.max(0) as u64),
        )
        .send();
    }

    /// A message a worker took from a partition: how many events it carried.
    pub fn worker_message(&self, events: usize) {
        self.tagged(
            self.client
                .histogram_with_tags("pipeline.worker.message_events", events as u64),
        )
        .send();
    }

    /// One user's run of events broadcast together: how many.
    pub fn worker_run(&self, events: usize) {
        self.tagged(
            self.client
                .histogram_with_tags("pipeline.worker.run_events", events as u64),
        )
        .send();
    }

    /// Events taken from the broker and not yet settled on this worker node.
    pub fn worker_in_flight(&self, events: u64) {
        self.tagged(
            self.client
                .gauge_with_tags("pipeline.worker.in_flight", events),
        )
        .send();
    }

    /// Partitions this worker node consumes.
    pub fn partitions_owned(&self, count: usize) {
        self.tagged(
            self.client
                .gauge_with_tags("pipeline.partitions.owned", count as u64),
        )
        .send();
    }

    /// A partition came to this node or left it (`change` = acquired, released or lost).
    pub fn partition_moved(&self, change: &'static str) {
        self.tagged(
            self.client
                .count_with_tags("pipeline.partitions.moved", 1)
                .with_tag("change", change),
        )
        .send();
    }

    /// Messages confirmed by the broker.
    pub fn publish_confirmed(&self, count: usize) {
        self.tagged(
            self.client
                .count_with_tags("queue.publish.confirmed", count as i64),
        )
        .send();
    }

    /// Messages not confirmed (nack, timeout, lost connection, stale); the relay republishes them.
    pub fn publish_unconfirmed(&self, count: usize, reason: &'static str) {
        self.tagged(
            self.client
                .count_with_tags("queue.publish.unconfirmed", count as i64)
                .with_tag("reason", reason),
        )
        .send();
    }

    /// Committed messages not handed to the publisher (buffer full or broker down); the relay owns
    /// them.
    pub fn publish_deferred(&self, count: usize) {
        if count > 0 {
            self.tagged(
                self.client
                    .count_with_tags("queue.publish.deferred", count as i64),
            )
            .send();
        }
    }

    /// A RabbitMQ connection was lost or could not be made (`role` = publisher or consumer).
    pub fn queue_connection_lost(&self, role: &'static str) {
        self.tagged(
            self.client
                .count_with_tags("queue.connection.lost", 1)
                .with_tag("role", role),
        )
        .send();
    }

    /// Which broker node a role's connection uses (`queue.amqp_url` may list several), sampled
    /// every second: a gauge of 1 tagged with the role and the node's `host:port`.
    pub fn broker_node(&self, role: &'static str, node: &str) {
        self.tagged(
            self.client
                .gauge_with_tags("queue.node", 1)
                .with_tag("role", role)
                .with_tag("broker", node),
        )
        .send();
    }

    /// Events the outbox relay republished.
    pub fn relay_republished(&self, count: usize) {
        if count > 0 {
            self.tagged(
                self.client
                    .count_with_tags("pipeline.relay.republished", count as i64),
            )
            .send();
        }
    }

    /// Events the sweeper sent back through the outbox: no message carried them any more.
    pub fn sweep_events(&self, count: usize) {
        if count > 0 {
            self.tagged(
                self.client
                    .count_with_tags("pipeline.sweep.events", count as i64),
            )
            .send();
        }
    }

    /// Partitions the sweeper looked at, and whether each was idle enough to sweep (`idle`) or
    /// skipped because its worker or queue was busy (`busy`).
    pub fn sweep_partitions(&self, state: &'static str, count: usize) {
        if count > 0 {
            self.tagged(
                self.client
                    .count_with_tags("pipeline.sweep.partitions", count as i64)
                    .with_tag("state", state),
            )
            .send();
        }
    }

    /// A retry's publish got no confirm in time: its message is requeued, the attempt made again.
    pub fn retry_unconfirmed(&self) {
        self.tagged(self.client.count_with_tags("pipeline.retry.unconfirmed", 1))
            .send();
    }

    /// Delivery outcomes (`pushed`, `offline`, `failed`) of `count` events.
    pub fn delivery_outcome(&self, outcome: &'static str, count: usize) {
        self.tagged(
            self.client
                .count_with_tags("pipeline.worker.delivered", count as i64)
                .with_tag("outcome", outcome),
        )
        .send();
    }

    /// A failed delivery attempt was scheduled for a retry through a delay queue. `attempt` is the
    /// attempt that failed (1 .. max_attempts - 1: low cardinality).
    pub fn retry_scheduled(&self, attempt: u32) {
        self.client
            .count_with_tags("pipeline.retry.scheduled", 1)
            .with_tag("attempt", &attempt.to_string())
            .send();
    }

    /// An event's last attempt failed: it is marked failed and its message dead-lettered.
    pub fn dead_lettered(&self) {
        self.client.count("pipeline.dead_lettered", 1).ok();
    }

    /// Events an operator replay handed to the publisher (`source` = cli or api), per step.
    pub fn replay_published(&self, count: usize, source: &'static str) {
        if count > 0 {
            self.client
                .count_with_tags("pipeline.replay.published", count as i64)
                .with_tag("source", source)
                .send();
        }
    }

    /// Events a replay claimed but could not hand over (broker down): the outbox relay sends them.
    pub fn replay_deferred(&self, count: usize, source: &'static str) {
        if count > 0 {
            self.client
                .count_with_tags("pipeline.replay.deferred", count as i64)
                .with_tag("source", source)
                .send();
        }
    }

    /// A connection was dropped because its outbound queue was full (a client that does not read).
    pub fn socket_overflow(&self) {
        self.tagged(self.tagged(self.client.count_with_tags("socket.outbound.overflow", 1)))
            .send();
    }

    /// A client frame could not be decoded.
    pub fn socket_malformed_frame(&self, reason: &'static str) {
        self.tagged(
            self.client
                .count_with_tags("socket.frame.malformed", 1)
                .with_tag("reason", reason),
        )
        .send();
    }

    /// A channel saw a seq it had already pushed (a redelivery) and dropped it.
    pub fn socket_duplicate_dropped(&self) {
        self.tagged(self.tagged(self.client.count_with_tags("socket.push.duplicate", 1)))
            .send();
    }

    /// A channel filled a gap in a user's sequence from PostgreSQL (`count` events).
    pub fn socket_gap_filled(&self, count: usize) {
        self.tagged(
            self.client
                .count_with_tags("socket.push.gap_filled", count as i64),
        )
        .send();
    }

    /// Clients acknowledged having shown events (delivered to a person, not just pushed).
    pub fn client_acked(&self, count: u64) {
        if count > 0 {
            self.tagged(
                self.tagged(
                    self.client
                        .count_with_tags("socket.client_acked", count as i64),
                ),
            )
            .send();
        }
    }

    /// Delivered events pruned by retention.
    pub fn events_pruned(&self, count: u64) {
        if count > 0 {
            self.tagged(
                self.client
                    .count_with_tags("store.events.pruned", count as i64),
            )
            .send();
        }
    }

    /// A stats channel `ping` was handled.
    pub fn stats_ping(&self, elapsed: Duration) {
        self.tagged(self.tagged(self.client.time_with_tags("stats_channel.ping", elapsed)))
            .send();
    }

    /// Open WebSocket connections on this node.
    pub fn socket_connections(&self, open: u64) {
        self.tagged(self.tagged(self.client.gauge_with_tags("socket.connections", open)))
            .send();
    }
}

//! Every metric Herald emits, declared once and sent to two outputs: StatsD (DogStatsD tags, pushed)
//! and a Prometheus registry (scraped at `/metrics`, see [`crate::app`]).
//!
//! Call sites never spell a metric name: each telemetry event is one method here (vector's internal
//! events). `Instruments::declare` is the one list of metrics, each with its StatsD name, its tag
//! keys, its help text and, for histograms, its buckets; a method records into one instrument, and
//! the instrument feeds both outputs with the same name and tags. Prometheus names are the StatsD
//! names with dots as underscores (`pipeline.push_delivered` -> `pipeline_push_delivered`; counters
//! gain OpenMetrics' `_total`), in the same units (milliseconds, counts).
//!
//! Tags are always of low cardinality: never a user id or an event id (a partition number is bounded
//! by `queue.partitions`). Every metric carries `node` and `roles`, as cadence default tags on the
//! StatsD side and registry-wide labels on the Prometheus side, so no call site can forget or repeat
//! them. StatsD metrics are buffered and sent every `metrics.flush_interval_ms` (or when a packet is
//! full), so hot paths cost a mutex and a format, not a syscall; Prometheus instruments are atomics
//! (histograms a mutex) behind a label-set lookup.

use crate::config::MetricsSettings;
use cadence::prelude::*;
use cadence::{
    BufferedUdpMetricSink, MetricBuilder, NopMetricSink, StatsdClient, StatsdClientBuilder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::borrow::Cow;
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

/// The content type of [`Metrics::render`]: OpenMetrics text, which Prometheus scrapes natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up StatsD to {addr}")]
pub struct Error {
    addr: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Buckets of end-to-end latency, in ms (`pipeline.push_delivered`): a few ms on an idle node, up
/// to the retry schedule's seconds and minutes for an event that needed retries.
const LATENCY_MS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
    30_000.0, 60_000.0, 300_000.0,
];
/// Buckets of one stage's work, in ms (a worker run, a group commit, a status batch): under a
/// millisecond when idle, up to the 10 s attempt timeout.
const WORK_MS: &[f64] = &[
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 10_000.0,
];
/// Buckets of batch sizes (events per commit, message or run; rows per status batch).
const SIZES: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0,
];

/// A label set: the metric's own tags (node and roles are the registry's).
type Labels = Vec<(&'static str, String)>;

fn labels(keys: &'static [&'static str], values: &[&str]) -> Labels {
    keys.iter()
        .zip(values)
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect()
}

/// A counter: StatsD `|c`, Prometheus `<name>_total`.
struct CounterMetric {
    name: &'static str,
    tags: &'static [&'static str],
    family: Family<Labels, Counter>,
}

/// A gauge: StatsD `|g`, Prometheus gauge.
struct GaugeMetric {
    name: &'static str,
    tags: &'static [&'static str],
    family: Family<Labels, Gauge>,
}

/// How a distribution is sent to StatsD: a histogram (`|h`) or a timing in ms (`|ms`).
#[derive(Clone, Copy)]
enum Shape {
    Histogram,
    Timing,
}

/// A distribution: StatsD `|h` or `|ms`, Prometheus histogram with fixed buckets.
struct HistogramMetric {
    name: &'static str,
    tags: &'static [&'static str],
    shape: Shape,
    family: Family<Labels, Histogram, Bounds>,
}

/// Makes a histogram with a fixed set of bucket bounds (one per label set of a family).
#[derive(Clone, Copy)]
struct Bounds(&'static [f64]);

impl MetricConstructor<Histogram> for Bounds {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Registers instruments in a Prometheus registry, naming each after its StatsD name.
struct Declare<'r> {
    registry: &'r mut Registry,
}

fn prometheus_name(statsd: &str) -> String {
    statsd.replace('.', "_")
}

impl Declare<'_> {
    fn counter(
        &mut self,
        name: &'static str,
        tags: &'static [&'static str],
        help: &str,
    ) -> CounterMetric {
        let family = Family::default();
        self.registry
            .register(prometheus_name(name), help, family.clone());
        CounterMetric { name, tags, family }
    }

    fn gauge(
        &mut self,
        name: &'static str,
        tags: &'static [&'static str],
        help: &str,
    ) -> GaugeMetric {
        let family = Family::default();
        self.registry
            .register(prometheus_name(name), help, family.clone());
        GaugeMetric { name, tags, family }
    }

    fn histogram(
        &mut self,
        name: &'static str,
        tags: &'static [&'static str],
        shape: Shape,
        buckets: &'static [f64],
        help: &str,
    ) -> HistogramMetric {
        let family = Family::new_with_constructor(Bounds(buckets));
        self.registry
            .register(prometheus_name(name), help, family.clone());
        HistogramMetric {
            name,
            tags,
            shape,
            family,
        }
    }
}

/// The one list of Herald's metrics (README's metrics table documents the same).
struct Instruments {
    socket_connect: CounterMetric,
    channel_join: CounterMetric,
    push_delivered: HistogramMetric,
    worker_process_time: HistogramMetric,
    events_accepted: CounterMetric,
    events_duplicate: CounterMetric,
    api_errors: CounterMetric,
    commit_batch_size: HistogramMetric,
    commit_time: HistogramMetric,
    commit_refused: CounterMetric,
    status_batch_size: HistogramMetric,
    status_time: HistogramMetric,
    publish_messages: CounterMetric,
    publish_events: CounterMetric,
    outbox_messages: GaugeMetric,
    worker_message_events: HistogramMetric,
    worker_run_events: HistogramMetric,
    worker_in_flight: GaugeMetric,
    partitions_owned: GaugeMetric,
    partitions_moved: CounterMetric,
    partition_ready: GaugeMetric,
    publish_confirmed: CounterMetric,
    publish_unconfirmed: CounterMetric,
    publish_deferred: CounterMetric,
    connection_lost: CounterMetric,
    relay_republished: CounterMetric,
    broker_node: GaugeMetric,
    sweep_events: CounterMetric,
    sweep_partitions: CounterMetric,
    retry_unconfirmed: CounterMetric,
    fenced: CounterMetric,
    lane_reorder: CounterMetric,
    worker_delivered: CounterMetric,
    retry_scheduled: CounterMetric,
    dead_lettered: CounterMetric,
    replay_published: CounterMetric,
    replay_deferred: CounterMetric,
    socket_overflow: CounterMetric,
    frame_malformed: CounterMetric,
    push_duplicate: CounterMetric,
    push_gap_filled: CounterMetric,
    push_gap_unfilled: CounterMetric,
    client_acked: CounterMetric,
    inbox_events: CounterMetric,
    events_pruned: CounterMetric,
    idempotency_keys_expired: CounterMetric,
    stats_ping: HistogramMetric,
    socket_connections: GaugeMetric,
    socket_channels: GaugeMetric,
    pool_connections: GaugeMetric,
}

impl Instruments {
    fn declare(registry: &mut Registry) -> Self {
        use Shape::{Histogram as H, Timing as T};
        let mut d = Declare { registry };
        Self {
            socket_connect: d.counter(
                "socket_connect",
                &["status", "socket"],
                "Socket connects accepted or refused.",
            ),
            channel_join: d.counter(
                "channel_join",
                &["status", "channel"],
                "Channel joins accepted or refused.",
            ),
            push_delivered: d.histogram(
                "pipeline.push_delivered",
                &[],
                H,
                LATENCY_MS,
                "Push time minus enqueue time (ms), per event pushed to a socket.",
            ),
            worker_process_time: d.histogram(
                "pipeline.worker.process_time",
                &["outcome"],
                T,
                WORK_MS,
                "One run of a user's events (ms): broadcast, outcomes stored, messages settled.",
            ),
            events_accepted: d.counter(
                "api.events.accepted",
                &["endpoint"],
                "New events accepted by the API.",
            ),
            events_duplicate: d.counter(
                "api.events.duplicate",
                &[],
                "Idempotent retries answered with the original event.",
            ),
            api_errors: d.counter("api.errors", &["code"], "API error answers, by code."),
            commit_batch_size: d.histogram(
                "store.commit.batch_size",
                &[],
                H,
                SIZES,
                "Events per group commit.",
            ),
            commit_time: d.histogram(
                "store.commit.time",
                &[],
                T,
                WORK_MS,
                "Group commit transaction time (ms).",
            ),
            commit_refused: d.counter(
                "store.commit.refused",
                &[],
                "Requests PostgreSQL refused for their data (the rest of the commit was stored).",
            ),
            status_batch_size: d.histogram(
                "store.status.batch_size",
                &["kind"],
                H,
                SIZES,
                "Rows per outcome or confirm statement.",
            ),
            status_time: d.histogram(
                "store.status.time",
                &["kind"],
                T,
                WORK_MS,
                "Outcome or confirm statement time (ms).",
            ),
            publish_messages: d.counter(
                "queue.publish.messages",
                &["source"],
                "Messages handed to the broker.",
            ),
            publish_events: d.counter(
                "queue.publish.events",
                &["source"],
                "Events carried by the messages handed to the broker.",
            ),
            outbox_messages: d.gauge(
                "pipeline.outbox.messages",
                &[],
                "Messages waiting for a broker confirm (sampled by the relay).",
            ),
            worker_message_events: d.histogram(
                "pipeline.worker.message_events",
                &[],
                H,
                SIZES,
                "Events per consumed message.",
            ),
            worker_run_events: d.histogram(
                "pipeline.worker.run_events",
                &[],
                H,
                SIZES,
                "Events per user run.",
            ),
            worker_in_flight: d.gauge(
                "pipeline.worker.in_flight",
                &[],
                "Events taken from the partitions and not yet settled on the node.",
            ),
            partitions_owned: d.gauge(
                "pipeline.partitions.owned",
                &[],
                "Partitions the worker node consumes.",
            ),
            partitions_moved: d.counter(
                "pipeline.partitions.moved",
                &["change"],
                "Partitions coming to or leaving the node.",
            ),
            partition_ready: d.gauge(
                "queue.partition.ready",
                &["partition"],
                "Messages ready in a partition queue, reported by the node consuming it.",
            ),
            publish_confirmed: d.counter(
                "queue.publish.confirmed",
                &[],
                "Messages confirmed by the broker.",
            ),
            publish_unconfirmed: d.counter(
                "queue.publish.unconfirmed",
                &["reason"],
                "Messages not confirmed, left to the outbox relay.",
            ),
            publish_deferred: d.counter(
                "queue.publish.deferred",
                &[],
                "Committed messages not handed to the publisher, left to the outbox relay.",
            ),
            connection_lost: d.counter(
                "queue.connection.lost",
                &["role"],
                "RabbitMQ connections lost or refused.",
            ),
            broker_node: d.gauge(
                "queue.node",
                &["role", "broker"],
                "1 for the broker node (host:port) each RabbitMQ connection of the node uses.",
            ),
            sweep_events: d.counter(
                "pipeline.sweep.events",
                &[],
                "Events the sweeper sent back through the outbox: no message carried them any more.",
            ),
            sweep_partitions: d.counter(
                "pipeline.sweep.partitions",
                &["state"],
                "Partitions the sweeper looked at: idle (swept) or busy (skipped).",
            ),
            retry_unconfirmed: d.counter(
                "pipeline.retry.unconfirmed",
                &[],
                "Retry publishes without a confirm in time: message requeued, attempt made again.",
            ),
            lane_reorder: d.counter(
                "pipeline.lane.reorder",
                &["outcome"],
                "Events a lane put back in seq order: sorted (arrived behind a later one), restored (waited for), passed (not in time; the socket fills it).",
            ),
            fenced: d.counter(
                "pipeline.fenced",
                &["stage"],
                "Events whose partition lease this node no longer held: not broadcast, or their outcome refused; their messages went back.",
            ),
            relay_republished: d.counter(
                "pipeline.relay.republished",
                &[],
                "Events the outbox relay republished.",
            ),
            worker_delivered: d.counter(
                "pipeline.worker.delivered",
                &["outcome"],
                "Delivery attempt outcomes (pushed, offline, failed).",
            ),
            retry_scheduled: d.counter(
                "pipeline.retry.scheduled",
                &["attempt"],
                "Failed attempts sent to a delay queue, by the attempt that failed.",
            ),
            dead_lettered: d.counter(
                "pipeline.dead_lettered",
                &[],
                "Events failed for good (message in the dead-letter queue).",
            ),
            replay_published: d.counter(
                "pipeline.replay.published",
                &["source"],
                "Events a replay handed to the publisher.",
            ),
            replay_deferred: d.counter(
                "pipeline.replay.deferred",
                &["source"],
                "Replayed events left to the outbox relay.",
            ),
            socket_overflow: d.counter(
                "socket.outbound.overflow",
                &[],
                "Connections dropped for not reading.",
            ),
            frame_malformed: d.counter(
                "socket.frame.malformed",
                &["reason"],
                "Client frames that could not be decoded.",
            ),
            push_duplicate: d.counter(
                "socket.push.duplicate",
                &[],
                "Repeated seqs dropped by the order guard.",
            ),
            push_gap_filled: d.counter(
                "socket.push.gap_filled",
                &[],
                "Events the order guard filled from PostgreSQL.",
            ),
            push_gap_unfilled: d.counter(
                "socket.push.gap_unfilled",
                &["reason"],
                "Gaps a channel could not close (it was closed with phx_error so its client rejoins).",
            ),
            client_acked: d.counter(
                "socket.client_acked",
                &[],
                "Events clients acknowledged having shown.",
            ),
            inbox_events: d.counter(
                "api.inbox.events",
                &[],
                "Events served by inbox pages.",
            ),
            events_pruned: d.counter(
                "store.events.pruned",
                &[],
                "Delivered events removed by retention.",
            ),
            idempotency_keys_expired: d.counter(
                "store.idempotency_keys.expired",
                &[],
                "Idempotency keys of pruned events expired after store.idempotency_ttl_secs.",
            ),
            stats_ping: d.histogram(
                "stats_channel.ping",
                &[],
                T,
                WORK_MS,
                "Stats channel ping handling (ms).",
            ),
            socket_connections: d.gauge("socket.connections", &[], "Open WebSockets on the node."),
            socket_channels: d.gauge("socket.channels", &[], "User channels joined on the node."),
            pool_connections: d.gauge(
                "store.pool.connections",
                &["pool", "state"],
                "PostgreSQL pool connections, in use or idle, per pool.",
            ),
        }
    }
}

/// A cheap handle to both outputs.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    statsd: StatsdClient,
    registry: Registry,
    at: Instruments,
    node: String,
    roles: String,
    /// What the registry puts before every name (`herald_`), or nothing.
    prefix: String,
}

fn status(success: bool) -> &'static str {
    if success { "success" } else { "fail" }
}

impl Metrics {
    /// Builds the outputs for node `node` running `roles` (`api+worker+socket`); an empty
    /// `statsd_addr` gives a StatsD client that sends nothing (Prometheus is always kept).
    ///
    /// # Errors
    /// The UDP socket cannot be bound or the address does not resolve.
    pub fn new(settings: &MetricsSettings, node: &str, roles: &str) -> Result<Self, Error> {
        let identity = |builder: StatsdClientBuilder| {
            builder
                .with_tag("node", node)
                .with_tag("roles", roles)
                .with_error_handler(|e| tracing::debug!(error = %e, "statsd send failed"))
                .build()
        };
        let statsd = if settings.statsd_addr.is_empty() {
            identity(StatsdClient::builder(&settings.prefix, NopMetricSink))
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
            identity(StatsdClient::builder(&settings.prefix, sink))
        };
        Ok(Self::build(statsd, &settings.prefix, node, roles))
    }

    /// Metrics that go nowhere (for tools that need none): nothing is sent, nothing scraped.
    pub fn disabled() -> Self {
        Self::build(StatsdClient::from_sink("", NopMetricSink), "", "", "")
    }

    fn build(statsd: StatsdClient, prefix: &str, node: &str, roles: &str) -> Self {
        let identity = [
            (Cow::Borrowed("node"), Cow::Owned(node.to_owned())),
            (Cow::Borrowed("roles"), Cow::Owned(roles.to_owned())),
        ];
        // StatsD's prefix is prepended as is (`herald.`); Prometheus joins prefix and name with `_`.
        let prefix = prometheus_name(prefix.trim_end_matches('.'));
        let mut registry = if prefix.is_empty() {
            Registry::with_labels(identity.into_iter())
        } else {
            Registry::with_prefix_and_labels(prefix.clone(), identity.into_iter())
        };
        let at = Instruments::declare(&mut registry);
        Self {
            inner: Arc::new(Inner {
                statsd,
                registry,
                at,
                node: node.to_owned(),
                roles: roles.to_owned(),
                prefix: if prefix.is_empty() {
                    prefix
                } else {
                    format!("{prefix}_")
                },
            }),
        }
    }

    /// The node's name, as every metric is tagged.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The node's roles, as every metric is tagged (`api+worker+socket`).
    pub fn roles(&self) -> &str {
        &self.inner.roles
    }

    /// Sends what StatsD has buffered.
    pub fn flush(&self) {
        let _ = self.inner.statsd.flush();
    }

    /// Every metric's current value in the OpenMetrics text format (see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; a label that could not be encoded would be our bug.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            tracing::error!(error = %error, "cannot encode the metrics");
        }
        text
    }

    /// A reading of this node's metrics for the operator console (see [`Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read(&self.render(), &self.inner.prefix)
    }

    fn count(&self, counter: &CounterMetric, n: u64, values: &[&str]) {
        if n == 0 {
            return;
        }
        let statsd = &self.inner.statsd;
        let value = n.min(i64::MAX as u64) as i64;
        send(
            statsd.count_with_tags(counter.name, value),
            counter.tags,
            values,
        );
        counter
            .family
            .get_or_create(&labels(counter.tags, values))
            .inc_by(n);
    }

    fn level(&self, gauge: &GaugeMetric, value: u64, values: &[&str]) {
        let metric = self.inner.statsd.gauge_with_tags(gauge.name, value);
        send(metric, gauge.tags, values);
        gauge
            .family
            .get_or_create(&labels(gauge.tags, values))
            .set(value.min(i64::MAX as u64) as i64);
    }

    fn spread(&self, spread: &HistogramMetric, value: f64, values: &[&str]) {
        let (statsd, whole) = (&self.inner.statsd, value.round() as u64);
        match spread.shape {
            Shape::Histogram => send(
                statsd.histogram_with_tags(spread.name, whole),
                spread.tags,
                values,
            ),
            Shape::Timing => send(
                statsd.time_with_tags(spread.name, whole),
                spread.tags,
                values,
            ),
        }
        spread
            .family
            .get_or_create(&labels(spread.tags, values))
            .observe(value);
    }

    /// A socket connect attempt: the token was accepted or refused.
    pub fn socket_connect(&self, socket: &'static str, success: bool) {
        let at = &self.inner.at;
        self.count(&at.socket_connect, 1, &[status(success), socket]);
    }

    /// A channel join was accepted or refused.
    pub fn channel_join(&self, channel: &'static str, success: bool) {
        let at = &self.inner.at;
        self.count(&at.channel_join, 1, &[status(success), channel]);
    }

    /// An event reached a client socket; `latency_ms` is push time minus enqueue time (wall clock).
    pub fn push_delivered(&self, latency_ms: u64) {
        self.spread(&self.inner.at.push_delivered, latency_ms as f64, &[]);
    }

    /// One worker run finished (broadcast, outcomes recorded).
    pub fn worker_processed(&self, elapsed: Duration, outcome: &'static str) {
        let at = &self.inner.at;
        self.spread(&at.worker_process_time, ms(elapsed), &[outcome]);
    }

    /// Events accepted by the API (new rows), per request.
    pub fn events_accepted(&self, count: usize, endpoint: &'static str) {
        let at = &self.inner.at;
        self.count(&at.events_accepted, count as u64, &[endpoint]);
    }

    /// Events the API recognised as retries of an idempotency key.
    pub fn events_duplicate(&self, count: usize) {
        self.count(&self.inner.at.events_duplicate, count as u64, &[]);
    }

    /// An API request answered with an error code.
    pub fn api_error(&self, code: &'static str) {
        self.count(&self.inner.at.api_errors, 1, &[code]);
    }

    /// One group commit: how many events, and how long the transaction took.
    pub fn commit(&self, events: usize, elapsed: Duration) {
        let at = &self.inner.at;
        self.spread(&at.commit_batch_size, events as f64, &[]);
        self.spread(&at.commit_time, ms(elapsed), &[]);
    }

    /// Requests PostgreSQL refused for their data, found by splitting a failed group commit (the
    /// rest of the batch was committed).
    pub fn commit_refused(&self, requests: usize) {
        self.count(&self.inner.at.commit_refused, requests as u64, &[]);
    }

    /// A status UPDATE batch (`kind` = confirmed or outcome).
    pub fn status_batch(&self, kind: &'static str, rows: usize, elapsed: Duration) {
        let at = &self.inner.at;
        self.spread(&at.status_batch_size, rows as f64, &[kind]);
        self.spread(&at.status_time, ms(elapsed), &[kind]);
    }

    /// Messages handed to the publisher (`source` = commit, relay or replay) and the events they
    /// carry: messages per event is the wire's batching, and relay republishes are amplification.
    pub fn messages_published(&self, source: &'static str, messages: usize, events: usize) {
        if messages > 0 {
            let at = &self.inner.at;
            self.count(&at.publish_messages, messages as u64, &[source]);
            self.count(&at.publish_events, events as u64, &[source]);
        }
    }

    /// Messages (outbox rows) waiting for a broker confirm, sampled by the relay.
    pub fn outbox_depth(&self, messages: i64) {
        let at = &self.inner.at;
        self.level(&at.outbox_messages, messages.max(0) as u64, &[]);
    }

    /// A message a worker took from a partition: how many events it carried.
    pub fn worker_message(&self, events: usize) {
        let at = &self.inner.at;
        self.spread(&at.worker_message_events, events as f64, &[]);
    }

    /// One user's run of events broadcast together: how many.
    pub fn worker_run(&self, events: usize) {
        self.spread(&self.inner.at.worker_run_events, events as f64, &[]);
    }

    /// Events taken from the broker and not yet settled on this worker node.
    pub fn worker_in_flight(&self, events: u64) {
        self.level(&self.inner.at.worker_in_flight, events, &[]);
    }

    /// Partitions this worker node consumes.
    pub fn partitions_owned(&self, count: usize) {
        self.level(&self.inner.at.partitions_owned, count as u64, &[]);
    }

    /// A partition came to this node or left it (`change` = acquired, released or lost).
    pub fn partition_moved(&self, change: &'static str) {
        self.count(&self.inner.at.partitions_moved, 1, &[change]);
    }

    /// Messages ready in each partition queue this worker node consumes, `(partition, ready)`.
    /// Partitions not listed are dropped from Prometheus: they are another node's to report now.
    pub fn partitions_ready(&self, ready: &[(u16, u32)]) {
        let gauge = &self.inner.at.partition_ready;
        gauge.family.clear();
        for (partition, messages) in ready {
            self.level(gauge, u64::from(*messages), &[&partition.to_string()]);
        }
    }

    /// Messages confirmed by the broker.
    pub fn publish_confirmed(&self, count: usize) {
        self.count(&self.inner.at.publish_confirmed, count as u64, &[]);
    }

    /// Messages not confirmed (nack, timeout, lost connection, stale); the relay republishes them.
    pub fn publish_unconfirmed(&self, count: usize, reason: &'static str) {
        let at = &self.inner.at;
        self.count(&at.publish_unconfirmed, count as u64, &[reason]);
    }

    /// Committed messages not handed to the publisher (buffer full or broker down); the relay owns
    /// them.
    pub fn publish_deferred(&self, count: usize) {
        self.count(&self.inner.at.publish_deferred, count as u64, &[]);
    }

    /// A RabbitMQ connection was lost or could not be made (`role` = publisher or consumer).
    pub fn queue_connection_lost(&self, role: &'static str) {
        self.count(&self.inner.at.connection_lost, 1, &[role]);
    }

    /// Which broker node each connection uses (`queue.amqp_url` may list several), `(role,
    /// host:port)`, sampled every second: a gauge of 1 per pair. Pairs not listed are dropped from
    /// Prometheus, so a connection that moved shows on its new node only.
    pub fn broker_nodes(&self, in_use: &[(&'static str, String)]) {
        let gauge = &self.inner.at.broker_node;
        gauge.family.clear();
        for (role, node) in in_use {
            self.level(gauge, 1, &[role, node]);
        }
    }

    /// Events the outbox relay republished.
    pub fn relay_republished(&self, count: usize) {
        self.count(&self.inner.at.relay_republished, count as u64, &[]);
    }

    /// Events the sweeper sent back through the outbox: no message carried them any more.
    pub fn sweep_events(&self, count: usize) {
        if count > 0 {
            self.count(&self.inner.at.sweep_events, count as u64, &[]);
        }
    }

    /// Partitions the sweeper looked at, and whether each was idle enough to sweep (`idle`) or
    /// skipped because its worker or queue was busy (`busy`).
    pub fn sweep_partitions(&self, state: &'static str, count: usize) {
        if count > 0 {
            self.count(&self.inner.at.sweep_partitions, count as u64, &[state]);
        }
    }

    /// A retry's publish got no confirm in time: its message is requeued, the attempt made again.
    pub fn retry_unconfirmed(&self) {
        self.count(&self.inner.at.retry_unconfirmed, 1, &[]);
    }

    /// Events refused at `stage` (`attempt`: the lease was no longer trusted before the broadcast
    /// or before a failure's retry; `outcome`: the outcome writer found the lease taken over) and
    /// sent back to their partition's queue.
    pub fn fenced(&self, stage: &'static str, count: usize) {
        self.count(&self.inner.at.fenced, count as u64, &[stage]);
    }

    /// A lane put its user's events back in seq order: `sorted` (an event arrived behind a later
    /// one still queued, and took its place), or it waited for a missing seq: `restored` (it
    /// arrived within `pipeline.reorder_window_ms`) or `passed` (the window ran out; the socket
    /// fills the seq from PostgreSQL).
    pub fn lane_reorder(&self, outcome: &'static str) {
        self.count(&self.inner.at.lane_reorder, 1, &[outcome]);
    }

    /// Delivery outcomes (`pushed`, `offline`, `failed`) of `count` events.
    pub fn delivery_outcome(&self, outcome: &'static str, count: usize) {
        let at = &self.inner.at;
        self.count(&at.worker_delivered, count as u64, &[outcome]);
    }

    /// A failed delivery attempt was scheduled for a retry through a delay queue. `attempt` is the
    /// attempt that failed (1 .. max_attempts - 1: low cardinality).
    pub fn retry_scheduled(&self, attempt: u32) {
        let at = &self.inner.at;
        self.count(&at.retry_scheduled, 1, &[&attempt.to_string()]);
    }

    /// An event's last attempt failed: it is marked failed and its message dead-lettered.
    pub fn dead_lettered(&self) {
        self.count(&self.inner.at.dead_lettered, 1, &[]);
    }

    /// Events an operator replay handed to the publisher (`source` = cli or api), per step.
    pub fn replay_published(&self, count: usize, source: &'static str) {
        let at = &self.inner.at;
        self.count(&at.replay_published, count as u64, &[source]);
    }

    /// Events a replay claimed but could not hand over (broker down): the outbox relay sends them.
    pub fn replay_deferred(&self, count: usize, source: &'static str) {
        let at = &self.inner.at;
        self.count(&at.replay_deferred, count as u64, &[source]);
    }

    /// A connection was dropped because its outbound queue was full (a client that does not read).
    pub fn socket_overflow(&self) {
        self.count(&self.inner.at.socket_overflow, 1, &[]);
    }

    /// A client frame could not be decoded.
    pub fn socket_malformed_frame(&self, reason: &'static str) {
        self.count(&self.inner.at.frame_malformed, 1, &[reason]);
    }

    /// A channel saw a seq it had already pushed (a redelivery) and dropped it.
    pub fn socket_duplicate_dropped(&self) {
        self.count(&self.inner.at.push_duplicate, 1, &[]);
    }

    /// A channel filled a gap in a user's sequence from PostgreSQL (`count` events).
    pub fn socket_gap_filled(&self, count: usize) {
        self.count(&self.inner.at.push_gap_filled, count as u64, &[]);
    }

    /// A channel could not close a gap in its user's sequence (`reason`: `store_unavailable`,
    /// `pruned`, `too_large`, `throttled`) and was closed with `phx_error` so that its client rejoins.
    pub fn socket_gap_unfilled(&self, reason: &'static str) {
        self.count(&self.inner.at.push_gap_unfilled, 1, &[reason]);
    }

    /// Clients acknowledged having shown events (delivered to a person, not just pushed).
    pub fn client_acked(&self, count: u64) {
        self.count(&self.inner.at.client_acked, count, &[]);
    }

    /// Events an inbox page served (`GET /api/v1/inbox`).
    pub fn inbox_served(&self, count: usize) {
        self.count(&self.inner.at.inbox_events, count as u64, &[]);
    }

    /// Delivered events pruned by retention.
    pub fn events_pruned(&self, count: u64) {
        self.count(&self.inner.at.events_pruned, count, &[]);
    }

    /// Idempotency keys of pruned events expired (older than `store.idempotency_ttl_secs`).
    pub fn idempotency_keys_expired(&self, count: u64) {
        if count > 0 {
            self.count(&self.inner.at.idempotency_keys_expired, count, &[]);
        }
    }

    /// A stats channel `ping` was handled.
    pub fn stats_ping(&self, elapsed: Duration) {
        self.spread(&self.inner.at.stats_ping, ms(elapsed), &[]);
    }

    /// Open WebSocket connections on this node.
    pub fn socket_connections(&self, open: u64) {
        self.level(&self.inner.at.socket_connections, open, &[]);
    }

    /// User channels joined on this node.
    pub fn socket_channels(&self, joined: u64) {
        self.level(&self.inner.at.socket_channels, joined, &[]);
    }

    /// A PostgreSQL pool's connections (`pool` = background, writes or reads).
    pub fn pool_connections(&self, pool: &'static str, in_use: u64, idle: u64) {
        let gauge = &self.inner.at.pool_connections;
        self.level(gauge, in_use, &[pool, "in_use"]);
        self.level(gauge, idle, &[pool, "idle"]);
    }
}

/// Sends a StatsD metric with its own tags (node and roles are the client's default tags).
fn send<'m, T>(mut metric: MetricBuilder<'m, '_, T>, keys: &'m [&str], values: &'m [&str])
where
    T: cadence::Metric + From<String>,
{
    for (key, value) in keys.iter().zip(values) {
        metric = metric.with_tag(key, value);
    }
    metric.send();
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1_000.0
}

/// A distribution read from the registry: cumulative counts at each upper bound (`le`, the last
/// one infinite), as Prometheus keeps them.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Buckets {
    /// `(upper bound, observations at or under it)`, ascending; the last bound is `null` (+Inf).
    pub buckets: Vec<(Option<f64>, u64)>,
    /// Observations in all.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

/// This node's figures for the operator console, read from the same registry `/metrics` serves:
/// counters since the node started (the console turns them into rates), gauges as last set.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// Events accepted by the API (`api.events.accepted`).
    pub accepted: u64,
    /// Delivery attempts that delivered (`pipeline.worker.delivered`, pushed and offline).
    pub delivered: u64,
    /// Delivery attempts that failed (`pipeline.worker.delivered{outcome=failed}`).
    pub failed: u64,
    /// Failed attempts sent to a delay queue (`pipeline.retry.scheduled`).
    pub retries: u64,
    /// Events failed for good (`pipeline.dead_lettered`).
    pub dead_lettered: u64,
    /// Socket connects accepted (`socket_connect{status=success}`).
    pub connects: u64,
    /// Channel joins accepted (`channel_join{status=success}`).
    pub joins: u64,
    /// Open WebSockets (`socket.connections`).
    pub connections: u64,
    /// Joined user channels (`socket.channels`).
    pub channels: u64,
    /// Events in work on this worker node (`pipeline.worker.in_flight`).
    pub in_flight: u64,
    /// `pipeline.push_delivered`, in ms.
    pub push_delivered: Buckets,
}

/// One sample line of the exposition: name, labels, value.
struct Sample<'t> {
    name: &'t str,
    labels: Vec<(&'t str, String)>,
    value: f64,
}

impl Sample<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one sample line of our own OpenMetrics output: `name{k="v",...} value` or `name value`.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some(Sample {
                name,
                labels: Vec::new(),
                value: value.trim().parse().ok()?,
            });
        }
    };
    let mut labels = Vec::new();
    let mut chars = rest.char_indices().peekable();
    let mut key_start = 0;
    let end = loop {
        let (at, c) = chars.next()?;
        match c {
            '}' => break at,
            ',' => key_start = at + 1,
            '=' => {
                let key = &rest[key_start..at];
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        other => value.push(other),
                    }
                }
                labels.push((key, value));
            }
            _ => {}
        }
    };
    let value = rest[end + 1..].trim().split(' ').next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

impl Snapshot {
    /// Reads the figures out of `text` (this registry's exposition; names start with `prefix`).
    fn read(text: &str, prefix: &str) -> Self {
        let mut snapshot = Self::default();
        let mut buckets: Vec<(Option<f64>, u64)> = Vec::new();
        for sample in text.lines().filter_map(parse_sample) {
            let Some(name) = sample.name.strip_prefix(prefix) else {
                continue;
            };
            let n = sample.value.max(0.0) as u64;
            match name {
                "api_events_accepted_total" => snapshot.accepted += n,
                "pipeline_worker_delivered_total" => match sample.label("outcome") {
                    Some("failed") => snapshot.failed += n,
                    _ => snapshot.delivered += n,
                },
                "pipeline_retry_scheduled_total" => snapshot.retries += n,
                "pipeline_dead_lettered_total" => snapshot.dead_lettered += n,
                "socket_connect_total" if sample.label("status") == Some("success") => {
                    snapshot.connects += n
                }
                "channel_join_total" if sample.label("status") == Some("success") => {
                    snapshot.joins += n
                }
                "socket_connections" => snapshot.connections = n,
                "socket_channels" => snapshot.channels = n,
                "pipeline_worker_in_flight" => snapshot.in_flight = n,
                "pipeline_push_delivered_bucket" => {
                    let le = sample.label("le").and_then(|le| match le {
                        "+Inf" => None,
                        bound => bound.parse::<f64>().ok(),
                    });
                    buckets.push((le, n));
                }
                "pipeline_push_delivered_count" => snapshot.push_delivered.count = n,
                "pipeline_push_delivered_sum" => snapshot.push_delivered.sum = sample.value,
                _ => {}
            }
        }
        snapshot.push_delivered.buckets = buckets;
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_line_parses_with_escapes() {
        let s = parse_sample(r#"a_total{node="n \"1\"",roles="api+worker",le="0.5"} 3"#).unwrap();
        assert_eq!(s.name, "a_total");
        assert_eq!(s.label("node"), Some("n \"1\""));
        assert_eq!(s.label("le"), Some("0.5"));
        assert_eq!(s.value, 3.0);
        let s = parse_sample("b 2.5").unwrap();
        assert_eq!((s.name, s.value), ("b", 2.5));
        assert!(parse_sample("# EOF").is_none());
    }

    #[test]
    fn the_snapshot_reads_what_was_recorded() {
        let metrics = Metrics::build(
            StatsdClient::from_sink("", NopMetricSink),
            "herald.",
            "n1",
            "api+worker",
        );
        metrics.events_accepted(3, "single");
        metrics.events_accepted(2, "batch");
        metrics.delivery_outcome("pushed", 4);
        metrics.delivery_outcome("offline", 1);
        metrics.delivery_outcome("failed", 2);
        metrics.retry_scheduled(1);
        metrics.dead_lettered();
        metrics.channel_join(USER_CHANNEL, true);
        metrics.channel_join(USER_CHANNEL, false);
        metrics.push_delivered(3);
        metrics.push_delivered(40);
        let text = metrics.render();
        assert!(
            text.contains(r#"herald_api_events_accepted_total{node="n1",roles="api+worker",endpoint="single"} 3"#),
            "{text}"
        );
        let s = metrics.snapshot();
        assert_eq!((s.accepted, s.delivered, s.failed), (5, 5, 2));
        assert_eq!((s.retries, s.dead_lettered, s.joins), (1, 1, 1));
        assert_eq!(s.push_delivered.count, 2);
        assert_eq!(s.push_delivered.sum, 43.0);
        assert_eq!(s.push_delivered.buckets.last(), Some(&(None, 2)));
        assert!(s.push_delivered.buckets.contains(&(Some(5.0), 1)));
    }
}

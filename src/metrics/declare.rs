//! The one list of Herald's metrics. A metric used to be written in four places (a struct field,
//! its registration, its recording method, the README's row), and they drifted: the README gave
//! `queue.publish.confirmed` and `queue.publish.deferred` a `reason` tag they never had. Here a
//! line declares an instrument once: the field the recording methods use, its StatsD name, type
//! and tag keys (which also give the Prometheus name and labels), its help and its buckets. The
//! README's table is checked against this list by a test, so a metric added, renamed or retagged
//! without its row fails `cargo test --lib`.
//!
//! The number of tag keys is part of an instrument's type, so a recording method that passes too
//! few or too many tag values does not compile.

use super::instrument::{Counter, Distribution, Gauge};
use cadence::StatsdClient;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// What an instrument is on each output. Buckets are in StatsD's units (milliseconds for
/// durations); Prometheus gets durations in seconds, its base unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// StatsD `|c`; a Prometheus counter, `<name>_total`.
    Counter,
    /// StatsD `|g`; a Prometheus gauge.
    Gauge,
    /// A count per observation (a batch's size): StatsD `|h`; a Prometheus histogram, unitless.
    Histogram(&'static [f64]),
    /// A duration: StatsD `|h` in milliseconds; a Prometheus histogram `<name>_seconds`.
    HistogramMs(&'static [f64]),
    /// A duration: StatsD `|ms`; a Prometheus histogram `<name>_seconds`.
    TimingMs(&'static [f64]),
}

impl Kind {
    /// How many StatsD units make one Prometheus unit (1,000 ms to the second), or 1.
    pub(super) fn per_prometheus_unit(self) -> f64 {
        match self {
            Self::HistogramMs(_) | Self::TimingMs(_) => 1_000.0,
            Self::Counter | Self::Gauge | Self::Histogram(_) => 1.0,
        }
    }

    /// The upper bounds of a distribution's buckets, in StatsD's units (none for the others).
    pub(super) fn buckets(self) -> &'static [f64] {
        match self {
            Self::Histogram(b) | Self::HistogramMs(b) | Self::TimingMs(b) => b,
            Self::Counter | Self::Gauge => &[],
        }
    }
}

/// One declared metric, as operators see it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Its StatsD name (`pipeline.push_delivered`), before `metrics.prefix`.
    pub name: &'static str,
    /// What it is on each output.
    pub kind: Kind,
    /// Its own tag keys (every metric also carries `node` and `roles`).
    pub tags: &'static [&'static str],
    /// Prometheus' `# HELP`.
    pub help: &'static str,
}

impl Spec {
    /// Its Prometheus family's name, before the registry's prefix: the StatsD name with dots as
    /// underscores, durations with `_seconds` (`pipeline_push_delivered_seconds`). A counter's
    /// samples add `_total`, a histogram's `_bucket`, `_sum` and `_count`.
    pub fn prometheus_family(&self) -> String {
        let name = self.name.replace('.', "_");
        match self.kind {
            Kind::HistogramMs(_) | Kind::TimingMs(_) => format!("{name}_seconds"),
            Kind::Counter | Kind::Gauge | Kind::Histogram(_) => name,
        }
    }

    /// The name a query starts from: a counter's `_total` sample, else the family's name.
    pub fn prometheus_name(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.prometheus_family()),
            _ => self.prometheus_family(),
        }
    }

    /// The StatsD type, as the README's table spells it.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
            Kind::HistogramMs(_) => "histogram (ms)",
            Kind::TimingMs(_) => "timing (ms)",
        }
    }
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
/// Buckets of a background pass, in ms (a sweep, a retention round): a few ms when there is
/// nothing to do, up to a minute for a round that prunes a backlog in batches.
const PASS_MS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
    30_000.0, 60_000.0,
];
/// Buckets of batch sizes (events per commit, message or run; rows per status batch).
const SIZES: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0,
];

/// The instrument type of a kind, with its number of tag keys.
macro_rules! instrument_type {
    (Counter, $n:expr) => { Counter<{ $n }> };
    (Gauge, $n:expr) => { Gauge<{ $n }> };
    ($distribution:ident, $n:expr) => { Distribution<{ $n }> };
}

/// `field: Kind[(buckets)] "statsd.name" [tag keys] "help";` gives the field of [`Instruments`],
/// its registration in both outputs, and its [`Spec`] in [`DECLARED`].
macro_rules! instruments {
    ($($field:ident: $kind:ident $(($buckets:expr))? $name:literal [$($tag:literal),*] $help:literal;)*) => {
        /// Every instrument, recording to StatsD and the Prometheus registry at once.
        pub(super) struct Instruments {
            $(pub(super) $field: instrument_type!($kind, <[&str]>::len(&[$($tag),*])),)*
        }

        impl Instruments {
            pub(super) fn register(registry: &mut Registry, statsd: &Arc<StatsdClient>) -> Self {
                Self {
                    $($field: <instrument_type!($kind, <[&str]>::len(&[$($tag),*]))>::register(
                        registry,
                        statsd,
                        Spec { name: $name, kind: Kind::$kind$(($buckets))?, tags: &[$($tag),*], help: $help },
                        [$($tag),*],
                    ),)*
                }
            }
        }

        /// Every metric Herald emits, in the README's order.
        pub const DECLARED: &[Spec] = &[
            $(Spec { name: $name, kind: Kind::$kind$(($buckets))?, tags: &[$($tag),*], help: $help },)*
        ];
    };
}

instruments! {
    push_delivered: HistogramMs(LATENCY_MS) "pipeline.push_delivered" []
        "Push time minus enqueue time, per event pushed to a socket.";
    worker_process_time: TimingMs(WORK_MS) "pipeline.worker.process_time" ["outcome"]
        "One run of a user's events: broadcast, outcomes stored, messages settled.";
    worker_delivered: Counter "pipeline.worker.delivered" ["outcome"]
        "Delivery attempt outcomes (pushed, offline, failed).";
    relay_republished: Counter "pipeline.relay.republished" []
        "Events the outbox relay republished.";
    sweep_events: Counter "pipeline.sweep.events" []
        "Events the sweeper sent back through the outbox: no message carried them any more.";
    sweep_partitions: Counter "pipeline.sweep.partitions" ["state"]
        "Partitions the sweeper looked at: idle (swept) or busy (skipped).";
    sweep_time: TimingMs(PASS_MS) "pipeline.sweep.time" []
        "One sweep of the node's partitions: idle checks, stale rows read and swept.";
    retry_unconfirmed: Counter "pipeline.retry.unconfirmed" []
        "Retry publishes without a confirm in time: message requeued, attempt made again.";
    lane_reorder: Counter "pipeline.lane.reorder" ["outcome"]
        "Events a lane put back in seq order: sorted (arrived behind a later one), restored (waited for), passed (not in time; the socket fills it).";
    fenced: Counter "pipeline.fenced" ["stage"]
        "Events whose partition lease this node no longer held: not broadcast, or their outcome refused; their messages went back.";
    broker_node: Gauge "queue.node" ["role", "broker"]
        "1 for the broker node (host:port) each RabbitMQ connection of the node uses.";
    publish_messages: Counter "queue.publish.messages" ["source"]
        "Messages handed to the broker.";
    publish_events: Counter "queue.publish.events" ["source"]
        "Events carried by the messages handed to the broker.";
    fanout_messages: Counter "pubsub.fanout.messages" []
        "Cross-node fan-out messages handed to the broker (cluster mode).";
    fanout_events: Counter "pubsub.fanout.events" []
        "Events carried by the cross-node fan-out messages (cluster mode).";
    fanout_broadcasts: Histogram(SIZES) "pubsub.fanout.broadcasts" []
        "Broadcasts (user runs) per cross-node fan-out message.";
    outbox_messages: Gauge "pipeline.outbox.messages" []
        "Messages waiting for a broker confirm (sampled by the relay).";
    worker_message_events: Histogram(SIZES) "pipeline.worker.message_events" []
        "Events per consumed message.";
    worker_run_events: Histogram(SIZES) "pipeline.worker.run_events" []
        "Events per user run.";
    worker_in_flight: Gauge "pipeline.worker.in_flight" []
        "Events taken from the partitions and not yet settled on the node.";
    partitions_owned: Gauge "pipeline.partitions.owned" []
        "Partitions the worker node consumes.";
    partitions_moved: Counter "pipeline.partitions.moved" ["change"]
        "Partitions coming to or leaving the node.";
    socket_connect: Counter "socket_connect" ["status", "socket"]
        "Socket connects accepted or refused.";
    channel_join: Counter "channel_join" ["status", "channel"]
        "Channel joins accepted or refused.";
    join_read_size: Histogram(SIZES) "socket.join_read.batch_size" []
        "Joins per read of users' seqs (the joins waiting at one moment share one statement).";
    join_read_time: TimingMs(WORK_MS) "socket.join_read.time" []
        "Time of one read of joining users' seqs.";
    socket_connections: Gauge "socket.connections" []
        "Open WebSockets on the node.";
    socket_channels: Gauge "socket.channels" []
        "User channels joined on the node.";
    partition_ready: Gauge "queue.partition.ready" ["partition"]
        "Messages ready in a partition queue, reported by the node consuming it.";
    pool_connections: Gauge "store.pool.connections" ["pool", "state"]
        "PostgreSQL pool connections, in use or idle, per pool.";
    stats_ping: TimingMs(WORK_MS) "stats_channel.ping" []
        "Stats channel ping handling.";
    socket_overflow: Counter "socket.outbound.overflow" []
        "Connections dropped for not reading.";
    frame_malformed: Counter "socket.frame.malformed" ["reason"]
        "Client frames that could not be decoded.";
    push_duplicate: Counter "socket.push.duplicate" []
        "Repeated seqs dropped by the order guard.";
    push_from_commit: Counter "socket.push.from_commit" ["outcome"]
        "Events this node's group commit handed to its own channels ahead of the worker: pushed (the next seq), behind (already pushed) or ahead (an earlier seq still on its way; left to the worker).";
    push_gap_filled: Counter "socket.push.gap_filled" []
        "Events the order guard filled from PostgreSQL.";
    push_gap_unfilled: Counter "socket.push.gap_unfilled" ["reason"]
        "Gaps a channel could not close (it was closed with phx_error so its client rejoins).";
    events_accepted: Counter "api.events.accepted" ["endpoint"]
        "New events accepted by the API.";
    events_duplicate: Counter "api.events.duplicate" []
        "Idempotent retries answered with the original event.";
    api_errors: Counter "api.errors" ["code"]
        "API error answers, by code.";
    inbox_events: Counter "api.inbox.events" []
        "Events served by inbox pages.";
    commit_batch_size: Histogram(SIZES) "store.commit.batch_size" []
        "Events per group commit.";
    commit_time: TimingMs(WORK_MS) "store.commit.time" []
        "Group commit transaction time.";
    commit_refused: Counter "store.commit.refused" []
        "Requests PostgreSQL refused for their data (the rest of the commit was stored).";
    status_batch_size: Histogram(SIZES) "store.status.batch_size" ["kind"]
        "Rows per outcome or confirm statement.";
    status_time: TimingMs(WORK_MS) "store.status.time" ["kind"]
        "Outcome or confirm statement time.";
    publish_confirmed: Counter "queue.publish.confirmed" []
        "Messages confirmed by the broker.";
    publish_unconfirmed: Counter "queue.publish.unconfirmed" ["reason"]
        "Messages not confirmed, left to the outbox relay.";
    publish_deferred: Counter "queue.publish.deferred" []
        "Committed messages not handed to the publisher, left to the outbox relay.";
    connection_lost: Counter "queue.connection.lost" ["role"]
        "RabbitMQ connections lost or refused.";
    client_acked: Counter "socket.client_acked" []
        "Events clients acknowledged having shown.";
    events_pruned: Counter "store.events.pruned" []
        "Delivered events removed by retention.";
    idempotency_keys_expired: Counter "store.idempotency_keys.expired" []
        "Idempotency keys of pruned events expired after store.idempotency_ttl_secs.";
    retention_time: TimingMs(PASS_MS) "store.retention.time" []
        "One retention round: new block ranges summarized, events pruned, idempotency keys expired.";
    retry_scheduled: Counter "pipeline.retry.scheduled" ["attempt"]
        "Failed attempts sent to a delay queue, by the attempt that failed.";
    dead_lettered: Counter "pipeline.dead_lettered" []
        "Events failed for good (message in the dead-letter queue).";
    replay_published: Counter "pipeline.replay.published" ["source"]
        "Events a replay handed to the publisher.";
    replay_deferred: Counter "pipeline.replay.deferred" ["source"]
        "Replayed events left to the outbox relay.";
    webpush_scheduled: Counter "webpush.scheduled" []
        "Web pushes scheduled (one per delivered event with a fallback, per subscription of its user).";
    webpush_sent: Counter "webpush.sent" ["outcome"]
        "Web pushes ended: sent, retrying, failed, gone (subscription removed), received (not needed).";
    webpush_request_time: TimingMs(WORK_MS) "webpush.request.time" ["outcome"]
        "One request to a push service, from sending to its answer.";
    webpush_receipts: Counter "webpush.receipts" []
        "Users whose receipts a socket node recorded (one row per user per flush).";
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = include_str!("../../README.md");

    /// The rows of the README's metric table: `(StatsD name, [cells])`.
    fn readme_rows() -> Vec<(String, Vec<String>)> {
        let section = README
            .split_once("## Metrics (StatsD and Prometheus)")
            .and_then(|(_, after)| after.split_once("\n### "))
            .map(|(section, _)| section)
            .expect("README has the metrics section");
        section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|line| {
                let cells: Vec<String> = line
                    .trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect();
                (cells[0].trim_matches('`').to_owned(), cells)
            })
            .collect()
    }

    /// The tag keys of a tags cell: `pool (`background`, ...), state (...)` -> `[pool, state]`.
    fn tag_keys(cell: &str) -> Vec<String> {
        let mut depth = 0;
        let bare: String = cell
            .chars()
            .filter(|c| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => return depth == 0,
                }
                false
            })
            .collect();
        bare.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The row this declaration expects (the meaning is the README's own).
    fn expected_row(spec: &Spec) -> String {
        let (name, prometheus) = (spec.name, spec.prometheus_name());
        let cells = [
            spec.type_name(),
            &format!("`{prometheus}`"),
            &spec.tags.join(", "),
        ];
        format!("| `{name}` | {} | ...", cells.join(" | ")).replace("|  |", "| |")
    }

    #[test]
    fn the_readme_table_lists_every_declared_metric_as_declared() {
        let rows = readme_rows();
        let mut problems = Vec::new();
        for spec in DECLARED {
            let matching: Vec<_> = rows.iter().filter(|(n, _)| n == spec.name).collect();
            let [(_, cells)] = matching.as_slice() else {
                problems.push(format!(
                    "{} rows for `{}`; want one: {}",
                    matching.len(),
                    spec.name,
                    expected_row(spec)
                ));
                continue;
            };
            let prometheus = format!("`{}`", spec.prometheus_name());
            let tags: Vec<String> = spec.tags.iter().map(|t| (*t).to_owned()).collect();
            if cells.len() != 5
                || cells[1] != spec.type_name()
                || cells[2] != prometheus
                || tag_keys(&cells[3]) != tags
            {
                problems.push(format!(
                    "`{}` reads {:?}; want {}",
                    spec.name,
                    &cells[..cells.len().min(4)],
                    expected_row(spec)
                ));
            }
        }
        for (name, _) in &rows {
            if !DECLARED.iter().any(|s| s.name == name) {
                problems.push(format!("the README lists `{name}`, which is not declared"));
            }
        }
        assert!(
            problems.is_empty(),
            "README's metric table and src/metrics/declare.rs disagree:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn names_are_unique_on_both_outputs() {
        let mut statsd: Vec<_> = DECLARED.iter().map(|s| s.name).collect();
        let mut prometheus: Vec<_> = DECLARED.iter().map(Spec::prometheus_family).collect();
        statsd.sort_unstable();
        statsd.dedup();
        prometheus.sort_unstable();
        prometheus.dedup();
        assert_eq!(statsd.len(), DECLARED.len());
        assert_eq!(prometheus.len(), DECLARED.len());
    }

    #[test]
    fn tag_keys_read_past_their_values() {
        assert_eq!(
            tag_keys("pool (`background`, `writes`), state (`in_use`, `idle`)"),
            ["pool", "state"]
        );
        assert_eq!(tag_keys(""), Vec::<String>::new());
    }
}

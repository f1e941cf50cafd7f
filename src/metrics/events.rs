//! One method per telemetry event (vector's internal events): what call sites record, in their own
//! terms (a `Duration`, a count, an outcome), so that none of them spells a metric name, a tag key
//! or a unit. Each is a line or two on top of an instrument declared in [`super::declare`].

use super::{Metrics, SUCCESS};
use std::time::Duration;

fn status(success: bool) -> &'static str {
    if success { SUCCESS } else { "fail" }
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1_000.0
}

/// How a partition came to a worker node or left it (`pipeline.partitions.moved`'s `change`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionMove {
    /// Its lease was taken and its consumer started.
    Acquired,
    /// Handed over: drained, then its lease released, so the next owner starts where it stopped.
    Released,
    /// Its lease moved to another node, or could not be kept: abandoned, its work sent back.
    Lost,
}

impl PartitionMove {
    fn label(self) -> &'static str {
        match self {
            Self::Acquired => "acquired",
            Self::Released => "released",
            Self::Lost => "lost",
        }
    }
}

impl Metrics {
    /// A socket connect attempt: the token was accepted or refused.
    pub fn socket_connect(&self, socket: &'static str, success: bool) {
        self.at().socket_connect.add(1, [status(success), socket]);
    }

    /// A channel join was accepted or refused.
    pub fn channel_join(&self, channel: &'static str, success: bool) {
        self.at().channel_join.add(1, [status(success), channel]);
    }

    /// An event reached a client socket; `latency_ms` is push time minus enqueue time (wall clock).
    pub fn push_delivered(&self, latency_ms: u64) {
        self.at().push_delivered.observe(latency_ms as f64, []);
    }

    /// One worker run finished (broadcast, outcomes recorded).
    pub fn worker_processed(&self, elapsed: Duration, outcome: &'static str) {
        self.at()
            .worker_process_time
            .observe(ms(elapsed), [outcome]);
    }

    /// Events accepted by the API (new rows), per request.
    pub fn events_accepted(&self, count: usize, endpoint: &'static str) {
        self.at().events_accepted.add(count as u64, [endpoint]);
    }

    /// Events the API recognised as retries of an idempotency key.
    pub fn events_duplicate(&self, count: usize) {
        self.at().events_duplicate.add(count as u64, []);
    }

    /// An API request answered with an error code.
    pub fn api_error(&self, code: &'static str) {
        self.at().api_errors.add(1, [code]);
    }

    /// One group commit: how many events, and how long the transaction took.
    pub fn commit(&self, events: usize, elapsed: Duration) {
        self.at().commit_batch_size.observe(events as f64, []);
        self.at().commit_time.observe(ms(elapsed), []);
    }

    /// Requests PostgreSQL refused for their data, found by splitting a failed group commit (the
    /// rest of the batch was committed).
    pub fn commit_refused(&self, requests: usize) {
        self.at().commit_refused.add(requests as u64, []);
    }

    /// A status UPDATE batch (`kind` = confirmed or outcome).
    pub fn status_batch(&self, kind: &'static str, rows: usize, elapsed: Duration) {
        self.at().status_batch_size.observe(rows as f64, [kind]);
        self.at().status_time.observe(ms(elapsed), [kind]);
    }

    /// One read of joining users' seqs, for `joins` joins.
    pub fn join_reads(&self, joins: usize, elapsed: Duration) {
        self.at().join_read_size.observe(joins as f64, []);
        self.at().join_read_time.observe(ms(elapsed), []);
    }

    /// Messages handed to the publisher (`source` = commit, relay or replay) and the events they
    /// carry: messages per event is the wire's batching, and relay republishes are amplification.
    pub fn messages_published(&self, source: &'static str, messages: usize, events: usize) {
        if messages > 0 {
            self.at().publish_messages.add(messages as u64, [source]);
            self.at().publish_events.add(events as u64, [source]);
        }
    }

    /// One cross-node fan-out message handed to the broker, carrying `broadcasts` user runs of
    /// `events` events in all: messages per event is the fan-out's batching.
    pub fn fanout_published(&self, broadcasts: usize, events: usize) {
        self.at().fanout_messages.add(1, []);
        self.at().fanout_events.add(events as u64, []);
        self.at().fanout_broadcasts.observe(broadcasts as f64, []);
    }

    /// Messages (outbox rows) waiting for a broker confirm, sampled by the relay.
    pub fn outbox_depth(&self, messages: i64) {
        self.at().outbox_messages.set(messages.max(0) as u64, []);
    }

    /// A message a worker took from a partition: how many events it carried.
    pub fn worker_message(&self, events: usize) {
        self.at().worker_message_events.observe(events as f64, []);
    }

    /// One user's run of events broadcast together: how many.
    pub fn worker_run(&self, events: usize) {
        self.at().worker_run_events.observe(events as f64, []);
    }

    /// Events taken from the broker and not yet settled on this worker node.
    pub fn worker_in_flight(&self, events: u64) {
        self.at().worker_in_flight.set(events, []);
    }

    /// Partitions this worker node consumes.
    pub fn partitions_owned(&self, count: usize) {
        self.at().partitions_owned.set(count as u64, []);
    }

    /// A partition came to this node or left it.
    pub fn partition_moved(&self, change: PartitionMove) {
        self.at().partitions_moved.add(1, [change.label()]);
    }

    /// Messages ready in each partition queue this worker node consumes, `(partition, ready)`.
    /// Partitions not listed are dropped from Prometheus: they are another node's to report now.
    pub fn partitions_ready(&self, ready: &[(u16, u32)]) {
        self.at().partition_ready.clear();
        for (partition, messages) in ready {
            let partition = partition.to_string();
            self.at()
                .partition_ready
                .set(u64::from(*messages), [&partition]);
        }
    }

    /// Messages confirmed by the broker.
    pub fn publish_confirmed(&self, count: usize) {
        self.at().publish_confirmed.add(count as u64, []);
    }

    /// Messages not confirmed (nack, timeout, lost connection, stale); the relay republishes them.
    pub fn publish_unconfirmed(&self, count: usize, reason: &'static str) {
        self.at().publish_unconfirmed.add(count as u64, [reason]);
    }

    /// Committed messages not handed to the publisher (buffer full or broker down); the relay owns
    /// them.
    pub fn publish_deferred(&self, count: usize) {
        self.at().publish_deferred.add(count as u64, []);
    }

    /// A RabbitMQ connection was lost or could not be made (`role` = publisher or consumer).
    pub fn queue_connection_lost(&self, role: &'static str) {
        self.at().connection_lost.add(1, [role]);
    }

    /// Which broker node each connection uses (`queue.amqp_url` may list several), `(role,
    /// host:port)`, sampled every second: a gauge of 1 per pair. Pairs not listed are dropped from
    /// Prometheus, so a connection that moved shows on its new node only.
    pub fn broker_nodes(&self, in_use: &[(&'static str, String)]) {
        self.at().broker_node.clear();
        for (role, node) in in_use {
            self.at().broker_node.set(1, [role, node]);
        }
    }

    /// Events the outbox relay republished.
    pub fn relay_republished(&self, count: usize) {
        self.at().relay_republished.add(count as u64, []);
    }

    /// Events the sweeper sent back through the outbox: no message carried them any more.
    pub fn sweep_events(&self, count: usize) {
        self.at().sweep_events.add(count as u64, []);
    }

    /// How long a sweep took, whether it swept anything or failed.
    pub fn sweep_time(&self, elapsed: Duration) {
        self.at().sweep_time.observe(ms(elapsed), []);
    }

    /// Partitions the sweeper looked at, and whether each was idle enough to sweep (`idle`) or
    /// skipped because its worker or queue was busy (`busy`).
    pub fn sweep_partitions(&self, state: &'static str, count: usize) {
        self.at().sweep_partitions.add(count as u64, [state]);
    }

    /// A retry's publish got no confirm in time: its message is requeued, the attempt made again.
    pub fn retry_unconfirmed(&self) {
        self.at().retry_unconfirmed.add(1, []);
    }

    /// Events refused at `stage` (`attempt`: the lease was no longer trusted before the broadcast
    /// or before a failure's retry; `outcome`: the outcome writer found the lease taken over) and
    /// sent back to their partition's queue.
    pub fn fenced(&self, stage: &'static str, count: usize) {
        self.at().fenced.add(count as u64, [stage]);
    }

    /// A lane put its user's events back in seq order: `sorted` (an event arrived behind a later
    /// one still queued, and took its place), or it waited for a missing seq: `restored` (it
    /// arrived within `pipeline.reorder_window_ms`) or `passed` (the window ran out; the socket
    /// fills the seq from PostgreSQL).
    pub fn lane_reorder(&self, outcome: &'static str) {
        self.at().lane_reorder.add(1, [outcome]);
    }

    /// Delivery outcomes (`pushed`, `offline`, `failed`) of `count` events.
    pub fn delivery_outcome(&self, outcome: &'static str, count: usize) {
        self.at().worker_delivered.add(count as u64, [outcome]);
    }

    /// A failed delivery attempt was scheduled for a retry through a delay queue. `attempt` is the
    /// attempt that failed (1 .. max_attempts - 1: low cardinality).
    pub fn retry_scheduled(&self, attempt: u32) {
        self.at().retry_scheduled.add(1, [&attempt.to_string()]);
    }

    /// An event's last attempt failed: it is marked failed and its message dead-lettered.
    pub fn dead_lettered(&self) {
        self.at().dead_lettered.add(1, []);
    }

    /// Events an operator replay handed to the publisher (`source` = cli or api), per step.
    pub fn replay_published(&self, count: usize, source: &'static str) {
        self.at().replay_published.add(count as u64, [source]);
    }

    /// Events a replay claimed but could not hand over (broker down): the outbox relay sends them.
    pub fn replay_deferred(&self, count: usize, source: &'static str) {
        self.at().replay_deferred.add(count as u64, [source]);
    }

    /// Web pushes scheduled when delivered events with a fallback were recorded.
    pub fn webpush_scheduled(&self, count: u64) {
        self.at().webpush_scheduled.add(count, []);
    }

    /// One web push ended (`outcome` as in `webpush_attempts`, or `received`), after `took` on the
    /// wire when a request was made.
    pub fn webpush_sent(&self, outcome: &'static str, took: Option<Duration>) {
        self.at().webpush_sent.add(1, [outcome]);
        if let Some(took) = took {
            self.at().webpush_request_time.observe(ms(took), [outcome]);
        }
    }

    /// Users whose push receipts were recorded in one flush.
    pub fn webpush_receipts(&self, users: usize) {
        self.at().webpush_receipts.add(users as u64, []);
    }

    /// A connection was dropped because its outbound queue was full (a client that does not read).
    pub fn socket_overflow(&self) {
        self.at().socket_overflow.add(1, []);
    }

    /// A client frame could not be decoded.
    pub fn socket_malformed_frame(&self, reason: &'static str) {
        self.at().frame_malformed.add(1, [reason]);
    }

    /// A channel saw a seq it had already pushed (a redelivery) and dropped it.
    pub fn socket_duplicate_dropped(&self) {
        self.at().push_duplicate.add(1, []);
    }

    /// A channel was handed `count` events by this node's group commit, ahead of the worker
    /// (`outcome`: `pushed`, `behind`, `ahead`).
    pub fn socket_push_from_commit(&self, outcome: &'static str, count: u64) {
        if count > 0 {
            self.at().push_from_commit.add(count, [outcome]);
        }
    }

    /// A channel filled a gap in a user's sequence from PostgreSQL (`count` events).
    pub fn socket_gap_filled(&self, count: usize) {
        self.at().push_gap_filled.add(count as u64, []);
    }

    /// A channel could not close a gap in its user's sequence (`reason`: `store_unavailable`,
    /// `pruned`, `too_large`, `throttled`) and was closed with `phx_error` so that its client rejoins.
    pub fn socket_gap_unfilled(&self, reason: &'static str) {
        self.at().push_gap_unfilled.add(1, [reason]);
    }

    /// Clients acknowledged having shown events (delivered to a person, not just pushed).
    pub fn client_acked(&self, count: u64) {
        self.at().client_acked.add(count, []);
    }

    /// Events an inbox page served (`GET /api/v1/inbox`).
    pub fn inbox_served(&self, count: usize) {
        self.at().inbox_events.add(count as u64, []);
    }

    /// How long a retention round took, all its statements together.
    pub fn retention_round(&self, elapsed: Duration) {
        self.at().retention_time.observe(ms(elapsed), []);
    }

    /// Delivered events pruned by retention.
    pub fn events_pruned(&self, count: u64) {
        self.at().events_pruned.add(count, []);
    }

    /// Idempotency keys of pruned events expired (older than `store.idempotency_ttl_secs`).
    pub fn idempotency_keys_expired(&self, count: u64) {
        self.at().idempotency_keys_expired.add(count, []);
    }

    /// A stats channel `ping` was handled.
    pub fn stats_ping(&self, elapsed: Duration) {
        self.at().stats_ping.observe(ms(elapsed), []);
    }

    /// Open WebSocket connections on this node.
    pub fn socket_connections(&self, open: u64) {
        self.at().socket_connections.set(open, []);
    }

    /// User channels joined on this node.
    pub fn socket_channels(&self, joined: u64) {
        self.at().socket_channels.set(joined, []);
    }

    /// A PostgreSQL pool's connections (`pool` = background, writes or reads).
    pub fn pool_connections(&self, pool: &'static str, in_use: u64, idle: u64) {
        self.at().pool_connections.set(in_use, [pool, "in_use"]);
        self.at().pool_connections.set(idle, [pool, "idle"]);
    }
}

//! The pipeline's section (`[pipeline]`): the group commit's buffers and streams, the outbox relay,
//! the worker's runs and reorder window, and the sweeper.

use super::Error;
use super::validate::{at_least_one, invalid};
use serde::{Deserialize, Serialize};

/// Enqueue, relay and worker pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Events waiting for the group commit; when full, requests wait up to `enqueue_timeout_ms`.
    pub enqueue_buffer: usize,
    /// Bytes of events (their data, ids and keys) waiting for the group commit; when full,
    /// requests wait up to `enqueue_timeout_ms`. Must hold one whole request (`http.max_body_bytes`).
    pub enqueue_buffer_bytes: usize,
    /// Most events in one group commit.
    pub max_commit_batch: usize,
    /// Group commits in flight at once on an api node: each stream owns a fixed share of the
    /// partitions (so one user's events always commit through the same stream, in order) and
    /// runs one transaction at a time. Each takes a connection of `store.write_connections`.
    /// 1 by measurement: where a commit's WAL flush is cheap (0.3 ms on our machines), one stream
    /// already batches whatever waits, and more streams only cut the batches (and the broker
    /// messages) smaller: 2 streams ingested 12% fewer single events on two cores. Raise it where
    /// PostgreSQL's commits are slow (a remote or replicated WAL flush) and it has cores to spare.
    pub commit_streams: usize,
    /// On a node that runs the api and socket roles, a group commit of at most this many events
    /// hands them straight to the node's own joined channels of their users, ahead of the worker's
    /// broadcast (which still follows, through the broker, and is the one that records delivery):
    /// a client on the node that took the request is pushed its event one WAL flush after the
    /// request, without waiting for a broker round trip. A channel pushes such an event only when
    /// it is the next seq it needs, so the head start can neither open a gap nor push a seq twice.
    /// A larger commit leaves its events to the worker: commits grow with load, and on a busy node
    /// turning every event into pushes twice costs more than the head start gains. 0: never.
    pub push_from_commit: usize,
    /// How long a request may wait for room in the enqueue buffer before it gets 503.
    pub enqueue_timeout_ms: u64,
    /// Most events in one `POST /api/v1/events/batch`.
    pub max_batch_events: usize,
    /// Largest `data` of one event, serialised.
    pub max_data_bytes: usize,
    /// Rows still unpublished after this long are republished by the outbox relay.
    pub relay_grace_ms: u64,
    /// How often the relay looks for such rows.
    pub relay_interval_ms: u64,
    /// Most rows the relay claims at once.
    pub relay_batch: i64,
    /// Most status updates in one batched UPDATE.
    pub max_status_batch: usize,
    /// Most events of one user a worker broadcasts (and records) in one go.
    pub max_run_events: usize,
    /// How long a user's lane waits for a seq that is missing (its next event queued is further
    /// ahead): events two api nodes committed close together can reach their partition out of
    /// order, and the lane puts them back in order instead of leaving it to the socket's gap fill.
    /// Events in order never wait; 0 never waits.
    pub reorder_window_ms: u64,
    /// An event neither delivered nor failed, whose message (a confirmed outbox row) is this old
    /// and nothing due for it for this long (enqueued, replayed, swept or due to retry before then),
    /// is one no message carries any more: the sweeper sends it again. 0 turns the sweeper off.
    pub sweep_after_ms: u64,
    /// How often a worker node sweeps its partitions.
    pub sweep_interval_ms: u64,
    /// A partition is swept only after nothing was received or settled on it for this long
    /// (and its queue is empty), so nothing waiting behind a backlog is ever sent again.
    pub sweep_idle_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            enqueue_buffer: 20_000,
            enqueue_buffer_bytes: 64 * 1024 * 1024,
            max_commit_batch: 1_000,
            commit_streams: 1,
            push_from_commit: 128,
            enqueue_timeout_ms: 5_000,
            max_batch_events: 1_000,
            max_data_bytes: 64 * 1024,
            relay_grace_ms: 10_000,
            relay_interval_ms: 1_000,
            relay_batch: 1_000,
            max_status_batch: 1_000,
            max_run_events: 200,
            reorder_window_ms: 100,
            sweep_after_ms: 300_000,
            sweep_interval_ms: 30_000,
            sweep_idle_ms: 2_000,
        }
    }
}

durations! {
    PipelineSettings {
        relay_interval_ms => relay_interval,
        enqueue_timeout_ms => enqueue_timeout,
        sweep_interval_ms => sweep_interval,
        sweep_idle_ms => sweep_idle,
    }
}

impl PipelineSettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        if self.sweep_interval_ms == 0 {
            return invalid("pipeline.sweep_interval_ms", "must be at least 1");
        }
        at_least_one(&[
            ("pipeline.enqueue_buffer", self.enqueue_buffer),
            ("pipeline.max_commit_batch", self.max_commit_batch),
            ("pipeline.commit_streams", self.commit_streams),
            ("pipeline.max_batch_events", self.max_batch_events),
            ("pipeline.max_status_batch", self.max_status_batch),
            ("pipeline.max_run_events", self.max_run_events),
        ])?;
        if u32::try_from(self.enqueue_buffer_bytes).is_err() {
            return invalid(
                "pipeline.enqueue_buffer_bytes",
                "must hold one whole request (http.max_body_bytes) and be below 4 GiB",
            );
        }
        if self.max_batch_events > self.enqueue_buffer {
            return invalid(
                "pipeline.max_batch_events",
                "must not exceed pipeline.enqueue_buffer",
            );
        }
        Ok(())
    }
}

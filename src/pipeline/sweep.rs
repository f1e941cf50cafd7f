//! The sweeper: sends again the events that no message carries any more, so nothing stays
//! `accepted` or `published` forever.
//!
//! An event is neither delivered nor failed while a message carries it: in the outbox unconfirmed
//! (the relay covers that), in its partition queue or a worker's hands, or as a retry in a delay
//! queue. A message can still vanish behind Herald's back after the broker confirmed it: a queue
//! purged or deleted by an operator, a retry's channel closing after the ack, a quorum queue's
//! delivery limit dropping a message requeued too often while PostgreSQL was down. Its events then
//! wait for nothing. Every such message keeps a confirmed row in the outbox until a worker has
//! settled it (see `store::outbox`), so the sweeper reads, per partition, the confirmed rows older
//! than `pipeline.sweep_after_ms` and puts the events they still carry back in the outbox as
//! `accepted`, where the relay publishes them and the normal confirm path applies. A client whose
//! channel already pushed one drops the copy by seq.
//!
//! **Never what is merely waiting behind a backlog.** Age alone cannot tell a lost message from
//! one queued behind an hour of backlog, so the partition's owner sweeps only its own partitions,
//! and only those idle: nothing in work on this node, nothing received or settled for
//! `pipeline.sweep_idle_ms`, and no ready message in the partition queue; checked before the rows
//! are read, and again (same activity mark, still no ready message) before they are swept. Why that
//! is enough: a row is confirmed, so its message (if it exists) was in the partition queue (or a
//! delay queue, for a retry not yet due) before the read. A message in the partition queue is
//! either ready (the queue is not empty), or handed to this node's consumer, which with nothing in
//! work takes it at once (the activity mark moves, or something is in work): either way the second
//! check fails and the partition waits for the next sweep. What remains is a message in transit
//! from the broker to the consumer across both checks, which the idle time makes unlikely and
//! which would cost only a duplicate, dropped at the socket.
//!
//! **No partition starves another, and no sweep scans `events`.** Each idle partition's rows are
//! read apart, oldest first, at most `pipeline.relay_batch` of them per sweep, through an index of
//! the outbox (a small table: only messages in flight); each swept row is deleted or replaced by a
//! newer one, so the next sweep reads further. A partition that is never idle is never swept; its
//! rows are swept at its first quiet moment. Only one sweep runs at a time per node.

use super::worker::PartitionWork;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::queue::{self, ConsumerLink, Topology};
use crate::store::{self, MessageLimits, Store};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A partition this node consumes, as the sweeper sees it.
pub(super) struct Watched {
    /// The partition.
    pub partition: u16,
    /// Its work on this node.
    pub work: Arc<PartitionWork>,
    /// Cancelled once the node stops consuming it.
    pub stop: CancellationToken,
}

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// RabbitMQ could not say whether a partition queue is empty.
    #[error(transparent)]
    Queue(#[from] queue::Error),
}

/// One sweep over `watched`; returns how many events it sent again.
///
/// # Errors
/// PostgreSQL or RabbitMQ failed; the next sweep tries again.
pub(super) async fn sweep_once(
    store: &Store,
    link: &ConsumerLink,
    watched: &[Watched],
    settings: &Settings,
    metrics: &Metrics,
) -> Result<usize, SweepError> {
    let pipeline = &settings.pipeline;
    let names = Topology::new(&settings.queue.prefix, settings.queue.partitions);
    let quiet = pipeline.sweep_idle();
    let mut idle: HashMap<u16, (&Watched, u64)> = HashMap::new();
    for w in watched {
        if let Some(mark) = idle_mark(w, quiet)
            && queue_empty(link, &names, w.partition).await?
        {
            idle.insert(w.partition, (w, mark));
        }
    }
    metrics.sweep_partitions("idle", idle.len());
    metrics.sweep_partitions("busy", watched.len() - idle.len());
    if idle.is_empty() {
        return Ok(0);
    }
    // Rows written before rows had a partition get theirs first (once, after an upgrade).
    store
        .place_unplaced_messages(settings.queue.partitions, pipeline.relay_batch)
        .await?;
    let limits = MessageLimits {
        max_events: settings.queue.message_max_events,
        max_bytes: settings.queue.message_max_bytes,
    };
    let mut swept = 0;
    for (&p, &(w, mark)) in &idle {
        let rows = store
            .stale_messages(p, pipeline.sweep_after_ms, pipeline.relay_batch)
            .await?;
        if rows.is_empty() {
            continue;
        }
        // Still idle since the first look, and still nothing waiting in the queue.
        if idle_mark(w, quiet) != Some(mark) || !queue_empty(link, &names, p).await? {
            continue;
        }
        swept += store
            .sweep_messages(
                (p, settings.queue.partitions),
                &rows,
                pipeline.sweep_after_ms,
                pipeline.relay_grace_ms,
                limits,
            )
            .await?;
    }
    metrics.sweep_events(swept);
    if swept > 0 {
        tracing::warn!(
            events = swept,
            "swept events no message carried any more; the relay sends them again"
        );
    }
    Ok(swept)
}

/// The partition's activity mark if it is still consumed here and has been idle for `quiet`.
fn idle_mark(w: &Watched, quiet: Duration) -> Option<u64> {
    if w.stop.is_cancelled() {
        return None;
    }
    w.work
        .quiet()
        .filter(|(for_, _)| *for_ >= quiet)
        .map(|(_, mark)| mark)
}

async fn queue_empty(
    link: &ConsumerLink,
    names: &Topology,
    partition: u16,
) -> Result<bool, queue::Error> {
    let ready = queue::ready_messages(&link.connection, &names.partition_queue(partition)).await?;
    Ok(ready == Some(0))
}

//! The pipeline between the API and the sockets: enqueue (group commit, then publish), the confirm
//! recorder, the outbox relay, the worker pool with its partition leases and per-user lanes, and
//! the delivery-outcome writer.
//!
//! Every write here goes through [`batch::Batcher`], one group-commit mechanism for all of them, and
//! every publish goes through the one [`crate::queue::PublisherHandle`] (enqueue, relay and replay
//! alike), as a message built by [`message`].

pub mod batch;
pub mod enqueue;
pub mod faults;
mod lanes;
pub mod lease;
pub mod outcomes;
pub mod partitions;
pub mod published;
pub mod relay;
pub mod replay;
pub mod retention;
pub mod retry;
pub mod sweep;
pub mod worker;

use crate::config::Settings;
use crate::event::{Envelope, encode_batch};
use crate::queue::OutgoingMessage;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// The broker message of outbox row `id`: `envelopes` (all of partition `partition`, in order),
/// to be published within `window` from now (see [`publish_window`]).
pub fn message(
    id: Uuid,
    partition: u16,
    envelopes: &[Envelope],
    window: Duration,
) -> OutgoingMessage {
    OutgoingMessage {
        id,
        partition,
        events: envelopes.len(),
        body: encode_batch(envelopes),
        publish_by: Instant::now() + window,
    }
}

/// How long a message may wait to be published: the relay's grace less the confirm timeout and a
/// tenth of the grace (for the time between the outbox row's insert and the message's making), so
/// a publish and its confirm end before the relay may claim the row. The relay then never
/// republishes a message that is merely slow.
pub fn publish_window(settings: &Settings) -> Duration {
    let grace = settings.pipeline.relay_grace_ms;
    Duration::from_millis(
        grace
            .saturating_sub(settings.queue.confirm_timeout_ms)
            .saturating_sub(grace / 10),
    )
}

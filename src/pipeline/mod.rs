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
pub mod head_start;
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
pub mod upkeep;
pub mod worker;

use crate::config::Settings;
use crate::event::{Envelope, encode_batch};
use crate::queue::OutgoingMessage;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// Awaits `work`, calling `say` with the time waited so far every `every` while it is not done: a
/// wait that should end on its own (a partition's drain, room in its window) and does not is
/// reported, repeatedly, instead of hanging in silence.
pub(crate) async fn waiting_loudly<F: Future>(
    work: F,
    every: Duration,
    mut say: impl FnMut(Duration),
) -> F::Output {
    let mut work = std::pin::pin!(work);
    let mut waited = Duration::ZERO;
    loop {
        match tokio::time::timeout(every, work.as_mut()).await {
            Ok(done) => return done,
            Err(_) => {
                waited += every;
                say(waited);
            }
        }
    }
}

/// The broker message of outbox row `id`: `envelopes` (all of partition `partition`, in order),
/// to be published before `publish_by` (from [`publish_deadline`], taken before the row was
/// written).
pub fn message(
    id: Uuid,
    partition: u16,
    envelopes: &[Envelope],
    publish_by: Instant,
) -> OutgoingMessage {
    OutgoingMessage {
        id,
        partition,
        events: envelopes.len(),
        body: encode_batch(envelopes),
        publish_by,
    }
}

/// The instant before which a message must be published: `window` ([`publish_window`]) from now.
///
/// Take it before the message's outbox row is written or claimed (before the group commit, the
/// relay's claim, the replay's claim), never when the message is built. Building can come long
/// after the row: the commit path builds each message after waiting for room for the ones before
/// it, the relay and a replay after earlier rows' publishes. A deadline counted from the building
/// could let a publish and its confirm run past the moment the relay may claim the row (its
/// `created_at`, or the last claim, plus the grace), and the message be sent twice.
pub fn publish_deadline(window: Duration) -> Instant {
    Instant::now() + window
}

/// How long a message may wait to be published, counted from before its outbox row was written
/// ([`publish_deadline`]): the relay's grace less the confirm timeout and a tenth of the grace (for
/// the time between taking the deadline and the row's insert, and for clocks), so a publish and
/// its confirm end before the relay may claim the row. The relay then never republishes a message
/// that is merely slow.
pub fn publish_window(settings: &Settings) -> Duration {
    let grace = settings.pipeline.relay_grace_ms;
    Duration::from_millis(
        grace
            .saturating_sub(settings.queue.confirm_timeout_ms)
            .saturating_sub(grace / 10),
    )
}

//! What a worker holds while an event is in work: the event with its lease, its slot of the window
//! and its count in the partition's work, and the broker message it came in, which is acked (or
//! requeued) once every one of its events has let go of it. Holding is what keeps the accounting
//! right: dropping an event returns its slot and count, and an event dropped unsettled (its lane
//! task panicked or was aborted) asks for its message to come back.

use super::partition::WorkCount;
use crate::event::Envelope;
use crate::pipeline::lanes::Sequenced;
use crate::pipeline::lease::Lease;
use crate::pipeline::outcomes::Settled;
use crate::queue::{self, Settlement};
use lapin::message::Delivery;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

/// One event in work: where it came from, and its share of its partition's demand.
pub(in crate::pipeline) struct EventInWork {
    pub(super) envelope: Envelope,
    pub(super) attempt: u32,
    /// The partition lease it was taken under: delivered only while trusted, recorded only while
    /// current (see [`crate::pipeline::lease`]).
    pub(super) lease: Arc<Lease>,
    /// Its message, until the item is settled.
    pub(super) message: Option<Arc<MessageInWork>>,
    /// Returned to the partition's window when the item is dropped (settled).
    pub(super) _permit: Option<OwnedSemaphorePermit>,
    /// Counts the item in its partition's work until it is dropped (settled).
    pub(super) _counted: WorkCount,
}

impl Sequenced for EventInWork {
    fn seq(&self) -> i64 {
        self.envelope.seq
    }
}

impl EventInWork {
    /// The event is done with: its message is acked once all its events are (requeued if any
    /// asked for it).
    pub(super) async fn settle(mut self, release: Release) {
        if let Some(message) = self.message.take() {
            message.settle_one(release).await;
        }
    }
}

impl Drop for EventInWork {
    /// An item dropped unsettled (its lane task panicked or was aborted) must not strand its
    /// message unacked: it asks for the message to come back.
    fn drop(&mut self) {
        if let Some(message) = self.message.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { message.settle_one(Release::Requeue).await });
        }
    }
}

/// A broker message in work: acked (or requeued) once all of its events are settled.
pub(super) struct MessageInWork {
    delivery: Delivery,
    unsettled: AtomicUsize,
    requeue: AtomicBool,
    /// Its outbox row (the message's id), forgotten once the message is acked unless `keep_row`.
    row: Option<Uuid>,
    keep_row: AtomicBool,
    settled: Settled,
    /// Bound on sending its ack or requeue.
    settle_timeout: Duration,
}

/// How one event lets go of its message once settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Release {
    /// Done with: the message may be acked and its outbox row forgotten.
    Done,
    /// Done with, but its retry's own row could not be recorded: the message is acked and its row
    /// kept, so the sweeper still has a trace of the event should the retry be lost.
    DoneKeepRow,
    /// The message must come back (an outcome not stored, or refused by the lease's epoch).
    Requeue,
}

impl MessageInWork {
    /// `delivery`, carrying `events` events, whose outbox row is forgotten through `settled` once
    /// it is acked, and whose ack or requeue is sent within `settle_timeout`.
    pub(super) fn new(
        delivery: Delivery,
        events: usize,
        settled: Settled,
        settle_timeout: Duration,
    ) -> Self {
        let row = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        Self {
            delivery,
            unsettled: AtomicUsize::new(events),
            requeue: AtomicBool::new(false),
            row,
            keep_row: AtomicBool::new(false),
            settled,
            settle_timeout,
        }
    }

    /// One of the message's events is settled; the last one settles the message.
    async fn settle_one(&self, release: Release) {
        match release {
            Release::Requeue => self.requeue.store(true, Ordering::Relaxed),
            Release::DoneKeepRow => self.keep_row.store(true, Ordering::Relaxed),
            Release::Done => {}
        }
        if self.unsettled.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let requeue = self.requeue.load(Ordering::Relaxed);
        // Some event's outcome could not be stored: the whole message comes back (events already
        // delivered come again and are dropped by seq at the socket).
        let how = if requeue {
            Settlement::Requeue
        } else {
            Settlement::Ack
        };
        if let Err(error) = queue::settle(&self.delivery, how, self.settle_timeout).await {
            // The channel is gone: the broker redelivers, and the socket drops duplicates by seq.
            tracing::warn!(error = %error, "cannot settle a message");
        }
        if let (false, false, Some(row)) =
            (requeue, self.keep_row.load(Ordering::Relaxed), self.row)
        {
            // Nothing it carried is in flight any more. Lost (the writer stopped), the row is
            // deleted by the sweeper once it sees every event final.
            let _ = self.settled.send(row).await;
        }
    }
}

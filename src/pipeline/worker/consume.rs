//! Consuming a partition: messages are taken into work against the partition's window, and each
//! message's events go onto their users' lanes in message order. Stopping hands back, in order,
//! everything received but not taken into work, then waits for what was.

use super::Worker;
use super::in_work::{EventInWork, MessageInWork};
use super::partition::{PartitionWork, WorkCount, wait_for_room};
use crate::event::{Envelope, decode_batch};
use crate::pipeline::lanes::Lanes;
use crate::pipeline::lease::Lease;
use crate::queue::{self, ConsumerLink, Settlement};
use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// Why a partition's consumption ended.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::pipeline) enum ConsumerEnd {
    /// Asked to stop: everything taken was settled or requeued in order.
    Drained,
    /// The consumer's stream failed (the connection is gone): unacked messages return to the
    /// queue when the broker notices.
    Lost,
}

/// One event of a message as it arrives, and whether it takes a slot of the window.
struct Incoming {
    envelope: Envelope,
    takes_slot: bool,
}

impl Worker {
    /// Consumes partition `partition` through `consumer` until `stop` is cancelled or the stream
    /// fails. On stop: cancels the consumer, returns every message taken but not yet in work to the
    /// queue (in order, so it goes first to the next consumer), and waits until every event in work
    /// is settled; only then may the partition be handed to another node.
    #[allow(clippy::too_many_arguments)] // one call site; each is a distinct handle
    pub(in crate::pipeline) async fn consume_partition(
        &self,
        partition: u16,
        mut consumer: Consumer,
        link: &ConsumerLink,
        work: &Arc<PartitionWork>,
        lease: &Arc<Lease>,
        lanes: &Lanes<EventInWork>,
        stop: &CancellationToken,
    ) -> ConsumerEnd {
        let tag = consumer.tag().to_string();
        let mut returned: Vec<Delivery> = Vec::new();
        let ended = loop {
            let delivery = tokio::select! {
                () = stop.cancelled() => break ConsumerEnd::Drained,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => {
                        tracing::warn!(error = %error, partition, "partition consumer lost RabbitMQ");
                        break ConsumerEnd::Lost;
                    }
                    None => {
                        tracing::warn!(partition, "partition consumer ended");
                        break ConsumerEnd::Lost;
                    }
                },
            };
            work.touch();
            let Some(events) = self.decode(&delivery).await else {
                continue;
            };
            let events = claim_slots(events, lanes);
            let wanted = u32::try_from(events.iter().filter(|e| e.takes_slot).count())
                .unwrap_or(u32::MAX)
                .min(work.prefetch);
            let permits = if wanted == 0 {
                None
            } else {
                let acquired = tokio::select! {
                    permits = wait_for_room(work, wanted, partition) => permits,
                    () = stop.cancelled() => {
                        returned.push(delivery);
                        break ConsumerEnd::Drained;
                    }
                };
                let Ok(permits) = acquired else {
                    break ConsumerEnd::Lost; // the window is never closed; unreachable in practice
                };
                Some(permits)
            };
            self.dispatch(delivery, events, permits, work, lease, lanes);
        };
        if ended == ConsumerEnd::Drained {
            if let Err(error) = link.cancel(&tag).await {
                tracing::warn!(error = %error, partition, "cannot cancel a partition consumer");
            }
            // What the broker sent before the cancel took effect: back to the queue too.
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_secs(5), consumer.next()).await
            {
                returned.push(delivery);
            }
            for delivery in returned {
                let returned = queue::settle(&delivery, Settlement::Requeue, self.broker_timeout);
                if let Err(error) = returned.await {
                    // They share one channel: the rest would wait out the bound in turn. The
                    // broker returns them all when the channel closes.
                    tracing::warn!(error = %error, partition, "cannot return a message");
                    break;
                }
            }
        }
        // Every event in work settles before the partition moves.
        work.settled().await;
        ended
    }

    /// The events of a message, or `None` after dead-lettering one that is not a batch of events.
    async fn decode(&self, delivery: &Delivery) -> Option<Vec<Envelope>> {
        match decode_batch(&delivery.data) {
            Ok(events) if !events.is_empty() => Some(events),
            Ok(_) => {
                let _ = queue::settle(delivery, Settlement::Ack, self.broker_timeout).await;
                None
            }
            Err(error) => {
                tracing::error!(error = %error, "undecodable message dead-lettered");
                let rejected = queue::settle(delivery, Settlement::Reject, self.broker_timeout);
                if let Err(error) = rejected.await {
                    tracing::warn!(error = %error, "cannot dead-letter an undecodable message");
                }
                self.metrics.dead_lettered();
                None
            }
        }
    }

    /// Puts a message's events on their users' lanes, in message order; the events that take a
    /// slot of the window ([`claim_slots`]) each carry one permit of `permits`.
    fn dispatch(
        &self,
        delivery: Delivery,
        events: Vec<Incoming>,
        mut permits: Option<OwnedSemaphorePermit>,
        work: &Arc<PartitionWork>,
        lease: &Arc<Lease>,
        lanes: &Lanes<EventInWork>,
    ) {
        let attempt = queue::attempt_of(&delivery.properties);
        self.metrics.worker_message(events.len());
        let message = Arc::new(MessageInWork::new(
            delivery,
            events.len(),
            self.settled.clone(),
            self.broker_timeout,
        ));
        for Incoming {
            envelope,
            takes_slot,
        } in events
        {
            // One permit per claiming event. The last permit moves whole; a message claiming more
            // than the window (never planned so) lets its extra events ride on the others' share.
            let permit = match permits.as_mut() {
                Some(held) if takes_slot && held.num_permits() > 1 => held.split(1),
                Some(_) if takes_slot => permits.take(),
                _ => None,
            };
            let user = envelope.user_id.as_str().to_owned();
            let item = EventInWork {
                envelope,
                attempt,
                lease: Arc::clone(lease),
                message: Some(Arc::clone(&message)),
                _permit: permit,
                _counted: WorkCount::new(work),
            };
            lanes.push(&user, item);
        }
    }
}

/// Which of a message's events take a slot of their partition's window: those whose user's lane
/// (counting this message's earlier events of the user) holds fewer than a run's worth. A user's
/// lane so occupies at most `pipeline.max_run_events` of the window; the rest of a burst waits in
/// the lane without a slot, bounded by the unacked messages the broker hands a consumer
/// ([`queue::PARTITION_QOS_MESSAGES`]). A slow or bursting user therefore cannot fill the window
/// and stall the other users of its partition.
fn claim_slots(events: Vec<Envelope>, lanes: &Lanes<EventInWork>) -> Vec<Incoming> {
    let cap = lanes.max_run();
    let mut incoming: Vec<Incoming> = events
        .into_iter()
        .map(|envelope| Incoming {
            envelope,
            takes_slot: false,
        })
        .collect();
    let mut earlier: HashMap<&str, usize> = HashMap::new();
    for Incoming {
        envelope,
        takes_slot,
    } in &mut incoming
    {
        let user = envelope.user_id.as_str();
        let before = earlier.entry(user).or_default();
        *takes_slot = lanes.depth(user) + *before < cap;
        *before += 1;
    }
    incoming
}

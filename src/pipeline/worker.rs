//! The worker pool (GenStage's ConsumerSupervisor): RabbitMQ's prefetch is the demand, and every
//! delivery runs in its own task, so at most `prefetch` run at once.
//!
//! A task broadcasts its event to `user:<id>`, waits until the outcome is stored, then acks. A failure
//! is nacked without requeue: the message goes to the dead-letter queue and the event is marked
//! `failed`, never looping.
//!
//! Per-user order: deliveries arrive in queue order, which for one user is seq order. Tasks of
//! different users run concurrently, but each task first waits for the previous task of the same user
//! (a "lane"): one user's events are broadcast strictly one after another, in arrival order.

use super::outcomes::Outcomes;
use crate::config::QueueSettings;
use crate::event::{Envelope, USER_TOPIC_PREFIX};
use crate::metrics::Metrics;
use crate::pubsub::{Message, PubSub};
use crate::queue::{self, Backoff};
use crate::store::Outcome;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

/// What a delivery task needs.
#[derive(Clone)]
pub struct Worker {
    /// Where events are broadcast.
    pub pubsub: PubSub,
    /// Where outcomes are recorded.
    pub outcomes: Outcomes,
    /// Metrics.
    pub metrics: Metrics,
    /// True while consuming (readiness).
    pub consuming: Arc<std::sync::atomic::AtomicBool>,
}

impl Worker {
    /// Consumes until `stop` is cancelled, reconnecting with backoff when the broker goes away. On
    /// stop: cancels the consumer, lets in-flight deliveries finish and ack, then closes the
    /// connection.
    pub async fn run(self, settings: QueueSettings, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(settings.reconnect_max_backoff_ms));
        let tag = format!("herald-worker-{}", Uuid::now_v7().simple());
        while !stop.is_cancelled() {
            let link = tokio::select! {
                link = queue::consume_events(&settings, &tag) => link,
                () = stop.cancelled() => return,
            };
            match link {
                Ok(consumer) => {
                    backoff.reset();
                    tracing::info!(prefetch = settings.prefetch, "worker consuming");
                    self.consuming
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.consume(consumer, &stop).await;
                    self.consuming
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "worker cannot reach RabbitMQ; retrying");
                    self.metrics.queue_connection_lost("consumer");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn consume(&self, mut link: queue::EventConsumer, stop: &CancellationToken) {
        let tasks = TaskTracker::new();
        let lanes = Lanes::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    // No new deliveries; unacked prefetched ones return to the queue when we close.
                    let _ = link
                        .channel
                        .basic_cancel(link.tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                    break;
                }
                next = link.consumer.next() => match next {
                    Some(Ok(delivery)) => self.dispatch(delivery, &lanes, &tasks),
                    Some(Err(error)) => {
                        tracing::warn!(error = %error, "consumer lost RabbitMQ; reconnecting");
                        self.metrics.queue_connection_lost("consumer");
                        break;
                    }
                    None => {
                        tracing::warn!("consumer stream ended; reconnecting");
                        self.metrics.queue_connection_lost("consumer");
                        break;
                    }
                },
            }
        }
        // In-flight deliveries finish (and ack on this connection) before it closes.
        tasks.close();
        tasks.wait().await;
        let _ = link.connection.close(200, "worker stopping".into()).await;
    }

    fn dispatch(&self, delivery: Delivery, lanes: &Lanes, tasks: &TaskTracker) {
        let envelope = match serde_json::from_slice::<Envelope>(&delivery.data) {
            Ok(envelope) => envelope,
            Err(error) => {
                let worker = self.clone();
                tasks.spawn(async move { worker.reject_undecodable(delivery, error).await });
                return;
            }
        };
        let mut lane = lanes.enter(envelope.user_id.as_str());
        let worker = self.clone();
        let span = tracing::info_span!("deliver", event_id = %envelope.id, seq = envelope.seq);
        tasks.spawn(
            async move {
                lane.wait_turn().await;
                worker.deliver(envelope, delivery).await;
                lane.leave();
            }
            .instrument(span),
        );
    }

    async fn deliver(&self, envelope: Envelope, delivery: Delivery) {
        let started = Instant::now();
        let id = envelope.id;
        let message = Message {
            topic: format!("{USER_TOPIC_PREFIX}{}", envelope.user_id).into(),
            event: envelope.event.as_str().into(),
            seq: Some(envelope.seq),
            payload: envelope.push_payload().into(),
            enqueued_at_ms: Some(envelope.at),
        };
        let (outcome, label) = match self.pubsub.broadcast(message).await {
            Ok(reach) => {
                let sockets = reach.delivered as i32;
                let label = if sockets > 0 { "pushed" } else { "offline" };
                (Outcome::Delivered { id, sockets }, label)
            }
            Err(error) => (
                Outcome::Failed {
                    id,
                    error: error.to_string(),
                },
                "failed",
            ),
        };
        let failed = matches!(outcome, Outcome::Failed { .. });
        match self.outcomes.submit(outcome).await {
            Ok(Ok(())) if failed => nack_to_dead_letter(&delivery).await,
            Ok(Ok(())) => ack(&delivery).await,
            // Not recorded: leave the message to a later attempt rather than lose the record.
            _ => requeue(&delivery).await,
        }
        self.metrics.delivery_outcome(label);
        self.metrics.worker_processed(started.elapsed(), label);
    }

    async fn reject_undecodable(&self, delivery: Delivery, error: serde_json::Error) {
        tracing::error!(error = %error, "undecodable message dead-lettered");
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        if let Some(id) = id {
            let outcome = Outcome::Failed {
                id,
                error: format!("undecodable message: {error}"),
            };
            let _ = self.outcomes.submit(outcome).await;
        }
        nack_to_dead_letter(&delivery).await;
        self.metrics.delivery_outcome("failed");
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker redelivers, and the socket drops the duplicate by seq.
        tracing::warn!(error = %error, "ack failed");
    }
}

async fn nack_to_dead_letter(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: false,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.nack(options).await {
        tracing::warn!(error = %error, "nack failed");
    }
}

async fn requeue(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.nack(options).await {
        tracing::warn!(error = %error, "requeue failed");
    }
}

/// Per-user lanes: the latest task of each user with one in flight, so the next task of that user
/// waits for it. Entries go when their task ends with no successor, so the map holds only users with
/// deliveries in flight (at most `prefetch`).
#[derive(Clone, Default)]
struct Lanes {
    // A std Mutex: held only to swap an entry, never across an await.
    inner: Arc<Mutex<LaneMap>>,
}

#[derive(Default)]
struct LaneMap {
    next_ticket: u64,
    tails: HashMap<String, (u64, oneshot::Receiver<()>)>,
}

/// A task's place in its user's lane.
struct LaneTicket {
    lanes: Lanes,
    user: String,
    ticket: u64,
    predecessor: Option<oneshot::Receiver<()>>,
    done: oneshot::Sender<()>,
}

impl Lanes {
    /// Called in arrival order (by the dispatching loop), which fixes the order of the lane.
    fn enter(&self, user: &str) -> LaneTicket {
        let (done, finished) = oneshot::channel();
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.next_ticket += 1;
        let ticket = map.next_ticket;
        let predecessor = map
            .tails
            .insert(user.to_owned(), (ticket, finished))
            .map(|(_, rx)| rx);
        LaneTicket {
            lanes: self.clone(),
            user: user.to_owned(),
            ticket,
            predecessor,
            done,
        }
    }
}

impl LaneTicket {
    async fn wait_turn(&mut self) {
        if let Some(predecessor) = self.predecessor.take() {
            // Ok or Err (the predecessor's task ended without sending): either way it is done.
            let _ = predecessor.await;
        }
    }

    fn leave(self) {
        let _ = self.done.send(());
        let mut map = self.lanes.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .tails
            .get(&self.user)
            .is_some_and(|(t, _)| *t == self.ticket)
        {
            map.tails.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_users_tasks_run_in_arrival_order_others_run_freely() {
        let lanes = Lanes::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        // First task of user a blocks until the gate opens.
        let mut first = lanes.enter("a");
        let second = lanes.enter("a");
        let other = lanes.enter("b");
        let l1 = Arc::clone(&log);
        let t1 = tokio::spawn(async move {
            first.wait_turn().await;
            let _ = gate_rx.await;
            l1.lock().unwrap().push("a1");
            first.leave();
        });
        let l2 = Arc::clone(&log);
        let t2 = tokio::spawn(async move {
            let mut second = second;
            second.wait_turn().await;
            l2.lock().unwrap().push("a2");
            second.leave();
        });
        let l3 = Arc::clone(&log);
        let t3 = tokio::spawn(async move {
            let mut other = other;
            other.wait_turn().await;
            l3.lock().unwrap().push("b1");
            other.leave();
        });
        t3.await.unwrap(); // b is not held up by a's blocked task
        assert_eq!(*log.lock().unwrap(), vec!["b1"]);
        gate_tx.send(()).unwrap();
        t1.await.unwrap();
        t2.await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["b1", "a1", "a2"]);
        assert!(lanes.inner.lock().unwrap().tails.is_empty());
    }
}

//! The worker pool (GenStage's ConsumerSupervisor): RabbitMQ's prefetch is the demand, and every
//! delivery runs in its own task, so at most `prefetch` run at once.
//!
//! A task makes one delivery attempt: it broadcasts the event to `user:<id>` under the attempt
//! timeout, catching a panic. The attempt ends one of three ways, each recorded in PostgreSQL with
//! its start and end (`delivery_attempts`, batched) before the message is settled:
//!
//! - **pushed**: the broadcast reached n >= 1 sockets: `delivered`, ack.
//! - **offline**: nobody is subscribed: also `delivered` (push_count 0), ack. Not an error; the
//!   event waits in PostgreSQL for the client's catch-up.
//! - **failed**: the attempt itself failed (pubsub or store unreachable, an encoding error, a panic,
//!   the timeout). If the retry policy allows another attempt, the message is published to the
//!   delay queue of the next delay (expiring back into the events queue as the next attempt), the
//!   event stays `published` with `last_error` and `next_attempt_at`, and the original is acked:
//!   no task sleeps holding a prefetch slot, and nothing is requeued in a loop. After the last
//!   attempt the event is `failed` and the message is nacked into the dead-letter queue.
//!
//! Per-user order: deliveries arrive in queue order, which for one user is seq order. Tasks of
//! different users run concurrently, but each task first waits for the previous task of the same user
//! (a "lane"): one user's events are attempted strictly one after another, in arrival order. A
//! failed event does not hold its user's lane while it waits for its retry: the next events go on,
//! and the user's socket channel, seeing a seq skip ahead, fills the missing one from PostgreSQL
//! first. So a client still sees n before n + 1, and the retry of n, when it comes, is a duplicate
//! the channel drops (see README, "Retries and order").

use super::faults::Faults;
use super::outcomes::Outcomes;
use super::retry::{Decision, RetryPolicy, random_unit};
use crate::config::QueueSettings;
use crate::event::{Envelope, USER_TOPIC_PREFIX, now_unix_ms};
use crate::metrics::Metrics;
use crate::pubsub::{Message, PubSub};
use crate::queue::{self, Backoff, RetryMessage, RetryPublishError};
use crate::store::{AttemptRecord, AttemptResult};
use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
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
    /// Where attempts are recorded.
    pub outcomes: Outcomes,
    /// Metrics.
    pub metrics: Metrics,
    /// True while consuming (readiness).
    pub consuming: Arc<std::sync::atomic::AtomicBool>,
    /// When to retry, and when to give up.
    pub retry: Arc<RetryPolicy>,
    /// Every distinct retry delay: one delay queue each.
    pub retry_delays_ms: Arc<[u64]>,
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
    /// The test fault injector (empty in production).
    pub faults: Arc<Faults>,
}

/// Where a consumer session sends retries: a confirm-mode channel on its own connection.
#[derive(Clone)]
struct RetryRoute {
    channel: Channel,
    prefix: Arc<str>,
    confirm_timeout: Duration,
}

/// What to do with the message once the attempt is recorded.
enum Settle {
    /// Delivered: ack once recorded.
    Ack,
    /// A retry copy is in a delay queue: ack, recorded or not (the retry records its own attempt).
    AckRetried,
    /// The last attempt failed: into the dead-letter queue once recorded.
    DeadLetter,
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
                link = queue::consume_events(&settings, &tag, &self.retry_delays_ms) => link,
                () = stop.cancelled() => return,
            };
            match link {
                Ok(consumer) => {
                    backoff.reset();
                    tracing::info!(prefetch = settings.prefetch, "worker consuming");
                    let route = RetryRoute {
                        channel: consumer.retry_channel.clone(),
                        prefix: settings.prefix.as_str().into(),
                        confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
                    };
                    self.consuming
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.consume(consumer, route, &stop).await;
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

    async fn consume(
        &self,
        mut link: queue::EventConsumer,
        route: RetryRoute,
        stop: &CancellationToken,
    ) {
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
                    Some(Ok(delivery)) => self.dispatch(delivery, &lanes, &tasks, &route),
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

    fn dispatch(&self, delivery: Delivery, lanes: &Lanes, tasks: &TaskTracker, route: &RetryRoute) {
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
        let route = route.clone();
        let attempt = queue::attempt_of(&delivery.properties);
        let span =
            tracing::info_span!("deliver", event_id = %envelope.id, seq = envelope.seq, attempt);
        tasks.spawn(
            async move {
                lane.wait_turn().await;
                worker.deliver(envelope, delivery, attempt, &route).await;
                lane.leave();
            }
            .instrument(span),
        );
    }

    async fn deliver(
        &self,
        envelope: Envelope,
        delivery: Delivery,
        attempt: u32,
        route: &RetryRoute,
    ) {
        let started = Instant::now();
        let started_at_ms = now_unix_ms();
        let result = self.attempt(&envelope).await;
        let finished_at_ms = now_unix_ms();
        let (result, label, settle) = match result {
            Ok(sockets) => {
                let label = if sockets > 0 { "pushed" } else { "offline" };
                (AttemptResult::Delivered { sockets }, label, Settle::Ack)
            }
            Err(error) => {
                tracing::warn!(error = %error, "delivery attempt failed");
                let (result, settle) = self
                    .after_failure(&envelope, &delivery, attempt, error, route)
                    .await;
                (result, "failed", settle)
            }
        };
        let record = AttemptRecord {
            id: envelope.id,
            started_at_ms,
            finished_at_ms,
            result,
        };
        let recorded = matches!(self.outcomes.submit(record).await, Ok(Ok(())));
        match settle {
            Settle::Ack if recorded => ack(&delivery).await,
            Settle::AckRetried => ack(&delivery).await,
            Settle::DeadLetter if recorded => {
                nack_to_dead_letter(&delivery).await;
                self.metrics.dead_lettered();
            }
            // Not recorded (PostgreSQL unreachable for the writer's whole backoff, ~15 s): requeue,
            // so the event is not left `published` with nobody holding its message. The writer's
            // backoff paces this; it is never an immediate loop.
            Settle::Ack | Settle::DeadLetter => requeue(&delivery).await,
        }
        self.metrics.delivery_outcome(label);
        self.metrics.worker_processed(started.elapsed(), label);
    }

    /// One attempt: the fault injector (tests), then the broadcast, under the attempt timeout, with
    /// a panic caught and reported as a failure. Returns the sockets reached.
    async fn attempt(&self, envelope: &Envelope) -> Result<i32, String> {
        let work = async {
            self.faults.inject(envelope).await?;
            let message = Message {
                topic: format!("{USER_TOPIC_PREFIX}{}", envelope.user_id).into(),
                event: envelope.event.as_str().into(),
                seq: Some(envelope.seq),
                payload: envelope.push_payload().into(),
                enqueued_at_ms: Some(envelope.at),
            };
            let reach = self
                .pubsub
                .broadcast(message)
                .await
                .map_err(|e| e.to_string())?;
            Ok(i32::try_from(reach.delivered).unwrap_or(i32::MAX))
        };
        match tokio::time::timeout(self.attempt_timeout, AssertUnwindSafe(work).catch_unwind())
            .await
        {
            Err(_) => Err(format!(
                "timed out after {} ms",
                self.attempt_timeout.as_millis()
            )),
            Ok(Err(panic)) => Err(format!("panicked: {}", panic_message(panic.as_ref()))),
            Ok(Ok(result)) => result,
        }
    }

    /// Schedules the next attempt through its delay queue, or gives up; returns what to record.
    async fn after_failure(
        &self,
        envelope: &Envelope,
        delivery: &Delivery,
        attempt: u32,
        error: String,
        route: &RetryRoute,
    ) -> (AttemptResult, Settle) {
        let Decision::Retry {
            delay_ms,
            wait_ms,
            next_attempt,
        } = self
            .retry
            .decide(envelope.event.as_str(), attempt, random_unit())
        else {
            return (AttemptResult::Failed { error }, Settle::DeadLetter);
        };
        let message_id = envelope.id.to_string();
        let retry = RetryMessage {
            delay_ms,
            expiration_ms: wait_ms,
            attempt: next_attempt,
            message_id: &message_id,
            body: &delivery.data,
        };
        match queue::publish_retry(&route.channel, &route.prefix, &retry, route.confirm_timeout)
            .await
        {
            Ok(()) => {
                self.metrics.retry_scheduled(attempt);
                let retry_at_ms = now_unix_ms() + i64::try_from(wait_ms).unwrap_or(i64::MAX / 2);
                (
                    AttemptResult::Retrying { error, retry_at_ms },
                    Settle::AckRetried,
                )
            }
            // The connection is going: the ack would fail too, and the broker redelivers this
            // message as the same attempt. Record the attempt as one to be retried now.
            Err(RetryPublishError::Lost(lost)) => {
                tracing::warn!(error = %lost, "cannot schedule a retry: connection lost");
                let retry_at_ms = now_unix_ms();
                (
                    AttemptResult::Retrying { error, retry_at_ms },
                    Settle::AckRetried,
                )
            }
            // The broker refuses the delay queue: give up visibly rather than loop.
            Err(refused) => {
                tracing::error!(error = %refused, "cannot schedule a retry; failing the event");
                let error = format!("{error}; and {refused}");
                (AttemptResult::Failed { error }, Settle::DeadLetter)
            }
        }
    }

    async fn reject_undecodable(&self, delivery: Delivery, error: serde_json::Error) {
        tracing::error!(error = %error, "undecodable message dead-lettered");
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        if let Some(id) = id {
            let now = now_unix_ms();
            let record = AttemptRecord {
                id,
                started_at_ms: now,
                finished_at_ms: now,
                result: AttemptResult::Failed {
                    error: format!("undecodable message: {error}"),
                },
            };
            let _ = self.outcomes.submit(record).await;
        }
        nack_to_dead_letter(&delivery).await;
        self.metrics.dead_lettered();
        self.metrics.delivery_outcome("failed");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
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

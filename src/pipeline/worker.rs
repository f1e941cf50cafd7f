//! The worker pool (GenStage's ConsumerSupervisor): each partition this node holds is consumed with
//! a demand of `queue.prefetch` events in flight, and every user's events run in a lane of their
//! own ([`super::lanes`]), a task per user run.
//!
//! A broker message carries one partition's events of one group commit, in commit order. The
//! partition's consumer takes a message into work once the partition has room for its events, and
//! pushes each event onto its user's lane, in message order, so one user's events are handled
//! strictly in seq order while users run concurrently. The message is acked once every one of its
//! events is settled, whatever order the lanes finish in.
//!
//! A lane handles a run of its user's events as one delivery attempt: the fault injector (tests),
//! then one broadcast of all of them (one pubsub message, one socket write), under the attempt
//! timeout, with a panic caught. Each event's attempt ends one of three ways, recorded in
//! PostgreSQL in one batched statement per run before anything is settled:
//!
//! - **pushed**: the broadcast reached n >= 1 sockets: `delivered`.
//! - **offline**: nobody is subscribed: also `delivered` (push_count 0). Not an error; the event
//!   waits in PostgreSQL for the client's catch-up.
//! - **failed**: the attempt itself failed (pubsub or store unreachable, a panic, the timeout). If
//!   the retry policy allows another attempt, the event alone is published to the delay queue of the
//!   next delay (expiring back into its partition as a message of one), and stays `published` with
//!   `last_error` and `next_attempt_at`; after the last attempt it is `failed` and published alone
//!   to the dead-letter exchange. No task sleeps holding a slot, and nothing is requeued in a loop.
//!   A retry the broker does not confirm in time is neither trusted nor failed: the message is
//!   requeued and the attempt made again (the broker may be slow, or losing a node).
//!
//! A failed event does not hold its user's lane while it waits for its retry: the next events go
//! on, and the user's socket channel, seeing a seq skip ahead, fills the missing one from
//! PostgreSQL first (see README, "Retries and order"). An event whose outcome could not be stored
//! (PostgreSQL unreachable for the outcome writer's whole backoff) makes its message be requeued,
//! so it is never left with nobody holding it.

use super::faults::Faults;
use super::lanes::{Lanes, RunHandler, Sequenced};
use super::lease::Lease;
use super::outcomes::{NotRecorded, Outcomes, Recorded, Settled};
use super::retry::{Decision, RetryPolicy};
use crate::backoff::random_unit;
use crate::event::{Envelope, decode_batch, encode_batch, now_unix_ms};
use crate::metrics::Metrics;
use crate::pubsub::{Message, PubSub, Push};
use crate::queue::{self, ConsumerLink, RetryMessage, RetryPublishError, Topology};
use crate::store::{AttemptRecord, AttemptResult};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, Consumer};
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

/// What delivering needs; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    /// Where events are broadcast.
    pub pubsub: PubSub,
    /// Where attempts are recorded.
    pub outcomes: Outcomes,
    /// Where the outbox rows of settled messages are forgotten.
    pub settled: Settled,
    /// Metrics.
    pub metrics: Metrics,
    /// When to retry, and when to give up.
    pub retry: Arc<RetryPolicy>,
    /// Every distinct retry delay: one delay queue each.
    pub retry_delays_ms: Arc<[u64]>,
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
    /// How long a lane waits for a missing seq (`pipeline.reorder_window_ms`).
    pub reorder_window_ms: u64,
    /// The test fault injector (empty in production).
    pub faults: Arc<Faults>,
}

/// One event in work: where it came from, and its share of its partition's demand.
pub(super) struct EventInWork {
    envelope: Envelope,
    attempt: u32,
    /// The partition lease it was taken under: delivered only while trusted, recorded only while
    /// current (see [`super::lease`]).
    lease: Arc<Lease>,
    /// Its message, until the item is settled.
    message: Option<Arc<MessageInWork>>,
    /// Returned to the partition's window when the item is dropped (settled).
    _permit: Option<OwnedSemaphorePermit>,
    /// Counts the item in its partition's work until it is dropped (settled).
    _counted: WorkCount,
}

impl Sequenced for EventInWork {
    fn seq(&self) -> i64 {
        self.envelope.seq
    }
}

impl EventInWork {
    /// The event is done with: its message is acked once all its events are (requeued if any
    /// asked for it).
    async fn settle(mut self, release: Release) {
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

/// An event counted in its partition's work while this lives.
struct WorkCount(Arc<PartitionWork>);

impl WorkCount {
    fn new(work: &Arc<PartitionWork>) -> Self {
        work.in_work.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(work))
    }
}

impl Drop for WorkCount {
    fn drop(&mut self) {
        // Before the count drops: whoever sees it at zero sees this moment too (the sweeper).
        self.0.touch();
        if self.0.in_work.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A broker message in work: acked (or requeued) once all of its events are settled.
struct MessageInWork {
    delivery: Delivery,
    unsettled: AtomicUsize,
    requeue: AtomicBool,
    /// Its outbox row (the message's id), forgotten once the message is acked unless `keep_row`.
    row: Option<Uuid>,
    keep_row: AtomicBool,
    settled: Settled,
}

/// How one event lets go of its message once settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    /// Done with: the message may be acked and its outbox row forgotten.
    Done,
    /// Done with, but its retry's own row could not be recorded: the message is acked and its row
    /// kept, so the sweeper still has a trace of the event should the retry be lost.
    DoneKeepRow,
    /// The message must come back (an outcome not stored, or refused by the lease's epoch).
    Requeue,
}

impl MessageInWork {
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
        let result = if requeue {
            // Some event's outcome could not be stored: the whole message comes back (events
            // already delivered come again and are dropped by seq at the socket).
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            self.delivery.nack(options).await
        } else {
            self.delivery.ack(BasicAckOptions::default()).await
        };
        if let Err(error) = result {
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

/// How an event's attempt ended, for settling its message.
enum Settle {
    /// Delivered: done once recorded.
    Delivered,
    /// A retry copy is in a delay queue: done, recorded or not (the retry records its own
    /// attempt).
    Retried,
    /// Failed for good (dead-lettered): done once recorded.
    Failed,
    /// Whether its retry reached the delay queue is unknown (no confirm in time, or its channel
    /// failed): the message comes back and the attempt is made again.
    Requeue,
}

/// How one event's attempt went, before it is recorded.
#[derive(Clone, Debug)]
enum Attempted {
    /// The broadcast reached this many subscribers (0: nobody online, kept for catch-up).
    Reached(i32),
    /// The attempt failed.
    Failed(AttemptError),
    /// Not attempted: the partition's lease was no longer trusted here. Its message goes back.
    Fenced,
}

/// Why a delivery attempt failed (recorded as the event's `last_error`).
#[derive(Clone, Debug, thiserror::Error)]
enum AttemptError {
    /// The attempt ran past `retry.attempt_timeout_ms`.
    #[error("timed out after {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// The attempt panicked; the worker caught it.
    #[error("panicked: {0}")]
    Panicked(String),
    /// The test fault injector failed it.
    #[error("{0}")]
    Injected(String),
    /// The fan-out could not carry the broadcast.
    #[error(transparent)]
    Broadcast(crate::pubsub::Error),
}

/// One event of a run once its attempt is decided.
struct Decided {
    /// What to record; none for an event that was not attempted.
    record: Option<AttemptRecord>,
    /// How its message is settled once the records are written.
    settle: Settle,
    /// The outcome's metric label (`pushed`, `offline`, `failed`), if attempted.
    outcome: Option<&'static str>,
}

/// One partition's consumption on this node.
pub(super) struct PartitionWork {
    /// The demand: `queue.prefetch` permits, one per event in work that claims a slot.
    window: Arc<Semaphore>,
    prefetch: u32,
    /// Every event in work, with a slot or without (waiting in a full lane).
    in_work: AtomicUsize,
    /// Told when `in_work` drops to zero.
    idle: tokio::sync::Notify,
    /// When the partition last received a message or settled an event, in ms since `born`: with
    /// `in_work` at zero, how long the partition has been idle (see `super::sweep`).
    last_active_ms: AtomicU64,
    born: Instant,
}

impl PartitionWork {
    pub(super) fn new(prefetch: u16) -> Self {
        Self {
            window: Arc::new(Semaphore::new(usize::from(prefetch))),
            prefetch: u32::from(prefetch),
            in_work: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            last_active_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records activity now: a message received, an event settled.
    fn touch(&self) {
        self.last_active_ms.store(self.now_ms(), Ordering::Release);
    }

    /// While nothing is in work: how long ago the partition last received a message or settled
    /// an event, and a mark of that moment (equal marks on two looks mean nothing happened in
    /// between). `None` while something is in work.
    pub(super) fn quiet(&self) -> Option<(Duration, u64)> {
        if self.in_work.load(Ordering::Acquire) != 0 {
            return None;
        }
        let last = self.last_active_ms.load(Ordering::Acquire);
        Some((
            Duration::from_millis(self.now_ms().saturating_sub(last)),
            last,
        ))
    }

    /// Events of this partition in work now.
    pub(super) fn in_flight(&self) -> usize {
        self.in_work.load(Ordering::Acquire)
    }

    /// Waits until no event of this partition is in work.
    async fn settled(&self) {
        loop {
            // Made before the check, so a notification between the two is not missed.
            let notified = self.idle.notified();
            if self.in_work.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// How often a partition whose window stays full says so.
const FULL_WINDOW_REPORT_EVERY: Duration = Duration::from_secs(30);

/// Takes `wanted` permits of the partition's window: at once when there is room (no timer on the
/// common path), else waiting, saying every 30 s while it stays full. A window that never frees
/// means events in work that never settle, and a partition that is leased, renewed and consumed
/// by nobody (the first suspect of the seed-303 checker run).
async fn wait_for_room(
    work: &Arc<PartitionWork>,
    wanted: u32,
    partition: u16,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if let Ok(permits) = Arc::clone(&work.window).try_acquire_many_owned(wanted) {
        return Ok(permits);
    }
    let room = Arc::clone(&work.window).acquire_many_owned(wanted);
    super::waiting_loudly(room, FULL_WINDOW_REPORT_EVERY, |waited| {
        tracing::warn!(
            partition,
            waited_secs = waited.as_secs(),
            in_work = work.in_flight(),
            "a partition's window is still full: its events in work are not settling"
        );
    })
    .await
}

/// Why a partition's consumption ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ConsumerEnd {
    /// Asked to stop: everything taken was settled or requeued in order.
    Drained,
    /// The consumer's stream failed (the connection is gone): unacked messages return to the
    /// queue when the broker notices.
    Lost,
}

impl Worker {
    /// The lanes runs go through: each run is delivered by [`Self::deliver_run`].
    pub(super) fn lanes(
        &self,
        link: Arc<ConsumerLink>,
        names: Arc<Topology>,
        confirm_timeout: Duration,
        max_run: usize,
        tasks: TaskTracker,
    ) -> Lanes<EventInWork> {
        let worker = self.clone();
        let handler: RunHandler<EventInWork> = Arc::new(move |run: Vec<EventInWork>| {
            let (worker, link, names) = (worker.clone(), Arc::clone(&link), Arc::clone(&names));
            let span = tracing::info_span!("deliver", user_id = %run[0].envelope.user_id, events = run.len());
            Box::pin(
                async move {
                    let route = RetryRoute {
                        channel: &link.retry_channel,
                        names: &names,
                        confirm_timeout,
                    };
                    worker.deliver_run(run, &route).await;
                }
                .instrument(span),
            )
        });
        let window = Duration::from_millis(self.reorder_window_ms);
        Lanes::new(handler, max_run, window, self.metrics.clone(), tasks)
    }

    /// Consumes partition `partition` through `consumer` until `stop` is cancelled or the stream
    /// fails. On stop: cancels the consumer, returns every message taken but not yet in work to the
    /// queue (in order, so it goes first to the next consumer), and waits until every event in work
    /// is settled; only then may the partition be handed to another node.
    #[allow(clippy::too_many_arguments)] // one call site; each is a distinct handle
    pub(super) async fn consume_partition(
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
            let claims = slot_claims(&events, lanes);
            let wanted = u32::try_from(claims.iter().filter(|c| **c).count())
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
            self.dispatch(delivery, events, &claims, permits, work, lease, lanes);
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
                let options = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(error) = delivery.nack(options).await {
                    tracing::warn!(error = %error, partition, "cannot return a message");
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
                let _ = delivery.ack(BasicAckOptions::default()).await;
                None
            }
            Err(error) => {
                tracing::error!(error = %error, "undecodable message dead-lettered");
                let options = BasicNackOptions {
                    requeue: false,
                    ..BasicNackOptions::default()
                };
                if let Err(error) = delivery.nack(options).await {
                    tracing::warn!(error = %error, "nack failed");
                }
                self.metrics.dead_lettered();
                None
            }
        }
    }

    /// Puts a message's events on their users' lanes, in message order; the events that claim a
    /// slot of the window ([`slot_claims`]) each carry one permit of `permits`.
    #[allow(clippy::too_many_arguments)] // one call site; each is a distinct part of the message
    fn dispatch(
        &self,
        delivery: Delivery,
        events: Vec<Envelope>,
        claims: &[bool],
        mut permits: Option<OwnedSemaphorePermit>,
        work: &Arc<PartitionWork>,
        lease: &Arc<Lease>,
        lanes: &Lanes<EventInWork>,
    ) {
        let attempt = queue::attempt_of(&delivery.properties);
        self.metrics.worker_message(events.len());
        let row = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let message = Arc::new(MessageInWork {
            delivery,
            unsettled: AtomicUsize::new(events.len()),
            requeue: AtomicBool::new(false),
            row,
            keep_row: AtomicBool::new(false),
            settled: self.settled.clone(),
        });
        for (envelope, &claims) in events.into_iter().zip(claims) {
            // One permit per claiming event. The last permit moves whole; a message claiming more
            // than the window (never planned so) lets its extra events ride on the others' share.
            let permit = match permits.as_mut() {
                Some(held) if claims && held.num_permits() > 1 => held.split(1),
                Some(_) if claims => permits.take(),
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

    /// Delivers one run of a user's events (see the module docs), records every attempt in one
    /// batch, then settles the events' messages.
    async fn deliver_run(&self, run: Vec<EventInWork>, route: &RetryRoute<'_>) {
        let started = Instant::now();
        let started_at_ms = now_unix_ms();
        self.metrics.worker_run(run.len());
        let attempted = self.attempt(&run).await;
        let finished_at_ms = now_unix_ms();
        let at = (started_at_ms, finished_at_ms);
        let decided: Vec<Decided> = futures_util::future::join_all(
            run.iter()
                .zip(attempted)
                .map(|(item, attempted)| self.decide(item, attempted, at, route)),
        )
        .await;
        let records: Vec<AttemptRecord> = decided.iter().filter_map(|d| d.record.clone()).collect();
        let recorded: Recorded = if records.is_empty() {
            Ok(HashSet::new())
        } else {
            self.outcomes
                .submit(records)
                .await
                .unwrap_or(Err(NotRecorded))
        };
        let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
        for (item, decided) in run.into_iter().zip(decided) {
            if let Some(label) = decided.outcome {
                *outcomes.entry(label).or_default() += 1;
            }
            // Refused by the lease's epoch, or not stored: the partition's owner delivers it.
            let stored = recorded
                .as_ref()
                .is_ok_and(|fenced| !fenced.contains(&item.envelope.id));
            let release = match decided.settle {
                // Its retry is in a delay queue either way; without its record, the retry has no
                // outbox row, so this message's row stays.
                Settle::Retried if stored => Release::Done,
                Settle::Retried => Release::DoneKeepRow,
                Settle::Requeue => Release::Requeue,
                Settle::Delivered | Settle::Failed if stored => Release::Done,
                Settle::Delivered | Settle::Failed => Release::Requeue,
            };
            item.settle(release).await;
        }
        let elapsed = started.elapsed();
        for (label, count) in outcomes {
            self.metrics.delivery_outcome(label, count);
            self.metrics.worker_processed(elapsed, label);
        }
    }

    /// One attempt for every event of a run: the fault injector (tests), then one broadcast of the
    /// events it spared, under the attempt timeout, with a panic caught. An event whose partition
    /// lease is no longer trusted when the broadcast is about to go is not attempted at all.
    async fn attempt(&self, run: &[EventInWork]) -> Vec<Attempted> {
        let injected: Vec<Option<AttemptError>> = if self.faults.is_empty() {
            run.iter().map(|_| None).collect()
        } else {
            futures_util::future::join_all(run.iter().map(|item| {
                self.bounded(async {
                    self.faults
                        .inject(&item.envelope)
                        .await
                        .map_err(AttemptError::Injected)
                })
            }))
            .await
            .into_iter()
            .map(Result::err)
            .collect()
        };
        // Checked last, right before the broadcast, so a stall anywhere before it is caught.
        let settled_early: Vec<Option<Attempted>> = run
            .iter()
            .zip(injected)
            .map(|(item, injected)| match injected {
                Some(error) => Some(Attempted::Failed(error)),
                None if !item.lease.is_trusted() => Some(Attempted::Fenced),
                None => None,
            })
            .collect();
        let fenced = settled_early
            .iter()
            .filter(|a| matches!(a, Some(Attempted::Fenced)))
            .count();
        if fenced > 0 {
            self.metrics.fenced("attempt", fenced);
            tracing::warn!(
                events = fenced,
                "not broadcast: the partition's lease is no longer trusted here; the messages go back"
            );
        }
        let pushes: Vec<Push> = run
            .iter()
            .zip(&settled_early)
            .filter(|(_, early)| early.is_none())
            .map(|(item, _)| Push::from(&item.envelope))
            .collect();
        let broadcast = match run.first() {
            Some(first) if !pushes.is_empty() => {
                let message = Message {
                    topic: first.envelope.user_id.topic().into(),
                    pushes,
                };
                self.broadcast(message).await
            }
            _ => Attempted::Reached(0), // nothing left to broadcast: no event takes it
        };
        settled_early
            .into_iter()
            .map(|early| early.unwrap_or_else(|| broadcast.clone()))
            .collect()
    }

    /// One broadcast under the attempt timeout, a panic in it caught.
    async fn broadcast(&self, message: Message) -> Attempted {
        let reached = self
            .bounded(async {
                let reach = self
                    .pubsub
                    .broadcast(message)
                    .await
                    .map_err(AttemptError::Broadcast)?;
                Ok(i32::try_from(reach.delivered).unwrap_or(i32::MAX))
            })
            .await;
        match reached {
            Ok(sockets) => Attempted::Reached(sockets),
            Err(error) => Attempted::Failed(error),
        }
    }

    /// `work` under the attempt timeout, a panic in it caught and reported as a failure.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, AttemptError>>,
    ) -> Result<T, AttemptError> {
        match tokio::time::timeout(self.attempt_timeout, AssertUnwindSafe(work).catch_unwind())
            .await
        {
            Err(_) => Err(AttemptError::TimedOut(self.attempt_timeout)),
            Ok(Err(panic)) => Err(AttemptError::Panicked(
                panic_message(panic.as_ref()).to_owned(),
            )),
            Ok(Ok(result)) => result,
        }
    }

    /// What one event's attempt comes to: the record to write (none when it was not attempted)
    /// and how its message is settled; a failure is first scheduled for retry or dead-lettered.
    async fn decide(
        &self,
        item: &EventInWork,
        attempted: Attempted,
        (started_at_ms, finished_at_ms): (i64, i64),
        route: &RetryRoute<'_>,
    ) -> Decided {
        let record = |result| AttemptRecord {
            id: item.envelope.id,
            lease: item.lease.token(),
            started_at_ms,
            finished_at_ms,
            result,
        };
        // A failure is not followed up (no retry scheduled, nothing dead-lettered) under a lease
        // lost meanwhile: the partition's owner makes its own attempt.
        let attempted = match attempted {
            Attempted::Failed(_) if !item.lease.is_trusted() => {
                self.metrics.fenced("attempt", 1);
                Attempted::Fenced
            }
            attempted => attempted,
        };
        match attempted {
            Attempted::Fenced => Decided {
                record: None,
                settle: Settle::Requeue,
                outcome: None,
            },
            Attempted::Reached(sockets) => Decided {
                record: Some(record(AttemptResult::Delivered { sockets })),
                settle: Settle::Delivered,
                outcome: Some(if sockets > 0 { "pushed" } else { "offline" }),
            },
            Attempted::Failed(error) => {
                tracing::warn!(error = %error, event_id = %item.envelope.id, "delivery attempt failed");
                let (result, settle) = self.after_failure(item, error.to_string(), route).await;
                Decided {
                    record: Some(record(result)),
                    settle,
                    outcome: Some("failed"),
                }
            }
        }
    }

    /// Schedules the next attempt of a failed event through its delay queue, or gives up and
    /// dead-letters it; returns what to record and how to settle.
    async fn after_failure(
        &self,
        item: &EventInWork,
        error: String,
        route: &RetryRoute<'_>,
    ) -> (AttemptResult, Settle) {
        let envelope = &item.envelope;
        let body = encode_batch(std::slice::from_ref(envelope));
        let message_id = envelope.id.to_string();
        // The retry's own id (its outbox row's): each retry is a message apart, settled apart.
        let retry_id = Uuid::now_v7();
        let retry_message_id = retry_id.to_string();
        let Decision::Retry {
            delay_ms,
            wait_ms,
            next_attempt,
        } = self
            .retry
            .decide(envelope.event.as_str(), item.attempt, random_unit())
        else {
            return self.dead_letter(&message_id, &body, error, route).await;
        };
        let retry = RetryMessage {
            delay_ms,
            expiration_ms: wait_ms,
            attempt: next_attempt,
            partition: crate::event::partition_of(
                envelope.user_id.as_str(),
                route.names.partitions,
            ),
            message_id: &retry_message_id,
            body: &body,
        };
        match queue::publish_retry(route.channel, route.names, &retry, route.confirm_timeout).await
        {
            Ok(()) => {
                self.metrics.retry_scheduled(item.attempt);
                let retry_at_ms = now_unix_ms() + i64::try_from(wait_ms).unwrap_or(i64::MAX / 2);
                (
                    AttemptResult::Retrying {
                        error,
                        retry_at_ms,
                        message: Some(retry_id),
                    },
                    Settle::Retried,
                )
            }
            // The retry channel failed. Usually the connection is going, and the broker
            // redelivers the message with this event as the same attempt; but a channel can also
            // close alone (a channel error while a node is lost), and acking the message then
            // would leave the event with no message at all. So the message is requeued, never
            // acked: redelivered either way, the attempt made again.
            Err(RetryPublishError::Lost(lost)) => {
                tracing::warn!(error = %lost, "cannot schedule a retry: its channel failed");
                let retry_at_ms = now_unix_ms();
                (
                    AttemptResult::Retrying {
                        error,
                        retry_at_ms,
                        message: None,
                    },
                    Settle::Requeue,
                )
            }
            // The broker may have the retry or not (a slow or partitioned node): failing the event
            // would give up on a broker hiccup, and trusting the retry could lose it. The message
            // comes back instead and this attempt is made again; a retry that did land makes a
            // duplicate, which the socket drops by seq.
            Err(RetryPublishError::Timeout) => {
                tracing::warn!("a retry was not confirmed in time; the message comes back");
                self.metrics.retry_unconfirmed();
                let retry_at_ms = now_unix_ms();
                (
                    AttemptResult::Retrying {
                        error,
                        retry_at_ms,
                        message: None,
                    },
                    Settle::Requeue,
                )
            }
            // The broker refuses the delay queue: give up visibly rather than loop.
            Err(refused) => {
                tracing::error!(error = %refused, "cannot schedule a retry; failing the event");
                let error = format!("{error}; and {refused}");
                self.dead_letter(&message_id, &body, error, route).await
            }
        }
    }

    /// The event failed for good: a copy of it goes to the dead-letter queue.
    async fn dead_letter(
        &self,
        message_id: &str,
        body: &[u8],
        error: String,
        route: &RetryRoute<'_>,
    ) -> (AttemptResult, Settle) {
        match queue::publish_dead_letter(
            route.channel,
            route.names,
            message_id,
            body,
            route.confirm_timeout,
        )
        .await
        {
            Ok(()) => self.metrics.dead_lettered(),
            // The event is `failed` in PostgreSQL (visible and replayable) either way.
            Err(refused) => {
                tracing::error!(error = %refused, "cannot dead-letter a failed event")
            }
        }
        (AttemptResult::Failed { error }, Settle::Failed)
    }
}

/// Which of a message's events take a slot of their partition's window: those whose user's lane
/// (counting this message's earlier events of the user) holds fewer than a run's worth. A user's
/// lane so occupies at most `pipeline.max_run_events` of the window; the rest of a burst waits in
/// the lane without a slot, bounded by the unacked messages the broker hands a consumer
/// ([`queue::PARTITION_QOS_MESSAGES`]). A slow or bursting user therefore cannot fill the window
/// and stall the other users of its partition.
fn slot_claims(events: &[Envelope], lanes: &Lanes<EventInWork>) -> Vec<bool> {
    let cap = lanes.max_run();
    let mut earlier: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    events
        .iter()
        .map(|envelope| {
            let user = envelope.user_id.as_str();
            let before = earlier.entry(user).or_default();
            let depth = lanes.depth(user) + *before;
            *before += 1;
            depth < cap
        })
        .collect()
}

/// Where retries and dead letters go: the consumer connection's confirm-mode channel.
struct RetryRoute<'a> {
    channel: &'a Channel,
    names: &'a Topology,
    confirm_timeout: Duration,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

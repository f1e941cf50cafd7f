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
//!
//! The stages of a run live apart: [`consume`] takes messages into work and onto the lanes
//! ([`partition`] keeps each partition's window and count of events in work, [`in_work`] what an
//! event holds until it lets go of its message), [`attempt`] makes one attempt of a run, and
//! [`settle`] decides what each event's attempt comes to and lets its message go.

mod attempt;
mod consume;
mod in_work;
mod partition;
mod settle;

pub(super) use consume::ConsumerEnd;
pub(super) use in_work::EventInWork;
pub(super) use partition::PartitionWork;

use super::faults::Faults;
use super::lanes::{Lanes, RunHandler};
use super::outcomes::{NotRecorded, Outcomes, Recorded, Settled};
use super::retry::RetryPolicy;
use crate::event::now_unix_ms;
use crate::metrics::Metrics;
use crate::pubsub::PubSub;
use crate::queue::{ConsumerLink, Topology};
use crate::store::AttemptRecord;
use settle::{Decided, RetryRoute};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

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
    /// Web Push: which event names fall back, and after how long ([`crate::config::WebPushSettings::fallback`]).
    pub webpush: Arc<crate::config::WebPushSettings>,
    /// Every distinct retry delay: one delay queue each.
    pub retry_delays_ms: Arc<[u64]>,
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
    /// Bound on every broker call a delivery waits for (`queue.confirm_timeout_ms`): a message's
    /// ack or requeue (see [`crate::queue::settle`]), a retry's or dead letter's confirm.
    pub broker_timeout: Duration,
    /// How long a lane waits for a missing seq (`pipeline.reorder_window_ms`).
    pub reorder_window_ms: u64,
    /// The test fault injector (empty in production).
    pub faults: Arc<Faults>,
}

impl Worker {
    /// The lanes runs go through: each run is delivered by [`Self::deliver_run`].
    pub(super) fn lanes(
        &self,
        link: Arc<ConsumerLink>,
        names: Arc<Topology>,
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
                        confirm_timeout: worker.broker_timeout,
                    };
                    worker.deliver_run(run, &route).await;
                }
                .instrument(span),
            )
        });
        let window = Duration::from_millis(self.reorder_window_ms);
        Lanes::new(handler, max_run, window, self.metrics.clone(), tasks)
    }

    /// Delivers one run of a user's events (see the module docs): one attempt for the run, a
    /// decision per event, every attempt recorded in one batch, then the events' messages settled.
    async fn deliver_run(&self, run: Vec<EventInWork>, route: &RetryRoute<'_>) {
        let started = Instant::now();
        let started_at_ms = now_unix_ms();
        self.metrics.worker_run(run.len());
        let attempted = self.attempt(run).await;
        let at = (started_at_ms, now_unix_ms());
        let mut decided: Vec<Decided> = futures_util::future::join_all(
            attempted
                .into_iter()
                .map(|(item, attempted)| self.decide(item, attempted, at, route)),
        )
        .await;
        let records: Vec<AttemptRecord> =
            decided.iter_mut().filter_map(|d| d.record.take()).collect();
        let recorded: Recorded = if records.is_empty() {
            Ok(HashSet::new())
        } else {
            self.outcomes
                .submit(records)
                .await
                .unwrap_or(Err(NotRecorded))
        };
        let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
        for decided in decided {
            if let Some(label) = decided.outcome {
                *outcomes.entry(label).or_default() += 1;
            }
            decided.finish(&recorded).await;
        }
        let elapsed = started.elapsed();
        for (label, count) in outcomes {
            self.metrics.delivery_outcome(label, count);
            self.metrics.worker_processed(elapsed, label);
        }
    }
}

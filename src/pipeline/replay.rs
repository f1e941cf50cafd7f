//! Operator replay: put chosen events back through delivery, shared by `herald replay` (CLI) and
//! the admin API's replay jobs.
//!
//! A replay claims matching events page by page (keyset on (user, seq), so each user's events go
//! out in seq order; ids need not follow seqs), moves each back to `accepted` with an outbox row
//! of its own in the same transaction, and hands each to the publisher as a message of one at the
//! given rate; it is delivered with a fresh attempt budget. A row another transaction holds is
//! waited for, never passed over: a job ends `done` only once every event matching it was
//! visited, and fails (`Locked`) rather than skip one held for good.
//! The outbox relay takes over any message the replay could not publish (broker down, the process
//! died) once its grace has passed: a replay never strands an event.
//!
//! Safe to repeat: by default only `failed` events match (with explicit ids: any event not yet
//! delivered), and a replayed event is no longer `failed` unless it fails again. Delivered events
//! are replayed only when asked explicitly (`include_delivered`). A client whose channel already
//! pushed an event's seq drops the replayed copy; one joining later gets it from history.

use crate::event::partition_of;
use crate::metrics::Metrics;
use crate::queue::{PublisherHandle, Source};
use crate::store::{self, EventFilter, EventStatus, ReplayCursor, ReplayJobStatus, Store};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why a replay did not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request is invalid (named).
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Events the replay had reached stayed locked by other transactions through every retry
    /// ([`LOCK_RETRIES`]): the replay stopped before them rather than pass them over.
    #[error(
        "events stayed locked by other transactions; the replay stopped before them (run it again: replay is safe to repeat)"
    )]
    Locked(#[source] store::Error),
}

/// How many times in a row a replay tries a page again whose claim met a row held past the lock
/// timeout (2 s each, see `Store::claim_for_replay`) or a deadlock, before it fails: about 30 s of
/// waiting. A job never reports `done` with a matching event passed over; it fails instead.
pub const LOCK_RETRIES: u32 = 15;

/// What a replay has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Events the filter matched at the start (the progress bar's length).
    pub matched: i64,
    /// Events handed to the publisher.
    pub replayed: u64,
    /// Events claimed but refused by the publisher (broker down): the outbox relay sends them.
    pub deferred: u64,
    /// True once the replay ended (all done, stopped, or failed).
    pub finished: bool,
}

/// The filter a replay actually uses: statuses default to `failed` (with explicit ids: every status
/// but `delivered`), and `delivered` is allowed only with `include_delivered`.
///
/// # Errors
/// `delivered` asked for without `include_delivered`.
pub fn replay_filter(
    mut filter: EventFilter,
    include_delivered: bool,
) -> Result<EventFilter, ReplayError> {
    if filter.statuses.is_empty() {
        filter.statuses = if filter.ids.is_empty() {
            vec![EventStatus::Failed]
        } else {
            vec![
                EventStatus::Accepted,
                EventStatus::Published,
                EventStatus::Failed,
            ]
        };
    }
    let asks_delivered = filter.statuses.contains(&EventStatus::Delivered);
    if asks_delivered && !include_delivered {
        return Err(ReplayError::Invalid(
            "delivered events are replayed only when asked explicitly (include_delivered)".into(),
        ));
    }
    if include_delivered && !asks_delivered {
        filter.statuses.push(EventStatus::Delivered);
    }
    Ok(filter)
}

/// How a replay runs.
#[derive(Clone, Debug)]
pub struct Pace {
    /// Events per second at most.
    pub rate: u32,
    /// Most events claimed at once.
    pub page: i64,
    /// For the metrics: `cli` or `api`.
    pub source: &'static str,
    /// The partition count (a replayed event goes to its user's partition).
    pub partitions: u16,
    /// How long a replayed message may wait to be published ([`super::publish_window`]).
    pub publish_window: Duration,
}

/// Replays what `filter` (already through [`replay_filter`]) matches, reporting through
/// `progress`, until done or `stop` is cancelled. Events are claimed at most half a second's worth
/// at a time, so none waits in `accepted` long enough for the relay to race the replay.
///
/// Pages run in (user, seq) order ([`Store::claim_for_replay`]), so each user's events are handed
/// to the publisher, and reach the user's partition, in seq order. A page whose claim met a row
/// held by another transaction past the lock timeout is tried again from the same place, up to
/// [`LOCK_RETRIES`] times in a row; nothing matching is passed over.
///
/// # Errors
/// A claim failed, or rows stayed locked ([`ReplayError::Locked`]); what was replayed before stays
/// replayed (the sent progress says how much).
pub async fn run(
    store: &Store,
    publisher: &PublisherHandle,
    metrics: &Metrics,
    filter: &EventFilter,
    pace: &Pace,
    progress: &watch::Sender<Progress>,
    stop: &CancellationToken,
) -> Result<Progress, ReplayError> {
    let rate = pace.rate.max(1);
    let claim = pace.page.min(i64::from(rate / 2).max(1));
    let started = Instant::now();
    let mut done = Progress {
        matched: progress.borrow().matched,
        ..Progress::default()
    };
    let mut after: Option<ReplayCursor> = None;
    let mut conflicts = 0;
    while !stop.is_cancelled() {
        // Before the claim writes the outbox rows (see `super::publish_deadline`).
        let publish_by = super::publish_deadline(pace.publish_window);
        let page = match store
            .claim_for_replay(filter, after.as_ref(), claim, pace.partitions)
            .await
        {
            Ok(page) => page,
            Err(error) if error.is_lock_conflict() => {
                conflicts += 1;
                if conflicts > LOCK_RETRIES {
                    return Err(ReplayError::Locked(error));
                }
                tracing::warn!(error = ?error, retry = conflicts, "replay waits for events another transaction holds");
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        conflicts = 0;
        let Some(next) = page.next else { break };
        after = Some(next);
        let (mut sent, mut deferred) = (0usize, 0usize);
        for (message_id, row) in page.events {
            let Some(envelope) = row.into_envelope() else {
                continue;
            };
            let partition = partition_of(envelope.user_id.as_str(), pace.partitions);
            let message = super::message(message_id, partition, &[envelope], publish_by);
            // Refused (broker down, or no room before the deadline): its outbox row stays and the
            // relay publishes it.
            let wait = publish_by.saturating_duration_since(Instant::now());
            if publisher.publish_within(message, wait).await.is_ok() {
                sent += 1;
            } else {
                deferred += 1;
            }
        }
        metrics.messages_published(Source::Replay.label(), sent, sent);
        done.replayed += sent as u64;
        done.deferred += deferred as u64;
        metrics.replay_published(sent, pace.source);
        metrics.replay_deferred(deferred, pace.source);
        progress.send_replace(done);
        // The rate limit: the next page waits until the events so far fit in `rate` per second.
        let due = started
            + Duration::from_secs_f64((done.replayed + done.deferred) as f64 / f64::from(rate));
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = stop.cancelled() => break,
        }
    }
    done.finished = true;
    progress.send_replace(done);
    Ok(done)
}

/// A running job's progress is written to PostgreSQL this often; a job silent for
/// [`JOB_STALE_MS`] reads as `interrupted` (its node stopped).
const JOB_REPORT_EVERY: Duration = Duration::from_millis(250);
/// See [`JOB_REPORT_EVERY`].
pub const JOB_STALE_MS: i64 = 30_000;

/// No free slot for another replay job on this node.
#[derive(Debug, thiserror::Error)]
#[error("{0} replay jobs are already running on this node; retry when one finishes")]
pub struct Busy(pub usize);

/// The replay jobs of one node (admin API): at most `max_jobs` at once, stopped at shutdown.
#[derive(Clone)]
pub struct ReplayJobs {
    store: Store,
    publisher: PublisherHandle,
    metrics: Metrics,
    page: i64,
    partitions: u16,
    publish_window: Duration,
    max_jobs: usize,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    tracker: tokio_util::task::TaskTracker,
    stop: CancellationToken,
}

impl ReplayJobs {
    /// Jobs publishing through `publisher`; they stop when `stop` is cancelled.
    pub fn new(
        store: Store,
        publisher: PublisherHandle,
        metrics: Metrics,
        settings: &crate::config::Settings,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            publisher,
            metrics,
            page: settings.replay.page,
            partitions: settings.queue.partitions,
            publish_window: super::publish_window(settings),
            max_jobs: settings.replay.max_jobs,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(settings.replay.max_jobs)),
            tracker: tokio_util::task::TaskTracker::new(),
            stop,
        }
    }

    /// Starts job `id` (already recorded as running, with `matched`) in the background.
    ///
    /// # Errors
    /// Every slot is taken.
    pub fn start(
        &self,
        id: Uuid,
        filter: EventFilter,
        rate: u32,
        matched: i64,
    ) -> Result<(), Busy> {
        let permit = std::sync::Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Busy(self.max_jobs))?;
        let jobs = self.clone();
        self.tracker.spawn(async move {
            jobs.run_job(id, filter, rate, matched).await;
            drop(permit);
        });
        Ok(())
    }

    async fn run_job(&self, id: Uuid, filter: EventFilter, rate: u32, matched: i64) {
        let (progress, mut watched) = watch::channel(Progress {
            matched,
            ..Progress::default()
        });
        let pace = Pace {
            rate,
            page: self.page,
            source: "api",
            partitions: self.partitions,
            publish_window: self.publish_window,
        };
        let replay = run(
            &self.store,
            &self.publisher,
            &self.metrics,
            &filter,
            &pace,
            &progress,
            &self.stop,
        );
        tokio::pin!(replay);
        let mut tick = tokio::time::interval(JOB_REPORT_EVERY);
        let result = loop {
            tokio::select! {
                result = &mut replay => break result,
                _ = tick.tick() => {
                    if watched.has_changed().unwrap_or(false) {
                        let now = *watched.borrow_and_update();
                        self.report(id, now, None).await;
                    }
                }
            }
        };
        let last = *progress.borrow();
        let end = match &result {
            Ok(_) if self.stop.is_cancelled() => (ReplayJobStatus::Interrupted, None),
            Ok(_) => (ReplayJobStatus::Done, None),
            Err(error) => {
                tracing::error!(error = ?error, job = %id, "replay job failed");
                (ReplayJobStatus::Failed, Some(error.to_string()))
            }
        };
        tracing::info!(job = %id, status = %end.0, replayed = last.replayed, deferred = last.deferred, "replay job ended");
        self.report(id, last, Some((end.0, end.1.as_deref()))).await;
    }

    async fn report(
        &self,
        id: Uuid,
        progress: Progress,
        end: Option<(ReplayJobStatus, Option<&str>)>,
    ) {
        let written = self
            .store
            .update_replay_job(id, progress.replayed as i64, progress.deferred as i64, end)
            .await;
        if let Err(error) = written {
            tracing::warn!(error = ?error, job = %id, "cannot record replay progress");
        }
    }

    /// Stops the jobs (each records itself `interrupted`) and waits for them.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_default_to_failed_and_delivered_needs_asking() {
        let f = replay_filter(EventFilter::default(), false).unwrap();
        assert_eq!(f.statuses, vec![EventStatus::Failed]);
        let ids = EventFilter {
            ids: vec![crate::event::EventId::from(Uuid::nil())],
            ..EventFilter::default()
        };
        let f = replay_filter(ids.clone(), false).unwrap();
        assert!(!f.statuses.contains(&EventStatus::Delivered));
        let f = replay_filter(ids, true).unwrap();
        assert!(f.statuses.contains(&EventStatus::Delivered));
        let delivered = EventFilter {
            statuses: vec![EventStatus::Delivered],
            ..EventFilter::default()
        };
        assert!(replay_filter(delivered.clone(), false).is_err());
        assert!(replay_filter(delivered, true).is_ok());
    }
}

//! Enqueue: concurrent API requests are group-committed to PostgreSQL, answered, then published.
//!
//! A request's events are committed (one `UNNEST` insert per batch, per-user seqs assigned in the same
//! transaction) before its caller hears anything, so every 2xx is durable. The same transaction
//! writes the batch's outbox rows: one broker message per partition the batch touched (split at
//! `queue.message_max_events` / `message_max_bytes`). After the commit the messages are handed to
//! the publisher without waiting; if it cannot take them (broker down, buffer full) their rows stay
//! in the outbox and the relay publishes them later.
//!
//! Commits run in `pipeline.commit_streams` streams, each owning a fixed share of the partitions
//! (partition `p` belongs to stream `p % streams`) and group-committing on its own: while one
//! stream's transaction is in PostgreSQL, the others fill and commit theirs. A request whose events
//! all fall in one stream (a single event, a batch for one user) commits in that stream. A batch
//! spanning several goes to the joint batcher and still commits in one transaction, all or nothing.
//!
//! Order: every commit holds the *turn* of each stream its events fall in, from before its
//! transaction until its messages are handed to the publisher. So one partition's commits never
//! overlap, its messages reach the publisher in commit order, which for one user is seq order, and
//! two commits in flight never wait on each other's counter rows.

use super::batch::{Batcher, Flush};
use super::head_start::HeadStart;
use crate::event::{Envelope, EventId};
use crate::metrics::Metrics;
use crate::queue::{PublisherHandle, Source};
use crate::store::{self, EventStatus, InsertOutcome, MessageLimits, NewEvent, Store};
use crate::traces::{self, Span as _, TraceParent};
use futures_util::FutureExt;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, MutexGuard, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why events were not accepted.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The enqueue buffer stayed full for the whole enqueue timeout.
    #[error("Herald is overloaded; retry later")]
    Overloaded,
    /// The node is shutting down.
    #[error("Herald is shutting down; retry later")]
    ShuttingDown,
    /// PostgreSQL is unreachable.
    #[error("the event store is unavailable; retry later")]
    StoreUnavailable,
    /// The commit lost a race inside PostgreSQL or ran out of time (a lock wait, a deadlock, a
    /// statement timeout): nothing of it was stored, and the same request may succeed again.
    #[error("the event store was busy and stored nothing; retry later")]
    StoreBusy,
    /// The commit failed for another reason (logged where it happened).
    #[error("storing the events failed")]
    StoreFailed,
    /// PostgreSQL refused this request's data (and only this request's: the others of its group
    /// commit were committed without it).
    #[error("the event store refused this request's data: {0}")]
    Refused(String),
}

/// One accepted event, as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The event id (the original one for a duplicate).
    pub id: EventId,
    /// The user's seq.
    pub seq: i64,
    /// For a retry of an idempotency key: the original event's current status.
    pub duplicate_of_status: Option<EventStatus>,
}

/// The enqueue front: what the API calls.
#[derive(Clone)]
pub struct Enqueue {
    /// One group-commit stream per entry; a user's events go to the stream of their partition.
    streams: Arc<[Batcher<Committer>]>,
    /// Requests spanning several streams.
    joint: Batcher<Committer>,
    turns: Turns,
    queue_timeout: Duration,
    /// Room for events waiting for (or in) a group commit, in events and in bytes: a request takes
    /// its share before it is queued and gives it back once answered. Counted in requests, the
    /// buffer held up to 1,000 events of 4 MiB each per slot.
    room_events: Room,
    room_bytes: Room,
}

/// A budget of the enqueue buffer, in one unit.
#[derive(Clone)]
struct Room {
    permits: Arc<Semaphore>,
    total: u32,
}

impl Room {
    fn new(total: usize) -> Self {
        // Settings keep the totals below 4 Gi (see `pipeline.enqueue_buffer_bytes`).
        let total = u32::try_from(total).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// `amount` of the room (at most all of it, so one request always fits), waiting until
    /// `deadline` at most.
    async fn take(
        &self,
        amount: usize,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, EnqueueError> {
        let amount = u32::try_from(amount).unwrap_or(u32::MAX).min(self.total);
        let permits = Arc::clone(&self.permits).acquire_many_owned(amount);
        match tokio::time::timeout_at(deadline, permits).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(EnqueueError::ShuttingDown),
            Err(_elapsed) => Err(EnqueueError::Overloaded),
        }
    }
}

/// One request's events on their way to a group commit, holding their room in the enqueue buffer
/// until the commit is done: a request that gives up early (timed out, disconnected) leaves its
/// events queued, and they must still count.
pub struct Submission {
    events: Vec<NewEvent>,
    room: Vec<OwnedSemaphorePermit>,
}

impl From<Vec<NewEvent>> for Submission {
    /// A submission holding no room (tests hand batches to a [`Committer`] directly).
    fn from(events: Vec<NewEvent>) -> Self {
        Self {
            events,
            room: Vec::new(),
        }
    }
}

/// The group-commit writer behind [`Enqueue`].
pub struct Committer {
    store: Store,
    publisher: PublisherHandle,
    metrics: Metrics,
    partitions: u16,
    limits: MessageLimits,
    publish_window: Duration,
    turns: Turns,
    owner: Owner,
    head_start: Option<HeadStart>,
}

impl Enqueue {
    /// The enqueue front and its commit streams' task (spawn it). The task ends when `close` is
    /// cancelled and every request submitted before has been committed and answered. With a
    /// `head_start`, each commit hands its events to this node's own channels as well.
    pub fn new(
        store: Store,
        publisher: PublisherHandle,
        metrics: Metrics,
        settings: &crate::config::Settings,
        head_start: Option<HeadStart>,
        close: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + use<>) {
        let pipeline = &settings.pipeline;
        let turns = Turns::new(pipeline.commit_streams, settings.queue.partitions);
        let mut tasks = Vec::with_capacity(pipeline.commit_streams + 1);
        let mut batcher = |owner| {
            let committer =
                Committer::new(store.clone(), publisher.clone(), metrics.clone(), settings)
                    .with_turns(turns.clone(), owner)
                    .with_head_start(head_start.clone());
            // Each queue can hold the whole buffer: the room below is what bounds them all.
            let (batcher, task) = Batcher::new(
                committer,
                pipeline.enqueue_buffer,
                pipeline.max_commit_batch,
                close.clone(),
            );
            tasks.push(task);
            batcher
        };
        let streams: Arc<[Batcher<Committer>]> = (0..turns.len())
            .map(|s| batcher(Owner::Stream(s)))
            .collect();
        let joint = batcher(Owner::Joint);
        let enqueue = Self {
            streams,
            joint,
            turns,
            queue_timeout: pipeline.enqueue_timeout(),
            room_events: Room::new(pipeline.enqueue_buffer),
            room_bytes: Room::new(pipeline.enqueue_buffer_bytes),
        };
        (enqueue, futures_util::future::join_all(tasks).map(drop))
    }

    /// Commits `events` and returns what became of each, in order.
    ///
    /// # Errors
    /// Overload, shutdown, or a failed commit: then none of the events is stored.
    pub async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>, EnqueueError> {
        let count = events.len();
        let bytes: usize = events.iter().map(NewEvent::buffered_size).sum();
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        let room = vec![
            self.room_events.take(count, deadline).await?,
            self.room_bytes.take(bytes, deadline).await?,
        ];
        // The room is taken, so the queue behind it (as many jobs as events) has space.
        self.batcher_for(&events)
            .submit(Submission { events, room })
            .instrument(tracing::debug_span!("enqueue", events = count))
            .await
            .map_err(|_| EnqueueError::ShuttingDown)?
    }

    /// The stream all of `events` fall in, or the joint batcher.
    fn batcher_for(&self, events: &[NewEvent]) -> &Batcher<Committer> {
        let mut streams = events.iter().map(|e| self.turns.stream_of(e));
        let first = streams.next().unwrap_or(0);
        if streams.all(|s| s == first) {
            &self.streams[first]
        } else {
            &self.joint
        }
    }
}

/// Which commits a writer makes: those of one stream's users, or the joint ones.
#[derive(Clone, Copy)]
enum Owner {
    Stream(usize),
    Joint,
}

/// The commit streams' turns (see the module docs): a commit holds the turn of every stream its
/// events fall in, taken in stream order, so commits wait for each other only where they share a
/// stream and never deadlock.
#[derive(Clone)]
struct Turns {
    turns: Arc<[Mutex<()>]>,
    partitions: u16,
}

impl Turns {
    fn new(streams: usize, partitions: u16) -> Self {
        Self {
            turns: (0..streams.max(1)).map(|_| Mutex::new(())).collect(),
            partitions,
        }
    }

    fn len(&self) -> usize {
        self.turns.len()
    }

    fn stream_of(&self, event: &NewEvent) -> usize {
        usize::from(crate::event::partition_of(
            event.user_id.as_str(),
            self.partitions,
        )) % self.turns.len()
    }

    /// Waits for the turns `commit` needs: its own stream's, or for the joint batcher every
    /// stream `events` fall in (the only commit that hashes its users again).
    async fn take(&self, commit: Owner, events: &[NewEvent]) -> Vec<MutexGuard<'_, ()>> {
        if let Owner::Stream(stream) = commit {
            return vec![self.turns[stream].lock().await];
        }
        let mut streams: Vec<usize> = events.iter().map(|e| self.stream_of(e)).collect();
        streams.sort_unstable();
        streams.dedup();
        let mut held = Vec::with_capacity(streams.len());
        for stream in streams {
            held.push(self.turns[stream].lock().await);
        }
        held
    }
}

impl Flush for Committer {
    type Item = Submission;
    type Output = Result<Vec<Accepted>, EnqueueError>;

    fn weight(item: &Submission) -> usize {
        item.events.len()
    }

    /// A single event goes ahead of batches queued before it: one user's burst of batch
    /// requests never holds up everyone else's single events.
    fn small(item: &Submission) -> bool {
        item.events.len() == 1
    }

    /// Commits the requests in one transaction. When PostgreSQL refuses a value (a data error, see
    /// [`store::Error::is_data_error`]), the batch is cut in halves, each committed on its own, down
    /// to the request at fault: it alone is refused, and every other request is committed. The
    /// halves commit in the batch's order, so each user's seqs follow it as one commit's would.
    /// The API's validation refuses such values first; this is the second line, for what it may
    /// miss.
    async fn flush(&self, submissions: Vec<Submission>) -> Vec<Self::Output> {
        // The room is given back when this batch is done, not before.
        let (requests, _room): (Vec<_>, Vec<_>) =
            submissions.into_iter().map(|s| (s.events, s.room)).unzip();
        let mut answers: Vec<Option<Self::Output>> = requests.iter().map(|_| None).collect();
        // A stack of (index of the first request, requests), the earliest on top.
        let mut todo = vec![(0, requests)];
        while let Some((first, requests)) = todo.pop() {
            let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
            let events: Vec<NewEvent> = requests.into_iter().flatten().collect();
            match self.commit(events, &sizes).await {
                Ok(accepted) => {
                    for (i, accepted) in accepted.into_iter().enumerate() {
                        answers[first + i] = Some(Ok(accepted));
                    }
                }
                Err((error, events)) if error.is_data_error() && sizes.len() > 1 => {
                    let mut halves = split(events, &sizes);
                    let second = halves.split_off(sizes.len() / 2);
                    todo.push((first + halves.len(), second));
                    todo.push((first, halves));
                }
                Err((error, _)) => {
                    let answer = if error.is_data_error() {
                        self.metrics.commit_refused(1);
                        tracing::warn!(error = ?error, "PostgreSQL refused one request's data");
                        EnqueueError::Refused(error.database_message().unwrap_or("").to_owned())
                    } else {
                        tracing::error!(error = ?error, requests = sizes.len(), "group commit failed");
                        failure(&error)
                    };
                    for slot in &mut answers[first..first + sizes.len()] {
                        *slot = Some(Err(answer.clone()));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or(Err(EnqueueError::StoreFailed)))
            .collect()
    }
}

impl Committer {
    /// The writer of group commits into `store`, handing their messages to `publisher`, as the only
    /// stream. Only [`Enqueue`] runs them in production (one per stream, sharing their turns);
    /// tests call its [`Flush::flush`] with a batch they choose.
    pub fn new(
        store: Store,
        publisher: PublisherHandle,
        metrics: Metrics,
        settings: &crate::config::Settings,
    ) -> Self {
        Self {
            store,
            publisher,
            metrics,
            partitions: settings.queue.partitions,
            limits: settings.message_limits(),
            publish_window: super::publish_window(settings),
            turns: Turns::new(1, settings.queue.partitions),
            owner: Owner::Stream(0),
            head_start: None,
        }
    }

    /// This writer handing each commit's events to `head_start` too, if any.
    pub fn with_head_start(self, head_start: Option<HeadStart>) -> Self {
        Self { head_start, ..self }
    }

    /// This writer as `owner` of several streams sharing `turns`.
    fn with_turns(self, turns: Turns, owner: Owner) -> Self {
        Self {
            turns,
            owner,
            ..self
        }
    }

    /// One transaction for `events` (the requests of `sizes`, in order), then their messages to the
    /// publisher. On failure the events come back, for a retry without some of them.
    async fn commit(
        &self,
        events: Vec<NewEvent>,
        sizes: &[usize],
    ) -> Result<Vec<Vec<Accepted>>, (store::Error, Vec<NewEvent>)> {
        let _turns = self.turns.take(self.owner, &events).await;
        let started = Instant::now();
        // Before the outbox rows are written: their messages' publishes and confirms must end
        // before the relay may claim the rows, however long the commit and the wait for room take.
        let publish_by = super::publish_deadline(self.publish_window);
        let span = tracing::info_span!("commit", events = events.len());
        let mut trace = traces::continue_traces(
            "herald.group_commit",
            SpanKind::Internal,
            events.iter().filter_map(|e| e.traceparent.as_ref()),
            || {
                vec![
                    KeyValue::new("herald.events", events.len() as i64),
                    KeyValue::new("herald.requests", sizes.len() as i64),
                ]
            },
        );
        let result = self
            .store
            .insert_events(&events, self.partitions, self.limits)
            .instrument(span)
            .await;
        let committed = match result {
            Ok(committed) => committed,
            Err(error) => {
                if let Some(span) = &mut trace {
                    span.set_status(Status::error(error.to_string()));
                }
                return Err((error, events));
            }
        };
        self.metrics.commit(events.len(), started.elapsed());
        let accepted: Vec<Accepted> = events
            .iter()
            .zip(&committed.outcomes)
            .map(|(event, outcome)| accepted(event.id, outcome))
            .collect();
        let commit_trace = trace.as_ref().map(traces::traceparent_of);
        let envelopes: Vec<Option<Envelope>> = events
            .into_iter()
            .zip(committed.outcomes)
            .map(|(event, outcome)| match outcome {
                InsertOutcome::Inserted { seq } => Some(event.into_envelope(seq)),
                InsertOutcome::Duplicate { .. } => None,
            })
            .collect();
        // Before the messages, still holding the turns: the channels get a user's commits in
        // commit order.
        if let Some(head_start) = &self.head_start {
            head_start.hand(&envelopes);
        }
        self.publish_new(envelopes, committed.messages, publish_by, commit_trace)
            .await;
        Ok(split(accepted, sizes))
    }

    /// Hands the commit's messages to the publisher, in commit order, each to be published before
    /// `publish_by` (taken before the commit). While the broker is up and the publisher's buffer is
    /// full, the commit waits for room (half the publish window at most, and never past
    /// `publish_by`): ingest slows to what the broker takes, instead of running ahead and leaving
    /// events to the relay's grace (a stall of seconds for them). A message not taken stays in the
    /// outbox.
    async fn publish_new(
        &self,
        mut envelopes: Vec<Option<Envelope>>,
        messages: Vec<store::OutboxMessage>,
        publish_by: tokio::time::Instant,
        commit_trace: Option<TraceParent>,
    ) {
        let (mut sent, mut carried, mut deferred) = (0, 0, 0);
        let deadline = (tokio::time::Instant::now() + self.publish_window / 2).min(publish_by);
        for planned in messages {
            let batch: Vec<Envelope> = planned
                .events
                .iter()
                .filter_map(|&i| envelopes.get_mut(i).and_then(Option::take))
                .collect();
            // A message of traced events is published under the commit's span.
            let traced =
                commit_trace.filter(|_| batch.iter().any(|e| e.trace.is_some_and(|tp| tp.sampled)));
            let mut trace = traces::continue_traces(
                "herald.publish",
                SpanKind::Producer,
                traced.as_ref(),
                || {
                    vec![
                        KeyValue::new("herald.partition", i64::from(planned.partition)),
                        KeyValue::new("herald.events", batch.len() as i64),
                    ]
                },
            );
            let message = super::message(planned.id, planned.partition, &batch, publish_by);
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.publisher.publish_within(message, wait).await.is_ok() {
                sent += 1;
                carried += batch.len();
            } else {
                deferred += 1;
                if let Some(span) = &mut trace {
                    span.set_status(Status::error("left to the outbox relay"));
                }
            }
        }
        self.metrics
            .messages_published(Source::Commit.label(), sent, carried);
        self.metrics.publish_deferred(deferred);
    }
}

fn failure(error: &store::Error) -> EnqueueError {
    if error.is_unavailable() {
        EnqueueError::StoreUnavailable
    } else if error.is_transient() {
        EnqueueError::StoreBusy
    } else {
        EnqueueError::StoreFailed
    }
}

fn accepted(id: EventId, outcome: &InsertOutcome) -> Accepted {
    match outcome {
        InsertOutcome::Inserted { seq } => Accepted {
            id,
            seq: *seq,
            duplicate_of_status: None,
        },
        InsertOutcome::Duplicate { id, seq, status } => Accepted {
            id: *id,
            seq: *seq,
            duplicate_of_status: Some(*status),
        },
    }
}

/// Cuts the flat list back into one list per request.
fn split<T>(flat: Vec<T>, sizes: &[usize]) -> Vec<Vec<T>> {
    let mut rest = flat.into_iter();
    sizes
        .iter()
        .map(|&n| rest.by_ref().take(n).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_restores_request_boundaries() {
        assert_eq!(
            split(vec![1, 2, 3, 4], &[1, 0, 3]),
            vec![vec![1], vec![], vec![2, 3, 4]]
        );
    }
}

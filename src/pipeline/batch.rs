//! Group commit, the one mechanism behind every batched write: callers submit items one at a time
//! (concurrently), a single task takes whatever has queued up and writes it in one go, then answers
//! each caller. Nothing waits for a timer: while one batch is written, the next one accumulates, so
//! batches grow exactly as fast as load does.
//!
//! Serves the enqueue commit (`INSERT ... UNNEST`), the published marks and the delivery outcomes.
//! Flushes run one at a time, so the order of batches is the order of submission.

use std::future::Future;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What a batcher writes, and how.
pub trait Flush: Send + Sync + 'static {
    /// One submission.
    type Item: Send + 'static;
    /// The answer to one submission.
    type Output: Send + 'static;

    /// How much of a batch an item uses (e.g. the events in one API request); batches stop growing
    /// at `max_weight`.
    fn weight(_item: &Self::Item) -> usize {
        1
    }

    /// Writes a batch; returns one output per item, in order.
    fn flush(&self, items: Vec<Self::Item>) -> impl Future<Output = Vec<Self::Output>> + Send;
}

/// The batcher stopped: it was closed for shutdown.
#[derive(Debug, thiserror::Error)]
#[error("the batcher is closed")]
pub struct Closed;

/// Why [`Batcher::submit_within`] did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No room in the queue within the time given: the item was not taken.
    #[error("the batcher queue stayed full")]
    Timeout,
    /// The batcher is closed.
    #[error("the batcher is closed")]
    Closed,
}

struct Job<F: Flush> {
    item: F::Item,
    reply: Option<oneshot::Sender<F::Output>>,
}

/// The submitting side; cheap to clone.
pub struct Batcher<F: Flush> {
    tx: mpsc::Sender<Job<F>>,
}

impl<F: Flush> Clone for Batcher<F> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<F: Flush> Batcher<F> {
    /// A batcher holding at most `capacity` waiting items, writing at most `max_weight` per batch.
    /// The returned future is the writing task: spawn it. It ends once `close` is cancelled and every
    /// item submitted before that has been written.
    pub fn new(
        flush: F,
        capacity: usize,
        max_weight: usize,
        close: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, run(flush, rx, max_weight, close))
    }

    /// Submits an item and waits for its batch to be written.
    ///
    /// # Errors
    /// The batcher is closed.
    pub async fn submit(&self, item: F::Item) -> Result<F::Output, Closed> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                item,
                reply: Some(reply),
            })
            .await
            .map_err(|_| Closed)?;
        answer.await.map_err(|_| Closed)
    }

    /// Like [`Self::submit`], but gives up when no room frees up in the queue within `limit`. Only
    /// the wait for room is bounded: once taken, the item is written and answered, so a caller never
    /// hears "timeout" for an item that was then written.
    ///
    /// # Errors
    /// The queue stayed full, or the batcher is closed.
    pub async fn submit_within(
        &self,
        item: F::Item,
        limit: std::time::Duration,
    ) -> Result<F::Output, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            item,
            reply: Some(reply),
        };
        match self.tx.send_timeout(job, limit).await {
            Ok(()) => answer.await.map_err(|_| SubmitError::Closed),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(SubmitError::Timeout),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    /// Submits an item without waiting for the write (waits only for room in the queue).
    ///
    /// # Errors
    /// The batcher is closed.
    pub async fn send(&self, item: F::Item) -> Result<(), Closed> {
        self.tx
            .send(Job { item, reply: None })
            .await
            .map_err(|_| Closed)
    }
}

async fn run<F: Flush>(
    flush: F,
    mut rx: mpsc::Receiver<Job<F>>,
    max_weight: usize,
    close: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            () = close.cancelled() => {
                // No new submissions; what is queued is still written.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        let mut weight = F::weight(&first.item);
        let mut jobs = vec![first];
        while weight < max_weight {
            match rx.try_recv() {
                Ok(job) => {
                    weight += F::weight(&job.item);
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|job| (job.item, job.reply)).unzip();
        let outputs = flush.flush(items).await;
        for (reply, output) in replies.into_iter().zip(outputs) {
            if let Some(reply) = reply {
                // The submitter may have given up (request cancelled): nothing to tell then.
                let _ = reply.send(output);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records the batches it is given, and answers each item with its batch's size.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u32>>>>);

    impl Flush for Recorder {
        type Item = u32;
        type Output = usize;
        fn flush(&self, items: Vec<u32>) -> impl Future<Output = Vec<usize>> + Send {
            let n = items.len();
            self.0.lock().unwrap().push(items);
            async move { vec![n; n] }
        }
    }

    #[tokio::test]
    async fn queued_items_share_a_batch_in_submission_order() {
        let recorder = Recorder::default();
        let close = CancellationToken::new();
        let (batcher, task) = Batcher::new(recorder.clone(), 100, 3, close.clone());
        // Queue five items before the writer runs: they must form batches of 3 then 2.
        for i in 0..5 {
            batcher.send(i).await.unwrap();
        }
        let writer = tokio::spawn(task);
        let answer = batcher.submit(5).await.unwrap();
        close.cancel();
        writer.await.unwrap();
        let batches = recorder.0.lock().unwrap().clone();
        assert_eq!(batches[0], vec![0, 1, 2]);
        assert_eq!(batches[1], vec![3, 4, 5]);
        assert_eq!(answer, 3);
    }

    #[tokio::test]
    async fn closing_writes_what_was_queued_then_refuses() {
        let recorder = Recorder::default();
        let close = CancellationToken::new();
        let (batcher, task) = Batcher::new(recorder.clone(), 100, 10, close.clone());
        batcher.send(1).await.unwrap();
        close.cancel();
        task.await;
        assert_eq!(recorder.0.lock().unwrap().concat(), vec![1]);
        assert!(batcher.send(2).await.is_err());
    }
}

//! Group commit, the one mechanism behind every batched write: callers submit items one at a time
//! (concurrently), a single task takes whatever has queued up and writes it in one go, then answers
//! each caller. Nothing waits for a timer: while one batch is written, the next one accumulates, so
//! batches grow exactly as fast as load does.
//!
//! Serves the enqueue commit (`INSERT ... UNNEST`), the confirmed outbox rows and the delivery
//! outcomes. A batcher runs one flush at a time (the enqueue runs several batchers: its streams).
//!
//! Items a writer calls small ([`Flush::small`]: a single event, say) queue apart from the others
//! and go first: a batch takes the small items waiting (up to half its weight while others wait),
//! then the rest in submission order. So a single event never waits behind a burst of bulk requests
//! queued before it; concurrent submissions have no order of their own to keep.

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

    /// Whether `item` is small enough to go ahead of the others (see the module docs).
    fn small(_item: &Self::Item) -> bool {
        false
    }

    /// Writes a batch; returns one output per item, in order.
    fn flush(&self, items: Vec<Self::Item>) -> impl Future<Output = Vec<Self::Output>> + Send;
}

/// The batcher stopped: it was closed for shutdown.
#[derive(Debug, thiserror::Error)]
#[error("the batcher is closed")]
pub struct Closed;

struct Job<F: Flush> {
    item: F::Item,
    reply: Option<oneshot::Sender<F::Output>>,
}

/// The submitting side; cheap to clone.
pub struct Batcher<F: Flush> {
    tx: mpsc::Sender<Job<F>>,
    small_tx: mpsc::Sender<Job<F>>,
}

impl<F: Flush> Clone for Batcher<F> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            small_tx: self.small_tx.clone(),
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
        let (small_tx, small_rx) = mpsc::channel(capacity);
        let queues = Queues {
            rx,
            small_rx,
            open: true,
            small_open: true,
        };
        (Self { tx, small_tx }, run(flush, queues, max_weight, close))
    }

    fn queue(&self, item: &F::Item) -> &mpsc::Sender<Job<F>> {
        if F::small(item) {
            &self.small_tx
        } else {
            &self.tx
        }
    }

    /// Submits an item and waits for its batch to be written.
    ///
    /// # Errors
    /// The batcher is closed.
    pub async fn submit(&self, item: F::Item) -> Result<F::Output, Closed> {
        let (reply, answer) = oneshot::channel();
        self.queue(&item)
            .send(Job {
                item,
                reply: Some(reply),
            })
            .await
            .map_err(|_| Closed)?;
        answer.await.map_err(|_| Closed)
    }

    /// Submits an item without waiting for the write (waits only for room in the queue).
    ///
    /// # Errors
    /// The batcher is closed.
    pub async fn send(&self, item: F::Item) -> Result<(), Closed> {
        self.queue(&item)
            .send(Job { item, reply: None })
            .await
            .map_err(|_| Closed)
    }
}

/// The two queues of a batcher: small items, and the rest.
struct Queues<F: Flush> {
    rx: mpsc::Receiver<Job<F>>,
    small_rx: mpsc::Receiver<Job<F>>,
    /// False once the queue is closed and empty.
    open: bool,
    small_open: bool,
}

impl<F: Flush> Queues<F> {
    /// The next job, a small one first; `None` once both queues are closed and empty. After
    /// `close` is cancelled no new submission is taken, but what is queued still comes out.
    async fn next(&mut self, close: &CancellationToken) -> Option<Job<F>> {
        loop {
            tokio::select! {
                biased;
                job = self.small_rx.recv(), if self.small_open => match job {
                    Some(job) => return Some(job),
                    None => self.small_open = false,
                },
                job = self.rx.recv(), if self.open => match job {
                    Some(job) => return Some(job),
                    None => self.open = false,
                },
                () = close.cancelled(), if self.open || self.small_open => {
                    self.small_rx.close();
                    self.rx.close();
                }
                else => return None,
            }
        }
    }

    /// Adds jobs already waiting to `jobs` until `limit` weight: small ones, then the others.
    fn fill(&mut self, jobs: &mut Vec<Job<F>>, weight: &mut usize, max_weight: usize) {
        // Small jobs take at most half a batch while others wait, so neither kind starves.
        let small_share = if self.rx.is_empty() {
            max_weight
        } else {
            max_weight / 2
        };
        let mut take = |rx: &mut mpsc::Receiver<Job<F>>, limit: usize| {
            while *weight < limit {
                match rx.try_recv() {
                    Ok(job) => {
                        *weight += F::weight(&job.item);
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
        };
        take(&mut self.small_rx, small_share.max(1));
        take(&mut self.rx, max_weight);
        take(&mut self.small_rx, max_weight);
    }
}

async fn run<F: Flush>(
    flush: F,
    mut queues: Queues<F>,
    max_weight: usize,
    close: CancellationToken,
) {
    while let Some(first) = queues.next(&close).await {
        let mut weight = F::weight(&first.item);
        let mut jobs = vec![first];
        queues.fill(&mut jobs, &mut weight, max_weight);
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

    /// Items of 1 are small; others weigh what they say.
    #[derive(Clone, Default)]
    struct Sized(Arc<Mutex<Vec<Vec<u32>>>>);

    impl Flush for Sized {
        type Item = u32;
        type Output = ();
        fn weight(item: &u32) -> usize {
            *item as usize
        }
        fn small(item: &u32) -> bool {
            *item == 1
        }
        fn flush(&self, items: Vec<u32>) -> impl Future<Output = Vec<()>> + Send {
            let n = items.len();
            self.0.lock().unwrap().push(items);
            async move { vec![(); n] }
        }
    }

    #[tokio::test]
    async fn small_items_overtake_bulk_ones_but_take_half_a_batch_at_most() {
        let recorder = Sized::default();
        let close = CancellationToken::new();
        let (batcher, task) = Batcher::new(recorder.clone(), 100, 10, close.clone());
        // Queued before the writer runs: three bulk items of 4, then seven small ones.
        for item in [4, 4, 4, 1, 1, 1, 1, 1, 1, 1] {
            batcher.send(item).await.unwrap();
        }
        close.cancel();
        task.await;
        let batches = recorder.0.lock().unwrap().clone();
        // Small ones first, five of them (half of 10, bulk items waiting), then bulk ones to 10;
        // then the rest.
        assert_eq!(batches[0], vec![1, 1, 1, 1, 1, 4, 4]);
        assert_eq!(batches[1], vec![1, 1, 4]);
        assert_eq!(batches.concat().len(), 10, "every item written once");
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

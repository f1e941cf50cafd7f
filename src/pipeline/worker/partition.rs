//! One partition's share of the work on this node: its window (`queue.prefetch` slots, the demand
//! the consumer takes messages against), the count of its events in work, and when it was last
//! active. The consumer takes slots, every event in work holds its count, and the partition's drain
//! and the sweeper read it: a partition moves to another node only once nothing of it is in work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One partition's consumption on this node.
pub(in crate::pipeline) struct PartitionWork {
    /// The demand: `queue.prefetch` permits, one per event in work that claims a slot.
    window: Arc<Semaphore>,
    pub(super) prefetch: u32,
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
    pub(in crate::pipeline) fn new(prefetch: u16) -> Self {
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
    pub(super) fn touch(&self) {
        self.last_active_ms.store(self.now_ms(), Ordering::Release);
    }

    /// While nothing is in work: how long ago the partition last received a message or settled
    /// an event, and a mark of that moment (equal marks on two looks mean nothing happened in
    /// between). `None` while something is in work.
    pub(in crate::pipeline) fn quiet(&self) -> Option<(Duration, u64)> {
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
    pub(in crate::pipeline) fn in_flight(&self) -> usize {
        self.in_work.load(Ordering::Acquire)
    }

    /// Waits until no event of this partition is in work.
    pub(super) async fn settled(&self) {
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

/// An event counted in its partition's work while this lives.
pub(super) struct WorkCount(Arc<PartitionWork>);

impl WorkCount {
    pub(super) fn new(work: &Arc<PartitionWork>) -> Self {
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

/// How often a partition whose window stays full says so.
const FULL_WINDOW_REPORT_EVERY: Duration = Duration::from_secs(30);

/// Takes `wanted` permits of the partition's window: at once when there is room (no timer on the
/// common path), else waiting, saying every 30 s while it stays full. A window that never frees
/// means events in work that never settle, and a partition that is leased, renewed and consumed
/// by nobody (the first suspect of the seed-303 checker run).
pub(super) async fn wait_for_room(
    work: &Arc<PartitionWork>,
    wanted: u32,
    partition: u16,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if let Ok(permits) = Arc::clone(&work.window).try_acquire_many_owned(wanted) {
        return Ok(permits);
    }
    let room = Arc::clone(&work.window).acquire_many_owned(wanted);
    crate::pipeline::waiting_loudly(room, FULL_WINDOW_REPORT_EVERY, |waited| {
        tracing::warn!(
            partition,
            waited_secs = waited.as_secs(),
            in_work = work.in_flight(),
            "a partition's window is still full: its events in work are not settling"
        );
    })
    .await
}

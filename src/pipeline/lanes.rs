//! Per-user lanes: one user's events are handled strictly in seq order, every user independently
//! of the others.
//!
//! A lane exists while its user has events waiting or running: the first event of an idle user
//! starts a task (the lane), which takes everything queued for the user, up to a run's limit, hands
//! it to the handler as one run, and repeats until the queue is empty. So a burst for one user
//! becomes a few large runs instead of thousands of tasks, and a slow or failing user delays its own
//! lane only: other users' events never wait behind it.
//!
//! **Order restored here, not at the socket.** Events of one user can reach their partition out of
//! seq order when two api nodes commit them close together: each node publishes on its own channel,
//! and the later commit's message may land first. A lane keeps its queue sorted by seq and
//! remembers the last seq it handed on (past the lane's own life, for up to [`REMEMBERED`] users);
//! when the next event queued is further ahead than the one after it, the lane waits up to
//! `pipeline.reorder_window_ms` for the missing ones to arrive, and a run never spans such a gap.
//! Nothing waits when events come in order, and a seq that is missing for longer (a retry waiting
//! in its delay queue, a publish left to the relay) is passed after the window: the socket's order
//! guard fills it from PostgreSQL, as before. `pipeline.lane.reorder` counts events put back in
//! place while queued (`sorted`), and waits that ended with the missing seq (`restored`) or
//! without it (`passed`).
//!
//! Invariant: a lane is in the map exactly while a task runs it. A push onto an existing lane
//! relies on that task to take the item, so a lane left without one would hold its user's events
//! (and its partition's drain, which waits for them) forever. A run whose handler panics therefore
//! ends that run only (the lane's task catches the panic and goes on), and a lane task that ends
//! any other way (dropped with its runtime) removes its lane as it goes.

use crate::metrics::Metrics;
use futures_util::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Handles one run of a user's items, in order.
pub(super) type RunHandler<T> =
    Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// An item's place in its user's sequence (an event's seq).
pub(super) trait Sequenced {
    /// The seq.
    fn seq(&self) -> i64;
}

/// Users whose last seq a node remembers once their lane is gone; past it the memory starts
/// over (a few events then go on without waiting, as after a restart).
pub(super) const REMEMBERED: usize = 100_000;

/// One user's lane: what waits (sorted by seq), how many items its current run holds, and the
/// bell a push rings for a lane waiting on a missing seq.
struct Lane<T> {
    queued: VecDeque<T>,
    running: usize,
    pushed: Arc<Notify>,
}

/// The lanes, and the last seq handed on per user.
struct Registry<T> {
    lanes: HashMap<String, Lane<T>>,
    last: HashMap<String, i64>,
}

/// The lanes of one worker node; cheap to clone.
pub(super) struct Lanes<T> {
    // A std Mutex: held only to move items in or out, never across an await.
    registry: Arc<Mutex<Registry<T>>>,
    handler: RunHandler<T>,
    max_run: usize,
    /// How long a lane waits for a missing seq; zero: never.
    reorder_window: Duration,
    metrics: Metrics,
    tasks: TaskTracker,
}

impl<T> Clone for Lanes<T> {
    fn clone(&self) -> Self {
        Self {
            registry: Arc::clone(&self.registry),
            handler: Arc::clone(&self.handler),
            max_run: self.max_run,
            reorder_window: self.reorder_window,
            metrics: self.metrics.clone(),
            tasks: self.tasks.clone(),
        }
    }
}

impl<T: Sequenced + Send + 'static> Lanes<T> {
    /// Lanes handing runs of at most `max_run` items to `handler`, waiting up to `reorder_window`
    /// for a missing seq, their tasks spawned on `tasks`.
    pub(super) fn new(
        handler: RunHandler<T>,
        max_run: usize,
        reorder_window: Duration,
        metrics: Metrics,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry {
                lanes: HashMap::new(),
                last: HashMap::new(),
            })),
            handler,
            max_run: max_run.max(1),
            reorder_window,
            metrics,
            tasks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry<T>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` on `user`'s lane, in seq order, starting the lane if it was idle.
    pub(super) fn push(&self, user: &str, item: T) {
        let mut registry = self.lock();
        if let Some(lane) = registry.lanes.get_mut(user) {
            // Nearly always at the back: events mostly come in order.
            let at = lane
                .queued
                .partition_point(|queued| queued.seq() <= item.seq());
            if at < lane.queued.len() {
                self.metrics.lane_reorder("sorted");
            }
            lane.queued.insert(at, item);
            lane.pushed.notify_one();
            return;
        }
        let lane = Lane {
            queued: VecDeque::from([item]),
            running: 0,
            pushed: Arc::new(Notify::new()),
        };
        registry.lanes.insert(user.to_owned(), lane);
        drop(registry);
        // The task owns the guard from the start, so even a task dropped before it first runs
        // takes its lane with it.
        let task = LaneTask {
            lanes: self.clone(),
            user: user.to_owned(),
            armed: true,
        };
        self.tasks.spawn(task.run());
    }

    /// Items `user`'s lane holds: queued, and in its current run.
    pub(super) fn depth(&self, user: &str) -> usize {
        self.lock()
            .lanes
            .get(user)
            .map_or(0, |lane| lane.queued.len() + lane.running)
    }

    /// The most items a run takes.
    pub(super) fn max_run(&self) -> usize {
        self.max_run
    }

    /// Forgets the last seq handed on of every user: a partition this node consumes again was
    /// delivered by another node meanwhile, and a remembered seq from before would make its users'
    /// next events wait out the window for seqs that are long delivered.
    pub(super) fn forget_seqs(&self) {
        self.lock().last.clear();
    }

    /// Users with a lane (events queued or running).
    #[cfg(test)]
    fn active(&self) -> usize {
        self.lock().lanes.len()
    }
}

/// What a lane does next.
enum Step<T> {
    /// Hand this run on.
    Run(Vec<T>),
    /// Wait for a push (or the deadline): the next seq queued is ahead of the one missing.
    Hold(Arc<Notify>, Instant),
    /// Nothing is queued: the lane is gone.
    Done,
}

/// A lane's task: runs its user's queued items until none is left, then removes the lane.
///
/// Should the task end any other way (dropped mid-run or before it ever ran: aborted, or its
/// runtime shut down), dropping it removes the lane: the lane's queued items are dropped with it
/// (the worker's ask for their messages back), and a later push starts a new lane instead of
/// queueing behind a task that is gone.
struct LaneTask<T> {
    lanes: Lanes<T>,
    user: String,
    /// False once the task removed the lane itself, or found it gone: a lane of the user in the
    /// map from then on is another task's.
    armed: bool,
}

impl<T: Sequenced + Send + 'static> LaneTask<T> {
    /// A panic in a run is caught here: the run's items are dropped (the worker's items ask for
    /// their messages back when dropped unsettled, so their events are redelivered), and the lane
    /// goes on with the user's next items, in order. Letting the panic end the task would leave
    /// the lane in the map with no task to take what is pushed onto it.
    async fn run(mut self) {
        // When the lane began waiting for the seq it misses now, if it does.
        let mut holding: Option<Instant> = None;
        loop {
            let run = match self.next(&mut holding) {
                Step::Done => return,
                Step::Hold(pushed, deadline) => {
                    let _ = tokio::time::timeout_at(deadline, pushed.notified()).await;
                    continue;
                }
                Step::Run(run) => run,
            };
            // The handler is called inside the caught future, so a panic while it builds its
            // future is caught too.
            let handled = AssertUnwindSafe(async { (self.lanes.handler)(run).await })
                .catch_unwind()
                .await;
            if handled.is_err() {
                // The panic hook has reported the panic itself.
                tracing::error!(user_id = %self.user, "a lane's run panicked; the lane goes on");
            }
        }
    }

    /// Decides the next step under the lock: the next run (in seq order, cut before a gap), a
    /// wait for a missing seq while the window lasts, or the end of the lane.
    fn next(&mut self, holding: &mut Option<Instant>) -> Step<T> {
        let (window, max_run) = (self.lanes.reorder_window, self.lanes.max_run);
        let mut registry = self.lanes.lock();
        let last = registry.last.get(&self.user).copied();
        let Some(lane) = registry.lanes.get_mut(&self.user) else {
            self.armed = false;
            return Step::Done;
        };
        let Some(head) = lane.queued.front().map(Sequenced::seq) else {
            registry.lanes.remove(&self.user);
            self.armed = false;
            return Step::Done;
        };
        let missing = !window.is_zero() && last.is_some_and(|last| head > last + 1);
        if missing {
            let since = *holding.get_or_insert_with(Instant::now);
            if since.elapsed() < window {
                return Step::Hold(Arc::clone(&lane.pushed), since + window);
            }
            self.lanes.metrics.lane_reorder("passed");
        } else if holding.is_some() {
            self.lanes.metrics.lane_reorder("restored");
        }
        *holding = None;
        // A run of consecutive seqs (repeats included), so it never spans a gap it could wait for.
        let mut n = 1;
        while n < lane.queued.len().min(max_run) {
            let (before, next) = (lane.queued[n - 1].seq(), lane.queued[n].seq());
            if !window.is_zero() && next > before + 1 {
                break;
            }
            n += 1;
        }
        lane.running = n;
        let run: Vec<T> = lane.queued.drain(..n).collect();
        let top = run.iter().map(Sequenced::seq).max().unwrap_or(head);
        if registry.last.len() >= REMEMBERED && !registry.last.contains_key(&self.user) {
            registry.last.clear();
        }
        let remembered = registry.last.entry(self.user.clone()).or_insert(top);
        *remembered = (*remembered).max(top);
        Step::Run(run)
    }
}

impl<T> Drop for LaneTask<T> {
    fn drop(&mut self) {
        if self.armed {
            let mut registry = self
                .lanes
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            registry.lanes.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{mpsc, oneshot};

    impl Sequenced for (String, u32) {
        fn seq(&self) -> i64 {
            i64::from(self.1)
        }
    }

    impl Sequenced for u32 {
        fn seq(&self) -> i64 {
            i64::from(*self)
        }
    }

    #[tokio::test]
    async fn a_users_items_run_in_order_in_runs_and_others_never_wait() {
        let (log_tx, mut log) = mpsc::unbounded_channel::<(String, Vec<u32>)>();
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let gate = Arc::new(tokio::sync::Mutex::new(Some(gate_rx)));
        let handler: RunHandler<(String, u32)> = Arc::new(move |run: Vec<(String, u32)>| {
            let (log_tx, gate) = (log_tx.clone(), Arc::clone(&gate));
            Box::pin(async move {
                let user = run[0].0.clone();
                if user == "hot" {
                    // The hot user's first run blocks until the test opens the gate.
                    if let Some(gate) = gate.lock().await.take() {
                        let _ = gate.await;
                    }
                }
                let _ = log_tx.send((user, run.into_iter().map(|(_, n)| n).collect()));
            })
        });
        let tasks = TaskTracker::new();
        let lanes = Lanes::new(
            handler,
            3,
            Duration::ZERO,
            Metrics::disabled(),
            tasks.clone(),
        );
        lanes.push("hot", ("hot".into(), 1));
        tokio::task::yield_now().await;
        for n in 2..=7 {
            lanes.push("hot", ("hot".into(), n));
        }
        lanes.push("cold", ("cold".into(), 1));
        // The cold user's item is handled while the hot lane is blocked.
        assert_eq!(log.recv().await.unwrap(), ("cold".into(), vec![1]));
        gate_tx.send(()).unwrap();
        let mut hot = Vec::new();
        while hot.len() < 7 {
            let (user, run) = log.recv().await.unwrap();
            assert_eq!(user, "hot");
            assert!(run.len() <= 3, "a run holds at most max_run items: {run:?}");
            hot.extend(run);
        }
        assert_eq!(hot, [1, 2, 3, 4, 5, 6, 7]);
        tasks.close();
        tasks.wait().await;
        assert_eq!(lanes.active(), 0, "idle lanes go away");
    }

    /// Events of a user that arrive out of seq order are handed on in order: a lane whose next
    /// event is ahead of the one missing waits for it (up to the window), and a run never spans a
    /// gap; a seq that never comes is passed once the window is over. (Virtual time: the runtime
    /// starts paused and moves its clock when every task waits.)
    #[tokio::test(start_paused = true)]
    async fn a_lane_waits_for_a_missing_seq_then_goes_on_in_order() {
        let (log_tx, mut log) = mpsc::unbounded_channel::<Vec<u32>>();
        let handler: RunHandler<(String, u32)> = Arc::new(move |run: Vec<(String, u32)>| {
            let log_tx = log_tx.clone();
            Box::pin(async move {
                let _ = log_tx.send(run.into_iter().map(|(_, n)| n).collect());
            })
        });
        let window = Duration::from_secs(1);
        let tasks = TaskTracker::new();
        let lanes = Lanes::new(handler, 10, window, Metrics::disabled(), tasks.clone());
        lanes.push("u", ("u".into(), 1));
        assert_eq!(log.recv().await, Some(vec![1]));
        // 2 is missing: 3 waits for it, and goes on right behind it.
        lanes.push("u", ("u".into(), 3));
        tokio::time::sleep(window / 2).await;
        assert!(log.try_recv().is_err(), "3 waits for 2");
        lanes.push("u", ("u".into(), 2));
        assert_eq!(log.recv().await, Some(vec![2, 3]));
        // 4 never comes: 5 and 6 wait out the window, then go on; 8 waits apart from them.
        let started = Instant::now();
        for n in [6, 5, 8] {
            lanes.push("u", ("u".into(), n));
        }
        assert_eq!(log.recv().await, Some(vec![5, 6]));
        assert!(
            started.elapsed() >= window,
            "passed only once the window is over"
        );
        assert_eq!(log.recv().await, Some(vec![8]));
        assert!(started.elapsed() >= window * 2);
        // Forgotten (its partition came back from another node): the next one goes on at once.
        lanes.forget_seqs();
        let started = Instant::now();
        lanes.push("u", ("u".into(), 20));
        assert_eq!(log.recv().await, Some(vec![20]));
        assert!(started.elapsed() < window, "nothing to wait for");
        tasks.close();
        tasks.wait().await;
    }

    /// A handler that panics on one run loses that run only: the lane goes on with the user's
    /// later items, in order, and later pushes still reach it, so neither the user's events nor its
    /// partition's drain can wait forever on a lane that has no task.
    #[tokio::test]
    async fn a_panicking_run_strands_neither_its_lane_nor_other_users() {
        let (log_tx, mut log) = mpsc::unbounded_channel::<(String, u32)>();
        let handler: RunHandler<(String, u32)> = Arc::new(move |run: Vec<(String, u32)>| {
            let log_tx = log_tx.clone();
            Box::pin(async move {
                for (user, n) in run {
                    assert!(!(user == "hot" && n == 2), "injected panic on hot 2");
                    let _ = log_tx.send((user, n));
                }
            })
        });
        let tasks = TaskTracker::new();
        // A run of one item each, so the panic takes exactly item 2 with it.
        let lanes = Lanes::new(
            handler,
            1,
            Duration::ZERO,
            Metrics::disabled(),
            tasks.clone(),
        );
        for n in 1..=5 {
            lanes.push("hot", ("hot".into(), n));
        }
        lanes.push("cold", ("cold".into(), 1));
        let patience = std::time::Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let item = tokio::time::timeout(patience, log.recv())
                .await
                .unwrap_or_else(|_| panic!("lane stranded after the panic; handled: {seen:?}"))
                .unwrap();
            seen.push(item);
        }
        let hot: Vec<u32> = seen
            .iter()
            .filter(|(u, _)| u == "hot")
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(hot, [1, 3, 4, 5], "the rest of the user's items, in order");
        assert!(seen.contains(&("cold".into(), 1)), "{seen:?}");
        // The lane took the panic and went idle: a later item of the user starts it again.
        lanes.push("hot", ("hot".into(), 6));
        let later = tokio::time::timeout(patience, log.recv()).await;
        assert_eq!(later.ok().flatten(), Some(("hot".into(), 6)));
        tasks.close();
        tasks.wait().await;
        assert_eq!(lanes.active(), 0, "no lane is left behind");
    }

    /// A lane task dropped mid-run (its runtime shut down) takes its lane with it, as does one
    /// dropped before it ever ran: no lane stays in the map without a task.
    #[test]
    fn a_lane_whose_task_is_dropped_is_removed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handler: RunHandler<u32> = Arc::new(|_| Box::pin(std::future::pending()));
        let lanes = Lanes::new(
            handler,
            1,
            Duration::ZERO,
            Metrics::disabled(),
            TaskTracker::new(),
        );
        runtime.block_on(async {
            lanes.push("stuck", 1);
            lanes.push("stuck", 2);
            // The stuck lane's task takes its first run; the idle one's never runs.
            tokio::task::yield_now().await;
            lanes.push("never", 1);
        });
        assert_eq!((lanes.depth("stuck"), lanes.depth("never")), (2, 1));
        drop(runtime);
        assert_eq!(lanes.active(), 0, "no lane outlives its task");
    }
}

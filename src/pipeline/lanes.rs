//! Per-user lanes: one user's events are handled strictly in arrival order, every user
//! independently of the others.
//!
//! A lane exists while its user has events waiting or running: the first event of an idle user
//! starts a task (the lane), which takes everything queued for the user, up to a run's limit, hands
//! it to the handler as one run, and repeats until the queue is empty. So a burst for one user
//! becomes a few large runs instead of thousands of tasks, and a slow or failing user delays its own
//! lane only: other users' events never wait behind it.
//!
//! Invariant: a lane is in the map exactly while a task runs it. A push onto an existing lane
//! relies on that task to take the item, so a lane left without one would hold its user's events
//! (and its partition's drain, which waits for them) forever. A run whose handler panics therefore
//! ends that run only (the lane's task catches the panic and goes on), and a lane task that ends
//! any other way (dropped with its runtime) removes its lane as it goes.

use futures_util::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_util::task::TaskTracker;

/// Handles one run of a user's items, in order.
pub(super) type RunHandler<T> =
    Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One user's lane: what waits, and how many items its current run holds.
struct Lane<T> {
    queued: VecDeque<T>,
    running: usize,
}

/// The lanes of one worker node; cheap to clone.
pub(super) struct Lanes<T> {
    // A std Mutex: held only to move items in or out, never across an await.
    queued: Arc<Mutex<HashMap<String, Lane<T>>>>,
    handler: RunHandler<T>,
    max_run: usize,
    tasks: TaskTracker,
}

impl<T> Clone for Lanes<T> {
    fn clone(&self) -> Self {
        Self {
            queued: Arc::clone(&self.queued),
            handler: Arc::clone(&self.handler),
            max_run: self.max_run,
            tasks: self.tasks.clone(),
        }
    }
}

impl<T: Send + 'static> Lanes<T> {
    /// Lanes handing runs of at most `max_run` items to `handler`, their tasks spawned on `tasks`.
    pub(super) fn new(handler: RunHandler<T>, max_run: usize, tasks: TaskTracker) -> Self {
        Self {
            queued: Arc::default(),
            handler,
            max_run: max_run.max(1),
            tasks,
        }
    }

    /// Queues `item` on `user`'s lane, starting the lane if it was idle. Items of one user must be
    /// pushed in the order they are to be handled (the worker pushes in partition order).
    pub(super) fn push(&self, user: &str, item: T) {
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lane) = queued.get_mut(user) {
            lane.queued.push_back(item);
            return;
        }
        let lane = Lane {
            queued: VecDeque::from([item]),
            running: 0,
        };
        queued.insert(user.to_owned(), lane);
        drop(queued);
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
        let queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        queued
            .get(user)
            .map_or(0, |lane| lane.queued.len() + lane.running)
    }

    /// The most items a run takes.
    pub(super) fn max_run(&self) -> usize {
        self.max_run
    }

    /// Users with a lane (events queued or running).
    #[cfg(test)]
    fn active(&self) -> usize {
        self.queued.lock().map(|q| q.len()).unwrap_or(0)
    }
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

impl<T: Send + 'static> LaneTask<T> {
    /// A panic in a run is caught here: the run's items are dropped (the worker's items ask for
    /// their messages back when dropped unsettled, so their events are redelivered), and the lane
    /// goes on with the user's next items, in order. Letting the panic end the task would leave
    /// the lane in the map with no task to take what is pushed onto it.
    async fn run(mut self) {
        loop {
            let run: Vec<T> = {
                let mut queued = self.lanes.queued.lock().unwrap_or_else(|e| e.into_inner());
                let Some(lane) = queued.get_mut(&self.user) else {
                    self.armed = false;
                    return;
                };
                if lane.queued.is_empty() {
                    queued.remove(&self.user);
                    self.armed = false;
                    return;
                }
                let n = lane.queued.len().min(self.lanes.max_run);
                lane.running = n;
                lane.queued.drain(..n).collect()
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
}

impl<T> Drop for LaneTask<T> {
    fn drop(&mut self) {
        if self.armed {
            let mut queued = self.lanes.queued.lock().unwrap_or_else(|e| e.into_inner());
            queued.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{mpsc, oneshot};

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
        let lanes = Lanes::new(handler, 3, tasks.clone());
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
        let lanes = Lanes::new(handler, 1, tasks.clone());
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
        let lanes = Lanes::new(handler, 1, TaskTracker::new());
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

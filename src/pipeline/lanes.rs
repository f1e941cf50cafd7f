//! Per-user lanes: one user's events are handled strictly in arrival order, every user
//! independently of the others.
//!
//! A lane exists while its user has events waiting or running: the first event of an idle user
//! starts a task (the lane), which takes everything queued for the user, up to a run's limit, hands
//! it to the handler as one run, and repeats until the queue is empty. So a burst for one user
//! becomes a few large runs instead of thousands of tasks, and a slow or failing user delays its own
//! lane only: other users' events never wait behind it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
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
        let lanes = self.clone();
        let user = user.to_owned();
        self.tasks.spawn(async move { lanes.run_lane(user).await });
    }

    async fn run_lane(self, user: String) {
        loop {
            let run: Vec<T> = {
                let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
                let Some(lane) = queued.get_mut(&user) else {
                    return;
                };
                if lane.queued.is_empty() {
                    queued.remove(&user);
                    return;
                }
                let n = lane.queued.len().min(self.max_run);
                lane.running = n;
                lane.queued.drain(..n).collect()
            };
            (self.handler)(run).await;
        }
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
}

//! Which worker node consumes which partition: spread over the live worker nodes, each on about
//! P / N of them, moved when a node joins, leaves or dies, and never consumed by two nodes at once.
//!
//! Two mechanisms, one on top of the other:
//!
//! - **The broker's fence.** Every partition queue is a single-active-consumer queue: whatever the
//!   nodes believe, RabbitMQ lets one consumer of a partition receive messages at a time, and
//!   switches to another only when that one is gone. This alone would make the first node active on
//!   every partition (failover, not scale-out), so the nodes do not all subscribe.
//! - **Leases in PostgreSQL**, for the spreading and for handing a partition over in order. Every
//!   `queue.partition_check_ms`, a worker node renews its membership row, reads the live worker
//!   nodes (renewed within `queue.partition_lease_ms`), computes the same balanced assignment as
//!   every other node ([`share`]: rendezvous hashing with a cap of ceil(P / N) per node, a pure
//!   function of the live set), renews its leases, and takes the leases of its share that are free
//!   or expired. It consumes a partition only while it holds its lease. A partition that leaves
//!   its share is drained first: the consumer is cancelled, the messages taken but not yet in work
//!   go back to the queue's head in order, the events in work are settled, and only then is the
//!   lease cleared for the next owner, which so starts exactly where the last one stopped. Per-user
//!   order therefore holds across a move, with no gap to fill at the socket.
//!
//! A node killed outright stops renewing: its connection closes (the broker returns its unacked
//! messages to their queues, in order), its lease expires, and the nodes whose share now includes
//! its partitions take them within a lease and a check. A node that cannot reach PostgreSQL
//! stops consuming before its leases can expire, so it never competes with their next owner.
//!
//! A node that stalled past its lease (and so may wake up with events in hand while another node
//! owns the partition) is fenced: its work carries the lease's epoch and the lease's local trust
//! ([`super::lease`]), checked before each broadcast and by the outcome writer. The loop never
//! waits for a partition's work: stopping one (handover, loss, abandon) runs in a task of its own.
//!
//! The coordinator, tick by tick, is *disconnected* (no broker session: it neither renews nor
//! takes leases, so its partitions go to nodes that can consume them), *connected* (each tick is
//! one check, `reconcile`), or *untrusted* (connected, but its leases could not be renewed for
//! as long as a renewal is trusted: it consumes nothing until a renewal succeeds). On this node a
//! partition is not held, *running* or *draining* (`consumption`), and a check moves it:
//!
//! - not held -> running: its lease is taken and it is in the share (`start_held`);
//! - running -> draining by `Stop::Abandon`: its lease is lost (`follow_leases`), renewals lapsed
//!   (`lapse`), or the session broke (`end_session`);
//! - running -> draining by `Stop::HandOver`: it left the share (`hand_over`), or the node stops
//!   (`shut_down`);
//! - draining -> not held: its consumer is settled and, handed over, its lease released (the
//!   drain's own task; the loop forgets it at the next tick).

mod consumption;
mod layout;
mod reconcile;
mod session;
mod share;

pub use layout::{LayoutError, check_layout};
pub use share::share;

use super::lease::trusted_for;
use super::sweep::{Watched, sweep_once};
use super::worker::Worker;
use crate::backoff::{Backoff, reconnect};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::queue::BrokerNodes;
use crate::store::Store;
use consumption::{Draining, Stop};
use session::Session;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A worker node's partition consumption: what it holds, and the loop that keeps that right.
pub struct Coordinator {
    /// Delivers what the partitions carry.
    pub worker: Worker,
    /// Leases and membership.
    pub store: Store,
    /// The node's settings.
    pub settings: Settings,
    /// This node's name (unique in the deployment).
    pub node: String,
    /// The partitions this node consumes, for readiness and operators.
    pub owned: watch::Sender<Vec<u16>>,
    /// True while the node is a live member with a broker link (readiness).
    pub consuming: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Metrics,
    /// The broker nodes the consumer connection moves between.
    pub nodes: BrokerNodes,
}

/// What the coordinator carries from one check to the next.
struct State {
    session: Option<Session>,
    draining: HashMap<u16, Draining>,
    /// When the last successful renewal was sent.
    renewed: Option<Instant>,
    next_sweep: Instant,
    sweeping: Option<JoinHandle<()>>,
    /// A session was open before: a new one is a recovery worth a line at the default level.
    reconnecting: bool,
}

impl Coordinator {
    /// Runs until `stop` is cancelled, then drains every partition, gives the leases up and leaves
    /// the live set, so the other nodes take over at once.
    pub async fn run(self, stop: CancellationToken) {
        let queue = &self.settings.queue;
        let mut tick = tokio::time::interval(queue.partition_check());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::new(queue.reconnect_max_backoff());
        let mut state = State {
            session: None,
            draining: HashMap::new(),
            renewed: None,
            next_sweep: Instant::now() + self.sweep_every(),
            sweeping: None,
            reconnecting: false,
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            state.draining.retain(|_, d| !d.task.is_finished());
            if !self.connect(&mut state, &mut backoff, &stop).await {
                break;
            }
            self.check(&mut state).await;
        }
        self.shut_down(state).await;
    }

    fn sweep_every(&self) -> Duration {
        self.settings.pipeline.sweep_interval()
    }

    /// Makes sure the node has a live broker session, replacing a broken one; false once stopped
    /// while reconnecting.
    async fn connect(
        &self,
        state: &mut State,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> bool {
        if state.session.as_ref().is_some_and(Session::broken) {
            tracing::warn!("worker lost RabbitMQ; reconnecting");
            self.metrics.queue_connection_lost("consumer");
            if let Some(old) = state.session.take() {
                self.end_session(old, &mut state.draining, Duration::from_secs(5))
                    .await;
            }
        }
        if state.session.is_some() {
            return true;
        }
        // Without a broker link, this node neither renews nor takes leases: its partitions go to
        // nodes that can consume them.
        self.consuming.store(false, Ordering::Relaxed);
        let opened = reconnect(
            "consumer",
            backoff,
            stop,
            || self.open_session(),
            || {
                self.metrics.queue_connection_lost("consumer");
                std::future::ready(())
            },
        )
        .await;
        let Some(opened) = opened else {
            return false;
        };
        if state.reconnecting {
            tracing::info!(node = %self.node, "worker reconnected to RabbitMQ");
        } else {
            tracing::debug!(node = %self.node, "worker connected to RabbitMQ");
        }
        state.reconnecting = true;
        state.session = Some(opened);
        true
    }

    /// One check: renew and rebalance, then maybe start a sweep; or, when renewing fails, see
    /// whether the leases can still be trusted.
    async fn check(&self, state: &mut State) {
        let Some(session) = state.session.as_mut() else {
            return;
        };
        match self.reconcile(session, &mut state.draining).await {
            Ok(sent) => {
                state.renewed = Some(sent);
                self.maybe_sweep(state);
            }
            Err(error) => {
                tracing::warn!(error = ?error, "cannot renew partition leases");
                self.lapse(state);
            }
        }
    }

    /// Starts a sweep when one is due and the last has ended: in a task of its own, since a slow
    /// sweep must never delay the leases' renewal.
    fn maybe_sweep(&self, state: &mut State) {
        let Some(session) = state.session.as_ref() else {
            return;
        };
        if self.settings.pipeline.sweep_after_ms > 0
            && Instant::now() >= state.next_sweep
            && state.sweeping.as_ref().is_none_or(JoinHandle::is_finished)
        {
            state.next_sweep = Instant::now() + self.sweep_every();
            state.sweeping = Some(self.spawn_sweep(session));
        }
    }

    /// After a failed renewal: a node that could not renew for as long as a renewal is trusted
    /// stops consuming, before its leases can run out, so a next owner never competes with it.
    fn lapse(&self, state: &mut State) {
        let trust = trusted_for(self.settings.queue.partition_lease());
        if state.renewed.is_none_or(|at| at.elapsed() > trust)
            && let Some(session) = state.session.as_mut()
        {
            self.stop_running(session, &mut state.draining, Stop::Abandon);
            self.consuming.store(false, Ordering::Relaxed);
            self.publish_owned(&[]);
        }
    }

    /// Shutdown: hands every partition over (drained, then released), leaves the live set, closes.
    async fn shut_down(&self, mut state: State) {
        self.consuming.store(false, Ordering::Relaxed);
        if let Some(sweep) = state.sweeping.take() {
            // A sweep cut short rolls back: nothing half-done.
            sweep.abort();
            let _ = sweep.await;
        }
        if let Some(session) = state.session.as_mut() {
            self.stop_running(session, &mut state.draining, Stop::HandOver);
        }
        for (_, draining) in state.draining.drain() {
            let _ = draining.task.await;
        }
        self.publish_owned(&[]);
        if let Err(error) = self.store.worker_leave(&self.node).await {
            tracing::warn!(error = ?error, "cannot leave the worker set; it will notice");
        }
        if let Some(session) = state.session {
            self.end_session(session, &mut state.draining, Duration::from_secs(5))
                .await;
        }
    }

    /// Starts one sweep over the partitions `session` consumes (see [`super::sweep`]).
    fn spawn_sweep(&self, session: &Session) -> JoinHandle<()> {
        let watched: Vec<Watched> = session
            .running
            .iter()
            .map(|(&partition, r)| Watched {
                partition,
                work: Arc::clone(&r.work),
                stop: r.stop.clone(),
            })
            .collect();
        let link = Arc::clone(&session.link);
        let (store, settings, metrics) = (
            self.store.clone(),
            self.settings.clone(),
            self.metrics.clone(),
        );
        let span = tracing::info_span!("sweep", partitions = watched.len());
        tokio::spawn(
            async move {
                let started = Instant::now();
                let swept = sweep_once(&store, &link, &watched, &settings, &metrics).await;
                metrics.sweep_time(started.elapsed());
                if let Err(error) = swept {
                    tracing::warn!(error = ?error, "sweep failed; the next one tries again");
                }
            }
            .instrument(span),
        )
    }
}

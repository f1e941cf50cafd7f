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

use super::lanes::Lanes;
use super::lease::{Lease, trusted_for};
use super::sweep::{Watched, sweep_once};
use super::worker::{ConsumerEnd, EventInWork, PartitionWork, Worker};
use crate::backoff::{Backoff, reconnect};
use crate::config::Settings;
use crate::metrics::{Metrics, PartitionMove};
use crate::queue::{self, BrokerNodes, ConsumerLink, Topology};
use crate::store::{self, Layout, LeaseToken, PRE_PARTITION_QUEUES_REMOVED, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

/// The partitions `me` should consume, out of `partitions`, when `nodes` are the live worker nodes:
/// every node computes the same answer from the same set. Each (node, partition) pair gets a
/// pseudo-random score; pairs are taken best first, a partition going to the first node that wants
/// it and has fewer than ceil(P / N) partitions. A node joining or leaving moves few partitions,
/// and no node gets more than its share.
pub fn share(partitions: u16, nodes: &[String], me: &str) -> Vec<u16> {
    let live: BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    if live.is_empty() || !live.contains(me) {
        return Vec::new();
    }
    let cap = usize::from(partitions).div_ceil(live.len());
    let mut pairs: Vec<(u64, &str, u16)> = live
        .iter()
        .flat_map(|node| (0..partitions).map(move |p| (score(node, p), *node, p)))
        .collect();
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)).then(a.2.cmp(&b.2)));
    let mut taken = vec![false; usize::from(partitions)];
    let mut load: HashMap<&str, usize> = HashMap::new();
    let mut mine = Vec::new();
    for (_, node, p) in pairs {
        let count = load.entry(node).or_default();
        if taken[usize::from(p)] || *count >= cap {
            continue;
        }
        taken[usize::from(p)] = true;
        *count += 1;
        if node == me {
            mine.push(p);
        }
    }
    mine.sort_unstable();
    mine
}

/// A stable pseudo-random score of (node, partition): FNV-1a of the name, mixed with the partition
/// by SplitMix64's finaliser. Every node must compute the same, so no randomised hasher.
fn score(node: &str, partition: u16) -> u64 {
    let name = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut z = name ^ u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Why a node refuses to start with its partition count.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The count differs from the deployment's and the old layout is not empty (or cannot be
    /// checked).
    #[error("{0}")]
    Refused(String),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Makes sure the deployment runs with `queue.partitions`: records it on a fresh deployment; on a
/// change, switches only when no worker node runs the old count and the old partitions, the delay
/// queues and the outbox are empty (a user's events must never be split over two partitions at
/// once), and refuses otherwise, saying how to drain.
///
/// # Errors
/// The count changed while the old layout still holds messages, or it cannot be checked.
pub async fn check_layout(settings: &Settings, store: &Store) -> Result<(), LayoutError> {
    let wanted = settings.queue.partitions;
    let running = match store.partition_layout(wanted).await? {
        Layout::Same => return Ok(()),
        Layout::Fresh => {
            store.set_partition_layout(wanted).await?;
            return Ok(());
        }
        Layout::Changed { running } => running,
    };
    let refuse = |why: String| {
        LayoutError::Refused(format!(
            "queue.partitions is {wanted}, but this deployment runs {running} partitions and {why}. \
             To change the count: stop the api nodes, let the worker nodes empty the partitions and \
             the delay queues, stop every node, then start them all with the new count (README, \
             \"Changing the partition count\")"
        ))
    };
    let lease = settings.queue.partition_lease_ms;
    let others: Vec<String> = store
        .worker_heartbeat_peek(lease)
        .await?
        .into_iter()
        .filter(|(_, p)| *p != i32::from(wanted))
        .map(|(name, _)| name)
        .collect();
    if !others.is_empty() {
        return Err(refuse(format!(
            "worker nodes still run with the old count ({})",
            others.join(", ")
        )));
    }
    let outbox = store.messages_in_flight().await?;
    let connection = queue::connect(&settings.queue, "layout-check")
        .await
        .map_err(|e| {
            refuse(format!(
                "RabbitMQ cannot be reached to check it is empty ({e})"
            ))
        })?;
    let prefix = &settings.queue.prefix;
    let delays = settings.retry.delays_ms();
    let waiting = queue::messages_in_layout(&connection, prefix, running, &delays).await;
    if !matches!(waiting, Ok(0)) || outbox > 0 {
        let _ = connection.close(200, "layout refused".into()).await;
        return Err(refuse(match waiting {
            Ok(waiting) => format!(
                "its queues still hold {waiting} messages ({outbox} more wait in the outbox)"
            ),
            Err(e) => format!("RabbitMQ cannot be read ({e})"),
        }));
    }
    queue::remove_partitions(&connection, prefix, wanted, running).await;
    let _ = connection.close(200, "layout checked".into()).await;
    store.set_partition_layout(wanted).await?;
    tracing::warn!(
        from = running,
        to = wanted,
        "partition count changed (the old partitions were empty)"
    );
    Ok(())
}

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

/// One partition being consumed.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<ConsumerEnd>,
    work: Arc<PartitionWork>,
    /// The lease it is consumed under, shared with every event in work.
    lease: Arc<Lease>,
}

/// How often a drain that has not ended says so.
const DRAIN_REPORT_EVERY: Duration = Duration::from_secs(30);

/// A partition whose consumer is stopping, in a task of its own so the lease loop never waits for
/// work: it settles (or returns) what it took, then the partition is released or left.
struct Draining {
    task: JoinHandle<()>,
    /// Its lease, renewed while still this node's (a handover drains under a valid lease).
    lease: Option<Arc<Lease>>,
}

/// How a partition's consumption ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// No longer this node's share: drained under its lease, then released for the next owner,
    /// which so starts exactly where this one stopped.
    HandOver,
    /// Lost (another node holds the lease now), or no longer renewable (PostgreSQL away past the
    /// lease's trust, the broker link broken): the lease is revoked at once, so nothing more is
    /// delivered under it, and what was taken goes back to the queue; the lease is left alone.
    Abandon,
}

/// Everything tied to one broker connection.
struct Session {
    link: Arc<ConsumerLink>,
    lanes: Lanes<EventInWork>,
    tasks: TaskTracker,
    running: HashMap<u16, Running>,
}

impl Session {
    fn broken(&self) -> bool {
        !self.link.connection.status().connected()
            || !self.link.channel.status().connected()
            || !self.link.retry_channel.status().connected()
    }
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

    /// One check: renew and rebalance, then maybe start a sweep. A node that could not renew for
    /// as long as a renewal is trusted stops consuming, before its leases can run out, so a next
    /// owner never competes with it.
    async fn check(&self, state: &mut State) {
        let Some(session) = state.session.as_mut() else {
            return;
        };
        match self.reconcile(session, &mut state.draining).await {
            Ok(sent) => {
                state.renewed = Some(sent);
                // In a task of its own: a slow sweep must never delay the leases' renewal.
                if self.settings.pipeline.sweep_after_ms > 0
                    && Instant::now() >= state.next_sweep
                    && state.sweeping.as_ref().is_none_or(JoinHandle::is_finished)
                {
                    state.next_sweep = Instant::now() + self.sweep_every();
                    state.sweeping = Some(self.spawn_sweep(session));
                }
            }
            Err(error) => {
                tracing::warn!(error = ?error, "cannot renew partition leases");
                let trust = trusted_for(self.settings.queue.partition_lease());
                if state.renewed.is_none_or(|at| at.elapsed() > trust) {
                    self.stop_running(session, &mut state.draining, Stop::Abandon);
                    self.consuming.store(false, Ordering::Relaxed);
                    self.publish_owned(&[]);
                }
            }
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

    /// Removes the queues of the layout before partitions, once per deployment: a fresh one starts
    /// with the step done (see the `broker_upgrades` migration), because probing for a missing
    /// queue makes lapin log an ERROR. When the store cannot say, the probe waits for a later
    /// connection: nothing depends on it but tidiness.
    async fn remove_legacy_queues_once(
        &self,
        connection: &lapin::Connection,
    ) -> Result<(), queue::Error> {
        match self.store.upgrade_done(PRE_PARTITION_QUEUES_REMOVED).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => {
                tracing::debug!(error = ?error, "cannot read the upgrade steps taken; not probing for old queues now");
                return Ok(());
            }
        }
        tracing::info!(
            "looking for the queues of the layout before partitions, once (RabbitMQ closes a channel for each one that is missing, which lapin logs)"
        );
        let queue = &self.settings.queue;
        queue::remove_legacy_queues(connection, queue, &self.worker.retry_delays_ms).await?;
        if let Err(error) = self
            .store
            .mark_upgrade_done(PRE_PARTITION_QUEUES_REMOVED)
            .await
        {
            tracing::debug!(error = ?error, "cannot record the old queues' removal; the next connection looks again");
        }
        Ok(())
    }

    async fn open_session(&self) -> Result<Session, queue::Error> {
        let queue = &self.settings.queue;
        let link = ConsumerLink::open(queue, &self.worker.retry_delays_ms, &self.nodes).await?;
        self.remove_legacy_queues_once(&link.connection).await?;
        let link = Arc::new(link);
        let names = Arc::new(Topology::new(&queue.prefix, queue.partitions));
        let tasks = TaskTracker::new();
        let lanes = self.worker.lanes(
            Arc::clone(&link),
            names,
            queue.confirm_timeout(),
            self.settings.pipeline.max_run_events,
            tasks.clone(),
        );
        Ok(Session {
            link,
            lanes,
            tasks,
            running: HashMap::new(),
        })
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

    /// One check's leases: heartbeat, assignment, renewal, then make the running consumers match
    /// what this node holds and wants. Never waits for work: consumers stop in tasks of their own.
    /// Returns when the successful renewal was sent.
    async fn reconcile(
        &self,
        session: &mut Session,
        draining: &mut HashMap<u16, Draining>,
    ) -> Result<Instant, store::Error> {
        let queue = &self.settings.queue;
        let nodes = self.live_nodes().await?;
        let desired = share(queue.partitions, &nodes, &self.node);
        let wanted: Vec<u16> = desired
            .iter()
            .copied()
            .filter(|p| !draining.contains_key(p))
            .collect();
        let sent = Instant::now();
        let held = self
            .store
            .renew_and_acquire(&self.node, &wanted, queue.partition_lease_ms)
            .await?;
        self.consuming.store(true, Ordering::Relaxed);
        // Ended on their own (the stream failed): forgotten here; started again below while held.
        session.running.retain(|_, r| !r.task.is_finished());
        self.follow_leases(session, draining, &held, sent);
        self.hand_over(session, draining, &held, &desired);
        self.start_held(session, draining, &held, &desired, sent)
            .await;
        let mut owned: Vec<u16> = session.running.keys().copied().collect();
        owned.sort_unstable();
        self.metrics.partitions_owned(owned.len());
        let in_flight: usize = session.running.values().map(|r| r.work.in_flight()).sum();
        self.metrics.worker_in_flight(in_flight as u64);
        self.sample_depths(session, &owned).await;
        self.publish_owned(&owned);
        Ok(sent)
    }

    /// Renews this node's membership and reads the live worker nodes that run its partition count.
    async fn live_nodes(&self) -> Result<Vec<String>, store::Error> {
        let queue = &self.settings.queue;
        let live = self
            .store
            .worker_heartbeat(&self.node, queue.partitions, queue.partition_lease_ms)
            .await?;
        let (same, other): (Vec<_>, Vec<_>) = live
            .into_iter()
            .partition(|(_, p)| *p == i32::from(queue.partitions));
        if !other.is_empty() {
            tracing::warn!(nodes = ?other, "live worker nodes run another partition count; ignoring them");
        }
        let nodes: Vec<String> = same.into_iter().map(|(name, _)| name).collect();
        if !self.settings.cluster() && nodes.len() > 1 {
            // Each node broadcasts to its own sockets only: clients of one miss the events of the
            // other's partitions until they catch up.
            tracing::error!(
                nodes = ?nodes,
                "several worker nodes share this deployment but pubsub.mode is local: set \
                 HERALD_PUBSUB__MODE=cluster on every node"
            );
        }
        Ok(nodes)
    }

    /// Extends the trust of every lease the renewal kept (at the same epoch), and abandons the
    /// consumers whose lease is gone or changed hands meanwhile.
    fn follow_leases(
        &self,
        session: &mut Session,
        draining: &mut HashMap<u16, Draining>,
        held: &[LeaseToken],
        sent: Instant,
    ) {
        let kept = |lease: &Lease| held.contains(&lease.token());
        for d in draining.values() {
            if let Some(lease) = d.lease.as_ref().filter(|l| kept(l)) {
                lease.renewed(sent);
            }
        }
        let lost: Vec<u16> = session
            .running
            .iter()
            .filter(|(_, r)| !kept(&r.lease))
            .map(|(&p, _)| p)
            .collect();
        for r in session.running.values() {
            if kept(&r.lease) {
                r.lease.renewed(sent);
            }
        }
        for p in lost {
            if let Some(running) = session.running.remove(&p) {
                tracing::warn!(partition = p, "partition lease lost; stopping its consumer");
                self.metrics.partition_moved(PartitionMove::Lost);
                draining.insert(p, self.stop_partition(p, Some(running), Stop::Abandon));
            }
        }
    }

    /// Drains and releases the partitions this node holds but no longer wants.
    fn hand_over(
        &self,
        session: &mut Session,
        draining: &mut HashMap<u16, Draining>,
        held: &[LeaseToken],
        desired: &[u16],
    ) {
        for token in held {
            let p = token.partition;
            if desired.contains(&p) || draining.contains_key(&p) {
                continue;
            }
            let running = session.running.remove(&p);
            draining.insert(p, self.stop_partition(p, running, Stop::HandOver));
        }
    }

    /// Starts consuming the partitions this node holds and wants and does not consume yet.
    async fn start_held(
        &self,
        session: &mut Session,
        draining: &HashMap<u16, Draining>,
        held: &[LeaseToken],
        desired: &[u16],
        sent: Instant,
    ) {
        for token in held.iter().filter(|t| desired.contains(&t.partition)) {
            let p = token.partition;
            if session.running.contains_key(&p) || draining.contains_key(&p) {
                continue;
            }
            match self.start(session, *token, sent).await {
                Ok(running) => {
                    tracing::debug!(partition = p, epoch = token.epoch, "consuming partition");
                    self.metrics.partition_moved(PartitionMove::Acquired);
                    session.running.insert(p, running);
                    session.lanes.forget_seqs();
                }
                Err(error) => {
                    tracing::warn!(error = %error, partition = p, "cannot consume a partition");
                    break;
                }
            }
        }
    }

    /// Tells readiness and operators which partitions this node consumes.
    fn publish_owned(&self, owned: &[u16]) {
        if owned.is_empty() {
            self.metrics.partitions_ready(&[]);
        }
        self.owned.send_if_modified(|current| {
            let changed = current.as_slice() != owned;
            if changed {
                *current = owned.to_vec();
                tracing::info!(
                    "worker: consuming {} of {} partitions{}",
                    owned.len(),
                    self.settings.queue.partitions,
                    match owned.is_empty() {
                        true => String::new(),
                        false => format!(" ({})", ranges(owned)),
                    }
                );
            }
            changed
        });
    }

    /// Reports the ready messages of the partitions this node consumes: each partition's depth
    /// comes from its one consumer, so a deployment reports every partition exactly once. Bounded
    /// by half a check, so a slow broker never delays the lease renewal.
    async fn sample_depths(&self, session: &Session, owned: &[u16]) {
        let names = Topology::new(&self.settings.queue.prefix, self.settings.queue.partitions);
        let queues: Vec<String> = owned.iter().map(|&p| names.partition_queue(p)).collect();
        let limit = self.settings.queue.partition_check() / 2;
        match tokio::time::timeout(
            limit,
            queue::ready_counts(&session.link.connection, &queues),
        )
        .await
        {
            Ok(Ok(counts)) => {
                let ready: Vec<(u16, u32)> = owned
                    .iter()
                    .zip(counts)
                    .filter_map(|(&p, count)| Some((p, count?)))
                    .collect();
                self.metrics.partitions_ready(&ready);
            }
            Ok(Err(error)) => tracing::debug!(error = %error, "cannot sample partition depths"),
            Err(_) => tracing::debug!("sampling partition depths timed out"),
        }
    }

    /// Consumes the partition of `token`, taken by the renewal sent at `sent`.
    async fn start(
        &self,
        session: &Session,
        token: LeaseToken,
        sent: Instant,
    ) -> Result<Running, queue::Error> {
        let queue = &self.settings.queue;
        let partition = token.partition;
        // A tag of its own per consume: a restarted consumer never collides with a cancelled one.
        let tag = format!(
            "herald-{}-p{partition}-{}",
            self.node,
            &Uuid::now_v7().simple().to_string()[20..]
        );
        let consumer = session.link.consume(queue, partition, &tag).await?;
        let work = Arc::new(PartitionWork::new(queue.prefetch));
        let trust = trusted_for(queue.partition_lease());
        let lease = Arc::new(Lease::new(token, sent, trust));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (worker, link, lanes) = (
                self.worker.clone(),
                Arc::clone(&session.link),
                session.lanes.clone(),
            );
            let (work, lease, stop) = (Arc::clone(&work), Arc::clone(&lease), stop.clone());
            async move {
                worker
                    .consume_partition(partition, consumer, &link, &work, &lease, &lanes, &stop)
                    .await
            }
        });
        Ok(Running {
            stop,
            task,
            work,
            lease,
        })
    }

    /// Stops every running partition, each in a task of its own (see [`Stop`]).
    fn stop_running(
        &self,
        session: &mut Session,
        draining: &mut HashMap<u16, Draining>,
        how: Stop,
    ) {
        let running: Vec<(u16, Running)> = session.running.drain().collect();
        for (p, r) in running {
            draining.insert(p, self.stop_partition(p, Some(r), how));
        }
    }

    /// Stops partition `p`'s consumer (if it has one) in a task of its own: it cancels the
    /// consumer, returns what was taken but not in work, waits until every event in work is settled
    /// (an abandoned lease's are refused and go back), then releases the lease for a handover.
    fn stop_partition(&self, p: u16, running: Option<Running>, how: Stop) -> Draining {
        let lease = running.as_ref().map(|r| Arc::clone(&r.lease));
        if let (Stop::Abandon, Some(lease)) = (how, &lease) {
            lease.revoke();
        }
        let (store, node, metrics) = (self.store.clone(), self.node.clone(), self.metrics.clone());
        let task = tokio::spawn(async move {
            if let Some(running) = running {
                running.stop.cancel();
                // A drain that does not end keeps the partition from this node's leases and, while
                // the partition is still this node's share, from everyone's: say so, loudly and
                // repeatedly, with what it waits for (a 30-minute checker run, seed 303, ended with
                // a partition nobody consumed; this is where to look first).
                let work = &running.work;
                let _ = super::waiting_loudly(running.task, DRAIN_REPORT_EVERY, |waited| {
                    tracing::warn!(
                        partition = p,
                        waited_secs = waited.as_secs(),
                        in_work = work.in_flight(),
                        stop = ?how,
                        "a partition's consumer is still draining"
                    );
                })
                .await;
            }
            if how == Stop::HandOver {
                match store.release_partitions(&node, &[p]).await {
                    Ok(()) => {
                        tracing::debug!(partition = p, "partition handed over");
                        metrics.partition_moved(PartitionMove::Released);
                    }
                    Err(error) => {
                        tracing::warn!(error = ?error, partition = p, "cannot release a partition; its lease will expire");
                    }
                }
            }
        });
        Draining { task, lease }
    }

    /// Ends a broker session: its partitions are abandoned (their events in work go back), its
    /// lanes get `limit` to finish (their acks may fail: the broker redelivers), then it closes.
    async fn end_session(
        &self,
        mut session: Session,
        draining: &mut HashMap<u16, Draining>,
        limit: Duration,
    ) {
        self.stop_running(&mut session, draining, Stop::Abandon);
        self.publish_owned(&[]);
        session.tasks.close();
        let _ = tokio::time::timeout(limit, session.tasks.wait()).await;
        let _ = session
            .link
            .connection
            .close(200, "worker stopping".into())
            .await;
    }
}

/// `0-3, 7, 9-10` for partitions 0, 1, 2, 3, 7, 9, 10 (sorted): a short line however many there are.
fn ranges(sorted: &[u16]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(match start == end {
            true => start.to_string(),
            false => format!("{start}-{end}"),
        });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn owned_partitions_print_as_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&(0..16).collect::<Vec<u16>>()), "0-15");
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
    }

    #[test]
    fn every_partition_has_one_node_and_shares_are_balanced() {
        for count in 1..=7 {
            let live: Vec<String> = (0..count).map(|i| format!("node-{i}")).collect();
            let mut seen = vec![0; 16];
            for me in &live {
                let mine = share(16, &live, me);
                assert!(mine.len() <= 16usize.div_ceil(count), "{me}: {mine:?}");
                for p in mine {
                    seen[usize::from(p)] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{count} nodes: {seen:?}");
        }
    }

    #[test]
    fn every_node_computes_the_same_assignment_whatever_the_order() {
        let a = nodes(&["w1", "w2", "w3"]);
        let b = nodes(&["w3", "w1", "w2"]);
        for me in &a {
            assert_eq!(share(16, &a, me), share(16, &b, me));
        }
        assert!(share(16, &a, "stranger").is_empty());
    }

    #[test]
    fn a_joining_node_takes_its_share_and_few_others_move() {
        let before = nodes(&["w1", "w2"]);
        let after = nodes(&["w1", "w2", "w3"]);
        let mut moved_between_old = 0;
        for me in ["w1", "w2"] {
            let old: BTreeSet<u16> = share(16, &before, me).into_iter().collect();
            let new: BTreeSet<u16> = share(16, &after, me).into_iter().collect();
            moved_between_old += new.difference(&old).count();
        }
        let joined = share(16, &after, "w3");
        assert!((5..=6).contains(&joined.len()), "{joined:?}");
        assert!(
            moved_between_old <= 2,
            "{moved_between_old} partitions moved between old nodes"
        );
    }
}

//! One partition's consumption on this node, and how it ends. A partition this node holds is
//! either running ([`Running`]: consumed under its lease on the session's broker connection) or
//! draining ([`Draining`]: its consumer stopping in a task of its own, so the lease loop never
//! waits for work). [`Stop`] names the two ways from the first state to the second.

use super::Coordinator;
use super::session::Session;
use crate::metrics::PartitionMove;
use crate::pipeline::lease::{Lease, trusted_for};
use crate::pipeline::worker::{ConsumerEnd, PartitionWork};
use crate::queue;
use crate::store::LeaseToken;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One partition being consumed.
pub(super) struct Running {
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<ConsumerEnd>,
    pub(super) work: Arc<PartitionWork>,
    /// The lease it is consumed under, shared with every event in work.
    pub(super) lease: Arc<Lease>,
}

/// How often a drain that has not ended says so.
const DRAIN_REPORT_EVERY: Duration = Duration::from_secs(30);

/// A partition whose consumer is stopping, in a task of its own so the lease loop never waits for
/// work: it settles (or returns) what it took, then the partition is released or left.
pub(super) struct Draining {
    pub(super) task: JoinHandle<()>,
    /// Its lease, renewed while still this node's (a handover drains under a valid lease).
    pub(super) lease: Option<Arc<Lease>>,
}

/// How a partition's consumption ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// No longer this node's share: drained under its lease, then released for the next owner,
    /// which so starts exactly where this one stopped.
    HandOver,
    /// Lost (another node holds the lease now), or no longer renewable (PostgreSQL away past the
    /// lease's trust, the broker link broken): the lease is revoked at once, so nothing more is
    /// delivered under it, and what was taken goes back to the queue; the lease is left alone.
    Abandon,
}

impl Coordinator {
    /// Consumes the partition of `token`, taken by the renewal sent at `sent`.
    pub(super) async fn start(
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
    pub(super) fn stop_running(
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
    pub(super) fn stop_partition(&self, p: u16, running: Option<Running>, how: Stop) -> Draining {
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
                let _ =
                    crate::pipeline::waiting_loudly(running.task, DRAIN_REPORT_EVERY, |waited| {
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
}

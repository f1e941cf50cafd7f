//! One check of a connected worker node, one function per step: renew membership and read the
//! live nodes, compute this node's share, renew and take leases, then make the partitions'
//! states match: abandon the lost, hand over those out of the share, start those held and
//! wanted, and report what the node consumes.

use super::Coordinator;
use super::consumption::{Draining, Stop};
use super::session::Session;
use super::share::share;
use crate::metrics::PartitionMove;
use crate::pipeline::lease::Lease;
use crate::queue::{self, Topology};
use crate::store::{self, LeaseToken};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

impl Coordinator {
    /// One check's leases: heartbeat, assignment, renewal, then make the running consumers match
    /// what this node holds and wants. Never waits for work: consumers stop in tasks of their own.
    /// Returns when the successful renewal was sent.
    pub(super) async fn reconcile(
        &self,
        session: &mut Session,
        draining: &mut HashMap<u16, Draining>,
    ) -> Result<Instant, store::Error> {
        let nodes = self.live_nodes().await?;
        let desired = share(self.settings.queue.partitions, &nodes, &self.node);
        let (held, sent) = self.renew(&desired, draining).await?;
        // Ended on their own (the stream failed): forgotten here; started again below while held.
        session.running.retain(|_, r| !r.task.is_finished());
        self.follow_leases(session, draining, &held, sent);
        self.hand_over(session, draining, &held, &desired);
        self.start_held(session, draining, &held, &desired, sent)
            .await;
        self.report_owned(session).await;
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

    /// Renews the leases this node holds and takes the free or expired ones of `desired` (but
    /// those still draining here): the leases held now, and when the renewal was sent.
    async fn renew(
        &self,
        desired: &[u16],
        draining: &HashMap<u16, Draining>,
    ) -> Result<(Vec<LeaseToken>, Instant), store::Error> {
        let wanted: Vec<u16> = desired
            .iter()
            .copied()
            .filter(|p| !draining.contains_key(p))
            .collect();
        let sent = Instant::now();
        let held = self
            .store
            .renew_and_acquire(&self.node, &wanted, self.settings.queue.partition_lease_ms)
            .await?;
        self.consuming.store(true, Ordering::Relaxed);
        Ok((held, sent))
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

    /// Reports what the node consumes now: counts and depths to the metrics, the set to readiness.
    async fn report_owned(&self, session: &Session) {
        let mut owned: Vec<u16> = session.running.keys().copied().collect();
        owned.sort_unstable();
        self.metrics.partitions_owned(owned.len());
        let in_flight: usize = session.running.values().map(|r| r.work.in_flight()).sum();
        self.metrics.worker_in_flight(in_flight as u64);
        self.sample_depths(session, &owned).await;
        self.publish_owned(&owned);
    }

    /// Tells readiness and operators which partitions this node consumes.
    pub(super) fn publish_owned(&self, owned: &[u16]) {
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

    #[test]
    fn owned_partitions_print_as_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&(0..16).collect::<Vec<u16>>()), "0-15");
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
    }
}

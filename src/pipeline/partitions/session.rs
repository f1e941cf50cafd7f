//! A worker node's broker session: everything tied to one consumer connection (its lanes, their
//! tasks, the partitions consumed on it), opened on connect and ended when the connection breaks
//! or the node stops.

use super::Coordinator;
use super::consumption::{Draining, Running, Stop};
use crate::pipeline::lanes::Lanes;
use crate::pipeline::worker::EventInWork;
use crate::queue::{self, ConsumerLink, Topology};
use crate::store::PRE_PARTITION_QUEUES_REMOVED;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// Everything tied to one broker connection.
pub(super) struct Session {
    pub(super) link: Arc<ConsumerLink>,
    pub(super) lanes: Lanes<EventInWork>,
    pub(super) tasks: TaskTracker,
    pub(super) running: HashMap<u16, Running>,
}

impl Session {
    /// True when the connection or one of its channels is gone: the session must be replaced.
    pub(super) fn broken(&self) -> bool {
        !self.link.connection.status().connected()
            || !self.link.channel.status().connected()
            || !self.link.retry_channel.status().connected()
    }
}

impl Coordinator {
    /// Connects to the broker (moving between its nodes) and builds the session's lanes.
    pub(super) async fn open_session(&self) -> Result<Session, queue::Error> {
        let queue = &self.settings.queue;
        let link = ConsumerLink::open(queue, &self.worker.retry_delays_ms, &self.nodes).await?;
        self.remove_legacy_queues_once(&link.connection).await?;
        let link = Arc::new(link);
        let names = Arc::new(Topology::new(&queue.prefix, queue.partitions));
        let tasks = TaskTracker::new();
        let lanes = self.worker.lanes(
            Arc::clone(&link),
            names,
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

    /// Ends a broker session: its partitions are abandoned (their events in work go back), its
    /// lanes get `limit` to finish (their acks may fail: the broker redelivers), then it closes.
    pub(super) async fn end_session(
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
}

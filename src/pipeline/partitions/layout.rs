//! The deployment's partition count: recorded on a fresh deployment, and switched only when the
//! old layout is empty, since a user's events must never be split over two partitions at once.
//!
//! The check reads PostgreSQL (the recorded count, the worker nodes still on the old one, the
//! outbox) and then the broker (the old layout's queues), each in a step of its own.

use crate::config::Settings;
use crate::queue;
use crate::store::{self, Layout, Store};

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
/// queues and the outbox are empty, and refuses otherwise, saying how to drain.
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
    let change = Change { wanted, running };
    let others = nodes_on_other_counts(settings, store).await?;
    if !others.is_empty() {
        return Err(change.refuse(format!(
            "worker nodes still run with the old count ({})",
            others.join(", ")
        )));
    }
    let outbox = store.messages_in_flight().await?;
    empty_old_queues(settings, &change, outbox).await?;
    store.set_partition_layout(wanted).await?;
    tracing::warn!(
        from = running,
        to = wanted,
        "partition count changed (the old partitions were empty)"
    );
    Ok(())
}

/// A change of the partition count, from the deployment's to this node's.
struct Change {
    wanted: u16,
    running: u16,
}

impl Change {
    /// The refusal, saying `why` and how to change the count safely.
    fn refuse(&self, why: String) -> LayoutError {
        let Self { wanted, running } = self;
        LayoutError::Refused(format!(
            "queue.partitions is {wanted}, but this deployment runs {running} partitions and {why}. \
             To change the count: stop the api nodes, let the worker nodes empty the partitions and \
             the delay queues, stop every node, then start them all with the new count (README, \
             \"Changing the partition count\")"
        ))
    }
}

/// The live worker nodes that run another count than this node's (PostgreSQL's membership rows).
async fn nodes_on_other_counts(
    settings: &Settings,
    store: &Store,
) -> Result<Vec<String>, store::Error> {
    let wanted = i32::from(settings.queue.partitions);
    let live = store
        .worker_heartbeat_peek(settings.queue.partition_lease_ms)
        .await?;
    Ok(live
        .into_iter()
        .filter(|(_, p)| *p != wanted)
        .map(|(name, _)| name)
        .collect())
}

/// The broker's side: refuses while the old layout's queues hold messages (or `outbox` events
/// wait to be published into them), and otherwise removes the partitions the new count drops.
async fn empty_old_queues(
    settings: &Settings,
    change: &Change,
    outbox: i64,
) -> Result<(), LayoutError> {
    let connection = queue::connect(&settings.queue, "layout-check")
        .await
        .map_err(|e| {
            change.refuse(format!(
                "RabbitMQ cannot be reached to check it is empty ({e})"
            ))
        })?;
    let prefix = &settings.queue.prefix;
    let delays = settings.retry.delays_ms();
    let waiting = queue::messages_in_layout(&connection, prefix, change.running, &delays).await;
    if !matches!(waiting, Ok(0)) || outbox > 0 {
        let _ = connection.close(200, "layout refused".into()).await;
        return Err(change.refuse(match waiting {
            Ok(waiting) => format!(
                "its queues still hold {waiting} messages ({outbox} more wait in the outbox)"
            ),
            Err(e) => format!("RabbitMQ cannot be read ({e})"),
        }));
    }
    queue::remove_partitions(&connection, prefix, change.wanted, change.running).await;
    let _ = connection.close(200, "layout checked".into()).await;
    Ok(())
}

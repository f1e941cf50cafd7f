//! RabbitMQ's section (`[queue]`): where it is, the queues Herald declares, the partitions and
//! their leases, and the publisher's bounds.

use super::Error;
use super::Secret;
use super::validate::{at_least_one, invalid};
use serde::{Deserialize, Serialize};

/// RabbitMQ.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// AMQP URL (the vhost is its path, `%2f` for `/`), or a comma-separated list of a cluster's
    /// nodes, each a URL or `host:port` taking the first's credentials and vhost: a connection
    /// whose node fails moves to the next (see `queue::nodes`).
    pub amqp_url: Secret,
    /// Prefix of every exchange and queue name, so deployments (and tests) can share a broker.
    pub prefix: String,
    /// `quorum` (replicated, the default) or `classic`.
    pub queue_type: QueueType,
    /// Replicas of each quorum queue Herald declares (`x-quorum-initial-group-size`); 0 leaves it
    /// to the broker (its `quorum_cluster_size`). On a 3-node cluster, 3: any one node may go.
    /// Applies when a queue is first declared.
    pub quorum_initial_group_size: u16,
    /// Partition queues (`<prefix>.events.<p>`): a user's events all ride the one its id hashes
    /// to. Change it only as README says (drain, then switch); a node refuses to start on a
    /// different count while the partitions hold messages.
    pub partitions: u16,
    /// The worker's demand per partition, in events: a partition's messages are taken into work
    /// only while fewer than this many of its events are in flight on the node.
    pub prefetch: u16,
    /// Most events in one broker message (a group commit's events of one partition are split
    /// beyond it). `prefetch` caps it too: a message is taken into work whole.
    pub message_max_events: usize,
    /// Most bytes in one broker message, roughly (split beyond it; one event always fits).
    pub message_max_bytes: usize,
    /// A worker node holds a partition this long without renewing: when it dies, the partition
    /// moves to a live node after at most this long.
    pub partition_lease_ms: u64,
    /// How often a worker node renews its leases and rebalances partitions over the live nodes.
    pub partition_check_ms: u64,
    /// Messages waiting to be published; when full, the outbox relay publishes them later.
    pub publish_buffer: usize,
    /// Publishes awaiting a broker confirm at once (pipelined confirms).
    pub max_inflight_confirms: usize,
    /// A confirm not received within this is treated as a failed publish (the relay retries it).
    /// Also the bound on a worker's acks and requeues, on starting and cancelling its consumers,
    /// and on each topology declaration: lapin can leave a call made as its connection breaks
    /// waiting forever.
    pub confirm_timeout_ms: u64,
    /// Timeout of one connection attempt.
    pub connect_timeout_ms: u64,
    /// Upper bound of the reconnect backoff (from 100 ms, doubling; each delay jittered by ±20%).
    pub reconnect_max_backoff_ms: u64,
}

/// The kind of queue Herald declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated over the broker's nodes (Raft).
    Quorum,
    /// One node's queue.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            amqp_url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefix: "herald".into(),
            queue_type: QueueType::Quorum,
            quorum_initial_group_size: 0,
            partitions: 16,
            prefetch: 1_000,
            message_max_events: 500,
            message_max_bytes: 256 * 1024,
            partition_lease_ms: 5_000,
            partition_check_ms: 1_000,
            publish_buffer: 10_000,
            max_inflight_confirms: 1_000,
            confirm_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            reconnect_max_backoff_ms: 5_000,
        }
    }
}

durations! {
    QueueSettings {
        connect_timeout_ms => connect_timeout,
        confirm_timeout_ms => confirm_timeout,
        reconnect_max_backoff_ms => reconnect_max_backoff,
        partition_check_ms => partition_check,
        partition_lease_ms => partition_lease,
    }
}

impl QueueSettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        crate::queue::nodes::parse_node_list(self.amqp_url.expose())
            .map_err(|why| Error::Invalid(format!("queue.amqp_url: {why}")))?;
        if self.prefetch == 0 {
            return invalid("queue.prefetch", "must be at least 1");
        }
        if !(1..=1024).contains(&self.partitions) {
            return invalid("queue.partitions", "must be 1 to 1024");
        }
        if self.partition_check_ms == 0 || self.partition_lease_ms < 3 * self.partition_check_ms {
            return invalid(
                "queue.partition_lease_ms",
                "must be at least 3 x queue.partition_check_ms (a lease outlives two missed renewals)",
            );
        }
        at_least_one(&[
            ("queue.message_max_events", self.message_max_events),
            ("queue.publish_buffer", self.publish_buffer),
            ("queue.max_inflight_confirms", self.max_inflight_confirms),
        ])
    }
}

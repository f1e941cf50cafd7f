//! The fan-out's section (`[pubsub]`): whether broadcasts stay on the node or ride RabbitMQ to
//! every socket node, and how the cross-node ones are routed and awaited.

use serde::{Deserialize, Serialize};

/// Topic fan-out.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PubSubSettings {
    /// `local`: broadcasts reach this node's sockets only (one node does everything). `cluster`:
    /// broadcasts ride RabbitMQ to every socket node with subscribers; needed by any deployment of
    /// more than one node.
    pub mode: PubSubMode,
    /// How long a join waits for its topic's binding on this node's fan-out queue.
    pub bind_timeout_ms: u64,
    /// How long a worker waits for the broker to confirm a cross-node broadcast.
    pub publish_timeout_ms: u64,
    /// Buckets a cross-node broadcast is routed by (a stable hash of its topic): a socket node's
    /// queue is bound to the buckets its clients' topics fall in, at most this many bindings
    /// however many users it holds, and drops what it receives for topics nobody joined on it.
    /// A join whose bucket is bound already needs no broker round trip. The same on every node
    /// (the fan-out exchange records it, and a node with another count is refused at start).
    pub buckets: u16,
}

impl Default for PubSubSettings {
    fn default() -> Self {
        Self {
            mode: PubSubMode::Local,
            bind_timeout_ms: 5_000,
            publish_timeout_ms: 5_000,
            buckets: 256,
        }
    }
}

/// Where broadcasts go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PubSubMode {
    /// This node's sockets only.
    Local,
    /// Every socket node, through RabbitMQ.
    Cluster,
}

impl PubSubMode {
    /// `local` or `cluster`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cluster => "cluster",
        }
    }
}

durations! {
    PubSubSettings {
        bind_timeout_ms => bind_timeout,
        publish_timeout_ms => publish_timeout,
    }
}

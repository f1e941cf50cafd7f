//! A worker node's consuming link: partition consumers with manual acks, and the confirm-mode
//! channel its retries and dead letters use.

use super::{
    BrokerNodes, Error, Topology, declare_retry_queues, declare_topology, enable_confirms,
    open_channel,
};
use crate::config::QueueSettings;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

/// Most unacked messages the broker hands one partition consumer. The worker's own demand is
/// `queue.prefetch` events per partition; this keeps enough messages on hand to fill it (a message
/// carries one to `queue.message_max_events` events) and bounds what waits in memory.
pub const PARTITION_QOS_MESSAGES: u16 = 128;

/// A worker node's link to the broker: the channel its partition consumers share, and a
/// confirm-mode channel for retries and dead letters on the same connection (if the connection
/// goes, unacked deliveries and unconfirmed retries go together, and are redelivered).
pub struct ConsumerLink {
    /// Keeps the connection open while deliveries are acked.
    pub connection: Connection,
    /// Partition consumers and their acks.
    pub channel: Channel,
    /// Retries and dead letters.
    pub retry_channel: Channel,
}

impl ConsumerLink {
    /// Connects to one of `nodes`, declares the topology (with the delay queues of
    /// `retry_delays_ms`) and opens the channels.
    ///
    /// # Errors
    /// Any step failed; the caller reconnects with backoff.
    pub async fn open(
        settings: &QueueSettings,
        retry_delays_ms: &[u64],
        nodes: &BrokerNodes,
    ) -> Result<Self, Error> {
        let connection = nodes.connect(settings, "consumer").await?;
        let channel = open_channel(&connection).await?;
        declare_topology(&channel, settings).await?;
        declare_retry_queues(&channel, settings, retry_delays_ms).await?;
        let retry_channel = open_channel(&connection).await?;
        enable_confirms(&retry_channel).await?;
        Ok(Self {
            connection,
            channel,
            retry_channel,
        })
    }

    /// Starts consuming partition `partition` with manual acks, tagged `tag`.
    ///
    /// # Errors
    /// The channel failed.
    pub async fn consume(
        &self,
        settings: &QueueSettings,
        partition: u16,
        tag: &str,
    ) -> Result<Consumer, Error> {
        let names = Topology::new(&settings.prefix, settings.partitions);
        // Applies to the consumers started after it on this channel, each on its own.
        self.channel
            .basic_qos(
                settings.prefetch.min(PARTITION_QOS_MESSAGES),
                BasicQosOptions::default(),
            )
            .await
            .map_err(Error::channel("set prefetch"))?;
        self.channel
            .basic_consume(
                names.partition_queue(partition).as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::channel("start consuming"))
    }

    /// Stops the consumer `tag`: the broker sends it nothing more (its stream ends after what was
    /// already sent), and its unacked deliveries can still be settled.
    ///
    /// # Errors
    /// The channel failed.
    pub async fn cancel(&self, tag: &str) -> Result<(), Error> {
        self.channel
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await
            .map_err(Error::channel("cancel a consumer"))
    }
}

//! A worker node's consuming link: partition consumers with manual acks, and the confirm-mode
//! channel its retries and dead letters use.

use super::{
    BrokerNodes, Error, Topology, channel_answered, declare_retry_queues, declare_topology,
    enable_confirms, open_channel,
};
use crate::config::QueueSettings;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::future::Future;
use std::time::Duration;

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
    /// Bound on each call below (`queue.confirm_timeout_ms`; see [`channel_answered`]).
    answer_timeout: Duration,
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
            answer_timeout: settings.confirm_timeout(),
        })
    }

    /// Starts consuming partition `partition` with manual acks, tagged `tag`.
    ///
    /// # Errors
    /// The channel failed, or the broker did not answer in time.
    pub async fn consume(
        &self,
        settings: &QueueSettings,
        partition: u16,
        tag: &str,
    ) -> Result<Consumer, Error> {
        let names = Topology::new(&settings.prefix, settings.partitions);
        // Applies to the consumers started after it on this channel, each on its own.
        let qos = self.channel.basic_qos(
            settings.prefetch.min(PARTITION_QOS_MESSAGES),
            BasicQosOptions::default(),
        );
        self.answered("set prefetch", qos).await?;
        let consume = self.channel.basic_consume(
            names.partition_queue(partition).as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        self.answered("start consuming", consume).await
    }

    /// Stops the consumer `tag`: the broker sends it nothing more (its stream ends after what was
    /// already sent), and its unacked deliveries can still be settled.
    ///
    /// # Errors
    /// The channel failed, or the broker did not answer in time.
    pub async fn cancel(&self, tag: &str) -> Result<(), Error> {
        let cancel = self
            .channel
            .basic_cancel(tag.into(), BasicCancelOptions::default());
        self.answered("cancel a consumer", cancel).await
    }

    /// `call`'s answer, within the link's answer timeout.
    async fn answered<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, Error> {
        channel_answered(what, self.answer_timeout, call).await
    }
}

/// How a consumed message is let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Done with: the broker forgets it.
    Ack,
    /// Back to its queue's head, for the next consumer.
    Requeue,
    /// Refused for good: dead-lettered by the queue.
    Reject,
}

/// Why a message could not be settled. Either way it stays unacked on its channel, and the broker
/// redelivers it when that channel closes.
#[derive(Debug, thiserror::Error)]
pub enum Unsettled {
    /// The channel or connection failed.
    #[error("the channel failed")]
    Lost(#[source] lapin::Error),
    /// lapin refused before sending: the channel is closed, or the message was settled before.
    #[error("the channel is closed, or the message was settled before")]
    Unusable,
    /// lapin did not report the frame sent within the limit.
    #[error("not sent within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// Settles `delivery` as `how` says, waiting at most `limit`. The bound is not for the broker (an
/// ack has no answer): lapin can leave an ack queued just as its connection breaks waiting forever,
/// and whatever waits on it with it (a partition's drain waits for every event in work, so a worker
/// that failed over to the next broker node never consumed that partition again). A message whose
/// connection is gone is redelivered anyway, so giving up the wait loses nothing.
///
/// # Errors
/// The channel failed, or the settle was not sent within `limit`.
pub async fn settle(
    delivery: &Delivery,
    how: Settlement,
    limit: Duration,
) -> Result<(), Unsettled> {
    let sent = tokio::time::timeout(limit, async {
        match how {
            Settlement::Ack => delivery.ack(BasicAckOptions::default()).await,
            Settlement::Requeue | Settlement::Reject => {
                let requeue = how == Settlement::Requeue;
                let options = BasicNackOptions {
                    requeue,
                    ..BasicNackOptions::default()
                };
                delivery.nack(options).await
            }
        }
    })
    .await;
    match sent {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(Unsettled::Unusable),
        Ok(Err(error)) => Err(Unsettled::Lost(error)),
        Err(_) => Err(Unsettled::Timeout(limit)),
    }
}

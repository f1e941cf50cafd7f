//! RabbitMQ: the topology Herald declares, the publisher (persistent messages, pipelined confirms) and
//! the consumer (manual acks, prefetch as demand).
//!
//! The broker may be down at any moment: nothing here panics or gives up on a lost connection. The
//! publisher reconnects with backoff and reports what was confirmed; what was not stays unpublished in
//! PostgreSQL for the outbox relay. Depends on no other Herald module.

pub mod fanout;
pub mod nodes;
mod publisher;

pub use nodes::BrokerNodes;
pub use publisher::{OutgoingMessage, Publisher, PublisherEvent, PublisherHandle, Source};

use crate::config::{QueueSettings, QueueType};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::time::Duration;

/// A RabbitMQ failure, named for what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection within the timeout.
    #[error("cannot connect to RabbitMQ")]
    Connect(#[source] lapin::Error),
    /// The connection attempt timed out.
    #[error("connecting to RabbitMQ timed out")]
    ConnectTimeout,
    /// Declaring exchanges, queues or bindings failed.
    #[error("cannot declare the topology ({what})")]
    Topology {
        /// What was being declared.
        what: String,
        /// Why.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused a message.
    #[error("RabbitMQ refused the message")]
    Nacked,
    /// A publish was not confirmed in time.
    #[error("RabbitMQ did not confirm in time")]
    ConfirmTimeout,
    /// Opening a channel or starting to consume failed.
    #[error("cannot {what}")]
    Channel {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: lapin::Error,
    },
}

/// The names of everything Herald declares, all under one prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    /// How many partition queues there are.
    pub partitions: u16,
    /// Where rejected (dead) events go.
    pub dead_letter_exchange: String,
    /// The queue holding dead events for operators.
    pub dead_letter_queue: String,
    /// A headers exchange routing a message to the partition queue its [`PARTITION_HEADER`]
    /// names: how a retry finds its way back from a delay queue.
    pub partition_exchange: String,
}

impl Topology {
    /// Names for `prefix` with `partitions` partition queues.
    pub fn new(prefix: &str, partitions: u16) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions,
            dead_letter_exchange: format!("{prefix}.dead"),
            dead_letter_queue: format!("{prefix}.events.dead"),
            partition_exchange: format!("{prefix}.partitions"),
        }
    }

    /// The queue of partition `p`: `<prefix>.events.<p>`.
    pub fn partition_queue(&self, p: u16) -> String {
        format!("{}.events.{p}", self.prefix)
    }

    /// The single events queue of Herald before partitions (removed at start, see
    /// [`remove_legacy_queues`]).
    pub fn legacy_events_queue(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The delay queue for retries after `delay_ms`: no consumer; its messages expire back into
    /// their partition queue.
    pub fn delay_queue(&self, delay_ms: u64) -> String {
        format!("{}.delay.{delay_ms}ms", self.prefix)
    }
}

/// The header carrying which attempt a delivery is (1 when absent: a first publish or a replay).
pub const ATTEMPT_HEADER: &str = "x-herald-attempt";

/// The header naming a retry's partition (as a decimal string), which routes it back from its
/// delay queue through the partition exchange. Not `x-`: a headers exchange ignores binding keys
/// starting with `x-` (unless bound with `x-match: all-with-x`), and every partition would match.
pub const PARTITION_HEADER: &str = "herald-partition";

/// The attempt number a delivery carries in [`ATTEMPT_HEADER`]; 1 when absent or unreadable.
pub fn attempt_of(properties: &lapin::BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(ATTEMPT_HEADER).cloned());
    let n: Option<i64> = match value {
        Some(AMQPValue::LongLongInt(n)) => Some(n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(n)),
        Some(AMQPValue::LongUInt(n)) => Some(i64::from(n)),
        Some(AMQPValue::ShortInt(n)) => Some(i64::from(n)),
        Some(AMQPValue::ShortUInt(n)) => Some(i64::from(n)),
        Some(AMQPValue::ShortShortInt(n)) => Some(i64::from(n)),
        Some(AMQPValue::ShortShortUInt(n)) => Some(i64::from(n)),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Declares one delay queue per retry delay. Each has no consumer: a message published to it with
/// a per-message expiration (the jittered delay) is dead-lettered, when it expires, to the
/// partition exchange, which routes it by its [`PARTITION_HEADER`] back into its partition queue.
/// Quorum delay queues dead-letter at-least-once, so a retry is never lost between the queues.
///
/// # Errors
/// A declaration failed (e.g. an existing queue with other arguments).
pub async fn declare_retry_queues(
    channel: &Channel,
    settings: &QueueSettings,
    delays_ms: &[u64],
) -> Result<(), Error> {
    let names = Topology::new(&settings.prefix, settings.partitions);
    for &delay in delays_ms {
        let queue = names.delay_queue(delay);
        let mut args = queue_arguments(settings, Some(&names.partition_exchange));
        if settings.queue_type == QueueType::Quorum {
            // At-least-once dead-lettering needs reject-publish overflow; no length limit is set,
            // so nothing is ever rejected.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        declare_queue(channel, &queue, args).await?;
    }
    Ok(())
}

/// Deletes the delay queues of `delays_ms` (tests and `herald destroy` clean up with it).
///
/// # Errors
/// The broker is unreachable.
pub async fn delete_retry_queues(settings: &QueueSettings, delays_ms: &[u64]) -> Result<(), Error> {
    let connection = connect(settings, "cleanup").await?;
    let channel = open_channel(&connection).await?;
    let names = Topology::new(&settings.prefix, settings.partitions);
    for &delay in delays_ms {
        let queue = names.delay_queue(delay);
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "cleanup done".into()).await;
    Ok(())
}

/// Why a retry or a dead letter could not be published.
#[derive(Debug, thiserror::Error)]
pub enum RetryPublishError {
    /// The channel or connection failed: the delivery will be redelivered.
    #[error("cannot publish the retry")]
    Lost(#[source] lapin::Error),
    /// The broker refused it (nack, unroutable).
    #[error("the broker did not take the retry ({0})")]
    Refused(&'static str),
    /// No confirm came in time: the broker may or may not have it.
    #[error("the broker did not confirm the retry in time")]
    Timeout,
}

/// A retry to publish: one event, bound for a delay queue.
#[derive(Debug)]
pub struct RetryMessage<'a> {
    /// The scheduled delay: names the delay queue.
    pub delay_ms: u64,
    /// The jittered delay: the message's expiration in that queue.
    pub expiration_ms: u64,
    /// The attempt it comes back as.
    pub attempt: u32,
    /// The partition it comes back to.
    pub partition: u16,
    /// The event id.
    pub message_id: &'a str,
    /// The event as a message of one.
    pub body: &'a [u8],
}

/// Publishes `retry` to its delay queue and waits for the broker's confirm (`channel` is in
/// confirm mode). Concurrent calls pipeline their confirms on the one channel.
///
/// # Errors
/// Lost channel, nack or unroutable ([`RetryPublishError::Refused`]), or no confirm in time
/// ([`RetryPublishError::Timeout`]).
pub async fn publish_retry(
    channel: &Channel,
    names: &Topology,
    retry: &RetryMessage<'_>,
    confirm_timeout: Duration,
) -> Result<(), RetryPublishError> {
    let mut headers = FieldTable::default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(retry.attempt)),
    );
    headers.insert(
        PARTITION_HEADER.into(),
        AMQPValue::LongString(retry.partition.to_string().into()),
    );
    let properties = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(retry.message_id.into())
        .with_expiration(retry.expiration_ms.max(1).to_string().into())
        .with_headers(headers);
    let queue = names.delay_queue(retry.delay_ms);
    publish_confirmed(channel, "", &queue, retry.body, properties, confirm_timeout).await
}

/// Publishes one event that failed for good into the dead-letter exchange (`channel` is in
/// confirm mode), where operators find it; waits for the confirm.
///
/// # Errors
/// Lost channel, nack, unroutable or confirm timeout.
pub async fn publish_dead_letter(
    channel: &Channel,
    names: &Topology,
    message_id: &str,
    body: &[u8],
    confirm_timeout: Duration,
) -> Result<(), RetryPublishError> {
    let properties = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into());
    let exchange = names.dead_letter_exchange.as_str();
    publish_confirmed(channel, exchange, "", body, properties, confirm_timeout).await
}

async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
    confirm_timeout: Duration,
) -> Result<(), RetryPublishError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(RetryPublishError::Lost)?;
    match confirmed(confirm, confirm_timeout).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(RetryPublishError::Refused("unroutable")),
        Err(Unconfirmed::Nacked) => Err(RetryPublishError::Refused("nack")),
        Err(Unconfirmed::Timeout) => Err(RetryPublishError::Timeout),
        Err(Unconfirmed::Lost(error)) => Err(RetryPublishError::Lost(error)),
    }
}

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum Unconfirmed {
    /// The channel or connection failed first: the broker may or may not have the message.
    #[error("the channel failed before the broker confirmed")]
    Lost(#[source] lapin::Error),
    /// The broker refused the message.
    #[error("RabbitMQ refused the message")]
    Nacked,
    /// No confirm came in time: the broker may or may not have the message.
    #[error("RabbitMQ did not confirm the message in time")]
    Timeout,
}

/// Waits up to `limit` for the broker's confirm of a publish on a confirm-mode channel. Resolves to
/// whether a queue took the message: a mandatory publish that no queue binds comes back, acked.
/// The one confirm wait of the publisher, the fan-out publisher and retries.
///
/// # Errors
/// The channel failed, the broker nacked, or no confirm came within `limit`.
pub async fn confirmed(
    confirm: lapin::PublisherConfirm,
    limit: Duration,
) -> Result<bool, Unconfirmed> {
    match tokio::time::timeout(limit, confirm).await {
        Err(_) => Err(Unconfirmed::Timeout),
        Ok(Err(error)) => Err(Unconfirmed::Lost(error)),
        Ok(Ok(confirmation)) if confirmation.is_nack() => Err(Unconfirmed::Nacked),
        Ok(Ok(confirmation)) => Ok(confirmation.take_message().is_none()),
    }
}

/// Connects to the first node of `queue.amqp_url` that answers (see [`BrokerNodes`]), each with a
/// timeout: for short-lived connections (checks, cleanup). Each long-lived role (publisher,
/// consumer, fan-out) has its own connection, and its own [`BrokerNodes`] to move between nodes,
/// so flow control on a publishing connection never stalls consumption.
///
/// # Errors
/// No node reachable, refused credentials, or the timeout.
pub async fn connect(settings: &QueueSettings, role: &str) -> Result<Connection, Error> {
    BrokerNodes::new(settings).connect(settings, role).await
}

/// Connects to the node at `url` with a timeout.
async fn connect_url(url: &str, settings: &QueueSettings, role: &str) -> Result<Connection, Error> {
    // The prefix in the name lets an operator (or a test sharing the broker) find this
    // deployment's connections, e.g. to close only those with `rabbitmqctl close_connection`.
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("herald-{}-{role}", settings.prefix).into());
    let attempt = Connection::connect(url, properties);
    match tokio::time::timeout(Duration::from_millis(settings.connect_timeout_ms), attempt).await {
        Ok(result) => result.map_err(Error::Connect),
        Err(_) => Err(Error::ConnectTimeout),
    }
}

/// Opens a channel on `connection`.
///
/// # Errors
/// The connection is gone.
pub async fn open_channel(connection: &Connection) -> Result<Channel, Error> {
    connection
        .create_channel()
        .await
        .map_err(|source| Error::Channel {
            what: "open a channel",
            source,
        })
}

/// Turns on publisher confirms: from now on the broker acknowledges each publish once it is safe.
///
/// # Errors
/// The channel failed.
pub async fn enable_confirms(channel: &Channel) -> Result<(), Error> {
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(|source| Error::Channel {
            what: "enable publisher confirms",
            source,
        })
}

/// Declares the topology; idempotent, run on every (re)connect of every role: the dead-letter
/// exchange and queue, the partition exchange, and the partition queues, each a single-active-
/// consumer queue bound to the partition exchange by its number.
///
/// # Errors
/// A declaration failed (e.g. an existing queue with other arguments).
pub async fn declare_topology(channel: &Channel, settings: &QueueSettings) -> Result<(), Error> {
    let names = Topology::new(&settings.prefix, settings.partitions);
    declare_exchange(channel, &names.dead_letter_exchange, ExchangeKind::Fanout).await?;
    declare_queue(
        channel,
        &names.dead_letter_queue,
        queue_arguments(settings, None),
    )
    .await?;
    bind(
        channel,
        &names.dead_letter_queue,
        &names.dead_letter_exchange,
        FieldTable::default(),
    )
    .await?;
    declare_exchange(channel, &names.partition_exchange, ExchangeKind::Headers).await?;
    for p in 0..names.partitions {
        let queue = names.partition_queue(p);
        let mut args = queue_arguments(settings, Some(&names.dead_letter_exchange));
        // The broker's fence: at most one consumer of a partition is active at any moment, so no
        // two worker nodes ever deliver one user's events at once, whatever they believe about
        // their leases.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        declare_queue(channel, &queue, args).await?;
        let mut binding = FieldTable::default();
        binding.insert("x-match".into(), AMQPValue::LongString("all".into()));
        binding.insert(
            PARTITION_HEADER.into(),
            AMQPValue::LongString(p.to_string().into()),
        );
        bind(channel, &queue, &names.partition_exchange, binding).await?;
    }
    Ok(())
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<(), Error> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| Error::Topology {
            what: name.to_owned(),
            source,
        })
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), durable, args)
        .await
        .map(|_| ())
        .map_err(|source| Error::Topology {
            what: name.to_owned(),
            source,
        })
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    args: FieldTable,
) -> Result<(), Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .map_err(|source| Error::Topology {
            what: format!("binding of {queue}"),
            source,
        })
}

fn queue_arguments(settings: &QueueSettings, dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum queues replicate and survive a broker node's loss; classic is for single-node setups.
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(settings.queue_type.as_str().into()),
    );
    if settings.queue_type == QueueType::Quorum && settings.quorum_initial_group_size > 0 {
        // Replicas over the cluster's nodes: with 3 on 3 nodes, any one node may be lost.
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(i32::from(settings.quorum_initial_group_size)),
        );
    }
    if let Some(exchange) = dead_letter_exchange {
        // A message nacked without requeue (undecodable) or expired (a retry) goes here.
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.into()),
        );
    }
    args
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404
    )
}

/// How many messages wait (ready, not handed to a consumer) in `queue`; `None` when it does not
/// exist. Each probe uses a channel of its own, since a missing queue closes the channel.
///
/// # Errors
/// The broker is unreachable.
pub async fn ready_messages(connection: &Connection, queue: &str) -> Result<Option<u32>, Error> {
    let counts = ready_counts(connection, &[queue.to_owned()]).await?;
    Ok(counts.into_iter().next().flatten())
}

/// How many messages wait (ready) in each of `queues`, in order; `None` for one that does not
/// exist. One channel serves every probe until a missing queue closes it (then a new one is
/// opened), so sampling all partitions costs a round trip each, not a channel each.
///
/// # Errors
/// The broker is unreachable.
pub async fn ready_counts(
    connection: &Connection,
    queues: &[String],
) -> Result<Vec<Option<u32>>, Error> {
    let mut counts = Vec::with_capacity(queues.len());
    let mut channel: Option<Channel> = None;
    for queue in queues {
        let probe = match &channel {
            Some(open) => open,
            None => channel.insert(open_channel(connection).await?),
        };
        let probed = probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match probed {
            Ok(declared) => counts.push(Some(declared.message_count())),
            Err(error) if is_not_found(&error) => {
                counts.push(None);
                channel = None;
            }
            Err(source) => {
                return Err(Error::Channel {
                    what: "probe a queue",
                    source,
                });
            }
        }
    }
    if let Some(open) = channel {
        let _ = open.close(200, "probe done".into()).await;
    }
    Ok(counts)
}

/// Ready messages per partition queue for operators (the console), read from the broker on a
/// connection of its own, opened on first use: a node whose console is never opened never opens
/// it. One probe runs at a time and its answer serves every caller for [`DepthProbe::FRESH`], so
/// any number of open consoles cost one round of probes per second.
pub struct DepthProbe {
    settings: QueueSettings,
    state: tokio::sync::Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    connection: Option<Connection>,
    last: Option<(tokio::time::Instant, Vec<Option<u32>>)>,
}

impl DepthProbe {
    /// How long one reading is served again.
    pub const FRESH: Duration = Duration::from_secs(1);

    /// A probe of the partition queues of `settings`.
    pub fn new(settings: QueueSettings) -> Self {
        Self {
            settings,
            state: tokio::sync::Mutex::new(ProbeState::default()),
        }
    }

    /// Ready messages in each partition queue, by partition (`None`: the queue does not exist).
    ///
    /// # Errors
    /// The broker is unreachable (the connection is opened again next time).
    pub async fn partitions(&self) -> Result<Vec<Option<u32>>, Error> {
        // Held across the probe on purpose: callers meanwhile wait for its answer instead of
        // probing again.
        let mut state = self.state.lock().await;
        if let Some((at, counts)) = &state.last
            && at.elapsed() < Self::FRESH
        {
            return Ok(counts.clone());
        }
        let connection = match state.connection.take() {
            Some(open) if open.status().connected() => open,
            _ => connect(&self.settings, "probe").await?,
        };
        let names = Topology::new(&self.settings.prefix, self.settings.partitions);
        let queues: Vec<String> = (0..self.settings.partitions)
            .map(|p| names.partition_queue(p))
            .collect();
        let limit = Duration::from_millis(self.settings.connect_timeout_ms);
        let counts = match tokio::time::timeout(limit, ready_counts(&connection, &queues)).await {
            Ok(counts) => counts?,
            Err(_) => return Err(Error::ConnectTimeout),
        };
        state.connection = Some(connection);
        state.last = Some((tokio::time::Instant::now(), counts.clone()));
        Ok(counts)
    }

    /// Closes the probe's connection, if it opened one.
    pub async fn close(&self) {
        if let Some(connection) = self.state.lock().await.connection.take() {
            let _ = connection.close(200, "node stopping".into()).await;
        }
    }
}

/// Deletes the queues of the layout before partitions if they exist: the events queue
/// (`<prefix>.events`) and the delay queues of `delays_ms` that expired into it
/// (`<prefix>.retry.<ms>ms`). What they held is in the outbox since the partitions migration, and
/// the relay republishes it into the partitions.
///
/// # Errors
/// The broker is unreachable.
pub async fn remove_legacy_queues(
    connection: &Connection,
    settings: &QueueSettings,
    delays_ms: &[u64],
) -> Result<(), Error> {
    let names = Topology::new(&settings.prefix, settings.partitions);
    let mut legacy = vec![names.legacy_events_queue()];
    legacy.extend(
        delays_ms
            .iter()
            .map(|ms| format!("{}.retry.{ms}ms", settings.prefix)),
    );
    for queue in legacy {
        if ready_messages(connection, &queue).await?.is_none() {
            continue;
        }
        let channel = open_channel(connection).await?;
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(|source| Error::Channel {
                what: "delete a queue of the pre-partition layout",
                source,
            })?;
        let _ = channel.close(200, "done".into()).await;
        tracing::warn!(queue = %queue, "deleted a queue of the pre-partition layout; the outbox relay republishes what it held");
    }
    Ok(())
}

/// Deletes every queue and exchange of the topology (tests and benchmarks clean up with it).
///
/// # Errors
/// The broker is unreachable.
pub async fn delete_topology(settings: &QueueSettings) -> Result<(), Error> {
    let connection = connect(settings, "cleanup").await?;
    let channel = open_channel(&connection).await?;
    let names = Topology::new(&settings.prefix, settings.partitions);
    let mut queues: Vec<String> = (0..names.partitions)
        .map(|p| names.partition_queue(p))
        .collect();
    queues.push(names.dead_letter_queue.clone());
    queues.push(names.legacy_events_queue());
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        names.dead_letter_exchange,
        names.partition_exchange,
        fanout::exchange_name(&settings.prefix),
    ] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "cleanup done".into()).await;
    Ok(())
}

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
            .map_err(|source| Error::Channel {
                what: "set prefetch",
                source,
            })?;
        self.channel
            .basic_consume(
                names.partition_queue(partition).as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| Error::Channel {
                what: "start consuming",
                source,
            })
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
            .map_err(|source| Error::Channel {
                what: "cancel a consumer",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix() {
        let t = Topology::new("test_1", 4);
        assert_eq!(t.partition_queue(3), "test_1.events.3");
        assert_eq!(t.dead_letter_queue, "test_1.events.dead");
        assert_eq!(t.delay_queue(500), "test_1.delay.500ms");
        assert_eq!(t.partition_exchange, "test_1.partitions");
    }

    #[test]
    fn the_attempt_header_reads_any_integer_and_defaults_to_one() {
        let with = |value: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert(ATTEMPT_HEADER.into(), value);
            lapin::BasicProperties::default().with_headers(headers)
        };
        assert_eq!(attempt_of(&lapin::BasicProperties::default()), 1);
        assert_eq!(attempt_of(&with(AMQPValue::LongLongInt(3))), 3);
        assert_eq!(attempt_of(&with(AMQPValue::LongInt(2))), 2);
        assert_eq!(attempt_of(&with(AMQPValue::LongLongInt(-4))), 1);
        assert_eq!(attempt_of(&with(AMQPValue::LongString("x".into()))), 1);
    }
}

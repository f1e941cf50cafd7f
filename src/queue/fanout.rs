//! Cross-node fan-out over RabbitMQ: a direct exchange keyed by bucket (`{prefix}.fanout.buckets`,
//! a broadcast's routing key is the bucket of its topic, see [`bucket_key_of`]), a publisher of
//! broadcasts with confirms, and each socket node's own exclusive queue, bound to the buckets its
//! clients' topics fall in. Bindings so stay at most the bucket count per node, however many users
//! it holds; the node drops what arrives for topics nobody joined on it.
//!
//! One message may carry the broadcasts of several buckets: its routing key is the first bucket's
//! and the others ride in its `CC` header (RabbitMQ's sender-selected distribution), so the broker
//! routes it to every node bound to any of them, once per node.
//!
//! A message is published `mandatory`: when no node binds any of its buckets the broker returns it,
//! which tells the worker "nobody online" without counting sockets across nodes. The node queue is
//! exclusive and auto-deleted, so a dead node leaves nothing behind; its clients reconnect elsewhere
//! and catch up from PostgreSQL.
//!
//! Every node must route by the same bucket count: PostgreSQL records the deployment's
//! (`deployment_settings`), and a node with another refuses to start (see `App::build`).

use super::{
    BrokerNodes, Error, Unconfirmed, channel_answered, confirmed, enable_confirms, open_channel,
};
use crate::config::QueueSettings;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer, ExchangeKind};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The fan-out exchange of `prefix`.
pub fn exchange_name(prefix: &str) -> String {
    format!("{prefix}.fanout.buckets")
}

/// The exchange of the fan-out before buckets (routed by topic), for `herald destroy`.
pub fn legacy_exchange_name(prefix: &str) -> String {
    format!("{prefix}.fanout")
}

/// The routing key of bucket `bucket`.
pub fn bucket_key_of(bucket: u16) -> String {
    format!("b{bucket}")
}

async fn declare_exchange(channel: &Channel, prefix: &str) -> Result<(), Error> {
    let name = exchange_name(prefix);
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| Error::Topology { what: name, source })
}

/// Publishes fan-out messages: [`Self::send`] one after another (they reach the broker in that
/// order), each message's confirm awaited apart ([`Self::confirmed`]). Reconnects lazily after a
/// failure.
pub struct FanoutPublisher {
    settings: QueueSettings,
    /// This node's name, sent as each broadcast's `app_id`: the node's own queue drops its own.
    origin: String,
    link: Mutex<Link>,
    nodes: BrokerNodes,
}

/// The publisher's connection and channel, if open, and which one it is: a failure seen on an
/// older link (a confirm that was still out when the link was replaced) must not drop the new one.
#[derive(Default)]
struct Link {
    open: Option<(Connection, Channel)>,
    generation: u64,
}

/// A fan-out message the broker has been sent, its confirm still to come.
pub struct Sent {
    confirm: lapin::PublisherConfirm,
    generation: u64,
    deadline: Instant,
}

impl FanoutPublisher {
    /// A publisher that connects on first use, for node `origin`.
    pub fn new(settings: QueueSettings, origin: String) -> Self {
        Self {
            nodes: BrokerNodes::new(&settings),
            settings,
            origin,
            link: Mutex::new(Link::default()),
        }
    }

    /// The broker nodes it moves between, and the one it uses.
    pub fn broker_nodes(&self) -> BrokerNodes {
        self.nodes.clone()
    }

    /// The open channel and its link's generation, connecting first if there is none.
    async fn channel(&self) -> Result<(u64, Channel), Error> {
        let mut link = self.link.lock().await;
        if let Some((_, channel)) = link.open.as_ref()
            && channel.status().connected()
        {
            return Ok((link.generation, channel.clone()));
        }
        let connection = self
            .nodes
            .connect(
                &self.settings,
                &format!("{}-fanout-publisher", self.settings.prefix),
            )
            .await?;
        // Connecting is bounded node by node (and moves on to the next); the channel's setup on the
        // new connection is bounded here, so a wedged one cannot hold up every message after it.
        let setup = async {
            let channel = open_channel(&connection).await?;
            declare_exchange(&channel, &self.settings.prefix).await?;
            enable_confirms(&channel).await?;
            Ok::<_, Error>(channel)
        };
        let channel = tokio::time::timeout(self.settings.confirm_timeout(), setup)
            .await
            .map_err(|_| Error::NoAnswer("set up the fan-out publisher's channel".into()))??;
        link.open = Some((connection, channel.clone()));
        link.generation += 1;
        Ok((link.generation, channel))
    }

    /// Forgets link `generation` after a failure on it (the channel may be dead or wedged): the
    /// next send opens a new one. A newer link stays.
    async fn failed_on(&self, generation: u64) {
        let mut link = self.link.lock().await;
        if link.generation == generation {
            link.open = None;
        }
    }

    /// Sends `body` to bucket `bucket` (its routing key) and to the buckets `cc` (its `CC` header),
    /// by `deadline`; returns once the broker has been sent it, its confirm to be awaited with
    /// [`Self::confirmed`].
    ///
    /// # Errors
    /// The broker is unreachable, or the send did not go out by `deadline`.
    pub async fn send(
        &self,
        bucket: u16,
        cc: &[u16],
        body: &[u8],
        deadline: Instant,
    ) -> Result<Sent, Error> {
        let (generation, channel) = self.channel().await?;
        let exchange = exchange_name(&self.settings.prefix);
        // Transient: a broadcast that misses its moment is caught up from PostgreSQL.
        let mut properties = BasicProperties::default().with_app_id(self.origin.as_str().into());
        if !cc.is_empty() {
            let keys: Vec<AMQPValue> = cc
                .iter()
                .map(|&bucket| AMQPValue::LongString(bucket_key_of(bucket).into()))
                .collect();
            let mut headers = FieldTable::default();
            headers.insert("CC".into(), AMQPValue::FieldArray(FieldArray::from(keys)));
            properties = properties.with_headers(headers);
        }
        let publish = channel.basic_publish(
            exchange.as_str().into(),
            bucket_key_of(bucket).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        );
        let error = match tokio::time::timeout_at(deadline, publish).await {
            Ok(Ok(confirm)) => {
                return Ok(Sent {
                    confirm,
                    generation,
                    deadline,
                });
            }
            Ok(Err(source)) => Error::channel("publish a broadcast")(source),
            Err(_) => Error::ConfirmTimeout,
        };
        self.failed_on(generation).await;
        Err(error)
    }

    /// Waits for the confirm of `sent` until its deadline; resolves to whether any node binds any
    /// of its buckets (a `mandatory` message no queue takes comes back).
    ///
    /// # Errors
    /// The broker refused the message, the channel failed, or no confirm came in time.
    pub async fn confirmed(&self, sent: Sent) -> Result<bool, Error> {
        let left = sent.deadline.saturating_duration_since(Instant::now());
        let error = match confirmed(sent.confirm, left).await {
            Ok(routed) => return Ok(routed),
            Err(Unconfirmed::Nacked) => return Err(Error::Nacked),
            Err(Unconfirmed::Timeout) => Error::ConfirmTimeout,
            Err(Unconfirmed::Lost(source)) => Error::channel("publish a broadcast")(source),
        };
        self.failed_on(sent.generation).await;
        Err(error)
    }
}

/// A socket node's fan-out queue and its delivery stream.
pub struct NodeQueue {
    /// Keeps the connection (and so the exclusive queue) alive.
    pub connection: Connection,
    /// Bindings are made on this channel.
    pub channel: Channel,
    /// The server-named queue.
    pub queue: String,
    /// Broadcasts for the bound topics (no acks: a missed broadcast is caught up from PostgreSQL).
    pub consumer: Consumer,
    exchange: String,
    /// How long a bind or unbind may wait for its answer (`queue.confirm_timeout_ms`): the loop
    /// that binds also consumes, so a wedged channel must not hold up every broadcast and join.
    answer_timeout: std::time::Duration,
}

impl NodeQueue {
    /// Connects to one of `nodes`, declares the exchange and an exclusive auto-delete queue, and
    /// starts consuming.
    ///
    /// # Errors
    /// Any step failed; the caller reconnects with backoff.
    pub async fn open(
        settings: &QueueSettings,
        node: &str,
        nodes: &BrokerNodes,
    ) -> Result<Self, Error> {
        let connection = nodes
            .connect(settings, &format!("{}-fanout-{node}", settings.prefix))
            .await?;
        // Connecting is bounded node by node; the setup on the new connection is bounded here.
        let setup = Self::set_up(&connection, settings, node);
        let (channel, queue, consumer) = tokio::time::timeout(settings.confirm_timeout(), setup)
            .await
            .map_err(|_| Error::NoAnswer("set up the node fan-out queue".into()))??;
        Ok(Self {
            connection,
            channel,
            queue,
            consumer,
            exchange: exchange_name(&settings.prefix),
            answer_timeout: settings.confirm_timeout(),
        })
    }

    /// On a new connection: the exchange, an exclusive server-named queue, and its consumer.
    async fn set_up(
        connection: &Connection,
        settings: &QueueSettings,
        node: &str,
    ) -> Result<(Channel, String, Consumer), Error> {
        let channel = open_channel(connection).await?;
        declare_exchange(&channel, &settings.prefix).await?;
        let declared = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| Error::Topology {
                what: "node fan-out queue".into(),
                source,
            })?;
        let queue = declared.name().to_string();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("herald-fanout-{node}").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(Error::channel("consume the node fan-out queue"))?;
        Ok((channel, queue, consumer))
    }

    /// Receives broadcasts of bucket `bucket` from now on.
    ///
    /// # Errors
    /// The channel failed, or did not answer within `queue.confirm_timeout_ms`.
    pub async fn bind(&self, bucket: u16) -> Result<(), Error> {
        let call = self.channel.queue_bind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            bucket_key_of(bucket).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        channel_answered("bind a bucket", self.answer_timeout, call).await
    }

    /// Stops receiving broadcasts of bucket `bucket`.
    ///
    /// # Errors
    /// The channel failed, or did not answer within `queue.confirm_timeout_ms`.
    pub async fn unbind(&self, bucket: u16) -> Result<(), Error> {
        let call = self.channel.queue_unbind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            bucket_key_of(bucket).as_str().into(),
            FieldTable::default(),
        );
        channel_answered("unbind a bucket", self.answer_timeout, call).await
    }
}

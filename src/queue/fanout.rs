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

use super::{BrokerNodes, Error, Unconfirmed, enable_confirms, open_channel, publish_and_confirm};
use crate::config::QueueSettings;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer, ExchangeKind};
use std::time::Duration;
use tokio::sync::Mutex;

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

/// Publishes fan-out messages; shared (publishes on one channel are pipelined, each caller
/// awaiting its own confirm). Reconnects lazily after a failure.
pub struct FanoutPublisher {
    settings: QueueSettings,
    /// This node's name, sent as each broadcast's `app_id`: the node's own queue drops its own.
    origin: String,
    link: Mutex<Option<(Connection, Channel)>>,
    nodes: BrokerNodes,
}

impl FanoutPublisher {
    /// A publisher that connects on first use, for node `origin`.
    pub fn new(settings: QueueSettings, origin: String) -> Self {
        Self {
            nodes: BrokerNodes::new(&settings),
            settings,
            origin,
            link: Mutex::new(None),
        }
    }

    /// The broker nodes it moves between, and the one it uses.
    pub fn broker_nodes(&self) -> BrokerNodes {
        self.nodes.clone()
    }

    async fn channel(&self) -> Result<Channel, Error> {
        let mut link = self.link.lock().await;
        if let Some((_, channel)) = link.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let connection = self
            .nodes
            .connect(
                &self.settings,
                &format!("{}-fanout-publisher", self.settings.prefix),
            )
            .await?;
        let channel = open_channel(&connection).await?;
        declare_exchange(&channel, &self.settings.prefix).await?;
        enable_confirms(&channel).await?;
        *link = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes `body` to the buckets `buckets` (the first is the routing key, the others go in
    /// `CC`); resolves to whether any node binds any of them (false for no bucket at all).
    ///
    /// # Errors
    /// The broker is unreachable, refused the message, or did not confirm within `limit`.
    pub async fn publish(
        &self,
        buckets: &[u16],
        body: &[u8],
        limit: Duration,
    ) -> Result<bool, Error> {
        let Some((&first, others)) = buckets.split_first() else {
            return Ok(false);
        };
        let channel = self.channel().await?;
        let exchange = exchange_name(&self.settings.prefix);
        // Transient: a broadcast that misses its moment is caught up from PostgreSQL.
        let mut properties = BasicProperties::default().with_app_id(self.origin.as_str().into());
        if !others.is_empty() {
            let keys: Vec<AMQPValue> = others
                .iter()
                .map(|&bucket| AMQPValue::LongString(bucket_key_of(bucket).into()))
                .collect();
            let mut headers = FieldTable::default();
            headers.insert("CC".into(), AMQPValue::FieldArray(FieldArray::from(keys)));
            properties = properties.with_headers(headers);
        }
        let publish = channel.basic_publish(
            exchange.as_str().into(),
            bucket_key_of(first).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        );
        let confirm = publish_and_confirm(publish, limit).await;
        let error = match confirm {
            Ok(routed) => return Ok(routed),
            Err(Unconfirmed::Nacked) => return Err(Error::Nacked),
            Err(Unconfirmed::Timeout) => Error::ConfirmTimeout,
            Err(Unconfirmed::Lost(source)) => Error::channel("publish a broadcast")(source),
        };
        // The channel may be dead or wedged: the next publish opens a new one.
        *self.link.lock().await = None;
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
        let channel = open_channel(&connection).await?;
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
        Ok(Self {
            connection,
            channel,
            queue,
            consumer,
            exchange: exchange_name(&settings.prefix),
        })
    }

    /// Receives broadcasts of bucket `bucket` from now on.
    ///
    /// # Errors
    /// The channel failed.
    pub async fn bind(&self, bucket: u16) -> Result<(), Error> {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                bucket_key_of(bucket).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::channel("bind a bucket"))
    }

    /// Stops receiving broadcasts of bucket `bucket`.
    ///
    /// # Errors
    /// The channel failed.
    pub async fn unbind(&self, bucket: u16) -> Result<(), Error> {
        self.channel
            .queue_unbind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                bucket_key_of(bucket).as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::channel("unbind a bucket"))
    }
}

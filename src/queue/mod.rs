//! RabbitMQ: the topology Herald declares, the publisher (persistent messages, pipelined confirms) and
//! the consumer (manual acks, prefetch as demand).
//!
//! The broker may be down at any moment: nothing here panics or gives up on a lost connection. The
//! publisher reconnects with backoff and reports what was confirmed; what was not stays unpublished in
//! PostgreSQL for the outbox relay. Depends on no other Herald module.

pub mod fanout;
mod publisher;

pub use publisher::{OutgoingMessage, Publisher, PublisherEvent, PublisherHandle};

use crate::config::QueueSettings;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
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
    /// The durable work queue events are published to.
    pub events_queue: String,
    /// Where rejected (dead) events go.
    pub dead_letter_exchange: String,
    /// The queue holding dead events for operators.
    pub dead_letter_queue: String,
}

impl Topology {
    /// Names for `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            events_queue: format!("{prefix}.events"),
            dead_letter_exchange: format!("{prefix}.dead"),
            dead_letter_queue: format!("{prefix}.events.dead"),
        }
    }

    /// The delay queue for retries after `delay_ms`: no consumer; its messages expire back into
    /// the events queue.
    pub fn retry_queue(prefix: &str, delay_ms: u64) -> String {
        format!("{prefix}.retry.{delay_ms}ms")
    }
}

/// The header carrying which attempt a delivery is (1 when absent: a first publish or a replay).
pub const ATTEMPT_HEADER: &str = "x-herald-attempt";

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
/// a per-message expiration (the jittered delay) is dead-lettered, when it expires, through the
/// default exchange straight back into the events queue. Quorum delay queues dead-letter
/// at-least-once, so a retry is never lost between the two queues.
///
/// # Errors
/// A declaration failed (e.g. an existing queue with other arguments).
pub async fn declare_retry_queues(
    channel: &Channel,
    settings: &QueueSettings,
    delays_ms: &[u64],
) -> Result<(), Error> {
    let names = Topology::new(&settings.prefix);
    for &delay in delays_ms {
        let queue = Topology::retry_queue(&settings.prefix, delay);
        let mut args = queue_arguments(settings, Some(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.events_queue.as_str().into()),
        );
        if settings.queue_type == "quorum" {
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
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|source| Error::Topology {
                what: queue.clone(),
                source,
            })?;
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
    for &delay in delays_ms {
        let queue = Topology::retry_queue(&settings.prefix, delay);
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "cleanup done".into()).await;
    Ok(())
}

/// Why a retry could not be scheduled.
#[derive(Debug, thiserror::Error)]
pub enum RetryPublishError {
    /// The channel or connection failed: the delivery will be redelivered.
    #[error("cannot publish the retry")]
    Lost(#[source] lapin::Error),
    /// The broker refused it (nack, unroutable) or did not confirm it in time.
    #[error("the broker did not take the retry ({0})")]
    Refused(&'static str),
}

/// A retry to publish: the message again, bound for a delay queue.
#[derive(Debug)]
pub struct RetryMessage<'a> {
    /// The scheduled delay: names the delay queue.
    pub delay_ms: u64,
    /// The jittered delay: the message's expiration in that queue.
    pub expiration_ms: u64,
    /// The attempt it comes back as.
    pub attempt: u32,
    /// The event id.
    pub message_id: &'a str,
    /// The unchanged envelope.
    pub body: &'a [u8],
}

/// Publishes `retry` to its delay queue and waits for the broker's confirm (`channel` is in
/// confirm mode). Concurrent calls pipeline their confirms on the one channel.
///
/// # Errors
/// Lost channel, nack, unroutable or confirm timeout.
pub async fn publish_retry(
    channel: &Channel,
    prefix: &str,
    retry: &RetryMessage<'_>,
    confirm_timeout: Duration,
) -> Result<(), RetryPublishError> {
    let RetryMessage {
        delay_ms,
        expiration_ms,
        attempt,
        message_id,
        body,
    } = *retry;
    let mut headers = FieldTable::default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    let properties = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_expiration(expiration_ms.max(1).to_string().into())
        .with_headers(headers);
    let queue = Topology::retry_queue(prefix, delay_ms);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(RetryPublishError::Lost)?;
    match tokio::time::timeout(confirm_timeout, confirm).await {
        Err(_) => Err(RetryPublishError::Refused("confirm timeout")),
        Ok(Err(error)) => Err(RetryPublishError::Lost(error)),
        Ok(Ok(confirmation)) if confirmation.is_nack() => Err(RetryPublishError::Refused("nack")),
        Ok(Ok(confirmation)) => match confirmation.take_message() {
            Some(_) => Err(RetryPublishError::Refused("unroutable")),
            None => Ok(()),
        },
    }
}

/// Connects with a timeout. Each role (publisher, consumer) has its own connection, so flow control
/// on a publishing connection never stalls consumption.
///
/// # Errors
/// Unreachable broker, refused credentials, or the timeout.
pub async fn connect(settings: &QueueSettings, role: &str) -> Result<Connection, Error> {
    // The prefix in the name lets an operator (or a test sharing the broker) find this
    // deployment's connections, e.g. to close only those with `rabbitmqctl close_connection`.
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("herald-{}-{role}", settings.prefix).into());
    let attempt = Connection::connect(settings.amqp_url.expose(), properties);
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

/// Declares the topology; idempotent, run on every (re)connect of every role.
///
/// # Errors
/// A declaration failed (e.g. an existing queue with other arguments).
pub async fn declare_topology(channel: &Channel, settings: &QueueSettings) -> Result<(), Error> {
    let names = Topology::new(&settings.prefix);
    let fail = |what: &str| {
        let what = what.to_owned();
        move |source| Error::Topology { what, source }
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            names.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail(&names.dead_letter_exchange))?;
    channel
        .queue_declare(
            names.dead_letter_queue.as_str().into(),
            durable,
            queue_arguments(settings, None),
        )
        .await
        .map_err(fail(&names.dead_letter_queue))?;
    channel
        .queue_bind(
            names.dead_letter_queue.as_str().into(),
            names.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail("dead-letter binding"))?;
    channel
        .queue_declare(
            names.events_queue.as_str().into(),
            durable,
            queue_arguments(settings, Some(&names.dead_letter_exchange)),
        )
        .await
        .map_err(fail(&names.events_queue))?;
    Ok(())
}

fn queue_arguments(settings: &QueueSettings, dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum queues replicate and survive a broker node's loss; classic is for single-node setups.
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(settings.queue_type.as_str().into()),
    );
    if let Some(exchange) = dead_letter_exchange {
        // A message nacked without requeue (a failed delivery) goes here instead of vanishing.
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.into()),
        );
    }
    args
}

/// Deletes every queue and exchange of the topology (tests and benchmarks clean up with it).
///
/// # Errors
/// The broker is unreachable.
pub async fn delete_topology(settings: &QueueSettings) -> Result<(), Error> {
    let connection = connect(settings, "cleanup").await?;
    let channel = open_channel(&connection).await?;
    let names = Topology::new(&settings.prefix);
    for queue in [&names.events_queue, &names.dead_letter_queue] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        names.dead_letter_exchange,
        fanout::exchange_name(&settings.prefix),
    ] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "cleanup done".into()).await;
    Ok(())
}

/// A consumer on the events queue with `prefetch` unacked deliveries at most: the worker pool's demand.
pub struct EventConsumer {
    /// Keeps the connection open while deliveries are acked.
    pub connection: Connection,
    /// The channel deliveries are acked on.
    pub channel: Channel,
    /// The delivery stream.
    pub consumer: Consumer,
    /// A confirm-mode channel on the same connection, for publishing retries: if the connection
    /// goes, unacked deliveries and unconfirmed retries go together (and are redelivered).
    pub retry_channel: Channel,
    /// The consumer tag, to cancel it at shutdown.
    pub tag: String,
}

/// Connects, declares the topology (with the delay queues of `retry_delays_ms`) and starts
/// consuming the events queue with manual acks.
///
/// # Errors
/// Any step failed; the caller reconnects with backoff.
pub async fn consume_events(
    settings: &QueueSettings,
    tag: &str,
    retry_delays_ms: &[u64],
) -> Result<EventConsumer, Error> {
    let connection = connect(settings, "consumer").await?;
    let channel = open_channel(&connection).await?;
    declare_topology(&channel, settings).await?;
    declare_retry_queues(&channel, settings, retry_delays_ms).await?;
    let retry_channel = open_channel(&connection).await?;
    enable_confirms(&retry_channel).await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(|source| Error::Channel {
            what: "set prefetch",
            source,
        })?;
    let consumer = channel
        .basic_consume(
            Topology::new(&settings.prefix).events_queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| Error::Channel {
            what: "start consuming",
            source,
        })?;
    Ok(EventConsumer {
        connection,
        channel,
        consumer,
        retry_channel,
        tag: tag.to_owned(),
    })
}

/// Exponential backoff for reconnects: 100 ms doubling up to a cap.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 100 ms, never above `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn names_share_the_prefix() {
        let t = Topology::new("test_1");
        assert_eq!(t.events_queue, "test_1.events");
        assert_eq!(t.dead_letter_queue, "test_1.events.dead");
        assert_eq!(Topology::retry_queue("test_1", 500), "test_1.retry.500ms");
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

//! RabbitMQ: connections and the one confirm wait (here); the names and declarations (`topology`),
//! the publisher of event batches (`publisher`: persistent messages, pipelined confirms), retries
//! and dead letters (`retry`), the partition consumers (`consumer`: manual acks, prefetch as
//! demand), queue depth reads (`probe`), the nodes of a cluster (`nodes`), and the cross-node
//! fan-out of pubsub (`fanout`).
//!
//! The broker may be down at any moment: nothing here panics or gives up on a lost connection. The
//! publisher reconnects with backoff and reports what was confirmed; what was not stays unpublished in
//! PostgreSQL for the outbox relay. Depends on no other Herald module.

mod consumer;
pub mod fanout;
pub mod nodes;
mod probe;
mod publisher;
mod retry;
pub mod selfcheck;
mod topology;

pub use consumer::{ConsumerLink, PARTITION_QOS_MESSAGES, Settlement, Unsettled, settle};
pub use nodes::BrokerNodes;
pub use probe::{DepthProbe, ready_counts, ready_messages};
pub use publisher::{OutgoingMessage, Publisher, PublisherEvent, PublisherHandle, Source};
pub use retry::{
    ATTEMPT_HEADER, PARTITION_HEADER, RetryMessage, RetryPublishError, attempt_of,
    publish_dead_letter, publish_retry,
};
pub use topology::{
    Topology, declare_retry_queues, declare_topology, delete_retry_queues, delete_topology,
    messages_in_layout, remove_legacy_queues, remove_partitions,
};

use crate::config::QueueSettings;
use lapin::{Channel, Connection, ConnectionProperties};
use std::future::Future;
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
    /// A channel call was not answered in time.
    #[error("cannot {0}: no answer in time")]
    NoAnswer(String),
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

impl Error {
    /// For `map_err`: the channel operation `what` failed.
    pub(crate) fn channel(what: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Channel { what, source }
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
/// The one confirm wait: of the publisher and the fan-out (which pipeline their confirms) and,
/// through [`publish_and_confirm`], of retries.
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

/// Sends a publish and waits for its confirm, the two together within `limit` (a wedged channel
/// can stall the send as well as the confirm): for publishes that wait for their own confirm,
/// retries. Resolves as [`confirmed`] does.
///
/// # Errors
/// The channel failed, the broker nacked, or the send and confirm took longer than `limit`.
pub async fn publish_and_confirm(
    publish: impl Future<Output = Result<lapin::PublisherConfirm, lapin::Error>>,
    limit: Duration,
) -> Result<bool, Unconfirmed> {
    let deadline = tokio::time::Instant::now() + limit;
    match tokio::time::timeout_at(deadline, publish).await {
        Ok(Ok(confirm)) => {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            confirmed(confirm, left).await
        }
        Ok(Err(error)) => Err(Unconfirmed::Lost(error)),
        Err(_) => Err(Unconfirmed::Timeout),
    }
}

/// `call`'s answer within `limit` (`queue.confirm_timeout_ms` where settings are at hand): a
/// channel call the broker answers in milliseconds can otherwise wait forever on a connection that
/// broke under it, as lapin's acks were seen to (see [`settle`]), and hold up whatever waits on it.
/// `what` names the call for the error.
///
/// # Errors
/// The call failed (`failed` maps its error), or no answer came within `limit`.
pub(crate) async fn answered<T>(
    what: impl FnOnce() -> String,
    limit: Duration,
    call: impl Future<Output = Result<T, lapin::Error>>,
    failed: impl FnOnce(lapin::Error) -> Error,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer.map_err(failed),
        Err(_) => Err(Error::NoAnswer(what())),
    }
}

/// [`answered`] for a channel call named `what`, its failure a [`Error::Channel`].
///
/// # Errors
/// The channel failed, or no answer came within `limit`.
pub(crate) async fn channel_answered<T>(
    what: &'static str,
    limit: Duration,
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    answered(|| what.to_owned(), limit, call, Error::channel(what)).await
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
    match tokio::time::timeout(settings.connect_timeout(), attempt).await {
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
        .map_err(Error::channel("open a channel"))
}

/// Turns on publisher confirms: from now on the broker acknowledges each publish once it is safe.
///
/// # Errors
/// The channel failed.
pub async fn enable_confirms(channel: &Channel) -> Result<(), Error> {
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(Error::channel("enable publisher confirms"))
}

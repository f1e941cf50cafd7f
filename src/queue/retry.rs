//! Retries and dead letters: a failed event goes alone, with its attempt number, to a delay queue
//! (and back to its partition when it expires), or for good to the dead-letter exchange; each
//! publish waits for its confirm.

use super::{Topology, Unconfirmed, publish_and_confirm};
use lapin::Channel;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

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
    let publish = channel.basic_publish(
        exchange.into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        properties,
    );
    match publish_and_confirm(publish, confirm_timeout).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(RetryPublishError::Refused("unroutable")),
        Err(Unconfirmed::Nacked) => Err(RetryPublishError::Refused("nack")),
        Err(Unconfirmed::Timeout) => Err(RetryPublishError::Timeout),
        Err(Unconfirmed::Lost(error)) => Err(RetryPublishError::Lost(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

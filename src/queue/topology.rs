//! What Herald declares on the broker, under one prefix: the partition queues (single-active-
//! consumer, bound to the partition exchange by number), the delay queues of retries, the
//! dead-letter exchange and queue; and their removal.

use super::{
    Error, PARTITION_HEADER, answered, connect, fanout, open_channel, ready_counts, ready_messages,
};
use crate::config::{QueueSettings, QueueType};
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;

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
    let limit = settings.confirm_timeout();
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
        declare_queue(channel, &queue, args, limit).await?;
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

/// Declares the topology; idempotent, run on every (re)connect of every role: the dead-letter
/// exchange and queue, the partition exchange, and the partition queues, each a single-active-
/// consumer queue bound to the partition exchange by its number.
///
/// # Errors
/// A declaration failed (e.g. an existing queue with other arguments).
pub async fn declare_topology(channel: &Channel, settings: &QueueSettings) -> Result<(), Error> {
    let names = Topology::new(&settings.prefix, settings.partitions);
    // Each call bounded (see `answered`): the declarations run on every (re)connect, and one that
    // waits forever keeps a worker or publisher from ever reconnecting.
    let limit = settings.confirm_timeout();
    let (dead_letters, partitions) = (&names.dead_letter_exchange, &names.partition_exchange);
    declare_exchange(channel, dead_letters, ExchangeKind::Fanout, limit).await?;
    let args = queue_arguments(settings, None);
    declare_queue(channel, &names.dead_letter_queue, args, limit).await?;
    let (queue, no_args) = (&names.dead_letter_queue, FieldTable::default());
    bind(channel, queue, dead_letters, no_args, limit).await?;
    declare_exchange(channel, partitions, ExchangeKind::Headers, limit).await?;
    for p in 0..names.partitions {
        let queue = names.partition_queue(p);
        let mut args = queue_arguments(settings, Some(&names.dead_letter_exchange));
        // The broker's fence: at most one consumer of a partition is active at any moment, so no
        // two worker nodes ever deliver one user's events at once, whatever they believe about
        // their leases.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        declare_queue(channel, &queue, args, limit).await?;
        let mut binding = FieldTable::default();
        binding.insert("x-match".into(), AMQPValue::LongString("all".into()));
        binding.insert(
            PARTITION_HEADER.into(),
            AMQPValue::LongString(p.to_string().into()),
        );
        bind(channel, &queue, partitions, binding, limit).await?;
    }
    Ok(())
}

/// What failed declaring `what`.
fn declaring(what: String) -> impl FnOnce(lapin::Error) -> Error {
    move |source| Error::Topology { what, source }
}

async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    limit: Duration,
) -> Result<(), Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let call = channel.exchange_declare(name.into(), kind, durable, FieldTable::default());
    let what = || format!("declare {name}");
    answered(what, limit, call, declaring(name.to_owned())).await
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    limit: Duration,
) -> Result<(), Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let call = channel.queue_declare(name.into(), durable, args);
    let what = || format!("declare {name}");
    answered(what, limit, call, declaring(name.to_owned()))
        .await
        .map(|_| ())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    args: FieldTable,
    limit: Duration,
) -> Result<(), Error> {
    let call = channel.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        args,
    );
    let what = || format!("bind {queue}");
    answered(what, limit, call, declaring(format!("binding of {queue}"))).await
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
            .map_err(Error::channel("delete a queue of the pre-partition layout"))?;
        let _ = channel.close(200, "done".into()).await;
        tracing::warn!(queue = %queue, "deleted a queue of the pre-partition layout; the outbox relay republishes what it held");
    }
    Ok(())
}

/// The messages waiting in the layout of `running` partitions: in its partition queues and in the
/// delay queues of `delays_ms` (which expire into them). A layout change waits for zero.
///
/// # Errors
/// The broker is unreachable.
pub async fn messages_in_layout(
    connection: &Connection,
    prefix: &str,
    running: u16,
    delays_ms: &[u64],
) -> Result<u64, Error> {
    let old = Topology::new(prefix, running);
    let mut queues: Vec<String> = (0..running).map(|p| old.partition_queue(p)).collect();
    queues.extend(delays_ms.iter().map(|&d| old.delay_queue(d)));
    let counts = ready_counts(connection, &queues).await?;
    Ok(counts.into_iter().flatten().map(u64::from).sum())
}

/// Deletes the partition queues `from..to` of a layout that had `to` partitions, once it shrank
/// to `from` (they are empty: [`messages_in_layout`] said so). Best effort: a queue left behind
/// holds nothing and is never consumed.
pub async fn remove_partitions(connection: &Connection, prefix: &str, from: u16, to: u16) {
    let old = Topology::new(prefix, to);
    for p in from..to {
        if let Ok(channel) = open_channel(connection).await {
            let _ = channel
                .queue_delete(
                    old.partition_queue(p).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
    }
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
        fanout::legacy_exchange_name(&settings.prefix),
    ] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "cleanup done".into()).await;
    Ok(())
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
}
